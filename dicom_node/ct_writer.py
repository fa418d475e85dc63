"""Write a HU volume as a CT Image Storage series, one file per slice.

`pacs-ai phantom` (DESIGN.md section 5) and the tests need CT studies that
look like a scanner's: every module of the CT Image IOD (PS3.3 Section
A.3.3) with its Type 1 and Type 2 attributes, geometry that round-trips
through :mod:`dicom_node.series`, and the transfer syntaxes PACS actually
send. The volume and its geometry follow ``inference/volume.py``: ``hu`` is
indexed ``[k, j, i]`` (slice, row, column), ``spacing`` is ``(slice, row,
column)`` in mm, ``origin`` is the patient position (LPS) of voxel
``[0, 0, 0]`` and the rows of ``direction`` are the unit vectors along which
``k``, ``j`` and ``i`` grow.

Pixel encoding: stored value = HU + 1024 with Rescale Intercept -1024 and
Rescale Slope 1 (PS3.3 Section C.8.2.1.1.2), unsigned with 12 Bits Stored
when every value fits 0..4095 (the usual CT layout), unsigned 16 bits when it
fits 0..65535, else signed 16 bits.

Transfer syntaxes (PS3.5 Section 10 and Annex A.4) and what encodes them:

- Explicit VR Little Endian (1.2.840.10008.1.2.1): numpy only.
- RLE Lossless (1.2.840.10008.1.2.5): pydicom's encoder, pure Python (about
  0.15 s for a 512x512 slice); pylibjpeg-rle, when installed, makes both
  directions fast and pydicom picks it up by itself.
- JPEG 2000 Lossless (1.2.840.10008.1.2.4.90): pydicom's encoder backed by
  pylibjpeg-openjpeg (>= 2.0), for images of at least 32x32 pixels; decoding
  needs the same or Pillow/GDCM.
- JPEG-LS Lossless (1.2.840.10008.1.2.4.80): pydicom's encoder backed by
  pyjpegls, an optional package: without it asking for this syntax raises
  :class:`ValueError` naming it.

JPEG Lossless, Non-Hierarchical, First-Order Prediction, Selection Value 1
(1.2.840.10008.1.2.4.70), the syntax most CT scanners send, is not written
here: pydicom 3 has no encoder for it. Write Explicit VR Little Endian and
compress each file with DCMTK's ``dcmcjpeg --encode-lossless-sv1 in.dcm
out.dcm`` (what the tests do); pydicom decodes the result with pylibjpeg +
pylibjpeg-libjpeg (or GDCM).

Compression uses pydicom's encoders (``pydicom.pixels.get_encoder``, the
machinery behind ``Dataset.compress``) directly on each slice's array:
``Dataset.compress`` would also mint a new SOP Instance UID per call unless
told not to, and check the whole data set again for every slice.

The whole series is written from one template data set whose per-slice
attributes are replaced before each write: building a fresh data set per
slice was the slow part.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

#: The transfer syntaxes :func:`write_ct_series` can write.
SUPPORTED_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless)

#: How to get JPEG Lossless SV1 files, which this module does not encode (see the module docstring).
JPEG_LOSSLESS_SV1_HINT = (
    f"{JPEGLosslessSV1.name} ({JPEGLosslessSV1}) cannot be written here: pydicom has no encoder for it. "
    f"Write {ExplicitVRLittleEndian.name} and compress each file with DCMTK's dcmcjpeg, "
    "e.g. 'dcmcjpeg --encode-lossless-sv1 in.dcm out.dcm'"
)

RESCALE_INTERCEPT = -1024
#: A lung window (centre, width) in HU, the default VOI (PS3.3 Section C.11.2).
LUNG_WINDOW = (-600.0, 1500.0)
#: Study date and time when none is given, so that the same seed writes the same bytes.
DEFAULT_STUDY_DATETIME = _dt.datetime(2024, 1, 15, 9, 30, 0)
MANUFACTURER = "pacs-ai"
MODEL_NAME = "synthetic phantom"

_UNIT_TOLERANCE = 1e-3


def write_ct_series(
    out_dir: str | Path,
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | Sequence[Sequence[float]] | None = None,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    uid_seed: object = None,
    patient_name: str = "PHANTOM^SYNTHETIC",
    patient_id: str = "PACSAI-PHANTOM",
    patient_birth_date: str = "",
    patient_sex: str = "O",
    study_datetime: _dt.datetime = DEFAULT_STUDY_DATETIME,
    study_id: str = "1",
    accession_number: str = "",
    study_description: str = "CT CHEST (synthetic phantom)",
    series_number: int = 1,
    series_description: str = "Synthetic chest CT",
    slice_thickness: float | None = None,
    body_part: str | None = "CHEST",
    patient_position: str = "HFS",
    kvp: float = 120.0,
    convolution_kernel: str = "STANDARD",
    window: tuple[float, float] = LUNG_WINDOW,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Path]:
    """Write ``hu`` as one CT Image Storage instance per slice into ``out_dir``.

    Files are named ``CT000001.dcm``, ``CT000002.dcm``, ... in ``k`` order,
    with Instance Number ``k + 1``; the paths are returned in that order.

    UIDs: the ones given are used; the others are generated, from
    ``uid_seed`` when it is given (``generate_uid(entropy_srcs=...)``, so the
    same seed and arguments write the same study, byte for byte) or at
    random. ``slice_thickness`` defaults to the slice spacing.
    ``direction`` defaults to axial (rows S, P, L as in ``inference/volume.py``);
    its rows 1 and 2 must be orthonormal, row 0 a unit vector (it need not
    be their cross product: a head-to-foot or tilted stack is written as given).

    Raises :class:`ValueError` for a volume or geometry that cannot be
    written, naming the argument.
    """
    transfer_syntax = UID(str(transfer_syntax))
    if transfer_syntax == JPEGLosslessSV1:
        raise ValueError(JPEG_LOSSLESS_SV1_HINT)
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        names = ", ".join(f"{ts.name} ({ts})" for ts in SUPPORTED_TRANSFER_SYNTAXES)
        raise ValueError(f"transfer_syntax {transfer_syntax} is not supported; use one of {names}")
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"hu must be a non-empty 3D array [slice, row, column], got shape {hu.shape}")
    if not np.issubdtype(hu.dtype, np.integer):
        raise ValueError(f"hu must hold integers (Hounsfield units), got dtype {hu.dtype}")
    spacing_t = _floats(spacing, 3, "spacing")
    if min(spacing_t) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing_t}")
    origin_t = _floats(origin, 3, "origin")
    d = _direction(direction)

    pixel = _pixel_layout(int(hu.min()), int(hu.max()))
    rows, columns = int(hu.shape[1]), int(hu.shape[2])
    uids = _Uids(uid_seed, study_uid, series_uid, frame_of_reference_uid)

    ds = _template(
        uids=uids,
        rows=rows,
        columns=columns,
        spacing=spacing_t,
        direction=d,
        pixel=pixel,
        patient_name=patient_name,
        patient_id=patient_id,
        patient_birth_date=patient_birth_date,
        patient_sex=patient_sex,
        study_datetime=study_datetime,
        study_id=study_id,
        accession_number=accession_number,
        study_description=study_description,
        series_number=series_number,
        series_description=series_description,
        slice_thickness=spacing_t[0] if slice_thickness is None else float(slice_thickness),
        body_part=body_part,
        patient_position=patient_position,
        kvp=kvp,
        convolution_kernel=convolution_kernel,
        window=window,
        transfer_syntax=transfer_syntax,
    )
    encode = _encoder(transfer_syntax, rows, columns, pixel)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    normal = np.cross(d[2], d[1])
    scratch = np.empty((rows, columns), dtype=np.int32)
    paths: list[Path] = []
    for k in range(hu.shape[0]):
        position = np.asarray(origin_t) + k * spacing_t[0] * d[0]
        sop_uid = uids.instance(k)
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ normal))
        scratch[...] = hu[k]
        scratch -= RESCALE_INTERCEPT
        ds.PixelData = encode(scratch.astype(pixel.dtype))
        if transfer_syntax.is_encapsulated:
            ds["PixelData"].is_undefined_length = True
        path = out / f"CT{k + 1:06d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


class _PixelLayout:
    """Bits Allocated/Stored, High Bit and Pixel Representation of the stored values."""

    def __init__(self, bits_stored: int, signed: bool) -> None:
        self.bits_stored = bits_stored
        self.signed = signed
        self.dtype = np.dtype("<i2" if signed else "<u2")


def _pixel_layout(hu_min: int, hu_max: int) -> _PixelLayout:
    lo, hi = hu_min - RESCALE_INTERCEPT, hu_max - RESCALE_INTERCEPT
    if lo >= 0 and hi <= 4095:
        return _PixelLayout(12, signed=False)
    if lo >= 0 and hi <= 65535:
        return _PixelLayout(16, signed=False)
    if lo >= -32768 and hi <= 32767:
        return _PixelLayout(16, signed=True)
    raise ValueError(
        f"hu spans {hu_min}..{hu_max}: with Rescale Intercept {RESCALE_INTERCEPT} that does not fit 16 bits"
    )


class _Uids:
    """The series' UIDs: given, derived from a seed, or random."""

    def __init__(self, seed: object, study: str | None, series: str | None, frame_of_reference: str | None) -> None:
        self.seed = None if seed is None else repr(seed)
        self.study = study or self._make("study")
        self.series = series or self._make("series", self.study)
        self.frame_of_reference = frame_of_reference or self._make("frame-of-reference", self.study, self.series)

    def _make(self, *parts: str) -> str:
        if self.seed is None:
            return generate_uid()
        return generate_uid(entropy_srcs=["pacs-ai ct_writer", self.seed, *parts])

    def instance(self, k: int) -> str:
        return self._make("instance", self.series, str(k))


