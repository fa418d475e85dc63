"""Key images: one Secondary Capture per finding, and a Key Object Selection over them.

What a radiologist sees in any PACS viewer (DESIGN.md section 6): the source
slice through the finding's centre in a lung window, the finding's outline
drawn in yellow, and a one-line legend burned in below the image ("Nodule,
solid, 8.4 mm, p=0.97 - AI - not for diagnosis").

Choices and why:

- RGB, 8 bits (PS3.3 Section A.8.1, Secondary Capture Image): the outline
  must stand out from grey anatomy; a MONOCHROME2 outline is easily taken
  for a vessel. Uncompressed (Explicit VR Little Endian), which every PACS
  stores and shows; about 0.8 MB per 512x512 image.
- The legend sits on a black band *added below* the slice, so it can never
  cover anatomy; hence Burned In Annotation YES (PS3.3 Section C.7.6.1.1.11).
- The slice is scaled (bilinear) so that its longer side is 512 pixels when
  the source is smaller, never shrunk, and non-square pixels are made
  square, so shapes are true. The outline is drawn just *outside* the mask
  (2 pixels wide, 1 pixel off the region, at output resolution), leaving
  the finding's own pixels intact. A finding without a mask gets a circle of
  its diameter round its centre.
- Patient and study come from the source header through highdicom's
  ``SCImage.from_ref_dataset``; Body Part Examined is copied too, since
  highdicom does not copy it and without it dciodvfy asks for Laterality
  (FIELD-NOTES.md, "DICOM objects"); a source without one gets an empty
  Laterality ("unknown"). The source slice is referenced in
  Source Image Sequence (PS3.3 Section C.7.6.1, purpose CID 7202).
- Pixel Spacing and Image Position are left out: a picture with a legend is
  not a measurable image.
- UIDs are derived (DESIGN.md section 4, "Idempotent outputs") from the
  study, the set of input SOP Instance UIDs, model name and version, and what
  the object is ("sc" and its rank, "sc-series", "ko", ...), with
  :func:`dicom_node.uids.derived_uid`; with ``content_datetime`` fixed, every
  date and time in the object is fixed too, so a rebuild is byte-identical.

Findings are duck-typed (``dicom_node`` never imports ``inference``): what is
read is ``slice_index``, ``slice_mask()``, ``center_index``, ``diameter_mm``,
``probability``, ``label`` and ``type``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from .uids import output_uids

#: Lung window (centre, width) in HU.
LUNG_WINDOW = (-600.0, 1500.0)
#: The longer side of a key image's slice area when the source is smaller.
MIN_SIZE = 512
#: Outline colour (RGB): never a grey, so it cannot be taken for anatomy.
OUTLINE_RGB = (255, 255, 0)
#: Outline thickness in output pixels.
OUTLINE_PX = 2
#: Gap between the region and its outline, in output pixels.
OUTLINE_GAP_PX = 1
LEGEND_RGB = (255, 255, 255)
DISCLAIMER = "AI - not for diagnosis"
#: Default series numbers of the outputs (the SR and SEG helpers use their own).
SC_SERIES_NUMBER = 9002
KO_SERIES_NUMBER = 9004
MANUFACTURER = "pacs-ai"

#: (121322, DCM, "Source image for image processing operation"), CID 7202.
_SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
_LO_MAX = 64  # PS3.5 Table 6.2-1, Long String


def installed_version() -> str:
    """The installed pacs-ai version, for Software Versions (0018,1020)."""
    try:
        return importlib.metadata.version("pacs-ai")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


SOFTWARE_VERSION = installed_version()


# --- shared with dicom_node.seg --------------------------------------------------------------


def result_uids(source: Any, model_name: str, model_version: str, uids: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The given UIDs of a result, or those :func:`dicom_node.uids.output_uids` derives
    for it (one place names every output of a result)."""
    return uids if uids is not None else output_uids(source.study_uid, source.sop_instance_uids, model_name, model_version)


def output_datetime(content_datetime: _dt.datetime | None) -> _dt.datetime:
    """``content_datetime`` or now, without microseconds (TM keeps what it is given)."""
    return (content_datetime or _dt.datetime.now()).replace(microsecond=0)


