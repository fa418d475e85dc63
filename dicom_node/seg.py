"""The findings' masks as a DICOM Segmentation (``outputs.seg``, DESIGN.md section 6).

A BINARY Segmentation (PS3.3 Section A.51) on the source series' own
geometry: one frame per source slice that a segment touches, each frame
derived from (and referencing) that CT slice, so a viewer overlays it on the
series without resampling. Only slices a segment touches are encoded
(highdicom's ``omit_empty_frames``), one bit per pixel: 32 kB per 512x512
frame, so five nodules over 27 slices make about 0.9 MB.

**One segment per finding class**, a class being the finding's label and
type: "Nodule, solid", "Nodule, part-solid", "Nodule, ground-glass". A
segment in DICOM is a semantic class with one coded property type
(PS3.3 Section C.8.20.2, Segment Sequence), which is what a viewer lists,
colours and toggles; 20 findings should not mean 20 legend entries of the
same colour. The finding itself stays individually addressable: the SR's
measurement group references its class segment *and* the SEG frames that
finding occupies (``ReferencedFrameNumber`` in TID 1411's "Referenced
Segment" item), which :func:`segment_references` returns. Findings of one
class that overlap merge in the mask, as they would on screen anyway.

Coded concepts: property category (49755003, SCT, "Morphologically Abnormal
Structure"), property type (27925004, SCT, "Nodule", as the model specs'
``finding`` code), anatomic region (39607008, SCT, "Lung"); the type is in
the segment label, not a modifier code, for want of a standard code for
"part-solid". Algorithm identification (family "Artificial Intelligence",
123110 DCM) carries the model name and version.

``ReferencedSegment.from_segmentation()`` raises on a single-segment SEG
highdicom built itself (FIELD-NOTES.md), so :class:`SegmentReference` builds
the SR content from its parts.

Findings are duck-typed: ``mask``, ``mask_offset``, ``label``, ``type``.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

from .key_images import (
    MANUFACTURER,
    SOFTWARE_VERSION,
    clip_lo,
    copy_body_part,
    output_datetime,
    result_uids,
    series_description,
    stamp_datetimes,
)

SEG_SERIES_NUMBER = 9003
#: Types in the order their segments are numbered; others follow alphabetically.
TYPE_ORDER = ("solid", "part-solid", "ground-glass")
#: Display colours (RGB) per type, so classes are told apart; yellow as on the key images.
TYPE_RGB = {"solid": (255, 255, 0), "part-solid": (255, 140, 0), "ground-glass": (0, 200, 255)}
_OTHER_RGB = (255, 0, 255)
CONTENT_LABEL = "AI_FINDINGS"  # CS, 16 characters at most


def segment_label(finding: Any) -> str:
    """The class a finding's segment stands for: "Nodule, solid", or "Nodule" without a type."""
    label = str(getattr(finding, "label", "") or "finding").strip().capitalize()
    kind = str(getattr(finding, "type", "") or "").strip()
    return clip_lo(f"{label}, {kind}" if kind else label)


def _class_order(label: str) -> tuple[int, str]:
    kind = label.partition(", ")[2]
    return (TYPE_ORDER.index(kind) if kind in TYPE_ORDER else len(TYPE_ORDER), label)


def _placed(finding: Any, shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[slice, slice, slice]] | None:
    """The finding's mask clipped to the volume, and where it goes; None when nothing is left."""
    mask = getattr(finding, "mask", None)
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"a finding's mask must be 3D [k, j, i], got shape {mask.shape}")
    offset = [int(v) for v in getattr(finding, "mask_offset", (0, 0, 0))]
    dst, src = [], []
    for axis in range(3):
        lo, hi = max(offset[axis], 0), min(offset[axis] + mask.shape[axis], shape[axis])
        if hi <= lo:
            return None
        dst.append(slice(lo, hi))
        src.append(slice(lo - offset[axis], hi - offset[axis]))
    part = mask[tuple(src)]
    return (part, tuple(dst)) if part.any() else None


def _occupied(part: np.ndarray) -> np.ndarray:
    """Indices along k of the planes of ``part`` with any voxel set."""
    return np.flatnonzero(part.any(axis=(1, 2)))


def _source_datasets(source: Any, ks: Sequence[int]) -> list[Dataset]:
    """Header-only data sets for source slices ``ks``: slice 0's header with the per-slice attributes replaced.

    Sharing the unchanged elements (not copying the header per slice) keeps
    this cheap; the replaced ones are new elements, so ``source.header`` is
    left untouched.
    """
    base = source.header
    out = []
    for k in ks:
        ds = Dataset()
        for elem in base:
            ds.add(elem)
        sop_class, sop_instance = source.source_images[k]
        ds.add(DataElement(0x00080016, "UI", sop_class))
        ds.add(DataElement(0x00080018, "UI", sop_instance))
        ds.add(DataElement(0x00200032, "DS", [f"{float(v):.6g}" for v in source.positions[k]]))
        number = source.instance_numbers[k] if getattr(source, "instance_numbers", None) else None
        if number is not None:
            ds.add(DataElement(0x00200013, "IS", int(number)))
        out.append(ds)
    return out


