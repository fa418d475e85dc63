"""From a folder of instances to the one series a model should see, as a HU volume.

Three steps, each usable on its own (issue 3):

1. :func:`scan_series` reads the headers of every file (never the pixel data)
   and groups the instances by Series Instance UID into :class:`SeriesInfo`.
2. :func:`select_series` picks the series that a model's selector
   (:class:`SeriesSelector`: modality, body part, slice count, orientation,
   description) matches best, and says in words why each other series does
   not match, so that an IGNORED study can be explained to a person.
3. :func:`load_series` checks that the series is one regular volume and
   returns it as :class:`LoadedSeries`: ``int16`` HU indexed ``[k, j, i]``
   plus spacing, origin and direction in the conventions of
   ``inference/volume.py`` (which this package does not import), and the
   SOP Instance UIDs per slice that a report needs to reference its source
   images.

Slices are ordered by the projection of Image Position (Patient) on the
slice normal, the cross product of the row and column cosines of Image
Orientation (Patient) (PS3.3 Section C.7.6.2.1.1), never by Instance Number,
which PS3.3 Section C.7.6.1.1.1 leaves free of any spatial meaning. So
``direction[0]`` always points the way the normal does (the volume is
right-handed) and a series sent head to foot comes back foot to head.

Anything that would make the volume's geometry a lie is refused with a
:class:`SeriesError` whose message says what and where: differing image sizes,
orientations, pixel spacings or frames of reference, duplicate positions, a
gap or uneven spacing, sheared stacks (gantry tilt), missing geometry,
multi-frame instances and colour data. Messages count slices from 1 in
position order and never carry patient data, UIDs or file names.

Speed: the pixel data of uncompressed little-endian files is read straight
from the file into one slice buffer and rescaled into the preallocated
output, so a 300-slice 512x512 series costs little more than reading its
bytes; compressed data goes through pydicom's decoders (pylibjpeg plugins:
pylibjpeg-libjpeg for JPEG and JPEG-LS, pylibjpeg-openjpeg for JPEG 2000;
RLE needs nothing extra). At most the output plus one slice is held.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
)

from .errors import DicomNodeError

log = logging.getLogger(__name__)

#: Single-frame image storage SOP classes whose instances are slices of a volume.
CROSS_SECTIONAL_STORAGE = frozenset({CTImageStorage, MRImageStorage, PositronEmissionTomographyImageStorage})

#: The patient axis each named orientation's slice normal lies along (LPS: x, y, z).
ORIENTATION_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}

#: Cosine above which a slice normal counts as lying along a patient axis in
#: :attr:`SeriesInfo.orientation` (about 26 degrees).
NAMED_ORIENTATION_COSINE = 0.9

#: Everything :func:`scan_series` and :func:`load_series` read from a header.
_HEADER_TAGS = [
    Tag(keyword)
    for keyword in (
        "SpecificCharacterSet",
        "ImageType",
        "SOPClassUID",
        "SOPInstanceUID",
        "Modality",
        "SeriesDescription",
        "BodyPartExamined",
        "SliceThickness",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SeriesNumber",
        "InstanceNumber",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "FrameOfReferenceUID",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "NumberOfFrames",
        "Rows",
        "Columns",
        "PixelSpacing",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "RescaleIntercept",
        "RescaleSlope",
    )
]

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})

#: Orientation cosines closer than this are the same orientation.
_ORIENTATION_TOLERANCE = 1e-3
#: Pixel spacings closer than this (mm) are the same spacing.
_PIXEL_SPACING_TOLERANCE = 1e-3


class SeriesError(DicomNodeError):
    """A series cannot be loaded as one regular volume.

    ``reason`` is the message: one line a person can act on, without patient
    data. Not worth retrying: the same files give the same answer.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SeriesSelector:
    """What a model accepts (the selector of its model spec, DESIGN.md section 5).

    ``body_part``: accepted Body Part Examined values, case-insensitive; None
    accepts any. A series without Body Part Examined is accepted, with a
    note, since many scanners leave it empty. ``orientation``: "axial",
    "coronal", "sagittal" or None (any); a series matches when its slice
    normal is within ``orientation_min_cosine`` (0.9: about 26 degrees) of
    that patient axis. ``description_pattern``: a regular expression searched
    case-insensitively in Series Description.
    """

    modality: str = "CT"
    body_part: tuple[str, ...] | list[str] | None = None
    min_slices: int = 1
    orientation: str | None = "axial"
    orientation_min_cosine: float = 0.9
    description_pattern: str | None = None
    sop_class_uids: frozenset[str] = CROSS_SECTIONAL_STORAGE
    exclude_localizers: bool = True

    def __post_init__(self) -> None:
        if self.orientation is not None and self.orientation not in ORIENTATION_AXES:
            names = ", ".join(ORIENTATION_AXES)
            raise ValueError(f"orientation must be one of {names} or None, got {self.orientation!r}")
        if isinstance(self.body_part, str):
            object.__setattr__(self, "body_part", (self.body_part,))
        elif self.body_part is not None:
            object.__setattr__(self, "body_part", tuple(self.body_part))
        if self.description_pattern is not None:
            re.compile(self.description_pattern)