def stamp_datetimes(ds: Dataset, when: _dt.datetime) -> None:
    """Set every date/time highdicom fills from the clock to ``when`` (rebuilds are byte-identical)."""
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    for date_kw, time_kw in (
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
        ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ):
        if date_kw in ds:
            setattr(ds, date_kw, date)
            setattr(ds, time_kw, time)
    # highdicom names itself as contributing equipment, stamped with the clock.
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")


def copy_body_part(source: Any, ds: Dataset, *, laterality_when_unknown: bool = False) -> None:
    """Body Part Examined (and Laterality) from the source: highdicom copies them into neither SC nor SEG.

    Laterality (General Series, Type 2C) is required when the body part is
    paired; dciodvfy, unable to tell without Body Part Examined, demands it on
    an SC, so with ``laterality_when_unknown`` a source without either gets it
    present and empty ("unknown", which Type 2 allows; dciodvfy warns) rather
    than an invented value. (On a SEG dciodvfy rejects it instead.)
    """
    body_part = getattr(source, "body_part", None) or source.header.get("BodyPartExamined")
    if body_part:
        ds.BodyPartExamined = str(body_part)
    laterality = str(source.header.get("Laterality", "") or "").strip()
    if laterality or (laterality_when_unknown and not body_part):
        ds.Laterality = laterality


def clip_lo(text: str) -> str:
    """``text`` cut to the 64 characters of a Long String."""
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def series_description(model_name: str, model_version: str, what: str) -> str:
    """"pacs-ai {model} {version} {what} - not for clinical use", the model name shortened to fit 64."""
    tail = f" {model_version} {what} - not for clinical use"
    room = _LO_MAX - len("pacs-ai ") - len(tail)
    name = model_name if len(model_name) <= room else model_name[: max(room - 1, 1)] + "~"
    return clip_lo(f"pacs-ai {name}{tail}")


def patient_orientation(direction: np.ndarray) -> tuple[str, str]:
    """Patient Orientation (PS3.3 Section C.7.6.1.1.1) of rows and columns: the dominant LPS letter.

    ``direction`` rows are the unit vectors of k, j, i; an image row runs
    along i (``direction[2]``), a column along j (``direction[1]``).
    """

    def letter(v: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(v)))
        positive = v[axis] > 0
        return ("L", "P", "H")[axis] if positive else ("R", "A", "F")[axis]

    d = np.asarray(direction, dtype=float)
    return letter(d[2]), letter(d[1])


# --- rendering -------------------------------------------------------------------------------


