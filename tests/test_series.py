"""dicom_node.series: scan, select and load series written by dicom_node.ct_writer."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from dicom_node import series as series_mod
from dicom_node.ct_writer import write_ct_series
from dicom_node.errors import DicomNodeError
from dicom_node.series import LoadedSeries, SeriesError, SeriesSelector, load_series, scan_series, select_series

from .factory import SENTINEL_BIRTH_DATE, SENTINEL_ID, SENTINEL_NAME
from .test_ct_writer import write_jpeg_lossless_sv1

AXIAL = np.eye(3)[[2, 1, 0]]
CORONAL = np.array([[0, 1.0, 0], [0, 0, -1], [1, 0, 0]])
SAGITTAL = np.array([[-1.0, 0, 0], [0, 0, -1], [0, 1, 0]])
SPACING = (1.25, 0.7, 0.8)
ORIGIN = (-22.0, -30.5, -100.0)


def _volume(shape=(20, 64, 64), seed=0, lo=-1024, hi=2000) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi + 1, size=shape).astype(np.int16)


def _write(folder: Path, hu=None, spacing=SPACING, origin=ORIGIN, direction=AXIAL, **kwargs) -> list[Path]:
    """``write_ct_series``; JPEG Lossless SV1 through DCMTK's dcmcjpeg (callers carry ``@pytest.mark.dcmtk``)."""
    hu = _volume() if hu is None else hu
    kwargs.setdefault("patient_name", SENTINEL_NAME)
    kwargs.setdefault("patient_id", SENTINEL_ID)
    kwargs.setdefault("patient_birth_date", SENTINEL_BIRTH_DATE)
    write = write_jpeg_lossless_sv1 if kwargs.get("transfer_syntax") == JPEGLosslessSV1 else write_ct_series
    return write(folder, hu, spacing, origin, direction, **kwargs)


def _edit(paths, change) -> None:
    """Rewrite files by hand: ``change(ds, k)`` for the k-th path."""
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        change(ds, k)
        ds.save_as(path, enforce_file_format=True)


def _uids(paths) -> list[str]:
    return [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]


def _load(folder: Path, **selector) -> LoadedSeries:
    chosen, reasons = select_series(scan_series(folder), SeriesSelector(**selector))
    assert chosen is not None, reasons
    return load_series(chosen)


def _assert_no_patient_data(text: str) -> None:
    for sentinel in (SENTINEL_NAME, SENTINEL_ID, SENTINEL_BIRTH_DATE, "SENTINEL"):
        assert sentinel not in text


def _assert_geometry(loaded: LoadedSeries, hu, spacing, origin, direction, uids) -> None:
    assert loaded.hu.dtype == np.int16
    np.testing.assert_array_equal(loaded.hu, hu)
    np.testing.assert_allclose(loaded.spacing, spacing, atol=1e-5)
    np.testing.assert_allclose(loaded.origin, origin, atol=1e-5)
    np.testing.assert_allclose(loaded.direction, direction, atol=1e-6)
    assert list(loaded.sop_instance_uids) == list(uids)
    assert [inst for _, inst in loaded.source_images] == list(uids)


# --- round trips ----------------------------------------------------------------------------


def test_shuffled_files_and_instance_numbers_load_in_position_order(tmp_path):
    hu = _volume()
    paths = _write(tmp_path / "study", hu, uid_seed=1, body_part="CHEST")
    uids = _uids(paths)
    numbers = list(range(1, len(paths) + 1))
    random.Random(3).shuffle(numbers)
    _edit(paths, lambda ds, k: setattr(ds, "InstanceNumber", numbers[k]))
    names = [f"{generate_uid()}.dcm" for _ in paths]
    for path, name in zip(paths, names):
        path.rename(path.with_name(name))

    loaded = _load(tmp_path / "study", min_slices=20, body_part=["chest"])

    _assert_geometry(loaded, hu, SPACING, ORIGIN, AXIAL, uids)
    assert list(loaded.instance_numbers) == numbers
    np.testing.assert_allclose(loaded.positions[:, 2], ORIGIN[2] + SPACING[0] * np.arange(20))
    assert loaded.modality == "CT" and loaded.body_part == "CHEST" and loaded.series_number == 1
    assert loaded.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    first = pydicom.dcmread(paths[0].with_name(names[0]))
    assert (loaded.study_uid, loaded.series_uid, loaded.frame_of_reference_uid) == (
        first.StudyInstanceUID, first.SeriesInstanceUID, first.FrameOfReferenceUID,
    )
    assert loaded.header.StudyInstanceUID == first.StudyInstanceUID and "PixelData" not in loaded.header
    assert loaded.volume_fields()["spacing"] == loaded.spacing
    _assert_no_patient_data(repr(loaded))


