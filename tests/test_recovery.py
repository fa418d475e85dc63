"""kill -9 of the node (or of one ingest process) in the middle of a
transfer: nothing that was acknowledged is lost, and the study completes
exactly once after the sender finishes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicom_node.sender import guard_responses

from .factory import ct_dataset
from .nodeproc import NodeProcess

pytestmark = pytest.mark.slow


class Sender(threading.Thread):
    """Sends a study instance by instance and records what was acknowledged."""

    def __init__(self, port: int, datasets: list) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.datasets = datasets
        self.acked: list[str] = []
        self.errors = 0

    def run(self) -> None:
        ae = AE(ae_title="CT_SCANNER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.dimse_timeout = 5
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PACS_AI")
        if not assoc.is_established:
            self.errors += 1
            return
        guard_responses(assoc)  # pynetdicom's lost-response race: see dicom_node/sender.py
        try:
            for ds in self.datasets:
                try:
                    rsp = assoc.send_c_store(ds)
                except Exception:
                    self.errors += 1
                    return
                if "Status" not in rsp:  # no response: the peer is gone
                    self.errors += 1
                    return
                if rsp.Status == 0:
                    self.acked.append(ds.SOPInstanceUID)
        finally:
            if assoc.is_established:
                assoc.release()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def check_all_acknowledged_are_stored(node: NodeProcess, acked: list[str]) -> None:
    stored = {p.stem for p in node.stored_files()}
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged instances lost"


def complete_count(node: NodeProcess, key: str) -> int:
    history = node.status(key)["history"]
    return sum(1 for h in history if h["to_state"] == "COMPLETE")


def test_kill_9_of_the_node_loses_nothing_acknowledged(tmp_path):
    node = NodeProcess(tmp_path, study_idle_timeout=1.0, ingest_processes=1)
    node.start()
    study_uid = generate_uid()
    series_uid = generate_uid()
    datasets = [ct_dataset(study_uid, series_uid, index=i, size=128) for i in range(400)]
    sender = Sender(node.port, datasets)
    try:
        sender.start()
        wait_until(lambda: len(sender.acked) >= 60, 30, "60 acknowledged instances")
        node.kill9()
        sender.join(30)
        acked = list(sender.acked)
        assert 60 <= len(acked) < 400, "the kill should land mid-transfer"

        node.start()  # same spool, same port
        check_all_acknowledged_are_stored(node, acked)
        assert not list((node.spool / "tmp").iterdir()), "temp files of the crash must be gone"
        [study] = node.status()
        assert study["state"] == "RECEIVING"  # resumed, not completed by the crash
        assert study["instance_count"] >= len(acked)

        # The sender retries what it was not told Success for.
        rest = [ds for ds in datasets if ds.SOPInstanceUID not in set(acked)]
        retry = Sender(node.port, rest)
        retry.start()
        retry.join(60)
        assert retry.errors == 0 and len(retry.acked) == len(rest)
        [study] = node.wait_for_state("QUEUED")
        assert study["instance_count"] == 400
        assert len(node.stored_files()) == 400
        time.sleep(1.5)
        assert complete_count(node, study["study_key"]) == 1, "the study must complete once"
        text = node.log_text()
        assert "association(s) left open by an earlier run" in text
    finally:
        node.stop()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        kids += [int(c) for c in children]
    return kids


def _ingest_children(pid: int) -> list[int]:
    """The node's spawned ingest processes (not multiprocessing's helpers)."""
    out = []
    for child in _children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing.spawn" in cmdline or b"spawn_main" in cmdline:
            out.append(child)
    return out


def test_kill_9_of_an_ingest_process_is_survived(tmp_path):
    node = NodeProcess(tmp_path, study_idle_timeout=1.0, ingest_processes=2)
    node.start()
    try:
        assert node.proc is not None
        wait_until(lambda: len(_ingest_children(node.proc.pid)) >= 2, 15, "two ingest processes")
        study_uid, series_uid = generate_uid(), generate_uid()
        datasets = [ct_dataset(study_uid, series_uid, index=i, size=128) for i in range(300)]
        # Two senders, so that (with two processes on one socket) one
        # of them is very likely served by the process we kill.
        senders = [Sender(node.port, datasets[k::2]) for k in range(2)]
        for s in senders:
            s.start()
        wait_until(lambda: sum(len(s.acked) for s in senders) >= 60, 30, "60 acknowledged")
        victim = _ingest_children(node.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        for s in senders:
            s.join(30)
        acked = [sop for s in senders for sop in s.acked]
        check_all_acknowledged_are_stored(node, acked)
        wait_until(
            lambda: len(_ingest_children(node.proc.pid)) >= 2 and victim not in _ingest_children(node.proc.pid),
            20, "a replacement ingest process",
        )
        rest = [ds for ds in datasets if ds.SOPInstanceUID not in set(acked)]
        retry = Sender(node.port, rest)
        retry.start()
        retry.join(60)
        assert retry.errors == 0
        [study] = node.wait_for_state("QUEUED", timeout=30)
        assert study["instance_count"] == 300
        assert complete_count(node, study["study_key"]) == 1
        assert "ingest process" in node.log_text() and "starting another" in node.log_text()
    finally:
        node.stop()


def test_ingest_processes_exit_when_the_node_is_killed(tmp_path):
    """No orphan keeps serving (or holding the port) after kill -9 of the
    node: the next node can start on the same port at once."""
    node = NodeProcess(tmp_path, ingest_processes=2)
    node.start()
    assert node.proc is not None
    wait_until(lambda: len(_ingest_children(node.proc.pid)) >= 2, 15, "two ingest processes")
    children = _ingest_children(node.proc.pid)
    node.kill9()

    def gone(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return True
        return state == "Z"

    wait_until(lambda: all(gone(pid) for pid in children), 15, "the ingest processes to exit")
    node.start()
    try:
        assert node.status() == []
    finally:
        node.stop()
