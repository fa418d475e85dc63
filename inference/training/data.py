"""Training samples cut from phantoms, prepared by the same code the service runs
(:mod:`inference.preprocess`), so the networks see in training what they see in use."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..phantom import generate_phantom
from ..preprocess import Grid, prepare, resample, region_bbox
from ..spec import InputSpec, RescoreSpec

PATCH = 64
SAMPLES_VERSION = 2  # bump when sampling changes, so cached samples are not reused


def _labels_on(grid: Grid, labels: np.ndarray, bbox) -> np.ndarray:
    """Nearest-neighbour labels on the model grid (before padding)."""
    src = labels[bbox]
    shape = grid.valid
    return ndimage.affine_transform(src, grid.scale, output_shape=shape, order=0, mode="constant", cval=0)


def _pad_like(arr: np.ndarray, shape) -> np.ndarray:
    pads = [(0, s - a) for s, a in zip(shape, arr.shape)]
    return np.pad(arr, pads) if any(p[1] for p in pads) else arr


def nodule_samples(ph, spec: InputSpec, per_nodule: int = 16, random_lung: int = 16, hard: int = 80, edges: int = 24, body: int = 8):
    """(patches int16 [N, C, P, P], masks uint8 [N, P, P]) from one phantom.

    Patches centre on nodule voxels (with jitter, so nodules appear anywhere in the
    patch and at their edge slices), on random lung and on vessel/airway walls inside the
    lung: the hard negatives a nodule detector must learn to reject."""
    rng = np.random.default_rng(ph.seed + 7)
    bbox = region_bbox(ph.volume, spec.crop)
    grid = prepare(ph.volume, spec)
    lab = _pad_like(_labels_on(grid, ph.labels, bbox), grid.hu.shape)
    lung = _pad_like(_labels_on(grid, ph.lung_mask.view(np.uint8), bbox), grid.hu.shape).astype(bool)
    hu = grid.hu
    nz, ny, nx = hu.shape
    half = PATCH // 2
    ctx = spec.context_slices // 2
    padded = np.pad(hu, ((ctx, ctx), (half, half), (half, half)), mode="edge")
    lab_p = np.pad(lab, ((0, 0), (half, half), (half, half)))
    centres = []
    n_nod = int(lab.max())
    for n in range(1, n_nod + 1):
        vox = np.argwhere(lab == n)
        if len(vox) == 0:
            continue
        for _ in range(per_nodule):
            k, j, i = vox[rng.integers(len(vox))]
            j += rng.integers(-20, 21)
            i += rng.integers(-20, 21)
            centres.append((k, j, i))
    lung_vox = np.argwhere(lung & (hu < -600))
    if len(lung_vox):
        for _ in range(random_lung):
            centres.append(tuple(lung_vox[rng.integers(len(lung_vox))]))
    # vessels and airway walls inside the lung: nodule-sized tubes, forks and crossings
    hard_vox = np.argwhere(lung & (hu > -450) & (lab == 0))
    if len(hard_vox):
        for _ in range(hard):
            centres.append(tuple(hard_vox[rng.integers(len(hard_vox))]))
    # the lung's edges: chest wall, mediastinum, heart border and the diaphragm's dome
    edge_vox = np.argwhere(ndimage.binary_dilation(lung, iterations=2) & ~lung & (lab == 0))
    if len(edge_vox):
        for _ in range(edges):
            centres.append(tuple(edge_vox[rng.integers(len(edge_vox))]))
    # anywhere in the crop: bone, soft tissue, trachea, table
    for _ in range(body):
        centres.append((rng.integers(nz), rng.integers(ny), rng.integers(nx)))
    patches = np.empty((len(centres), spec.context_slices, PATCH, PATCH), dtype=np.int16)
    masks = np.empty((len(centres), PATCH, PATCH), dtype=np.uint8)
    for n, (k, j, i) in enumerate(centres):
        k = int(np.clip(k, 0, nz - 1))
        j = int(np.clip(j, 0, ny - 1))
        i = int(np.clip(i, 0, nx - 1))
        patches[n] = padded[k : k + 2 * ctx + 1, j : j + PATCH, i : i + PATCH]
        masks[n] = lab_p[k, j : j + PATCH, i : i + PATCH] > 0
    return patches, masks


def triage_samples(ph, spec: InputSpec, negatives: int = 8):
    """(slices int16 [N, 1, H, W], labels uint8 [N]) from one phantom: every slice that
    shows a nodule, and some that do not."""
    rng = np.random.default_rng(ph.seed + 11)
    bbox = region_bbox(ph.volume, spec.crop)
    grid = resample(ph.volume, bbox, spec.spacing_mm, spec.size)
    lab = _labels_on(grid, ph.labels, bbox)
    positive = lab.reshape(lab.shape[0], -1).max(axis=1) > 0
    pos = np.flatnonzero(positive)
    neg = np.flatnonzero(~positive)
    neg = rng.choice(neg, size=min(len(neg), max(negatives, len(pos))), replace=False) if len(neg) else neg
    idx = np.concatenate([pos, neg]).astype(int)
    return grid.hu[idx][:, None], positive[idx].astype(np.uint8)


def samples_from_seed(seed: int, nodule_spec: InputSpec, triage_spec: InputSpec):
    """Both models' samples from one phantom (generating it is the expensive part)."""
    ph = generate_phantom(seed, with_labels=True, with_lung_mask=True)
    return nodule_samples(ph, nodule_spec), triage_samples(ph, triage_spec)


