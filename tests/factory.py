"""Small, valid DICOM instances made on the fly, and helpers to read what
the node stored. The patient module carries a sentinel name/ID/birth date
that must never show up in a log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SENTINEL_NAME = "SENTINEL^PATIENTNAME"
SENTINEL_ID = "SENTINEL-ID-4711"
SENTINEL_BIRTH_DATE = "19010203"


def ct_dataset(
    study_uid: str,
    series_uid: str | None = None,
    *,
    index: int = 0,
    size: int = 64,
    sop_uid: str | None = None,
    sop_class: str = CTImageStorage,
    transfer_syntax: str = ExplicitVRLittleEndian,
    fill: int | None = None,
) -> Dataset:
    """A small CT image with the sentinel patient."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid(entropy_srcs=[study_uid, "series"])
    ds.PatientName = SENTINEL_NAME
    ds.PatientID = SENTINEL_ID
    ds.PatientBirthDate = SENTINEL_BIRTH_DATE
    ds.Modality = "CT"
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    value = index if fill is None else fill
    ds.PixelData = np.full((size, size), value, dtype=np.int16).tobytes()
    return ds


def write_series(directory: Path, count: int, *, study_uid: str | None = None, size: int = 64) -> tuple[str, list[Path]]:
    """Write ``count`` CT files of one study/series; returns (study UID, paths)."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for i in range(count):
        ds = ct_dataset(study_uid, series_uid, index=i, size=size)
        path = directory / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file, without preamble and file meta:
    what went over the wire, so "stored as received" can be compared."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a DICOM file"
    # (0002,0000) UL group length: explicit VR LE, value at offset 140
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]
