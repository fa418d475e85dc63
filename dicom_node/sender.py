"""The DICOM sender: C-ECHO and C-STORE to a peer (``pacs-ai echo``, ``pacs-ai send``).

``echo`` checks that a peer answers the Verification Service (PS3.4 Annex A,
C-ECHO in PS3.7 Section 9.1.5). ``send_paths`` stores files and folders on a
peer with the Storage Service (PS3.4 Annex B, C-STORE in PS3.7 Section
9.1.1): only each file's File Meta Information (PS3.10 Section 7.1) is read,
to learn its SOP Class and Transfer Syntax; presentation contexts are
proposed for what is present (PS3.8 Section 9.3.2.2: at most 128 per
association, so more go on several associations); and each data set is sent
as the bytes already in the file, not decoded, whenever the peer accepted the
file's own transfer syntax (otherwise a native little-endian data set is
decoded and re-encoded by pynetdicom into the syntax the peer accepted).

An instance counts as sent only when the peer answered its C-STORE with a
Success or Warning status (PS3.7 Annex C). Anything else is a failure,
"no answer" included.

The lost C-STORE response (pynetdicom 3.0.4)
--------------------------------------------
Symptom (FIELD-NOTES.md): a pynetdicom sender sometimes stalls until its
DIMSE timeout in the middle of a series, then aborts; never when it pauses
between sends. Reproduced on this machine with plain pynetdicom sending
back-to-back to ``storescp``: 2 of 30 runs of 300 CT images lost a response,
and 4 of 80 runs with TCP_NODELAY on; every loss came with pynetdicom's
warning "Received unexpected C-STORE service message".

Cause: two threads read the same queue of received DIMSE messages, and the
handshake meant to keep one of them out reads a stale flag.

- The requestor's ``Association`` thread loops in ``_run_reactor``
  (pynetdicom/association.py lines 713-731): ``self._is_paused = True``;
  ``self._reactor_checkpoint.wait()``; ``self._is_paused = False``;
  ``self.dimse.get_msg(block=False)``; whatever it takes off the queue goes
  to ``_serve_request``.
- ``send_c_store`` (association.py lines 1958-1967) pauses that thread with
  ``self._reactor_checkpoint.clear()`` and ``while not self._is_paused:
  sleep``, sends the request, blocks in ``self.dimse.get_msg(block=True)``
  (dimse.py line 221: a plain ``queue.Queue.get``, so whoever asks first gets
  the message), and at the end calls ``self._reactor_checkpoint.set()``.
- ``set()`` wakes the reactor, but ``_is_paused`` stays ``True`` until that
  thread is actually scheduled and runs line 725. When the caller starts the
  next C-STORE at once (file in the page cache, GIL busy, two cores shared
  with the peer), ``clear()`` and the check pass on the *old* ``True``: the
  caller believes the reactor is paused while it is about to return from
  ``wait()``. The reactor then makes one ``get_msg(block=False)``; if the
  C-STORE-RSP has just been queued by the DUL thread (dimse.py line 300) and
  the caller has not yet woken from its blocking ``get``, the reactor takes
  it. ``_serve_request`` finds no request in it, logs "Received unexpected
  C-STORE service message" and drops it (association.py lines 3508-3510). The
  caller waits out ``dimse_timeout``, and ``_handle_no_response`` aborts the
  association (association.py lines 511-522). The same thread can also take
  the ``(None, None)`` the DUL queues when the peer aborts or the connection
  drops (fsm.py lines 858 and 894, actions AA-3 and AA-4), turning a prompt
  failure into a full timeout. Waiting between sends lets the reactor reach
  ``wait()`` again first, which is why pauses hid the bug.

Workaround (``_ResponseWaiter``): on every association opened here,
``assoc.dimse.get_msg`` is replaced by an object that (1) gives the
association's own reactor thread nothing, so the thread that sent a request
is the only reader of responses (a Storage or Verification SCU is never sent
DIMSE requests by its peer: PS3.7 Section 9.1, and no SCP/SCU role selection
is proposed, PS3.7 Annex D.3.3.4), and (2) waits for the response in short
slices, returning at once when the association has gone idle (state Sta1,
PS3.8 Section 9.2) or its DUL thread has died, instead of sleeping out the
whole timeout. Under the same load: 0 lost, 0 resent in 120 runs (36,000
instances).

Belt and braces, since a peer can lose a response too: a C-STORE without a
response within ``timeout``, or whose association ends first, or whose
response names another Message ID (PS3.7 Section 9.3.1.2), is not counted.
The association is aborted, a new one opened, and that instance sent again,
at most ``MAX_ATTEMPTS`` times in all. Sending a SOP Instance again is safe:
storage SCPs keep one copy per SOP Instance UID (DESIGN.md section 10 for
our node). After the last attempt the instance is reported as failed with
status ``None`` and a reason, never as sent.

Also measured: pynetdicom leaves Nagle's algorithm on, so each C-STORE waits
for the peer's delayed ACK (about 40 ms): 21 small instances/s to
``storescp``. Sockets opened here get ``TCP_NODELAY``: 279/s.

Privacy: log lines and exception texts carry destinations, counts and
statuses; SOP Instance UIDs at debug level only; nothing from the data sets.
pynetdicom's identifier logging is switched off.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TextIO

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from . import statuses
from .errors import PacsRejected, PacsUnavailable, describe_reject
from .statuses import SUCCESS

log = logging.getLogger(__name__)

DEFAULT_CALLING_AE = "PACS_AI"

#: PS3.8 Section 9.3.2.2: presentation context IDs are odd numbers 1-255.
MAX_CONTEXTS_PER_ASSOCIATION = 128

#: Sends of one instance, the first included, before its outcome is given up
#: as unknown (reported as a failure).
MAX_ATTEMPTS = 3

#: How often a waiting sender looks whether its association is still alive.
_WAIT_SLICE_S = 0.05

_AE_TITLE_MAX = 16  # PS3.5 Table 6.2-1, VR AE

# Transfer syntaxes whose data sets pynetdicom can re-encode into one another
# (same endianness, not encapsulated): PS3.5 Section 10 and Annex A.
_NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)


# --------------------------------------------------------------------------
# Destinations


@dataclass(frozen=True)
class Destination:
    """A peer AE: its AE title and where it listens."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def validate_ae_title(text: str, what: str = "AE title") -> str:
    """Return ``text`` as an AE title, or raise ValueError naming the rule.

    PS3.5 Table 6.2-1: at most 16 characters of the default character
    repertoire, no backslash and no control characters; leading and trailing
    spaces are not significant, so they are removed (and an all-space title
    is empty).
    """
    title = text.strip(" ")
    bad = [c for c in title if c == "\\" or not (0x20 <= ord(c) < 0x7F)]
    if not 1 <= len(title) <= _AE_TITLE_MAX or bad:
        raise ValueError(
            f"{what} {text!r} must be 1-{_AE_TITLE_MAX} printable ASCII characters "
            "without backslash or control characters (PS3.5 Table 6.2-1)"
        )
    return title


