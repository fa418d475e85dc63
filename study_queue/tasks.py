"""The two Celery tasks, thin on purpose (DESIGN.md section 2): each calls one plain function.

- ``study_queue.analyze(study)`` -> ``worker.analyze_study``, then publishes ``deliver`` with
  the result. If that publish fails the result stays in the spool and the node's dispatcher
  hands it to delivery itself.
- ``study_queue.deliver(result)`` -> ``delivery.Delivery.handle`` on the node host; a failed
  attempt comes back after its backoff through Celery's retry (a new message with a countdown).
"""
from __future__ import annotations

import logging
import threading

from celery import Celery

from .settings import Settings

log = logging.getLogger("pacs_ai.tasks")

_node_lock = threading.Lock()
_node_delivery = None


def _delivery(app: Celery, settings: Settings):
    """The node-side Delivery of this process (journal opened once)."""
    global _node_delivery
    with _node_lock:
        if _node_delivery is None:
            from dicom_node.journal import Journal
            from dicom_node.spool import Spool

            from .dispatch import Dispatcher

            spool = Spool(settings.node.spool)
            journal = Journal(spool.journal_path)
            _node_delivery = Dispatcher(settings, journal, app, spool.root).delivery
        return _node_delivery


def _observe(result: dict | None) -> None:
    """The worker's metrics of one analysis (``study_queue.metrics``; None: a dropped message).
    Counting must never fail the task it counts."""
    try:
        from . import metrics

        if result is None:
            metrics.observe_dropped()
        else:
            metrics.observe_result(result)
    except Exception:
        log.exception("metrics of an analysis not recorded")


def register(app: Celery, settings: Settings) -> None:
    from .celery_app import ANALYZE, DELIVER, BrokerUnavailable, publish

    @app.task(name=ANALYZE, bind=True, shared=False)  # this app only: its settings are in the closure
    def analyze(self, study):
        from .workdir import BadMessage
        from .worker import analyze_study

        try:
            result = analyze_study(settings, study)
        except BadMessage as exc:
            log.error("analyze message dropped: %s", exc)
            _observe(None)
            return None
        _observe(result)
        try:
            publish(app, DELIVER, result)
        except BrokerUnavailable as exc:
            log.error("study %s: result not handed to delivery (%s); the node picks it up from the spool",
                      result["study_key"], exc, extra={"study_key": result["study_key"]})
        return result["outcome"]

    @app.task(name=DELIVER, bind=True, shared=False)
    def deliver(self, result):
        from .delivery import safe_handle

        outcome = safe_handle(_delivery(app, settings), result)
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in, max_retries=None)
        return outcome.state
