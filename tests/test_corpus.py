"""The bad-input corpus (issue 6): every file shipped with pydicom (``pydicom/data``:
test_files, charset_files, palettes) and with pynetdicom (``tests/dicom_files``), sent
to a running ``pacs-ai node`` by two senders:

* **storescu** (DCMTK), one invocation per transfer syntax with the option that
  proposes it (``-xy`` JPEG baseline, ``-xv`` JPEG 2000 lossless...), ``-R`` (only
  the contexts the files need) and ``-nh`` (go on after a failed store). Its
  association runs through a relay here that records both directions, so what
  storescu really sent (DCMTK re-encodes, and converts where it must) and what the
  node answered (status and Error Comment) are read off the wire.
* **a raw pynetdicom sender**: each file's data set bytes exactly as the file holds
  them (after the preamble and File Meta, or the whole file when it has none),
  proposed with the file's SOP Class and transfer syntax (from its File Meta, or as
  pydicom guesses with ``force=True``), and sent undecoded, as a broken modality
  would: no SOP Class UID gets Secondary Capture, no SOP Instance UID a new one.

Every file ends in one of: stored byte-exact with Success (the data set in the
spool is the one that went over the wire), Success for a SOP Instance UID already
stored (DESIGN.md section 10: the first copy stays), refused with a specific failure
status (0xA7xx, 0xA9xx, 0xCxxx) and an Error Comment, refused at negotiation
(presentation context rejected), or refused by the sender before it sent anything
(not the node's business; the reason is recorded). Meanwhile the node never dies or
hangs, every association is released normally, nothing stays in spool/tmp, and
``pacs-ai status`` lists every stored study. Then every study folder goes through
series loading as the worker does it: a volume or a SeriesError/AnalysisError with a
message, never another exception.

Run with ``-s`` to see the table (file, sender, outcome, status, comment).
"""

from __future__ import annotations

import json
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.filereader import read_dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE

from dicom_node.sender import guard_responses
from dicom_node.series import (
    SeriesError,
    SeriesSelector,
    load_series,
    scan_series,
    select_series,
)
from study_queue.analysis import AnalysisError

from .factory import dataset_bytes
from .nodeproc import NodeProcess
from .test_ingest import send_encoded

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
PYNETDICOM_FILES = Path(pynetdicom.__file__).parent / "tests" / "dicom_files"
# pydicom-data (the test extra installs it): pydicom's larger test files, which
# get_testdata_files() lists through its data_store plugin.
import data_store  # noqa: E402

PYDICOM_DATA_STORE = Path(data_store.__file__).parent / "data"
CORPUS_ROOTS = [PYDICOM_DATA / "test_files", PYDICOM_DATA / "charset_files", PYDICOM_DATA / "palettes",
                PYDICOM_DATA_STORE, PYNETDICOM_FILES]

#: storescu's option proposing each transfer syntax (plus the uncompressed ones).
STORESCU_OPTION = {
    ExplicitVRLittleEndian: "-xe",
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}
#: Failure statuses a refusal may carry (PS3.4 Table B.2-1, PS3.7 Annex C).
REFUSAL = re.compile(r"0x(A7|A9|C[0-9A-F])[0-9A-F]{2}")
STORESCU_TIMEOUT = 180
RELEASED = re.compile(r"association closed calling_ae=CORPUS_\w+ called_ae=\S+ peer=(\S+) outcome=(\w+)")


# --------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------
@dataclass
class CorpusFile:
    path: Path
    label: str
    payload: bytes  # the data set as the file holds it
    transfer_syntax: str
    sop_class: str
    sop_uid: str
    notes: list[str] = field(default_factory=list)


