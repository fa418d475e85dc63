"""``pacs-ai phantom`` and ``pacs-ai analyze``: the models without a network.

- ``phantom`` writes a synthetic chest CT study (volume from ``inference.phantom``,
  DICOM encoding by ``dicom_node.ct_writer``) with its ground truth as ``truth.json``;
- ``analyze`` runs the configured models on DICOM files or folders and writes the
  outputs a PACS would receive (SR, key images, KOS, optionally SEG) and ``findings.json``
  into the output folder, for a look before going live and for tests.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path

from .errors import UsageError

PROG = "pacs-ai"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return value


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def _inputs_datetime(paths) -> _dt.datetime:
    """The newest modification time of the input files: the outputs' content date and time,
    so that analysing the same files again writes the same bytes."""
    newest = 0.0
    for p in map(Path, paths):
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        newest = max([newest] + [f.stat().st_mtime for f in files])
    return _dt.datetime.fromtimestamp(int(newest))


def cmd_phantom(args: argparse.Namespace) -> int:
    from dicom_node.ct_writer import write_ct_series
    from inference.phantom import generate_phantom

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.glob("*.dcm")):
        raise UsageError(f"--out {out}: already holds DICOM files; give an empty or new folder")
    if args.nodules is not None and args.nodules > 20:
        raise UsageError("--nodules: at most 20")
    if args.slices is not None and not 8 <= args.slices <= 1000:
        raise UsageError("--slices: between 8 and 1000")
    phantom = generate_phantom(args.seed, args.nodules, slices=args.slices)
    v = phantom.volume
    out.mkdir(parents=True, exist_ok=True)
    files = write_ct_series(
        out,
        v.hu,
        v.spacing,
        v.origin,
        v.direction,
        uid_seed=f"pacs-ai-phantom-{args.seed}-{args.nodules}-{args.slices}",
        series_description="Synthetic chest CT (pacs-ai phantom)",
        patient_id=f"PHANTOM-{args.seed}",
    )
    _write_json(out / "truth.json", phantom.truth())
    n = len(phantom.nodules)
    print(
        f"wrote {len(files)} CT images ({v.shape[0]}x{v.shape[1]}x{v.shape[2]}, {v.spacing[1]:.2f} mm pixels, "
        f"{v.spacing[0]:.2f} mm slices) and truth.json with {n} nodule{'s' if n != 1 else ''} to {out}"
    )
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from dicom_node.errors import DicomNodeError
    from dicom_node.validate import OutputInvalid
    from inference.engines import EngineError
    from inference.pipeline import load_models
    from inference.spec import SpecError

    from .analysis import AnalysisError, analyze_paths, findings_document
    from .cli import _settings
    from .reports import build_report

    settings = _settings(args)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise UsageError(f"{missing[0]}: no such file or folder")
    names = args.model or list(settings.inference.models)
    try:
        models = load_models(names, engine=args.engine or settings.inference.engine, threads=args.threads)
    except (SpecError, EngineError) as exc:
        raise UsageError(str(exc)) from None
    try:
        analysis = analyze_paths(args.paths, models, batch_size=settings.inference.batch_size)
    except (AnalysisError, DicomNodeError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = build_report(
            analysis,
            ae_title=settings.node.ae_title,
            sr_enabled=settings.outputs.sr,
            key_images_enabled=settings.outputs.key_images,
            seg_enabled=settings.outputs.seg or args.seg,
            max_key_images=settings.outputs.max_key_images,
            content_datetime=_inputs_datetime(args.paths),
        )
    except (DicomNodeError, OutputInvalid) as exc:
        print(f"{PROG}: error: the outputs could not be built: {exc}", file=sys.stderr)
        return 1
    written = report.write(out)
    analysis.timings_s.update({f"report:{k}": v for k, v in report.timings_s.items()})
    doc = findings_document(analysis, written, report.assessment.category if report.assessment else None)
    if report.assessment:
        doc["lung_rads_management"] = report.assessment.management
        doc["lung_rads_reason"] = report.assessment.reason
    _write_json(out / "findings.json", doc)
    for name, reasons in analysis.skipped.items():
        print(f"{name}: no matching series: {'; '.join(reasons)}")
    for c in analysis.classifications:
        print(f"{c.model} {c.model_version}: {c.label}: probability {c.probability:.3f} ({'positive' if c.positive else 'negative'})")
    findings = analysis.findings
    print(f"{len(findings)} finding{'s' if len(findings) != 1 else ''} in {analysis.timings_s.get('total', 0):.1f} s")
    for n, f in enumerate(findings, 1):
        x, y, z = f.center_lps_mm
        print(
            f"  {n}. {f.label}, {f.type}, {f.diameter_mm:.1f} mm, {f.volume_mm3:.0f} mm3, {f.laterality} lung, "
            f"probability {f.probability:.2f}, at ({x:.1f}, {y:.1f}, {z:.1f}) mm LPS, slice {f.slice_index + 1}"
        )
    if report.assessment:
        print(f"Lung-RADS {report.assessment.version} category {report.assessment.category} "
              f"({report.assessment.descriptor}): {report.assessment.management}")
    counts: dict[str, int] = {}
    for line in report.warnings:
        counts[line] = counts.get(line, 0) + 1
    for line, n in counts.items():
        print(f"  validator warning: {line}" + (f" ({n} times)" if n > 1 else ""))
    print(f"wrote {', '.join(written + ['findings.json'])} to {out} (demonstration models, not for clinical use)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("phantom", help="write a synthetic chest CT study (DICOM) and its ground truth (truth.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write into (new or empty)")
    p.add_argument("--seed", type=_positive_int, default=0, help="phantom seed (default 0); the same seed writes the same study")
    p.add_argument("--nodules", type=_positive_int, help="how many nodules (default: 0 to 6, drawn from the seed)")
    p.add_argument("--slices", type=_positive_int, help="number of slices (default: 80 to 400, drawn from the seed)")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("analyze", help="run the models on DICOM files or folders; write the SR, key images and findings.json (no network)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders of one study")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for findings.json and the outputs")
    p.add_argument("--model", action="append", metavar="NAME", help="model to run (repeatable; default: inference.models)")
    p.add_argument("--engine", choices=["auto", "tensorrt", "onnxruntime"], help="override inference.engine")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for ONNX Runtime (default 2)")
    p.add_argument("--seg", action="store_true", help="also write a DICOM Segmentation (as outputs.seg = true)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.set_defaults(func=cmd_analyze)