@dataclass(frozen=True)
class SeriesInfo:
    """One series as its headers describe it; what :func:`select_series` decides on.

    ``orientation`` is "axial", "coronal" or "sagittal" when the slice normal
    is within about 26 degrees of that patient axis, "oblique" otherwise,
    "mixed" when the instances disagree, None without Image Orientation.
    ``normal`` is the slice normal (row cosines x column cosines) of the
    first instance. ``slice_thickness`` is the thinnest Slice Thickness seen.
    ``headers`` keeps what the scan read so that loading right after it does
    not read every header again; it holds patient data and is not in ``repr``.
    """

    series_uid: str
    study_uid: str | None
    modality: str | None
    body_part: str | None
    description: str
    series_number: int | None
    instance_count: int
    paths: tuple[Path, ...]
    frame_of_reference_uid: str | None
    orientation: str | None
    normal: tuple[float, float, float] | None
    slice_thickness: float | None
    sop_class_uids: frozenset[str]
    image_type: frozenset[str]
    max_frames: int
    body_parts: frozenset[str] = frozenset()
    #: What the scan read, per path: (file identity, header, pixel data offset).
    #: :func:`load_series` reuses a header while the file's size and mtime are unchanged.
    headers: dict[Path, tuple[tuple[int, int], Dataset, int | None]] = field(
        default_factory=dict, repr=False, compare=False
    )