def _floats(values: Sequence[float], n: int, what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel())
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be {n} finite numbers, got {values!r}")
    return out


def _direction(direction: object) -> np.ndarray:
    if direction is None:
        return np.eye(3)[[2, 1, 0]]
    d = np.asarray(direction, dtype=np.float64)
    if d.shape != (3, 3) or not np.all(np.isfinite(d)):
        raise ValueError("direction must be a 3x3 matrix whose rows are the k, j, i unit vectors")
    norms = np.linalg.norm(d, axis=1)
    if np.any(np.abs(norms - 1) > _UNIT_TOLERANCE):
        raise ValueError(f"direction rows must be unit vectors, got lengths {np.round(norms, 4).tolist()}")
    if abs(float(d[1] @ d[2])) > _UNIT_TOLERANCE:
        raise ValueError("direction rows 1 and 2 (column and row cosines of Image Orientation) must be orthogonal")
    if abs(float(d[0] @ np.cross(d[2], d[1]))) < 0.5:
        raise ValueError("direction row 0 (the slice direction) lies almost in the image plane")
    return d / norms[:, None]


def _ds(value: float) -> str:
    """A Decimal String value of at most 16 characters (PS3.5 Table 6.2-1)."""
    if value == 0:
        return "0"
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if len(text) > 16:
        text = f"{value:.10g}"
    return "0" if text in ("-0", "") else text


