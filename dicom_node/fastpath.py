"""The node's receive path through pynetdicom, made cheaper.

Each change was made after the ingest benchmark's profile
(``bench/ingest.py --profile pyspy``) showed where the node's time went,
and each is installed only in the node's process (:func:`install`, and the
per-association calls in ``IngestHandlers.on_established``):

* C-STORE responses and File Meta are encoded by hand (PS3.7 9.3.1.2 and
  Annex E, Implicit VR LE; PS3.10 7.1, Explicit VR LE): pynetdicom built both
  as pydicom Datasets, about a fifth of the CPU.
* The response is written to the socket by the thread that served the
  request instead of queued for the DUL thread's next 1 ms poll.
* A complete C-STORE request is served by the DUL thread that decoded it
  (:class:`_ServeStoresAtOnce`), not after the association thread's 1 ms poll.
* The DUL thread waits for the next PDU in ``select`` (:func:`wait_for_data`)
  instead of sleeping 1 ms between polls.
* The association thread, left watching for release and abort, polls every
  5 ms instead of every 1 ms (:class:`_AssociationClock`).

Negotiation, the state machine, other services and every SCU association
are pynetdicom's own. tests/test_ingest.py, test_peers.py and test_tls.py
exercise this path with DCMTK and pynetdicom peers.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import struct
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom import association as _association
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import AssociationSocket

from . import statuses

log = logging.getLogger(__name__)

C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
#: Message Control Header: command, last fragment (PS3.8 E.2).
COMMAND_LAST_FRAGMENT = b"\x03"


def _uid_bytes(value: Any) -> bytes:
    raw = str(value or "").rstrip("\x00 ").encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text_bytes(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


def encode_store_response(
    message_id: int, sop_class_uid: Any, sop_instance_uid: Any, status: int, comment: str | None = None
) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 Table 9.3-2), Implicit VR LE."""
    body = b"".join((
        _implicit(0x0000, 0x0002, _uid_bytes(sop_class_uid)),
        _implicit(0x0000, 0x0100, struct.pack("<H", C_STORE_RSP)),
        _implicit(0x0000, 0x0120, struct.pack("<H", message_id & 0xFFFF)),
        _implicit(0x0000, 0x0800, struct.pack("<H", NO_DATA_SET)),
        _implicit(0x0000, 0x0900, struct.pack("<H", status & 0xFFFF)),
        _implicit(0x0000, 0x0902, _text_bytes(comment)) if comment else b"",
        _implicit(0x0000, 0x1000, _uid_bytes(sop_instance_uid)),
    ))
    return _implicit(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB",):
        return struct.pack("<HH", group, element) + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def encode_file_meta(sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any) -> bytes:
    """Preamble-less File Meta Information group (PS3.10 Table 7.1-1)."""
    body = b"".join((
        _explicit(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, 0x0002, b"UI", _uid_bytes(sop_class_uid)),
        _explicit(0x0002, 0x0003, b"UI", _uid_bytes(sop_instance_uid)),
        _explicit(0x0002, 0x0010, b"UI", _uid_bytes(transfer_syntax)),
        _explicit(0x0002, 0x0012, b"UI", _uid_bytes(PYNETDICOM_IMPLEMENTATION_UID)),
        _explicit(0x0002, 0x0013, b"SH", _text_bytes(PYNETDICOM_IMPLEMENTATION_VERSION)),
    ))
    return _explicit(0x0002, 0x0000, b"UL", struct.pack("<L", len(body))) + body


def _create_file_meta(sop_class_uid: Any = None, sop_instance_uid: Any = None, transfer_syntax: Any = None, **_: Any) -> bytes:
    """Stands in for ``create_file_meta`` in ``pynetdicom.dimse_messages``."""
    return encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax)


