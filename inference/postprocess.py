"""From network output to findings: connected regions of a probability map become
nodules with a centre, long-axis diameter, volume, type and probability; slice
probabilities become a study-level classification."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .findings import Classification, Finding
from .preprocess import Grid, lung_region
from .spec import ModelSpec
from .volume import Volume

CANDIDATE_FRACTION = 0.5
"""Regions are cut at this fraction of the reporting threshold (unless the spec sets
``region_threshold``), so a finding's extent does not shrink to its most certain core, and
scored by their highest probability."""

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def axes_mm(mask2d: np.ndarray, row_mm: float, col_mm: float) -> tuple[float, float]:
    """(long axis, short axis) of a region on one slice, in mm: the maximal Feret diameter
    and the longest extent perpendicular to it, each counting a pixel's full width (one
    pixel measures one pixel, not zero), as a radiologist's calipers would."""
    pts = np.argwhere(mask2d).astype(np.float64)
    if len(pts) == 0:
        return 0.0, 0.0
    if len(pts) > 1500:  # only the outline can hold the extremes
        edge = mask2d & ~ndimage.binary_erosion(mask2d)
        pts = np.argwhere(edge).astype(np.float64)
    pts *= (row_mm, col_mm)
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    a, b = np.unravel_index(int(d2.argmax()), d2.shape)
    pixel = (row_mm + col_mm) / 2
    longest = float(np.sqrt(d2[a, b]))
    if longest == 0.0:
        return pixel, pixel
    u = (pts[b] - pts[a]) / longest
    across = pts @ np.array([-u[1], u[0]])
    return longest + pixel, float(across.max() - across.min()) + pixel


def _largest_axes(mask3d: np.ndarray, row_mm: float, col_mm: float) -> tuple[float, float]:
    """Long and short axis on the slice where the long axis is longest."""
    best = (0.0, 0.0)
    for k in range(mask3d.shape[0]):
        if mask3d[k].any():
            axes = axes_mm(mask3d[k], row_mm, col_mm)
            if axes[0] > best[0]:
                best = axes
    return best


def nodule_type(hu_values: np.ndarray, spec: ModelSpec) -> str:
    """Solid, part-solid or ground-glass from the share of voxels denser than ``solid_hu``
    (Fleischner/Lung-RADS classes; the thresholds are in the model spec)."""
    if hu_values.size == 0:
        return "solid"
    frac = float(np.mean(hu_values > spec.output.solid_hu))
    if frac >= spec.output.solid_fraction:
        return "solid"
    if frac >= spec.output.part_solid_fraction:
        return "part-solid"
    return "ground-glass"


def _source_mask(comp: np.ndarray, grid_box, grid: Grid, volume: Volume):
    """The region at source resolution: nearest model voxel for every source voxel of the
    box it covers. Returns (mask, source offset)."""
    lo = grid.to_source_index([s.start - 0.5 for s in grid_box])
    hi = grid.to_source_index([s.stop - 0.5 for s in grid_box])
    start = [max(0, int(np.ceil(a))) for a in lo]
    stop = [min(n, int(np.ceil(b))) for b, n in zip(hi, volume.shape)]
    shape = [max(1, b - a) for a, b in zip(start, stop)]
    # source index s -> model index (s - offset) / scale, relative to the component box
    scale = 1.0 / grid.scale
    shift = (np.asarray(start) - grid.offset) / grid.scale - np.array([s.start for s in grid_box])
    mask = ndimage.affine_transform(
        comp.astype(np.uint8), scale, offset=shift, output_shape=shape, order=0, mode="constant", cval=0
    ).astype(bool)
    return mask, tuple(start)