@dataclass(repr=False)
class LoadedSeries:
    """A series as a volume, in the conventions of ``inference/volume.py``.

    ``hu`` is ``int16`` ``[k, j, i]`` (slice, row, column) after Rescale
    Slope/Intercept, clipped to the ``int16`` range; ``spacing`` is ``(slice,
    row, column)`` mm; ``origin`` is the Image Position (Patient) of slice 0;
    the rows of ``direction`` are the unit vectors (LPS) along which ``k``,
    ``j`` and ``i`` grow. Per slice ``k``: ``sop_instance_uids[k]``,
    ``source_images[k]`` (SOP Class UID, SOP Instance UID) for a report's
    references, ``positions[k]`` (its Image Position) and
    ``instance_numbers[k]``; ``sop_class_uid`` is slice 0's. ``header`` is the first slice's data set without
    pixel data, for copying the Patient and Study modules into a report; it
    is left out of ``repr`` because it holds patient data.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    sop_instance_uids: tuple[str, ...]
    source_images: tuple[tuple[str, str], ...]
    positions: np.ndarray
    instance_numbers: tuple[int | None, ...]
    series_uid: str
    study_uid: str | None
    frame_of_reference_uid: str | None
    sop_class_uid: str
    modality: str | None
    series_description: str
    series_number: int | None
    body_part: str | None
    slice_thickness: float | None
    header: Dataset = field(repr=False)

    def volume_fields(self) -> dict[str, Any]:
        """``hu``, ``spacing``, ``origin`` and ``direction``: the arguments of ``inference.volume.Volume``."""
        return {"hu": self.hu, "spacing": self.spacing, "origin": self.origin, "direction": self.direction}

    def __repr__(self) -> str:
        return (
            f"LoadedSeries(shape={self.hu.shape}, spacing={self.spacing}, origin={self.origin}, "
            f"modality={self.modality!r}, series_number={self.series_number})"
        )


# --- scanning -----------------------------------------------------------------------------


def _files(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.is_file())
        else:
            found.append(path)
    return found


def _read_header(path: Path) -> tuple[tuple[int, int], Dataset, int | None]:
    """The identity (size, mtime) and header of ``path``, and the file offset of its Pixel Data element."""
    with open(path, "rb") as fp:
        st = os.fstat(fp.fileno())
        ds = dcmread(fp, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        # pydicom stops with the file positioned at the Pixel Data element;
        # the loader checks the tag there before it trusts the offset.
        offset = fp.tell()
    return (st.st_size, st.st_mtime_ns), ds, offset


def _cached_header(info: SeriesInfo, path: Path) -> tuple[Dataset, int | None]:
    cached = info.headers.get(path)
    if cached is not None:
        st = os.stat(path)
        if cached[0] == (st.st_size, st.st_mtime_ns):
            return cached[1], cached[2]
    _, ds, offset = _read_header(path)
    return ds, offset


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    """``n`` finite numbers from a multi-valued DS attribute, or None when missing or malformed."""
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            value = [value]
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return values


def _normal(iop: tuple[float, ...] | None) -> np.ndarray | None:
    if iop is None:
        return None
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return None if norm < 1e-6 else n / norm


def _orientation_name(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < NAMED_ORIENTATION_COSINE:
        return "oblique"
    return {v: k for k, v in ORIENTATION_AXES.items()}[axis]


def scan_series(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[SeriesInfo]:
    """Group the DICOM files under ``source`` by Series Instance UID, reading headers only.

    ``source`` is a file or a folder (searched recursively), or several of
    them; one that does not exist raises :class:`FileNotFoundError`. Files that
    are not DICOM (PS3.10 preamble and ``DICM`` prefix) or carry no Series
    Instance UID (a DICOMDIR) are skipped and counted in the log. The result
    is ordered by Study Instance UID, Series Number and Series Instance UID,
    and each series' paths are in file name order.
    """
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    headers: dict[str, dict[Path, tuple[tuple[int, int], Dataset, int | None]]] = {}
    skipped = 0
    for path in _files(source):
        try:
            identity, ds, offset = _read_header(path)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            skipped += 1
            continue
        series_uid = _text(ds, "SeriesInstanceUID")
        if series_uid is None:
            skipped += 1
            continue
        groups.setdefault(series_uid, []).append((path, ds))
        headers.setdefault(series_uid, {})[path] = (identity, ds, offset)
    if skipped:
        log.info("scan_series: skipped %d files that are not DICOM images of a series", skipped)

    infos = [_series_info(uid, members, headers[uid]) for uid, members in groups.items()]
    infos.sort(key=lambda s: (s.study_uid or "", _number_key(s), s.series_uid))
    return infos


def _number_key(info: SeriesInfo) -> float:
    return info.series_number if info.series_number is not None else math.inf


def _series_info(series_uid: str, members: list[tuple[Path, Dataset]], headers: dict) -> SeriesInfo:
    members.sort(key=lambda m: str(m[0]))
    first = members[0][1]
    normals = [_normal(_floats(ds, "ImageOrientationPatient", 6)) for _, ds in members]
    orientation: str | None
    normal: tuple[float, float, float] | None = None
    if normals[0] is None:
        orientation = None
    elif any(n is None or float(n @ normals[0]) < 1 - _ORIENTATION_TOLERANCE for n in normals):
        orientation = "mixed"
        normal = tuple(float(v) for v in normals[0])
    else:
        orientation = _orientation_name(normals[0])
        normal = tuple(float(v) for v in normals[0])
    thicknesses = [t[0] for _, ds in members if (t := _floats(ds, "SliceThickness", 1)) is not None and t[0] > 0]
    body_parts = frozenset(bp.upper() for _, ds in members if (bp := _text(ds, "BodyPartExamined")))
    image_type: set[str] = set()
    for _, ds in members:
        value = ds.get("ImageType")
        if value is not None:
            image_type.update(str(v).strip().upper() for v in (value if not isinstance(value, str) else [value]))
    return SeriesInfo(
        series_uid=series_uid,
        study_uid=_text(first, "StudyInstanceUID"),
        modality=_text(first, "Modality"),
        body_part=_text(first, "BodyPartExamined"),
        description=_text(first, "SeriesDescription") or "",
        series_number=_int(first, "SeriesNumber"),
        instance_count=len(members),
        paths=tuple(p for p, _ in members),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID"),
        orientation=orientation,
        normal=normal,
        slice_thickness=min(thicknesses) if thicknesses else None,
        sop_class_uids=frozenset(uid for _, ds in members if (uid := _text(ds, "SOPClassUID"))),
        image_type=frozenset(image_type),
        max_frames=max((_int(ds, "NumberOfFrames") or 1) for _, ds in members),
        body_parts=body_parts,
        headers=headers,
    )


# --- selecting ----------------------------------------------------------------------------


def _mismatches(info: SeriesInfo, selector: SeriesSelector) -> tuple[list[str], list[str]]:
    """(why ``info`` does not match, notes about a match)."""
    problems: list[str] = []
    notes: list[str] = []
    want_modality = selector.modality.upper() if selector.modality else None
    if want_modality and (info.modality or "").upper() != want_modality:
        problems.append(f"modality {info.modality or 'missing'}, want {want_modality}")
    if info.max_frames > 1:
        problems.append(f"multi-frame instances ({info.max_frames} frames): unsupported")
    foreign = sorted(info.sop_class_uids - set(selector.sop_class_uids))
    if foreign:
        problems.append(f"SOP class {', '.join(UID(u).name for u in foreign)}: not a slice of a volume")
    if selector.exclude_localizers and "LOCALIZER" in info.image_type:
        problems.append("a localizer (Image Type LOCALIZER)")
    if selector.body_part:
        accepted = {b.upper() for b in selector.body_part}
        if not info.body_parts:
            notes.append("Body Part Examined missing: accepted")
        elif not info.body_parts <= accepted:
            problems.append(
                f"body part {', '.join(sorted(info.body_parts))}, want {' or '.join(sorted(accepted))}"
            )
    if info.instance_count < selector.min_slices:
        plural = "slice" if info.instance_count == 1 else "slices"
        problems.append(f"only {info.instance_count} {plural}, want at least {selector.min_slices}")
    if selector.orientation:
        if info.orientation is None:
            problems.append("no Image Orientation (Patient)")
        elif info.orientation == "mixed":
            problems.append("orientation is mixed: its instances lie in different planes")
        elif info.normal is not None:
            cosine = abs(info.normal[ORIENTATION_AXES[selector.orientation]])
            if cosine < selector.orientation_min_cosine:
                angle = math.degrees(math.acos(min(1.0, cosine)))
                problems.append(f"orientation is {info.orientation} ({angle:.0f} degrees from {selector.orientation})")
    pattern = selector.description_pattern
    if pattern is not None and not re.search(pattern, info.description, re.IGNORECASE):
        problems.append(f"series description does not match {selector.description_pattern!r}")
    return problems, notes


def select_series(infos: Iterable[SeriesInfo], selector: SeriesSelector) -> tuple[SeriesInfo | None, list[str]]:
    """The series ``selector`` matches best, and one line per series saying why (not).

    Among the matching series the one with the most slices wins, then the
    thinnest slices, then the lowest Series Number. The lines read like
    ``"series 2 of 3 (Series Number 5): modality MR, want CT"``; they name
    series by position and Series Number only, never by patient data or UID.
    Returns ``(None, lines)`` when nothing matches.
    """
    infos = list(infos)
    total = len(infos)
    labels = [
        f"series {n} of {total} (Series Number {'missing' if i.series_number is None else i.series_number})"
        for n, i in enumerate(infos, 1)
    ]
    results = [_mismatches(info, selector) for info in infos]
    matches = [n for n, (problems, _) in enumerate(results) if not problems]

    def rank(n: int) -> tuple:
        info = infos[n]
        return (
            -info.instance_count,
            info.slice_thickness if info.slice_thickness is not None else math.inf,
            _number_key(info),
            info.series_uid,
        )

    best = min(matches, key=rank) if matches else None
    reasons: list[str] = []
    for n, (info, (problems, notes)) in enumerate(zip(infos, results)):
        if problems:
            text = "; ".join(problems)
        elif n == best:
            thickness = f", {info.slice_thickness:g} mm slices" if info.slice_thickness else ""
            text = f"selected: {info.instance_count} slices{thickness}"
        else:
            text = f"matches, but series {best + 1} has more or thinner slices"
        reasons.append(f"{labels[n]}: {'; '.join([text, *notes])}")
    return (infos[best] if best is not None else None), reasons


# --- loading ------------------------------------------------------------------------------


@dataclass
class _Slice:
    path: Path
    instance_number: int | None
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    slope: float
    intercept: float
    pixel_offset: int | None
    bits_allocated: int
    bits_stored: int
    signed: bool


def _missing(what: str, indices: list[int], total: int, instance_numbers: list[int | None]) -> SeriesError:
    example = instance_numbers[indices[0]]
    which = f"Instance Number {example}" if example is not None else f"file {indices[0] + 1} in name order"
    return SeriesError(f"{what} is missing or malformed in {len(indices)} of {total} instances (e.g. {which})")


def _tally(values: list[Any], fmt) -> str:
    counts = Counter(values).most_common()
    return ", ".join(f"{fmt(v)} ({c} {'instance' if c == 1 else 'instances'})" for v, c in counts)


def _check_decoders(syntaxes: set[UID]) -> None:
    for ts in sorted(syntaxes):
        if not ts.is_compressed:
            continue
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise SeriesError(
                f"pixel data in {ts.name} ({ts}): pydicom has no decoder for this transfer syntax"
            ) from None
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
            raise SeriesError(f"pixel data in {ts.name} ({ts}) cannot be decoded here: install one of: {needs}")


def load_series(
    info: SeriesInfo,
    *,
    spacing_tolerance_mm: float = 0.05,
    spacing_tolerance_fraction: float = 0.02,
    gap_factor: float = 1.5,
    max_shear_degrees: float = 0.5,
) -> LoadedSeries:
    """Load ``info`` as one regular volume of HU, or raise :class:`SeriesError` saying why not.

    Slice spacing must be even within ``max(spacing_tolerance_mm,
    spacing_tolerance_fraction * median)``; a step over ``gap_factor`` times
    the median is reported as a gap. The stack must run along the slice
    normal within ``max_shear_degrees`` (a tilted gantry does not).
    ``spacing[0]`` is the distance from the first to the last position over
    the number of steps, ``direction[0]`` the unit vector between them.
    Every check runs on the headers, before any pixel data is read.
    """
    paths = list(info.paths)
    if not paths:
        raise SeriesError("the series has no instances")
    headers: list[tuple[Dataset, int | None]] = []
    for path in paths:
        try:
            headers.append(_cached_header(info, path))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise SeriesError(
                f"file {len(headers) + 1} of {len(paths)} in name order is not readable DICOM: {type(exc).__name__}"
            ) from exc
    datasets = [ds for ds, _ in headers]
    instance_numbers = [_int(ds, "InstanceNumber") for ds in datasets]
    plane = _common_plane(datasets, instance_numbers)
    if len(datasets) < 2:
        raise SeriesError("only 1 slice: a volume needs at least 2 to know its slice spacing")
    order, positions, slice_spacing, d0 = _stack(
        plane.positions, plane.normal, spacing_tolerance_mm, spacing_tolerance_fraction, gap_factor, max_shear_degrees
    )

    slices = [_slice_of(paths[n], headers[n], instance_numbers[n]) for n in order]
    _check_decoders({s.transfer_syntax for s in slices})
    hu = _read_pixels(slices, plane.rows, plane.columns)

    first = datasets[order[0]]
    thicknesses = [t[0] for ds in datasets if (t := _floats(ds, "SliceThickness", 1)) is not None]
    return LoadedSeries(
        hu=hu,
        spacing=(slice_spacing, plane.pixel_spacing[0], plane.pixel_spacing[1]),
        origin=tuple(float(v) for v in positions[0]),
        direction=np.stack([d0, plane.column, plane.row]),
        sop_instance_uids=tuple(s.sop_instance_uid for s in slices),
        source_images=tuple((s.sop_class_uid, s.sop_instance_uid) for s in slices),
        positions=positions,
        instance_numbers=tuple(s.instance_number for s in slices),
        series_uid=_text(first, "SeriesInstanceUID") or info.series_uid,
        study_uid=_text(first, "StudyInstanceUID"),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID"),
        sop_class_uid=slices[0].sop_class_uid,
        modality=_text(first, "Modality"),
        series_description=_text(first, "SeriesDescription") or "",
        series_number=_int(first, "SeriesNumber"),
        body_part=_text(first, "BodyPartExamined"),
        slice_thickness=min(thicknesses) if thicknesses else None,
        header=dcmread(slices[0].path, stop_before_pixels=True),
    )


@dataclass
class _Plane:
    """What every slice of a loadable series shares, and where each one is."""

    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    row: np.ndarray  # unit vector along which the column index i grows
    column: np.ndarray  # unit vector along which the row index j grows
    normal: np.ndarray  # row x column
    positions: np.ndarray  # Image Position (Patient) per instance, in file order


def _common_plane(datasets: list[Dataset], instance_numbers: list[int | None]) -> _Plane:
    """Check that every instance is a single grey frame of the same size, orientation, spacing and series."""
    total = len(datasets)
    series_uids = {_text(ds, "SeriesInstanceUID") for ds in datasets}
    if len(series_uids) > 1:
        raise SeriesError(f"the files belong to {len(series_uids)} different series")
    frames = [_int(ds, "NumberOfFrames") or 1 for ds in datasets]
    if max(frames) > 1:
        count = sum(f > 1 for f in frames)
        raise SeriesError(
            f"multi-frame instances ({count} of {total}, up to {max(frames)} frames) are unsupported: "
            "only series of single-frame images load"
        )
    samples = [_int(ds, "SamplesPerPixel") for ds in datasets]
    photometric = [(_text(ds, "PhotometricInterpretation") or "missing").upper() for ds in datasets]
    grey = ("MONOCHROME1", "MONOCHROME2")
    bad = sorted({p for p, n in zip(photometric, samples) if p not in grey or n not in (1, None)})
    if bad:
        raise SeriesError(
            f"photometric interpretation {', '.join(bad)}: only grayscale (MONOCHROME1/MONOCHROME2) data loads"
        )

    iops = [_floats(ds, "ImageOrientationPatient", 6) for ds in datasets]
    ipps = [_floats(ds, "ImagePositionPatient", 3) for ds in datasets]
    spacings = [_floats(ds, "PixelSpacing", 2) for ds in datasets]
    sizes = [(_int(ds, "Rows"), _int(ds, "Columns")) for ds in datasets]
    for what, values in (
        ("Image Position (Patient) (0020,0032)", ipps),
        ("Image Orientation (Patient) (0020,0037)", iops),
        ("Pixel Spacing (0028,0030)", spacings),
        ("Rows/Columns (0028,0010/0011)", [None if None in s or 0 in s else s for s in sizes]),
    ):
        missing = [n for n, v in enumerate(values) if v is None]
        if missing:
            raise _missing(what, missing, total, instance_numbers)

    if len(set(sizes)) > 1:
        raise SeriesError(f"mixed image sizes: {_tally(sizes, lambda s: f'{s[0]}x{s[1]}')}")
    iop_arr = np.asarray(iops)
    if np.max(np.abs(iop_arr - iop_arr[0])) > _ORIENTATION_TOLERANCE:
        labels = []
        for iop in iops:
            n = _normal(iop)
            name = _orientation_name(n) if n is not None else "invalid"
            labels.append(f"{name} [{', '.join(f'{v:g}' for v in np.round(iop, 3))}]")
        raise SeriesError(f"mixed orientations: {_tally(labels, str)}")
    sp_arr = np.asarray(spacings)
    if np.max(np.abs(sp_arr - sp_arr[0])) > _PIXEL_SPACING_TOLERANCE:
        rounded = [tuple(round(v, 4) for v in s) for s in spacings]
        raise SeriesError(f"mixed pixel spacing: {_tally(rounded, lambda s: f'{s[0]:g}x{s[1]:g} mm')}")
    for_uids = {_text(ds, "FrameOfReferenceUID") for ds in datasets}
    if len(for_uids) > 1:
        raise SeriesError(f"the instances are in {len(for_uids)} different frames of reference")

    row, column = iop_arr[0, :3], iop_arr[0, 3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(column) - 1) > 0.01 or abs(float(row @ column)) > 0.01:
        raise SeriesError("Image Orientation (Patient) is not two orthogonal unit vectors")
    row = row / np.linalg.norm(row)
    column = column / np.linalg.norm(column)
    normal = np.cross(row, column)
    return _Plane(
        rows=sizes[0][0],
        columns=sizes[0][1],
        pixel_spacing=(float(sp_arr[0][0]), float(sp_arr[0][1])),
        row=row,
        column=column,
        normal=normal / np.linalg.norm(normal),
        positions=np.asarray(ipps, dtype=np.float64),
    )


def _stack(
    positions: np.ndarray,
    normal: np.ndarray,
    tol_mm: float,
    tol_fraction: float,
    gap_factor: float,
    max_shear_degrees: float,
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Order the slices along the normal and check they form one regular stack.

    Returns (file indices in position order, positions in that order, slice
    spacing, unit vector from the first position to the last).
    """
    total = len(positions)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions = positions[order]
    steps = np.diff(along[order])
    _check_spacing(steps, tol_mm, tol_fraction, gap_factor, total)

    span = positions[-1] - positions[0]
    distance = float(np.linalg.norm(span))
    d0 = span / distance
    shear = math.degrees(math.acos(min(1.0, abs(float(d0 @ normal)))))
    if shear > max_shear_degrees:
        raise SeriesError(
            f"the slices are stacked {shear:.1f} degrees off their normal (gantry tilt or a moving table): unsupported"
        )
    rel = positions - positions[0]
    off_line = np.linalg.norm(rel - np.outer(rel @ d0, d0), axis=1)
    worst = int(np.argmax(off_line))
    tolerance = max(tol_mm, tol_fraction * float(np.median(steps)))
    if off_line[worst] > tolerance:
        raise SeriesError(
            f"slice {worst + 1} of {total} is shifted {off_line[worst]:.2f} mm in-plane from the line "
            f"through the others: not one regular volume"
        )
    return order, positions, distance / (total - 1), d0


