"""The nodule model's second stage: a logistic regression that rescores each candidate
region from its 3D features (``[rescore]`` in model.toml, applied by
:func:`inference.postprocess.segmentation_findings`).

The 2.5D network judges one slice at a time; its surest false positives are vessels
crossing a single slice, which a region's 3D shape gives away. The rescorer is fitted on
phantoms that neither the network's training nor any evaluation or validation used, so a
threshold chosen on the validation phantoms and figures measured on the evaluation
phantoms stay honest.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from ..spec import RESCORE_FEATURES, RescoreSpec, SpecError, load_spec


def candidate_table(job) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, F], is_nodule [N]) of every candidate region the network in
    ``model_dir`` finds on phantom ``seed``, in the order of ``RESCORE_FEATURES``. A
    candidate is a nodule when its centre lies within a truth nodule's radius (the hit rule
    of bench/accuracy.py)."""
    seed, model_dir = job
    from ..engines.onnxruntime_engine import OnnxRuntimeEngine
    from ..phantom import generate_phantom
    from ..pipeline import LoadedModel, run_model

    spec = load_spec(model_dir)
    if not spec.output.region_threshold:
        raise SpecError(f"{spec.path}/model.toml [output].region_threshold: needed to fit a rescorer (regions are cut there)")
    # the network's own candidates: no rescorer, no threshold beyond the region cut
    spec = dataclasses.replace(spec, rescore=RescoreSpec())
    engine = OnnxRuntimeEngine(spec.onnx_path, threads=1)
    ph = generate_phantom(seed)
    found, _ = run_model(LoadedModel(spec, engine), ph.volume, min_probability=0.0)
    truth = [(np.asarray(n.center_lps_mm), n.diameter_mm / 2) for n in ph.nodules]
    x = np.array([[f.features[name] for name in RESCORE_FEATURES] for f in found], dtype=np.float64).reshape(-1, len(RESCORE_FEATURES))
    y = np.array([any(np.linalg.norm(np.asarray(f.center_lps_mm) - c) <= r for c, r in truth) for f in found], dtype=np.float64)
    return x, y


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias of an L2-regularised logistic regression by Newton's method, on
    standardised features (the penalty then weighs every feature alike), returned for the
    raw features."""
    if len(y) == 0 or y.min() == y.max():
        raise ValueError("fitting a rescorer needs candidates of both kinds (nodules and false positives)")
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd == 0] = 1.0
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    penalty = np.diag(np.r_[np.full(z.shape[1] - 1, l2), 0.0])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -60, 60)))
        grad = z.T @ (p - y) + penalty @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + penalty
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    weights = w[:-1] / sd
    bias = float(w[-1] - (weights * mu).sum())
    return weights, bias


def rescore_table(weights, bias: float, note: str) -> str:
    """The ``[rescore]`` table for model.toml."""
    lines = [f"[rescore]  # {note}", "features = ["]
    lines += [f'    "{name}",' for name in RESCORE_FEATURES]
    lines += ["]", "weights = ["]
    lines += [f"    {w:.6g},  # {name}" for name, w in zip(RESCORE_FEATURES, weights)]
    lines += ["]", f"bias = {bias:.6g}", ""]
    return "\n".join(lines)


def write_rescore(toml: Path, table: str) -> None:
    """Put ``table`` in ``toml`` in place of its ``[rescore]`` table (which runs to the next
    table or the end), or at its end; everything else stays as written. A file that would
    no longer load is put back as it was."""
    old = toml.read_text()
    match = re.search(r"^\[rescore\].*?(?=^\[|\Z)", old, flags=re.S | re.M)
    if match:
        text = old[: match.start()] + table + old[match.end():]
    else:
        text = old.rstrip("\n") + "\n\n" + table
    toml.write_text(text)
    try:
        load_spec(toml.parent)
    except SpecError:
        toml.write_text(old)
        raise
