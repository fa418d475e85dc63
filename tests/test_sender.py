"""The DICOM sender (dicom_node.sender, `pacs-ai echo` / `pacs-ai send`) on
real associations over localhost: DCMTK storescp and in-test pynetdicom SCPs
as peers, including peers that fail, reject, or never answer."""

from __future__ import annotations

import argparse
import io
import logging
import queue
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicom_node.errors import PacsRejected, PacsUnavailable, describe_reject
from dicom_node.sender import (
    MAX_ATTEMPTS,
    Destination,
    ProgressBar,
    echo,
    format_summary,
    parse_destination,
    send_paths,
)
from study_queue import send_cmd
from study_queue.errors import UsageError

from .factory import SENTINEL_ID, SENTINEL_NAME, ct_dataset

# --------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _restricted_storage(monkeypatch):
    """The node's SCP switches pynetdicom, process-wide, to accept any
    storage SOP Class; the in-test SCPs here negotiate by their own lists."""
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)



def write_ct_series(folder: Path, n: int, transfer_syntax=ExplicitVRLittleEndian) -> dict[str, Path]:
    """n small CT images (64x64) of one series; returns {SOP Instance UID: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files = {}
    for i in range(n):
        ds = ct_dataset(study, series, index=i, transfer_syntax=transfer_syntax)
        path = folder / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[ds.SOPInstanceUID] = path
    return files


def write_instance(path: Path, sop_class: str, transfer_syntax=ExplicitVRLittleEndian) -> str:
    """A minimal instance of any SOP class (no pixel data): enough to store."""
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uid


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


@contextmanager
def storescp(port: int, out: Path, env: dict[str, str]):
    """DCMTK storescp writing what it receives into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["storescp", "--output-directory", str(out), "--aetitle", "STORESCP", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def pynetdicom_scp(port: int, on_store=None, contexts=None, **ae_settings):
    """An in-process pynetdicom Storage + Verification SCP.

    ``on_store(event) -> int | Dataset`` answers each C-STORE (default
    Success); ``ae_settings`` are set on the AE (e.g. require_calling_aet).
    """
    ae = AE(ae_title="PYSCP")
    ae.supported_contexts = contexts if contexts is not None else AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    for name, value in ae_settings.items():
        setattr(ae, name, value)
    handlers = [(evt.EVT_C_STORE, on_store or (lambda event: 0x0000))]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        yield server
    finally:
        server.shutdown()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacs-ai")
    send_cmd.register(p.add_subparsers(dest="command", required=True))
    return p


# --------------------------------------------------------------------------
# destinations


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ORTHANC@127.0.0.1:4242", Destination("ORTHANC", "127.0.0.1", 4242)),
        ("PACS@pacs.example.org:104", Destination("PACS", "pacs.example.org", 104)),
        ("AE@[::1]:104", Destination("AE", "::1", 104)),
        ("A B-C_1@host:65535", Destination("A B-C_1", "host", 65535)),
        ("ME@ME@host:1", Destination("ME@ME", "host", 1)),
    ],
)
def test_parse_destination(text, expected):
    assert parse_destination(text) == expected
    assert parse_destination(str(expected)) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("127.0.0.1:4242", "AE@HOST:PORT"),
        ("@127.0.0.1:4242", "1-16"),
        ("SEVENTEEN_CHARS_X@h:1", "1-16"),
        ("BACK\\SLASH@h:1", "backslash"),
        ("TAB\tAE@h:1", "control"),
        ("AE@host", "port is missing"),
        ("AE@host:0", "1 to 65535"),
        ("AE@host:65536", "1 to 65535"),
        ("AE@host:http", "1 to 65535"),
        ("AE@:104", "host"),
        ("AE@::1:104", "brackets"),
        ("AE@[::1]104", "[ADDRESS]:PORT"),
    ],
)
def test_parse_destination_rejects_with_the_rule(text, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")) as info:
        parse_destination(text)
    assert "\n" not in str(info.value)


def test_reject_reasons_in_the_standard_words():
    assert describe_reject(1, 1, 3) == "rejected-permanent, service-user, calling-AE-title-not-recognized"
    assert describe_reject(2, 3, 1) == (
        "rejected-transient, service-provider (presentation related function), temporary-congestion"
    )


# --------------------------------------------------------------------------
# C-ECHO


@pytest.mark.dcmtk
def test_echo_storescp(port, dcmtk_env, tmp_path):
    with storescp(port, tmp_path / "out", dcmtk_env):
        seconds = echo(Destination("STORESCP", "127.0.0.1", port), timeout=5)
    assert 0 < seconds < 1


def test_echo_pynetdicom_scp_and_cli(port, capsys):
    with pynetdicom_scp(port):
        assert 0 < echo(parse_destination(f"PYSCP@127.0.0.1:{port}")) < 1
        args = parser().parse_args(["echo", f"PYSCP@127.0.0.1:{port}", "--timeout", "5"])
        assert args.func(args) == 0
    assert "answered C-ECHO" in capsys.readouterr().out


def test_nothing_listening_is_unavailable_fast(port, tmp_path, capsys):
    files = write_ct_series(tmp_path / "in", 2)
    dest = Destination("NOBODY", "127.0.0.1", port)
    start = time.monotonic()
    with pytest.raises(PacsUnavailable, match="cannot connect"):
        echo(dest, timeout=5)
    with pytest.raises(PacsUnavailable, match="cannot connect"):
        send_paths(files.values(), dest, timeout=5)
    args = parser().parse_args(["send", str(tmp_path / "in"), "--to", str(dest), "--timeout", "5"])
    assert args.func(args) == 1
    assert time.monotonic() - start < 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pacs-ai: error: cannot connect to NOBODY@127.0.0.1")


def test_rejected_association(port, tmp_path, capsys):
    files = write_ct_series(tmp_path / "in", 3)
    dest = Destination("PYSCP", "127.0.0.1", port)
    with pynetdicom_scp(port, require_calling_aet=["SOMEONE_ELSE"]):
        with pytest.raises(PacsRejected) as info:
            send_paths(files.values(), dest, timeout=5)
        assert "rejected-permanent, service-user, calling-AE-title-not-recognized" in str(info.value)
        assert (info.value.result, info.value.source, info.value.reason) == (1, 1, 3)
        with pytest.raises(PacsRejected):
            echo(dest, timeout=5)
        args = parser().parse_args(["send", str(tmp_path / "in"), "--to", str(dest), "--timeout", "5"])
        assert args.func(args) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "calling-AE-title-not-recognized" in err
    assert "Traceback" not in out + err


def test_no_presentation_context_accepted_is_rejected(port, tmp_path):
    files = write_ct_series(tmp_path / "in", 2)
    with pynetdicom_scp(port, contexts=[build_context(Verification)]):
        with pytest.raises(PacsRejected, match="none of the 2 proposed presentation contexts"):
            send_paths(files.values(), Destination("PYSCP", "127.0.0.1", port), timeout=5)


def test_usage_errors_exit_2_via_usage_error(tmp_path):
    args = parser().parse_args(["send", str(tmp_path), "--to", "no-at-sign:104"])
    with pytest.raises(UsageError, match="AE@HOST:PORT"):
        send_cmd.cmd_send(args)
    args = parser().parse_args(["send", str(tmp_path / "missing"), "--to", "A@h:104"])
    with pytest.raises(UsageError, match="no such file"):
        send_cmd.cmd_send(args)
    args = parser().parse_args(["echo", "A@h:104", "--calling-ae", "X" * 17])
    with pytest.raises(UsageError, match="--calling-ae"):
        send_cmd.cmd_echo(args)


# --------------------------------------------------------------------------
# C-STORE


@pytest.mark.dcmtk
def test_send_folder_to_storescp(port, dcmtk_env, tmp_path, capsys):
    files = write_ct_series(tmp_path / "in" / "series", 50)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    calls = []
    with storescp(port, out, dcmtk_env):
        report = send_paths([tmp_path / "in"], Destination("STORESCP", "127.0.0.1", port),
                            progress=lambda done, total: calls.append((done, total)))
    assert report.counts == {"success": 50, "warning": 0, "failure": 0}
    assert report.ok and report.sent == 50 and report.associations == 1 and report.resends == 0
    assert all(status == 0 for status in report.statuses.values())
    assert [s.path.name for s in report.skipped] == ["notes.txt"]
    assert calls[0] == (0, 50) and calls[-1] == (50, 50) and len(calls) == 51
    received = {str(dcmread(p).SOPInstanceUID) for p in out.iterdir()}
    assert received == set(files)
    assert {o.sop_instance_uid for o in report.outcomes} == set(files)
    summary = format_summary(report)
    assert "50 sent to STORESCP@127.0.0.1" in summary and "instances/s" in summary and "1 skipped" in summary
    assert SENTINEL_NAME not in summary and SENTINEL_ID not in summary


def test_send_sends_the_file_bytes_unchanged(port, tmp_path):
    files = write_ct_series(tmp_path / "in", 10)
    received: dict[str, bytes] = {}

    def on_store(event):
        received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=False)
        return 0x0000

    with pynetdicom_scp(port, on_store):
        report = send_paths([tmp_path / "in"], Destination("PYSCP", "127.0.0.1", port))
    assert report.ok and set(received) == set(files)
    for uid, path in files.items():
        assert path.read_bytes().endswith(received[uid])


