"""No loss, no duplicates (issue 5): real processes, real kills, a real Redis, a real PACS.

The PACS here is a pynetdicom storage SCP in the test process (``StorageSCP``); the
modality is DCMTK's storescu. Each test counts what the PACS received by SOP Instance UID
*and* C-STORE request: "exactly one SR" means one SR instance, and the journal's history
shows what happened on the way.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import free_port
from tests.nodeproc import NodeProcess, WorkerProcess
from tests.redisproc import RedisProcess

from .conftest import StorageSCP, assert_finds_truth, phantom_files, quick, truth

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def storescu(port: int, files, env, aet: str = "CT_SCANNER") -> None:
    out = subprocess.run(["storescu", "-aet", aet, "-aec", "PACS_AI", "127.0.0.1", str(port), *map(str, files)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def peers(pacs_port: int) -> list[dict]:
    return [{"ae_title": "CT_SCANNER", "host": "127.0.0.1", "port": pacs_port}]


def wait_until(predicate, what: str, timeout: float = 60.0, node: NodeProcess | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{node.log_text()[-3000:]}" if node else ""))


def heartbeat(node: NodeProcess, key: str, run: int = 1) -> Path:
    return node.spool / "work" / key / f"run-{run}" / "heartbeat"


def history(node: NodeProcess, key: str) -> list[tuple[str, str]]:
    return [(h["to_state"], h["reason"] or "") for h in node.status(key)["history"]]


def srs(pacs: StorageSCP) -> list:
    return [ds for ds in pacs.received.values() if ds.SOPClassUID == SR_CLASS]


def test_storescu_modality_to_a_pynetdicom_pacs(tmp_path, phantom, dcmtk_env):
    """A modality sends directly; the report goes back to the modality's [[peers]] entry."""
    pacs_port = free_port()
    with StorageSCP(pacs_port) as pacs:
        node = NodeProcess(tmp_path, command="run", sections=quick(tmp_path), peers=peers(pacs_port))
        try:
            node.start(timeout=60)
            storescu(node.port, phantom_files(phantom), dcmtk_env)
            [study] = node.wait_for(lambda s: s and s[0]["state"] == "DELIVERED", "DELIVERED")
            [sr] = srs(pacs)
            assert_finds_truth(sr, truth(phantom))
            assert {ds.Modality for ds in pacs.received.values()} == {"SR", "OT", "KO"}
            assert set(pacs.callers) == {"PACS_AI"}
            assert pacs.stores == len(study["outputs"])  # each object once...
            assert json.loads(study["destination_answer"])["associations"] == 1  # ...on one association
        finally:
            node.stop()
        # Spool, work files, outputs, outbox, queue and logs: the service user's only.
        for root in (node.spool, tmp_path / "outbox"):
            shared = [p for p in root.rglob("*") if p.stat().st_mode & 0o077]
            assert not shared, f"readable by others: {shared[:5]}"
        # Node, dispatcher, delivery and inference worker logs: no patient name, ID or birth date.
        text = node.log_text()
        assert "analyzed" in text and "DELIVERED" in text
        header = dcmread(phantom_files(phantom)[0], stop_before_pixels=True)
        for value in (str(header.PatientName), str(header.PatientID), str(header.get("PatientBirthDate", "")) or None):
            if value:
                assert value not in text, f"patient data {value!r} in the logs"


def test_pacs_down_during_delivery_retries_then_delivers(tmp_path, phantom, dcmtk_env):
    pacs_port = free_port()
    node = NodeProcess(tmp_path, command="run", sections=quick(tmp_path), peers=peers(pacs_port))
    pacs = StorageSCP(pacs_port)
    try:
        node.start(timeout=60)
        storescu(node.port, phantom_files(phantom), dcmtk_env)
        studies = node.wait_for(lambda s: s and s[0]["state"] == "ANALYZED" and s[0]["attempts"] >= 2,
                                "two failed delivery attempts", timeout=90)
        key = studies[0]["study_key"]
        pacs.start()
        node.wait_for(lambda s: s[0]["state"] == "DELIVERED", "DELIVERED once the PACS is back", timeout=60)
        failed = [r for state, r in history(node, key) if state == "ANALYZED" and "delivery attempt" in r]
        assert len(failed) >= 2 and all(f"CT_SCANNER@127.0.0.1:{pacs_port}" in r for r in failed), failed
        attempts = node.status(key)["deliveries"]  # one row per attempt: who, when, outcome
        assert [d["outcome"] for d in attempts][-1] == "stored" and attempts[0]["outcome"] == "retry"
        assert [d["attempt"] for d in attempts] == list(range(1, len(attempts) + 1))
        assert "delivery study=" + key in node.log_text()  # the audit line
        assert len(srs(pacs)) == 1
    finally:
        pacs.stop()
        node.stop()


