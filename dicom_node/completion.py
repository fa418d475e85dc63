"""Study completion: when has a study stopped arriving?

DICOM has no "end of study" message, so completeness is inferred
(DESIGN.md section 4): a study is COMPLETE when it has been quiet for
``study_idle_timeout`` seconds after its last instance *and* no association
that carried it is still open; ``study_max_wait`` after its run started it
completes regardless. The tracker polls the journal rather than keeping timers
in memory, so it sees instances stored by every ingest process, and a
restarted node simply resumes: after a restart each open study gets a full
idle period again (the sender whose transfer the crash cut short is likely
to send the rest).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .journal import COMPLETE, QUEUED, RECEIVING, IllegalTransition, Journal, Study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompletedStudy:
    """What ``on_study_complete`` receives (the ``study`` of DESIGN.md's
    ``analyze(study)`` task, minus what the queue adds)."""

    study_key: str
    study_uid: str
    spool_path: str
    series: list[dict]
    calling_ae: str | None
    run: int
    attempt: int
    state: str

    def as_message(self) -> dict:
        return {
            "study_key": self.study_key,
            "study_uid": self.study_uid,
            "spool_path": self.spool_path,
            "series": self.series,
            "calling_ae": self.calling_ae,
            "run": self.run,
            "attempt": self.attempt,
        }


OnStudyComplete = Callable[[CompletedStudy], None]


def log_completed_study(study: CompletedStudy) -> None:
    """The default ``on_study_complete`` of ``pacs-ai node`` on its own:
    the study stays COMPLETE and waits for a queue (DESIGN.md section 10)."""
    log.info(
        "study %s complete: %d series, waiting for a worker",
        study.study_key,
        len(study.series),
        extra={"study_key": study.study_key},
    )


class CompletionTracker:
    """A thread that completes quiet studies and hands them on."""

    def __init__(
        self,
        journal: Journal,
        spool_root: str,
        *,
        idle_timeout: float,
        max_wait: float,
        on_study_complete: OnStudyComplete = log_completed_study,
        poll_interval: float | None = None,
    ) -> None:
        self.journal = journal
        self.spool_root = spool_root
        self.idle_timeout = idle_timeout
        self.max_wait = max_wait
        self.on_study_complete = on_study_complete
        self.poll_interval = poll_interval or min(0.25, max(0.02, idle_timeout / 10))
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.started_at = time.time()
        self._resume()
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def completed_study(self, study: Study) -> CompletedStudy:
        return CompletedStudy(
            study_key=study.study_key,
            study_uid=study.study_uid,
            spool_path=str(self.spool_root),
            series=self.journal.series(study.study_key),
            calling_ae=study.calling_ae,
            run=study.run,
            attempt=study.attempts,
            state=study.state,
        )

    def _hand_on(self, study: Study) -> None:
        try:
            self.on_study_complete(self.completed_study(study))
        except Exception:
            # The study stays COMPLETE in the journal; a restart (or, with a
            # queue, the stale-study sweep) hands it on again.
            log.exception(
                "on_study_complete failed for study %s; it stays %s",
                study.study_key,
                study.state,
                extra={"study_key": study.study_key},
            )

    def _resume(self) -> None:
        """After a restart, hand on studies that completed but never reached
        a worker; RECEIVING ones resume in the poll loop."""
        for study in self.journal.studies([COMPLETE, QUEUED]):
            log.info(
                "resuming study %s in state %s", study.study_key, study.state,
                extra={"study_key": study.study_key},
            )
            self._hand_on(study)

    def due(self, study: Study, open_associations: int, now: float) -> str | None:
        """Why ``study`` is complete now, or None if it is not."""
        if now - study.run_started_at >= self.max_wait:
            return "max-wait"
        if open_associations:
            return None
        last = max(study.last_received_at or study.run_started_at, self.started_at)
        if now - last >= self.idle_timeout:
            return "idle"
        return None

    def poll_once(self) -> int:
        """Complete every due study; returns how many completed."""
        now = time.time()
        done = 0
        for study, open_assocs in self.journal.receiving_studies():
            why = self.due(study, open_assocs, now)
            if why is None:
                continue
            try:
                completed = self.journal.transition(
                    study.study_key, COMPLETE, why,
                    expect_state=RECEIVING, expect_run=study.run,
                )
            except IllegalTransition:
                continue  # a late instance reopened it meanwhile
            done += 1
            self._hand_on(completed)
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.poll_once()
            except Exception:
                log.exception("completion poll failed; retrying")
