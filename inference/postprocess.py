"""From network output to findings: connected regions of a probability map become
nodules with a centre, long-axis diameter, volume, type and probability; slice
probabilities become a study-level classification."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .findings import Classification, Finding
from .preprocess import Grid
from .spec import ModelSpec
from .volume import Volume

CANDIDATE_FRACTION = 0.5
"""Regions are cut at this fraction of the reporting threshold, so a finding's extent does
not shrink to its most certain core, and scored by their highest probability."""

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def _long_axis_mm(mask2d: np.ndarray, row_mm: float, col_mm: float) -> float:
    """Longest in-plane extent (maximal Feret diameter) of a region, in mm, counting each
    pixel's full width (a single pixel measures one pixel, not zero)."""
    pts = np.argwhere(mask2d).astype(np.float64)
    if len(pts) == 0:
        return 0.0
    if len(pts) > 1500:  # only the outline can hold the extremes
        edge = mask2d & ~ndimage.binary_erosion(mask2d)
        pts = np.argwhere(edge).astype(np.float64)
    pts *= (row_mm, col_mm)
    d = pts[:, None, :] - pts[None, :, :]
    longest = float(np.sqrt((d**2).sum(-1)).max())
    return longest + (row_mm + col_mm) / 2


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


def segmentation_findings(prob: np.ndarray, grid: Grid, volume: Volume, spec: ModelSpec, min_probability: float | None = None) -> list[Finding]:
    """Findings from a probability map on the model grid (``prob`` covers ``grid.valid``).

    ``min_probability`` defaults to the spec's reporting threshold; evaluations pass a lower
    one to see every candidate with its score (for FROC curves)."""
    out = spec.output
    report_at = out.threshold if min_probability is None else min_probability
    cut = min(report_at, out.threshold) * CANDIDATE_FRACTION
    labels, n = ndimage.label(prob >= cut, structure=_CONNECTIVITY)
    if n == 0:
        return []
    voxel_mm3 = float(np.prod(grid.spacing))
    findings = []
    midline_x = float(volume.index_to_lps(grid.to_source_index(np.array(grid.valid) / 2))[0])
    for idx, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        comp = labels[box] == idx
        p = np.where(comp, prob[box], 0.0)
        score = float(p.max())
        if score < report_at:
            continue
        core = comp & (prob[box] >= 0.5)  # the segmentation's own boundary
        region = core if core.any() else comp
        volume_mm3 = float(region.sum()) * voxel_mm3
        if volume_mm3 < out.min_component_mm3:
            continue
        w = p * region
        coords = np.argwhere(region)
        weights = w[region]
        centre_grid = (coords * weights[:, None]).sum(0) / max(weights.sum(), 1e-9)
        centre_grid += [s.start for s in box]
        centre_src = grid.to_source_index(centre_grid)
        centre = volume.index_to_lps(centre_src)
        diameter = max(_long_axis_mm(region[k], grid.spacing[1], grid.spacing[2]) for k in range(region.shape[0]))
        mask, offset = _source_mask(region, box, grid, volume)
        sl = tuple(slice(o, o + s) for o, s in zip(offset, mask.shape))
        hu_inside = volume.hu[sl][mask]
        k_src = int(np.clip(round(centre_src[0]), 0, volume.shape[0] - 1))
        findings.append(
            Finding(
                model=spec.name,
                model_version=spec.version,
                label=spec.codes["finding"].meaning.lower() if "finding" in spec.codes else "finding",
                center_lps_mm=tuple(float(c) for c in centre),
                diameter_mm=diameter,
                volume_mm3=volume_mm3,
                type=nodule_type(hu_inside, spec),
                probability=score,
                laterality="right" if centre[0] < midline_x else "left",
                center_index=tuple(float(c) for c in centre_src),
                slice_index=k_src,
                mask=mask,
                mask_offset=offset,
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