def legend_text(finding: Any) -> str:
    """One line: finding, type, long axis, probability and the disclaimer (ASCII, any font has it)."""
    label = str(getattr(finding, "label", "") or "finding").strip().capitalize()
    parts = [label]
    kind = str(getattr(finding, "type", "") or "").strip()
    if kind:
        parts.append(kind)
    parts.append(f"{float(finding.diameter_mm):.1f} mm")
    parts.append(f"p={float(finding.probability):.2f}")
    return f"{', '.join(parts)} - {DISCLAIMER}"


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fitting_font(text: str, width: int) -> tuple[Any, tuple[int, int, int, int]]:
    """The largest font from width/36 down to 8 px in which ``text`` fits ``width`` less margins."""
    size = max(8, width // 36)
    while True:
        font = _font(size)
        box = font.getbbox(text)
        if box[2] - box[0] <= width - 8 or size <= 8:
            return font, box
        size -= 1


def _output_shape(rows: int, columns: int, spacing: tuple[float, float]) -> tuple[int, int]:
    """Square pixels of the finer spacing, then scaled up so the longer side is at least MIN_SIZE."""
    row_sp, col_sp = float(spacing[0]), float(spacing[1])
    pixel = min(row_sp, col_sp)
    height, width = rows * row_sp / pixel, columns * col_sp / pixel
    scale = max(1.0, MIN_SIZE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _slice_mask(finding: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """The finding's region on its centre slice as a full-slice boolean mask, or None."""
    got = finding.slice_mask() if hasattr(finding, "slice_mask") else None
    if got is None:
        return None
    mask, (r0, c0) = got
    mask = np.asarray(mask, dtype=bool)
    full = np.zeros(shape, dtype=bool)
    rows, cols = shape
    # Clip the box to the slice (a box reaching over the edge must not wrap round).
    sr0, sc0 = max(r0, 0), max(c0, 0)
    sr1, sc1 = min(r0 + mask.shape[0], rows), min(c0 + mask.shape[1], cols)
    if sr1 <= sr0 or sc1 <= sc0:
        return None
    full[sr0:sr1, sc0:sc1] = mask[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0]
    return full if full.any() else None


def _disc_mask(finding: Any, shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray | None:
    """Without a mask: a disc of the finding's diameter round its centre."""
    centre = getattr(finding, "center_index", None)
    if centre is None or not finding.diameter_mm:
        return None
    j, i = float(centre[1]), float(centre[2])
    radius = float(finding.diameter_mm) / 2
    jj, ii = np.ogrid[: shape[0], : shape[1]]
    disc = ((jj - j) * spacing[0]) ** 2 + ((ii - i) * spacing[1]) ** 2 <= radius**2
    return disc if disc.any() else None


def render_key_image(
    hu_slice: np.ndarray,
    spacing: tuple[float, float],
    mask: np.ndarray | None,
    legend: str,
    window: tuple[float, float] = LUNG_WINDOW,
) -> np.ndarray:
    """The key image as ``uint8`` RGB ``[row, column, 3]``: the slice, the outline and the legend band below.

    ``spacing`` is (row, column) mm of ``hu_slice``; ``mask`` a boolean array
    of the slice's shape or None.
    """
    centre, width = window
    lo = centre - width / 2
    grey = np.asarray(hu_slice, dtype=np.float32)
    grey = np.clip((grey - lo) * (255.0 / width) + 0.5, 0, 255).astype(np.uint8)
    out_h, out_w = _output_shape(grey.shape[0], grey.shape[1], spacing)
    image = Image.fromarray(grey, mode="L")
    if (out_h, out_w) != grey.shape:
        image = image.resize((out_w, out_h), Image.Resampling.BILINEAR)
    rgb = np.empty((out_h, out_w, 3), dtype=np.uint8)
    rgb[...] = np.asarray(image)[:, :, None]

    if mask is not None:
        region = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        if (out_h, out_w) != mask.shape:
            region = region.resize((out_w, out_h), Image.Resampling.BILINEAR)
        inside = np.asarray(region) >= 128
        if inside.any():
            rows_any, cols_any = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
            pad = OUTLINE_PX + OUTLINE_GAP_PX + 1
            r0, r1 = max(rows_any[0] - pad, 0), min(rows_any[-1] + pad + 1, out_h)
            c0, c1 = max(cols_any[0] - pad, 0), min(cols_any[-1] + pad + 1, out_w)
            box = inside[r0:r1, c0:c1]
            # A ring one pixel off the region, so the finding's own edge stays visible.
            near = ndimage.binary_dilation(box, iterations=OUTLINE_GAP_PX)
            ring = ndimage.binary_dilation(near, iterations=OUTLINE_PX) & ~near
            rgb[r0:r1, c0:c1][ring] = OUTLINE_RGB

    font, box = _fitting_font(legend, out_w)
    text_h = box[3] - box[1]
    band_h = text_h + 2 * max(4, text_h // 2)
    canvas = Image.new("RGB", (out_w, out_h + band_h), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb, mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4 - box[0], out_h + (band_h - text_h) // 2 - box[1]), legend, fill=LEGEND_RGB, font=font)
    return np.asarray(canvas)


# --- DICOM objects ---------------------------------------------------------------------------


def ranked_findings(findings: Sequence[Any], max_images: int) -> list[Any]:
    """The findings a key image is made for: most probable first (ties: source slice, then input order)."""
    order = sorted(
        range(len(findings)),
        key=lambda n: (-float(findings[n].probability), int(findings[n].slice_index), n),
    )
    return [findings[n] for n in order[: max(0, int(max_images))]]


def build_key_images(
    source: Any,
    findings: Sequence[Any],
    *,
    model_name: str,
    model_version: str,
    max_images: int = 5,
    series_number: int = SC_SERIES_NUMBER,
    content_datetime: _dt.datetime | None = None,
    manufacturer: str = MANUFACTURER,
    software_version: str = SOFTWARE_VERSION,
    uids: Mapping[str, Any] | None = None,
) -> list[Dataset]:
    """One Secondary Capture Image per finding, the ``max_images`` most probable, in that order.

    ``source`` is a :class:`dicom_node.series.LoadedSeries` (``hu``,
    ``spacing``, ``direction``, ``header``, ``source_images``, ``study_uid``,
    ``sop_instance_uids``, ``body_part``). Instance Number is the rank
    (1 = most probable). Returns an empty list when there is nothing to show.
    ``uids``: the result's UIDs from one place (``dicom_node.uids.output_uids``:
    ``sc_series`` and ``sc_instance(n)``); without it they are derived here.
    """
    chosen = ranked_findings(findings, max_images)
    if not chosen:
        return []
    when = output_datetime(content_datetime)
    uids = result_uids(source, model_name, model_version, uids)
    series_uid = uids["sc_series"]
    description = series_description(model_name, model_version, "key images")
    orientation = patient_orientation(source.direction)
    slice_spacing = (float(source.spacing[1]), float(source.spacing[2]))
    n_slices = source.hu.shape[0]
    images = []
    for rank, finding in enumerate(chosen, start=1):
        k = int(finding.slice_index)
        if not 0 <= k < n_slices:
            raise ValueError(f"finding {rank}: slice_index {k} is outside the source's {n_slices} slices")
        shape = source.hu.shape[1:]
        mask = _slice_mask(finding, shape)
        if mask is None:
            mask = _disc_mask(finding, shape, slice_spacing)
        legend = legend_text(finding)
        pixels = render_key_image(source.hu[k], slice_spacing, mask, legend)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source.header,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=(
                uids["sc_instance"](rank)
            ),
            instance_number=rank,
            manufacturer=manufacturer,
            patient_orientation=orientation,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=description,
            manufacturer_model_name=clip_lo(model_name),
            software_versions=clip_lo(f"{software_version} {model_name} {model_version}"),
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
        stamp_datetimes(sc, when)
        copy_body_part(source, sc, laterality_when_unknown=True)
        sc.ConversionType = "WSD"  # made on a workstation from a digital image, not a video or film digitizer
        sc.BurnedInAnnotation = "YES"
        sc.RecognizableVisualFeatures = "NO"
        sc.LossyImageCompression = "00"
        sc.ImageComments = legend
        sc.DerivationDescription = (
            f"Source slice {k + 1} of {n_slices} in a lung window (W {LUNG_WINDOW[1]:g} L {LUNG_WINDOW[0]:g}), "
            f"finding outline and legend burned in by {model_name} {model_version}"
        )
        sop_class, sop_instance = source.source_images[k]
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = sop_instance
        ref.PurposeOfReferenceCodeSequence = [_SOURCE_PURPOSE]
        sc.SourceImageSequence = [ref]
        images.append(sc)
    return images


def build_kos(
    source: Any,
    key_images: Sequence[Dataset],
    sr: Dataset | None = None,
    *,
    model_name: str,
    model_version: str,
    series_number: int = KO_SERIES_NUMBER,
    content_datetime: _dt.datetime | None = None,
    manufacturer: str = MANUFACTURER,
    uids: Mapping[str, Any] | None = None,
) -> Dataset:
    """A Key Object Selection Document (PS3.3 Section A.35.4, TID 2010) titled "Of Interest"
    (113000, DCM) that lists the key images and the SR, so viewers that flag key images show them.

    The references are left unnamed, as TID 2010 rows 5-6 have them: highdicom
    names them (260753009, SCT, "Source"), which PixelMed's TID 2010 check
    rejects (FIELD-NOTES.md). Raises :class:`ValueError` with nothing to reference.
    ``uids``: as for :func:`build_key_images` (``kos_series``, ``kos_instance``).
    """
    referenced = list(key_images) + ([sr] if sr is not None else [])
    if not referenced:
        raise ValueError("a Key Object Selection needs at least one key image or SR to reference")
    uids = result_uids(source, model_name, model_version, uids)
    when = output_datetime(content_datetime)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids["kos_device"],
            name=clip_lo(model_name),
            model_name=clip_lo(f"{model_name} {model_version}"),
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=referenced,
        observer_device_context=observer,
        description=f"pacs-ai {model_name} {model_version}: AI results, not verified, not for clinical use",
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=uids["kos_series"],
        series_number=series_number,
        sop_instance_uid=uids["kos_instance"],
        instance_number=1,
        manufacturer=manufacturer,
        series_description=series_description(model_name, model_version, "key objects"),
        content_date=when.date(),
        content_time=when.time(),
    )
    # After construction: highdicom's evidence search needs the names it put there.
    for item in kos.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE") and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
    stamp_datetimes(kos, when)
    return kos
