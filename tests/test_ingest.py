"""C-STORE ingest against a real ``pacs-ai node`` process: DCMTK and
pynetdicom as senders, byte-exact storage, duplicates, bad instances,
negotiation, and no patient data in the logs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MPEG2MPML,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node import statuses
from dicom_node.sender import guard_responses

from .factory import (
    SENTINEL_BIRTH_DATE,
    SENTINEL_ID,
    SENTINEL_NAME,
    ct_dataset,
    dataset_bytes,
    write_series,
)
from .nodeproc import NodeProcess


@pytest.fixture
def node(tmp_path: Path):
    n = NodeProcess(tmp_path).start()
    yield n
    n.stop()


def associate(node: NodeProcess, contexts=((CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),), calling="TESTSCU"):
    ae = AE(ae_title=calling)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACS_AI")
    assert assoc.is_established
    guard_responses(assoc)  # pynetdicom's lost-response race: see dicom_node/sender.py
    return assoc


def assert_no_patient_data(node: NodeProcess) -> None:
    text = node.log_text()
    assert text, "the node wrote no log at all"
    for secret in (SENTINEL_NAME, SENTINEL_ID, SENTINEL_BIRTH_DATE, "SENTINEL"):
        assert secret not in text, f"patient data {secret!r} found in the node's logs"


@pytest.mark.dcmtk
def test_storescu_study_is_stored_byte_exact_and_completes(node, tmp_path, dcmtk_env):
    study_uid, files = write_series(tmp_path / "in", 30)
    out = subprocess.run(
        ["storescu", "-aec", "PACS_AI", "-aet", "MODALITY1", "127.0.0.1", str(node.port), *map(str, files)],
        env=dcmtk_env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    stored = node.stored_files()
    assert len(stored) == 30
    by_sop = {p.stem: p for p in stored}
    for f in files:
        sop = dcmread(f, stop_before_pixels=True).SOPInstanceUID
        target = by_sop[sop]
        assert target.parent.parent.name == study_uid
        assert dataset_bytes(target) == dataset_bytes(f), "stored data set differs from what was sent"
        assert (target.stat().st_mode & 0o777) == 0o600
    [study] = node.wait_for_state("QUEUED")
    assert study["instance_count"] == 30
    assert study["calling_ae"] == "MODALITY1"
    assert study["modalities"] == ["CT"]
    detail = node.status(study["study_key"])
    assert [h["to_state"] for h in detail["history"]] == ["RECEIVING", "COMPLETE", "QUEUED"]  # no worker: it waits
    assert not list((node.spool / "tmp").iterdir()), "temp files left in the spool"
    text = node.wait_for_log("association closed calling_ae=MODALITY1")
    assert "instances=30" in text
    assert_no_patient_data(node)


def test_pynetdicom_sender_and_echo(node):
    study_uid = generate_uid()
    assoc = associate(node, contexts=((CTImageStorage, [ImplicitVRLittleEndian]), (Verification, [ImplicitVRLittleEndian])))
    try:
        assert assoc.send_c_echo().Status == statuses.SUCCESS
        for i in range(5):
            rsp = assoc.send_c_store(ct_dataset(study_uid, index=i))
            assert rsp.Status == statuses.SUCCESS
    finally:
        assoc.release()
    assert len(node.stored_files()) == 5
    stored = dcmread(node.stored_files()[0])
    assert stored.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert stored.StudyInstanceUID == study_uid


@pytest.mark.dcmtk
def test_concurrent_associations(node, tmp_path, dcmtk_env):
    procs, studies = [], []
    for k in range(4):
        study_uid, files = write_series(tmp_path / f"in{k}", 25)
        studies.append(study_uid)
        procs.append(subprocess.Popen(
            ["storescu", "-aec", "PACS_AI", "127.0.0.1", str(node.port), *map(str, files)],
            env=dcmtk_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read()
    assert len(node.stored_files()) == 100
    complete = node.wait_for_state("QUEUED", count=4)
    assert sorted(s["instance_count"] for s in complete) == [25] * 4
    assert sorted(s["study_uid"] for s in complete) == sorted(studies)


def test_duplicate_instances_stored_once(node):
    study_uid, sop = generate_uid(), generate_uid()
    first = ct_dataset(study_uid, sop_uid=sop, fill=1)
    assoc = associate(node)
    try:
        assert assoc.send_c_store(first).Status == statuses.SUCCESS
        assert assoc.send_c_store(first).Status == statuses.SUCCESS  # same content
        other = ct_dataset(study_uid, sop_uid=sop, fill=2)  # same UID, other pixels
        assert assoc.send_c_store(other).Status == statuses.SUCCESS
        elsewhere = ct_dataset(generate_uid(), sop_uid=sop, fill=1)  # same UID, another study
        assert assoc.send_c_store(elsewhere).Status == statuses.SUCCESS
    finally:
        assoc.release()
    [stored] = node.stored_files()
    assert dcmread(stored).pixel_array[0, 0] == 1, "the first copy must be kept"
    assert dcmread(stored).StudyInstanceUID == study_uid
    studies = node.status()
    [study] = [s for s in studies if s["study_uid"] == study_uid]
    assert study["instance_count"] == 1
    assert study["duplicates"] == 3
    assert study["duplicate_conflicts"] == 2
    assert "received again with different content" in node.log_text()


def send_encoded(assoc, sop_class: str, affected_uid: str, payload: bytes, msg_id: int = 77):
    """C-STORE ``payload`` (an encoded data set, possibly broken) under the
    given Affected SOP Instance UID, as a broken or hostile sender would;
    pynetdicom's send_c_store refuses to send such data."""
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class)
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = affected_uid
    req.Priority = 2
    req.DataSet = BytesIO(payload)
    # Pause the requestor's reactor so it cannot take the response off the
    # queue; wait twice, as it flags itself paused just before it blocks.
    assoc._reactor_checkpoint.clear()
    for _ in range(2):
        while not assoc._is_paused:
            time.sleep(0.001)
        time.sleep(0.005)
    try:
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert rsp is not None, "no C-STORE response within the DIMSE timeout"
    return rsp


