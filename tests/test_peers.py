"""Who may associate: the [[peers]] table, the called AE title, and the
association limit, each tested with real associations."""

from __future__ import annotations

import subprocess

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.sender import guard_responses

from dicom_node import statuses

from .factory import ct_dataset
from .nodeproc import NodeProcess


@pytest.fixture
def node(tmp_path):
    n = NodeProcess(
        tmp_path,
        accept_unknown_callers=False,
        max_associations=2,
        peers=[
            {"ae_title": "CT_SCANNER", "host": "127.0.0.1", "port": 104},
            {"ae_title": "FAR_PACS", "host": "127.0.0.2", "port": 104},
        ],
    )
    yield n
    n.stop()


def try_associate(port: int, calling: str, called: str = "PACS_AI", bind: str = ""):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    kwargs = {"bind_address": (bind, 0)} if bind else {}
    assoc = ae.associate("127.0.0.1", port, ae_title=called, **kwargs)
    if assoc.is_established:
        guard_responses(assoc)  # pynetdicom's lost-response race: see dicom_node/sender.py
    return assoc


def reject_reason(assoc) -> tuple[int, int, int]:
    assert assoc.is_rejected, "the association should have been rejected"
    rsp = assoc.acceptor.primitive
    return rsp.result, rsp.result_source, rsp.diagnostic


def test_known_peer_from_its_address_is_accepted(node):
    node.start()
    assoc = try_associate(node.port, "CT_SCANNER")
    assert assoc.is_established
    assert assoc.send_c_store(ct_dataset(generate_uid())).Status == statuses.SUCCESS
    assoc.release()
    far = try_associate(node.port, "FAR_PACS", bind="127.0.0.2")
    assert far.is_established
    far.release()


def test_unknown_calling_title_is_rejected_permanent_service_user(node):
    node.start()
    assoc = try_associate(node.port, "INTRUDER")
    assert reject_reason(assoc) == (
        statuses.REJECT_RESULT_PERMANENT,
        statuses.REJECT_SOURCE_SERVICE_USER,
        statuses.REJECT_REASON_CALLING_AE_NOT_RECOGNIZED,
    )
    text = node.log_text()
    assert "association rejected calling_ae=INTRUDER" in text
    assert "reason=calling-AE-title-not-recognized" in text
    import sqlite3

    with sqlite3.connect(node.spool / "journal.sqlite") as db:  # counted by /metrics by reason
        rows = db.execute("SELECT calling_ae, outcome, closed_at IS NOT NULL FROM associations "
                          "WHERE calling_ae = 'INTRUDER'").fetchall()  # (PROBE is the start-up check's)
    assert rows == [("INTRUDER", "rejected: calling-AE-title-not-recognized", 1)]


def test_known_title_from_the_wrong_address_is_rejected(node):
    node.start()
    assoc = try_associate(node.port, "FAR_PACS")  # from 127.0.0.1, configured 127.0.0.2
    assert reject_reason(assoc) == (0x01, 0x01, statuses.REJECT_REASON_CALLING_AE_NOT_RECOGNIZED)
    assert "wrong address" in node.log_text()
    assoc = try_associate(node.port, "CT_SCANNER", bind="127.0.0.3")
    assert reject_reason(assoc)[2] == statuses.REJECT_REASON_CALLING_AE_NOT_RECOGNIZED


def test_wrong_called_title_is_rejected(node):
    node.start()
    assoc = try_associate(node.port, "CT_SCANNER", called="SOMEONE_ELSE")
    assert reject_reason(assoc) == (0x01, 0x01, statuses.REJECT_REASON_CALLED_AE_NOT_RECOGNIZED)


@pytest.mark.dcmtk
def test_dcmtk_sees_the_reject_reason(node, dcmtk_env):
    node.start()
    out = subprocess.run(
        ["echoscu", "-aet", "INTRUDER", "-aec", "PACS_AI", "127.0.0.1", str(node.port)],
        env=dcmtk_env, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode != 0
    assert "Calling AE Title Not Recognized" in out.stdout + out.stderr
    ok = subprocess.run(
        ["echoscu", "-aet", "CT_SCANNER", "-aec", "PACS_AI", "127.0.0.1", str(node.port)],
        env=dcmtk_env, capture_output=True, text=True, timeout=30,
    )
    assert ok.returncode == 0, ok.stderr


def test_more_associations_than_allowed_are_rejected_transient(node):
    node.start()
    held = [try_associate(node.port, "CT_SCANNER") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        extra = try_associate(node.port, "CT_SCANNER")
        assert reject_reason(extra) == (
            statuses.REJECT_RESULT_TRANSIENT,
            statuses.REJECT_SOURCE_SERVICE_PROVIDER_PRESENTATION,
            statuses.REJECT_REASON_LOCAL_LIMIT_EXCEEDED,
        )
    finally:
        for a in held:
            a.release()
    again = try_associate(node.port, "CT_SCANNER")
    assert again.is_established, "capacity must come back when associations close"
    again.release()