def parse_destination(text: str) -> Destination:
    """Parse ``AE@HOST:PORT`` (IPv6 as ``AE@[::1]:104``) into a Destination.

    Raises ValueError with a one-line message naming the rule that was broken.
    """
    ae_part, at, address = text.rpartition("@")
    if not at:
        raise ValueError(f"destination {text!r} must be AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    ae_title = validate_ae_title(ae_part)
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"destination {text!r}: an IPv6 address is written [ADDRESS]:PORT")
        port_text = rest[1:]
    else:
        host, colon, port_text = address.rpartition(":")
        if not colon:
            raise ValueError(f"destination {text!r} must be AE@HOST:PORT: the port is missing")
        if ":" in host:
            raise ValueError(f"destination {text!r}: an IPv6 address is written in brackets, AE@[::1]:104")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"destination {text!r}: the host is empty or has spaces")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"destination {text!r}: the port {port_text!r} must be a number from 1 to 65535")
    return Destination(ae_title=ae_title, host=host, port=int(port_text))


# --------------------------------------------------------------------------
# Associations


def _configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings this module relies on.

    Identifier logging off (DESIGN.md section 9: no patient data in logs), and
    C-STORE from a file path sends the file's encoded data set in PDU-sized
    chunks instead of decoding it (``STORE_SEND_CHUNKED_DATASET``): the bytes
    the peer receives are the bytes in the file.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.STORE_SEND_CHUNKED_DATASET = True


