"""Shared fixtures: free ports, DCMTK environment, small DICOM files."""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(proc, timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status (a test's processes
    are stopped the way an operator's service manager would)."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def kill9(proc) -> None:
    """SIGKILL and reap: a crash, not a stop."""
    import signal

    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: without TCP_NODELAY=1 DCMTK 3.6.7 leaves
    Nagle's algorithm on and each message waits ~40 ms (FIELD-NOTES.md)."""
    for tool in ("storescu", "echoscu", "storescp"):
        if shutil.which(tool) is None:
            pytest.fail(f"DCMTK's {tool} is not installed: the README's test command installs it")
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env