def _text_needs_utf8(*values: str | None) -> bool:
    return any(v is not None and not v.isascii() for v in values)


def _template(
    *,
    uids: _Uids,
    rows: int,
    columns: int,
    spacing: tuple[float, ...],
    direction: np.ndarray,
    pixel: _PixelLayout,
    patient_name: str,
    patient_id: str,
    patient_birth_date: str,
    patient_sex: str,
    study_datetime: _dt.datetime,
    study_id: str,
    accession_number: str,
    study_description: str,
    series_number: int,
    series_description: str,
    slice_thickness: float,
    body_part: str | None,
    patient_position: str,
    kvp: float,
    convolution_kernel: str,
    window: tuple[float, float],
    transfer_syntax: UID,
) -> Dataset:
    """Every attribute that is the same on all slices, module by module (PS3.3 Table A.3-1)."""
    date = study_datetime.strftime("%Y%m%d")
    time = study_datetime.strftime("%H%M%S")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uids.instance(0)
    ds.file_meta.TransferSyntaxUID = transfer_syntax

    # Patient (C.7.1.1)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = uids.study
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = study_id
    ds.AccessionNumber = accession_number
    ds.StudyDescription = study_description
    # General Series (C.7.3.1); Patient Position is Type 2C, required for CT Image Storage.
    ds.Modality = "CT"
    ds.SeriesInstanceUID = uids.series
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = series_description
    if body_part:
        ds.BodyPartExamined = body_part.upper()
    ds.PatientPosition = patient_position
    # Frame of Reference (C.7.4.1)
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = ""
    # General Equipment (C.7.5.1)
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = MODEL_NAME
    # General Acquisition (C.7.10.1)
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    # General Image (C.7.6.1): lossless or none, so never lossy.
    ds.InstanceNumber = 1
    ds.ContentDate = date
    ds.ContentTime = time
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    # Image Plane (C.7.6.2). Row cosines first: the direction in which the column index i grows.
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[2])]
    ds.ImageOrientationPatient = [_ds(v) for v in (*direction[2], *direction[1])]
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.SliceThickness = _ds(slice_thickness)
    ds.SpacingBetweenSlices = _ds(spacing[0])
    ds.SliceLocation = "0"
    # Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = pixel.bits_stored
    ds.HighBit = pixel.bits_stored - 1
    ds.PixelRepresentation = 1 if pixel.signed else 0
    # CT Image (C.8.2.1)
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = _ds(kvp)
    ds.ScanOptions = "HELICAL MODE"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(columns * spacing[2])
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.Exposure = "100"
    ds.FilterType = "BODY"
    ds.ConvolutionKernel = convolution_kernel
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    ds.SpiralPitchFactor = 1.0
    ds.CTDIvol = 8.0
    # CTDIvol means nothing without its phantom (CID 4052, DCM 113691).
    phantom = Dataset()
    phantom.CodeValue = "113691"
    phantom.CodingSchemeDesignator = "DCM"
    phantom.CodeMeaning = "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = [phantom]
    # VOI LUT (C.11.2): a lung window as the default presentation.
    ds.WindowCenter = _ds(window[0])
    ds.WindowWidth = _ds(window[1])
    ds.WindowCenterWidthExplanation = "LUNG"
    # SOP Common (C.12.1). Specific Character Set only when a value needs more than ASCII.
    if _text_needs_utf8(patient_name, patient_id, study_description, series_description):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uids.instance(0)
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    return ds