def _set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: send each PDU at once (Nagle off).

    With Nagle on, the data set PDU after a small command PDU waits for the
    peer's delayed ACK, about 40 ms per C-STORE (see the module docstring).
    """
    try:
        sock = event.assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # TLS wrappers or a closed socket: keep going
        log.debug("could not set TCP_NODELAY", exc_info=True)


def guard_responses(assoc: Association) -> None:
    """Make the thread that sends requests on ``assoc`` the only reader of
    its responses (see :class:`_ResponseWaiter`); for any pynetdicom SCU
    association, tests included, that sends back to back."""
    _ResponseWaiter(assoc)


class _ResponseWaiter:
    """Stands in for ``assoc.dimse.get_msg`` on an association we requested.

    Why it exists is in the module docstring: pynetdicom's association thread
    can take a DIMSE response off the queue meant for the thread that sent
    the request, and drop it. This object (1) gives that thread nothing, so
    the requesting thread is the only reader, and (2) waits for a response in
    slices, returning ``(None, None)`` as soon as the association is gone
    instead of after the full DIMSE timeout. It remembers the last message
    handed out so the caller can check the Message ID it answers.
    """

    def __init__(self, assoc: Association) -> None:
        self._assoc = assoc
        self._queue = assoc.dimse.msg_queue
        self.last_message = None
        assoc.dimse.get_msg = self  # type: ignore[method-assign]

    def __call__(self, block: bool = False):
        if threading.current_thread() is self._assoc:
            # The association's own reactor: a pure SCU has no requests to
            # serve, and anything it took would be lost.
            return None, None
        timeout = self._assoc.dimse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                if not block:
                    item = self._queue.get(block=False)
                else:
                    left = _WAIT_SLICE_S if deadline is None else min(_WAIT_SLICE_S, deadline - time.monotonic())
                    item = self._queue.get(block=True, timeout=max(left, 0.0))
            except queue.Empty:
                if not block or (deadline is not None and time.monotonic() >= deadline):
                    return None, None
                if self._association_gone():
                    # One last look: a response queued just before the end.
                    try:
                        item = self._queue.get(block=False)
                    except queue.Empty:
                        return None, None
                else:
                    continue
            self.last_message = item[1]
            return item

    def _association_gone(self) -> bool:
        dul = self._assoc.dul
        return (not dul.is_alive()) or dul.state_machine.current_state == "Sta1"


def _make_ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    # The idle timer must not fire before a slow C-STORE response is due.
    ae.network_timeout = max(60.0, 2 * timeout)
    return ae


def _associate(
    ae: AE, dest: Destination, contexts: list[PresentationContext], timeout: float
) -> tuple[Association, _ResponseWaiter]:
    """Open an association (PS3.8 Section 7.1) or raise PacsUnavailable/PacsRejected."""
    opened = threading.Event()

    def on_open(event: evt.Event) -> None:
        opened.set()
        _set_tcp_nodelay(event)

    try:
        assoc = ae.associate(
            dest.host,
            dest.port,
            contexts=contexts,
            ae_title=dest.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
        )
    except OSError as exc:  # socket.gaierror: the host name does not resolve
        raise PacsUnavailable(f"cannot resolve host {dest.host!r} of {dest}: {exc.strerror or exc}") from exc

    if assoc.is_established:
        return assoc, _ResponseWaiter(assoc)

    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        words = describe_reject(answer.result, answer.result_source, answer.diagnostic)
        raise PacsRejected(
            f"{dest} rejected the association: {words}",
            result=answer.result,
            source=answer.result_source,
            reason=answer.diagnostic,
        )
    if answer is not None and answer.result == 0x00:
        raise PacsRejected(
            f"{dest} accepted the association but none of the {len(contexts)} proposed "
            "presentation contexts (PS3.8 Section 9.3.3.2)"
        )
    if not opened.is_set():
        raise PacsUnavailable(
            f"cannot connect to {dest}: connection refused, unreachable or no answer within {timeout:g} s"
        )
    raise PacsUnavailable(f"{dest} aborted the association request or did not answer it within {timeout:g} s")


def _close(assoc: Association, abort: bool = False) -> None:
    """Release the association (PS3.8 Section 7.2), or abort it (Section 7.3).

    Abort when asked (we were interrupted, maybe with a request in flight,
    where an orderly release is not possible) or when the release fails.
    """
    try:
        if assoc.is_established and not abort:
            assoc.release()
        if assoc.is_established:
            assoc.abort()
    except Exception:  # closing is best effort: the outcome is already known
        log.debug("error while closing the association", exc_info=True)
        try:
            assoc.abort()
        except Exception:
            pass


# --------------------------------------------------------------------------
# C-ECHO


def echo(dest: Destination, calling_ae: str = DEFAULT_CALLING_AE, timeout: float = 10.0) -> float:
    """Send one C-ECHO to ``dest`` and return its round trip in seconds.

    The Verification Service (PS3.4 Annex A; C-ECHO, PS3.7 Section 9.1.5)
    proves that the peer knows our AE title and answers DIMSE. Raises
    PacsUnavailable when the peer cannot be reached or does not answer, and
    PacsRejected when it refuses the association or answers with a status
    other than Success.
    """
    _configure_pynetdicom()
    ae = _make_ae(calling_ae, timeout)
    contexts = [build_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    assoc, _waiter = _associate(ae, dest, contexts, timeout)
    done = False
    try:
        start = time.perf_counter()
        status = assoc.send_c_echo(msg_id=1)
        elapsed = time.perf_counter() - start
        done = True
    finally:
        _close(assoc, abort=not done)
    if "Status" not in status:
        raise PacsUnavailable(f"{dest} did not answer the C-ECHO (nothing within {timeout:g} s, or it aborted)")
    if status.Status != SUCCESS:
        raise PacsRejected(f"{dest} answered the C-ECHO with status 0x{status.Status:04X}")
    log.info("C-ECHO to %s answered in %.1f ms", dest, elapsed * 1000)
    return elapsed


# --------------------------------------------------------------------------
# C-STORE: what is sent and what came back

# PS3.7 Annex C and PS3.4 Section B.2.3 (Table B.2-1): C-STORE statuses.
_STATUS_NAMES = {
    SUCCESS: "Success",
    0x0001: "Warning: Requested optional attributes are not supported",
    0x0107: "Warning: Attribute list error",
    0x0110: "Failure: Processing failure",
    0x0117: "Failure: Invalid SOP instance",
    0x0122: "Refused: SOP Class not supported",
    0x0124: "Refused: Not authorized",
    0x0210: "Failure: Duplicate invocation",
    0x0211: "Failure: Unrecognized operation",
    0x0212: "Failure: Mistyped argument",
    0x0213: "Failure: Resource limitation",
    statuses.OUT_OF_RESOURCES: "Refused: Out of Resources",
    statuses.DATA_SET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    0xC000: "Error: Cannot understand",
    0xB000: "Warning: Coercion of Data Elements",
    0xB006: "Warning: Elements Discarded",
    0xB007: "Warning: Data Set does not match SOP Class",
}
_STATUS_RANGES = (
    (0xA700, 0xA7FF, "Refused: Out of Resources"),
    (0xA900, 0xA9FF, "Error: Data Set does not match SOP Class"),
    (0xC000, 0xCFFF, "Error: Cannot understand"),
    (0xB000, 0xBFFF, "Warning"),
)


def status_name(status: int | None) -> str:
    """Words for a C-STORE status (PS3.4 Table B.2-1, PS3.7 Annex C)."""
    if status is None:
        return "no response"
    if status in _STATUS_NAMES:
        return _STATUS_NAMES[status]
    for low, high, name in _STATUS_RANGES:
        if low <= status <= high:
            return name
    return "Failure"


def status_category(status: int | None) -> str:
    """``success``, ``warning`` or ``failure`` for a C-STORE response status.

    PS3.7 Annex C (via :func:`dicom_node.statuses.status_category`): Success
    and Warning mean the instance was stored. Everything else is a failure:
    Pending and Cancel too, since a C-STORE has neither, and no response.
    """
    if status is None:
        return "failure"
    category = statuses.status_category(status)
    return category if category in ("success", "warning") else "failure"


@dataclass
class InstanceOutcome:
    """What happened to one file that was to be sent."""

    path: Path
    #: From the File Meta Information, (0002,0003).
    sop_instance_uid: str = ""
    #: The peer's C-STORE status; None when no response was received.
    status: int | None = None
    #: ``success``, ``warning`` or ``failure``.
    category: str = "failure"
    #: (0000,0902) Error Comment from the peer's response, if any.
    error_comment: str = ""
    #: Why it failed when the peer gave no status (our words), else "".
    reason: str = ""
    #: How many times a C-STORE request was sent for it.
    attempts: int = 0
    nbytes: int = 0

    @property
    def sent(self) -> bool:
        return self.category in ("success", "warning")


@dataclass
class SkippedFile:
    """A file that was not sent, and why (not DICOM, a DICOMDIR, unreadable)."""

    path: Path
    reason: str


@dataclass
class SendReport:
    """The outcome of :func:`send_paths`."""

    destination: Destination
    outcomes: list[InstanceOutcome] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    elapsed_s: float = 0.0
    associations: int = 0
    #: C-STORE requests sent again after a lost response or a lost association.
    resends: int = 0

    @property
    def statuses(self) -> dict[Path, int | None]:
        """Per file: the peer's status, or None when none was received."""
        return {o.path: o.status for o in self.outcomes}

    @property
    def counts(self) -> dict[str, int]:
        """Files per status category: ``success``, ``warning``, ``failure``."""
        counts = Counter(o.category for o in self.outcomes)
        return {k: counts.get(k, 0) for k in ("success", "warning", "failure")}

    @property
    def sent(self) -> int:
        return sum(1 for o in self.outcomes if o.sent)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if not o.sent)

    @property
    def ok(self) -> bool:
        """True when every file found was stored (skipped files aside)."""
        return self.failed == 0

    @property
    def error_comments(self) -> list[str]:
        """The distinct Error Comments the peer returned, in order."""
        return list(dict.fromkeys(o.error_comment for o in self.outcomes if o.error_comment))

    @property
    def bytes_sent(self) -> int:
        return sum(o.nbytes for o in self.outcomes if o.sent)

    @property
    def instances_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def megabytes_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class _Item:
    """A file to send, with what its File Meta Information says."""

    outcome: InstanceOutcome
    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID

    @property
    def path(self) -> Path:
        return self.outcome.path


