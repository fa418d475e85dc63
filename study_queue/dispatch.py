"""The node's dispatcher: from the journal to the queue, and back when the queue loses something.

The journal, not the broker, is the source of truth (DESIGN.md section 4). A thread in the
node wakes when a study completes and at least every second, and:

- publishes ``analyze`` for every COMPLETE study, then journals it QUEUED. When the broker is
  down the study stays COMPLETE (nothing was acknowledged wrongly) and is published on a
  later sweep, when the broker is back.
- watches QUEUED studies through their work folder on the shared spool
  (``study_queue.workdir``): a finished ``result.json`` whose ``deliver`` never arrived is
  handed to delivery again; a heartbeat older than ``queue.stale_after`` is an analysis whose
  worker died (kill -9, power): the attempt is counted and the study queued again, FAILED
  after ``queue.max_attempts``; a study no worker has started within ``queue.stale_after``
  is published again without counting an attempt (the message may be lost, or every worker
  is down: that is no fault of the study).
- publishes ``deliver`` again for an ANALYZED study whose delivery has not moved for
  ``queue.stale_after`` plus its current backoff (a delivery worker killed while it held a
  retry).

Every message is idempotent (the worker finds ``result.json`` and does not compute again;
delivery ignores results for a run or state the study has left), so publishing twice is
safe; losing one is not.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from dicom_node.completion import CompletedStudy
from dicom_node.journal import ANALYZED, COMPLETE, IGNORED, QUEUED, IllegalTransition, Journal, Study

from .celery_app import ANALYZE, DELIVER, BrokerUnavailable, embedded_folders, publish
from .delivery import Delivery, NoDestination, backoff, destination_for
from .retention import expire
from .routing import choose, study_facts
from .settings import Settings
from .workdir import WorkDir

log = logging.getLogger("pacs_ai.dispatch")

PROCESSED_KEEP_S = 3600.0  # claimed embedded-broker messages are kept this long, for a look


def route_for(settings: Settings, journal: Journal, study: Study, spool_root: Path):
    """(the route that takes the study, or None; why it is not analysed, or None)."""
    if not settings.routes:
        return None, None
    series = journal.series(study.study_key)
    facts = study_facts(spool_root, study.study_uid, study.calling_ae, series,
                        {s["series_uid"]: s["sample"] for s in series if s.get("sample")})
    route = choose(settings.routes, facts)
    if route is None:
        return None, "no [[routes]] entry matched"
    if route.action == "ignore":
        return route, f"route {route.name or '(unnamed)'}: ignore"
    return route, None


def analyze_message(settings: Settings, journal: Journal, study: Study, spool_root: Path) -> dict:
    """The ``analyze(study)`` message of DESIGN.md section 5 for the study's current run,
    with its route's priority and models."""
    try:
        dest = destination_for(settings, study.calling_ae)
        destination = str(dest) if dest is not None else "none"
    except NoDestination:
        destination = None
    predecessor = next((p for p in study.predecessor_outputs if p.endswith("/SR.dcm")), None)
    route, _ = route_for(settings, journal, study, spool_root)
    return {
        "study_key": study.study_key,
        "study_uid": study.study_uid,
        "spool_path": str(spool_root),
        "series": journal.series(study.study_key),
        "calling_ae": study.calling_ae,
        "run": study.run,
        "attempt": study.attempts,
        "completed_at": journal.completed_at(study.study_key, study.run) or study.updated_at,
        "destination": destination,
        "predecessor_sr": predecessor,
        "route": route.name if route else None,
        "priority": route.priority if route else "normal",
        "models": list(route.models) if route and route.models else None,
    }