def cached_samples(job) -> str:
    """Samples of one seed, saved as ``seed-N.npz`` in the cache folder (made once)."""
    seed, nodule_input, triage_input, cache = job
    path = Path(cache) / f"seed-{seed}.npz"
    if not path.exists():
        (patches, masks), (slices, labels) = samples_from_seed(seed, nodule_input, triage_input)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, patches=patches, masks=masks, slices=slices, labels=labels)
        os.replace(tmp, path)
    return str(path)


def mined_negatives(job) -> str:
    """Hard negatives of one training phantom: patches centred on what the current network
    calls a nodule where there is none (vessel forks, vessel ends at the pleura, airway
    walls). Saved as ``mined-N.npz`` in the cache folder."""
    seed, model_dir, cache, threshold = job
    path = Path(cache) / f"mined-{seed}.npz"
    if path.exists():
        return str(path)
    from ..engines.onnxruntime_engine import OnnxRuntimeEngine
    from ..pipeline import LoadedModel, run_model
    from ..spec import load_spec

    spec = load_spec(model_dir)
    # The network mid-training is exported with a plain sigmoid: cut its regions at half of
    # ``threshold`` (a logit of -1.1 at 0.5), whatever the published spec says for the
    # temperature-scaled final export.
    # No rescorer either: the one in model.toml belongs to the previous network.
    spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, threshold=threshold, region_threshold=0.0),
                               rescore=RescoreSpec())
    engine = OnnxRuntimeEngine(spec.onnx_path, threads=1)
    ph = generate_phantom(seed, with_labels=True)
    found, _ = run_model(LoadedModel(spec, engine), ph.volume, min_probability=threshold)
    truth = [(np.asarray(n.center_lps_mm), n.diameter_mm / 2) for n in ph.nodules]
    false = [f for f in found if all(np.linalg.norm(np.asarray(f.center_lps_mm) - c) > r + 3.0 for c, r in truth)]
    bbox = region_bbox(ph.volume, spec.input.crop)
    grid = prepare(ph.volume, spec.input)
    lab = _pad_like(_labels_on(grid, ph.labels, bbox), grid.hu.shape)
    half, ctx = PATCH // 2, spec.input.context_slices // 2
    padded = np.pad(grid.hu, ((ctx, ctx), (half, half), (half, half)), mode="edge")
    lab_p = np.pad(lab, ((0, 0), (half, half), (half, half)))
    rng = np.random.default_rng(seed + 13)
    patches, masks = [], []
    for f in false:
        centre = (np.asarray(f.center_index) - grid.offset) / grid.scale
        for _ in range(2):  # two jittered views of each
            k, j, i = np.rint(centre).astype(int) + [0, *rng.integers(-8, 9, size=2)]
            k = int(np.clip(k, 0, grid.hu.shape[0] - 1))
            j = int(np.clip(j, 0, grid.hu.shape[1] - 1))
            i = int(np.clip(i, 0, grid.hu.shape[2] - 1))
            patches.append(padded[k : k + 2 * ctx + 1, j : j + PATCH, i : i + PATCH])
            masks.append(lab_p[k, j : j + PATCH, i : i + PATCH] > 0)
    shape = (0, spec.input.context_slices, PATCH, PATCH)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        patches=np.stack(patches) if patches else np.zeros(shape, np.int16),
        masks=np.stack(masks).astype(np.uint8) if masks else np.zeros((0, PATCH, PATCH), np.uint8),
    )
    os.replace(tmp, path)
    return str(path)