# --------------------------------------------------------------------------
# Finding the files


def _walk(paths: Iterable[str | os.PathLike[str]]) -> Iterable[Path]:
    """Files named, and files under folders named (recursively, sorted)."""
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def _inspect(path: Path) -> _Item | str:
    """Read only the File Meta Information (PS3.10 Section 7.1) of ``path``.

    Returns an _Item, or the reason the file is skipped.
    """
    try:
        if not path.is_file():  # a FIFO or device would block or never end
            return "not a regular file" if path.exists() else "cannot be read (no such file)"
        meta = read_file_meta_info(path)
        nbytes = path.stat().st_size
    except InvalidDicomError:
        return "not a DICOM file (no 'DICM' prefix, PS3.10 Section 7.1)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    except Exception as exc:  # pydicom raises many types for a damaged header
        return f"File Meta Information cannot be parsed ({type(exc).__name__})"
    missing = [
        tag
        for tag, keyword in (
            ("(0002,0002)", "MediaStorageSOPClassUID"),
            ("(0002,0003)", "MediaStorageSOPInstanceUID"),
            ("(0002,0010)", "TransferSyntaxUID"),
        )
        if not str(meta.get(keyword, "") or "").strip("\x00 ")
    ]
    if missing:
        return "File Meta Information lacks " + ", ".join(missing)
    sop_class = UID(str(meta.MediaStorageSOPClassUID).strip("\x00 "))
    if sop_class == MediaStorageDirectoryStorage:
        return "a DICOMDIR (PS3.10 Section 8.2), not an instance to store"
    sop_instance = UID(str(meta.MediaStorageSOPInstanceUID).strip("\x00 "))
    return _Item(
        outcome=InstanceOutcome(path=path, sop_instance_uid=sop_instance, nbytes=nbytes),
        sop_class=sop_class,
        sop_instance=sop_instance,
        transfer_syntax=UID(str(meta.TransferSyntaxUID).strip("\x00 ")),
    )


