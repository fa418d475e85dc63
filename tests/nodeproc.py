"""Run ``pacs-ai node`` as a real process for tests."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from study_queue.settings import toml_value

from .conftest import free_port, terminate
from .conftest import kill9 as kill_process


def write_config(path: Path, node: dict[str, Any], peers: list[dict[str, Any]] | None = None,
                 sections: dict[str, dict[str, Any]] | None = None) -> Path:
    lines = ["[node]"] + [f"{k} = {toml_value(v)}" for k, v in node.items()]
    for name, values in (sections or {}).items():
        lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for peer in peers or []:
        lines += ["", "[[peers]]"] + [f"{k} = {toml_value(v)}" for k, v in peer.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class _Subprocess:
    """What node and worker processes share: a crash is kill -9, then the log is closed."""

    proc: subprocess.Popen[bytes] | None
    _stderr: Any

    def kill9(self) -> None:
        assert self.proc is not None
        kill_process(self.proc)
        self._stderr.close()
        self.proc = None


class NodeProcess(_Subprocess):
    """A ``pacs-ai node`` (or ``run``) subprocess with its own spool and port; ``sections``
    adds other config tables (``queue``, ``delivery``...)."""

    def __init__(self, workdir: Path, port: int | None = None, peers: list[dict[str, Any]] | None = None,
                 command: str = "node", sections: dict[str, dict[str, Any]] | None = None, **node: Any) -> None:
        self.workdir = workdir
        self.command = command
        self.port = port or free_port()
        self.spool = workdir / "spool"
        self.node = {
            "ae_title": "PACS_AI",
            "bind": "127.0.0.1",
            "port": self.port,
            "spool": str(self.spool),
            "study_idle_timeout": 1.0,
            "ingest_processes": 1,
            "shutdown_grace": 3.0,
            **node,
        }
        # No HTTP unless a test asks for it: nodes of tests running side by side would race for
        # port 8110, and whichever won would run a metrics thread the others do not.
        self.sections = {"delivery": {"outbox": str(workdir / "outbox")}, "http": {"port": 0, "worker_port": 0},
                         **(sections or {})}
        self.config = write_config(workdir / "node.toml", self.node, peers, self.sections)
        self.stderr_path = workdir / "node.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.preexec_fn = None

    def start(self, timeout: float = 20.0) -> "NodeProcess":
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "study_queue.cli", self.command, "--config", str(self.config)],
            stdout=self._stderr,
            stderr=self._stderr,
            cwd=self.workdir,
            preexec_fn=self.preexec_fn,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            if self._echo_ok():
                return self
            time.sleep(0.1)
        raise RuntimeError("node did not come up: " + self.log_text()[-2000:])

    def _echo_ok(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.node["ae_title"])
        if assoc.is_rejected:
            return True  # a node that restricts its callers is up and answering
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()
        code = self.proc.returncode
        self.proc = None
        return code


    def status(self, study: str | None = None) -> Any:
        cmd = [sys.executable, "-m", "study_queue.cli", "status", "--config", str(self.config), "--json"]
        if study:
            cmd += ["--study", study]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=self.workdir, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def wait_for_state(self, state: str, count: int = 1, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        studies: list[dict] = []
        while time.monotonic() < deadline:
            studies = [s for s in self.status() if s["state"] == state]
            if len(studies) >= count:
                return studies
            time.sleep(0.2)
        raise AssertionError(f"expected {count} {state} studies, journal has {self.status()}")

    def log_text(self) -> str:
        """stderr and every log file under the spool (node and workers)."""
        text = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        for log_file in sorted((self.spool / "logs").glob("*.log*")):
            text += "\n" + log_file.read_text(errors="replace")
        return text

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """The log once it holds ``needle``. The node writes an association's audit line
        after it has answered the release, so a peer can be done before the line is."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the node's log within {timeout} s:\n{text[-3000:]}")
            time.sleep(0.1)

    def study(self, key: str | None = None) -> dict:
        """The one study of the journal (or the one with ``key``), with its history."""
        if key is None:
            [only] = self.status()
            key = only["study_key"]
        return self.status(key)

    def wait_for(self, predicate, what: str, timeout: float = 60.0) -> list[dict]:
        """Poll the journal until ``predicate(studies)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            studies = self.status()
            if predicate(studies):
                return studies
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; journal has "
                             f"{[(s['study_key'], s['state'], s['reason']) for s in self.status()]}\n"
                             + self.log_text()[-4000:])

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.spool.rglob("*.dcm") if p.relative_to(self.spool).parts[0] != "tmp")

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess(_Subprocess):
    """A ``pacs-ai worker`` subprocess using a node's config file."""

    def __init__(self, node: NodeProcess, queues: str = "inference", name: str = "worker") -> None:
        self.node = node
        self.queues = queues
        self.stderr_path = node.workdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "WorkerProcess":
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "study_queue.cli", "worker", "--queues", self.queues,
             "--config", str(self.node.config)],
            stdout=self._stderr, stderr=self._stderr, cwd=self.node.workdir,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        code = terminate(self.proc, timeout)
        self._stderr.close()
        self.proc = None
        return code


    def log_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
