"""dicom_node.ct_writer: CT series that read back exactly and pass dciodvfy.

JPEG Lossless SV1, which ct_writer does not encode, comes from DCMTK's
dcmcjpeg run on the uncompressed files it writes (:func:`write_jpeg_lossless_sv1`).
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node.ct_writer import LUNG_WINDOW, write_ct_series

#: JPEG Lossless SV1 by dcmcjpeg, so those cases carry the dcmtk marker.
SV1 = pytest.param(JPEGLosslessSV1, marks=pytest.mark.dcmtk, id="jpeg-lossless-sv1")
ALL_SYNTAXES = [ExplicitVRLittleEndian, SV1, JPEG2000Lossless, RLELossless]
AXIAL = np.eye(3)[[2, 1, 0]]


def write_jpeg_lossless_sv1(out_dir, hu, *args, **kwargs) -> list[Path]:
    """``write_ct_series`` uncompressed, then each file through DCMTK's ``dcmcjpeg`` into ``out_dir``.

    Same arguments as ``write_ct_series`` (``transfer_syntax`` JPEG Lossless
    SV1 or left out); the files keep their names and SOP Instance UIDs. One
    dcmcjpeg per file, run in parallel. Tests calling this carry ``@pytest.mark.dcmtk``.
    """
    if kwargs.pop("transfer_syntax", JPEGLosslessSV1) != JPEGLosslessSV1:
        raise ValueError("write_jpeg_lossless_sv1 writes JPEG Lossless SV1 only")
    dcmcjpeg = shutil.which("dcmcjpeg")
    assert dcmcjpeg, "DCMTK's dcmcjpeg is not installed: the README's test command installs DCMTK"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="plain-") as plain_dir:
        plain = write_ct_series(plain_dir, hu, *args, **kwargs)
        compressed = [out / p.name for p in plain]

        def compress(pair):
            src, dst = pair
            subprocess.run(
                [dcmcjpeg, "--encode-lossless-sv1", "--uid-never", str(src), str(dst)],
                check=True, capture_output=True, timeout=60,
            )

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(compress, zip(plain, compressed)))
    return compressed


def _write_as(out_dir, hu, *args, transfer_syntax=ExplicitVRLittleEndian, **kwargs) -> list[Path]:
    """``write_ct_series``, or :func:`write_jpeg_lossless_sv1` for JPEG Lossless SV1."""
    write = write_jpeg_lossless_sv1 if transfer_syntax == JPEGLosslessSV1 else write_ct_series
    return write(out_dir, hu, *args, transfer_syntax=transfer_syntax, **kwargs)


def _volume(shape=(5, 24, 20), lo=-1024, hi=2000, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = rng.integers(lo, hi + 1, size=shape).astype(np.int32)
    hu[0, 0, 0], hu[-1, -1, -1] = lo, hi
    return hu


def _hu_of(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)


def test_every_slice_has_the_ct_image_iod_attributes(tmp_path):
    hu = _volume()
    paths = write_ct_series(tmp_path, hu, (2.5, 0.7, 0.8), (-10.0, -20.0, -300.0), AXIAL, uid_seed=7)
    assert [p.name for p in paths] == [f"CT{k:06d}.dcm" for k in range(1, 6)]
    type1 = [
        "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
        "FrameOfReferenceUID", "ImageType", "PixelSpacing", "ImageOrientationPatient",
        "ImagePositionPatient", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleIntercept",
        "RescaleSlope", "PixelData",
    ]
    type2 = [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
        "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "PatientPosition",
        "PositionReferenceIndicator", "Manufacturer", "InstanceNumber", "SliceThickness", "KVP",
        "AcquisitionNumber",
    ]
    uids = set()
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        for keyword in type1:
            assert ds.get(keyword) not in (None, ""), f"{keyword} (Type 1) missing or empty on slice {k}"
        for keyword in type2:
            assert keyword in ds, f"{keyword} (Type 2) missing on slice {k}"
        assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST"
        assert ds.Manufacturer == "pacs-ai" and ds.ManufacturerModelName == "synthetic phantom"
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.Rows, ds.Columns) == (24, 20)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert (float(ds.RescaleIntercept), float(ds.RescaleSlope), ds.RescaleType) == (-1024.0, 1.0, "HU")
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == LUNG_WINDOW
        assert ds.InstanceNumber == k + 1
        assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.8]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([-10, -20, -300 + 2.5 * k])
        assert float(ds.SliceLocation) == pytest.approx(-300 + 2.5 * k)
        assert float(ds.SliceThickness) == 2.5
        assert ds.StudyDate == "20240115" and ds.LossyImageCompression == "00"
        assert "SpecificCharacterSet" not in ds
        uids.add(ds.SOPInstanceUID)
        np.testing.assert_array_equal(_hu_of(path), hu[k])
    assert len(uids) == 5


def test_geometry_follows_direction_and_origin(tmp_path):
    # Rotated 20 degrees about the patient's z axis, stacked head to foot.
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    direction = np.array([[0, 0, -1.0], [-s, c, 0], [c, s, 0]])
    paths = write_ct_series(
        tmp_path, _volume((3, 8, 8)), (3.0, 0.5, 0.6), (1.0, 2.0, 3.0), direction, slice_thickness=2.0
    )
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert [float(v) for v in ds.ImageOrientationPatient] == pytest.approx([c, s, 0, -s, c, 0], abs=1e-6)
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([1, 2, 3 - 3 * k], abs=1e-5)
        assert float(ds.SliceThickness) == 2.0 and float(ds.SpacingBetweenSlices) == 3.0
        # Slice Location: the position along the image normal (row x column cosines: +z here).
        assert float(ds.SliceLocation) == pytest.approx(3 - 3 * k, abs=1e-5)


def _id(ts) -> str:
    names = {
        ExplicitVRLittleEndian: "explicit-le",
        JPEGLosslessSV1: "jpeg-lossless-sv1",
        JPEG2000Lossless: "j2k-lossless",
        RLELossless: "rle",
    }
    return names.get(ts, str(ts))


@pytest.mark.parametrize("syntax", ALL_SYNTAXES, ids=_id)
def test_every_transfer_syntax_is_lossless(tmp_path, syntax):
    hu = _volume((3, 33, 40))
    paths = _write_as(tmp_path, hu, (1, 1, 1), transfer_syntax=syntax)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        if syntax.is_encapsulated:
            assert ds["PixelData"].is_undefined_length
        np.testing.assert_array_equal(_hu_of(path), hu[k])


@pytest.mark.parametrize(
    "lo, hi, bits_stored, signed",
    [(-1024, 3071, 12, False), (-1024, 40000, 16, False), (-3000, 3000, 16, True), (-31744, 31743, 16, True)],
)
@pytest.mark.dcmtk
def test_stored_layout_follows_the_value_range(tmp_path, lo, hi, bits_stored, signed):
    hu = _volume((2, 16, 16), lo, hi)
    paths = write_jpeg_lossless_sv1(tmp_path, hu, (1, 1, 1))
    ds = pydicom.dcmread(paths[0])
    assert (ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (bits_stored, bits_stored - 1, int(signed))
    for k, path in enumerate(paths):
        np.testing.assert_array_equal(_hu_of(path), hu[k])


@pytest.mark.dcmtk
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_jpeg_lossless_decodes_with_dcmtk_too(tmp_path, signed):
    """pylibjpeg-libjpeg and DCMTK's dcmdjpeg, two independent decoders, read dcmcjpeg's bit stream alike.

    The unsigned volume has neighbours exactly 32768 apart: difference
    category 16, which carries no extra bits (T.81 Table H.2, H.1.2.2).
    """
    if signed:
        hu = _volume((2, 16, 16), -31744, 31743)
    else:
        hu = _volume((2, 16, 16), -1024, 64511)
        hu[1, :, ::2], hu[1, :, 1::2] = -1024, 31744
    paths = write_jpeg_lossless_sv1(tmp_path / "jpeg", hu, (1, 1, 1))
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert pydicom.dcmread(paths[0]).PixelRepresentation == int(signed)
    dcmdjpeg = shutil.which("dcmdjpeg")
    assert dcmdjpeg, "DCMTK's dcmdjpeg is not installed: the README's test command installs DCMTK"
    for k, path in enumerate(paths):
        plain = tmp_path / f"plain{k}.dcm"
        subprocess.run([dcmdjpeg, str(path), str(plain)], check=True, capture_output=True)
        np.testing.assert_array_equal(_hu_of(plain), hu[k])
        np.testing.assert_array_equal(_hu_of(path), hu[k])


def test_jpeg_lossless_sv1_is_left_to_dcmcjpeg(tmp_path):
    with pytest.raises(ValueError, match=r"no encoder .*dcmcjpeg --encode-lossless-sv1 in\.dcm out\.dcm") as caught:
        write_ct_series(tmp_path, _volume((2, 8, 8)), (1, 1, 1), transfer_syntax=JPEGLosslessSV1)
    assert str(JPEGLosslessSV1) in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_jpeg_ls_lossless_needs_pyjpegls(tmp_path):
    """JPEG-LS through pyjpegls when it is installed (an optional package), else an error naming it."""
    hu = _volume((2, 16, 16), -3000, 3000)
    try:
        import jpeg_ls  # noqa: F401  (pyjpegls)
    except ImportError:
        with pytest.raises(ValueError, match=r"JPEG-LS Lossless.*needs the pyjpegls package"):
            write_ct_series(tmp_path, hu, (1, 1, 1), transfer_syntax=JPEGLSLossless)
        assert not list(tmp_path.iterdir())
        return
    paths = write_ct_series(tmp_path, hu, (1, 1, 1), transfer_syntax=JPEGLSLossless)
    for k, path in enumerate(paths):
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEGLSLossless
        np.testing.assert_array_equal(_hu_of(path), hu[k])


@pytest.mark.parametrize("syntax", ALL_SYNTAXES + ["signed"], ids=_id)
def test_dciodvfy_finds_nothing_to_complain_about(tmp_path, syntax):
    """PS3.3 A.3 as David Clunie's validator reads it (DESIGN.md section 6: outputs must pass dciodvfy)."""
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.fail("dciodvfy is not installed (Debian package dicom3tools)")
    lo = -3000 if syntax == "signed" else -1024
    ts = ExplicitVRLittleEndian if syntax == "signed" else syntax
    hu = _volume((2, 32, 32), lo)
    paths = _write_as(tmp_path, hu, (1, 1, 1), transfer_syntax=ts, patient_name="Müller^Jörg")
    result = subprocess.run([dciodvfy, str(paths[0])], capture_output=True, text=True, check=False)
    output = (result.stdout + result.stderr).strip()
    assert output.splitlines()[0] == "CTImage", output
    assert "Error" not in output and "Warning" not in output, output