def test_a_worker_killed_mid_analysis_is_replaced_and_one_sr_arrives(tmp_path, phantom, dcmtk_env):
    """Redis, ``pacs-ai node`` and workers: kill -9 the worker analysing the study; the node
    sees its heartbeat stop, counts the attempt and queues the study again; another worker
    analyses it, and the PACS receives exactly one SR."""
    redis = RedisProcess(tmp_path / "redis").start()
    pacs_port = free_port()
    with StorageSCP(pacs_port) as pacs:
        node = NodeProcess(tmp_path, command="node", sections=quick(tmp_path, queue={"broker_url": redis.url}),
                           peers=peers(pacs_port))
        first = WorkerProcess(node, name="worker1")
        second = WorkerProcess(node, name="worker2")
        try:
            node.start(timeout=60)
            first.start()
            storescu(node.port, phantom_files(phantom), dcmtk_env)
            [study] = node.wait_for(lambda s: s and s[0]["state"] == "QUEUED", "QUEUED")
            key = study["study_key"]
            wait_until(lambda: heartbeat(node, key).exists(), "the analysis to start", node=node)
            first.kill9()
            assert not (node.spool / "work" / key / "run-1" / "result.json").exists(), "killed too late"
            second.start()
            node.wait_for(lambda s: s[0]["state"] == "DELIVERED", "DELIVERED", timeout=90)
            assert len(srs(pacs)) == 1
            steps = history(node, key)
            assert any("analysis attempt 1 did not finish" in r and "no heartbeat" in r for _, r in steps), steps
        finally:
            second.stop()
            node.stop()
            redis.stop()


def test_a_study_that_kills_every_worker_ends_failed(tmp_path, phantom, dcmtk_env):
    """Each worker that takes the study dies (kill -9 here, as an out-of-memory kill would):
    after ``queue.max_attempts`` the study is FAILED, and it is not taken again."""
    pacs_port = free_port()
    with StorageSCP(pacs_port) as pacs:
        node = NodeProcess(tmp_path, command="node", sections=quick(tmp_path, queue={"max_attempts": 2}),
                           peers=peers(pacs_port))
        try:
            node.start(timeout=60)
            storescu(node.port, phantom_files(phantom), dcmtk_env)
            [study] = node.wait_for(lambda s: s and s[0]["state"] == "QUEUED", "QUEUED")
            key = study["study_key"]
            for attempt in (1, 2):
                worker = WorkerProcess(node, name=f"worker{attempt}").start()
                wait_until(lambda: heartbeat(node, key).exists(), f"attempt {attempt} to start", node=node)
                worker.kill9()
                wait_until(lambda: not heartbeat(node, key).exists(), "the node to notice", timeout=30, node=node)
            [study] = node.wait_for(lambda s: s[0]["state"] == "FAILED", "FAILED")
            assert "analysis did not finish in 2 attempts" in study["reason"]
            worker = WorkerProcess(node, name="worker3").start()
            time.sleep(6)  # two stale periods: nothing queues it again
            assert node.study(key)["study"]["state"] == "FAILED"
            assert not heartbeat(node, key).exists() and not srs(pacs)
            worker.stop()
        finally:
            node.stop()


def test_redis_down_while_a_study_completes(tmp_path, phantom, dcmtk_env):
    """The study completes while Redis is stopped: it stays COMPLETE (not QUEUED: nothing was
    handed over), and is queued and delivered once Redis is back."""
    redis = RedisProcess(tmp_path / "redis").start()
    pacs_port = free_port()
    with StorageSCP(pacs_port) as pacs:
        node = NodeProcess(tmp_path, command="node", sections=quick(tmp_path, queue={"broker_url": redis.url}),
                           peers=peers(pacs_port))
        worker = WorkerProcess(node)
        try:
            node.start(timeout=60)
            worker.start()
            redis.stop()
            storescu(node.port, phantom_files(phantom), dcmtk_env)
            [study] = node.wait_for(lambda s: s and s[0]["state"] == "COMPLETE", "COMPLETE")
            time.sleep(4)
            assert node.study(study["study_key"])["study"]["state"] == "COMPLETE"
            assert "broker unreachable" in node.log_text()
            redis.start()
            node.wait_for(lambda s: s[0]["state"] == "DELIVERED", "DELIVERED after Redis is back", timeout=90)
            assert len(srs(pacs)) == 1
            assert "broker reachable again" in node.log_text()
        finally:
            worker.stop()
            node.stop()
            redis.stop()


def test_the_node_killed_mid_analysis_and_restarted_delivers_once(tmp_path, phantom, dcmtk_env):
    pacs_port = free_port()
    with StorageSCP(pacs_port) as pacs:
        node = NodeProcess(tmp_path, command="run", sections=quick(tmp_path), peers=peers(pacs_port))
        try:
            node.start(timeout=60)
            storescu(node.port, phantom_files(phantom), dcmtk_env)
            [study] = node.wait_for(lambda s: s and s[0]["state"] == "QUEUED", "QUEUED")
            key = study["study_key"]
            wait_until(lambda: heartbeat(node, key).exists(), "the analysis to start", node=node)
            node.kill9()
            node.start(timeout=60)
            node.wait_for(lambda s: s[0]["state"] == "DELIVERED", "DELIVERED after the restart", timeout=90)
            time.sleep(2)
            assert len(srs(pacs)) == 1
        finally:
            node.stop()


