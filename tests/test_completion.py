"""Study completion with a node running in this process (so the test can
hand it an ``on_study_complete`` callable) and pynetdicom senders."""

from __future__ import annotations

import threading
import time

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicom_node import journal as j
from dicom_node.node import Node
from dicom_node.scp import ScpConfig
from dicom_node.sender import guard_responses

from .factory import ct_dataset


class Collector:
    def __init__(self) -> None:
        self.studies = []
        self.event = threading.Event()

    def __call__(self, study) -> None:
        self.studies.append(study)
        self.event.set()

    def wait(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.studies) >= count:
                return True
            time.sleep(0.02)
        return False


@pytest.fixture
def make_node(tmp_path, port):
    nodes = []

    def make(idle: float = 0.5, max_wait: float = 60.0) -> tuple[Node, Collector]:
        collector = Collector()
        node = Node(
            ScpConfig(spool=str(tmp_path / "spool")),
            bind="127.0.0.1", port=port,
            study_idle_timeout=idle, study_max_wait=max_wait,
            ingest_processes=1, shutdown_grace=2.0, on_study_complete=collector,
        )
        node.start()
        nodes.append(node)
        return node, collector

    yield make
    for n in nodes:
        n.stop()


def associate(port: int):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AI")
    assert assoc.is_established
    guard_responses(assoc)  # pynetdicom's lost-response race: see dicom_node/sender.py
    return assoc


def test_idle_study_completes_once_and_is_handed_on(make_node, port):
    node, done = make_node(idle=0.5)
    study_uid = generate_uid()
    assoc = associate(port)
    for i in range(3):
        assert assoc.send_c_store(ct_dataset(study_uid, index=i)).Status == 0
    assoc.release()
    assert done.wait(1, timeout=5)
    [study] = done.studies
    assert study.study_uid == study_uid and study.calling_ae == "MODALITY"
    [series] = study.series
    assert {k: series[k] for k in ("series_uid", "modality", "instances")} == {
        "series_uid": ct_dataset(study_uid).SeriesInstanceUID, "modality": "CT", "instances": 3}
    assert series["sample"].startswith(f"{study_uid}/{series['series_uid']}/")  # one instance, for routing
    assert study.as_message()["spool_path"] == str(node.spool.root)
    time.sleep(1.0)
    assert len(done.studies) == 1, "a study must complete once"
    assert node.journal.get(study.study_key).state == j.COMPLETE


def test_no_completion_while_its_association_is_open(make_node, port):
    node, done = make_node(idle=0.3)
    study_uid = generate_uid()
    assoc = associate(port)
    assert assoc.send_c_store(ct_dataset(study_uid, index=0)).Status == 0
    time.sleep(1.5)  # five idle periods, but the sender has not released
    assert done.studies == []
    assert node.journal.studies()[0].state == j.RECEIVING
    assoc.release()
    assert done.wait(1, timeout=3)


def test_max_wait_forces_completion_with_the_association_open(make_node, port):
    node, done = make_node(idle=0.2, max_wait=1.0)
    assoc = associate(port)
    try:
        assert assoc.send_c_store(ct_dataset(generate_uid())).Status == 0
        assert done.wait(1, timeout=4)
        [row] = node.journal.history(done.studies[0].study_key)[-1:]
        assert row["to_state"] == j.COMPLETE and row["reason"] == "max-wait"
    finally:
        assoc.release()


def test_late_instance_reopens_and_completes_again(make_node, port):
    node, done = make_node(idle=0.3)
    study_uid = generate_uid()
    assoc = associate(port)
    assert assoc.send_c_store(ct_dataset(study_uid, index=0)).Status == 0
    assoc.release()
    assert done.wait(1, timeout=3)
    key = done.studies[0].study_key
    # A worker delivered a result...
    node.journal.transition(key, j.QUEUED)
    node.journal.transition(key, j.ANALYZED, outputs=["sr-run1.dcm"])
    node.journal.transition(key, j.DELIVERED)
    # ...then the modality sends one more image.
    assoc = associate(port)
    assert assoc.send_c_store(ct_dataset(study_uid, index=1)).Status == 0
    assoc.release()
    assert done.wait(2, timeout=3)
    second = done.studies[1]
    assert second.study_key == key and second.run == 2
    study = node.journal.get(key)
    assert study.state == j.COMPLETE and study.instance_count == 2
    assert study.predecessor_outputs == ["sr-run1.dcm"]
    states = [h["to_state"] for h in node.journal.history(key)]
    assert states == ["RECEIVING", "COMPLETE", "QUEUED", "ANALYZED", "DELIVERED",
                      "SUPERSEDED", "RECEIVING", "COMPLETE"]


def test_callback_failure_leaves_study_complete_and_restart_hands_it_on(tmp_path, port):
    calls = []

    def broken(study):
        calls.append(study)
        raise RuntimeError("broker down")

    cfg = ScpConfig(spool=str(tmp_path / "spool"))
    node = Node(cfg, bind="127.0.0.1", port=port, study_idle_timeout=0.2,
                ingest_processes=1, shutdown_grace=1.0, on_study_complete=broken)
    node.start()
    try:
        assoc = associate(port)
        assert assoc.send_c_store(ct_dataset(generate_uid())).Status == 0
        assoc.release()
        deadline = time.monotonic() + 3
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert calls
        assert node.journal.studies()[0].state == j.COMPLETE
    finally:
        node.stop()
    again = Collector()
    node = Node(cfg, bind="127.0.0.1", port=port, study_idle_timeout=0.2,
                ingest_processes=1, shutdown_grace=1.0, on_study_complete=again)
    node.start()
    try:
        assert again.wait(1, timeout=3), "a COMPLETE study must be handed on again after a restart"
        assert again.studies[0].study_key == calls[0].study_key
    finally:
        node.stop()