def test_send_converts_or_fails_by_what_the_peer_accepts(port, tmp_path):
    """Implicit VR files go re-encoded to a peer that only takes Explicit VR;
    a JPEG file it cannot take fails with the reason, and the rest go on."""
    implicit = write_ct_series(tmp_path / "in" / "implicit", 3, ImplicitVRLittleEndian)
    jpeg_uid = write_instance(tmp_path / "in" / "jpeg.dcm", CTImageStorage, JPEGBaseline8Bit)
    received = {}

    def on_store(event):
        received[str(event.request.AffectedSOPInstanceUID)] = event.context.transfer_syntax
        return 0x0000

    with pynetdicom_scp(port, on_store, contexts=[build_context(CTImageStorage, ExplicitVRLittleEndian)]):
        report = send_paths([tmp_path / "in"], Destination("PYSCP", "127.0.0.1", port), timeout=5)
    assert set(received) == set(implicit)
    assert set(received.values()) == {ExplicitVRLittleEndian}
    assert report.counts == {"success": 3, "warning": 0, "failure": 1}
    (failed,) = [o for o in report.outcomes if not o.sent]
    assert failed.path.name == "jpeg.dcm" and failed.status is None and failed.attempts == 0
    assert "no presentation context" in failed.reason and jpeg_uid not in received


