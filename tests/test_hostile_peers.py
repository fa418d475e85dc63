"""Misbehaving peers (issue 6), scripted byte by byte on raw sockets.

Each case is a peer that breaks PS3.8 on purpose: it drops the connection in
the middle of a PDU, sends a PDU type that does not exist, a malformed
A-ASSOCIATE-RQ, a P-DATA-TF header claiming 4 GiB, nothing at all, more
associations than ``node.max_associations``, or a C-STORE and then silence.
For each one the node must do what the standard prescribes (an A-ABORT, an
A-ASSOCIATE-RJ with its reason, or closing the connection when the ARTIM
timer or the network timeout from the config runs out), leave no partial file
in the spool, leak no thread or file descriptor, and answer a C-ECHO from a
well-behaved peer meanwhile and afterwards.

The PDU layouts are PS3.8 Section 9.3 (A-ASSOCIATE-RQ 9.3.2, A-ASSOCIATE-RJ
9.3.4, P-DATA-TF 9.3.5, A-RELEASE 9.3.6-7, A-ABORT 9.3.8) and the command
sets PS3.7 Section 9.3 (Implicit VR Little Endian, Annex E); they are written
out here by hand rather than with pynetdicom, which refuses to send
malformed ones.

The last test measures the node's memory (VmRSS) while 20 studies stream in
over 4 associations.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node import statuses

from .factory import ct_dataset, write_series
from .nodeproc import NodeProcess

pytestmark = pytest.mark.slow  # each case waits out a timeout of a few seconds

#: Small timeouts so that each case takes seconds (the defaults are 30 s and 60 s).
ACSE_TIMEOUT = 2.0
NETWORK_TIMEOUT = 3.0
DIMSE_TIMEOUT = 3.0
MAX_ASSOCIATIONS = 2
#: Slack on every timing: two cores, and other tests may run at the same time.
SLACK = 6.0

PDU_ASSOCIATE_RQ, PDU_ASSOCIATE_AC, PDU_ASSOCIATE_RJ = 0x01, 0x02, 0x03
PDU_P_DATA_TF, PDU_RELEASE_RQ, PDU_RELEASE_RP, PDU_ABORT = 0x04, 0x05, 0x06, 0x07
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
             5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"  # PS3.7 Annex A.2.1


# --------------------------------------------------------------------------
# PDUs and command sets, by hand
# --------------------------------------------------------------------------
def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(
    contexts: list[tuple[str, str]],
    calling: str = "HOSTILE",
    called: str = "PACS_AI",
    max_length: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing one context per (abstract, transfer) pair,
    with odd context IDs 1, 3, 5..."""
    variable = item(0x10, APPLICATION_CONTEXT)
    for n, (abstract, transfer) in enumerate(contexts):
        variable += item(
            0x20,
            struct.pack(">BBBB", 2 * n + 1, 0, 0, 0) + item(0x30, abstract.encode()) + item(0x40, transfer.encode()),
        )
    variable += item(0x50, item(0x51, struct.pack(">L", max_length)) + item(0x52, b"1.2.826.0.1.3680043.9.9999.1"))
    fixed = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    return pdu(PDU_ASSOCIATE_RQ, fixed + variable)


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV item (PS3.8 9.3.5, E.2: control bit 0 command, bit 1 last)."""
    return pdu(PDU_P_DATA_TF, struct.pack(">LBB", len(data) + 2, context_id, control) + data)


COMMAND_LAST, DATA, DATA_LAST = 0x03, 0x00, 0x02
RELEASE_RQ = pdu(PDU_RELEASE_RQ, bytes(4))


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def command_set(*elements: tuple[int, bytes]) -> bytes:
    """A command set in Implicit VR Little Endian with its group length (PS3.7 E.1)."""
    body = b"".join(_element(e, v) for e, v in elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def c_echo_rq(message_id: int) -> bytes:
    return command_set((0x0002, _uid(Verification)), (0x0100, struct.pack("<H", 0x0030)),
                       (0x0110, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", 0x0101)))


def c_store_rq(message_id: int, sop_class: str, sop_uid: str) -> bytes:
    return command_set((0x0002, _uid(sop_class)), (0x0100, struct.pack("<H", 0x0001)),
                       (0x0110, struct.pack("<H", message_id)), (0x0700, struct.pack("<H", 2)),
                       (0x0800, struct.pack("<H", 0x0000)), (0x1000, _uid(sop_uid)))


def command_status(p_data_body: bytes) -> int:
    """The Status (0000,0900) of the command in a P-DATA-TF body holding one whole command."""
    data = p_data_body[6:]
    pos = 0
    while pos + 8 <= len(data):
        _group, element, length = struct.unpack_from("<HHL", data, pos)
        if element == 0x0900:
            return struct.unpack_from("<H", data, pos + 8)[0]
        pos += 8 + length
    raise AssertionError("no Status in the response")


def encoded_dataset(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


# --------------------------------------------------------------------------
# a raw peer
# --------------------------------------------------------------------------
@dataclass
class Received:
    """What a read brought: a PDU, or "closed" (FIN or reset), or "timeout"."""

    kind: str
    pdu_type: int | None = None
    body: bytes = b""
    at: float = 0.0

    def __str__(self) -> str:
        if self.kind != "pdu":
            return f"{self.kind} after {self.at:.1f} s"
        return f"{PDU_NAMES.get(self.pdu_type, hex(self.pdu_type or 0))} {self.body[:8].hex()} after {self.at:.1f} s"


class RawPeer:
    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        # another loopback address (Linux routes all of 127/8 to lo) is another host to the node
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.opened = time.monotonic()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int, deadline: float) -> bytes | None:
        buf = b""
        while len(buf) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def read(self, timeout: float) -> Received:
        deadline = time.monotonic() + timeout
        try:
            header = self._exactly(6, deadline)
            if header is None:
                return Received("closed", at=time.monotonic() - self.opened)
            pdu_type, _, length = struct.unpack(">BBL", header)
            body = self._exactly(length, deadline)
            if body is None:
                return Received("closed", at=time.monotonic() - self.opened)
            return Received("pdu", pdu_type, body, time.monotonic() - self.opened)
        except TimeoutError:
            return Received("timeout", at=time.monotonic() - self.opened)
        except (ConnectionResetError, BrokenPipeError):
            return Received("closed", at=time.monotonic() - self.opened)

    def until_closed(self, timeout: float) -> list[Received]:
        """Every PDU the node sends until it closes the connection (or ``timeout``)."""
        seen: list[Received] = []
        deadline = time.monotonic() + timeout
        while True:
            got = self.read(max(0.01, deadline - time.monotonic()))
            seen.append(got)
            if got.kind != "pdu":
                return seen

    def associate(self, contexts: list[tuple[str, str]], calling: str = "HOSTILE") -> Received:
        self.send(associate_rq(contexts, calling=calling))
        return self.read(10)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def accepted(ac: Received) -> dict[int, bool]:
    """Presentation context ID -> accepted, from an A-ASSOCIATE-AC body."""
    assert ac.kind == "pdu" and ac.pdu_type == PDU_ASSOCIATE_AC, f"expected an A-ASSOCIATE-AC, got {ac}"
    result, pos, body = {}, 68, ac.body
    while pos + 4 <= len(body):
        item_type, _, length = struct.unpack_from(">BBH", body, pos)
        if item_type == 0x21:
            result[body[pos + 4]] = body[pos + 6] == 0
        pos += 4 + length
    return result


# --------------------------------------------------------------------------
# the node under attack
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    n = NodeProcess(
        tmp_path_factory.mktemp("hostile"),
        max_associations=MAX_ASSOCIATIONS,
        acse_timeout=ACSE_TIMEOUT,
        network_timeout=NETWORK_TIMEOUT,
        dimse_timeout=DIMSE_TIMEOUT,
        sections={"http": {"port": 0}},
    )
    n.start()
    yield n
    code = n.stop()
    assert code == 0, f"the node exited with {code}:\n" + n.log_text()[-3000:]


@dataclass(frozen=True)
class Usage:
    fds: int
    threads: int
    rss_kib: int


def usage(pid: int) -> Usage:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Usage(len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")), rss)


def settled(node: NodeProcess, before: Usage, timeout: float = 10.0) -> Usage:
    """Wait until the node holds no more descriptors and threads than ``before``."""
    deadline = time.monotonic() + timeout
    while True:
        now = usage(node.proc.pid)
        if now.fds <= before.fds and now.threads <= before.threads:
            return now
        if time.monotonic() > deadline:
            fds = sorted(os.readlink(f"/proc/{node.proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{node.proc.pid}/fd"))
            raise AssertionError(f"leak: before {before}, {timeout:.0f} s later {now}; open: {fds}")
        time.sleep(0.1)


def echo(node: NodeProcess, source: str = "127.0.0.1") -> float:
    """A C-ECHO from a well-behaved peer; returns how long association + echo + release took."""
    started = time.monotonic()
    ae = AE(ae_title="GOOD_PEER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACS_AI", bind_address=(source, 0))
    assert assoc.is_established, "a well-behaved peer could not associate"
    status = assoc.send_c_echo()
    assoc.release()
    assert status and status.Status == statuses.SUCCESS
    return time.monotonic() - started


def assert_alive_and_clean(node: NodeProcess, before: Usage) -> Usage:
    assert node.proc.poll() is None, "the node died:\n" + node.log_text()[-3000:]
    after = settled(node, before)
    assert not list((node.spool / "tmp").iterdir()), "a partial file was left in spool/tmp"
    assert echo(node) < SLACK
    return after


@pytest.fixture
def baseline(node: NodeProcess) -> Usage:
    echo(node)  # warm: the first association starts pynetdicom's lazily created pieces
    assert not list((node.spool / "tmp").iterdir())
    return _quiet_usage(node)


def _quiet_usage(node: NodeProcess) -> Usage:
    """The node's usage once the last association's thread is gone (the smallest of a few samples)."""
    samples = []
    for _ in range(5):
        samples.append(usage(node.proc.pid))
        time.sleep(0.1)
    return Usage(min(s.fds for s in samples), min(s.threads for s in samples), samples[-1].rss_kib)


def report(case: str, what: str) -> None:
    print(f"\n[hostile] {case}: {what}")


# --------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------
def test_connection_dropped_in_the_middle_of_a_p_data_pdu(node: NodeProcess, baseline: Usage) -> None:
    """Associate, start a C-STORE (command, the first part of the data set), then close
    the TCP connection halfway through the next P-DATA-TF PDU. PS3.8 9.2 (Evt17 in Sta6,
    AA-4): the association is aborted; nothing of the instance may stay behind."""
    peer = RawPeer(node.port)
    ac = peer.associate([(CTImageStorage, ExplicitVRLittleEndian)])
    assert accepted(ac) == {1: True}
    ds = ct_dataset(generate_uid(), size=256)
    data = encoded_dataset(ds)
    peer.send(p_data(1, COMMAND_LAST, c_store_rq(1, CTImageStorage, ds.SOPInstanceUID)))
    peer.send(p_data(1, DATA, data[:16000]))
    whole = p_data(1, DATA_LAST, data[16000:32000])
    peer.send(whole[: len(whole) // 2])
    time.sleep(0.3)  # the node reads the half PDU
    peer.close()
    after = assert_alive_and_clean(node, baseline)
    assert ds.SOPInstanceUID not in {p.stem for p in node.stored_files()}
    report("connection dropped mid P-DATA-TF", f"association aborted, nothing stored, {baseline} -> {after}")


@pytest.mark.parametrize("when", ["before A-ASSOCIATE-RQ", "inside an association"])
def test_unknown_pdu_type_is_aborted(node: NodeProcess, baseline: Usage, when: str) -> None:
    """A PDU of type 0x0A (no such type, PS3.8 9.3.1) while the peer keeps the connection
    open. PS3.8 9.2: Evt19 (unrecognised PDU) gives A-ABORT (AA-1 before the association,
    AA-8 inside it), then the connection closes (the ARTIM timer, or here the rest of the
    bogus PDU never arriving within the network timeout)."""
    peer = RawPeer(node.port)
    if when == "inside an association":
        assert accepted(peer.associate([(Verification, ImplicitVRLittleEndian)])) == {1: True}
    peer.send(pdu(0x0A, bytes(4)))
    seen = peer.until_closed(ACSE_TIMEOUT + NETWORK_TIMEOUT + SLACK)
    peer.close()
    assert seen[-1].kind == "closed", f"the node kept the connection open: {[str(s) for s in seen]}"
    aborts = [s for s in seen if s.kind == "pdu"]
    assert [s.pdu_type for s in aborts] == [PDU_ABORT], f"expected one A-ABORT, got {[str(s) for s in seen]}"
    after = assert_alive_and_clean(node, baseline)
    report(f"unknown PDU type {when}", f"{', '.join(map(str, seen))}; {baseline} -> {after}")


def _bad_length_rqs() -> dict[str, bytes]:
    good = associate_rq([(Verification, ImplicitVRLittleEndian)], calling="BAD_RQ")
    app = good.index(b"\x10\x00")
    overrun = bytearray(good)
    overrun[app + 2:app + 4] = struct.pack(">H", 0xFFF0)  # Application Context item runs past the PDU
    truncated = pdu(PDU_ASSOCIATE_RQ, good[6:16])  # PDU length 10: not even the called AE title
    return {
        "item length runs past the PDU": bytes(overrun),
        "PDU shorter than its fixed fields": truncated,
        "PDU length larger than what is sent": good[:40],
    }


@pytest.mark.parametrize("case", list(_bad_length_rqs()))
def test_malformed_associate_rq_is_aborted(node: NodeProcess, baseline: Usage, case: str) -> None:
    """A-ASSOCIATE-RQs with lengths that do not add up. An undecodable one is Evt19 in Sta2:
    A-ABORT (AA-1), then the connection closes; one that never completes is closed when the
    network timeout runs out; in no case an A-ASSOCIATE-AC, and no association is journaled."""
    log_before = len(node.log_text())
    peer = RawPeer(node.port)
    peer.send(_bad_length_rqs()[case])
    seen = peer.until_closed(ACSE_TIMEOUT + NETWORK_TIMEOUT + SLACK)
    peer.close()
    assert seen[-1].kind == "closed", f"the node kept the connection open: {[str(s) for s in seen]}"
    assert all(s.pdu_type == PDU_ABORT for s in seen if s.kind == "pdu"), [str(s) for s in seen]
    if case != "PDU length larger than what is sent":
        assert seen[0].pdu_type == PDU_ABORT, f"expected an A-ABORT first, got {[str(s) for s in seen]}"
    after = assert_alive_and_clean(node, baseline)
    assert "calling_ae=BAD_RQ" not in node.log_text()[log_before:], "a malformed request became an association"
    report(f"malformed A-ASSOCIATE-RQ ({case})", f"{', '.join(map(str, seen))}; {baseline} -> {after}")


def test_p_data_claiming_four_gibibytes_is_not_read(node: NodeProcess, baseline: Usage) -> None:
    """A P-DATA-TF header claiming 0xFFFFFFF0 bytes, far over the maximum length the node
    announced (PS3.8 D.1), followed by as much data as the node will take. The node must
    not read (or buffer) it: an A-ABORT or a closed connection, memory as before."""
    peer = RawPeer(node.port)
    assert accepted(peer.associate([(CTImageStorage, ExplicitVRLittleEndian)])) == {1: True}
    peer.send(struct.pack(">BBL", PDU_P_DATA_TF, 0, 0xFFFFFFF0))
    pushed, chunk = 0, bytes(1 << 20)
    started = time.monotonic()
    peer.sock.settimeout(1.0)
    try:
        while pushed < 256 << 20 and time.monotonic() - started < NETWORK_TIMEOUT + SLACK:
            pushed += peer.sock.send(chunk)
    except TimeoutError:
        pass  # the node stopped reading: TCP flow control holds us back
    except (ConnectionResetError, BrokenPipeError):
        pass  # the node closed the connection
    seen = peer.until_closed(ACSE_TIMEOUT + NETWORK_TIMEOUT + SLACK)
    peer.close()
    grown = usage(node.proc.pid).rss_kib - baseline.rss_kib
    assert seen[-1].kind == "closed", f"the node kept the connection open: {[str(s) for s in seen]}"
    assert all(s.pdu_type == PDU_ABORT for s in seen if s.kind == "pdu"), [str(s) for s in seen]
    assert pushed < 64 << 20, f"the node read {pushed >> 20} MiB of a PDU it should have refused"
    assert grown < 32 * 1024, f"the node's RSS grew by {grown >> 10} MiB"
    after = assert_alive_and_clean(node, baseline)
    report("P-DATA-TF claiming 0xFFFFFFF0 bytes",
           f"{', '.join(map(str, seen))}; the peer got {pushed >> 10} KiB in before it stopped; "
           f"RSS {grown:+d} KiB; {baseline} -> {after}")


def test_silent_connections_are_closed_after_the_acse_timeout(node: NodeProcess, baseline: Usage) -> None:
    """Slow loris: connections that send nothing. PS3.8 9.1.5 / 9.2 (Sta2, Evt18): the node
    closes each when its ARTIM timer (``node.acse_timeout``) runs out, and serves a
    well-behaved peer without delay meanwhile."""
    silent = [RawPeer(node.port) for _ in range(4)]
    try:
        time.sleep(0.3)
        meanwhile = echo(node)
        assert meanwhile < 2.0, f"a C-ECHO took {meanwhile:.1f} s while 4 connections sat silent"
        seen = [peer.until_closed(ACSE_TIMEOUT + SLACK) for peer in silent]
    finally:
        for peer in silent:
            peer.close()
    for s in seen:
        assert [r.kind for r in s] == ["closed"], [str(r) for r in s]
        assert ACSE_TIMEOUT - 0.5 < s[0].at < ACSE_TIMEOUT + SLACK, f"closed after {s[0].at:.1f} s"
    after = assert_alive_and_clean(node, baseline)
    report("4 silent connections (slow loris)",
           f"each closed after {', '.join(f'{s[0].at:.1f}' for s in seen)} s (acse_timeout {ACSE_TIMEOUT} s); "
           f"C-ECHO meanwhile {meanwhile * 1000:.0f} ms; {baseline} -> {after}")


@pytest.mark.parametrize("ingest_processes", [1, 2])
def test_one_host_cannot_hold_more_connections_than_its_share(tmp_path: Path, ingest_processes: int) -> None:
    """``node.max_connections_per_address`` = 3: a host holding 3 silent connections (per
    ingest process) has its next ones closed at once, before any PDU, while another host
    (127.0.0.2) is served. When the silent ones close, and after port probes that connect
    and close, their host is served again at once: the count follows the connections'
    association threads, so nothing stays counted."""
    limit = 3
    node = NodeProcess(tmp_path, ingest_processes=ingest_processes, max_connections_per_address=limit,
                       acse_timeout=30.0, network_timeout=30.0)
    node.start()
    try:
        echo(node)
        before = _quiet_usage(node)
        silent = [RawPeer(node.port) for _ in range(limit * ingest_processes)]
        try:
            time.sleep(0.5)  # every one accepted and handed to its process
            extra = RawPeer(node.port)
            got = extra.until_closed(SLACK)
            extra.close()
            assert [r.kind for r in got] == ["closed"] and got[0].at < 2.0, [str(r) for r in got]
            assert echo(node, source="127.0.0.2") < 2.0
            for peer in silent:  # still open: the ARTIM timer (30 s) has not run out
                assert peer.read(0.2).kind == "timeout"
        finally:
            for peer in silent:
                peer.close()
        for _ in range(limit * 3):  # port probes, as a load balancer's TCP check makes them
            socket.create_connection(("127.0.0.1", node.port), timeout=10).close()
        # A connection closed before its A-ASSOCIATE-RQ ends its association thread at once
        # (pynetdicom waited for acse_timeout, here 30 s, before it let go).
        deadline = time.monotonic() + SLACK
        while True:
            try:
                took = echo(node)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "the host stayed locked out:\n" + node.log_text()[-2000:]
                time.sleep(0.2)
        after = settled(node, before)
        log = node.log_text()
        assert "reason=too-many-connections" in log and f"({limit} open from this address" in log
    finally:
        assert node.stop() == 0
    report(f"{limit * ingest_processes} silent connections from one host, max_connections_per_address {limit}, "
           f"{ingest_processes} ingest process(es)",
           f"the next one closed after {got[0].at * 1000:.0f} ms; another host served meanwhile; "
           f"C-ECHO again {took * 1000:.0f} ms after they closed; {before} -> {after}")


def test_more_associations_than_allowed_get_rejected_transient(node: NodeProcess, baseline: Usage) -> None:
    """Two raw peers hold the node's two associations (node.max_associations = 2); a third
    gets A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-transient (2), service-provider
    presentation (3), local-limit-exceeded (2). Released, the slots come back."""
    holders = [RawPeer(node.port) for _ in range(MAX_ASSOCIATIONS)]
    try:
        for peer in holders:
            assert accepted(peer.associate([(Verification, ImplicitVRLittleEndian)])) == {1: True}
        extra = RawPeer(node.port)
        rj = extra.associate([(Verification, ImplicitVRLittleEndian)])
        rest = extra.until_closed(ACSE_TIMEOUT + SLACK)
        extra.close()
        assert rj.kind == "pdu" and rj.pdu_type == PDU_ASSOCIATE_RJ, f"expected A-ASSOCIATE-RJ, got {rj}"
        assert tuple(rj.body[1:4]) == (
            statuses.REJECT_RESULT_TRANSIENT,
            statuses.REJECT_SOURCE_SERVICE_PROVIDER_PRESENTATION,
            statuses.REJECT_REASON_LOCAL_LIMIT_EXCEEDED,
        )
        assert rest[-1].kind == "closed"
        for peer in holders:  # the holders are still served
            peer.send(p_data(1, COMMAND_LAST, c_echo_rq(7)))
            rsp = peer.read(10)
            assert rsp.pdu_type == PDU_P_DATA_TF and command_status(rsp.body) == statuses.SUCCESS
        for peer in holders:
            peer.send(RELEASE_RQ)
            assert peer.read(10).pdu_type == PDU_RELEASE_RP
    finally:
        for peer in holders:
            peer.close()
    after = assert_alive_and_clean(node, baseline)
    report("3 associations with max_associations = 2",
           f"the third got A-ASSOCIATE-RJ {rj.body[1:4].hex(' ')} then close; {baseline} -> {after}")


def test_a_store_then_silence_is_aborted_after_the_network_timeout(node: NodeProcess, baseline: Usage) -> None:
    """A peer stores one instance, then neither sends nor releases. After
    ``node.network_timeout`` of silence the node aborts the association (A-ABORT);
    the instance it acknowledged stays, the study completes (its association is
    closed in the journal), and a second peer that stalls in the middle of a data set
    (complete PDUs, then nothing) leaves no partial file."""
    study_uid = generate_uid()
    stored = ct_dataset(study_uid, index=0)
    stalled = ct_dataset(study_uid, index=1, size=256)
    idle, stall = RawPeer(node.port), RawPeer(node.port)
    try:
        assert accepted(idle.associate([(CTImageStorage, ExplicitVRLittleEndian)])) == {1: True}
        assert accepted(stall.associate([(CTImageStorage, ExplicitVRLittleEndian)])) == {1: True}
        idle.send(p_data(1, COMMAND_LAST, c_store_rq(1, CTImageStorage, stored.SOPInstanceUID)))
        idle.send(p_data(1, DATA_LAST, encoded_dataset(stored)))
        rsp = idle.read(10)
        assert rsp.pdu_type == PDU_P_DATA_TF and command_status(rsp.body) == statuses.SUCCESS
        stall.send(p_data(1, COMMAND_LAST, c_store_rq(1, CTImageStorage, stalled.SOPInstanceUID)))
        stall.send(p_data(1, DATA, encoded_dataset(stalled)[:16000]))
        time.sleep(0.5)
        assert list((node.spool / "tmp").iterdir()), "the stalled data set should be arriving in spool/tmp"
        idle_seen = idle.until_closed(NETWORK_TIMEOUT + SLACK)
        stall_seen = stall.until_closed(NETWORK_TIMEOUT + SLACK)
    finally:
        idle.close()
        stall.close()
    for seen in (idle_seen, stall_seen):
        assert [s.pdu_type for s in seen if s.kind == "pdu"] == [PDU_ABORT], [str(s) for s in seen]
        assert seen[-1].kind == "closed", [str(s) for s in seen]
        assert NETWORK_TIMEOUT - 0.5 < seen[0].at < NETWORK_TIMEOUT + SLACK, str(seen[0])
    after = assert_alive_and_clean(node, baseline)
    stems = {p.stem for p in node.stored_files()}
    assert stored.SOPInstanceUID in stems and stalled.SOPInstanceUID not in stems
    studies = node.wait_for(
        lambda ss: any(s["study_uid"] == study_uid and s["state"] in ("COMPLETE", "QUEUED") for s in ss),
        "the idle peer's study to complete", timeout=30,
    )
    [study] = [s for s in studies if s["study_uid"] == study_uid]
    assert study["instance_count"] == 1
    report("C-STORE, then silence / stall mid data set",
           f"idle: {', '.join(map(str, idle_seen))}; stalled: {', '.join(map(str, stall_seen))}; "
           f"study {study['state']}; {baseline} -> {after}")


class TlsNodeProcess(NodeProcess):
    """A node with DICOM TLS: up once it logs that it listens (the plain C-ECHO probe
    of :class:`NodeProcess` would be a failed handshake)."""

    def _echo_ok(self) -> bool:
        return "listening on" in self.log_text()


def test_tls_record_cut_short_is_closed_after_the_network_timeout(tmp_path: Path) -> None:
    """Over DICOM TLS, an associated peer writes the header of a TLS record (5 bytes,
    claiming 64 bytes of application data) and nothing more. The node's read of that
    record must end after ``node.network_timeout``, not wait for the peer forever."""
    import ssl

    from .certs import make_pki

    pki = make_pki(tmp_path / "pki")
    (tmp_path / "node").mkdir()
    node = TlsNodeProcess(
        tmp_path / "node", tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
        acse_timeout=ACSE_TIMEOUT, network_timeout=NETWORK_TIMEOUT, sections={"http": {"port": 0}},
    )
    node.start()
    try:
        time.sleep(0.5)
        before = _quiet_usage(node)
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        raw = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(associate_rq([(Verification, ImplicitVRLittleEndian)]))
        header = tls.recv(6)
        assert header[:1] == bytes([PDU_ASSOCIATE_AC]), header
        time.sleep(0.2)
        started = time.monotonic()
        socket.socket.send(tls, b"\x17\x03\x03\x00\x40")  # past TLS: a record header, no record
        tls.settimeout(NETWORK_TIMEOUT + SLACK)
        try:
            while tls.recv(4096):
                pass
            outcome = "closed"
        except TimeoutError:
            outcome = "still open"
        except (ssl.SSLError, OSError) as exc:
            outcome = f"closed ({type(exc).__name__})"
        took = time.monotonic() - started
        tls.close()
        assert outcome.startswith("closed") and took < NETWORK_TIMEOUT + SLACK, f"{outcome} after {took:.1f} s"
        after = settled(node, before)
        assert node.proc.poll() is None
        report("TLS record cut short", f"{outcome} after {took:.1f} s (network_timeout {NETWORK_TIMEOUT} s); "
                                       f"{before} -> {after}")
    finally:
        assert node.stop() == 0


# --------------------------------------------------------------------------
# memory while studies stream in
# --------------------------------------------------------------------------
@pytest.mark.dcmtk
def test_memory_stays_bounded_while_studies_stream_in(tmp_path: Path, dcmtk_env: dict[str, str]) -> None:
    """20 studies of 30 64x64 CT instances, the first alone, the other 19 over 4
    concurrent storescu associations: the node's RSS after all of them is within
    30 MB of its RSS after the first."""
    studies = [write_series(tmp_path / "in" / f"{k:02d}", 30)[1] for k in range(20)]
    (tmp_path / "node").mkdir()
    node = NodeProcess(tmp_path / "node", sections={"http": {"port": 0}})
    node.start()
    try:
        pid = node.proc.pid
        started = usage(pid)

        def storescu(files: list[Path]) -> subprocess.Popen:
            return subprocess.Popen(
                ["storescu", "-aec", "PACS_AI", "-aet", "RSS_PROBE", "127.0.0.1", str(node.port), *map(str, files)],
                env=dcmtk_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )

        first = storescu(studies[0])
        assert first.wait(120) == 0, first.stderr.read()
        after_first = usage(pid)
        peak = [after_first.rss_kib]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak.append(usage(pid).rss_kib)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rest = studies[1:]
        lanes = [[f for study in rest[k::4] for f in study] for k in range(4)]
        t0 = time.monotonic()
        procs = [storescu(files) for files in lanes]
        for p in procs:
            assert p.wait(180) == 0, p.stderr.read()
        took = time.monotonic() - t0
        done.set()
        sampler.join()
        after_all = usage(pid)
        assert len(node.stored_files()) == 600
        grown_mb = (after_all.rss_kib - after_first.rss_kib) / 1024
        print(
            f"\n[rss] node pid {pid}: at start {started.rss_kib / 1024:.1f} MB, after the first study "
            f"{after_first.rss_kib / 1024:.1f} MB, peak while 19 studies streamed in over 4 associations "
            f"{max(peak) / 1024:.1f} MB, after all 20 {after_all.rss_kib / 1024:.1f} MB "
            f"(growth {grown_mb:+.1f} MB; 570 instances in {took:.1f} s); "
            f"threads {after_first.threads} -> {after_all.threads}, fds {after_first.fds} -> {after_all.fds}"
        )
        assert grown_mb < 30, f"RSS grew by {grown_mb:.1f} MB"
    finally:
        assert node.stop() == 0