def _scan(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[_Item], list[SkippedFile]]:
    items: list[_Item] = []
    skipped: list[SkippedFile] = []
    seen: set[str] = set()
    for path in _walk(paths):
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        found = _inspect(path)
        if isinstance(found, str):
            log.debug("skipping a file: %s", found)
            skipped.append(SkippedFile(path, found))
        else:
            items.append(found)
    return items, skipped


def _contexts_for(sop_class: UID, transfer_syntaxes: Iterable[UID]) -> list[PresentationContext]:
    """Presentation contexts to propose for files of one SOP Class.

    One context per transfer syntax present, holding only that syntax: an
    acceptor picks one syntax per context by its own preference (pynetdicom
    prefers Implicit VR), so a context offering several would often make the
    bytes in the file unusable as they are. Then, if any of the files is a
    native little-endian data set, one more context offering Explicit and
    Implicit VR Little Endian, which every Storage SCP supports (PS3.5
    Section 10.1, PS3.4 Section B.4.1) and into which such a data set can be
    re-encoded when the peer refuses its own syntax. Encapsulated
    (compressed) and big-endian data cannot be converted here.
    """
    syntaxes = list(dict.fromkeys(transfer_syntaxes))
    contexts = [build_context(sop_class, [ts]) for ts in syntaxes]
    if any(ts in _NATIVE_LITTLE_ENDIAN for ts in syntaxes):
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return contexts


