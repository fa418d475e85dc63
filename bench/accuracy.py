"""Accuracy of the reference models on held-out phantoms.

    .venv/bin/python bench/accuracy.py                 # 50 evaluation phantoms (seeds 0-49)
    .venv/bin/python bench/accuracy.py --seeds 0-9     # a quick look

lung-nodule-ct: the LUNA16 FROC metric, i.e. the mean sensitivity at 1/8, 1/4, 1/2, 1, 2,
4 and 8 false positives per scan. A candidate is a hit when its centre lies within the
radius of a truth nodule. Each nodule counts once, at its best-scoring candidate. Other
candidates inside a nodule are neither hits nor false positives. Everything else is a
false positive. Also reported: sensitivity per size at the model's reporting threshold,
the sensitivity for nodules >= 6 mm at <= 1 false positive per scan, and size and
volume errors of the hits.

lung-triage-ct: ROC AUC of the study-level probability against "has at least one
nodule". The evaluation phantoms plus ``--negatives`` extra phantoms without nodules.

Evaluation seeds are below inference.training.TRAIN_SEED_START, so no evaluated phantom
was used in training. Validation seeds (inference.training.VALIDATION_SEED_START up, e.g.
``--seeds 200000-200019``) are for choosing a model's reporting threshold: the threshold
at <= 1 false positive per scan that a run prints, so that the choice never looks at the
evaluation phantoms. The volumes go straight from the phantom generator to the pipeline
(the DICOM round trip is lossless and tested separately).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.phantom import generate_phantom  # noqa: E402
from inference.pipeline import load_models, run_model  # noqa: E402
from inference.training import TRAIN_SEED_START, VALIDATION_SEED_START  # noqa: E402

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SIZE_BINS = ((3, 6), (6, 10), (10, 20), (20, 30.01))


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            seeds.extend(range(int(a), int(b) + 1))
        else:
            seeds.append(int(part))
    bad = [s for s in seeds if TRAIN_SEED_START <= s < VALIDATION_SEED_START]
    if bad:
        raise SystemExit(f"accuracy: seed {bad[0]} is a training seed ({TRAIN_SEED_START} to {VALIDATION_SEED_START - 1})")
    if any(s >= VALIDATION_SEED_START for s in seeds) and any(s < TRAIN_SEED_START for s in seeds):
        raise SystemExit(f"accuracy: evaluation seeds (below {TRAIN_SEED_START}) and validation seeds "
                         f"({VALIDATION_SEED_START} up) do not mix in one run")
    return seeds


def match(candidates, nodules):
    """(hit nodule index or -1 for a false positive or None for 'inside an already-hit
    nodule', score) per candidate, best scores first."""
    order = sorted(candidates, key=lambda c: -c[0])
    taken = set()
    out = []
    for score, centre in order:
        inside = [
            n for n, nod in enumerate(nodules)
            if np.linalg.norm(np.asarray(centre) - np.asarray(nod["center_lps_mm"])) <= nod["diameter_mm"] / 2
        ]
        if not inside:
            out.append((-1, score))
            continue
        free = [n for n in inside if n not in taken]
        if free:
            # the nearest not yet detected nodule
            n = min(free, key=lambda n: np.linalg.norm(np.asarray(centre) - np.asarray(nodules[n]["center_lps_mm"])))
            taken.add(n)
            out.append((n, score))
        else:
            out.append((None, score))
    return out


def froc(per_scan, n_scans: int, total_nodules: int):
    """Sensitivity at each FP rate: the best sensitivity whose FP/scan does not exceed it."""
    events = []  # (score, is_hit)
    for matched in per_scan:
        for n, score in matched:
            if n is None:
                continue
            events.append((score, n >= 0))
    events.sort(key=lambda e: -e[0])
    hits = fps = 0
    curve = [(0.0, 0.0, 1.0)]  # (fp per scan, sensitivity, threshold)
    # A threshold keeps every candidate of a score or none: tied candidates enter the
    # curve together, so a hit never counts ahead of a false positive with the same score.
    for i, (score, is_hit) in enumerate(events):
        if is_hit:
            hits += 1
        else:
            fps += 1
        if i + 1 == len(events) or events[i + 1][0] != score:
            curve.append((fps / n_scans, hits / max(total_nodules, 1), score))
    sens = []
    for rate in FP_RATES:
        best = max((s for f, s, _ in curve if f <= rate), default=0.0)
        sens.append(best)
    return sens, curve


def auc(scores, labels) -> float:
    """ROC AUC as the probability that a positive outscores a negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-49", help="evaluation phantom seeds, e.g. 0-49 or 0,3,7")
    ap.add_argument("--negatives", type=int, default=20, help="extra phantoms without nodules for the triage AUC")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--models", help="a models folder to measure instead of inference/models (a training run's --out)")
    args = ap.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    nodule, triage = load_models(["lung-nodule-ct", "lung-triage-ct"], engine="onnxruntime", threads=args.threads,
                                  search=[args.models] if args.models else None)
    threshold = nodule.spec.output.threshold
    per_scan, truths, nodules_all, triage_scores, triage_labels = [], [], [], [], []
    scan_seeds = []
    op_hits, op_fps = [], 0
    t_start = time.monotonic()
    neg_seeds = list(range(50_000, 50_000 + args.negatives))
    for seed in seeds + neg_seeds:
        extra = seed in neg_seeds
        ph = generate_phantom(seed, 0 if extra else None)
        truth = ph.truth()["nodules"]
        t0 = time.perf_counter()
        tri, _ = run_model(triage, ph.volume)
        triage_scores.append(tri.probability)
        triage_labels.append(bool(truth))
        if extra:
            print(f"seed {seed}: no nodules (triage only), triage {tri.probability:.3f}", flush=True)
            continue
        # every candidate region: with a rescorer the regions are cut at the spec's
        # region_threshold whatever the floor; without one a floor of 0.05 cuts them at 0.025
        found, _ = run_model(nodule, ph.volume, min_probability=0.0 if nodule.spec.rescore.features else 0.05)
        dt = time.perf_counter() - t0
        # match() answers per candidate in this order (a stable sort, best first), so the
        # finding behind each answer is known by position, never looked up by its score
        found = sorted(found, key=lambda f: -f.probability)
        matched = match([(f.probability, f.center_lps_mm) for f in found], truth)
        per_scan.append(matched)
        truths.append(truth)
        scan_seeds.append(seed)
        nodules_all.extend(truth)
        by_nodule = {n: (s, f) for (n, s), f in zip(matched, found) if n is not None and n >= 0}
        for i, nod in enumerate(truth):
            score, hit_f = by_nodule.get(i, (None, None))
            op_hits.append((nod, score is not None and score >= threshold, hit_f))
        op_fps += sum(1 for n, s in matched if n == -1 and s >= threshold)
        print(
            f"seed {seed}: {len(truth)} nodules, {sum(1 for n, s in matched if n is not None and n >= 0 and s >= threshold)} found, "
            f"{sum(1 for n, s in matched if n == -1 and s >= threshold)} false positives at {threshold}, "
            f"triage {tri.probability:.3f}, {dt:.1f} s",
            flush=True,
        )
    n_scans = len(per_scan)
    sens, curve = froc(per_scan, n_scans, len(nodules_all))
    score = float(np.mean(sens))
    # >= 6 mm at <= 1 FP/scan: the threshold where FP/scan first stays <= 1
    thr_1fp = min((t for f, _, t in curve if f <= 1.0), default=1.0)
    big = big_found = 0
    for truth, matched in zip(truths, per_scan):
        hits = {n: sc for n, sc in matched if n is not None and n >= 0}
        for i, nod in enumerate(truth):
            if nod["diameter_mm"] >= 6.0:
                big += 1
                big_found += hits.get(i, -1.0) >= thr_1fp
    sens_big_1fp = big_found / max(big, 1)
    print()
    print(f"lung-nodule-ct on {n_scans} held-out phantoms (seeds {args.seeds}), {len(nodules_all)} nodules, "
          f"{time.monotonic() - t_start:.0f} s")
    print("FROC sensitivity at " + ", ".join(f"{r:g}" for r in FP_RATES) + " FP/scan: " + ", ".join(f"{s:.3f}" for s in sens))
    print(f"FROC score (mean): {score:.3f}   (target >= 0.85)")
    print(f"sensitivity for nodules >= 6 mm at <= 1 FP/scan (threshold {thr_1fp:.3f}): {sens_big_1fp:.3f} "
          f"({big_found}/{big})   (target >= 0.95)")
    print(f"at the reporting threshold {threshold}: {op_fps / max(n_scans, 1):.2f} FP/scan")
    rows = []
    for lo, hi in SIZE_BINS:
        group = [(n, hit, f) for n, hit, f in op_hits if lo <= n["diameter_mm"] < hi]
        found = [f for n, hit, f in group if hit]
        d_err = [abs(f.diameter_mm - n["diameter_mm"]) for n, hit, f in group if hit]
        v_err = [abs(f.volume_mm3 - n["volume_mm3"]) / n["volume_mm3"] for n, hit, f in group if hit]
        rows.append({
            "size_mm": [lo, round(hi)], "nodules": len(group), "found": len(found),
            "sensitivity": len(found) / max(len(group), 1),
            "median_abs_diameter_error_mm": float(np.median(d_err)) if d_err else None,
            "median_rel_volume_error": float(np.median(v_err)) if v_err else None,
        })
        print(f"  {lo:>2}-{round(hi):<2} mm: {len(found):>3}/{len(group):<3} sensitivity {rows[-1]['sensitivity']:.3f}"
              + (f", median |diameter error| {rows[-1]['median_abs_diameter_error_mm']:.1f} mm, median volume error {rows[-1]['median_rel_volume_error']:.0%}" if d_err else ""))
    types = {}
    for n, hit, f in op_hits:
        if hit:
            t = types.setdefault(n["type"], [0, 0])
            t[0] += 1
            t[1] += f.type == n["type"]
    for t, (n_hit, n_ok) in sorted(types.items()):
        print(f"  type {t}: {n_ok}/{n_hit} found nodules typed correctly")
    tri_auc = auc(triage_scores, triage_labels)
    print(f"lung-triage-ct: ROC AUC {tri_auc:.3f} on {len(triage_scores)} phantoms "
          f"({sum(triage_labels)} with nodules, {len(triage_labels) - sum(triage_labels)} without)")
    # each nodule's best score (None: no candidate hit it), for looking into the misses
    per_nodule = []
    for seed, truth, matched in zip(scan_seeds, truths, per_scan):
        hits = {n: sc for n, sc in matched if n is not None and n >= 0}
        per_nodule += [{"seed": seed, "diameter_mm": round(nod["diameter_mm"], 1), "type": nod["type"],
                        "juxtapleural": nod.get("juxtapleural", False), "score": hits.get(i)} for i, nod in enumerate(truth)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"accuracy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "seeds": args.seeds, "scans": n_scans, "nodules": len(nodules_all),
        "froc": dict(zip([str(r) for r in FP_RATES], sens)), "froc_score": score,
        "sensitivity_ge6mm_at_1fp": sens_big_1fp, "threshold_1fp": thr_1fp,
        "fp_per_scan_at_threshold": op_fps / max(n_scans, 1), "by_size": rows,
        "types": types, "triage_auc": tri_auc, "per_nodule": per_nodule,
        "onnx_sha256": {m.spec.name: hashlib.sha256(m.spec.onnx_path.read_bytes()).hexdigest() for m in (nodule, triage)},
    }, indent=2))
    print(f"raw numbers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
