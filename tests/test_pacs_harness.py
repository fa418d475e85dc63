"""The test harness itself: a real Orthanc as the PACS (tests/orthanc.py) and a
real redis-server (tests/redisproc.py)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.sop_class import CTImageStorage

from .conftest import free_port
from .orthanc import OrthancHTTPError, OrthancProcess
from .redisproc import RedisProcess, no_retry

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    o = OrthancProcess(tmp_path / "orthanc").start()
    yield o
    o.kill9()  # a graceful stop takes ~3.5 s and the storage is thrown away


class StorageSCP:
    """A pynetdicom storage SCP that records what it receives."""

    def __init__(self, ae_title: str = "NODE") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.received: list[str] = []
        self.callers: list[str] = []
        self.lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: evt.Event) -> int:
        with self.lock:
            self.received.append(event.request.AffectedSOPInstanceUID)
            self.callers.append(event.assoc.requestor.ae_title)
        return 0x0000

    def shutdown(self) -> None:
        self.server.shutdown()


def c_store(port: int, called: str, calling: str, path: Path) -> dict:
    """C-STORE one file with pynetdicom; what the association reported."""
    ds = dcmread(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    pdus: list = []
    assoc = ae.associate("127.0.0.1", port, ae_title=called,
                         evt_handlers=[(evt.EVT_PDU_RECV, lambda e: pdus.append(e.pdu))])
    out = {"established": assoc.is_established, "rejected": assoc.is_rejected, "aborted": assoc.is_aborted,
           "pdus": pdus, "status": None}
    if assoc.is_established:
        status = assoc.send_c_store(ds)
        out["status"] = status.Status if status else None
        deadline = time.monotonic() + 2
        while not status and not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.01)  # the DUL thread marks the abort a moment after the DIMSE gives up
        out["aborted"] = assoc.is_aborted
        assoc.release()
    return out


# -------------------------------------------------------------------- Orthanc


def test_orthanc_starts_and_answers_system(tmp_path: Path) -> None:
    o = OrthancProcess(tmp_path / "orthanc", aet="MYPACS")
    with o:
        system = o.system()
        assert system["Version"].startswith("1.")
        assert system["DicomAet"] == "MYPACS"
        assert system["DicomPort"] == o.dicom_port
        assert system["HttpPort"] == o.http_port
        assert o.base_url == f"http://127.0.0.1:{o.http_port}"
        assert o.statistics()["CountInstances"] == 0
        assert port_open(o.dicom_port)
        assert o.config["Plugins"] == [] and "Registering plugin" not in o.log_text()
    assert o.proc is None
    assert not port_open(o.http_port) and not port_open(o.dicom_port)
    assert "Orthanc has stopped" in o.log_text()


def test_orthanc_upload_lists_instance_under_its_study(orthanc: OrthancProcess) -> None:
    ds = dcmread(CT_SMALL)
    [instance_id] = orthanc.upload([CT_SMALL])
    study_id = orthanc.study_id_for_uid(ds.StudyInstanceUID)
    assert study_id is not None and orthanc.studies() == [study_id]
    assert orthanc.study_id_for_uid("1.2.3.4.5.6.7.8.9") is None
    [series] = orthanc.series_of(study_id)
    assert series["MainDicomTags"]["Modality"] == "CT"
    assert series["MainDicomTags"]["SeriesInstanceUID"] == ds.SeriesInstanceUID
    [instance] = orthanc.instances_of_series(series["ID"])
    assert instance["ID"] == instance_id
    assert instance["MainDicomTags"]["SOPInstanceUID"] == ds.SOPInstanceUID
    assert orthanc.instance_file(instance_id) == CT_SMALL.read_bytes()
    assert orthanc.wait_for_series(ds.StudyInstanceUID, "CT", timeout=5)[0]["ID"] == series["ID"]
    with pytest.raises(AssertionError):
        orthanc.wait_for_series(ds.StudyInstanceUID, "SEG", timeout=0.5)
    orthanc.delete_all()
    assert orthanc.studies() == [] and orthanc.statistics()["CountInstances"] == 0


def test_orthanc_upload_folder_recursively(orthanc: OrthancProcess, tmp_path: Path) -> None:
    folder = tmp_path / "in" / "deeper"
    folder.mkdir(parents=True)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    ids = orthanc.upload(tmp_path / "in")
    assert len(ids) == 2 and len(set(ids)) == 2
    assert orthanc.statistics()["CountInstances"] == 2
    with pytest.raises(OrthancHTTPError) as err:
        bad = tmp_path / "not-dicom.txt"
        bad.write_text("hello")
        orthanc.upload([bad])
    assert err.value.status == 400


def test_orthanc_sends_to_a_modality_by_c_store(orthanc: OrthancProcess) -> None:
    ds = dcmread(CT_SMALL)
    [instance_id] = orthanc.upload(CT_SMALL)
    scp = StorageSCP("NODE")
    try:
        orthanc.put_modality("node", "NODE", "127.0.0.1", scp.port)
        assert "node" in orthanc.modalities()
        assert orthanc.echo("node") is False  # the SCP supports storage only, no Verification
        answer = orthanc.send_to_modality("node", [instance_id])
        assert answer["InstancesCount"] == 1 and answer["FailedInstancesCount"] == 0
        assert answer["RemoteAet"] == "NODE" and answer["LocalAet"] == orthanc.aet
        assert scp.received == [ds.SOPInstanceUID]
        assert scp.callers == [orthanc.aet]
    finally:
        scp.shutdown()
    # the modality is gone: Orthanc answers HTTP 500 and the helper raises
    with pytest.raises(OrthancHTTPError) as err:
        orthanc.send_to_modality("node", [instance_id])
    assert err.value.status == 500
    assert "Connection refused" in err.value.json["Details"]


def test_orthanc_configured_modality_and_echo(tmp_path: Path) -> None:
    scp_ae = AE(ae_title="ECHOSCP")
    scp_ae.supported_contexts = StoragePresentationContexts
    scp_ae.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = scp_ae.start_server(("127.0.0.1", port), block=False)
    o = OrthancProcess(tmp_path / "orthanc", modalities={"scp": ("ECHOSCP", "127.0.0.1", port)}).start()
    try:
        assert o.config["DicomModalities"] == {"scp": ["ECHOSCP", "127.0.0.1", port]}
        assert o.modalities() == ["scp"]
        assert o.echo("scp") is True
        job = o.send_to_modality("scp", o.upload(CT_SMALL), synchronous=False)
        assert set(job) >= {"ID", "Path"}
    finally:
        o.kill9()
        server.shutdown()


def test_orthanc_rejects_unknown_caller_when_store_not_always_allowed(tmp_path: Path) -> None:
    o = OrthancProcess(tmp_path / "orthanc", always_allow_store=False,
                       modalities={"known": ("KNOWN", "127.0.0.1", free_port())}).start()
    try:
        out = c_store(o.dicom_port, o.aet, "STRANGER", CT_SMALL)
        assert out["rejected"] and not out["established"] and not out["aborted"]
        [rj] = out["pdus"]
        assert isinstance(rj, A_ASSOCIATE_RJ)
        assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 1, 3)  # permanent, service-user, calling AE
        assert o.statistics()["CountInstances"] == 0
        assert "Rejected association for remote AET STRANGER" in o.log_text()
        # a caller Orthanc knows is accepted
        out = c_store(o.dicom_port, o.aet, "KNOWN", CT_SMALL)
        assert out["established"] and out["status"] == 0x0000
        assert o.statistics()["CountInstances"] == 1
    finally:
        o.kill9()


def test_orthanc_aborts_store_of_unknown_caller_when_only_echo_is_allowed(tmp_path: Path) -> None:
    o = OrthancProcess(tmp_path / "orthanc", always_allow_store=False,
                       extra_config={"DicomAlwaysAllowEcho": True}).start()
    try:
        out = c_store(o.dicom_port, o.aet, "STRANGER", CT_SMALL)
        assert out["established"] and out["status"] is None and out["aborted"]
        abort = out["pdus"][-1]
        assert isinstance(abort, A_ABORT_RQ) and abort.source == 0  # DUL service-user
        assert o.statistics()["CountInstances"] == 0
        assert 'Rejected Store request from remote DICOM modality with AET "STRANGER"' in o.log_text()
    finally:
        o.kill9()


def test_orthanc_accepts_any_caller_when_store_always_allowed(orthanc: OrthancProcess) -> None:
    ds = dcmread(CT_SMALL)
    out = c_store(orthanc.dicom_port, "WHATEVER", "STRANGER", CT_SMALL)  # called AET not checked either
    assert out["established"] and not out["rejected"]
    assert out["status"] == 0x0000
    [series] = orthanc.wait_for_series(ds.StudyInstanceUID, "CT", timeout=10)
    [instance] = orthanc.instances_of_series(series["ID"])
    assert instance["MainDicomTags"]["SOPInstanceUID"] == ds.SOPInstanceUID


def test_orthanc_kill9_and_start_failure(tmp_path: Path) -> None:
    o = OrthancProcess(tmp_path / "orthanc").start()
    pid = o.proc.pid
    o.kill9()
    assert o.proc is None and not port_open(o.http_port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # a second Orthanc on the same DICOM port cannot start, and says why
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", o.dicom_port))
    blocker.listen()
    try:
        with pytest.raises(RuntimeError, match="Orthanc exited"):
            OrthancProcess(tmp_path / "again", extra_config={"DicomPort": o.dicom_port}).start(timeout=10)
    finally:
        blocker.close()


# ---------------------------------------------------------------------- redis


def test_redis_ping_set_restart_keeps_data(tmp_path: Path) -> None:
    r = RedisProcess(tmp_path / "redis")
    assert r.url == f"redis://127.0.0.1:{r.port}/0"
    with r:
        c = r.client()
        assert c.ping() is True
        c.set("k", "v")
        port = r.port
        r.restart()
        assert r.port == port
        c = r.client()
        assert c.get("k") == b"v"
        c.close()
    assert (tmp_path / "redis" / "appendonlydir").is_dir()
    assert "Ready to accept connections" in r.log_text()


def test_redis_without_appendonly_loses_data_on_restart(tmp_path: Path) -> None:
    with RedisProcess(tmp_path / "redis", appendonly=False) as r:
        c = r.client()
        c.set("k", "v")
        c.close()
        r.restart()
        c = r.client()
        assert c.get("k") is None
        c.close()


def test_redis_password_required(tmp_path: Path) -> None:
    with RedisProcess(tmp_path / "redis", password="s3cret") as r:
        assert r.url == f"redis://:s3cret@127.0.0.1:{r.port}/0"
        anonymous = redis.Redis(host="127.0.0.1", port=r.port, retry=no_retry())
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            anonymous.set("k", "v")
        anonymous.close()
        wrong = redis.Redis(host="127.0.0.1", port=r.port, password="nope", retry=no_retry())
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            wrong.ping()
        wrong.close()
        good = redis.Redis.from_url(r.url)
        assert good.ping() is True
        good.set("k", "v")
        assert good.get("k") == b"v"
        good.close()


def test_redis_stop_closes_port_and_kill9(tmp_path: Path) -> None:
    r = RedisProcess(tmp_path / "redis").start()
    assert port_open(r.port)
    assert r.stop() == 0
    assert not port_open(r.port)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(r.url, socket_connect_timeout=0.5, retry=no_retry()).ping()
    r.start()
    assert r.client().ping()
    r.kill9()
    assert r.proc is None and not port_open(r.port)
