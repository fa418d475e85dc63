"""Inference speed: a 300-slice 512x512 chest CT through both reference models.

    .venv/bin/python bench/inference.py            # needs the `train` extra for the torch reference

Prints, for each model, slices/s and seconds per study on ONNX Runtime (CPU, --threads)
against torch eager running the same architecture on the same batches (the reference
measured in the same run; target: ONNX Runtime >= 2x torch), and on TensorRT where a GPU
and TensorRT are present. Then the whole analysis of the study as the service runs it,
from DICOM files on disk (scan + load + preprocess + both models + postprocess; target:
under 30 s on 2 cores), and the pipeline's peak numpy memory against the volume's int16
size (target: under 3x plus the model).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.pipeline import load_models, run_model  # noqa: E402
from inference.preprocess import batches, prepare  # noqa: E402
from inference.volume import Volume  # noqa: E402

CACHE = ROOT / "bench" / "out" / "cache"


def study(slices: int, seed: int) -> Path:
    """A phantom written as DICOM once and kept in bench/out/cache."""
    from dicom_node.ct_writer import write_ct_series
    from inference.phantom import generate_phantom

    folder = CACHE / f"phantom-{seed}-{slices}"
    if not (folder / "truth.json").exists():
        ph = generate_phantom(seed, 5, slices=slices, pixel_spacing=0.7, slice_spacing=1.0)
        v = ph.volume
        folder.mkdir(parents=True, exist_ok=True)
        write_ct_series(folder, v.hu, v.spacing, v.origin, v.direction, uid_seed=f"bench-{seed}-{slices}")
        (folder / "truth.json").write_text(json.dumps(ph.truth()))
    return folder


def torch_reference(spec, batches_list, threads: int):
    """Seconds for torch eager on the same batches (same architecture as the ONNX file;
    the weights of the last training run when cached, otherwise random: the arithmetic is
    the same)."""
    try:
        import torch
    except ImportError:
        return None, "torch not installed (pip install -e '.[train]')"
    from inference.training.nets import NODULE_WIDTHS, NoduleUNet, TriageCNN, WithSigmoid

    torch.set_num_threads(threads)
    weights = ROOT / "var" / "training-cache" / f"{spec.name}.pt"
    state = torch.load(weights, map_location="cpu") if weights.exists() else None
    if spec.task == "segmentation":
        # the cached weights' own widths (a training run may use others than the default)
        widths = tuple(state[f"enc.{i}.0.weight"].shape[0] for i in range(4)) if state else NODULE_WIDTHS
        net = NoduleUNet(spec.input.context_slices, widths)
    else:
        net = TriageCNN()
    note = "trained weights"
    if state is not None:
        net.load_state_dict(state)
    else:
        note = "random weights"
    model = WithSigmoid(net).eval()
    with torch.inference_mode():
        model(torch.from_numpy(batches_list[0]))  # warm-up
        t0 = time.perf_counter()
        for b in batches_list:
            model(torch.from_numpy(b))
        return time.perf_counter() - t0, note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7, help="phantom seed (an evaluation seed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    from dicom_node.series import load_series, scan_series
    from inference.engines import choose_engine_kind

    folder = study(args.slices, args.seed)
    models = load_models(["lung-nodule-ct", "lung-triage-ct"], engine="onnxruntime", threads=args.threads)
    report: dict = {"slices": args.slices, "threads": args.threads, "batch": args.batch, "models": {}}

    # the whole analysis, as the service runs it (warm engines; second run measured)
    from study_queue.analysis import analyze_paths

    analyze_paths([folder], models, args.batch)
    t0 = time.perf_counter()
    analysis = analyze_paths([folder], models, args.batch)
    total = time.perf_counter() - t0
    report["analysis_s"] = total
    report["analysis_timings_s"] = analysis.timings_s

    # the outputs (SR, key images, KOS, SEG), built twice: the first call in a process
    # warms highdicom up; the target is the second (under 1 s for a study with 5 findings)
    from study_queue.reports import build_report

    build_report(analysis, seg_enabled=True)
    t0 = time.perf_counter()
    rep = build_report(analysis, seg_enabled=True)
    report["report_s"] = time.perf_counter() - t0
    report["report_timings_s"] = rep.timings_s
    built = sum(v for k, v in rep.timings_s.items() if k != "validate")

    loaded = load_series(scan_series(folder)[0])
    volume = Volume(**loaded.volume_fields())
    print(f"study: {args.slices} slices 512x512 ({volume.hu.nbytes / 1e6:.0f} MB int16), "
          f"ONNX Runtime on CPU with {args.threads} threads, batch {args.batch}")
    print(f"{'model':<16} {'engine':<22} {'slices/s':>9} {'s/study':>8} {'ratio':>7}")
    for model in models:
        spec = model.spec
        grid = prepare(volume, spec.input)
        bl = [b for _, b in batches(grid, spec.input, args.batch)]
        n = sum(len(b) for b in bl)
        model.engine.infer(bl[0])
        t0 = time.perf_counter()
        for b in bl:
            model.engine.infer(b)
        ort_s = time.perf_counter() - t0
        row = {"model_slices": n, "onnxruntime_s": ort_s}
        print(f"{spec.name:<16} {'onnxruntime (cpu)':<22} {n / ort_s:>9.1f} {ort_s:>8.2f} {'1.00x':>7}")
        if not args.no_torch:
            torch_s, note = torch_reference(spec, bl, args.threads)
            if torch_s is None:
                print(f"{spec.name:<16} {'torch eager':<22} skipped: {note}")
            else:
                row.update(torch_s=torch_s, torch_weights=note, onnxruntime_vs_torch=torch_s / ort_s)
                print(f"{spec.name:<16} {'torch eager':<22} {n / torch_s:>9.1f} {torch_s:>8.2f} "
                      f"{torch_s / ort_s:>6.2f}x  (ONNX Runtime is {torch_s / ort_s:.1f}x faster; target >= 2x)")
        kind, reason = choose_engine_kind("auto")
        if kind == "tensorrt":
            from inference.engines import load_engine

            trt = load_engine(spec.onnx_path, "tensorrt", max_batch=args.batch)
            trt.infer(bl[0])
            t0 = time.perf_counter()
            for b in bl:
                trt.infer(b)
            trt_s = time.perf_counter() - t0
            row["tensorrt_s"] = trt_s
            print(f"{spec.name:<16} {'tensorrt':<22} {n / trt_s:>9.1f} {trt_s:>8.2f} {ort_s / trt_s:>6.2f}x")
        else:
            row["tensorrt"] = f"not run: {reason}"
        report["models"][spec.name] = row
    if "tensorrt" in next(iter(report["models"].values())):
        print(f"tensorrt: not run ({next(iter(report['models'].values()))['tensorrt']})")

    # peak numpy memory of the pipeline beside the volume (tracemalloc sees numpy's buffers)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for model in models:
        run_model(model, volume, args.batch)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    report["pipeline_peak_bytes"] = peak
    report["volume_bytes"] = volume.hu.nbytes
    t = analysis.timings_s
    stages = ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k != "total")
    print(f"whole analysis from DICOM: {total:.1f} s (target < 30 s); stages (s): {stages}")
    print(f"outputs for {len(analysis.findings)} findings ({len(rep.objects)} objects): built in {built:.2f} s "
          f"(target < 1 s after warm-up), checked (dciodvfy) in {rep.timings_s['validate']:.2f} s")
    print(f"pipeline peak memory beside the volume: {peak / 1e6:.0f} MB = {peak / volume.hu.nbytes:.2f}x the int16 volume "
          f"(target < 3x plus the model)")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"inference-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"raw numbers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