def test_head_to_foot_series_comes_back_foot_to_head(tmp_path):
    """Slices sorted along the normal (row x column cosines, +z here): the same voxels at the same places."""
    hu = _volume()
    head_to_foot = np.array([[0, 0, -1.0], [0, 1, 0], [1, 0, 0]])
    paths = _write(tmp_path, hu, direction=head_to_foot)
    loaded = _load(tmp_path)
    last = np.asarray(ORIGIN) + (len(hu) - 1) * SPACING[0] * head_to_foot[0]
    _assert_geometry(loaded, hu[::-1], SPACING, last, AXIAL, _uids(paths)[::-1])

    def lps(origin, spacing, direction, k, j, i):
        return np.asarray(origin) + np.array([k, j, i]) * np.asarray(spacing) @ np.asarray(direction)

    for k, j, i in [(0, 0, 0), (19, 63, 63), (5, 10, 40)]:
        np.testing.assert_allclose(
            lps(ORIGIN, SPACING, head_to_foot, k, j, i),
            lps(loaded.origin, loaded.spacing, loaded.direction, 19 - k, j, i),
            atol=1e-5,
        )


def test_oblique_but_still_axial_series(tmp_path):
    def rotation(axis, degrees):
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        a, b = [n for n in range(3) if n != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        return r

    direction = (rotation(0, 12) @ rotation(2, 7) @ AXIAL.T).T
    hu = _volume()
    paths = _write(tmp_path, hu, direction=direction)
    infos = scan_series(tmp_path)
    assert infos[0].orientation == "axial"
    loaded = _load(tmp_path, orientation="axial")
    _assert_geometry(loaded, hu, SPACING, ORIGIN, direction, _uids(paths))


@pytest.mark.parametrize(
    "syntax",
    [
        pytest.param(JPEGLosslessSV1, marks=pytest.mark.dcmtk, id="jpeg-lossless-sv1"),
        pytest.param(JPEG2000Lossless, id="j2k-lossless"),
        pytest.param(RLELossless, id="rle"),
    ],
)
def test_compressed_series_load_losslessly(tmp_path, syntax):
    hu = _volume((12, 64, 64), lo=-2000, hi=3000)  # signed stored values
    paths = _write(tmp_path, hu, transfer_syntax=syntax)
    loaded = _load(tmp_path)
    _assert_geometry(loaded, hu, SPACING, ORIGIN, AXIAL, _uids(paths))


def test_uncompressed_data_never_goes_through_the_generic_decoder(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the uncompressed fast path was not taken")

    monkeypatch.setattr(series_mod, "_decode", forbidden)
    # 12 bits unsigned; 16 bits signed; 16 bits unsigned with stored values above 32767
    for name, lo, hi in (("unsigned", -1024, 2000), ("signed", -3000, 2000), ("unsigned16", -1024, 32767)):
        hu = _volume((6, 32, 32), lo=lo, hi=hi)
        _write(tmp_path / name, hu)
        np.testing.assert_array_equal(_load(tmp_path / name).hu, hu)


@pytest.mark.dcmtk
def test_implicit_vr_and_mixed_transfer_syntaxes(tmp_path):
    hu = _volume((10, 32, 48))
    paths = _write(tmp_path / "series", hu, uid_seed=5)
    jpeg = _write(tmp_path / "jpeg", hu, uid_seed=5, transfer_syntax=JPEGLosslessSV1)
    for k in range(0, 10, 3):  # every third slice from the JPEG copy (same UIDs and positions)
        jpeg[k].replace(paths[k])

    def implicit(ds, k):
        if ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and k % 3 == 1:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    _edit(paths, implicit)
    syntaxes = [pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in paths]
    assert syntaxes[:3] == [JPEGLosslessSV1, ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    assert pydicom.dcmread(paths[1]).is_implicit_VR
    np.testing.assert_array_equal(_load(tmp_path / "series").hu, hu)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    hu = _volume((6, 16, 16), hi=3071)
    paths = _write(tmp_path, hu)
    stored = hu.astype(np.int64) + 1024

    def rescale(ds, k):
        ds.RescaleSlope, ds.RescaleIntercept = ("2", "-1000") if k != 5 else ("0.5", "-10.25")

    _edit(paths, rescale)
    expected = stored * 2 - 1000
    expected[5] = np.rint(stored[5] * 0.5 - 10.25)
    np.testing.assert_array_equal(_load(tmp_path).hu, expected)

    _edit(paths, lambda ds, k: (setattr(ds, "RescaleSlope", "20"), setattr(ds, "RescaleIntercept", "-1024")))
    np.testing.assert_array_equal(_load(tmp_path).hu, np.clip(stored * 20 - 1024, -32768, 32767))


def test_bits_above_bits_stored_are_ignored(tmp_path):
    hu = _volume((4, 16, 16), hi=3071)
    paths = _write(tmp_path, hu)  # 12 bits stored, unsigned

    def overlay_bits(ds, k):
        ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") | 0xF000).astype("<u2").tobytes()

    _edit(paths, overlay_bits)
    np.testing.assert_array_equal(_load(tmp_path).hu, hu)


def test_spacing_rounded_to_a_hundredth_is_accepted(tmp_path):
    paths = _write(tmp_path)
    jitter = np.random.default_rng(1).uniform(-0.01, 0.01, len(paths))

    def wobble(ds, k):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z + jitter[k], 2)]

    _edit(paths, wobble)
    loaded = _load(tmp_path)
    assert loaded.spacing[0] == pytest.approx(SPACING[0], abs=0.002)


@pytest.mark.dcmtk
def test_a_larger_series_round_trips(tmp_path):
    hu = _volume((60, 256, 256), lo=-1024, hi=3071)
    paths = _write(tmp_path, hu, spacing=(0.625, 0.68, 0.68), transfer_syntax=JPEGLosslessSV1)
    loaded = _load(tmp_path, min_slices=40)
    _assert_geometry(loaded, hu, (0.625, 0.68, 0.68), ORIGIN, AXIAL, _uids(paths))


def test_files_changed_after_the_scan_are_read_again(tmp_path):
    hu = _volume((5, 16, 16), hi=3071)
    paths = _write(tmp_path, hu)
    info = scan_series(tmp_path)[0]
    assert set(info.headers) == set(paths)

    def change(ds, k):
        if k == 2:
            ds.RescaleIntercept = "-1000"
            ds.ImageComments = "rewritten after the scan"  # a different size, so not mistaken for the scanned file

    _edit(paths, change)
    loaded = load_series(info)
    np.testing.assert_array_equal(loaded.hu[2], hu[2].astype(np.int32) + 24)
    np.testing.assert_array_equal(loaded.hu[[0, 1, 3, 4]], hu[[0, 1, 3, 4]])


# --- rejections -----------------------------------------------------------------------------


def _reject(folder: Path, pattern: str) -> str:
    infos = scan_series(folder)
    assert len(infos) == 1
    with pytest.raises(SeriesError, match=pattern) as caught:
        load_series(infos[0])
    assert isinstance(caught.value, DicomNodeError)
    assert caught.value.reason == str(caught.value)
    _assert_no_patient_data(str(caught.value))
    return str(caught.value)


def test_mixed_image_sizes(tmp_path):
    paths = _write(tmp_path, uid_seed=1)
    series_uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    _write(tmp_path / "more", _volume((2, 32, 32)), origin=(0, 0, 200), series_uid=series_uid)
    assert _reject(tmp_path, "mixed image sizes") == "mixed image sizes: 64x64 (20 instances), 32x32 (2 instances)"


def test_mixed_orientation(tmp_path):
    paths = _write(tmp_path)
    _edit(paths[3:4], lambda ds, k: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    message = _reject(tmp_path, "mixed orientations")
    assert message == (
        "mixed orientations: axial [1, 0, 0, 0, 1, 0] (19 instances), coronal [1, 0, 0, 0, 0, -1] (1 instance)"
    )


def test_mixed_pixel_spacing(tmp_path):
    paths = _write(tmp_path)
    _edit(paths[:2], lambda ds, k: setattr(ds, "PixelSpacing", [0.9, 0.9]))
    message = _reject(tmp_path, "mixed pixel spacing")
    assert message == "mixed pixel spacing: 0.7x0.8 mm (18 instances), 0.9x0.9 mm (2 instances)"


def test_duplicate_positions(tmp_path):
    paths = _write(tmp_path)
    copy = tmp_path / "copy.dcm"
    ds = pydicom.dcmread(paths[4])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(copy, enforce_file_format=True)
    assert _reject(tmp_path, "duplicate") == "duplicate positions: slices 5 and 6 of 21 are at the same place"


def test_gap(tmp_path):
    paths = _write(tmp_path)
    for path in paths[10:13]:
        path.unlink()
    assert _reject(tmp_path, "gap") == "gap of 5.00 mm between slices 10 and 11, median spacing 1.25 mm"


def test_uneven_spacing_beyond_tolerance(tmp_path):
    paths = _write(tmp_path)

    def shift(ds, k):
        if k >= 10:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + 0.4]

    _edit(paths, shift)
    assert _reject(tmp_path, "uneven") == (
        "uneven slice spacing: 1.650 mm between slices 10 and 11, median spacing 1.250 mm, tolerance 0.050 mm"
    )


@pytest.mark.parametrize(
    "keyword, name",
    [
        ("ImagePositionPatient", r"Image Position \(Patient\) \(0020,0032\)"),
        ("ImageOrientationPatient", r"Image Orientation \(Patient\) \(0020,0037\)"),
        ("PixelSpacing", r"Pixel Spacing \(0028,0030\)"),
    ],
)
def test_missing_geometry(tmp_path, keyword, name):
    paths = _write(tmp_path)
    _edit(paths[7:9], lambda ds, k: delattr(ds, keyword))
    _reject(tmp_path, f"^{name} is missing or malformed in 2 of 20 instances \\(e.g. Instance Number 8\\)$")


def test_multi_frame_is_unsupported(tmp_path):
    paths = _write(tmp_path)
    _edit(paths[:1], lambda ds, k: setattr(ds, "NumberOfFrames", 3))
    _reject(tmp_path, r"^multi-frame instances \(1 of 20, up to 3 frames\) are unsupported")


def test_colour_is_unsupported(tmp_path):
    paths = _write(tmp_path)

    def rgb(ds, k):
        ds.PhotometricInterpretation, ds.SamplesPerPixel = "RGB", 3

    _edit(paths[2:3], rgb)
    _reject(tmp_path, r"^photometric interpretation RGB: only grayscale")


def test_tilted_stack_is_unsupported(tmp_path):
    tilt = np.radians(15)
    direction = np.array([[0, -np.sin(tilt), np.cos(tilt)], [0, 1, 0], [1, 0, 0]])
    _write(tmp_path, direction=direction)
    _reject(tmp_path, r"stacked 15.0 degrees off their normal \(gantry tilt")


def test_one_slice_shifted_in_plane(tmp_path):
    paths = _write(tmp_path)

    def shift(ds, k):
        if k == 6:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x + 3, y, z]

    _edit(paths, shift)
    _reject(tmp_path, r"^slice 7 of 20 is shifted 3.00 mm in-plane")