def _check_spacing(steps: np.ndarray, tol_mm: float, tol_fraction: float, gap_factor: float, total: int) -> None:
    """Duplicates, gaps and uneven steps between consecutive slices (numbered from 1 in position order)."""
    median = float(np.median(steps))
    duplicate_limit = max(1e-3, 0.05 * median)
    dups = np.flatnonzero(steps < duplicate_limit)
    if len(dups):
        n = int(dups[0])
        more = f" (and {len(dups) - 1} more pairs)" if len(dups) > 1 else ""
        raise SeriesError(f"duplicate positions: slices {n + 1} and {n + 2} of {total} are at the same place{more}")
    gaps = np.flatnonzero(steps > gap_factor * median)
    if len(gaps):
        n = int(gaps[0])
        more = f" (and {len(gaps) - 1} more)" if len(gaps) > 1 else ""
        raise SeriesError(
            f"gap of {steps[n]:.2f} mm between slices {n + 1} and {n + 2}, median spacing {median:.2f} mm{more}"
        )
    tolerance = max(tol_mm, tol_fraction * median)
    uneven = np.flatnonzero(np.abs(steps - median) > tolerance)
    if len(uneven):
        n = int(uneven[np.argmax(np.abs(steps[uneven] - median))])
        raise SeriesError(
            f"uneven slice spacing: {steps[n]:.3f} mm between slices {n + 1} and {n + 2}, "
            f"median spacing {median:.3f} mm, tolerance {tolerance:.3f} mm"
        )