def encoded(ds, transfer_syntax=ExplicitVRLittleEndian) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    return fp.getvalue()


def test_bad_instances_get_failure_status_and_association_survives(node, tmp_path):
    study_uid = generate_uid()
    good = ct_dataset(study_uid, index=0)
    evil = ct_dataset(study_uid, index=1)
    evil.StudyInstanceUID = "../../../../tmp/evil"
    evil.SeriesInstanceUID = "1.2/../../x"
    mismatch = ct_dataset(study_uid, index=2)
    wrong_class = ct_dataset(study_uid, index=3)
    # Valid start, then an element claiming 0xFFFF bytes of UI and garbage.
    garbage_uid = generate_uid()
    garbage = encoded(ct_dataset(study_uid, index=4, sop_uid=garbage_uid))[:40] + b"\x08\x00\x18\x00UI\xff\xff" + b"\xde\xad" * 28

    assoc = associate(node, contexts=((CTImageStorage, [ExplicitVRLittleEndian]),))
    try:
        rsp = send_encoded(assoc, CTImageStorage, evil.SOPInstanceUID, encoded(evil))
        assert rsp.Status == statuses.CANNOT_UNDERSTAND_INVALID_UID
        assert "Study Instance UID" in rsp.ErrorComment
        assert len(rsp.ErrorComment) <= 64

        rsp = send_encoded(assoc, CTImageStorage, garbage_uid, garbage)
        assert rsp.Status == statuses.CANNOT_UNDERSTAND_UNDECODABLE, hex(rsp.Status)
        assert "undecodable" in rsp.ErrorComment

        rsp = send_encoded(assoc, CTImageStorage, generate_uid(), encoded(mismatch))
        assert rsp.Status == statuses.CANNOT_UNDERSTAND_UID_MISMATCH
        assert "Affected SOP Instance UID" in rsp.ErrorComment

        wrong_class.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # says Secondary Capture
        rsp = send_encoded(assoc, CTImageStorage, wrong_class.SOPInstanceUID, encoded(wrong_class))
        assert rsp.Status == statuses.DATA_SET_DOES_NOT_MATCH_SOP_CLASS

        rsp = assoc.send_c_store(good)
        assert rsp.Status == statuses.SUCCESS, "the association must survive bad instances"
    finally:
        assoc.release()
    assert [p.stem for p in node.stored_files()] == [good.SOPInstanceUID]
    assert not Path("/tmp/evil").exists()
    assert not list((node.spool / "tmp").iterdir())
    assert "failures=4" in node.wait_for_log("association closed")
    assert_no_patient_data(node)