def test_failure_status_with_error_comment(port, tmp_path, capsys):
    files = write_ct_series(tmp_path / "in", 20)
    bad = sorted(files)[7]

    def on_store(event):
        if event.request.AffectedSOPInstanceUID == bad:
            status = Dataset()
            status.Status = 0xA700
            status.ErrorComment = "disk full (test)"
            return status
        return 0x0000

    dest = f"PYSCP@127.0.0.1:{port}"
    with pynetdicom_scp(port, on_store):
        report = send_paths([tmp_path / "in"], parse_destination(dest))
        args = parser().parse_args(["send", str(tmp_path / "in"), "--to", dest])
        assert args.func(args) == 1
    assert report.counts == {"success": 19, "warning": 0, "failure": 1}
    assert report.statuses[files[bad]] == 0xA700
    assert report.error_comments == ["disk full (test)"]
    assert report.resends == 0  # a status is an answer: never resent
    out, err = capsys.readouterr()
    assert "0xA700 Refused: Out of Resources" in out and "disk full (test)" in out
    assert err.strip() == f"pacs-ai: error: 1 of 20 instances were not stored by {dest}"


def test_more_than_128_sop_classes_use_several_associations(port, tmp_path):
    classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][:130]
    uids = {write_instance(tmp_path / "in" / f"{i:03d}.dcm", sop) for i, sop in enumerate(classes)}
    received = []
    with pynetdicom_scp(port, lambda event: received.append(str(event.request.AffectedSOPInstanceUID)) or 0):
        report = send_paths([tmp_path / "in"], Destination("PYSCP", "127.0.0.1", port))
    assert report.ok and report.sent == 130 and report.associations == 3  # 2 contexts each, 64 a time
    assert set(received) == uids


