"""Retention (issue 6): finished studies are deleted after node.retention_days; FAILED ones
stay until retried or deleted with ``pacs-ai purge``."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.nodeproc import NodeProcess

from .conftest import phantom_files, quick
from .test_routing import send, small_study

pytestmark = pytest.mark.slow


def test_finished_studies_are_deleted_after_the_retention_time(tmp_path, dcmtk_env):
    node = NodeProcess(tmp_path, command="run", sections=quick(tmp_path), retention_days=0.0001)  # 8.6 s
    try:
        node.start(timeout=60)
        send(node.port, small_study(tmp_path / "s"), "WARD_CT", dcmtk_env)
        [study] = node.wait_for(lambda s: s and s[0]["state"] == "IGNORED", "IGNORED")
        uid = study["study_uid"]
        assert (node.spool / uid).is_dir()
        node.wait_for(lambda s: not s, "the study to be deleted", timeout=60)
        assert not (node.spool / uid).exists() and not (node.spool / "work" / study["study_key"]).exists()
        assert f"study purged study={study['study_key']} state=IGNORED instances=3 reason=retention" in node.log_text()
    finally:
        node.stop()


def test_failed_studies_stay_until_purged(tmp_path, phantom, dcmtk_env):
    """No [[peers]] entry for the sender: analysed, then FAILED (nowhere to send), kept
    past the retention time; ``pacs-ai purge --failed`` deletes it and its outbox copy."""
    node = NodeProcess(tmp_path, command="run", sections=quick(tmp_path), retention_days=0.0001)
    try:
        node.start(timeout=60)
        send(node.port, phantom_files(phantom), "UNKNOWN_CT", dcmtk_env)
        [study] = node.wait_for(lambda s: s and s[0]["state"] == "FAILED", "FAILED", timeout=90)
        assert "has no [[peers]] entry" in study["reason"]
        outbox = tmp_path / "outbox" / study["study_key"]
        assert (outbox / "run-1" / "SR.dcm").is_file()  # the result is kept for a retry
        import time

        time.sleep(12)  # past the retention time: FAILED is not deleted by it
        assert node.status()[0]["state"] == "FAILED"
        busy = subprocess.run([sys.executable, "-m", "study_queue.cli", "purge", "--failed", "--config", str(node.config)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert busy.returncode == 0 and f"{study['study_key']}: deleted (FAILED, 60 instances)" in busy.stdout
        assert node.status() == [] and not outbox.exists() and not (node.spool / study["study_uid"]).exists()
    finally:
        node.stop()
