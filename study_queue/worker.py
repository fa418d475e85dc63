"""The body of the ``analyze`` task: one study from the shared spool through every model to
validated outputs in its work folder (``study_queue.workdir``).

Kept free of Celery so that it is a plain function of (settings, message); the task in
``study_queue.tasks`` only wraps it. The models are loaded once per worker process and
stay warm between studies.

Outcomes, in the result document the node's ``deliver`` receives:

- ``analyzed``: outputs were built and checked; the node sends them.
- ``ignored``: no model's selector matched a series of the study (each model's reasons).
- ``failed``: the study cannot be analysed as it is (unreadable series, outputs that do not
  validate). Analysing again gives the same answer, so the node does not retry; a person can
  (``pacs-ai retry``) after fixing the cause.
- ``error``: this attempt broke for a reason that may pass (a bug, memory, a disk). The node
  counts the attempt and queues the study again, up to ``queue.max_attempts``.

The first three are written to ``result.json``; an ``error`` is not, so the next attempt runs.
"""
from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from pathlib import Path
from typing import Any

from dicom_node.errors import DicomNodeError
from dicom_node.spool import Spool
from dicom_node.uids import InvalidUID, validate_uid
from dicom_node.validate import OutputInvalid

from .analysis import AnalysisError, analyze_paths, findings_document
from .settings import Settings
from .workdir import BadMessage, Heartbeat, WorkDir, check_key, check_run

log = logging.getLogger("pacs_ai.worker")

_models_lock = threading.Lock()
_models: dict[tuple, list] = {}


def loaded_models(settings: Settings) -> list:
    """The configured models with warm engines, loaded on first use in this process."""
    from inference.pipeline import load_models

    inf = settings.inference
    key = (tuple(inf.models), inf.engine, inf.threads)
    with _models_lock:
        if key not in _models:
            t0 = time.perf_counter()
            _models[key] = load_models(list(inf.models), engine=inf.engine, threads=inf.threads)
            log.info("models loaded in %.1f s: %s", time.perf_counter() - t0,
                     ", ".join(f"{m.spec.name} {m.spec.version} on {m.engine.name}" for m in _models[key]))
        return _models[key]


_hashes: dict[str, str] = {}


def _onnx_hash(spec) -> str:
    """SHA-256 of the model file that ran, once per process: which weights made a result."""
    key = str(spec.onnx_path)
    if key not in _hashes:
        _hashes[key] = spec.onnx_sha256()
    return _hashes[key]


def heartbeat_interval(settings: Settings) -> float:
    """Four heartbeats per ``queue.stale_after``: one late heartbeat is not a dead worker."""
    return settings.queue.stale_after / 4


def _result(message: dict, outcome: str, reason: str | None = None, **fields: Any) -> dict:
    return {
        "study_key": message["study_key"],
        "run": message["run"],
        "attempt": message.get("attempt", 0),
        "outcome": outcome,
        "reason": reason,
        "destination": message.get("destination"),
        **fields,
    }


def _content_datetime(message: dict) -> _dt.datetime:
    """When the run of the study completed: the outputs' content date and time, the same on
    every attempt, so that analysing the study again writes the same bytes."""
    completed = message.get("completed_at")
    if not isinstance(completed, (int, float)) or completed <= 0:
        raise BadMessage("completed_at must be a time in seconds since the epoch")
    return _dt.datetime.fromtimestamp(int(completed))


def _predecessor(spool_root: Path, message: dict):
    """The SR of the run this one supersedes, if the node named one and it is still there."""
    rel = message.get("predecessor_sr")
    if not rel:
        return None
    path = (spool_root / str(rel)).resolve()
    if spool_root not in path.parents or not path.is_file():
        log.warning("study %s: predecessor SR %s is not in the spool; the new SR will not reference it",
                    message["study_key"], rel, extra={"study_key": message["study_key"]})
        return None
    from pydicom import dcmread

    return dcmread(path, stop_before_pixels=True)


def _route_models(message: dict, models: list) -> list:
    """The models the study's route names (all of them when it names none)."""
    names = message.get("models")
    if not names:
        return models
    return [m for m in models if m.spec.name in set(names)]


