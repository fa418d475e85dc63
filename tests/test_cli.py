"""The ``pacs-ai`` command line, run as a real subprocess (DESIGN.md section 5).

A user's mistake (bad flag, bad config, unknown study) is exactly one line on
stderr starting ``pacs-ai: error:`` that names the key, exit status 2, and
never a traceback. ``pacs-ai node`` is started for real, answers DCMTK's
``echoscu`` and stops cleanly on SIGTERM and SIGINT.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "study_queue.cli"]


# -- helpers -------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any PACS_AI_* variable (each one
    names a setting or is an error), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *names: str, status: int = 2) -> str:
    """Exit ``status``, one stderr line ``pacs-ai: error: ...`` naming every one of ``names``."""
    where = f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert "Traceback" not in result.stderr, where
    assert result.returncode == status, where
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"exactly one line on stderr expected\n{where}"
    line = lines[0]
    assert line.startswith("pacs-ai: error:"), where
    for name in names:
        assert name in line, f"the error should name {name!r}\n{where}"
    return line


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def node_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    return write_config(
        tmp_path / "node.toml",
        f'[node]\nbind = "127.0.0.1"\nport = {port}\nspool = "{tmp_path / "spool"}"\n'
        f"study_idle_timeout = 1.0\nshutdown_grace = 2.0\n{extra}",
    )


def echoscu(port: int, env: dict[str, str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", "CLI_TEST", "-aec", "PACS_AI", "-to", "3", "-ta", "3", "-td", "3",
         "127.0.0.1", str(port)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


def start_node(config: Path, cwd: Path, stderr_path: Path) -> subprocess.Popen[bytes]:
    with open(stderr_path, "wb") as err:
        return subprocess.Popen(
            [*CLI, "node", "--config", str(config)], cwd=cwd, env=clean_env(),
            stdout=subprocess.DEVNULL, stderr=err,
        )


def wait_for_echo(proc: subprocess.Popen[bytes], port: int, env: dict[str, str], stderr_path: Path,
                  deadline_s: float = 30) -> None:
    """Poll with echoscu until the node answers C-ECHO."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"pacs-ai node exited with {proc.returncode}: {stderr_path.read_text()}")
        if echoscu(port, env).returncode == 0:
            return
        time.sleep(0.1)
    pytest.fail(f"pacs-ai node did not answer C-ECHO within {deadline_s} s: {stderr_path.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


# -- bad command lines and configs: one line, exit 2 ---------------------------------
def test_bad_flag(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("node", "--bogus", cwd=tmp_path), "--bogus")


def test_bad_flag_value(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("node", "--port", "abc", cwd=tmp_path), "--port")


def test_unknown_subcommand(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("frobnicate", cwd=tmp_path), "frobnicate")


def test_no_subcommand(tmp_path: Path) -> None:
    assert_one_line_error(run_cli(cwd=tmp_path))


def test_bad_toml(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "broken.toml", "[node\nport = 1\n")
    assert_one_line_error(run_cli("node", "--config", str(cfg), cwd=tmp_path), "broken.toml", "TOML")
    assert_one_line_error(run_cli("check-config", str(cfg), cwd=tmp_path), "broken.toml", "TOML")


def test_unknown_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", "[node]\nprot = 11112\n")
    assert_one_line_error(run_cli("node", "--config", str(cfg), cwd=tmp_path), "node.prot")
    assert_one_line_error(run_cli("check-config", str(cfg), cwd=tmp_path), "node.prot")
    assert_one_line_error(run_cli("status", "--config", str(cfg), cwd=tmp_path), "node.prot")


def test_unknown_section(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", "[nodes]\nport = 11112\n")
    assert_one_line_error(run_cli("check-config", str(cfg), cwd=tmp_path), "nodes")


def test_bad_value(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", "[node]\nport = 70000\n")
    assert_one_line_error(run_cli("node", "--config", str(cfg), cwd=tmp_path), "node.port")
    cfg = write_config(tmp_path / "c2.toml", '[[peers]]\nae_title = "WAY_TOO_LONG_AE_TITLE"\nhost = "h"\n')
    assert_one_line_error(run_cli("check-config", str(cfg), cwd=tmp_path), "peers[0].ae_title")


def test_bad_override(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("node", "--port", "70000", cwd=tmp_path), "node.port")
    assert_one_line_error(run_cli("node", "--ae-title", "A" * 17, cwd=tmp_path), "node.ae_title")


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert_one_line_error(run_cli("node", "--config", str(missing), cwd=tmp_path), "missing.toml")
    assert_one_line_error(run_cli("check-config", str(missing), cwd=tmp_path), "missing.toml")


def test_unknown_environment_variable(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", "")
    result = run_cli("check-config", str(cfg), cwd=tmp_path, env=clean_env(PACS_AI_NODE_NOPE="1"))
    assert_one_line_error(result, "PACS_AI_NODE_NOPE")
    result = run_cli("check-config", str(cfg), cwd=tmp_path, env=clean_env(PACS_AI_FOO_BAR="1"))
    assert_one_line_error(result, "PACS_AI_FOO_BAR")


def test_tls_certificate_that_is_not_a_certificate(tmp_path: Path, port: int) -> None:
    """The file exists (so validation passes) but is not PEM: one line, exit 2."""
    junk = tmp_path / "cert.pem"
    junk.write_text("not a certificate\n")
    cfg = node_config(tmp_path, port, f'tls_cert = "{junk}"\n')
    assert_one_line_error(run_cli("node", "--config", str(cfg), cwd=tmp_path), "node.tls_cert")


# -- check-config ----------------------------------------------------------------
def test_check_config_prints_the_masked_effective_config(tmp_path: Path) -> None:
    from .certs import make_pki

    pki = make_pki(tmp_path / "pki")  # check-config loads the TLS files too
    key, cert = pki.server_key, pki.server_cert
    cfg = write_config(
        tmp_path / "c.toml",
        f'[node]\nport = 2104\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        '[[peers]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
        '[queue]\nbroker_url = "redis://:s3cret@host:6379/0"\n',
    )
    result = run_cli("check-config", str(cfg), cwd=tmp_path, env=clean_env(PACS_AI_INFERENCE_MODELS="a,b"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "s3cret" not in result.stdout
    assert str(key) not in result.stdout
    parsed = tomllib.loads(result.stdout)
    assert parsed["node"]["port"] == 2104
    assert parsed["node"]["tls_key"] == "***"
    assert parsed["node"]["tls_cert"] == str(cert)
    assert parsed["queue"]["broker_url"].endswith("@host:6379/0")
    assert parsed["inference"]["models"] == ["a", "b"]
    assert parsed["peers"] == [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}]


def test_check_config_of_an_empty_file_prints_the_defaults(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "empty.toml", "")
    result = run_cli("check-config", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    parsed = tomllib.loads(result.stdout)
    assert parsed["node"]["ae_title"] == "PACS_AI" and parsed["node"]["port"] == 11112
    assert parsed["http"]["port"] == 8110


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("pacs-ai")
    if not script.exists():
        pytest.skip(f"no pacs-ai console script beside {sys.executable} (project not installed there)")
    result = subprocess.run([str(script), "check-config", str(tmp_path / "nope.toml")],
                            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, "nope.toml")


# -- status ----------------------------------------------------------------------
def test_status_without_journal(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    assert_one_line_error(run_cli("status", "--spool", str(spool), cwd=tmp_path), "node.spool")
    # a spool that does not exist at all: the same, and it is not created
    absent = tmp_path / "absent"
    assert_one_line_error(run_cli("status", "--spool", str(absent), cwd=tmp_path), "node.spool")
    assert not absent.exists()


def test_status_of_an_empty_journal_and_an_unknown_study(tmp_path: Path) -> None:
    from dicom_node.journal import Journal
    from dicom_node.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    Journal(spool.journal_path).close()
    result = run_cli("status", "--spool", str(spool.root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no studies" in result.stdout
    result = run_cli("status", "--spool", str(spool.root), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert_one_line_error(run_cli("status", "--spool", str(spool.root), "--study", "NOPE", cwd=tmp_path),
                          "--study", "NOPE")


# -- pacs-ai node ------------------------------------------------------------------
def test_node_port_in_use(tmp_path: Path, port: int) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        cfg = node_config(tmp_path, port)
        result = run_cli("node", "--config", str(cfg), cwd=tmp_path, timeout=60)
    finally:
        blocker.close()
    where = f"exit {result.returncode}\nstderr: {result.stderr!r}"
    assert result.returncode != 0, where
    assert "Traceback" not in result.stderr, where
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(result.stderr.splitlines()) == 1, f"one line expected\n{where}"
    assert errors and errors[0].startswith("pacs-ai: error:") and "node.port" in errors[0], where
    assert str(port) in errors[0], where


@pytest.mark.dcmtk
@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_node_answers_echoscu_and_stops_on_signal(
    tmp_path: Path, port: int, dcmtk_env: dict[str, str], signo: signal.Signals
) -> None:
    cfg = node_config(tmp_path, port)
    stderr_path = tmp_path / "node.stderr"
    proc = start_node(cfg, tmp_path, stderr_path)
    try:
        wait_for_echo(proc, port, dcmtk_env, stderr_path)
        result = echoscu(port, dcmtk_env)
        assert result.returncode == 0, result.stderr
        started = time.monotonic()
        proc.send_signal(signo)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pacs-ai node did not stop within 10 s of {signo.name}")
        took = time.monotonic() - started
    finally:
        stop(proc)
    stderr = stderr_path.read_text()
    assert rc == 0, f"exit {rc} after {signo.name}\n{stderr}"
    assert took < 5, f"stopping took {took:.1f} s"
    assert "Traceback" not in stderr, stderr
    assert "node stopped" in stderr, stderr
    # nothing listens any more
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # the journal records the clean shutdown; the log file is under the spool
    spool = tmp_path / "spool"
    with sqlite3.connect(spool / "journal.sqlite") as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'clean_shutdown'").fetchone()
    assert row is not None and row[0] == "1"
    log = (spool / "logs" / "pacs-ai.log").read_text()
    assert "listening on 127.0.0.1:%d" % port in log
    assert "node stopped" in log
    # a status after the run reads the journal
    status = run_cli("status", "--spool", str(spool), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert_one_line_error(run_cli("status", "--spool", str(spool), "--study", "NOPE", cwd=tmp_path), "NOPE")


@pytest.mark.dcmtk
def test_node_single_ingest_process_with_overrides(tmp_path: Path, port: int, dcmtk_env: dict[str, str]) -> None:
    """``--port``, ``--ae-title`` and ``--spool`` override the file; one ingest
    process serves in the node process itself."""
    cfg = write_config(tmp_path / "c.toml", '[node]\nbind = "127.0.0.1"\nport = 1\ningest_processes = 1\n')
    spool = tmp_path / "other-spool"
    stderr_path = tmp_path / "node.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*CLI, "node", "--config", str(cfg), "--port", str(port), "--ae-title", "OVERRIDDEN",
             "--spool", str(spool)],
            cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"pacs-ai node exited with {proc.returncode}: {stderr_path.read_text()}")
            result = subprocess.run(
                ["echoscu", "-aec", "OVERRIDDEN", "-to", "3", "127.0.0.1", str(port)],
                env=dcmtk_env, capture_output=True, text=True, timeout=10,
            )
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"no C-ECHO answer: {stderr_path.read_text()}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
    finally:
        stop(proc)
    stderr = stderr_path.read_text()
    assert rc == 0, stderr
    assert "OVERRIDDEN" in stderr and "1 ingest process" in stderr, stderr
    assert (spool / "journal.sqlite").exists()