def test_compressed_and_private_classes_are_stored_as_received(node):
    jpeg = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert jpeg.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    private_class = "1.3.6.1.4.1.9590.100.1.2.999"
    private = ct_dataset(generate_uid(), sop_class=private_class)
    deflated = ct_dataset(generate_uid(), sop_class=SecondaryCaptureImageStorage,
                          transfer_syntax=DeflatedExplicitVRLittleEndian)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(jpeg.SOPClassUID, [JPEGBaseline8Bit])
    ae.add_requested_context(SecondaryCaptureImageStorage, [DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(private_class, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [MPEG2MPML])  # nothing here reads MPEG-2
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACS_AI")
    assert assoc.is_established
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        assert (jpeg.SOPClassUID, JPEGBaseline8Bit) in accepted
        assert (private_class, ExplicitVRLittleEndian) in accepted
        rejected = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == CTImageStorage]
        assert rejected and rejected[0].result == 0x04, "MPEG-2 must be refused: transfer syntax not supported"
        assert assoc.send_c_store(jpeg).Status == statuses.SUCCESS
        assert assoc.send_c_store(private).Status == statuses.SUCCESS
        assert assoc.send_c_store(deflated).Status == statuses.SUCCESS
    finally:
        assoc.release()
    stored = {p.stem: p for p in node.stored_files()}
    jpeg_copy = stored[jpeg.SOPInstanceUID]
    assert dcmread(jpeg_copy).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert dataset_bytes(jpeg_copy) == dataset_bytes(Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))
    assert private.SOPInstanceUID in stored
    deflated_copy = dcmread(stored[deflated.SOPInstanceUID])
    assert deflated_copy.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert deflated_copy.StudyInstanceUID == deflated.StudyInstanceUID


def test_write_error_answers_out_of_resources(tmp_path):
    """A real kernel write error (EFBIG from RLIMIT_FSIZE) while an instance
    arrives: 0xA700 with a comment, nothing half-written, association lives."""
    import resource
    import signal

    n = NodeProcess(tmp_path)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    n.preexec_fn = limit_file_size
    n.start()
    try:
        study_uid = generate_uid()
        assoc = associate(n)
        try:
            big = ct_dataset(study_uid, index=0, size=1100)  # 2.4 MB > the limit
            rsp = assoc.send_c_store(big)
            assert rsp.Status == statuses.OUT_OF_RESOURCES
            assert "File too large" in rsp.ErrorComment
            small = ct_dataset(study_uid, index=1)
            assert assoc.send_c_store(small).Status == statuses.SUCCESS
        finally:
            assoc.release()
        assert [p.stem for p in n.stored_files()] == [small.SOPInstanceUID]
        assert not list((n.spool / "tmp").iterdir())
    finally:
        n.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 6 MiB tmpfs: a file system that really fills up (needs root, as CI is)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); test_write_error_answers_out_of_resources covers write errors")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_answers_out_of_resources_and_recovers(small_tmpfs, tmp_path):
    n = NodeProcess(tmp_path / "w" if (tmp_path / "w").mkdir() is None else tmp_path, spool=str(small_tmpfs / "spool"),
                    min_free_mb=0)  # no high-water mark: this test is about a disk that fills mid-study
    n.spool = small_tmpfs / "spool"
    n.start()
    try:
        filler = small_tmpfs / "filler"
        study_uid = generate_uid()
        assoc = associate(n)
        try:
            first = ct_dataset(study_uid, index=0, size=1024)  # 2 MiB
            assert assoc.send_c_store(first).Status == statuses.SUCCESS
            free = shutil.disk_usage(small_tmpfs).free
            filler.write_bytes(b"\0" * max(0, free - 1_000_000))  # leave ~1 MB
            second = ct_dataset(study_uid, index=1, size=1024)
            rsp = assoc.send_c_store(second)
            assert rsp.Status == statuses.OUT_OF_RESOURCES
            assert "No space left" in rsp.ErrorComment
            assert not list((n.spool / "tmp").iterdir()), "a half-written file was left behind"
            filler.unlink()  # space comes back
            assert assoc.send_c_store(second).Status == statuses.SUCCESS
        finally:
            assoc.release()
        assert sorted(p.stem for p in n.stored_files()) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    finally:
        n.stop()