def region_features(region: np.ndarray, prob_box: np.ndarray, peak: float, hu_box: np.ndarray, spacing,
                    long_axis: float, short_axis: float) -> dict[str, float]:
    """The shape, probability and HU features of :data:`inference.spec.RESCORE_FEATURES` (the
    curvature ones come from :func:`hessian_features`) for one candidate region
    (a boolean mask on the model grid, with the probability and HU boxes around it)."""
    voxel_mm3 = float(np.prod(spacing))
    volume = float(region.sum()) * voxel_mm3
    slices = int(region.any(axis=(1, 2)).sum())
    z_extent = slices * float(spacing[0])
    mm = np.argwhere(region) * np.asarray(spacing, dtype=np.float64)
    # a voxel's own extent keeps a one-slice region's covariance from being singular
    cov = np.diag(np.asarray(spacing, dtype=np.float64) ** 2 / 12)
    if len(mm) > 1:
        cov = cov + np.cov(mm.T)
    ev = np.sort(np.linalg.eigvalsh(cov))
    hu = hu_box[region].astype(np.float64)
    p = min(max(peak, 1e-6), 1 - 1e-6)
    long_axis = max(long_axis, float(spacing[1]))
    short_axis = max(short_axis, float(spacing[2]))
    return {
        "logit": float(np.log(p / (1 - p))),
        "mean_probability": float(prob_box[region].mean()),
        "log_volume": float(np.log(volume)),
        "log_z_extent": float(np.log(z_extent)),
        "log_long_axis": float(np.log(long_axis)),
        "log_elongation": float(0.5 * np.log(ev[2] / ev[0])),
        "log_elongation_2": float(0.5 * np.log(ev[2] / ev[1])),
        "mean_hu": float(hu.mean()),
        "std_hu": float(hu.std()),
        "fill": volume / (np.pi / 6 * long_axis * short_axis * z_extent),
        "single_slice": float(slices == 1),
    }


HESSIAN_SCALES_MM = (1.5, 3.0)
"""Fixed scales of :func:`hessian_features`, beside the one fitted to each region."""


def hessian_features(hu: np.ndarray, centre, spacing, long_axis: float) -> dict[str, float]:
    """How blob-like the HU image is at a candidate's centre (a model-grid index): the
    eigenvalues l1 <= l2 <= l3 of the scale-normalised Hessian (Gaussian derivatives,
    sigma^2 * d2(HU)/dx dy in mm) at a scale fitted to the region and at fixed ones.

    A bright ball curves down along all three axes (l1, l2, l3 < 0 and alike), a vessel
    along two (l3 near 0), a wall along one. Small nodules and the vessel cross-sections
    they resemble differ here, where the 2.5D network sees a round spot in both."""
    sp = np.asarray(spacing, dtype=np.float64)
    radius = max(long_axis / 2, 1.5)
    scales = {"fitted": max(radius / 1.7, 1.0), "1_5mm": HESSIAN_SCALES_MM[0], "3mm": HESSIAN_SCALES_MM[1]}
    half = np.ceil(max(radius + 8.0, 3.0 * max(scales.values())) / sp).astype(int)
    c = np.clip(np.rint(np.asarray(centre, dtype=np.float64)).astype(int), 0, np.array(hu.shape) - 1)
    lo = np.maximum(c - half, 0)
    hi = np.minimum(c + half + 1, hu.shape)
    box = hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    at = tuple(c - lo)
    out = {}
    for name, sigma_mm in scales.items():
        h = np.empty((3, 3))
        for a in range(3):
            for b in range(a, 3):
                order = [0, 0, 0]
                order[a] += 1
                order[b] += 1
                d = ndimage.gaussian_filter(box, sigma_mm / sp, order=order, mode="nearest")
                h[a, b] = h[b, a] = d[at] / (sp[a] * sp[b]) * sigma_mm**2
        l1, _, l3 = np.linalg.eigvalsh(h)
        out[f"blob_{name}"] = float(max(-l3, 0.0) / (abs(l1) + 1e-3))
        out[f"curvature_{name}"] = float(np.log1p(max(-l1, 0.0)))
    return out


def rescored(features: dict[str, float], spec: ModelSpec) -> float:
    """The ``[rescore]`` classifier's probability for one candidate."""
    r = spec.rescore
    z = r.bias + sum(w * features[name] for name, w in zip(r.features, r.weights))
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0))))


