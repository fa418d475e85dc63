"""The node: spool, journal, ingest processes and the completion tracker.

One listening socket is created here and shared by the ingest processes
(``ingest_processes`` > 1: children started with ``multiprocessing``'s spawn
method, each running a pynetdicom association server on that socket; 1: the
server runs in this process). FIELD-NOTES.md: one pynetdicom process is
bound to one core on large instances, and two processes accepting on one
socket balance better than SO_REUSEPORT.

The node process itself keeps the completion tracker, supervises the
ingest processes (one that dies is replaced, and its open associations are
closed in the journal so their studies can complete) and, on start, recovers
from whatever a crash left: temp files removed, associations closed,
unjournaled spool files adopted, open studies resumed.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread

from .completion import CompletionTracker, OnStudyComplete, log_completed_study
from .journal import InstanceRecord, Journal
from .scp import ScpConfig, configure_pynetdicom, make_server
from .spool import Spool
from .uids import InvalidUID, validate_uid

log = logging.getLogger(__name__)

_CLEAN_SHUTDOWN = "clean_shutdown"


def _ingest_process_main(
    cfg: ScpConfig,
    channel: socket.socket,
    address: Any,
    log_queue: Any,
    log_level: int,
    shutdown_grace: float,
) -> None:
    """Entry point of a child ingest process: it serves the connections the
    node passes over ``channel`` and exits when the node closes it (the node
    died: no orphan keeps serving) or sends SIGTERM. Its log records go to
    the node's handlers through ``log_queue``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    root.setLevel(log_level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node coordinates shutdown
    journal = Journal(Spool(cfg.spool).journal_path, synchronous=cfg.journal_synchronous)
    server = make_server(cfg, journal, address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signo, _frame: stop.set())
    server.serve_channel(channel, stop)
    _drain(server, grace=shutdown_grace)


def _drain(server: Any, grace: float) -> None:
    """Let open associations finish (a sender mid-study gets to release)."""
    deadline = time.monotonic() + grace
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    for assoc in server.active_associations:
        assoc.abort()


@dataclass
class _Child:
    """An ingest process, its end of the connection channel, and how many
    connections it holds."""

    proc: Any
    channel: socket.socket
    active: int = 0