def test_sigterm_mid_analysis_finishes_or_hands_back_and_nothing_is_lost(tmp_path, phantom, dcmtk_env):
    """SIGTERM while a worker analyses: ``pacs-ai run`` exits 0; what it did not finish is
    finished by the next start, and the PACS gets one SR."""
    pacs_port = free_port()
    with StorageSCP(pacs_port) as pacs:
        node = NodeProcess(tmp_path, command="run", sections=quick(tmp_path), peers=peers(pacs_port))
        try:
            node.start(timeout=60)
            storescu(node.port, phantom_files(phantom), dcmtk_env)
            [study] = node.wait_for(lambda s: s and s[0]["state"] == "QUEUED", "QUEUED")
            wait_until(lambda: heartbeat(node, study["study_key"]).exists(), "the analysis to start", node=node)
            assert node.stop(signal.SIGTERM, timeout=90) == 0
            node.start(timeout=60)
            node.wait_for(lambda s: s[0]["state"] == "DELIVERED", "DELIVERED after the restart", timeout=90)
            time.sleep(2)
            assert len(srs(pacs)) == 1
        finally:
            node.stop()


def test_late_instances_supersede_the_report_and_the_new_sr_names_its_predecessor(tmp_path, phantom, dcmtk_env):
    pacs_port = free_port()
    files = phantom_files(phantom)
    with StorageSCP(pacs_port) as pacs:
        node = NodeProcess(tmp_path, command="run", sections=quick(tmp_path), peers=peers(pacs_port))
        try:
            node.start(timeout=60)
            storescu(node.port, files[:50], dcmtk_env)
            node.wait_for(lambda s: s and s[0]["state"] == "DELIVERED", "the first report")
            [first] = srs(pacs)
            storescu(node.port, files[50:], dcmtk_env)
            node.wait_for(lambda s: s[0]["state"] == "DELIVERED" and s[0]["run"] == 2, "the second report", timeout=90)
            assert len(srs(pacs)) == 2
            [second] = [ds for ds in srs(pacs) if ds.SOPInstanceUID != first.SOPInstanceUID]
            [pred] = second.PredecessorDocumentsSequence
            assert pred.StudyInstanceUID == first.StudyInstanceUID
            ref = pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
            states = [s for s, _ in history(node, node.status()[0]["study_key"])]
            assert states.count("SUPERSEDED") == 1 and states[-1] == "DELIVERED"
        finally:
            node.stop()


def test_a_study_no_model_matches_ends_ignored(tmp_path, dcmtk_env):
    from pydicom.data import get_testdata_file

    pacs_port = free_port()
    with StorageSCP(pacs_port) as pacs:
        node = NodeProcess(tmp_path, command="run", sections=quick(tmp_path), peers=peers(pacs_port))
        try:
            node.start(timeout=60)
            storescu(node.port, [get_testdata_file("MR_small.dcm")], dcmtk_env)
            [study] = node.wait_for(lambda s: s and s[0]["state"] == "IGNORED", "IGNORED")
            assert "no model matched" in study["reason"] and "lung-nodule-ct" in study["reason"]
            assert not pacs.received
        finally:
            node.stop()


def test_the_workers_refuse_a_pickled_message(tmp_path):
    """Anyone who can write to the broker must not run code in a worker: a pickle message
    whose unpickling would create a file is refused, and the file never appears."""
    from study_queue.celery_app import ANALYZE, make_app
    from study_queue.settings import load_settings

    node = NodeProcess(tmp_path, command="run", sections=quick(tmp_path))
    canary = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    try:
        node.start(timeout=60)
        time.sleep(2)  # the workers are consuming
        settings = load_settings(node.config, env={})
        app = make_app(settings)
        app.send_task(ANALYZE, args=[Exploit()], queue="inference", serializer="pickle")
        wait_until(lambda: "pickle" in node.log_text() and "untrusted" in node.log_text().lower(),
                   "the refusal in the worker's log", timeout=30, node=node)
        assert not canary.exists()
        assert node.proc is not None and node.proc.poll() is None
    finally:
        node.stop()


def test_shadow_mode_writes_the_outbox_and_sends_nothing(tmp_path, phantom, dcmtk_env):
    """``delivery.return_to = "none"``: everything runs, the results are in the outbox for a
    side-by-side look, and the PACS receives nothing."""
    pacs_port = free_port()
    with StorageSCP(pacs_port) as pacs:
        node = NodeProcess(tmp_path, command="run", sections=quick(tmp_path, delivery={"return_to": "none"}),
                           peers=peers(pacs_port))
        try:
            node.start(timeout=60)
            storescu(node.port, phantom_files(phantom), dcmtk_env)
            [study] = node.wait_for(lambda s: s and s[0]["state"] == "DELIVERED", "DELIVERED (to the outbox)")
            assert study["destination"] == "none" and "outbox only" in study["reason"]
            outbox = tmp_path / "outbox" / study["study_key"] / "run-1"
            assert (outbox / "SR.dcm").is_file() and json.loads((outbox / "provenance.json").read_text())["deliveries"] == []
            time.sleep(1)
            assert not pacs.received and pacs.stores == 0
        finally:
            node.stop()