def _slice_of(path: Path, header: tuple[Dataset, int | None], instance_number: int | None) -> _Slice:
    ds, offset = header
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
    slope = _floats(ds, "RescaleSlope", 1)
    intercept = _floats(ds, "RescaleIntercept", 1)
    return _Slice(
        path=path,
        instance_number=instance_number,
        sop_class_uid=_text(ds, "SOPClassUID") or "",
        sop_instance_uid=_text(ds, "SOPInstanceUID") or "",
        transfer_syntax=ts,
        slope=slope[0] if slope else 1.0,
        intercept=intercept[0] if intercept else 0.0,
        pixel_offset=offset,
        bits_allocated=_int(ds, "BitsAllocated") or 16,
        bits_stored=_int(ds, "BitsStored") or 16,
        signed=_int(ds, "PixelRepresentation") == 1,
    )


def _read_pixels(slices: list[_Slice], rows: int, columns: int) -> np.ndarray:
    """Decode every slice into one preallocated int16 array, in order, one slice in memory at a time."""
    hu = np.empty((len(slices), rows, columns), dtype=np.int16)
    raw = np.empty((rows, columns), dtype=np.uint16)
    work = np.empty((rows, columns), dtype=np.int32)
    for k, s in enumerate(slices):
        stored = _read_native(s, raw) if s.transfer_syntax in _NATIVE_LITTLE_ENDIAN else None
        if stored is None:
            stored = _decode(s, k, len(slices), rows, columns)
        _rescale(stored, s.slope, s.intercept, work, hu[k])
    return hu


