"""The Celery app of pacs-ai: two tasks, two queues, JSON only (DESIGN.md sections 3 and 5).

- ``study_queue.analyze`` on the ``inference`` queue: a worker loads the study from the
  shared spool, runs the models and writes the outputs (``study_queue.worker``).
- ``study_queue.deliver`` on the ``delivery`` queue: the node applies the result to the
  journal and C-STOREs the outputs to the PACS (``study_queue.delivery``).

Two brokers, one code path:

- ``queue.broker_url = "redis://..."`` (or ``rediss://`` with TLS): any number of workers on
  any number of hosts sharing the spool. Messages a worker took and did not acknowledge come
  back after ``queue.visibility_timeout``, which must be longer than the longest analysis.
- empty ``broker_url``: kombu's filesystem transport in ``<spool>/queue``, no server to run.
  Its messages survive a restart, but one a worker held when it was killed is gone
  (FIELD-NOTES.md): that is why the node's journal, not the broker, decides what still
  has to be done and queues it again (``study_queue.dispatch``).

Tasks are acknowledged late (after they ran), one message per worker at a time, and the
app accepts JSON only: a pickled message is refused before it is decoded, since anyone who
can write to the broker could otherwise run code in every worker.
"""
from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

from celery import Celery

from .settings import Settings

log = logging.getLogger("pacs_ai.queue")

ANALYZE = "study_queue.analyze"
DELIVER = "study_queue.deliver"
INFERENCE_QUEUE = "inference"
URGENT_QUEUE = "inference-urgent"  # studies of an urgent route: workers take these first
DELIVERY_QUEUE = "delivery"
QUEUES = (URGENT_QUEUE, INFERENCE_QUEUE, DELIVERY_QUEUE)
QUEUE_OF = {ANALYZE: INFERENCE_QUEUE, DELIVER: DELIVERY_QUEUE}
#: An inference worker's queues, in the order it serves them.
INFERENCE_QUEUES = (URGENT_QUEUE, INFERENCE_QUEUE)

QUEUE_DIR = "queue"  # under the spool: the embedded broker's messages


class BrokerUnavailable(Exception):
    """A message could not be handed to the broker (Redis down, spool unwritable)."""


def embedded_folders(spool_root: str | Path) -> dict[str, Path]:
    root = Path(spool_root).resolve() / QUEUE_DIR
    return {"messages": root / "messages", "processed": root / "processed", "control": root / "control"}


def broker_config(settings: Settings) -> dict[str, Any]:
    """The broker part of the Celery configuration for ``settings``."""
    q = settings.queue
    if not q.broker_url:
        folders = embedded_folders(settings.node.spool)
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return {
            "broker_url": "filesystem://localhost//",  # the host is unused; naming one keeps kombu quiet
            "broker_transport_options": {
                "data_folder_in": str(folders["messages"]),
                "data_folder_out": str(folders["messages"]),
                # A consumer claims a message by renaming it into ``processed``: on the same
                # file system that is atomic, so two workers never take the same message
                # (the default, the system's temp folder, may be another file system, where
                # the move is a copy). ``study_queue.dispatch`` prunes the folder.
                "store_processed": True,
                "processed_folder": str(folders["processed"]),
                "control_folder": str(folders["control"]),
                "polling_interval": 0.1,
            },
            # kombu's virtual transports take turns between queues (round robin); this
            # transport asks them in the order the worker lists them, so urgent comes first.
            "broker_transport": "study_queue.priority_transport:PriorityFilesystemTransport",
        }
    config: dict[str, Any] = {
        "broker_url": q.broker_url,
        "broker_transport_options": {
            "visibility_timeout": q.visibility_timeout,
            "socket_connect_timeout": 5,
            # BRPOP lists the queues in the worker's order instead of rotating them:
            # inference-urgent is always asked first.
            "queue_order_strategy": "priority",
        },
    }
    if q.broker_url.startswith("rediss://"):
        config["broker_use_ssl"] = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": q.tls_ca or None,
        }
    return config


def make_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings`` with both tasks registered."""
    app = Celery("pacs_ai", set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_routes={name: {"queue": queue} for name, queue in QUEUE_OF.items()},
        task_default_queue=INFERENCE_QUEUE,
        task_always_eager=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Publishing gives up after about a second: the node keeps the study in the journal
        # and tries again on its next sweep, rather than blocking while Redis is down.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.4, "interval_max": 0.5},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        **broker_config(settings),
    )
    from . import tasks

    tasks.register(app, settings)
    return app


def publish(app: Celery, task: str, message: dict) -> None:
    """Hand one task message to the broker, or raise :class:`BrokerUnavailable`. An analyze
    message of an urgent route goes to the urgent queue."""
    queue = URGENT_QUEUE if task == ANALYZE and message.get("priority") == "urgent" else QUEUE_OF[task]
    try:
        app.send_task(task, args=[message], queue=queue)
    except Exception as exc:  # kombu's OperationalError, redis' ConnectionError, OSError...
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
