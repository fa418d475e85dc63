"""The long-running commands: ``pacs-ai node``, ``pacs-ai run`` and ``pacs-ai worker``
(DESIGN.md section 3).

- ``node``: the DICOM node (SCP, completion, journal), the dispatcher that queues complete
  studies, and a child Celery worker on the ``delivery`` queue (delivery writes the journal,
  so it runs on the node host).
- ``run``: the same plus a child Celery worker on the ``inference`` queue, on the embedded
  broker unless ``queue.broker_url`` says otherwise: one command on one machine.
- ``worker``: a Celery worker in this process, ``inference`` queue by default, the solo pool
  (one study at a time; one process per GPU, where the CUDA context is made in this process
  and never before a fork).

Children are ``pacs-ai worker`` processes with the parent's configuration; one that dies is
started again. SIGTERM or Ctrl-C: the node stops accepting associations and lets open ones
finish, then each worker gets SIGTERM, which in Celery is a warm shutdown (the study in hand
is finished). What is still unfinished after the grace time is in the journal and is queued
again by the next start.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .settings import Settings

log = logging.getLogger("pacs_ai.services")


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, even by kill -9 (Linux
    prctl PR_SET_PDEATHSIG), so that no orphan worker keeps taking messages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class WorkerChild:
    """A supervised ``pacs-ai worker`` subprocess."""

    def __init__(self, queues: str, forward: list[str], env: dict[str, str] | None = None) -> None:
        self.queues = queues
        self.argv = [sys.executable, "-m", "study_queue.cli", "worker", "--queues", queues, *forward]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        # Its own session: Ctrl-C at a terminal reaches the parent only, which stops the
        # children in order.
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        log.info("started worker for queue(s) %s (pid %d)", self.queues, self.proc.pid)

    def check(self) -> None:
        """Start it again if it died."""
        if self.proc is not None and self.proc.poll() is not None:
            log.error("worker for %s (pid %d) exited with %s; starting another",
                      self.queues, self.proc.pid, self.proc.returncode)
            self.restarts += 1
            time.sleep(min(5.0, 0.5 * self.restarts))
            self.start()

    def stop(self, grace: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("worker for %s did not stop in %.0f s; killing it (its study is queued again at start)",
                        self.queues, grace)
            self.proc.kill()
            self.proc.wait(10)


def stop_signal() -> threading.Event:
    """An event set by SIGTERM or SIGINT. Installed before the node starts listening: a
    signal that comes while it starts is a clean stop, not the default kill."""
    done = threading.Event()

    def on_signal(_signo: int, _frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return done


def serve_node(settings: Settings, node: Any, forward: list[str], inference: bool,
               done: threading.Event | None = None) -> int:
    """Run the (started) node with its dispatcher and worker children until ``done``
    (SIGTERM/SIGINT)."""
    from .celery_app import make_app
    from .dispatch import Dispatcher

    app = make_app(settings)
    dispatcher = Dispatcher(settings, node.journal, app, node.spool.root)
    node.tracker.on_study_complete = dispatcher.on_study_complete
    children = [WorkerChild("delivery", forward)]
    if inference:
        children.append(WorkerChild("inference", forward))
    if done is None:
        done = stop_signal()
    for child in children:
        child.start()
    dispatcher.start()
    # -- HTTP: /metrics, /healthz, /readyz and the status page (study_queue.web) -----------------
    from .web import Check, start_node_http

    http = start_node_http(settings, node.journal, app, node.spool.root, checks=[
        Check("workers", lambda: _children_problem(children)),
        Check("node", lambda: "stopping" if done.is_set() else None),
    ])
    # -- end HTTP --------------------------------------------------------------------------------
    log.info("%s ready: broker %s, delivery to %s", "pacs-ai run" if inference else "pacs-ai node",
             "embedded (spool/queue)" if not settings.queue.broker_url else _broker_host(settings.queue.broker_url),
             settings.delivery.return_to)
    while not done.wait(1.0):
        for child in children:
            child.check()
    log.info("stopping: no new associations, finishing open ones and the studies in hand")
    node.stop()
    dispatcher.stop()
    for child in children:
        child.stop(grace=max(30.0, settings.node.shutdown_grace))
    if http is not None:  # last: /readyz says "stopping" while the rest drains
        http.stop()
    log.info("stopped")
    return 0


def _children_problem(children: list[WorkerChild]) -> str | None:
    """The node's readiness check of its worker children (None: all running)."""
    dead = [f"{c.queues} (exit status {c.proc.returncode if c.proc is not None else 'none'})"
            for c in children if c.proc is None or c.proc.poll() is not None]
    return f"worker child not running, being restarted: {', '.join(dead)}" if dead else None


def _broker_host(url: str) -> str:
    """The broker's scheme and host, never its password."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def serve_worker(settings: Settings, queues: list[str], concurrency: int, loglevel: str) -> int:
    """A Celery worker in this process until SIGTERM (warm shutdown)."""
    from .celery_app import INFERENCE_QUEUE, make_app

    app = make_app(settings)
    # -- HTTP: an inference worker's /metrics, /healthz, /readyz (study_queue.web) ---------------
    # A delivery-only worker (the node's child) serves nothing: its work is in the journal,
    # which the node's /metrics reads. With prefork, the pool's processes count into files
    # that /metrics merges (prometheus-client's multi-process mode, set before it is imported).
    http = None
    metrics_dir = None
    if INFERENCE_QUEUE in queues and settings.http.worker_port:
        if concurrency > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            import tempfile

            metrics_dir = tempfile.mkdtemp(prefix="pacs-ai-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        from .web import start_worker_http

        http = start_worker_http(settings, app, Path(settings.node.spool).resolve(), models=concurrency == 1)
    # -- end HTTP --------------------------------------------------------------------------------
    if INFERENCE_QUEUE in queues and concurrency == 1:
        # The solo pool runs tasks in this process: load the engines now, so the first study
        # does not wait for them (with prefork they load in each child, after the fork).
        from .worker import loaded_models

        loaded_models(settings)
    worker = app.Worker(
        hostname=f"{'+'.join(queues)}-{os.getpid()}@{socket.gethostname()}",
        queues=queues,
        pool_cls="solo" if concurrency == 1 else "prefork",
        concurrency=concurrency,
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        optimization="fair",
        quiet=True,
    )
    try:
        worker.start()
    finally:
        if http is not None:
            http.stop()
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)
    return int(worker.exitcode or 0)
