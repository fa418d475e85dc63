"""A CT volume as the numeric side sees it: voxels plus the geometry that maps them to the patient.

`inference` never reads DICOM; `dicom_node.series` turns a series into the plain
arrays held here and the composition root (`study_queue`) hands them over.

Conventions (the same everywhere in the project):

- ``hu`` is indexed ``[k, j, i]``: slice, row, column. Values are Hounsfield units.
- ``spacing`` is ``(slice, row, column)`` in mm, matching the array axes. The row
  spacing is the first value of DICOM Pixel Spacing (PS3.3 C.7.6.2.1.1).
- ``origin`` is the patient position (LPS, mm) of voxel ``[0, 0, 0]``: the Image
  Position (Patient) of the first slice.
- ``direction`` is a 3x3 matrix whose *rows* are unit vectors in LPS: ``direction[0]``
  is the way ``k`` grows (the slice normal as sorted), ``direction[1]`` the way ``j``
  grows (second triplet of Image Orientation (Patient)), ``direction[2]`` the way ``i``
  grows (first triplet).

So the patient position of ``[k, j, i]`` is
``origin + (k * spacing[0]) * direction[0] + (j * spacing[1]) * direction[1] + (i * spacing[2]) * direction[2]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

AXIAL_DIRECTION = np.eye(3)[[2, 1, 0]]
"""Rows (S, P, L): slices going up toward the head, rows toward posterior, columns toward left."""


@dataclass
class Volume:
    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: AXIAL_DIRECTION.copy())

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"a volume has 3 axes, got shape {self.hu.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def index_to_lps(self, index) -> np.ndarray:
        """Patient position (mm) of a (possibly fractional) voxel index ``(k, j, i)``; also takes N x 3."""
        idx = np.asarray(index, dtype=np.float64)
        offsets = (idx * np.asarray(self.spacing)) @ self.direction
        return np.asarray(self.origin) + offsets

    def lps_to_index(self, point) -> np.ndarray:
        """Fractional voxel index ``(k, j, i)`` of a patient position (mm); also takes N x 3."""
        rel = np.asarray(point, dtype=np.float64) - np.asarray(self.origin)
        return (rel @ np.linalg.inv(self.direction)) / np.asarray(self.spacing)
