"""What the models found, as plain dataclasses: the hand-over from `inference` to the
report writers in `dicom_node` (through `study_queue`) and into ``findings.json``."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Finding:
    """One localised finding (a nodule) in the source volume's geometry.

    ``diameter_mm`` is the long axis (maximal in-plane Feret diameter) and
    ``short_axis_mm`` the longest extent perpendicular to it on the same slice; their mean
    is the "mean diameter" Lung-RADS sizes nodules by. ``solid_component_mm`` is the mean
    diameter of the part denser than the spec's ``solid_hu`` (the whole nodule for a
    solid one, 0 for ground glass).
    ``center_index`` is the fractional source index ``(k, j, i)`` of the centre;
    ``slice_index`` the source slice through it (the image a report references and a key
    image shows). ``mask`` is the finding's region at source resolution inside the box that
    starts at ``mask_offset`` (source indices), for outlines and segmentations.
    """

    model: str
    model_version: str
    label: str
    center_lps_mm: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    type: str
    probability: float
    laterality: str = ""
    center_index: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice_index: int = 0
    mask: np.ndarray | None = field(default=None, repr=False)
    mask_offset: tuple[int, int, int] = (0, 0, 0)
    short_axis_mm: float = 0.0
    solid_component_mm: float = 0.0
    features: dict[str, float] = field(default_factory=dict, repr=False)  # the candidate's, for a rescorer

    @property
    def mean_diameter_mm(self) -> float:
        return (self.diameter_mm + (self.short_axis_mm or self.diameter_mm)) / 2

    def as_json(self) -> dict:
        """The ``findings.json`` entry (DESIGN.md section 5)."""
        return {
            "model": self.model,
            "model_version": self.model_version,
            "label": self.label,
            "center_lps_mm": [round(float(c), 2) for c in self.center_lps_mm],
            "diameter_mm": round(float(self.diameter_mm), 1),
            "short_axis_mm": round(float(self.short_axis_mm), 1),
            "mean_diameter_mm": round(float(self.mean_diameter_mm), 1),
            "solid_component_mm": round(float(self.solid_component_mm), 1),
            "volume_mm3": round(float(self.volume_mm3), 1),
            "type": self.type,
            "probability": round(float(self.probability), 4),
            "laterality": self.laterality,
            "slice_index": int(self.slice_index),
        }

    def slice_mask(self, k: int | None = None) -> tuple[np.ndarray, tuple[int, int]] | None:
        """The region on source slice ``k`` (default: the centre slice) as a 2D mask and the
        (row, column) of its top-left corner; None when the region misses that slice."""
        if self.mask is None:
            return None
        k = self.slice_index if k is None else k
        rel = k - self.mask_offset[0]
        if not 0 <= rel < self.mask.shape[0] or not self.mask[rel].any():
            return None
        return self.mask[rel], (self.mask_offset[1], self.mask_offset[2])


@dataclass
class Classification:
    """A study-level result of a classification model (e.g. "suspicious for lung nodule")."""

    model: str
    model_version: str
    label: str
    probability: float
    positive: bool
    threshold: float
    slice_probabilities: list[float] = field(default_factory=list, repr=False)

    def as_json(self) -> dict:
        return {
            "model": self.model,
            "model_version": self.model_version,
            "label": self.label,
            "probability": round(float(self.probability), 4),
            "positive": bool(self.positive),
            "threshold": self.threshold,
        }
