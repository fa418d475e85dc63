"""Replaying a study (``pacs-ai retry`` and the status page's button): one function for both.

A FAILED study whose outputs are still in the spool is delivered again (ANALYZED); one
without outputs (its analysis failed, or it was ignored before a configuration change) is
analysed again (QUEUED). A stuck ANALYZED study is handed to delivery again.
"""
from __future__ import annotations

from pathlib import Path

from dicom_node.journal import ANALYZED, FAILED, QUEUED, Journal, Study

from .celery_app import ANALYZE, DELIVER, BrokerUnavailable, publish
from .dispatch import analyze_message
from .settings import Settings
from .workdir import WorkDir

REPLAYABLE = (FAILED, ANALYZED)


class NotReplayable(Exception):
    """The study is in a state that is not replayed (one line for a person)."""


def retry_study(settings: Settings, journal: Journal, app, study: Study, who: str = "retry requested") -> str:
    """Replay ``study``; returns what was queued, in words."""
    if study.state not in REPLAYABLE:
        raise NotReplayable(f"study {study.study_key} is {study.state}: only FAILED (or stuck ANALYZED) studies are retried")
    root = Path(settings.node.spool).resolve()
    work = WorkDir(root, study.study_key, study.run)
    result = work.read_result()
    if result and result.get("outcome") == "analyzed" and all((root / p).is_file() for p in result["outputs"]):
        if study.state == FAILED:
            study = journal.transition(study.study_key, ANALYZED, f"{who}: delivering again",
                                       expect_state=FAILED, expect_run=study.run, attempts=0,
                                       outputs=result["outputs"], model=result.get("model"),
                                       model_version=result.get("model_version"))
        task, message, what = DELIVER, result, "delivery queued"
    else:
        if result is not None:
            work.result_path.unlink()  # failed or ignored before: compute again
        work.clear_heartbeat()
        study = journal.transition(study.study_key, QUEUED, f"{who}: analysing again",
                                   expect_state=REPLAYABLE, expect_run=study.run, attempts=0)
        task, message, what = ANALYZE, analyze_message(settings, journal, study, root), "analysis queued"
    try:
        publish(app, task, message)
    except BrokerUnavailable:
        what += " (broker unreachable: the node queues it when it is back)"
    return what