def _plan(items: list[_Item]) -> list[tuple[list[PresentationContext], list[_Item]]]:
    """Group the items into associations of at most 128 presentation contexts
    (PS3.8 Section 9.3.2.2), keeping all contexts of a SOP Class together;
    items keep the order they were found in.
    """
    syntaxes: dict[UID, list[UID]] = {}
    for item in items:
        syntaxes.setdefault(item.sop_class, []).append(item.transfer_syntax)
    batches: list[tuple[list[PresentationContext], set[UID]]] = []
    for sop_class, found in syntaxes.items():
        # A SOP Class in more than 127 transfer syntaxes does not exist; cut anyway.
        wanted = _contexts_for(sop_class, found)[:MAX_CONTEXTS_PER_ASSOCIATION]
        if not batches or len(batches[-1][0]) + len(wanted) > MAX_CONTEXTS_PER_ASSOCIATION:
            batches.append(([], set()))
        batches[-1][0].extend(wanted)
        batches[-1][1].add(sop_class)
    return [(contexts, [i for i in items if i.sop_class in classes]) for contexts, classes in batches]


# --------------------------------------------------------------------------
# C-STORE


class _AssociationLost(Exception):
    """The C-STORE of one instance has no known outcome; try it again."""


class _Sender:
    """Sends the planned items over as few associations as it can."""

    def __init__(
        self,
        dest: Destination,
        calling_ae: str,
        timeout: float,
        report: SendReport,
        progress: Callable[[int, int], None] | None,
        total: int,
    ) -> None:
        self.dest = dest
        self.timeout = timeout
        self.report = report
        self.progress = progress
        self.total = total
        self.done = 0
        self.ae = _make_ae(calling_ae, timeout)

    def _finish(self, item: _Item) -> None:
        self.report.outcomes.append(item.outcome)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def _give_up(self, items: Iterable[_Item], exc: Exception) -> None:
        for item in items:
            if item.outcome.attempts:
                item.outcome.reason = f"sent without a response, then not again: {exc} (outcome unknown)"
            else:
                item.outcome.reason = f"not sent: {exc}"
            self._finish(item)

    def run(self, plan: list[tuple[list[PresentationContext], list[_Item]]]) -> None:
        for index, (contexts, items) in enumerate(plan):
            pending = deque(items)
            try:
                self._send_batch(contexts, pending)
            except (PacsUnavailable, PacsRejected) as exc:
                if self.report.associations == 0:
                    raise  # no association at all: one clear error for the caller
                rest = list(pending) + [i for _, later in plan[index + 1 :] for i in later]
                self._give_up(rest, exc)
                return

    def _send_batch(self, contexts: list[PresentationContext], pending: deque[_Item]) -> None:
        while pending:
            assoc, waiter = _associate(self.ae, self.dest, contexts, self.timeout)
            self.report.associations += 1
            done = False
            try:
                self._send_on(assoc, waiter, pending)
                done = True
            finally:
                _close(assoc, abort=not done)

    def _send_on(self, assoc: Association, waiter: _ResponseWaiter, pending: deque[_Item]) -> None:
        """Send pending items on one association until done or it is lost."""
        msg_id = 0
        while pending:
            item = pending[0]
            msg_id = msg_id % 65535 + 1
            try:
                self._store(assoc, waiter, item, msg_id)
            except _AssociationLost as exc:
                if item.outcome.attempts >= MAX_ATTEMPTS:
                    pending.popleft()
                    item.outcome.reason = f"{exc}; gave up after {item.outcome.attempts} attempts (outcome unknown)"
                    log.warning(
                        "C-STORE to %s: no outcome after %d attempts, counted as failed",
                        self.dest,
                        item.outcome.attempts,
                    )
                    self._finish(item)
                else:
                    self.report.resends += 1
                    log.warning("C-STORE to %s: %s; sending it again on a new association", self.dest, exc)
                if assoc.is_established:
                    assoc.abort()
                return
            pending.popleft()
            self._finish(item)
            if not assoc.is_established:  # aborted over an unreadable file
                return

    def _store(self, assoc: Association, waiter: _ResponseWaiter, item: _Item, msg_id: int) -> None:
        """One C-STORE (PS3.7 Section 9.1.1); fills item.outcome or raises _AssociationLost."""
        outcome = item.outcome
        if not assoc.is_established:
            outcome.attempts += 1
            raise _AssociationLost("the association ended before the C-STORE request")

        exact, convertible = _usable_contexts(assoc, item)
        if not exact and not convertible:
            outcome.reason = (
                f"the peer accepted no presentation context for {item.sop_class.name} "
                f"in {item.transfer_syntax.name} (PS3.8 Section 9.3.3.2)"
            )
            return
        if exact:
            payload: Path | Dataset = item.path  # the file's bytes as they are
        else:
            try:
                payload = dcmread(item.path)  # re-encoded by pynetdicom
            except Exception as exc:  # any decoding problem: this file only
                outcome.reason = f"cannot be decoded to re-encode it ({type(exc).__name__})"
                return

        outcome.attempts += 1
        waiter.last_message = None
        started = time.monotonic()
        try:
            status = assoc.send_c_store(payload, msg_id=msg_id)
        except OSError as exc:
            # Reading the file failed, possibly half-way through the data set:
            # the association cannot be trusted any more, the file is at fault.
            outcome.reason = f"cannot be read while sending ({exc.strerror or type(exc).__name__})"
            assoc.abort()
            return
        except (AttributeError, ValueError) as exc:
            outcome.reason = f"cannot be sent ({exc})"
            return
        except RuntimeError as exc:  # the association ended under us
            raise _AssociationLost("the association ended before the C-STORE request") from exc

        if "Status" not in status:
            if time.monotonic() - started >= self.timeout * 0.95:
                raise _AssociationLost(f"no C-STORE response within {self.timeout:g} s")
            raise _AssociationLost("the association ended before the C-STORE response")
        reply = waiter.last_message
        replied_to = getattr(reply, "MessageIDBeingRespondedTo", msg_id)
        if replied_to != msg_id:
            raise _AssociationLost(f"the C-STORE response answers message {replied_to}, not {msg_id}")

        outcome.status = int(status.Status)
        outcome.category = status_category(outcome.status)
        outcome.error_comment = str(status.get("ErrorComment", "") or "").strip()
        outcome.reason = ""
        log.debug(
            "C-STORE %s: status 0x%04X (%s)", item.sop_instance, outcome.status, status_name(outcome.status)
        )