def segmentation_findings(prob: np.ndarray, grid: Grid, volume: Volume, spec: ModelSpec, min_probability: float | None = None) -> list[Finding]:
    """Findings from a probability map on the model grid (``prob`` covers ``grid.valid``).

    ``min_probability`` defaults to the spec's reporting threshold; evaluations pass a lower
    one to see every candidate with its score (for FROC curves). A spec's
    ``region_threshold`` fixes where regions are cut whatever the threshold: a model whose
    probabilities are spread by a temperature (``sigmoid(logit / T)``) would otherwise merge
    whole vessel trees into one region at a low evaluation threshold.

    With a ``[rescore]`` table a finding's probability is the rescorer's, and the
    thresholds apply to it; the region's features are kept on ``Finding.features``."""
    out = spec.output
    rescoring = bool(spec.rescore.features)
    report_at = out.threshold if min_probability is None else min_probability
    cut = out.region_threshold or min(report_at, out.threshold) * CANDIDATE_FRACTION
    candidates = prob >= cut
    if out.within == "lungs":
        ny, nx = prob.shape[1:]
        candidates &= lung_region(grid.hu[:, :ny, :nx], grid.spacing)
    labels, n = ndimage.label(candidates, structure=_CONNECTIVITY)
    if n == 0:
        return []
    valid_hu = grid.hu[: prob.shape[0], : prob.shape[1], : prob.shape[2]]
    voxel_mm3 = float(np.prod(grid.spacing))
    findings = []
    midline_x = float(volume.index_to_lps(grid.to_source_index(np.array(grid.valid) / 2))[0])
    for idx, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        comp = labels[box] == idx
        p = np.where(comp, prob[box], 0.0)
        peak = float(p.max())
        if peak < report_at and not rescoring:
            continue
        core = comp & (prob[box] >= 0.5)  # the segmentation's own boundary
        region = core if core.any() else comp
        volume_mm3 = float(region.sum()) * voxel_mm3
        if volume_mm3 < out.min_component_mm3:
            continue
        long_axis, short_axis = _largest_axes(region, grid.spacing[1], grid.spacing[2])
        w = p * region
        coords = np.argwhere(region)
        weights = w[region]
        centre_grid = (coords * weights[:, None]).sum(0) / max(weights.sum(), 1e-9)
        centre_grid += [s.start for s in box]
        features = region_features(region, prob[box], peak, grid.hu[box], grid.spacing, long_axis, short_axis)
        features.update(hessian_features(valid_hu, centre_grid, grid.spacing, long_axis))
        score = rescored(features, spec) if rescoring else peak
        if score < report_at:
            continue
        centre_src = grid.to_source_index(centre_grid)
        centre = volume.index_to_lps(centre_src)
        mask, offset = _source_mask(region, box, grid, volume)
        sl = tuple(slice(o, o + s) for o, s in zip(offset, mask.shape))
        hu_box = volume.hu[sl]
        hu_inside = hu_box[mask]
        kind = nodule_type(hu_inside, spec)
        solid = 0.0
        if kind != "ground-glass":
            # the solid component's mean diameter (Lung-RADS sizes part-solid nodules by it)
            solid = float(np.mean(_largest_axes(mask & (hu_box > out.solid_hu), volume.spacing[1], volume.spacing[2])))
        k_src = int(np.clip(round(centre_src[0]), 0, volume.shape[0] - 1))
        findings.append(
            Finding(
                model=spec.name,
                model_version=spec.version,
                label=spec.codes["finding"].meaning.lower() if "finding" in spec.codes else "finding",
                center_lps_mm=tuple(float(c) for c in centre),
                diameter_mm=long_axis,
                volume_mm3=volume_mm3,
                type=kind,
                probability=score,
                laterality="right" if centre[0] < midline_x else "left",
                center_index=tuple(float(c) for c in centre_src),
                slice_index=k_src,
                mask=mask,
                mask_offset=offset,
                short_axis_mm=short_axis,
                solid_component_mm=solid if kind == "part-solid" else (long_axis + short_axis) / 2 if kind == "solid" else 0.0,
                features=features,
            )
        )
    findings.sort(key=lambda f: -f.probability)
    return findings[: out.max_findings] if min_probability is None else findings


def classification(slice_probs: np.ndarray, spec: ModelSpec) -> Classification:
    """A study-level result from per-slice probabilities (``max`` or the mean of the top 3)."""
    probs = np.asarray(slice_probs, dtype=np.float64).ravel()
    if probs.size == 0:
        value = 0.0
    elif spec.output.aggregate == "max":
        value = float(probs.max())
    else:
        value = float(np.sort(probs)[-3:].mean())
    return Classification(
        model=spec.name,
        model_version=spec.version,
        label=spec.output.label or spec.name,
        probability=value,
        positive=value >= spec.output.threshold,
        threshold=spec.output.threshold,
        slice_probabilities=[round(float(p), 4) for p in probs],
    )
