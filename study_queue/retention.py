"""Spool retention: patient data is kept no longer than it is needed (issue 6).

DELIVERED and IGNORED studies are deleted ``node.retention_days`` after their last state
change, by the node's dispatcher (once an hour): the received instances, the work folder
and the outbox copy, then the journal's rows. FAILED studies stay until someone retries
them or deletes them with ``pacs-ai purge``. Each deletion is one audit line.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from dicom_node.journal import DELIVERED, FAILED, IGNORED, Journal, Study
from dicom_node.uids import validate_uid

from .settings import Settings
from .workdir import WORK_DIR

audit = logging.getLogger("pacs_ai.audit")

EXPIRING = (DELIVERED, IGNORED)
PURGEABLE = (DELIVERED, IGNORED, FAILED)


class NotPurgeable(Exception):
    """A study still in flight: it is not deleted."""


def purge_study(settings: Settings, journal: Journal, study: Study, why: str) -> None:
    """Delete a finished study's files and forget it."""
    if study.state not in PURGEABLE:
        raise NotPurgeable(f"study {study.study_key} is {study.state}: only DELIVERED, IGNORED or FAILED studies are deleted")
    spool = Path(settings.node.spool).resolve()
    for folder in (spool / validate_uid(study.study_uid), spool / WORK_DIR / study.study_key,
                   Path(settings.delivery.outbox) / study.study_key):
        shutil.rmtree(folder, ignore_errors=True)
    journal.forget(study.study_key)
    audit.info("study purged study=%s state=%s instances=%d reason=%s", study.study_key, study.state,
               study.instance_count, why, extra={"study_key": study.study_key})


def expire(settings: Settings, journal: Journal, now: float | None = None) -> int:
    """Delete the DELIVERED and IGNORED studies older than ``node.retention_days``."""
    days = settings.node.retention_days
    if days <= 0:
        return 0
    cutoff = (time.time() if now is None else now) - days * 86400
    done = 0
    for study in journal.studies(EXPIRING):
        if study.updated_at < cutoff:
            purge_study(settings, journal, study, f"retention ({days:g} days)")
            done += 1
    for log_file in (Path(settings.node.spool) / "logs").glob("worker-*.log*"):
        try:  # one file per worker process: those of processes long gone
            if log_file.stat().st_mtime < cutoff:
                log_file.unlink()
        except OSError:
            pass
    return done