def _read_native(s: _Slice, raw: np.ndarray) -> np.ndarray | None:
    """The stored values of an uncompressed 16-bit little-endian slice, read into ``raw``; None to fall back."""
    if s.pixel_offset is None or s.bits_allocated != 16:
        return None
    explicit = s.transfer_syntax == ExplicitVRLittleEndian
    with open(s.path, "rb", buffering=0) as f:
        f.seek(s.pixel_offset)
        head = f.read(12 if explicit else 8)
        if len(head) < 8 or head[:4] != _PIXEL_DATA_TAG:
            return None
        if explicit:
            if head[4:6] not in (b"OW", b"OB") or len(head) < 12:
                return None
            (length,) = struct.unpack_from("<L", head, 8)
        else:
            (length,) = struct.unpack_from("<L", head, 4)
        if length == 0xFFFFFFFF or length < raw.nbytes:
            return None
        if f.readinto(memoryview(raw).cast("B")) != raw.nbytes:
            return None
    if s.signed:
        values = raw.view(np.int16)
        if s.bits_stored < 16:
            shift = 16 - s.bits_stored
            np.left_shift(values, shift, out=values)
            np.right_shift(values, shift, out=values)
        return values
    if s.bits_stored < 16:
        np.bitwise_and(raw, (1 << s.bits_stored) - 1, out=raw)
    return raw


