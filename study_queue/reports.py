"""From an analysed study to the DICOM objects a radiologist sees: the TID 1500 SR, key
images, optionally a SEG, and a KOS flagging the key images; each checked before it may
leave (DESIGN.md section 6). The writers live in ``dicom_node``; this module only chooses
what to build from the settings and hands the analysis to them."""
from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node import key_images, lung_rads, seg, sr
from dicom_node.validate import require_valid

from .analysis import StudyAnalysis

log = logging.getLogger("pacs_ai.reports")


@dataclass
class Report:
    """The built outputs of one study, in the order they are sent: SR first."""

    objects: list[tuple[str, Dataset]] = field(default_factory=list)  # (file name, data set)
    assessment: lung_rads.Assessment | None = None
    model: tuple[str, str] | None = None  # the findings model (name, version)
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # dciodvfy warnings, for the log

    def write(self, folder: str | Path) -> list[str]:
        """Write every object as a Part 10 file into ``folder``; returns the file names."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for name, ds in self.objects:
            tmp = folder / f".{name}.tmp"
            ds.save_as(tmp, enforce_file_format=True)
            tmp.replace(folder / name)
            names.append(name)
        return names


def _primary(analysis: StudyAnalysis):
    """The model whose findings the report carries: the first segmentation model that ran."""
    return next((spec for spec in analysis.specs.values() if spec.task == "segmentation"), None)


def build_report(
    analysis: StudyAnalysis,
    *,
    ae_title: str = "PACS_AI",
    sr_enabled: bool = True,
    key_images_enabled: bool = True,
    seg_enabled: bool = False,
    max_key_images: int = 5,
    content_datetime: _dt.datetime | None = None,
    predecessor=None,
) -> Report:
    """Build (and check) the outputs for ``analysis``. No segmentation model ran (no series
    matched): nothing to report, an empty :class:`Report`."""
    report = Report()
    spec = _primary(analysis)
    if spec is None:
        return report
    source = analysis.series[analysis.model_series[spec.name]]
    findings = [f for f in analysis.findings if f.model == spec.name]
    report.model = (spec.name, spec.version)
    report.assessment = lung_rads.assess(findings)
    uids = sr.output_uids(analysis.study_uid, source.sop_instance_uids, spec.name, spec.version)
    when = content_datetime or _dt.datetime.now().replace(microsecond=0)
    t0 = time.perf_counter()
    images: list[Dataset] = []
    if key_images_enabled and findings:
        images = key_images.build_key_images(
            source, findings, model_name=spec.name, model_version=spec.version,
            max_images=max_key_images, content_datetime=when, uids=uids,
        )
    t1 = time.perf_counter()
    segmentation = None
    if seg_enabled and findings:
        segmentation = seg.build_seg(source, findings, model_name=spec.name, model_version=spec.version,
                                     content_datetime=when, uids=uids)
    t2 = time.perf_counter()
    triage = next(iter(analysis.classifications), None)
    document = None
    if sr_enabled:
        document = sr.build_sr(
            source, findings,
            model=sr.ModelInfo(spec.name, spec.version, codes=spec.codes),
            device=sr.DeviceInfo(ae_title=ae_title, software_version=key_images.SOFTWARE_VERSION),
            triage=triage, assessment=report.assessment, predecessor=predecessor,
            content_datetime=when,
            extra_references=images + ([segmentation] if segmentation is not None else []),
        )
        report.objects.append(("SR.dcm", document))
    t3 = time.perf_counter()
    report.objects.extend((f"KEY_{n:03d}.dcm", ds) for n, ds in enumerate(images, 1))
    if segmentation is not None:
        report.objects.append(("SEG.dcm", segmentation))
    if images:
        report.objects.append(("KOS.dcm", key_images.build_kos(
            source, images, document, model_name=spec.name, model_version=spec.version,
            content_datetime=when, uids=uids,
        )))
    t4 = time.perf_counter()
    for name, ds in report.objects:
        verdict = require_valid(ds, name, analysis.study_uid)
        report.warnings.extend(f"{name}: {w}" for w in verdict.warnings)
    t5 = time.perf_counter()
    report.timings_s = {
        "key_images": round(t1 - t0, 4), "seg": round(t2 - t1, 4), "sr": round(t3 - t2, 4),
        "kos": round(t4 - t3, 4), "validate": round(t5 - t4, 4),
    }
    log.info("report: %d object(s), Lung-RADS %s, built in %.2f s, checked in %.2f s",
             len(report.objects), report.assessment.category, t4 - t0, t5 - t4)
    return report