class Dispatcher:
    """The thread that moves COMPLETE studies to the queue and re-queues stale ones."""

    def __init__(self, settings: Settings, journal: Journal, app: Any, spool_root: str | Path,
                 interval: float = 1.0) -> None:
        self.settings = settings
        self.journal = journal
        self.app = app
        self.spool_root = Path(spool_root).resolve()
        self.interval = min(interval, settings.queue.stale_after / 4)
        self.delivery = Delivery(settings, journal, self.spool_root, self.requeue)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker_down_since: float | None = None
        self._last_prune = 0.0
        self._last_expiry = 0.0

    # -- the node's hooks ----------------------------------------------------
    def on_study_complete(self, study: CompletedStudy) -> None:
        """The node's ``on_study_complete``: the next sweep queues it (at once)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dispatch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("dispatch sweep failed; trying again")
            self._wake.wait(self.interval)
            self._wake.clear()

    # -- publishing ----------------------------------------------------------
    def _publish(self, task: str, message: dict) -> bool:
        try:
            publish(self.app, task, message)
        except BrokerUnavailable as exc:
            if self._broker_down_since is None:
                self._broker_down_since = time.time()
                log.error("broker unreachable (%s): studies wait in the journal and are queued when it is back", exc)
            return False
        if self._broker_down_since is not None:
            log.warning("broker reachable again after %.0f s", time.time() - self._broker_down_since)
            self._broker_down_since = None
        return True

    def requeue(self, study: Study) -> None:
        """Publish ``analyze`` again for a study already QUEUED (no state change)."""
        self._publish(ANALYZE, analyze_message(self.settings, self.journal, study, self.spool_root))

    # -- the sweep -------------------------------------------------------------
    def sweep(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for study in sorted(self.journal.studies([COMPLETE]), key=lambda s: s.updated_at):
            if not self._queue(study):
                return  # the broker is down: no point trying the others now
        stale = self.settings.queue.stale_after
        for study in self.journal.studies([QUEUED]):
            self._watch_queued(study, now, stale)
        for study in self.journal.studies([ANALYZED]):
            if now - study.updated_at > stale + backoff(self.settings, max(1, study.attempts)):
                self._hand_to_delivery(study, f"delivery has not moved in {now - study.updated_at:.0f} s")
        if not self.settings.queue.broker_url and now - self._last_prune > 60:
            self._last_prune = now
            self._prune(now)
        retention_s = self.settings.node.retention_days * 86400
        if retention_s > 0 and now - self._last_expiry > min(3600.0, max(1.0, retention_s / 4)):
            self._last_expiry = now
            expire(self.settings, self.journal, now)

    def _queue(self, study: Study) -> bool:
        _, skip = route_for(self.settings, self.journal, study, self.spool_root)
        if skip is not None:
            try:
                self.journal.transition(study.study_key, IGNORED, skip, expect_state=COMPLETE, expect_run=study.run)
            except IllegalTransition:
                pass
            return True
        message = analyze_message(self.settings, self.journal, study, self.spool_root)
        if not self._publish(ANALYZE, message):
            return False
        try:
            self.journal.transition(study.study_key, QUEUED, "queued for analysis", expect_state=COMPLETE,
                                    expect_run=study.run, attempts=0)
        except IllegalTransition:
            pass  # reopened by a late instance meanwhile: the worker's result will be dropped
        return True

    def _watch_queued(self, study: Study, now: float, stale: float) -> None:
        work = WorkDir(self.spool_root, study.study_key, study.run)
        waited = now - study.updated_at
        if work.read_result() is not None:
            if waited > stale:
                self._hand_to_delivery(study, "the result is in the spool but never reached delivery")
            return
        beat = work.heartbeat_age(now)
        try:
            if beat is not None:
                if beat > stale:
                    work.clear_heartbeat()
                    self.delivery._attempt_broke(study, f"the worker stopped (no heartbeat for {beat:.0f} s)")
                return
            if waited > stale:
                if self._publish(ANALYZE, analyze_message(self.settings, self.journal, study, self.spool_root)):
                    self.journal.transition(study.study_key, QUEUED, f"no worker took it in {waited:.0f} s; queued again",
                                            expect_state=QUEUED, expect_run=study.run, attempts=study.attempts)
        except IllegalTransition:
            pass  # moved on meanwhile

    def _hand_to_delivery(self, study: Study, why: str) -> None:
        work = WorkDir(self.spool_root, study.study_key, study.run)
        result = work.read_result()
        if result is None:
            if study.state == ANALYZED:
                self.journal.transition(study.study_key, "FAILED", "the result vanished from the spool; "
                                        "retry to analyse again", expect_state=ANALYZED, expect_run=study.run)
            return
        if self._publish(DELIVER, result):
            try:
                self.journal.transition(study.study_key, study.state, f"{why}; handed to delivery again",
                                        expect_state=study.state, expect_run=study.run, attempts=study.attempts)
            except IllegalTransition:
                pass

    def _prune(self, now: float) -> None:
        folder = embedded_folders(self.spool_root)["processed"]
        try:
            for entry in os.scandir(folder):
                if now - entry.stat().st_mtime > PROCESSED_KEEP_S:
                    os.unlink(entry.path)
        except OSError:
            pass
