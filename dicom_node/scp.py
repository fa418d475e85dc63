"""The Storage and Verification SCP of the node.

What a C-STORE "Success" promises here (DESIGN.md section 4): the encoded
data set was written as received (no decode, no re-encode) to a file in
``spool/tmp``, fsynced, linked into ``spool/<study>/<series>/<sop>.dcm``
(directory fsynced) and journaled, in that order, before the response leaves.
Anything else is a failure status with an error comment (PS3.7 C.4.2.1.4),
and the association goes on.

Deliberate adaptations of pynetdicom 3.0, installed by
:func:`configure_pynetdicom` and documented where they are defined:

* **Receive straight to the spool.** With ``STORE_RECV_CHUNKED_DATASET``
  pynetdicom writes an incoming data set fragment by fragment to a
  ``NamedTemporaryFile`` from its DUL thread. The node hands it a
  :class:`~dicom_node.spool.SpoolTempFile` in ``spool/tmp`` instead: the file
  lands on the spool's file system (so it is *linked*, never copied), holds
  no more than one PDU in memory, and a disk-full error is remembered instead
  of raised in the DUL thread (where it would abort the association).
* **A cheaper receive path** (:mod:`dicom_node.fastpath`): hand-encoded
  responses and File Meta, no 1 ms polls between a request arriving, being
  served and answered; each change measured with bench/ingest.py.
* **Storage negotiation.** Any storage, private or unknown SOP class is
  accepted (unknown classes are stored as received, PS3.4 B.4.1 permits a
  Level 2 SCP to do so), but only with the transfer syntaxes in
  :data:`ACCEPTED_TRANSFER_SYNTAXES`; pynetdicom's own "unrestricted" mode
  would accept whatever syntax comes first, including ones nothing here can
  read.
* **Bounded PDU reads** (:func:`bounded_recv`): a PDU must arrive within
  ``network_timeout`` and may not be longer than ``max_pdu`` plus
  :data:`PDU_LENGTH_ALLOWANCE`; tests/test_hostile_peers.py showed a peer
  stalling mid-PDU holding a thread and socket forever, and a 4 GiB P-DATA-TF
  header being read for as long as the peer kept sending.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import shutil
import socket
import ssl
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom import acse as _acse
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import fsm as _fsm
from pynetdicom.presentation import (
    PresentationContext,
    build_context,
    negotiate_as_acceptor,
)
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import Verification, uid_to_service_class
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from . import fastpath, statuses
from .journal import InstanceRecord, Journal, JournalError, UnknownStudy
from .spool import Spool, SpoolError, SpoolTempFile
from .structure import Undecodable, scan_file
from .uids import InvalidUID, validate_uid

log = logging.getLogger(__name__)
audit = logging.getLogger("pacs_ai.audit")

#: Transfer syntaxes the node accepts and stores as received: uncompressed,
#: deflate, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]

#: ErrorComment is LO: at most 64 characters (PS3.7 C.4.2.1.4, PS3.5 6.2).
MAX_ERROR_COMMENT = 64


# --------------------------------------------------------------------------
# pynetdicom adaptations
# --------------------------------------------------------------------------
_temp_dir_lock = threading.Lock()
_temp_dir: Path | None = None


def _spool_temp_file(*_args: Any, **_kwargs: Any) -> SpoolTempFile:
    """Stands in for ``NamedTemporaryFile`` in ``pynetdicom.dimse_messages``."""
    with _temp_dir_lock:
        directory = _temp_dir
    if directory is None:
        raise RuntimeError("the node's spool is not configured")
    return SpoolTempFile(directory)


def _is_storage_like(abstract_syntax: str) -> bool:
    """Storage, private or unknown SOP class (the same rule pynetdicom's
    unrestricted mode uses), as opposed to a known non-storage service."""
    uid = UID(abstract_syntax)
    if uid.is_private:
        return True
    cls = uid_to_service_class(uid)
    return cls is StorageServiceClass or cls is ServiceClass


def negotiate_storage(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: Any = None,
) -> Any:
    """Presentation context negotiation for the node (PS3.8 9.3.2.2, 9.3.3.2).

    For every proposed storage-like abstract syntax a supported context with
    :data:`ACCEPTED_TRANSFER_SYNTAXES` is added, then pynetdicom's normal
    acceptor negotiation runs, so each context is accepted with a syntax from
    our list or rejected with "transfer-syntaxes-not-supported".
    """
    known = {cx.abstract_syntax for cx in ac_contexts}
    extra = []
    for cx in rq_contexts:
        ab = cx.abstract_syntax
        if ab and ab not in known:
            context = _storage_context(ab)
            if context is not None:
                extra.append(context)
            known.add(ab)
    return negotiate_as_acceptor(rq_contexts, list(ac_contexts) + extra, roles)


_context_cache: dict[str, PresentationContext | None] = {}


def _storage_context(abstract_syntax: str) -> PresentationContext | None:
    """The supported context for a storage-like abstract syntax (None for
    others). Cached: building one validates every UID with a regular
    expression, and storescu proposes over a hundred per association."""
    try:
        return _context_cache[abstract_syntax]
    except KeyError:
        pass
    context = (
        build_context(abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        if _is_storage_like(abstract_syntax) else None
    )
    if len(_context_cache) > 4096:  # private UIDs from anyone: keep it bounded
        _context_cache.clear()
    _context_cache[abstract_syntax] = context
    return context


#: How much longer than ``node.max_pdu`` a PDU may be before the node refuses
#: to read it: room for an A-ASSOCIATE-RQ that proposes many contexts, and for
#: senders that overshoot the maximum length we announced (PS3.8 D.1) a little.
#: It bounds what one association can make the node buffer.
PDU_LENGTH_ALLOWANCE = 1 << 20

#: A-ABORT PDU (PS3.8 9.3.8): source 2, service-provider; reason 6,
#: invalid-PDU-parameter value (a PDU length the node will not read).
_ABORT_INVALID_PDU_PARAMETER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"

_pynetdicom_recv = AssociationSocket.recv


def bounded_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Replaces ``AssociationSocket.recv``, which the DUL thread calls once for
    a PDU's 6-byte header and once for the rest (``_read_pdu_data``), each
    time only after ``select`` found data waiting.

    pynetdicom's version loops on a socket without a timeout until it has
    ``nr_bytes`` or the peer closes. Found by tests/test_hostile_peers.py: a
    peer that stopped in the middle of a PDU (or sent an unknown PDU type with
    a body: pynetdicom reads the header only and then waits for a next header
    that never completes) held the association's thread and socket for as
    long as it kept the connection open, since the ARTIM timer and the network
    timeout are only looked at between PDUs; and a P-DATA-TF header claiming
    0xFFFFFFF0 bytes was read into memory for as long as the peer sent.

    Here a read that gets no byte for the association's ``network_timeout``
    (DCMTK's socket timeout, in effect) stops short, which pynetdicom handles
    as the peer closing (Evt17: the association is aborted, the socket
    closed). On the node's own (acceptor) associations a PDU longer than
    ``max_pdu`` + :data:`PDU_LENGTH_ALLOWANCE` is not read at all: the peer
    gets an A-ABORT (PS3.8 9.3.8, reason invalid-PDU-parameter value) and the
    connection is closed.
    """
    assoc = self.assoc
    if assoc.is_acceptor and nr_bytes > (assoc.ae.maximum_pdu_size or (16 << 20)) + PDU_LENGTH_ALLOWANCE:
        peer = assoc.requestor
        log.warning(
            "peer %s:%s sent a PDU of %d bytes, over node.max_pdu (%d) and its allowance: aborted",
            peer.address, peer.port, nr_bytes, assoc.ae.maximum_pdu_size,
        )
        self.send(_ABORT_INVALID_PDU_PARAMETER)
        return bytearray()
    timeout = assoc.network_timeout
    sock = self.socket
    if timeout is None or sock is None:
        return _pynetdicom_recv(self, nr_bytes)
    # A TLS socket has network_timeout as its own timeout (process_request_thread):
    # select cannot tell whether its buffered bytes make a whole record.
    tls = isinstance(sock, ssl.SSLSocket)
    data = bytearray()
    while len(data) < nr_bytes:
        want = min(nr_bytes - len(data), 4096)  # pynetdicom's read size
        try:
            if tls:
                chunk = sock.recv(want)
            else:
                try:  # the common case, data waiting: one system call, as before
                    chunk = sock.recv(want, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if not select.select([sock], [], [], timeout)[0]:
                        raise TimeoutError from None
                    continue
        except TimeoutError:
            peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
            log.warning(
                "peer %s:%s sent %d of a PDU's %d bytes, then nothing for %.0f s (network_timeout): "
                "connection closed",
                peer.address, peer.port, len(data), nr_bytes, timeout,
            )
            break
        except ValueError:  # select on a socket closed meanwhile
            break
        if not chunk:
            break
        data += chunk
    return data


_pynetdicom_aa5 = _fsm.ACTIONS["AA-5"]


def _aa5_ends_the_wait(dul: Any) -> str:
    """AA-5 (PS3.8 9.2, Sta2 + Evt17: the peer closed the connection before its
    A-ASSOCIATE-RQ), then wake the acceptor's thread.

    pynetdicom's AA-5 closes the socket and returns to Sta1 but hands nothing up, so the
    acceptor's thread went on waiting for an A-ASSOCIATE-RQ for ``acse_timeout`` (30 s):
    every connect-and-close (a port probe, a load balancer's TCP check) held a thread and
    one of pynetdicom's association slots that long, and counted against its host's
    ``max_connections_per_address``. An empty item is what the wait gets when it times
    out, so the thread now ends the way it would have 30 s later."""
    state = _pynetdicom_aa5[1](dul)
    dul.to_user_queue.put(None)
    return state


def configure_pynetdicom(temp_dir: Path) -> None:
    """Set pynetdicom's process-wide options for the node (idempotent)."""
    global _temp_dir
    with _temp_dir_lock:
        _temp_dir = temp_dir
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True  # every C-STORE goes to the storage service
    _config.LOG_REQUEST_IDENTIFIERS = False  # no patient data in logs
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    # pydicom's warnings about bad values quote the values, which may be a
    # patient's name: the node reports bad data by status, never by value.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    _dimse_messages.NamedTemporaryFile = _spool_temp_file  # type: ignore[assignment]
    _acse.negotiate_unrestricted = negotiate_storage  # type: ignore[assignment]
    AssociationSocket.recv = bounded_recv  # type: ignore[method-assign]
    _fsm.ACTIONS["AA-5"] = (_pynetdicom_aa5[0], _aa5_ends_the_wait, _pynetdicom_aa5[2])
    fastpath.install()
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


# --------------------------------------------------------------------------
# configuration handed to every ingest process
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class PeerEntry:
    """A known peer (``[[peers]]``): who may associate, and from where."""

    ae_title: str
    host: str
    port: int = 104


@dataclass
class ScpConfig:
    """Everything an ingest process needs; plain data so it can cross a process boundary."""

    ae_title: str = "PACS_AI"
    spool: str = "var/spool"
    peers: list[PeerEntry] = field(default_factory=list)
    accept_unknown_callers: bool = True
    max_associations: int = 16
    max_pdu: int = 131072
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    #: WAL + NORMAL survives a crash of the process; after a power cut the
    #: last commits may be gone, which the start-up reconciliation covers: an
    #: instance file is fsynced (with its directory) before Success, and a
    #: node that did not shut down cleanly journals every spool file it lacks.
    journal_synchronous: str = "NORMAL"
    #: Below this much free space on the spool's file system new associations are refused
    #: (transient: the sender tries later) instead of failing in the middle of a study.
    min_free_bytes: int = 1 << 30
    #: Larger instances are refused (Out of Resources, with a comment); 0: no limit.
    max_instance_bytes: int = 0
    #: A study with this many instances takes no more; 0: no limit.
    max_instances_per_study: int = 0
    #: Open connections one IP address may hold in one ingest process; more are closed at
    #: once. 0: no limit.
    max_connections_per_address: int = 16


def _normalise_ip(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def resolve_peer_addresses(peers: list[PeerEntry]) -> dict[str, set[str]]:
    """AE title -> the set of IP addresses it may call from."""
    table: dict[str, set[str]] = {}
    for peer in peers:
        addresses = table.setdefault(peer.ae_title, set())
        try:
            infos = socket.getaddrinfo(peer.host, None, proto=socket.IPPROTO_TCP)
            addresses.update(_normalise_ip(info[4][0]) for info in infos)
        except OSError:
            log.warning("peer %s: host %r does not resolve", peer.ae_title, peer.host)
    return table


def make_ssl_context(cfg: ScpConfig) -> ssl.SSLContext | None:
    """DICOM TLS (PS3.15 B.1, BCP 195): TLS 1.2 or later; with ``tls_ca`` the
    peer must present a certificate that CA signed (mutual TLS)."""
    if not cfg.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
    if cfg.tls_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cfg.tls_ca)
    return ctx


# --------------------------------------------------------------------------
# the handlers
# --------------------------------------------------------------------------
@dataclass
class _AssocState:
    assoc_id: str
    calling_ae: str
    called_ae: str
    peer_host: str
    peer_port: int
    opened_at: float
    instances: int = 0
    failures: int = 0
    journaled: bool = False


def _ae_title(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def _comment(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_COMMENT else text[: MAX_ERROR_COMMENT - 3] + "..."


class _StoreRefused(Exception):
    """Internal: a C-STORE that must be answered with a failure status."""

    def __init__(self, status: int, comment: str, study_key: str | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = _comment(comment)
        self.study_key = study_key


class IngestHandlers:
    """Event handlers of one ingest process; never raise into pynetdicom."""

    def __init__(self, cfg: ScpConfig, spool: Spool, journal: Journal) -> None:
        self.cfg = cfg
        self.spool = spool
        self.journal = journal
        self.peer_addresses = resolve_peer_addresses(cfg.peers)

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]

    # -- association control ------------------------------------------------
    def _reject_reason(self, calling: str, called: str, host: str) -> tuple[int, int, int, str] | None:
        if not self.cfg.accept_unknown_callers:
            allowed = self.peer_addresses.get(calling)
            if allowed is None:
                return (
                    statuses.REJECT_RESULT_PERMANENT,
                    statuses.REJECT_SOURCE_SERVICE_USER,
                    statuses.REJECT_REASON_CALLING_AE_NOT_RECOGNIZED,
                    "calling-AE-title-not-recognized",
                )
            if _normalise_ip(host) not in allowed:
                return (
                    statuses.REJECT_RESULT_PERMANENT,
                    statuses.REJECT_SOURCE_SERVICE_USER,
                    statuses.REJECT_REASON_CALLING_AE_NOT_RECOGNIZED,
                    "calling-AE-title-not-recognized (wrong address)",
                )
            if called != self.cfg.ae_title:
                return (
                    statuses.REJECT_RESULT_PERMANENT,
                    statuses.REJECT_SOURCE_SERVICE_USER,
                    statuses.REJECT_REASON_CALLED_AE_NOT_RECOGNIZED,
                    "called-AE-title-not-recognized",
                )
        low = self._low_on_disk()
        if low is not None:
            return (
                statuses.REJECT_RESULT_TRANSIENT,
                statuses.REJECT_SOURCE_SERVICE_PROVIDER_PRESENTATION,
                statuses.REJECT_REASON_LOCAL_LIMIT_EXCEEDED,
                f"local-limit-exceeded ({low})",
            )
        try:
            busy = self.journal.open_association_count() >= self.cfg.max_associations
        except Exception:
            busy = False
        if busy:
            return (
                statuses.REJECT_RESULT_TRANSIENT,
                statuses.REJECT_SOURCE_SERVICE_PROVIDER_PRESENTATION,
                statuses.REJECT_REASON_LOCAL_LIMIT_EXCEEDED,
                "local-limit-exceeded",
            )
        return None

    def _low_on_disk(self) -> str | None:
        """Why the spool has too little space for another association, or None. The
        high-water mark turns a disk that fills up into a sender that waits and retries,
        rather than a study cut off at an arbitrary instance."""
        if self.cfg.min_free_bytes <= 0:
            return None
        try:
            free = shutil.disk_usage(self.spool.root).free
        except OSError:
            return None
        if free >= self.cfg.min_free_bytes:
            return None
        return f"spool low on disk space: {free // (1 << 20)} MiB free, node.min_free_mb is {self.cfg.min_free_bytes >> 20}"

    def on_requested(self, event: Any) -> None:
        assoc = event.assoc
        try:
            rq = assoc.requestor.primitive
            calling = _ae_title(rq.calling_ae_title)
            called = _ae_title(rq.called_ae_title)
            host, port = assoc.requestor.address, assoc.requestor.port
            reason = self._reject_reason(calling, called, host)
            if reason is not None:
                audit.info(
                    "association rejected calling_ae=%s called_ae=%s peer=%s:%s reason=%s",
                    calling, called, host, port, reason[3],
                )
                try:  # for the metrics; a journal that cannot take it must not delay the reject
                    self.journal.record_rejected_association(
                        calling_ae=calling, called_ae=called, peer_host=_normalise_ip(host),
                        peer_port=int(port), reason=reason[3])
                except Exception:
                    log.warning("could not journal a rejected association")
                assoc.acse.send_reject(*reason[:3])
                # As pynetdicom's own rejections do: wait until the DUL has
                # sent the A-ASSOCIATE-RJ and the peer closed, or the socket
                # would be shut before the reject goes out.
                assoc.kill()
                return
            assoc._pacs_ai = _AssocState(
                assoc_id=uuid.uuid4().hex,
                calling_ae=calling,
                called_ae=called,
                peer_host=_normalise_ip(host),
                peer_port=int(port),
                opened_at=time.time(),
            )
        except Exception:
            log.exception("association request handling failed; rejecting")
            try:
                assoc.acse.send_reject(
                    statuses.REJECT_RESULT_TRANSIENT,
                    statuses.REJECT_SOURCE_SERVICE_USER,
                    statuses.REJECT_REASON_NO_REASON,
                )
            except Exception:
                assoc.abort()

    def on_established(self, event: Any) -> None:
        fastpath.wait_for_data(event.assoc)
        fastpath.serve_stores_at_once(event.assoc)
        fastpath.slow_association_poll(event.assoc)
        st: _AssocState | None = getattr(event.assoc, "_pacs_ai", None)
        if st is None:
            return
        try:
            self.journal.open_association(
                st.assoc_id,
                calling_ae=st.calling_ae,
                called_ae=st.called_ae,
                peer_host=st.peer_host,
                peer_port=st.peer_port,
            )
            st.journaled = True
        except Exception:
            # Completion then relies on the idle timer alone for this
            # association's studies; storage itself is unaffected.
            log.exception("could not journal association %s", st.assoc_id)

    def on_conn_close(self, event: Any) -> None:
        assoc = event.assoc
        # A data set cut off by an abort or a dropped connection: its partial
        # temp file goes now, not at the next garbage collection.
        partial = getattr(getattr(assoc.dimse, "message", None), "_data_set_file", None)
        if isinstance(partial, SpoolTempFile):
            partial.discard()
        st: _AssocState | None = getattr(assoc, "_pacs_ai", None)
        if st is None:
            return
        assoc._pacs_ai = None
        if assoc.is_released:
            outcome = "released"
        elif assoc.is_aborted:
            outcome = "aborted"
        elif assoc.is_rejected:
            outcome = "rejected"
        else:
            outcome = "closed"
        if st.journaled:
            try:
                self.journal.close_association(st.assoc_id, outcome, instances=st.instances, failures=st.failures)
            except Exception:
                log.exception("could not close association %s in the journal", st.assoc_id)
        audit.info(
            "association closed calling_ae=%s called_ae=%s peer=%s:%s outcome=%s "
            "instances=%d failures=%d duration_s=%.3f",
            st.calling_ae, st.called_ae, st.peer_host, st.peer_port, outcome,
            st.instances, st.failures, time.time() - st.opened_at,
        )

    # -- DIMSE services -----------------------------------------------------
    def on_echo(self, event: Any) -> int:
        """C-ECHO (PS3.7 9.1.5): always Success while the node runs."""
        return statuses.SUCCESS

    def on_store(self, event: Any) -> int | Dataset:
        """C-STORE (PS3.4 B.2.2): never raises; maps every outcome to a status."""
        st: _AssocState | None = getattr(event.assoc, "_pacs_ai", None)
        tmp: SpoolTempFile | None = getattr(event.request, "_dataset_file", None)
        try:
            key = self._store(event, tmp, st)
            if st is not None:
                st.instances += 1
            log.debug("stored an instance of study %s", key, extra={"study_key": key})
            return statuses.SUCCESS  # an int: no Dataset to build for the common case
        except _StoreRefused as refused:
            status, comment = refused.status, refused.comment
        except Exception as exc:  # a bug: answer, log, keep the association
            log.exception("unexpected error while storing an instance")
            status = statuses.CANNOT_UNDERSTAND_PROCESSING
            comment = _comment(f"internal error: {type(exc).__name__}")
        if st is not None:
            st.failures += 1
        log.warning(
            "C-STORE refused with 0x%04X (%s): %s",
            status, statuses.STORE_STATUS_NAMES.get(status, "failure"), comment,
        )
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = comment
        return rsp

    def _store(self, event: Any, tmp: SpoolTempFile | None, st: _AssocState | None) -> str:
        if tmp is None:
            # Not received through the spool temp file (should not happen
            # with configure_pynetdicom): write the encoded bytes ourselves.
            tmp = self.spool.new_temp_file()
            tmp.write(event.encoded_dataset())
            event.request._dataset_file = tmp
        tmp.fsync()
        if tmp.error is not None:
            raise _StoreRefused(
                statuses.OUT_OF_RESOURCES,
                f"not stored: {tmp.error.strerror or 'write error'}",
            )
        req = event.request
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            with open(tmp.name, "rb") as fp:
                values = scan_file(fp, transfer_syntax)
        except Undecodable as exc:
            raise _StoreRefused(statuses.CANNOT_UNDERSTAND_UNDECODABLE, f"undecodable: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise _StoreRefused(statuses.OUT_OF_RESOURCES, f"not stored: cannot read back ({exc})") from exc
        try:
            sop_class = validate_uid(values.get("SOPClassUID"), "SOP Class UID")
            sop_uid = validate_uid(values.get("SOPInstanceUID"), "SOP Instance UID")
            study_uid = validate_uid(values.get("StudyInstanceUID"), "Study Instance UID")
            series_uid = validate_uid(values.get("SeriesInstanceUID"), "Series Instance UID")
        except InvalidUID as exc:
            raise _StoreRefused(statuses.CANNOT_UNDERSTAND_INVALID_UID, str(exc)) from exc
        affected_sop = str(req.AffectedSOPInstanceUID or "").rstrip("\x00 ")
        affected_class = str(req.AffectedSOPClassUID or "").rstrip("\x00 ")
        if affected_sop != sop_uid:
            raise _StoreRefused(
                statuses.CANNOT_UNDERSTAND_UID_MISMATCH,
                "SOP Instance UID differs from Affected SOP Instance UID",
            )
        if affected_class != sop_class:
            raise _StoreRefused(
                statuses.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Class UID differs from Affected SOP Class UID",
            )
        modality = values.get("Modality", "")[:16] or None

        key = self.journal.study_key(study_uid)
        if self.cfg.max_instance_bytes and tmp.size > self.cfg.max_instance_bytes:
            raise _StoreRefused(
                statuses.OUT_OF_RESOURCES,
                f"instance of {tmp.size >> 20} MiB is over node.max_instance_mb ({self.cfg.max_instance_bytes >> 20})",
                key,
            )
        if self.cfg.max_instances_per_study:
            try:
                count = self.journal.get(key).instance_count
            except UnknownStudy:
                count = 0
            if count >= self.cfg.max_instances_per_study and self.journal.instance(sop_uid) is None:
                raise _StoreRefused(
                    statuses.OUT_OF_RESOURCES,
                    f"the study has reached node.max_instances_per_study ({self.cfg.max_instances_per_study})",
                    key,
                )
        rel = self.spool.instance_relpath(study_uid, series_uid, sop_uid)
        final = self.spool.absolute(rel)
        try:
            if not self.spool.commit(tmp.name, final):
                row = self.journal.instance(sop_uid)
                if row is not None:  # the same instance again
                    self._duplicate(key, row, tmp.name)
                    return key
                # A file never journaled, so never acknowledged (a crash
                # between link and journal): this copy replaces it.
                self.spool.replace(tmp.name, final)
        except SpoolError as exc:
            raise _StoreRefused(statuses.OUT_OF_RESOURCES, f"not stored: {exc.strerror}", key) from exc
        try:
            result = self.journal.record_instance(
                InstanceRecord(
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=sop_uid,
                    sop_class_uid=sop_class,
                    transfer_syntax=transfer_syntax,
                    modality=modality,
                    path=rel,
                    size=tmp.size,
                ),
                calling_ae=st.calling_ae if st else None,
                peer_host=st.peer_host if st else None,
                assoc_id=st.assoc_id if st and st.journaled else None,
            )
        except (JournalError, OSError, Exception) as exc:
            # The file is in place but not journaled: not acknowledged. A
            # retry replaces it; a restart adopts it (Node.reconcile).
            raise _StoreRefused(statuses.OUT_OF_RESOURCES, "journal write failed", key) from exc
        if not result.new:
            # The SOP Instance UID is journaled under another study or
            # series: the first copy stays, this one goes.
            row = self.journal.instance(sop_uid)
            if row is not None and row["path"] != rel:
                self._duplicate(key, row, final)
                self.spool.remove(final)
        return key

    def _duplicate(self, key: str, row: Any, candidate: str) -> None:
        """Same SOP Instance UID again: keep the first copy, answer Success
        (DESIGN.md section 10); different content is a warning and counted."""
        conflict = not _same_content(self.spool.root / row["path"], candidate)
        try:
            self.journal.count_duplicate(row["study_key"], conflict=conflict)
        except Exception:
            log.exception("could not count a duplicate instance")
        if conflict:
            log.warning(
                "study %s: an instance was received again with different content; "
                "the first copy is kept",
                key,
                extra={"study_key": key},
            )
        else:
            log.info("study %s: duplicate instance ignored", key, extra={"study_key": key})


def _same_content(a: Path | str, b: Path | str) -> bool:
    try:
        if os.stat(a).st_size != os.stat(b).st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                ba, bb = fa.read(1 << 20), fb.read(1 << 20)
                if ba != bb:
                    return False
                if not ba:
                    return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# the server of one ingest process
# --------------------------------------------------------------------------
class AddressLimiter:
    """Open connections per remote address, so that one host cannot take every connection
    slot of an ingest process (pynetdicom's own cap, 2 x ``max_associations`` + 8, counts
    connections that have not yet sent an A-ASSOCIATE-RQ; 40 silent ones from one host
    kept everybody else out until the ARTIM timer closed them).

    A connection counts from its accept until its association's thread has ended. The
    count is rebuilt from thread liveness on every check, never from close events, so a
    connection whose close goes unreported cannot lock its host out: one that never got
    an association thread counts for ``grace`` seconds at most."""

    def __init__(self, limit: int, grace: float) -> None:
        self.limit = limit
        self.grace = grace
        self._lock = threading.Lock()
        # (host, port) -> [accepted at (monotonic), association thread or None]
        self._open: dict[tuple[str, int], list[Any]] = {}
        self._refused: dict[str, tuple[float, int]] = {}  # host -> (last logged at, refused since)

    def _live(self, now: float) -> None:
        for key, (at, thread) in list(self._open.items()):
            if thread is None:
                if now - at > self.grace:
                    del self._open[key]
            elif thread.ident is not None and not thread.is_alive():
                del self._open[key]

    def admit(self, address: tuple[str, int]) -> int | None:
        """None when the connection may go on (it is now counted), else how many
        connections its host already holds."""
        host = _normalise_ip(address[0])
        now = time.monotonic()
        with self._lock:
            self._live(now)
            if self.limit > 0:
                held = sum(1 for h, _port in self._open if h == host)
                if held >= self.limit:
                    return held
            self._open[(host, int(address[1]))] = [now, None]
            return None

    def attach(self, address: tuple[str, int], thread: threading.Thread) -> None:
        """The association thread serving the connection from ``address``."""
        with self._lock:
            entry = self._open.get((_normalise_ip(address[0]), int(address[1])))
            if entry is not None:
                entry[1] = thread

    def refused_log_due(self, host: str, every: float = 10.0) -> int | None:
        """Refusals from ``host`` since its last log line when another is due, else None
        (a host that keeps trying gets one line per ``every`` seconds, not one per try)."""
        now = time.monotonic()
        with self._lock:
            last, count = self._refused.get(host, (-every, 0))
            if now - last >= every:
                self._refused[host] = (now, 0)
                return count + 1
            self._refused[host] = (last, count + 1)
            return None


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's association server, fed by the node.

    With a ``listen_socket`` it accepts there itself (one ingest process:
    the node's own). Without one it never accepts: the node's dispatcher
    accepts every connection and hands it to the least busy ingest process
    (:meth:`serve_channel`). Benchmarks showed several processes accepting on
    one socket balance badly: whoever has just accepted wins the next one
    too, and four associations ended up in one process in most runs.
    """

    def __init__(
        self, listen_socket: socket.socket | None, address: Any, *args: Any, **kwargs: Any
    ) -> None:
        self._listen_socket = listen_socket
        self._fixed_address = address
        self._on_finished: Any = None
        self.limiter: AddressLimiter | None = None
        super().__init__(*args[:1], address, *args[1:], **kwargs)

    def limit_per_address(self, limiter: AddressLimiter) -> None:
        self.limiter = limiter
        self.bind(evt.EVT_CONN_OPEN, lambda event: limiter.attach(event.address, event.assoc))

    def process_request(self, request: Any, client_address: Any) -> None:
        """Every connection, from either accept path, before its thread starts: a host
        holding ``max_connections_per_address`` connections already is closed at once."""
        if self.limiter is not None:
            held = self.limiter.admit(client_address)
            if held is not None:
                refused = self.limiter.refused_log_due(_normalise_ip(client_address[0]))
                if refused is not None:
                    audit.warning(
                        "connection refused peer=%s:%s reason=too-many-connections (%d open from this "
                        "address, node.max_connections_per_address; refusals since the last such line: %d)",
                        client_address[0], client_address[1], held, refused,
                    )
                self.shutdown_request(request)
                self._finished()
                return
        super().process_request(request, client_address)

    def server_bind(self) -> None:
        if self._listen_socket is not None:
            self.socket.close()
            self.socket = self._listen_socket
        self.server_address = self._fixed_address

    def server_activate(self) -> None:
        """The node owns the listening socket."""

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only; the TLS handshake happens in the connection's own
        thread (:meth:`process_request_thread`), so a peer that connects and
        stays silent cannot hold up anybody else's association."""
        client, address = self.socket.accept()
        client.setblocking(True)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            request.settimeout(self.ae.acse_timeout or 30.0)
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
                audit.info(
                    "association refused peer=%s:%s reason=tls-handshake-failed (%s)",
                    client_address[0], client_address[1], reason or type(exc).__name__,
                )
                self.shutdown_request(request)
                self._finished()
                return
            # Not None (blocking): a TLS record cut short would block the DUL
            # thread's read forever, select having seen its first bytes;
            # bounded_recv's deadline only covers waiting between records.
            request.settimeout(self.ae.network_timeout)
        # pynetdicom's handler starts the association's thread and returns;
        # the connection counts as finished at EVT_CONN_CLOSE.
        super().process_request_thread(request, client_address)

    def _finished(self, _event: Any = None) -> None:
        if self._on_finished is not None:
            self._on_finished()

    def serve_channel(self, channel: socket.socket, stop: threading.Event) -> None:
        """Take connections the node passes over ``channel`` (SCM_RIGHTS)
        until the node closes it or ``stop`` is set; report each finished
        one with a byte so the node knows this process's load."""
        lock = threading.Lock()

        def finished() -> None:
            with lock:
                try:
                    channel.send(b"-")
                except OSError:
                    pass

        self._on_finished = finished
        self.bind(evt.EVT_CONN_CLOSE, self._finished)
        channel.settimeout(0.5)
        while not stop.is_set():
            try:
                msg, fds, _flags, _addr = socket.recv_fds(channel, 512, 1)
            except TimeoutError:
                continue
            except OSError:
                break
            if not msg and not fds:
                break  # the node is gone: finish what we have and exit
            for fd in fds:
                client = socket.socket(fileno=fd)
                try:
                    host, _, port = msg.decode().rpartition(",")
                    self.process_request(client, (host, int(port)))
                except Exception:
                    log.exception("could not start an association")
                    client.close()
                    finished()


def build_ae(cfg: ScpConfig) -> AE:
    ae = AE(ae_title=cfg.ae_title)
    ae.add_supported_context(Verification)
    # node.max_associations is enforced in EVT_REQUESTED from the journal
    # (all ingest processes together). pynetdicom's own count includes
    # threads of associations that have already ended, so it only backs ours up.
    ae.maximum_associations = cfg.max_associations * 2 + 8
    ae.maximum_pdu_size = cfg.max_pdu
    ae.acse_timeout = cfg.acse_timeout
    ae.dimse_timeout = cfg.dimse_timeout
    ae.network_timeout = cfg.network_timeout
    # Peer checks happen in EVT_REQUESTED with the address in hand.
    ae.require_called_aet = False
    ae.require_calling_aet = []
    return ae


def make_server(
    cfg: ScpConfig, journal: Journal, address: Any, listen_socket: socket.socket | None = None
) -> NodeAssociationServer:
    """Build one ingest process's association server (call after spawn)."""
    spool = Spool(cfg.spool)
    configure_pynetdicom(spool.tmp)
    ae = build_ae(cfg)
    handlers = IngestHandlers(cfg, spool, journal)
    server = NodeAssociationServer(
        listen_socket,
        address,
        ae,
        cfg.ae_title,
        ae.supported_contexts,
        make_ssl_context(cfg),
        evt_handlers=handlers.handlers(),
    )
    server.daemon_threads = True
    # a connection without an association thread stops counting once it could at most be
    # waiting for its TLS handshake and its A-ASSOCIATE-RQ
    server.limit_per_address(AddressLimiter(cfg.max_connections_per_address, cfg.acse_timeout * 2 + 10.0))
    ae._servers.append(server)
    return server
