"""From a volume to the arrays a model takes, as its spec says: crop, resample, window, stack.

The same functions prepare training data (``inference/training``) and run in the
service, so what a model sees in use is what it saw in training.

Memory: the input volume is never copied whole as float. Cropping happens before
resampling and the resampled grid stays int16; float32 exists only one batch at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .spec import InputSpec
from .volume import Volume

LUNG_THRESHOLD_HU = -400
BODY_THRESHOLD_HU = -500


@dataclass
class Grid:
    """The model's grid inside the source volume: model voxel ``o`` (per axis) lies at the
    source's fractional index ``offset + o * scale``."""

    hu: np.ndarray  # int16 [k, j, i] on the model grid
    offset: np.ndarray  # (3,) source index of model voxel 0
    scale: np.ndarray  # (3,) source voxels per model voxel
    spacing: tuple[float, float, float]  # mm per model voxel
    valid: tuple[int, int, int] = (0, 0, 0)  # unpadded size (rows/columns may be padded)

    def to_source_index(self, index) -> np.ndarray:
        return self.offset + np.asarray(index, dtype=np.float64) * self.scale


def _decimated(volume: Volume, step_mm: float = 4.0):
    """A cheap look at the volume: about one voxel per ``step_mm`` in every direction."""
    steps = [max(1, int(round(step_mm / s))) for s in volume.spacing]
    return volume.hu[:: steps[0], :: steps[1], :: steps[2]], steps


def region_bbox(volume: Volume, region: str, margin_mm: float = 10.0) -> tuple[slice, slice, slice]:
    """Bounding box (source indices) of the lungs or the body, with a margin.

    Lungs: air below -400 HU inside the body, i.e. not connected to the air around the
    patient, found on a 4 mm decimated copy (a few milliseconds). When no lung is found
    the whole volume is returned, so a model still runs on an unusual scan.
    """
    full = tuple(slice(0, n) for n in volume.shape)
    if region == "none":
        return full
    small, steps = _decimated(volume)
    if region == "body":
        mask = small > BODY_THRESHOLD_HU
    else:
        air = small < LUNG_THRESHOLD_HU
        labels, n = ndimage.label(air)
        if n == 0:
            return full
        # in-plane border components are the air around the patient (checked per slice, so
        # a trachea opening at the top or bottom of the scan does not count)
        border = np.zeros(n + 1, dtype=bool)
        for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
            border[np.unique(edge)] = True
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[border] = 0
        sizes[0] = 0
        if sizes.max() == 0:
            return full
        keep = sizes >= max(1, int(0.05 * sizes.max()))
        mask = keep[labels]
    if not mask.any():
        return full
    out = []
    for axis, (n, step, sp) in enumerate(zip(volume.shape, steps, volume.spacing)):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        pad = int(np.ceil(margin_mm / sp)) + step
        out.append(slice(max(0, idx[0] * step - pad), min(n, idx[-1] * step + step + pad)))
    return tuple(out)


def lung_region(hu: np.ndarray, spacing, margin_mm: float = 6.0) -> np.ndarray:
    """Where a lung finding may lie on a grid: the lungs with everything inside them
    (vessels, nodules) and a margin for nodules on the pleura.

    Lungs are the air (below -400 HU) not connected to the in-plane border of the grid,
    i.e. not the air around the patient (the trachea may leave through the top or bottom
    and still count), holes filled slice by slice, then grown by ``margin_mm``.
    """
    air = hu < LUNG_THRESHOLD_HU
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    border = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[np.unique(edge)] = True
    border[0] = True
    lungs = ~border[labels]
    for k in range(lungs.shape[0]):
        if lungs[k].any():
            lungs[k] = ndimage.binary_fill_holes(lungs[k])
    steps = [max(1, int(round(margin_mm / s))) for s in spacing]
    # a box grown with a maximum filter: separable, so about 20x faster than
    # binary_dilation with the same box as its structure
    grown = ndimage.maximum_filter(lungs.view(np.uint8), size=[2 * st + 1 for st in steps], mode="constant")
    return grown.view(bool)


def resample(volume: Volume, bbox, spacing_mm, size=()) -> Grid:
    """Linear resampling of the box ``bbox`` to ``spacing_mm`` (0 keeps an axis), or of each
    slice to ``size`` (rows, columns), into an int16 grid."""
    src = volume.hu[bbox]
    offset = np.array([s.start for s in bbox], dtype=np.float64)
    native = np.asarray(volume.spacing, dtype=np.float64)
    target = np.array([t if t > 0 else s for t, s in zip(spacing_mm, native)])
    if size:
        # the whole slice maps onto rows x columns; the corners of the grid stay on the
        # source's first and last voxels so the mapping is exact in both directions
        target[1] = native[1] * (src.shape[1] - 1) / (size[0] - 1)
        target[2] = native[2] * (src.shape[2] - 1) / (size[1] - 1)
    scale = target / native
    shape = [int(np.floor((n - 1) / sc + 1e-6)) + 1 for n, sc in zip(src.shape, scale)]
    if size:
        shape[1], shape[2] = size
    if np.allclose(scale, 1.0):
        out = np.ascontiguousarray(src[: shape[0], : shape[1], : shape[2]])
    else:
        out = ndimage.affine_transform(
            src, scale, offset=0.0, output_shape=tuple(shape), output=np.int16, order=1, mode="nearest", prefilter=False
        )
    return Grid(hu=out, offset=offset, scale=scale, spacing=tuple(float(t) for t in target), valid=tuple(shape))


def pad_to_multiple(grid: Grid, multiple: int, fill: int = -1024) -> Grid:
    """Pad rows and columns (at the end) up to a multiple, e.g. for a network with 4 poolings."""
    if multiple <= 1:
        return grid
    k, j, i = grid.hu.shape
    pj, pi = (-j) % multiple, (-i) % multiple
    if pj or pi:
        grid.hu = np.pad(grid.hu, ((0, 0), (0, pj), (0, pi)), constant_values=fill)
    return grid


def prepare(volume: Volume, spec: InputSpec) -> Grid:
    """Crop, resample and pad the volume for one model."""
    bbox = region_bbox(volume, spec.crop)
    grid = resample(volume, bbox, spec.spacing_mm, spec.size)
    return pad_to_multiple(grid, spec.multiple_of)


def window(hu: np.ndarray, hu_window) -> np.ndarray:
    """HU to float32 in [0, 1] over the window (clipped)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    out = hu.astype(np.float32)
    out -= lo
    out *= 1.0 / (hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def slice_stack(hu: np.ndarray, centres, context: int) -> np.ndarray:
    """int16 (N, C, H, W): for each centre slice its ``context`` neighbours (edges repeated)."""
    half = context // 2
    n = hu.shape[0]
    idx = np.clip(np.asarray(centres)[:, None] + np.arange(-half, half + 1)[None, :], 0, n - 1)
    return hu[idx]


def batches(grid: Grid, spec: InputSpec, batch_size: int):
    """Yield (slice indices, float32 NCHW batch) over every slice of the grid."""
    n = grid.hu.shape[0]
    for start in range(0, n, batch_size):
        centres = np.arange(start, min(n, start + batch_size))
        yield centres, window(slice_stack(grid.hu, centres, spec.context_slices), spec.hu_window)