def build_seg(
    source: Any,
    findings: Sequence[Any],
    *,
    model_name: str,
    model_version: str,
    series_number: int = SEG_SERIES_NUMBER,
    content_datetime: _dt.datetime | None = None,
    manufacturer: str = MANUFACTURER,
    software_version: str = SOFTWARE_VERSION,
    uids: Mapping[str, Any] | None = None,
) -> Dataset | None:
    """A BINARY Segmentation of ``findings``' masks on ``source``'s slices; None when no finding has a mask.

    ``source`` is a :class:`dicom_node.series.LoadedSeries`; each finding's
    ``mask`` lies at source resolution in the box starting at ``mask_offset``
    (source ``k, j, i``). Segments are numbered by class (see the module
    docstring); highdicom orders the frames by segment, then by its position dimension index.
    ``uids``: the result's UIDs from one place (``dicom_node.uids.output_uids``:
    ``seg_series``, ``seg_instance``); without it they are derived here.
    """
    shape = tuple(int(v) for v in source.hu.shape)
    classes: dict[str, list[tuple[np.ndarray, tuple[slice, slice, slice]]]] = {}
    for finding in findings:
        placed = _placed(finding, shape)
        if placed is not None:
            classes.setdefault(segment_label(finding), []).append(placed)
    if not classes:
        return None
    uids = result_uids(source, model_name, model_version, uids)
    labels = sorted(classes, key=_class_order)
    touched = {
        label: [(kk.start + int(r), part[r], jj, ii) for part, (kk, jj, ii) in parts for r in _occupied(part)]
        for label, parts in classes.items()
    }
    ks = sorted({k for planes in touched.values() for k, *_ in planes})
    row_of = {k: n for n, k in enumerate(ks)}
    pixels = np.zeros((len(ks), shape[1], shape[2], len(labels)), dtype=np.uint8)
    for s, label in enumerate(labels):
        for k, plane, jj, ii in touched[label]:
            pixels[row_of[k], jj, ii, s] |= plane

    algorithm = hd.AlgorithmIdentificationSequence(
        name=clip_lo(model_name), family=codes.cid7162.ArtificialIntelligence, version=clip_lo(model_version)
    )
    descriptions = []
    for number, label in enumerate(labels, start=1):
        kind = label.partition(", ")[2]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Nodule,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                anatomic_regions=[codes.SCT.Lung],
                display_color=hd.color.CIELabColor.from_rgb(*TYPE_RGB.get(kind, _OTHER_RGB)),
            )
        )
    when = output_datetime(content_datetime)
    seg = hd.seg.Segmentation(
        source_images=_source_datasets(source, ks),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids["seg_series"],
        series_number=series_number,
        sop_instance_uid=uids["seg_instance"],
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=clip_lo(model_name),
        software_versions=clip_lo(f"{software_version} {model_name} {model_version}"),
        device_serial_number=clip_lo(f"{model_name}-{model_version}"),
        content_label=CONTENT_LABEL,
        content_description=clip_lo(f"{model_name} {model_version}: AI, not for clinical use"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(model_name, model_version, "segmentation"),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    stamp_datetimes(seg, when)
    copy_body_part(source, seg)
    # highdicom mints a random Dimension Organization UID; a rebuild must not differ.
    dim_uid = uids["seg_dimension_organization"]
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = dim_uid
    return seg


@dataclass(frozen=True)
class SegmentReference:
    """What an SR measurement group needs to point at a finding in the SEG (TID 1411 "Referenced Segment").

    ``frame_numbers``: the SEG frames (1-based) of the finding's segment on
    the source slices the finding occupies, which single the finding out of
    its class segment.
    """

    sop_class_uid: str
    sop_instance_uid: str
    segment_number: int
    segment_label: str
    frame_numbers: tuple[int, ...]
    source_series_uid: str

    def referenced_segment(self) -> hd.sr.ReferencedSegment:
        """The SR content items, built from parts (``from_segmentation()`` fails on one-segment SEGs)."""
        return hd.sr.ReferencedSegment(
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            segment_number=self.segment_number,
            frame_numbers=list(self.frame_numbers) or None,
            source_series=hd.sr.SourceSeriesForSegmentation(self.source_series_uid),
        )


def segment_references(seg: Dataset, source: Any, findings: Sequence[Any]) -> list[SegmentReference | None]:
    """Per finding (same order), its segment and frames in ``seg``, or None when it is not in it.

    Read from ``seg`` itself (Segment Sequence and each frame's segment and
    derivation source), so it holds for a SEG read back from disk too.
    """
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    frames: dict[tuple[int, str], int] = {}
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()
    for n, group in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        # Per frame, or shared by all frames when there is one segment (PS3.3 Section C.7.6.16).
        identification = group.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        segment = int(identification[0].ReferencedSegmentNumber)
        for derivation in group.get("DerivationImageSequence", []):
            for ref in derivation.get("SourceImageSequence", []):
                frames[(segment, str(ref.ReferencedSOPInstanceUID))] = n
    series_uid = str(source.series_uid)
    shape = tuple(int(v) for v in source.hu.shape)
    out: list[SegmentReference | None] = []
    for finding in findings:
        label = segment_label(finding)
        placed = _placed(finding, shape)
        if placed is None or label not in numbers:
            out.append(None)
            continue
        part, (kk, _, _) = placed
        number = numbers[label]
        touched = [kk.start + int(r) for r in _occupied(part)]
        found = [frames.get((number, source.sop_instance_uids[k])) for k in touched]
        out.append(
            SegmentReference(
                sop_class_uid=str(seg.SOPClassUID or SegmentationStorage),
                sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=number,
                segment_label=label,
                frame_numbers=tuple(sorted(f for f in found if f is not None)),
                source_series_uid=series_uid,
            )
        )
    return out