def _meta(data: bytes) -> tuple[dict[int, str], int] | None:
    """The File Meta elements (PS3.10 7.1, always Explicit VR Little Endian) of a Part 10
    file and where its data set starts; walked element by element, so a wrong or
    missing group length does not matter. None without a preamble and "DICM"."""
    if data[128:132] != b"DICM":
        return None
    pos, values = 132, {}
    while pos + 8 <= len(data) and data[pos:pos + 2] == b"\x02\x00":
        element = struct.unpack_from("<H", data, pos + 2)[0]
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length, start = struct.unpack_from("<L", data, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        values[element] = data[start:start + length].decode("ascii", "replace").rstrip("\x00 ")
        pos = start + length
    return values, pos


def describe(path: Path, root: Path) -> CorpusFile:
    data = path.read_bytes()
    package = {PYNETDICOM_FILES: "pynetdicom", PYDICOM_DATA_STORE: "pydicom-data"}.get(root, "pydicom")
    label = f"{package}:{path.relative_to(root.parent)}"
    notes: list[str] = []
    meta = _meta(data)
    values, offset = meta if meta is not None else ({}, 0)
    if meta is None:
        notes.append("no File Meta")
    try:
        with warnings.catch_warnings():  # pydicom warns about what makes these files interesting
            warnings.simplefilter("ignore")
            ds = dcmread(path, force=True, stop_before_pixels=True)
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        implicit, little = ds.original_encoding
    except Exception as exc:  # noqa: BLE001 - a file pydicom cannot read at all still gets sent
        notes.append(f"pydicom cannot read it ({type(exc).__name__})")
        sop_class = sop_uid = ""
        implicit, little = True, True
    ts = values.get(0x0010, "")
    if not ts:
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        notes.append(f"transfer syntax guessed: {UID(ts).name}")
    sop_class = sop_class or values.get(0x0002, "")
    sop_uid = sop_uid or values.get(0x0003, "")
    if not sop_class:
        sop_class = SecondaryCaptureImageStorage
        notes.append("no SOP Class UID: proposed as Secondary Capture")
    if not sop_uid:
        sop_uid = generate_uid()
        notes.append("no SOP Instance UID: a new one in the command")
    return CorpusFile(path, label, data[offset:], ts, sop_class, sop_uid, notes)


@pytest.fixture(scope="module")
def corpus() -> list[CorpusFile]:
    files = [(p, root) for root in CORPUS_ROOTS for p in sorted(root.rglob("*")) if p.is_file()]
    shipped = {Path(f) for f in get_testdata_files() if Path(f).is_file()}
    assert shipped <= {p for p, _ in files}, "get_testdata_files() lists files outside the corpus roots"
    assert len(files) > 190, f"only {len(files)} files: is pydicom's data folder complete?"
    return [describe(p, root) for p, root in files]


# --------------------------------------------------------------------------
# outcomes
# --------------------------------------------------------------------------
@dataclass
class Outcome:
    file: CorpusFile
    sender: str
    kind: str  # stored | duplicate | refused | negotiation | sender
    status: int | None = None
    comment: str = ""
    sent: bytes | None = None  # the data set that went over the wire
    sop_uid: str = ""
    transfer_syntax: str = ""
    note: str = ""

    def row(self) -> tuple[str, str, str, str]:
        status = f"0x{self.status:04X}" if self.status is not None else "-"
        what = {
            "stored": "stored byte-exact",
            "duplicate": "Success, SOP Instance UID already stored",
            "refused": "refused",
            "negotiation": "refused at negotiation",
            "sender": "not sent: sender refused",
        }[self.kind]
        return self.file.label, self.sender, f"{what} {status}" if self.status is not None else what, \
            "; ".join(x for x in (self.comment, self.note) if x)


@dataclass
class Run:
    node: NodeProcess
    sender: str
    ingest_processes: int
    outcomes: list[Outcome]
    associations: int  # opened by the sender
    first_acked: dict[str, tuple[bytes, str]]  # SOP Instance UID -> (data set, transfer syntax) first acknowledged


# --------------------------------------------------------------------------
# sender 1: raw pynetdicom
# --------------------------------------------------------------------------
def send_with_pynetdicom(node: NodeProcess, corpus: list[CorpusFile]) -> tuple[list[Outcome], int]:
    """One association per transfer syntax, each file's SOP class proposed once in it
    (so ``send_encoded`` finds the file's context by its abstract syntax)."""
    outcomes: list[Outcome] = []
    groups: dict[str, list[CorpusFile]] = defaultdict(list)
    for f in corpus:
        groups[f.transfer_syntax].append(f)
    associations = 0
    for ts, files in sorted(groups.items()):
        ae = AE(ae_title="CORPUS_PYND")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        sendable: list[CorpusFile] = []
        for f in files:
            try:
                if f.sop_class not in {cx.abstract_syntax for cx in ae.requested_contexts}:
                    ae.add_requested_context(f.sop_class, [ts])
                sendable.append(f)
            except ValueError as exc:
                outcomes.append(Outcome(f, "pynetdicom", "sender", note=f"pynetdicom will not propose it: {exc}"))
        if not sendable:
            continue
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PACS_AI")
        assert assoc.is_established, f"no association for {UID(ts).name}"
        associations += 1
        guard_responses(assoc)
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        try:
            for n, f in enumerate(sendable, 1):
                if f.sop_class not in accepted:
                    result = next(
                        (cx.result for cx in assoc.rejected_contexts if cx.abstract_syntax == f.sop_class), None
                    )
                    outcomes.append(Outcome(f, "pynetdicom", "negotiation",
                                            note=f"presentation context result {result}"
                                                 + (" (abstract syntax not supported)" if result == 3 else "")))
                    continue
                try:
                    rsp = send_encoded(assoc, f.sop_class, f.sop_uid, f.payload, msg_id=n)
                except ValueError as exc:  # pynetdicom checks the UIDs it puts in a command
                    outcomes.append(Outcome(f, "pynetdicom", "sender", note=f"pynetdicom will not send it: {exc}"))
                    continue
                assert assoc.is_established, f"the association was aborted after {f.label}"
                outcomes.append(Outcome(
                    f, "pynetdicom", "stored" if rsp.Status == 0 else "refused", int(rsp.Status),
                    str(rsp.ErrorComment or ""), f.payload, f.sop_uid, ts, "; ".join(f.notes),
                ))
        finally:
            assoc.release()
        assert assoc.is_released, f"the association for {UID(ts).name} was not released"
    return outcomes, associations


# --------------------------------------------------------------------------
# sender 2: DCMTK storescu through a recording relay
# --------------------------------------------------------------------------
class Relay(threading.Thread):
    """Passes one TCP connection through to the node, keeping a copy of both directions."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_port = upstream_port
        self.sent = bytearray()  # storescu -> node
        self.answered = bytearray()  # node -> storescu

    def run(self) -> None:
        self.listener.settimeout(STORESCU_TIMEOUT)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        pairs = {client: (upstream, self.sent), upstream: (client, self.answered)}
        open_ = {client, upstream}
        while open_:
            ready, _, _ = select.select(list(open_), [], [], STORESCU_TIMEOUT)
            if not ready:
                break
            for s in ready:
                other, record = pairs[s]
                try:
                    data = s.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    open_.discard(s)
                    try:
                        other.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                record += data
                other.sendall(data)
        client.close()
        upstream.close()
        self.listener.close()


def dimse_messages(stream: bytes) -> list[tuple[dict, bytes | None]]:
    """The DIMSE messages in a recorded byte stream: (command elements, data set bytes)."""
    messages, command, data, pending = [], bytearray(), bytearray(), None
    pos = 0
    while pos + 6 <= len(stream):
        pdu_type, _, length = struct.unpack_from(">BBL", stream, pos)
        body = stream[pos + 6:pos + 6 + length]
        pos += 6 + length
        if pdu_type != 0x04:
            continue
        p = 0
        while p + 6 <= len(body):
            item_length = struct.unpack_from(">L", body, p)[0]
            context_id, control = body[p + 4], body[p + 5]
            fragment = body[p + 6:p + 4 + item_length]
            p += 4 + item_length
            if control & 1:
                command += fragment
                if control & 2:
                    ds = read_dataset(BytesIO(bytes(command)), is_implicit_VR=True, is_little_endian=True)
                    cmd = {k: ds.get(k) for k in ("MessageID", "MessageIDBeingRespondedTo", "AffectedSOPInstanceUID",
                                                    "Status", "ErrorComment", "CommandDataSetType")}
                    cmd["context_id"] = context_id
                    command = bytearray()
                    if cmd["CommandDataSetType"] == 0x0101:
                        messages.append((cmd, None))
                    else:
                        pending = cmd
            else:
                data += fragment
                if control & 2:
                    messages.append((pending or {}, bytes(data)))
                    data, pending = bytearray(), None
    return messages


def storescu_groups(corpus: list[CorpusFile]) -> dict[str, list[CorpusFile]]:
    groups: dict[str, list[CorpusFile]] = defaultdict(list)
    for f in corpus:
        groups[STORESCU_OPTION.get(f.transfer_syntax, "-xe")].append(f)
    return groups


def send_with_storescu(node: NodeProcess, corpus: list[CorpusFile], env: dict[str, str]) -> tuple[list[Outcome], int]:
    outcomes: list[Outcome] = []
    associations = 0
    for option, files in sorted(storescu_groups(corpus).items()):
        relay = Relay(node.port)
        relay.start()
        by_path = {str(f.path): f for f in files}
        cmd = ["storescu", "-v", "-R", "-nh", option, "-aet", "CORPUS_DCMTK", "-aec", "PACS_AI",
               "127.0.0.1", str(relay.port), *by_path]
        started = time.monotonic()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=STORESCU_TIMEOUT, check=False)
        relay.join(30)
        log = out.stdout + out.stderr
        assert not relay.is_alive(), f"storescu {option}: the connection did not end"
        assert out.returncode == 0, f"storescu {option} exited with {out.returncode}:\n{log[-3000:]}"
        assert time.monotonic() - started < STORESCU_TIMEOUT
        if "Requesting Association" in log:
            associations += 1
            assert "Releasing Association" in log and "Association Aborted" not in log, log[-3000:]
        requests = {int(cmd["MessageID"]): (cmd, data) for cmd, data in dimse_messages(bytes(relay.sent))}
        responses = {int(cmd["MessageIDBeingRespondedTo"]): cmd for cmd, _ in dimse_messages(bytes(relay.answered))}
        syntaxes = accepted_syntaxes(bytes(relay.answered))
        seen: set[str] = set()
        last_error = last_warning = converted = ""
        current: CorpusFile | None = None
        for line in log.splitlines():
            if m := re.search(r"missing SOP class \(or instance\) in file: (.*), ignoring file", line):
                f = by_path[m.group(1)]
                seen.add(str(f.path))
                outcomes.append(Outcome(f, "storescu", "sender", note="storescu: no SOP Class/Instance UID readable"
                                        + (f" ({last_error})" if last_error else "")))
                last_error = ""
            elif m := re.match(r"I: Sending file: (.*)", line):
                current = by_path[m.group(1)]
                seen.add(str(current.path))
                last_warning = converted = ""
            elif current is None:
                if line.startswith("E: "):
                    last_error = line[3:].strip()
            elif m := re.match(r"I: Converting transfer syntax: (.*) -> (.*)", line):
                converted = f"storescu converted {m.group(1)} to {m.group(2)}" if m.group(1) != m.group(2) else ""
            elif (m := re.search(r"Sending Store Request \(MsgID (\d+)", line)) and int(m.group(1)) in requests:
                rq, data = requests[int(m.group(1))]
                rsp = responses.get(int(m.group(1)))
                assert rsp is not None, f"storescu: no C-STORE response for {current.label}"
                status = int(rsp["Status"])
                outcomes.append(Outcome(current, "storescu", "stored" if status == 0 else "refused", status,
                                        str(rsp.get("ErrorComment") or ""), data, str(rq["AffectedSOPInstanceUID"]),
                                        syntaxes.get(rq["context_id"], ""), converted))
                current = None
            elif "No presentation context for" in line:
                outcomes.append(Outcome(current, "storescu", "negotiation", note="storescu: " + line[3:].strip()))
                current = None
            elif "W: " in line:
                last_warning = line[line.index("W: ") + 3:].strip()
            elif line.startswith("E: ") and "Store Failed" not in line:
                # storescu gave up on the file before its data set went out (e.g. it could not convert it)
                reason = last_warning or line[3:].strip()
                outcomes.append(Outcome(current, "storescu", "sender", note=f"storescu: {reason}"))
                current = None
        missing = set(by_path) - seen
        assert not missing, f"storescu said nothing about {sorted(missing)}"
    return outcomes, associations


def accepted_syntaxes(answered: bytes) -> dict[int, str]:
    """Presentation context ID -> accepted transfer syntax, from the A-ASSOCIATE-AC
    (PS3.8 9.3.3: items 0x21 from offset 68 of its body, transfer syntax sub-item 0x40)."""
    if len(answered) < 6 or answered[0] != 0x02:
        return {}
    length = struct.unpack_from(">L", answered, 2)[0]
    body, pos, result = answered[6:6 + length], 68, {}
    while pos + 4 <= len(body):
        item_type, _, item_length = struct.unpack_from(">BBH", body, pos)
        if item_type == 0x21 and body[pos + 6] == 0:
            sub = body[pos + 8:pos + 4 + item_length]
            if sub[:1] == b"\x40":
                result[body[pos + 4]] = sub[4:4 + struct.unpack_from(">H", sub, 2)[0]].decode().rstrip("\x00 ")
        pos += 4 + item_length
    return result


# --------------------------------------------------------------------------
# the run: one node, both senders
# --------------------------------------------------------------------------
def status_json(node: NodeProcess) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "study_queue.cli", "status", "--config", str(node.config), "--json", "--limit", "100000"],
        capture_output=True, text=True, cwd=node.workdir, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stored_path(node: NodeProcess, sop_uid: str) -> Path:
    [path] = [p for p in node.spool.glob(f"*/*/{sop_uid}.dcm")]
    return path


RUNS = [("pynetdicom", 1), ("storescu", 1), ("pynetdicom", 2), ("storescu", 2)]


@pytest.fixture(scope="module", params=RUNS, ids=[f"{sender}-{n}-ingest" for sender, n in RUNS])
def run(request: pytest.FixtureRequest, corpus: list[CorpusFile], tmp_path_factory: pytest.TempPathFactory,
        dcmtk_env: dict[str, str]) -> Run:
    """A node (``ingest_processes`` 1 or 2) that receives the whole corpus from one sender.
    One node per sender: the corpus sent twice to one node would make nearly every file of
    the second sender a duplicate, and its data sets could not be compared with the spool."""
    sender, processes = request.param
    workdir = tmp_path_factory.mktemp(f"corpus-{sender}-{processes}")
    node = NodeProcess(workdir, ingest_processes=processes, sections={"http": {"port": 0}})
    node.start()
    try:
        if sender == "pynetdicom":
            outcomes, associations = send_with_pynetdicom(node, corpus)
        else:
            outcomes, associations = send_with_storescu(node, corpus, dcmtk_env)
        assert node.proc.poll() is None, "the node died:\n" + node.log_text()[-3000:]
        first_acked: dict[str, tuple[bytes, str]] = {}
        for o in outcomes:
            if o.kind == "stored":
                if o.sop_uid in first_acked:
                    o.kind = "duplicate"
                    same = first_acked[o.sop_uid][0] == o.sent
                    o.note = "; ".join(x for x in (o.note, "first copy kept, " + ("same bytes" if same else "other bytes")) if x)
                else:
                    first_acked[o.sop_uid] = (o.sent or b"", o.transfer_syntax)
        yield Run(node, sender, processes, outcomes, associations, first_acked)
    finally:
        code = node.stop()
        assert code == 0, f"the node exited with {code}"


# --------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------
def test_every_file_is_stored_or_refused_with_a_reason(run: Run, corpus: list[CorpusFile]) -> None:
    rows = sorted((o.row() for o in run.outcomes), key=lambda r: (r[0], r[1]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{run.sender} -> node with {run.ingest_processes} ingest process(es)")
    print(f"{'file':<{width}}  {'sender':<10}  outcome / comment")
    for label, sender, outcome, comment in rows:
        print(f"{label:<{width}}  {sender:<10}  {outcome}" + (f"  [{comment}]" if comment else ""))
    counts = Counter((o.sender, o.kind) for o in run.outcomes)
    print("\ncounts:", dict(sorted(counts.items())))
    assert sorted(o.file.label for o in run.outcomes) == sorted(f.label for f in corpus), "files without an outcome"
    for o in run.outcomes:
        if o.kind in ("stored", "duplicate"):
            assert o.status == 0
        elif o.kind == "refused":
            assert REFUSAL.fullmatch(f"0x{o.status:04X}"), f"{o.file.label} ({o.sender}): status 0x{o.status:04X}"
            assert o.comment.strip(), f"{o.file.label} ({o.sender}): refused without an Error Comment"
        else:
            assert o.note, f"{o.file.label} ({o.sender}): no reason recorded"
    assert counts[(run.sender, "stored")] > 100


def test_the_node_survived_and_released_every_association(run: Run) -> None:
    node = run.node
    assert node.proc.poll() is None
    assert not list((node.spool / "tmp").iterdir()), "files left in spool/tmp"
    # the audit line follows the release, so the last one may still be on its way
    deadline = time.monotonic() + 10
    while True:
        text = node.log_text()
        closed = set(RELEASED.findall(text))  # stderr and the log file hold the same lines
        if len(closed) >= run.associations or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    outcomes = Counter(outcome for _, outcome in closed)
    assert outcomes == {"released": run.associations}, f"{run.associations} associations: {outcomes}"
    assert "Traceback" not in text, text[text.index("Traceback") - 500:][:3000]
    assert "exited with" not in text, "an ingest process died"


def test_what_was_acknowledged_is_stored_byte_exact(run: Run) -> None:
    for sop_uid, (sent, ts) in run.first_acked.items():
        path = stored_path(run.node, sop_uid)
        assert dataset_bytes(path) == sent, f"{sop_uid}: the stored data set is not what was sent"
        if ts:
            assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    stored = {p.stem for p in run.node.stored_files()}
    assert stored == set(run.first_acked), "the spool holds instances nobody was told were stored, or lacks some"


def test_status_lists_every_stored_study(run: Run) -> None:
    folders = {p.relative_to(run.node.spool).parts[0] for p in run.node.stored_files()}
    listed = {s["study_uid"]: s for s in status_json(run.node)}
    assert folders <= set(listed), f"not in pacs-ai status: {sorted(folders - set(listed))}"
    counts = Counter(p.relative_to(run.node.spool).parts[0] for p in run.node.stored_files())
    for study_uid, n in counts.items():
        assert listed[study_uid]["instance_count"] == n, study_uid


def test_series_loading_gives_a_volume_or_a_clear_error(run: Run) -> None:
    """As the worker does it (study_queue/analysis.py): scan_series, select_series,
    load_series, on every study folder; here every series is loaded, selected or not."""
    folders = sorted({p.relative_to(run.node.spool).parts[0] for p in run.node.stored_files()})
    permissive = SeriesSelector(modality="", orientation=None, min_slices=1)
    results: list[tuple[str, str]] = []
    unexpected: list[str] = []
    for folder in folders:
        try:
            infos = scan_series(run.node.spool / folder)
            if not infos:
                raise AnalysisError("no DICOM images found")
            select_series(infos, SeriesSelector())
            select_series(infos, permissive)
            for info in infos:
                try:
                    loaded = load_series(info)
                    results.append((folder, f"volume {loaded.hu.shape} {loaded.modality}"))
                except SeriesError as exc:
                    assert str(exc).strip()
                    results.append((folder, f"SeriesError: {exc}"))
        except AnalysisError as exc:
            results.append((folder, f"AnalysisError: {exc}"))
        except Exception as exc:  # noqa: BLE001 - that is what this test looks for
            unexpected.append(f"{folder}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    print(f"\nseries loading, {len(folders)} study folders:")
    for reason, n in Counter(re.sub(r"\d+", "N", r) for _, r in results).most_common():
        print(f"  {n:>4} x {reason}")
    assert not unexpected, "\n".join(unexpected)