def _decode(s: _Slice, k: int, total: int, rows: int, columns: int) -> np.ndarray:
    try:
        arr = dcmread(s.path).pixel_array
    except Exception as exc:  # pydicom and its plugins raise many kinds
        raise SeriesError(
            f"slice {k + 1} of {total}: pixel data in {s.transfer_syntax.name} cannot be decoded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if arr.shape != (rows, columns):
        raise SeriesError(f"slice {k + 1} of {total}: decoded to shape {arr.shape}, its header says {rows}x{columns}")
    return arr


def _rescale(stored: np.ndarray, slope: float, intercept: float, work: np.ndarray, out: np.ndarray) -> None:
    """``out = clip(stored * slope + intercept)`` to int16 (PS3.3 Section C.11.1.1.2, the Modality LUT)."""
    if slope == 1 and float(intercept).is_integer():
        offset = int(intercept)
        if -32768 <= offset <= 32767 and int(stored.min()) + offset >= -32768 and int(stored.max()) + offset <= 32767:
            # Every result fits int16, so int16 arithmetic is exact: a stored
            # value above 32767 wraps on the copy and wraps back on the add.
            out[...] = stored
            out += np.int16(offset)
            return
        work[...] = stored
        work += offset
        np.clip(work, -32768, 32767, out=work)
        out[...] = work
    else:
        values = stored * float(slope) + float(intercept)
        np.rint(values, out=values)
        np.clip(values, -32768, 32767, out=values)
        out[...] = values
