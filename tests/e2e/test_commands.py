"""The queue's commands as a user runs them: ``pacs-ai run`` on its embedded defaults (the
README's first command), one-line errors, and a clean stop that leaves no process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import free_port

pytestmark = pytest.mark.slow


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study_queue.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


def worker_children(pid: int) -> list[int]:
    """The ``pacs-ai worker`` children of ``pid`` (not its ingest processes)."""
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "study_queue.cli worker"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_run_on_its_defaults_starts_node_and_workers_and_stops_cleanly(tmp_path):
    """No config file: only the port comes from the environment (11112 may be taken here)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    env["PACS_AI_NODE_PORT"] = str(port)
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "study_queue.cli", "run"], cwd=tmp_path, env=env,
                            stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ae = AE(ae_title="PROBE")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AI")
            if assoc.is_established:
                assert assoc.send_c_echo().Status == 0
                assoc.release()
                break
            time.sleep(0.3)
        else:
            raise AssertionError((tmp_path / "run.log").read_text())
        workers = worker_children(proc.pid)
        assert len(workers) == 2  # delivery and inference
        text = (tmp_path / "run.log").read_text()
        assert "embedded" in text and (tmp_path / "var" / "spool" / "journal.sqlite").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_one_line_errors(tmp_path):
    bad = cli("worker", "--queues", "gpu", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--queues: gpu: the queues are inference-urgent, inference, delivery" in bad.stderr
    none = cli("retry", cwd=tmp_path)
    assert none.returncode == 2 and "give a STUDY_KEY or --failed" in none.stderr
    env = {**os.environ, "PACS_AI_QUEUE_BROKER_URL": "amqp://guest:guest@host/"}
    wrong = cli("worker", cwd=tmp_path, env=env)
    assert wrong.returncode == 2 and "queue.broker_url" in wrong.stderr and "Traceback" not in wrong.stderr


def test_check_config_masks_the_broker_password(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[queue]\nbroker_url = "redis://:s3cret@redis.example.org:6379/0"\n')
    out = cli("check-config", str(config), cwd=tmp_path)
    assert out.returncode == 0 and "s3cret" not in out.stdout
    assert 'broker_url = "redis://***@redis.example.org:6379/0"' in out.stdout
    assert "stale_after = 120.0" in out.stdout


def test_json_logs_carry_the_study_key(tmp_path, dcmtk_env):
    """``log_format = "json"``: every line of the node's log file is a JSON object, and the
    lines about the study (state changes) name its study key in a field of their own."""
    from tests.nodeproc import NodeProcess

    from .conftest import quick

    files = []
    from tests.factory import ct_dataset

    for n in range(3):
        ds = ct_dataset(study_uid="1.2.826.0.1.3680043.8.498.77", series_uid="1.2.826.0.1.3680043.8.498.77.1",
                        sop_uid=f"1.2.826.0.1.3680043.8.498.77.1.{n + 1}", index=n)
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    node = NodeProcess(tmp_path, command="node", sections=quick(tmp_path), log_format="json")
    try:
        node.start(timeout=60)
        out = subprocess.run(["storescu", "-aec", "PACS_AI", "127.0.0.1", str(node.port), *map(str, files)],
                             env=dcmtk_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        [study] = node.wait_for_state("QUEUED")
    finally:
        node.stop()
    import json

    lines = (node.spool / "logs" / "pacs-ai.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    about = [r for r in records if r["logger"] == "dicom_node.journal"]
    assert {"RECEIVING", "COMPLETE", "QUEUED"} <= {r["message"].split(" -> ")[-1].split(" ")[0] for r in about}
    assert all(r.get("study_key") == study["study_key"] for r in about)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