def _usable_contexts(assoc: Association, item: _Item) -> tuple[bool, bool]:
    """(an accepted context takes the file's bytes as they are, one takes them re-encoded)."""
    exact = convertible = False
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != item.sop_class or not cx.as_scu:
            continue
        accepted = cx.transfer_syntax[0]
        if accepted == item.transfer_syntax:
            exact = True
        elif item.transfer_syntax in _NATIVE_LITTLE_ENDIAN and accepted in _NATIVE_LITTLE_ENDIAN:
            convertible = True
    return exact, convertible


def send_paths(
    paths: Iterable[str | os.PathLike[str]],
    dest: Destination,
    calling_ae: str = DEFAULT_CALLING_AE,
    timeout: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> SendReport:
    """C-STORE every DICOM file in ``paths`` (files, folders recursively) to ``dest``.

    Files without DICOM File Meta Information are skipped and listed with the
    reason. ``timeout`` bounds connecting, association negotiation and the
    wait for each C-STORE response. ``progress(done, total)`` is called once
    before the first send and after each file.

    Raises PacsUnavailable or PacsRejected when the first association cannot
    be established (nothing was sent). Once something was sent, trouble is
    reported per file instead: files that could not be sent any more are
    failures with a reason. A file counts as sent only on a Success or Warning
    response; one whose response never came after ``MAX_ATTEMPTS`` sends is a
    failure with status None.
    """
    started = time.monotonic()
    _configure_pynetdicom()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    items, skipped = _scan(paths)
    report = SendReport(destination=dest, skipped=skipped)
    if progress is not None:
        progress(0, len(items))
    try:
        if items:
            sender = _Sender(dest, calling_ae, timeout, report, progress, len(items))
            sender.run(_plan(items))
    finally:
        report.elapsed_s = time.monotonic() - started
    log.info(
        "C-STORE to %s: %d sent, %d failed, %d skipped in %.2f s over %d association(s), %d resent",
        dest,
        report.sent,
        report.failed,
        len(report.skipped),
        report.elapsed_s,
        report.associations,
        report.resends,
    )
    return report


# --------------------------------------------------------------------------
# For a person at a terminal


class ProgressBar:
    """A one-line progress bar on stderr, usable as ``progress(done, total)``.

    It draws only when its stream is a terminal, so logs, pipes and CI output
    stay clean; otherwise it prints nothing at all. Redraws are limited to
    about ten a second.
    """

    def __init__(self, label: str = "sending", stream: TextIO | None = None, min_interval: float = 0.1) -> None:
        self.label = label
        self._stream = stream
        self._min_interval = min_interval
        self._started = time.monotonic()
        self._last_draw = -math.inf
        self._drawn = False

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def enabled(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except (ValueError, OSError):  # closed stream
            return False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last_draw < self._min_interval:
            return
        self._last_draw = now
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        self.draw(done, total, f" {done}/{total} {rate:.0f}/s")

    def draw(self, done: int, total: int, text: str) -> None:
        """Redraw the line: the label, a bar ``done/total`` full, then ``text``."""
        width = shutil.get_terminal_size((80, 20)).columns
        bar_width = max(10, min(40, width - len(self.label) - len(text) - 4))
        filled = bar_width if total == 0 else int(bar_width * min(done, total) / total)
        line = f"{self.label} [{'#' * filled}{'.' * (bar_width - filled)}]{text}"
        self.stream.write("\r" + line[: width - 1].ljust(width - 1))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the line the bar was drawn on (if it was drawn)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def format_summary(report: SendReport) -> str:
    """A few lines for a person: sent, failed by status, skipped, speed."""
    counts = report.counts
    sent_line = f"{report.sent} sent to {report.destination}"
    if counts["warning"]:
        sent_line += f" ({counts['success']} success, {counts['warning']} with warnings)"
    sent_line += (
        f" in {report.elapsed_s:.2f} s: {report.instances_per_s:.1f} instances/s, "
        f"{report.megabytes_per_s:.1f} MB/s"
    )
    lines = [sent_line]
    if report.resends:
        lines.append(f"{report.resends} sent again after a lost response or association")
    warnings = Counter(o.status for o in report.outcomes if o.category == "warning")
    for status, n in sorted(warnings.items()):
        lines.append(f"  {n} warning 0x{status:04X} {status_name(status)}")
    if report.failed:
        lines.append(f"{report.failed} failed:")
        by_status = Counter(
            (o.status, o.reason if o.status is None else "") for o in report.outcomes if not o.sent
        )
        for (status, reason), n in by_status.most_common():
            if status is None:
                lines.append(f"  {n} without a status: {reason}")
            else:
                lines.append(f"  {n} 0x{status:04X} {status_name(status)}")
    comments = report.error_comments
    for comment in comments[:3]:
        lines.append(f"  peer said: {comment}")
    if len(comments) > 3:
        lines.append(f"  ... and {len(comments) - 3} more error comments")
    if report.skipped:
        reasons = Counter(s.reason for s in report.skipped)
        detail = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
        lines.append(f"{len(report.skipped)} skipped: {detail}")
    return "\n".join(lines)