# --------------------------------------------------------------------------
# Lost C-STORE responses


@contextmanager
def scp_that_never_answers(port, swallow: str, times: int):
    """A pynetdicom SCP whose C-STORE handler, for the instance ``swallow``,
    the first ``times`` times, never lets a response go out in time."""
    received: list[str] = []
    release = threading.Event()

    def on_store(event):
        uid = str(event.request.AffectedSOPInstanceUID)
        received.append(uid)
        if uid == swallow and received.count(uid) <= times:
            release.wait(15)
        return 0x0000

    try:
        with pynetdicom_scp(port, on_store):
            yield received
    finally:
        release.set()


def test_lost_response_is_resent_on_a_new_association(port, tmp_path):
    files = write_ct_series(tmp_path / "in", 12)
    target = sorted(files)[5]
    with scp_that_never_answers(port, target, times=1) as received:
        start = time.monotonic()
        report = send_paths([tmp_path / "in"], Destination("PYSCP", "127.0.0.1", port), timeout=1.0)
        elapsed = time.monotonic() - start
    assert elapsed < 5  # one 1 s timeout, not a hang
    assert report.ok and report.sent == 12 and report.resends == 1 and report.associations == 2
    outcome = next(o for o in report.outcomes if o.path == files[target])
    assert outcome.attempts == 2 and outcome.status == 0
    assert received.count(target) == 2 and set(received) == set(files)


def test_response_that_never_comes_is_a_failure_not_a_success(port, tmp_path, capsys):
    files = write_ct_series(tmp_path / "in", 6)
    target = sorted(files)[2]
    with scp_that_never_answers(port, target, times=99) as received:
        start = time.monotonic()
        report = send_paths([tmp_path / "in"], Destination("PYSCP", "127.0.0.1", port), timeout=1.0)
        elapsed = time.monotonic() - start
    assert elapsed < MAX_ATTEMPTS * 1.0 + 4
    assert report.counts == {"success": 5, "warning": 0, "failure": 1}
    outcome = next(o for o in report.outcomes if o.path == files[target])
    assert outcome.status is None and outcome.category == "failure"
    assert outcome.attempts == MAX_ATTEMPTS and received.count(target) == MAX_ATTEMPTS
    assert "no C-STORE response within 1 s" in outcome.reason and "outcome unknown" in outcome.reason
    assert "1 failed" in format_summary(report)


def test_peer_abort_is_noticed_at_once_and_the_instance_resent(port, tmp_path):
    files = write_ct_series(tmp_path / "in", 8)
    target = sorted(files)[3]
    received = []

    def on_store(event):
        uid = str(event.request.AffectedSOPInstanceUID)
        received.append(uid)
        if uid == target and received.count(uid) == 1:
            event.assoc.abort()  # A-ABORT instead of a response
        return 0x0000

    with pynetdicom_scp(port, on_store):
        start = time.monotonic()
        report = send_paths(str(tmp_path / "in"), Destination("PYSCP", "127.0.0.1", port), timeout=20)
        elapsed = time.monotonic() - start
    assert elapsed < 5  # noticed when it happened, not after the 20 s timeout
    assert report.ok and report.sent == 8 and report.resends == 1 and report.associations == 2
    assert received.count(target) == 2