def test_below_the_disk_high_water_mark_associations_are_refused_until_space_returns(small_tmpfs, tmp_path):
    """node.min_free_mb: with less free space than that the node refuses new associations
    (A-ASSOCIATE-RJ, rejected-transient, local-limit-exceeded: the sender retries later)
    rather than failing in the middle of a study, and accepts again once space is back."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    n = NodeProcess(workdir, spool=str(small_tmpfs / "spool"), min_free_mb=3)
    n.spool = small_tmpfs / "spool"
    n.start()
    try:
        filler = small_tmpfs / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - 2 * 1024 * 1024))  # 2 MiB left
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", n.port, ae_title="PACS_AI")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)  # transient, provider (presentation), local limit
        assert "spool low on disk space" in n.log_text()
        filler.unlink()
        assoc = associate(n)
        try:
            assert assoc.send_c_store(ct_dataset(generate_uid())).Status == statuses.SUCCESS
        finally:
            assoc.release()
    finally:
        n.stop()


def test_caps_on_instance_size_and_instances_per_study(tmp_path):
    n = NodeProcess(tmp_path, max_instance_mb=1, max_instances_per_study=2)
    n.start()
    try:
        study = generate_uid()
        assoc = associate(n)
        try:
            big = assoc.send_c_store(ct_dataset(study, index=0, size=1024))  # 2 MiB
            assert big.Status == statuses.OUT_OF_RESOURCES and "node.max_instance_mb" in big.ErrorComment
            for i in (1, 2):
                assert assoc.send_c_store(ct_dataset(study, index=i)).Status == statuses.SUCCESS
            third = assoc.send_c_store(ct_dataset(study, index=3))
            assert third.Status == statuses.OUT_OF_RESOURCES and "max_instances_per_study" in third.ErrorComment
            assert assoc.send_c_store(ct_dataset(generate_uid())).Status == statuses.SUCCESS  # another study is fine
        finally:
            assoc.release()
        assert len(n.stored_files()) == 3
        assert not list((n.spool / "tmp").iterdir())
    finally:
        n.stop()


def test_abort_mid_data_set_leaves_no_partial_file_and_no_open_descriptor(node):
    """A sender that aborts halfway through a large instance: nothing in the
    spool, no file descriptor kept open, and the node serves the next one."""

    from pynetdicom.dimse_primitives import C_STORE

    def open_fds(pid: int) -> int:
        """Sockets and spool files the node holds: what an association opens. (Not every
        descriptor: the node's HTTP server and dispatcher open and close files of their own
        at their own pace, e.g. the journal for /metrics.)"""
        count = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            count += target.startswith("socket:") or target.startswith(str(node.spool / "tmp"))
        return count

    study_uid = generate_uid()
    assoc = associate(node, contexts=((CTImageStorage, [ExplicitVRLittleEndian]),))
    big = ct_dataset(study_uid, index=0, size=1024)
    payload = encoded(big)
    before = open_fds(node.proc.pid)
    cx = assoc.accepted_contexts[0]
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = big.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(payload)
    # Send the command and only part of the data set, then abort.
    sent = 0
    for primitive in req_fragments(req, cx.context_id, assoc.acceptor.maximum_length):
        assoc.dul.send_pdu(primitive)
        sent += 1
        if sent == 6:
            break
    time.sleep(0.5)
    tmp_files = list((node.spool / "tmp").iterdir())
    assert tmp_files, "the partial data set should be arriving in spool/tmp"
    assoc.abort()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and list((node.spool / "tmp").iterdir()):
        time.sleep(0.05)
    assert not list((node.spool / "tmp").iterdir()), "partial file left behind"
    assert node.stored_files() == []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and open_fds(node.proc.pid) > before:
        time.sleep(0.1)
    assert open_fds(node.proc.pid) <= before, "a file descriptor leaked"
    again = associate(node)
    assert again.send_c_store(ct_dataset(study_uid, index=1)).Status == statuses.SUCCESS
    again.release()


def req_fragments(req, context_id: int, max_pdu: int):
    """The P-DATA primitives pynetdicom would send for ``req``."""
    from pynetdicom.dimse_messages import C_STORE_RQ

    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    yield from msg.encode_msg(context_id, max_pdu)