def _write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for ``write_file_meta_info`` in ``pynetdicom.dimse_messages``."""
    fp.write(file_meta)


def _status_of(result: Any) -> tuple[int, str | None]:
    if isinstance(result, int):
        return result, None
    if isinstance(result, Dataset) and "Status" in result:
        return int(result.Status), result.get("ErrorComment")
    return statuses.CANNOT_UNDERSTAND_PROCESSING, "handler returned no status"


def store_scp(self: StorageServiceClass, req: Any, context: Any) -> None:
    """Replaces ``StorageServiceClass.SCP``: the same steps (PS3.4 B.2.2:
    hand the request to the EVT_C_STORE handler, remove the temp file, send
    the response), with the response encoded by :func:`encode_store_response`
    and written to the socket by this (the association's) thread. Queued to
    pynetdicom's DUL thread it waited for that thread's next 1 ms poll; in
    state Sta6 sending a P-DATA-TF changes no state (PS3.8 9.2, action
    DT-1), and the peer sends nothing else while it awaits this response."""
    cx_id = int(context.context_id)
    try:
        result = evt.trigger(self.assoc, evt.EVT_C_STORE, {"request": req, "context": context.as_tuple})
    except Exception:
        log.exception("the C-STORE handler raised")
        result = statuses.CANNOT_UNDERSTAND_PROCESSING
    finally:
        tmp = getattr(req, "_dataset_file", None)
        if tmp is not None:
            tmp.close()
            try:
                os.unlink(tmp.name)
            except OSError:
                pass
    if not self.assoc.is_established:
        return
    status, comment = _status_of(result)
    command = encode_store_response(
        int(req.MessageID), req.AffectedSOPClassUID, req.AffectedSOPInstanceUID, status, comment
    )
    # P-DATA-TF PDU (PS3.8 9.3.5): one PDV item holding the whole command.
    pdv = struct.pack(">LB", len(command) + 2, cx_id) + COMMAND_LAST_FRAGMENT + command
    pdu = struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv
    self.assoc.dul.socket.send(pdu)


def _socket_ready(self: AssociationSocket) -> bool:
    """Replaces ``AssociationSocket.ready``: the same check, but a socket
    given a ``_ready_wait`` (see :func:`wait_for_data`) waits that long in
    ``select`` for data instead of answering at once."""
    if self.socket is None or self._is_connected is False:
        return False
    try:
        ready, _, _ = select.select([self.socket], [], [], getattr(self, "_ready_wait", 0))
    except (OSError, TimeoutError, ValueError):
        self.event_queue.put("Evt17")  # transport connection closed
        return False
    if isinstance(self.socket, ssl.SSLSocket):
        return bool(ready) or bool(self.socket.pending())
    return bool(ready)


def wait_for_data(assoc: Any, seconds: float = 0.001) -> None:
    """Let an association's DUL thread wait for the next PDU in ``select``
    instead of sleeping 1 ms between polls: it wakes when data arrives, so
    each C-STORE request is read at once rather than up to a millisecond
    later, at no more CPU than the sleeping poll."""
    dul = assoc.dul
    if dul.socket is not None:
        dul.socket._ready_wait = seconds
        dul._run_loop_delay = 0


class _ServeStoresAtOnce(queue.Queue):
    """Stands in for an acceptor association's ``dimse.msg_queue``: a
    complete C-STORE request is served by the thread that decoded it (the
    DUL thread) instead of waiting for the association thread's next 1 ms
    poll. Anything else is queued as before. The peer sends nothing while
    it waits for the response, so reading pauses at no cost."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, msg = item
        if isinstance(msg, C_STORE) and msg.MessageIDBeingRespondedTo is None and self._assoc.is_established:
            self._assoc._serve_request(msg, context_id)
            return
        super().put(item, block, timeout)


def serve_stores_at_once(assoc: Any) -> None:
    assoc.dimse.msg_queue = _ServeStoresAtOnce(assoc)


#: How often the association thread of a node's association looks for a
#: release or abort request, once C-STOREs no longer go through it.
ACCEPTOR_POLL_S = 0.005


class _AssociationClock:
    """Stands in for the ``time`` module inside ``pynetdicom.association``.

    The association thread polls every millisecond (``time.sleep(0.001)`` in
    ``Association._run_reactor``). With C-STORE requests served by the DUL
    thread (:class:`_ServeStoresAtOnce`) it is left watching for release and
    abort, and the profile showed its polling at about a seventh of the
    node's CPU with four associations. For the node's own acceptor
    associations (marked by :func:`slow_association_poll`) that poll sleeps
    :data:`ACCEPTOR_POLL_S`; every other sleep is untouched.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == 0.001 and getattr(threading.current_thread(), "_pacs_ai_slow_poll", False):
            seconds = ACCEPTOR_POLL_S
        time.sleep(seconds)


def slow_association_poll(assoc: Any) -> None:
    assoc._pacs_ai_slow_poll = True


def install() -> None:
    """Put the hand-encoded paths into pynetdicom (process-wide, idempotent)."""
    StorageServiceClass.SCP = store_scp  # type: ignore[method-assign]
    _association.time = _AssociationClock()  # type: ignore[attr-defined]
    AssociationSocket.ready = property(_socket_ready)  # type: ignore[assignment]
    _dimse_messages.create_file_meta = _create_file_meta  # type: ignore[assignment]
    _dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[assignment]
