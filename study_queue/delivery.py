"""The node's side of a result: the ``deliver`` task's body (DESIGN.md sections 4 and 5).

It runs on the node host, the one place that writes the journal, and is the one function
that turns a worker's result into journal states:

- ``ignored`` -> IGNORED, ``failed`` -> FAILED(reason): terminal, replayable with ``pacs-ai retry``;
- ``error`` (the attempt broke) -> the attempt is counted and the study queued again, or
  FAILED once ``queue.max_attempts`` attempts broke;
- ``analyzed`` -> ANALYZED, then the outputs are copied to the outbox and C-STOREd to the
  destination on one association: DELIVERED, or a retry after an exponential backoff, or
  FAILED with the PACS's own words when it refuses (retrying cannot change its answer) or
  when ``delivery.max_attempts`` attempts did not get through.

Results are idempotent: one for an older run of the study (late instances reopened it), or
one for a study already past it (a message delivered twice), changes nothing.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dicom_node.errors import PacsRejected, PacsUnavailable
from dicom_node.journal import (
    ANALYZED,
    COMPLETE,
    DELIVERED,
    FAILED,
    IGNORED,
    QUEUED,
    IllegalTransition,
    Journal,
    Study,
    UnknownStudy,
)
from dicom_node.sender import Destination, send_paths, status_name

from .settings import Settings
from .workdir import BadMessage, WorkDir, check_key, check_run

log = logging.getLogger("pacs_ai.delivery")
audit = logging.getLogger("pacs_ai.audit")


@dataclass
class Outcome:
    """What handling one result did: the state it left, and when to try again (seconds)."""

    state: str
    retry_in: float | None = None
    note: str = ""


class NoDestination(Exception):
    """Nowhere to send: the calling AE has no [[peers]] entry, or return_to names none."""


def destination_for(settings: Settings, calling_ae: str | None) -> Destination | None:
    """Where the results of a study from ``calling_ae`` go; None for ``return_to = "none"``."""
    rt = settings.delivery.return_to
    if rt == "none":
        return None
    title = calling_ae if rt == "sender" else rt
    peer = settings.peer(title) if title else None
    if peer is None:
        raise NoDestination(
            f"delivery.return_to = \"sender\" but the calling AE {title!r} has no [[peers]] entry "
            "with a host and port to send the results to" if rt == "sender"
            else f"delivery.return_to {rt!r} has no [[peers]] entry"
        )
    return Destination(peer.ae_title, peer.host, peer.port)


def backoff(settings: Settings, failed_attempts: int) -> float:
    """Seconds before the next attempt after ``failed_attempts`` failures: doubling, capped."""
    d = settings.delivery
    return min(d.backoff_max, d.backoff_initial * 2 ** max(0, failed_attempts - 1))


def _transient(status: int | None) -> bool:
    """No answer, or Refused: Out of Resources (PS3.4 Table B.2-1, 0xA7xx): may pass."""
    return status is None or (status & 0xFF00) == 0xA700


def check_result(result: object) -> dict:
    if not isinstance(result, dict):
        raise BadMessage("the deliver message must be a JSON object")
    check_key(result.get("study_key"))
    check_run(result.get("run"))
    if result.get("outcome") not in ("analyzed", "ignored", "failed", "error"):
        raise BadMessage("outcome must be analyzed, ignored, failed or error")
    outputs = result.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(p, str) for p in outputs):
        raise BadMessage("outputs must be a list of paths")
    return result


class Delivery:
    """Applies results to the journal and sends outputs; one per node process."""

    def __init__(self, settings: Settings, journal: Journal, spool_root: str | Path,
                 requeue: Callable[[Study], None]) -> None:
        self.settings = settings
        self.journal = journal
        self.spool_root = Path(spool_root).resolve()
        self.requeue = requeue  # publishes ``analyze`` again for a study (the dispatcher's)

    # -- results -----------------------------------------------------------
    def handle(self, result: dict) -> Outcome:
        result = check_result(result)
        key, run, outcome = result["study_key"], result["run"], result["outcome"]
        try:
            study = self.journal.get(key)
        except UnknownStudy:
            log.warning("result for study %s, which the journal does not know: dropped", key,
                        extra={"study_key": key})
            return Outcome("UNKNOWN", note="unknown study")
        if study.run != run:
            log.info("study %s: result of run %d dropped, the study is at run %d", key, run, study.run,
                     extra={"study_key": key})
            return Outcome(study.state, note="older run")
        if study.state == COMPLETE:  # the node died between publishing and journaling QUEUED
            study = self.journal.transition(key, QUEUED, "queued for analysis", expect_state=COMPLETE,
                                            expect_run=run, attempts=0)
        if outcome == "error":
            return self._attempt_broke(study, result.get("reason") or "the analysis broke")
        if study.state == QUEUED:
            if outcome == "ignored":
                self.journal.transition(key, IGNORED, result.get("reason"), expect_state=QUEUED, expect_run=run)
                return Outcome(IGNORED)
            if outcome == "failed":
                self.journal.transition(key, FAILED, f"analysis: {result.get('reason')}",
                                        expect_state=QUEUED, expect_run=run)
                return Outcome(FAILED)
            self.journal.record_outputs(key, run, result.get("output_uids", {}).values())
            study = self.journal.transition(
                key, ANALYZED, f"{result.get('findings', 0)} finding(s), {len(result['outputs'])} output(s)",
                expect_state=QUEUED, expect_run=run, attempts=0, outputs=result["outputs"],
                model=result.get("model"), model_version=result.get("model_version"),
            )
        elif study.state != ANALYZED or outcome != "analyzed":
            log.info("study %s is %s: result (%s) already applied", key, study.state, outcome,
                     extra={"study_key": key})
            return Outcome(study.state, note="already applied")
        return self.send(study, result)

    def _attempt_broke(self, study: Study, reason: str) -> Outcome:
        """An analysis attempt that did not finish: count it, queue again or give up."""
        key = study.study_key
        if study.state != QUEUED:
            return Outcome(study.state, note="already past QUEUED")
        attempts = study.attempts + 1
        if attempts >= self.settings.queue.max_attempts:
            self.journal.transition(key, FAILED, f"analysis did not finish in {attempts} attempts: {reason}",
                                    expect_state=QUEUED, expect_run=study.run, attempts=attempts)
            return Outcome(FAILED)
        study = self.journal.transition(key, QUEUED, f"analysis attempt {attempts} did not finish: {reason}; queued again",
                                        expect_state=QUEUED, expect_run=study.run, attempts=attempts)
        self.requeue(study)
        return Outcome(QUEUED)

    # -- sending -----------------------------------------------------------
    def outbox_dir(self, study: Study) -> Path:
        return Path(self.settings.delivery.outbox) / study.study_key / f"run-{study.run}"

    def _to_outbox(self, study: Study, paths: list[Path], result: dict) -> Path:
        """Every result is also written to the outbox (DESIGN.md section 5): the outputs,
        findings.json and the result record, replaced whole on a retry."""
        folder = self.outbox_dir(study)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        work = WorkDir(self.spool_root, study.study_key, study.run)
        for src in [*paths, work.path / "findings.json"]:
            if src.is_file():
                tmp = folder / f".{src.name}.tmp"
                shutil.copyfile(src, tmp)
                tmp.replace(folder / src.name)
        (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return folder

    def _paths(self, result: dict) -> list[Path]:
        paths = []
        for rel in result["outputs"]:
            path = (self.spool_root / rel).resolve()
            if self.spool_root not in path.parents:
                raise BadMessage("an output path leaves the spool")
            paths.append(path)
        return paths

    def send(self, study: Study, result: dict) -> Outcome:
        """Send the outputs; then the outbox's ``provenance.json`` says what happened."""
        outcome = self._send(study, result)
        folder = self.outbox_dir(study)
        if folder.is_dir():
            self._provenance(folder, study, result, outcome)
        return outcome

    def _provenance(self, folder: Path, study: Study, result: dict, outcome: Outcome) -> None:
        """Per-study provenance (issue 7): models with version, engine and ONNX hash, input
        and output UIDs, per-stage timings, and each delivery attempt with the PACS's answer."""
        now = self.journal.get(study.study_key)
        doc = {
            "study_key": study.study_key, "run": study.run, "state": now.state, "reason": now.reason,
            "calling_ae": study.calling_ae, **{k: result.get(k) for k in (
                "model", "model_version", "provenance", "output_uids", "findings", "lung_rads", "timings_s")},
            "history": [{"at": h["at"], "state": h["to_state"], "reason": h["reason"]}
                        for h in self.journal.history(study.study_key) if h["run"] == study.run],
            "deliveries": [d for d in reversed(self.journal.deliveries(study.study_key)) if d["run"] == study.run],
            "not_for_clinical_use": True,
        }
        tmp = folder / ".provenance.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(folder / "provenance.json")

    def _send(self, study: Study, result: dict) -> Outcome:
        key, run = study.study_key, study.run
        paths = self._paths(result)
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            self.journal.transition(key, FAILED, f"outputs missing from the spool: {', '.join(missing)}",
                                    expect_state=ANALYZED, expect_run=run)
            return Outcome(FAILED)
        self._to_outbox(study, paths, result)
        try:
            dest = destination_for(self.settings, study.calling_ae)
        except NoDestination as exc:
            self.journal.transition(key, FAILED, f"not sent: {exc}", expect_state=ANALYZED, expect_run=run)
            return Outcome(FAILED)
        if dest is None:
            self.journal.transition(key, DELIVERED, "delivery.return_to = none: written to the outbox only",
                                    expect_state=ANALYZED, expect_run=run, destination="none")
            return Outcome(DELIVERED)
        attempt = study.attempts + 1
        t0 = time.monotonic()
        try:
            report = send_paths(paths, dest, calling_ae=self.settings.node.ae_title,
                                timeout=self.settings.delivery.timeout)
        except PacsRejected as exc:
            seconds = time.monotonic() - t0
            if exc.result == 2:  # rejected-transient (PS3.8 Table 9-21): busy, try later
                return self._retry(study, dest, attempt, f"association rejected: {exc}", seconds=seconds)
            self._record(study, dest, attempt, "failed", seconds, str(exc))
            self.journal.transition(key, FAILED, f"{dest} refused the association: {exc}",
                                    expect_state=ANALYZED, expect_run=run, destination=str(dest),
                                    destination_answer=str(exc))
            return Outcome(FAILED)
        except PacsUnavailable as exc:
            return self._retry(study, dest, attempt, str(exc), seconds=time.monotonic() - t0)
        answer = {
            "sent": report.sent, "failed": report.failed, "associations": report.associations,
            "resends": report.resends, "seconds": round(time.monotonic() - t0, 3),
            "statuses": {o.path.name: (f"0x{o.status:04X}" if o.status is not None else None)
                         for o in report.outcomes},
        }
        if report.error_comments:
            answer["error_comments"] = report.error_comments
        if report.ok:
            self._record(study, dest, attempt, "stored", answer["seconds"], json.dumps(answer))
            self.journal.transition(
                key, DELIVERED, f"{report.sent} object(s) stored by {dest} (attempt {attempt})",
                expect_state=ANALYZED, expect_run=run, destination=str(dest),
                destination_answer=json.dumps(answer),
            )
            return Outcome(DELIVERED)
        refused = [o for o in report.outcomes if not o.sent]
        why = "; ".join(dict.fromkeys(
            f"{o.path.name}: {status_name(o.status) if o.status is not None else o.reason}"
            + (f" ({o.error_comment})" if o.error_comment else "") for o in refused))
        if all(_transient(o.status) for o in refused):
            return self._retry(study, dest, attempt, f"{len(refused)} of {len(report.outcomes)} not stored: {why}",
                               answer=answer, seconds=answer["seconds"])
        self._record(study, dest, attempt, "failed", answer["seconds"], json.dumps(answer))
        self.journal.transition(key, FAILED, f"{dest} refused {len(refused)} of {len(report.outcomes)}: {why}",
                                expect_state=ANALYZED, expect_run=run, destination=str(dest),
                                destination_answer=json.dumps(answer))
        return Outcome(FAILED)

    def _record(self, study: Study, dest: Destination, attempt: int, outcome: str, seconds: float | None,
                answer: str) -> None:
        """The delivery table row and audit line of one attempt (who, what, when, outcome)."""
        self.journal.record_delivery(study.study_key, study.run, str(dest), attempt, outcome,
                                     round(seconds, 3) if seconds is not None else None, answer)
        audit.info("delivery study=%s run=%d destination=%s attempt=%d outcome=%s seconds=%.2f",
                   study.study_key, study.run, dest, attempt, outcome, seconds or 0.0,
                   extra={"study_key": study.study_key})

    def _retry(self, study: Study, dest: Destination, attempt: int, why: str, answer: dict | None = None,
               seconds: float | None = None) -> Outcome:
        max_attempts = self.settings.delivery.max_attempts
        fields = {"destination": str(dest), "destination_answer": json.dumps(answer) if answer else why}
        self._record(study, dest, attempt, "failed" if attempt >= max_attempts else "retry", seconds,
                     fields["destination_answer"])
        if attempt >= max_attempts:
            self.journal.transition(study.study_key, FAILED, f"not delivered to {dest} in {attempt} attempts: {why}",
                                    expect_state=ANALYZED, expect_run=study.run, attempts=attempt, **fields)
            return Outcome(FAILED)
        delay = backoff(self.settings, attempt)
        self.journal.transition(study.study_key, ANALYZED,
                                f"delivery attempt {attempt} to {dest} failed: {why}; next in {delay:g} s",
                                expect_state=ANALYZED, expect_run=study.run, attempts=attempt, **fields)
        return Outcome(ANALYZED, retry_in=delay)


def safe_handle(delivery: Delivery, result: object) -> Outcome:
    """``Delivery.handle`` for the task: a malformed message or a study that moved on meanwhile
    is logged and dropped, never retried for ever."""
    try:
        return delivery.handle(result)  # type: ignore[arg-type]
    except BadMessage as exc:
        log.error("deliver message dropped: %s", exc)
        return Outcome("DROPPED", note=str(exc))
    except IllegalTransition as exc:
        log.info("result not applied: %s", exc)
        return Outcome("MOVED", note=str(exc))