def test_single_slice(tmp_path):
    _write(tmp_path, _volume((1, 16, 16)))
    _reject(tmp_path, "^only 1 slice: a volume needs at least 2")


@pytest.mark.dcmtk
def test_missing_decoder_is_named(tmp_path, monkeypatch):
    _write(tmp_path, _volume((3, 16, 16)), transfer_syntax=JPEGLosslessSV1)
    decoder = get_decoder(JPEGLosslessSV1)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    message = _reject(tmp_path, r"JPEG Lossless, Non-Hierarchical, First-Order Prediction .*cannot be decoded here")
    assert message.endswith("install one of: pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1")


# --- scanning and selecting -----------------------------------------------------------------


@pytest.fixture
def study(tmp_path) -> Path:
    """One study, six series: what a chest CT study from the field looks like, plus an MR."""
    root = tmp_path / "study"
    common = dict(study_uid="1.2.826.0.1.3680043.8.498.1", frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2")
    # 1: localizer, 1 coronal slice
    scout = _write(root / "1", _volume((1, 64, 64)), direction=CORONAL, series_number=1, series_description="Scout",
                   **common)
    _edit(scout, lambda ds, k: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    # 2: thick axial chest, 20 slices of 5 mm
    _write(root / "2", _volume((20, 32, 32)), spacing=(5, 1, 1), series_number=2, series_description="Chest 5mm",
           **common)
    # 3: thin axial chest, 40 slices of 1.25 mm: the one to pick
    _write(root / "3", _volume((40, 32, 32)), spacing=(1.25, 1, 1), series_number=3,
           series_description="Chest lung 1.25mm", **common)
    # 4: sagittal reformat, 40 slices
    _write(root / "4", _volume((40, 32, 32)), direction=SAGITTAL, series_number=4, series_description="Chest sag",
           **common)
    # 5: an MR series
    mr = _write(root / "5", _volume((40, 32, 32)), series_number=5, series_description="T1 chest", **common)

    def as_mr(ds, k):
        ds.Modality, ds.SOPClassUID = "MR", MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage

    _edit(mr, as_mr)
    # 6: an abdomen series with more slices
    _write(root / "6", _volume((50, 32, 32)), series_number=6, series_description="Abdomen", body_part="ABDOMEN",
           **common)
    (root / "notes.txt").write_text("not DICOM")
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    return root


def test_scan_groups_by_series_reading_headers_only(study):
    infos = scan_series(study)
    assert [i.series_number for i in infos] == [1, 2, 3, 4, 5, 6]
    assert [i.instance_count for i in infos] == [1, 20, 40, 40, 40, 50]
    assert [i.orientation for i in infos] == ["coronal", "axial", "axial", "sagittal", "axial", "axial"]
    assert [i.modality for i in infos] == ["CT", "CT", "CT", "CT", "MR", "CT"]
    assert [i.body_part for i in infos] == ["CHEST"] * 5 + ["ABDOMEN"]
    assert infos[2].description == "Chest lung 1.25mm"
    assert infos[2].slice_thickness == 1.25 and infos[1].slice_thickness == 5
    assert all(i.frame_of_reference_uid == "1.2.826.0.1.3680043.8.498.2" for i in infos)
    assert all(i.study_uid == "1.2.826.0.1.3680043.8.498.1" for i in infos)
    assert "LOCALIZER" in infos[0].image_type
    assert sorted(infos[2].paths) == sorted((study / "3").glob("*.dcm"))
    assert infos[2].normal == pytest.approx((0, 0, 1))


def test_select_picks_the_thin_chest_series_and_says_why_not_the_others(study):
    selector = SeriesSelector(
        modality="CT", body_part=["Chest", "THORAX"], min_slices=30, description_pattern=r"chest|thorax"
    )
    chosen, reasons = select_series(scan_series(study), selector)
    assert chosen is not None and chosen.series_number == 3
    assert reasons == [
        (
            "series 1 of 6 (Series Number 1): a localizer (Image Type LOCALIZER); only 1 slice, want at least 30; "
            "orientation is coronal (90 degrees from axial); series description does not match 'chest|thorax'"
        ),
        "series 2 of 6 (Series Number 2): only 20 slices, want at least 30",
        "series 3 of 6 (Series Number 3): selected: 40 slices, 1.25 mm slices",
        "series 4 of 6 (Series Number 4): orientation is sagittal (90 degrees from axial)",
        "series 5 of 6 (Series Number 5): modality MR, want CT",
        (
            "series 6 of 6 (Series Number 6): body part ABDOMEN, want CHEST or THORAX; "
            "series description does not match 'chest|thorax'"
        ),
    ]
    for line in reasons:
        _assert_no_patient_data(line)
    assert load_series(chosen).hu.shape == (40, 32, 32)


def test_most_slices_win_then_thinnest(study):
    selector = SeriesSelector(body_part=None, min_slices=1, description_pattern="chest")
    chosen, reasons = select_series(scan_series(study), selector)
    assert chosen.series_number == 3
    assert reasons[1] == "series 2 of 6 (Series Number 2): matches, but series 3 has more or thinner slices"
    chosen, _ = select_series(scan_series(study), SeriesSelector(body_part=None, orientation=None))
    assert chosen.series_number == 6  # 50 slices
    infos = scan_series(study)
    same = [infos[3], infos[2]]  # 40 slices and 1.25 mm each: the lower Series Number wins
    assert select_series(same, SeriesSelector(orientation=None))[0].series_number == 3


def test_equal_slice_counts_prefer_thinner_slices(tmp_path):
    _write(tmp_path / "a", _volume((30, 16, 16)), study_uid="1.2.3", series_number=1, slice_thickness=2.0)
    _write(tmp_path / "b", _volume((30, 16, 16)), study_uid="1.2.3", series_number=2, slice_thickness=1.0)
    chosen, reasons = select_series(scan_series(tmp_path), SeriesSelector())
    assert chosen.series_number == 2 and chosen.slice_thickness == 1.0
    assert reasons[0] == "series 1 of 2 (Series Number 1): matches, but series 2 has more or thinner slices"


def test_missing_body_part_is_accepted_with_a_note(tmp_path):
    _write(tmp_path, _volume((5, 16, 16)), body_part=None)
    chosen, reasons = select_series(scan_series(tmp_path), SeriesSelector(body_part=["CHEST"]))
    assert chosen is not None
    assert reasons == [
        "series 1 of 1 (Series Number 1): selected: 5 slices, 1.25 mm slices; Body Part Examined missing: accepted"
    ]


def test_nothing_matches(study):
    chosen, reasons = select_series(scan_series(study), SeriesSelector(modality="PT"))
    assert chosen is None
    assert len(reasons) == 6 and all("modality" in r and "want PT" in r for r in reasons)
    assert select_series([], SeriesSelector()) == (None, [])


def test_mixed_orientation_and_multi_frame_are_reasons_too(tmp_path):
    paths = _write(tmp_path / "a", _volume((4, 16, 16)), study_uid="1.2.3")
    _edit(paths[:1], lambda ds, k: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))
    frames = _write(tmp_path / "b", _volume((4, 16, 16)), series_number=2, study_uid="1.2.3")
    _edit(frames, lambda ds, k: setattr(ds, "NumberOfFrames", 4))
    _, reasons = select_series(scan_series(tmp_path), SeriesSelector())
    assert reasons == [
        "series 1 of 2 (Series Number 1): orientation is mixed: its instances lie in different planes",
        "series 2 of 2 (Series Number 2): multi-frame instances (4 frames): unsupported",
    ]


def test_sop_classes_other_than_slices_are_reasons(tmp_path):
    paths = _write(tmp_path, _volume((4, 16, 16)))
    _edit(paths, lambda ds, k: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"))
    _, reasons = select_series(scan_series(tmp_path), SeriesSelector())
    assert reasons == [
        "series 1 of 1 (Series Number 1): SOP class Secondary Capture Image Storage: not a slice of a volume"
    ]


def test_scan_of_a_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        scan_series(tmp_path / "absent")
    assert scan_series(tmp_path) == []


def test_selector_validates_itself():
    with pytest.raises(ValueError, match="orientation must be one of"):
        SeriesSelector(orientation="transverse")
    assert SeriesSelector(body_part="chest").body_part == ("chest",)