class Node:
    """A running DICOM node."""

    def __init__(
        self,
        cfg: ScpConfig,
        *,
        bind: str = "0.0.0.0",
        port: int = 11112,
        study_idle_timeout: float = 5.0,
        study_max_wait: float = 3600.0,
        ingest_processes: int = 1,
        shutdown_grace: float = 10.0,
        on_study_complete: OnStudyComplete = log_completed_study,
    ) -> None:
        self.cfg = cfg
        self.bind = bind
        self.port = port
        self.ingest_processes = max(1, ingest_processes)
        self.shutdown_grace = shutdown_grace
        self.spool = Spool(cfg.spool)
        self.spool.prepare()
        self.journal = Journal(self.spool.journal_path, synchronous=cfg.journal_synchronous)
        self.tracker = CompletionTracker(
            self.journal,
            str(self.spool.root),
            idle_timeout=study_idle_timeout,
            max_wait=study_max_wait,
            on_study_complete=on_study_complete,
        )
        self._socket: socket.socket | None = None
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._children: list[_Child] = []
        self._children_lock = threading.Lock()
        self._dispatcher: threading.Thread | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._log_queue: Any = None
        self._log_listener: logging.handlers.QueueListener | None = None

    # -- recovery -----------------------------------------------------------
    def recover(self) -> None:
        closed = self.journal.close_stale_associations("node-restart")
        if closed:
            log.info("closed %d association(s) left open by an earlier run", closed)
        clean = self.journal.meta(_CLEAN_SHUTDOWN)
        if clean != "1":
            self.reconcile()
        self._set_clean(False)

    def _set_clean(self, clean: bool) -> None:
        self.journal.set_meta(_CLEAN_SHUTDOWN, "1" if clean else "0")

    def reconcile(self) -> int:
        """Journal spool files a crash left unjournaled (they were never
        acknowledged, but they are complete and fsynced: keeping them is
        free and makes the study whole if the sender does not resend)."""
        known = self.journal.known_paths()
        adopted = 0
        for path in self.spool.iter_instances():
            rel = str(path.relative_to(self.spool.root))
            if rel in known:
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True)
                study = validate_uid(ds.StudyInstanceUID)
                series = validate_uid(ds.SeriesInstanceUID)
                sop = validate_uid(ds.SOPInstanceUID)
                if self.spool.instance_relpath(study, series, sop) != rel:
                    raise InvalidUID("file name and UIDs disagree")
                self.journal.record_instance(
                    InstanceRecord(
                        study_uid=study,
                        series_uid=series,
                        sop_uid=sop,
                        sop_class_uid=validate_uid(ds.SOPClassUID),
                        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                        modality=str(ds.get("Modality", "") or "") or None,
                        path=rel,
                        size=path.stat().st_size,
                    ),
                    calling_ae=None,
                    peer_host=None,
                    assoc_id=None,
                )
                adopted += 1
            except Exception as exc:
                log.warning("spool file %s could not be adopted: %s", rel, type(exc).__name__)
        if adopted:
            log.info("adopted %d spool file(s) that an earlier run had not journaled", adopted)
        return adopted

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        self.recover()
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.bind, self.port))
        sock.listen(128)
        self._socket = sock
        self.port = sock.getsockname()[1]
        address = sock.getsockname()
        if self.ingest_processes == 1:
            self._server = make_server(self.cfg, self.journal, address, listen_socket=sock)
            self._server_thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                name="ingest", daemon=True,
            )
            self._server_thread.start()
        else:
            configure_pynetdicom(self.spool.tmp)
            self._children = [self._spawn(address) for _ in range(self.ingest_processes)]
            self._dispatcher = threading.Thread(target=self._dispatch, name="dispatch", daemon=True)
            self._dispatcher.start()
            self._supervisor = threading.Thread(target=self._supervise, args=(address,), name="supervisor", daemon=True)
            self._supervisor.start()
        self.tracker.start()
        log.info(
            "node %s listening on %s:%d (%s, %d ingest process%s), spool %s",
            self.cfg.ae_title, self.bind, self.port,
            "TLS" if self.cfg.tls_cert else "no TLS",
            self.ingest_processes, "" if self.ingest_processes == 1 else "es",
            self.spool.root,
        )

    def _spawn(self, address: Any) -> "_Child":
        ctx = multiprocessing.get_context("spawn")
        if self._log_queue is None:
            self._log_queue = ctx.Queue()
            self._log_listener = logging.handlers.QueueListener(
                self._log_queue, *logging.getLogger().handlers
            )
            self._log_listener.start()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = ctx.Process(
            target=_ingest_process_main,
            args=(self.cfg, theirs, address, self._log_queue, logging.getLogger().level, self.shutdown_grace),
            name="pacs-ai-ingest",
            daemon=True,
        )
        proc.start()
        theirs.close()
        ours.setblocking(False)
        return _Child(proc, ours)

    def _dispatch(self) -> None:
        """Accept every connection and pass it to the least busy ingest
        process (connections it has been given and not yet finished)."""
        assert self._socket is not None
        self._socket.settimeout(0.5)
        while not self._stopping.is_set():
            self._collect_finished()
            try:
                conn, addr = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            self._collect_finished()
            with self._children_lock:
                alive = [c for c in self._children if c.proc.is_alive()]
                child = min(alive, key=lambda c: c.active) if alive else None
                if child is not None:
                    try:
                        socket.send_fds(child.channel, [f"{addr[0]},{addr[1]}".encode()], [conn.fileno()])
                        child.active += 1
                    except OSError:
                        log.warning("could not pass a connection to ingest process %s", child.proc.pid)
            conn.close()

    def _collect_finished(self) -> None:
        with self._children_lock:
            for child in self._children:
                try:
                    while True:
                        data = child.channel.recv(64)
                        if not data:
                            break
                        child.active = max(0, child.active - len(data))
                except (BlockingIOError, OSError):
                    pass

    def _supervise(self, address: Any) -> None:
        while not self._stopping.wait(0.5):
            with self._children_lock:
                for i, child in enumerate(self._children):
                    if child.proc.is_alive() or self._stopping.is_set():
                        continue
                    log.error(
                        "ingest process %s exited with %s; starting another",
                        child.proc.pid, child.proc.exitcode,
                    )
                    try:
                        self.journal.close_stale_associations("ingest-process-died", pid=child.proc.pid)
                    except Exception:
                        log.exception("could not close the dead process's associations")
                    child.channel.close()
                    self._children[i] = self._spawn(address)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let open associations finish, stop the tracker."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        grace = self.shutdown_grace if grace is None else grace
        if self._server is not None:
            import socketserver

            # Stops serve_forever; the listening socket is closed below.
            socketserver.BaseServer.shutdown(self._server)
            _drain(self._server, grace)
        if self._dispatcher is not None:
            self._dispatcher.join(2)
        for child in self._children:
            if child.proc.is_alive() and child.proc.pid:
                os.kill(child.proc.pid, signal.SIGTERM)
        for child in self._children:
            child.proc.join(grace + 5)
            if child.proc.is_alive():
                child.proc.kill()
                child.proc.join(5)
            child.channel.close()
        if self._supervisor is not None:
            self._supervisor.join(2)
        if self._socket is not None:
            self._socket.close()
        self.tracker.stop()
        if self._log_listener is not None:
            self._log_listener.stop()
        try:
            self.journal.close_stale_associations("node-stopped")
            self._set_clean(True)
        except Exception:
            log.exception("could not mark a clean shutdown")
        log.info("node stopped")

    def wait(self) -> None:
        """Block until SIGINT/SIGTERM, then stop cleanly."""
        done = threading.Event()

        def on_signal(_signo: int, _frame: Any) -> None:
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not done.wait(1.0):
            pass
        log.info("stopping: no new associations, finishing open ones")
        self.stop()