def test_same_seed_same_bytes_other_seed_other_uids(tmp_path):
    hu = _volume((3, 8, 8))
    a = write_ct_series(tmp_path / "a", hu, (1, 1, 1), uid_seed=42)
    b = write_ct_series(tmp_path / "b", hu, (1, 1, 1), uid_seed=42)
    c = write_ct_series(tmp_path / "c", hu, (1, 1, 1), uid_seed=43)
    d = write_ct_series(tmp_path / "d", hu, (1, 1, 1))
    e = write_ct_series(tmp_path / "e", hu, (1, 1, 1))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]

    def uids(paths):
        ds = pydicom.dcmread(paths[0])
        return {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.SOPInstanceUID}

    assert len(uids(a)) == 4
    assert not uids(a) & uids(c)
    assert not uids(d) & uids(e)


def test_given_uids_are_used(tmp_path):
    paths = write_ct_series(
        tmp_path, _volume((2, 8, 8)), (1, 1, 1),
        study_uid="1.2.3.4", series_uid="1.2.3.4.5", frame_of_reference_uid="1.2.3.4.6", uid_seed=1,
        series_number=7, series_description="Lung 1mm", body_part="chest",
        study_datetime=datetime.datetime(2023, 5, 6, 7, 8, 9),
    )
    ds = pydicom.dcmread(paths[1])
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) == ("1.2.3.4", "1.2.3.4.5", "1.2.3.4.6")
    assert (ds.SeriesNumber, ds.SeriesDescription, ds.BodyPartExamined) == (7, "Lung 1mm", "CHEST")
    assert (ds.StudyDate, ds.StudyTime, ds.ContentDate) == ("20230506", "070809", "20230506")