def analyze_study(settings: Settings, message: dict, models=None) -> dict:
    """Analyse the study of ``message``; returns the result document for ``deliver``."""
    if not isinstance(message, dict):
        raise BadMessage("the analyze message must be a JSON object")
    key = check_key(message.get("study_key"))
    run = check_run(message.get("run"))
    try:
        study_uid = validate_uid(message.get("study_uid"), "study_uid")
    except InvalidUID as exc:
        raise BadMessage(str(exc)) from None
    spool = Spool(settings.node.spool)  # never prepare(): that would clean the node's temp files
    node_spool = message.get("spool_path")
    if node_spool and Path(str(node_spool)).resolve() != spool.root:
        return _result(message, "error", f"this worker's node.spool {str(spool.root)!r} is not the node's "
                       f"{str(node_spool)!r}: mount the shared spool at the same path on every host")
    work = WorkDir(spool.root, key, run)
    done = work.read_result()
    if done is not None:
        log.info("study %s run %d: already analysed (%s), handing the result on again", key, run,
                 done.get("outcome"), extra={"study_key": key})
        return done
    when = _content_datetime(message)
    t0 = time.perf_counter()
    with Heartbeat(work, heartbeat_interval(settings)):
        try:
            result = _analyze(settings, message, spool, study_uid, work, when,
                              _route_models(message, models if models is not None else loaded_models(settings)))
        except (AnalysisError, DicomNodeError, OutputInvalid) as exc:
            result = _result(message, "failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - the node counts the attempt and queues it again
            log.exception("study %s: analysis attempt %s broke", key, message.get("attempt", 0),
                          extra={"study_key": key})
            work.clear_heartbeat()
            return _result(message, "error", f"{type(exc).__name__} in the worker (see its log)")
        result["timings_s"] = {**result.get("timings_s", {}), "worker_total": round(time.perf_counter() - t0, 4)}
        work.write_result(result)
    log.info("study %s run %d: %s%s", key, run, result["outcome"],
             f" ({result['reason']})" if result.get("reason") else "", extra={"study_key": key})
    return result


def _analyze(settings: Settings, message: dict, spool: Spool, study_uid: str, work: WorkDir,
             when: _dt.datetime, models: list) -> dict:
    from .reports import build_report

    study_dir = spool.study_dir(study_uid)
    if not study_dir.is_dir():
        raise AnalysisError("the study's folder is not in the spool (deleted, or another spool?)")
    analysis = analyze_paths([study_dir], models, batch_size=settings.inference.batch_size)
    if analysis.study_uid != study_uid:
        raise AnalysisError("the spool folder holds another study")
    if not analysis.models:
        reasons = "; ".join(f"{name}: {', '.join(r)}" for name, r in analysis.skipped.items())
        return _result(message, "ignored", f"no model matched ({reasons})" if reasons else "no model matched",
                       timings_s=analysis.timings_s)
    out = settings.outputs
    report = build_report(
        analysis, ae_title=settings.node.ae_title, sr_enabled=out.sr, key_images_enabled=out.key_images,
        seg_enabled=out.seg, max_key_images=out.max_key_images, content_datetime=when,
        predecessor=_predecessor(spool.root, message),
    )
    if not report.objects:
        ran = ", ".join(name for name, _, _ in analysis.models)
        return _result(message, "ignored", f"no report to send: only {ran} matched a series",
                       timings_s=analysis.timings_s)
    for line in dict.fromkeys(report.warnings):
        log.info("study %s: validator warning: %s", message["study_key"], line,
                 extra={"study_key": message["study_key"]})
    names = report.write(work.outputs)
    analysis.timings_s.update({f"report:{k}": v for k, v in report.timings_s.items()})
    lung_rads = report.assessment.category if report.assessment else None
    work.write_json("findings.json", findings_document(analysis, names, lung_rads))
    model = report.model or ("", "")
    source_uid = analysis.model_series.get(model[0])
    source = analysis.series.get(source_uid) if source_uid else None
    return _result(
        message, "analyzed",
        provenance={
            "models": [{"name": n, "version": v, "engine": e, "onnx_sha256": _onnx_hash(analysis.specs[n])}
                       for n, v, e in analysis.models],
            "input_series_uid": source_uid,
            "input_sop_instance_uids": list(source.sop_instance_uids) if source is not None else [],
        },
        outputs=[work.relative(work.outputs / name) for name in names],
        output_uids={name: str(ds.SOPInstanceUID) for name, ds in report.objects},
        model=model[0], model_version=model[1],
        engines={name: engine for name, _, engine in analysis.models},
        findings=len([f for f in analysis.findings if f.model == model[0]]),
        lung_rads=lung_rads,
        timings_s=analysis.timings_s,
    )