class _Race:
    """Forces, on demand, the interleaving that loses a C-STORE response in
    pynetdicom 3.0.4 (see dicom_node.sender's docstring).

    - The requestor's reactor checkpoint: after the first real pause, the
      reactor thread is held just after ``wait()`` returns, with
      ``_is_paused`` still True (as if it were not scheduled yet), until the
      next DIMSE message has been queued.
    - The DIMSE message queue: that next message is queued without waking
      the thread blocked on it (as if that thread had not run yet), the
      reactor is let go, and only then is the waiting thread woken.
    """

    def __init__(self) -> None:
        self.held = threading.Event()
        self.queued = threading.Event()

    def install(self, monkeypatch) -> None:
        race = self
        original_init = Association.__init__

        class Checkpoint(threading.Event):
            def __init__(self, assoc):
                super().__init__()
                self.assoc = assoc
                self.set()

            def wait(self, timeout=None):
                was_set = self.is_set()
                result = super().wait(timeout)
                if threading.current_thread() is self.assoc and not was_set and not race.held.is_set():
                    race.held.set()
                    race.queued.wait(5)
                return result

        class MessageQueue(queue.Queue):
            def put(self, item, block=True, timeout=None):
                if race.held.is_set() and not race.queued.is_set():
                    with self.mutex:
                        self._put(item)
                        self.unfinished_tasks += 1
                    race.queued.set()
                    deadline = time.monotonic() + 0.3
                    while self.qsize() and time.monotonic() < deadline:
                        time.sleep(0.005)
                    with self.mutex:
                        self.not_empty.notify()
                    return
                super().put(item, block, timeout)

        def init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            if self.is_requestor:
                self._reactor_checkpoint = Checkpoint(self)
                self.dimse.msg_queue = MessageQueue()

        monkeypatch.setattr(Association, "__init__", init)


def test_pynetdicom_reactor_race_loses_a_response_and_send_does_not(port, tmp_path, monkeypatch, caplog):
    """The cause, reproduced: plain pynetdicom loses the response to the
    C-STORE sent right after the previous one; send_paths, under the same
    interleaving, loses nothing."""
    files = write_ct_series(tmp_path / "in", 4)
    paths = sorted(files.values())
    with pynetdicom_scp(port):
        # plain pynetdicom, as any caller would use it
        race = _Race()
        race.install(monkeypatch)
        ae = AE()
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.dimse_timeout = 1.0
        assoc = ae.associate("127.0.0.1", port)
        try:
            with caplog.at_level(logging.WARNING, logger="pynetdicom"):
                results = [assoc.send_c_store(dcmread(path)) for path in paths[:2]]
        finally:
            if assoc.is_established:
                assoc.release()
        assert race.held.is_set() and race.queued.is_set()
        assert "Status" in results[0]
        assert "Status" not in results[1]  # the response was taken by the reactor
        assert assoc.is_aborted
        assert "Received unexpected C-STORE service message" in caplog.text

        # the same interleaving under send_paths
        race = _Race()
        race.install(monkeypatch)
        report = send_paths(paths, Destination("PYSCP", "127.0.0.1", port), timeout=1.0)
        assert race.held.is_set() and race.queued.is_set()
        assert report.ok and report.sent == 4 and report.resends == 0 and report.associations == 1


# --------------------------------------------------------------------------
# progress bar


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_prints_nothing_when_not_a_tty(capsys):
    stream = io.StringIO()
    with ProgressBar(stream=stream) as bar:
        for done in range(11):
            bar(done, 10)
    assert stream.getvalue() == ""
    with ProgressBar() as bar:  # stderr under pytest is not a terminal
        bar(1, 1)
    assert capsys.readouterr().err == ""


def test_progress_bar_draws_on_a_tty():
    stream = _FakeTTY()
    with ProgressBar(label="send", stream=stream, min_interval=0) as bar:
        for done in range(11):
            bar(done, 10)
    text = stream.getvalue()
    assert text.startswith("\rsend [") and "10/10" in text and text.endswith("\n")
    assert text.count("\n") == 1