def test_non_ascii_names_declare_utf8(tmp_path):
    paths = write_ct_series(tmp_path, _volume((1, 4, 4)), (1, 1, 1), patient_name="Müller^Jörg")
    ds = pydicom.dcmread(paths[0])
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jörg"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hu=np.zeros((4, 4), np.int16)), "3D array"),
        (dict(hu=np.zeros((2, 4, 4), np.float32)), "integers"),
        (dict(hu=np.array([[[-40000, 40000]]], np.int32)), "does not fit 16 bits"),
        (dict(spacing=(1, 0, 1)), "spacing must be positive"),
        (dict(direction=np.eye(3) * 2), "unit vectors"),
        (dict(direction=[[0, 0, 1], [1, 0, 0], [1, 0, 0]]), "orthogonal"),
        (dict(direction=[[1, 0, 0], [0, 1, 0], [1, 0, 0]]), "in the image plane"),
        (dict(transfer_syntax="1.2.840.10008.1.2.4.50"), "not supported"),
        (dict(transfer_syntax=JPEGLosslessSV1), "dcmcjpeg"),
        (dict(transfer_syntax=JPEG2000Lossless), "at least 32"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    args = dict(hu=np.zeros((2, 4, 4), np.int16), spacing=(1, 1, 1), origin=(0, 0, 0), direction=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        write_ct_series(tmp_path, **args)
    assert not list(tmp_path.iterdir())
