"""One study through the models: the glue between ``dicom_node.series`` (DICOM files to a
volume) and ``inference.pipeline`` (volume to findings). Used by ``pacs-ai analyze`` and
by the worker's analyze task; both stay thin around :func:`analyze_paths`."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from dicom_node.series import LoadedSeries, SeriesSelector, load_series, scan_series, select_series
from inference.findings import Classification, Finding
from inference.pipeline import LoadedModel, run_model
from inference.spec import ModelSpec
from inference.volume import Volume

log = logging.getLogger("pacs_ai.analysis")


class AnalysisError(Exception):
    """A study that cannot be analysed (no DICOM, several studies, ...); one line."""


@dataclass
class StudyAnalysis:
    study_uid: str | None
    findings: list[Finding] = field(default_factory=list)
    classifications: list[Classification] = field(default_factory=list)
    series: dict[str, LoadedSeries] = field(default_factory=dict)  # series UID -> loaded series
    model_series: dict[str, str] = field(default_factory=dict)  # model name -> series UID it ran on
    skipped: dict[str, list[str]] = field(default_factory=dict)  # model name -> why no series matched
    models: list[tuple[str, str, str]] = field(default_factory=list)  # (name, version, engine)
    specs: dict[str, ModelSpec] = field(default_factory=dict)  # model name -> its spec, for the reports
    timings_s: dict[str, float] = field(default_factory=dict)


def selector_for(spec: ModelSpec) -> SeriesSelector:
    """The series selector of a model spec, in dicom_node's terms."""
    sel = spec.selector
    return SeriesSelector(
        modality=sel.modality,
        body_part=sel.body_part or None,
        min_slices=sel.min_slices,
        orientation=None if sel.orientation == "any" else sel.orientation,
        description_pattern=sel.series_description or None,
    )


def analyze_paths(paths, models: list[LoadedModel], batch_size: int = 16) -> StudyAnalysis:
    """Run every model on the series its selector picks among the DICOM files at ``paths``."""
    t0 = time.perf_counter()
    infos = scan_series(paths)
    if not infos:
        raise AnalysisError("no DICOM images found")
    studies = {i.study_uid for i in infos}
    if len(studies) > 1:
        raise AnalysisError(f"the files hold {len(studies)} studies; analyse one study at a time")
    analysis = StudyAnalysis(study_uid=next(iter(studies)))
    analysis.timings_s["scan"] = round(time.perf_counter() - t0, 4)
    for model in models:
        info, reasons = select_series(infos, selector_for(model.spec))
        if info is None:
            analysis.skipped[model.spec.name] = reasons
            log.info("%s: no matching series (%s)", model.spec.name, "; ".join(reasons))
            continue
        loaded = analysis.series.get(info.series_uid)
        if loaded is None:
            t1 = time.perf_counter()
            loaded = load_series(info)
            analysis.timings_s["load"] = round(analysis.timings_s.get("load", 0.0) + time.perf_counter() - t1, 4)
            analysis.series[info.series_uid] = loaded
        volume = Volume(**loaded.volume_fields())
        out, timings = run_model(model, volume, batch_size)
        analysis.timings_s.update({k: round(v, 4) for k, v in timings.items()})
        analysis.model_series[model.spec.name] = info.series_uid
        analysis.models.append((model.spec.name, model.spec.version, model.engine.name))
        analysis.specs[model.spec.name] = model.spec
        if isinstance(out, Classification):
            analysis.classifications.append(out)
        else:
            analysis.findings.extend(out)
    analysis.timings_s["total"] = round(time.perf_counter() - t0, 4)
    return analysis


def findings_document(analysis: StudyAnalysis, outputs: list[str] | None = None, lung_rads: str | None = None) -> dict:
    """The content of ``findings.json`` (DESIGN.md section 5)."""
    triage = analysis.classifications[0] if analysis.classifications else None
    return {
        "study_uid": analysis.study_uid,
        "findings": [f.as_json() for f in analysis.findings],
        "lung_rads": lung_rads,
        "triage": triage.as_json() if triage else None,
        "classifications": [c.as_json() for c in analysis.classifications],
        "models": [{"name": n, "version": v, "engine": e} for n, v, e in analysis.models],
        "skipped": analysis.skipped,
        "outputs": outputs or [],
        "timings_s": analysis.timings_s,
        "not_for_clinical_use": True,
    }