def _encoder(transfer_syntax: UID, rows: int, columns: int, pixel: _PixelLayout):
    """A function from one slice of stored values to the Pixel Data value."""
    if transfer_syntax == ExplicitVRLittleEndian:
        return lambda arr: arr.tobytes()
    if transfer_syntax == JPEG2000Lossless and min(rows, columns) < 32:
        # openjpeg's encoder always uses 6 DWT resolutions, which need 2**5 pixels a side.
        raise ValueError(f"{transfer_syntax.name} needs images of at least 32x32 pixels, got {rows}x{columns}")
    encoder = get_encoder(transfer_syntax)
    if transfer_syntax == JPEGLSLossless and not encoder.is_available:
        raise ValueError(
            f"cannot encode {transfer_syntax.name}: needs the pyjpegls package (pip install pyjpegls), "
            "which is not installed"
        )
    if not encoder.is_available:
        missing = "; ".join(encoder.missing_dependencies) or "an encoding plugin"
        raise ValueError(f"cannot encode {transfer_syntax.name}: needs {missing}")
    options = dict(
        rows=rows,
        columns=columns,
        samples_per_pixel=1,
        number_of_frames=1,
        bits_allocated=16,
        bits_stored=pixel.bits_stored,
        pixel_representation=1 if pixel.signed else 0,
        photometric_interpretation="MONOCHROME2",
    )
    return lambda arr: encapsulate([encoder.encode(arr, **options)], has_bot=False)

