"""A small chest-CT-like series with ball-shaped "nodules" and the findings a model
would report for them: shared by the tests of the report writers (SR, key images, SEG).

The series is written with :func:`dicom_node.ct_writer.write_ct_series` and loaded
back with :func:`dicom_node.series.scan_series` + :func:`~dicom_node.series.load_series`,
so the writers see exactly what they see in production. The findings are
:class:`inference.findings.Finding` (tests may import ``inference``; ``dicom_node``
may not) with masks cut from the balls at source resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_node.ct_writer import write_ct_series
from dicom_node.series import LoadedSeries, load_series, scan_series
from inference.findings import Classification, Finding

from .factory import SENTINEL_BIRTH_DATE, SENTINEL_ID, SENTINEL_NAME

SHAPE = (20, 64, 64)  # slices, rows, columns
SPACING = (2.5, 0.8, 0.8)  # mm: slice, row, column
ORIGIN = (-25.6, -20.0, -150.0)  # LPS of voxel [0, 0, 0]
AXIAL = np.eye(3)[[2, 1, 0]]  # k grows toward S (head), j toward P, i toward L
STUDY_UID = "1.2.826.0.1.3680043.8.498.1000001"
MODEL = "lung-nodule-ct"
MODEL_VERSION = "1.0.0"


@dataclass(frozen=True)
class Ball:
    """A spherical nodule: centre as a fractional source index (k, j, i), radius in mm."""

    center_index: tuple[float, float, float]
    radius_mm: float
    type: str = "solid"
    probability: float = 0.9


#: Five nodules, two on the patient's right (x < 0 in LPS), three on the left; one
#: ground glass, one part-solid; sizes that fall into different Lung-RADS categories.
BALLS = (
    Ball((5.0, 20.0, 16.0), 4.0, "solid", 0.93),
    Ball((10.0, 40.0, 20.0), 2.0, "ground-glass", 0.71),
    Ball((9.0, 22.0, 44.0), 5.5, "part-solid", 0.88),
    Ball((14.0, 44.0, 46.0), 3.0, "solid", 0.64),
    Ball((16.0, 30.0, 36.0), 1.2, "solid", 0.55),  # tiny: its mask is a few voxels
)


def volume(balls=BALLS, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """Air (-1000 HU) with a soft-tissue ball (40 HU; ground glass -500) per nodule."""
    hu = np.full(shape, -1000, dtype=np.int16)
    for ball in balls:
        inside = _ball_mask(ball, shape, spacing)
        hu[inside] = -500 if ball.type == "ground-glass" else 40
    return hu


def _ball_mask(ball: Ball, shape, spacing) -> np.ndarray:
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = ball.center_index
    d2 = ((k - c[0]) * spacing[0]) ** 2 + ((j - c[1]) * spacing[1]) ** 2 + ((i - c[2]) * spacing[2]) ** 2
    return d2 <= ball.radius_mm**2


def write_source(folder: Path, *, balls=BALLS, **kwargs) -> list[Path]:
    """Write the series (sentinel patient, fixed UIDs from ``uid_seed``) into ``folder``."""
    kwargs.setdefault("patient_name", SENTINEL_NAME)
    kwargs.setdefault("patient_id", SENTINEL_ID)
    kwargs.setdefault("patient_birth_date", SENTINEL_BIRTH_DATE)
    kwargs.setdefault("study_uid", STUDY_UID)
    kwargs.setdefault("uid_seed", "report-fixtures")
    kwargs.setdefault("accession_number", "ACC0001")
    return write_ct_series(folder, volume(balls), SPACING, ORIGIN, AXIAL, **kwargs)


def load_source(folder: Path) -> LoadedSeries:
    (info,) = scan_series(folder)
    return load_series(info)


def index_to_lps(source: LoadedSeries, index) -> np.ndarray:
    idx = np.asarray(index, dtype=np.float64)
    return np.asarray(source.origin) + (idx * np.asarray(source.spacing)) @ source.direction


def finding_for(source: LoadedSeries, ball: Ball, *, model=MODEL, version=MODEL_VERSION) -> Finding:
    """The finding a perfect model would report for ``ball``: mask cut to its bounding box."""
    inside = _ball_mask(ball, source.hu.shape, source.spacing)
    ks, js, is_ = np.nonzero(inside)
    lo = (int(ks.min()), int(js.min()), int(is_.min()))
    hi = (int(ks.max()) + 1, int(js.max()) + 1, int(is_.max()) + 1)
    mask = inside[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].copy()
    center = index_to_lps(source, ball.center_index)
    d = 2 * ball.radius_mm
    solid = {"solid": d, "part-solid": d / 3, "ground-glass": 0.0}[ball.type]
    return Finding(
        model=model,
        model_version=version,
        label="nodule",
        center_lps_mm=tuple(float(v) for v in center),
        diameter_mm=d,
        volume_mm3=4 / 3 * math.pi * ball.radius_mm**3,
        type=ball.type,
        probability=ball.probability,
        laterality="right" if center[0] < 0 else "left",
        center_index=ball.center_index,
        slice_index=round(ball.center_index[0]),
        mask=mask,
        mask_offset=lo,
        short_axis_mm=round(0.9 * d, 2),
        solid_component_mm=solid,
    )


def findings_for(source: LoadedSeries, balls=BALLS, **kwargs) -> list[Finding]:
    return [finding_for(source, ball, **kwargs) for ball in balls]


def triage(positive: bool = True, probability: float = 0.82) -> Classification:
    return Classification(
        model="lung-triage-ct",
        model_version="1.0.0",
        label="lung nodule",
        probability=probability,
        positive=positive,
        threshold=0.5,
    )


@dataclass(frozen=True)
class Assessment:
    """Stands in for ``dicom_node.lung_rads.Assessment`` (same attribute names)."""

    category: str
    descriptor: str
    management: str
    reason: str = ""
    nodule_index: int | None = None
    version: str = "v2022"
