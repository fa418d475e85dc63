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


def serve_node(settings: Settings, node: Any, forward: list[str], inference: bool) -> int:
    """Run the (started) node with its dispatcher and worker children until SIGTERM/SIGINT."""
    from .celery_app import make_app
    from .dispatch import Dispatcher

    app = make_app(settings)
    dispatcher = Dispatcher(settings, node.journal, app, node.spool.root)
    node.tracker.on_study_complete = dispatcher.on_study_complete
    children = [WorkerChild("delivery", forward)]
    if inference:
        children.append(WorkerChild("inference", forward))
    done = threading.Event()

    def on_signal(_signo: int, _frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for child in children:
        child.start()
    dispatcher.start()
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
    log.info("stopped")
    return 0


def _broker_host(url: str) -> str:
    """The broker's scheme and host, never its password."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def serve_worker(settings: Settings, queues: list[str], concurrency: int, loglevel: str) -> int:
    """A Celery worker in this process until SIGTERM (warm shutdown)."""
    from .celery_app import INFERENCE_QUEUE, make_app

    app = make_app(settings)
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
    worker.start()
    return int(worker.exitcode or 0)
