"""dicom_node.key_images: Secondary Capture key images and the Key Object Selection over them.

The source is a small synthetic CT (24 slices of 96x96, 2 x 0.8 x 0.8 mm) with
one bright ball, the "nodule", off the image centre in both directions so a
transposed or mirrored outline cannot land on it by chance.
"""

from __future__ import annotations

import datetime
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicom_node.ct_writer import write_ct_series
from dicom_node.key_images import OUTLINE_RGB, build_key_images, build_kos
from dicom_node.series import load_series, scan_series
from inference.findings import Finding

MODEL, VERSION = "lung-nodule-ct", "1.0.0"
WHEN = datetime.datetime(2024, 2, 1, 10, 0, 0)
SHAPE = (24, 96, 96)
SPACING = (2.0, 0.8, 0.8)
CENTRE = (12, 40, 56)  # k, j, i
RADIUS_MM = 4.0


def ball(shape=SHAPE, centre=CENTRE, radius_mm=RADIUS_MM, spacing=SPACING) -> np.ndarray:
    kk, jj, ii = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (
        ((kk - centre[0]) * spacing[0]) ** 2
        + ((jj - centre[1]) * spacing[1]) ** 2
        + ((ii - centre[2]) * spacing[2]) ** 2
    ) <= radius_mm**2


def finding_of(mask: np.ndarray, *, probability=0.97, type="solid", diameter_mm=8.0, pad=2) -> Finding:
    """A Finding whose mask is ``mask``'s bounding box (plus ``pad``), as postprocessing hands it over."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, mask.shape)
    centre = idx.mean(axis=0)
    return Finding(
        model=MODEL,
        model_version=VERSION,
        label="nodule",
        center_lps_mm=(0.0, 0.0, 0.0),
        diameter_mm=diameter_mm,
        volume_mm3=float(mask.sum() * np.prod(SPACING)),
        type=type,
        probability=probability,
        center_index=tuple(float(c) for c in centre),
        slice_index=round(float(centre[0])),
        mask=mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].copy(),
        mask_offset=tuple(int(v) for v in lo),
    )


@pytest.fixture(scope="module")
def nodule_ct(tmp_path_factory):
    """(LoadedSeries, ball mask) of the one-nodule phantom."""
    mask = ball()
    hu = np.full(SHAPE, -850, dtype=np.int16)
    hu[mask] = 40
    folder = tmp_path_factory.mktemp("ct")
    write_ct_series(folder, hu, SPACING, (-38.4, -38.4, -24.0), uid_seed="key-images")
    return load_series(scan_series(folder)[0]), mask


def dciodvfy(ds: pydicom.Dataset, path: Path) -> str:
    """dciodvfy's output for ``ds`` written to ``path``; fails the test on any line starting with "Error"."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy is not installed (Debian package dicom3tools)")
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False, timeout=60)
    output = (result.stdout + result.stderr).strip()
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert not errors, output
    return output


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_key_image_is_a_valid_secondary_capture_of_the_source_slice(nodule_ct, tmp_path):
    source, mask = nodule_ct
    (sc,) = build_key_images(source, [finding_of(mask)], model_name=MODEL, model_version=VERSION, content_datetime=WHEN)
    output = dciodvfy(sc, tmp_path / "sc.dcm")
    assert output.splitlines()[0] == "SCImage"
    assert "Warning" not in output, output

    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.BurnedInAnnotation == "YES"
    assert sc.BodyPartExamined == "CHEST" == source.body_part
    assert "Laterality" not in sc
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert "PixelSpacing" not in sc and "ImagePositionPatient" not in sc
    header = source.header
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyID", "AccessionNumber"):
        assert str(sc[keyword].value) == str(header[keyword].value), keyword
    assert sc.SeriesInstanceUID != source.series_uid
    assert sc.SeriesDescription == f"pacs-ai {MODEL} {VERSION} key images - not for clinical use"
    assert sc.SeriesNumber == 9002 and sc.InstanceNumber == 1
    (ref,) = sc.SourceImageSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == source.source_images[CENTRE[0]]
    assert sc.PatientOrientation == ["L", "P"]
    assert sc.ContentDate == sc.InstanceCreationDate == sc.DateOfSecondaryCapture == "20240201"


def test_outline_surrounds_the_nodule_in_the_rendered_png(nodule_ct, tmp_path):
    source, mask = nodule_ct
    (sc,) = build_key_images(source, [finding_of(mask)], model_name=MODEL, model_version=VERSION)
    png = tmp_path / "key.png"
    Image.fromarray(sc.pixel_array).save(png)
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)

    width = rgb.shape[1]
    scale = width / SHAPE[2]  # square source pixels scaled up to 512
    assert width == 512
    slice_h = round(SHAPE[1] * scale)
    assert rgb.shape[0] > slice_h, "the legend band lies below the slice"

    outline = np.all(rgb == OUTLINE_RGB, axis=2)
    rows, cols = np.nonzero(outline)
    assert len(rows) > 100
    assert rows.max() < slice_h, "no outline in the legend band"
    # Pixel centres: output x = (i + 0.5) * scale - 0.5.
    cy, cx = (CENTRE[1] + 0.5) * scale - 0.5, (CENTRE[2] + 0.5) * scale - 0.5
    distance = np.hypot(rows - cy, cols - cx)
    radius_px = RADIUS_MM / SPACING[1] * scale
    assert abs(rows.mean() - cy) < 2 and abs(cols.mean() - cx) < 2, "outline centred on the nodule"
    assert distance.min() > radius_px * 0.8, "outline drawn round the nodule, not over it"
    assert distance.max() < radius_px * 1.3 + 5, "outline hugs the nodule"
    # Round it: on all four sides of the centre.
    assert (cols[np.abs(rows - cy) < 3] < cx).any() and (cols[np.abs(rows - cy) < 3] > cx).any()
    assert (rows[np.abs(cols - cx) < 3] < cy).any() and (rows[np.abs(cols - cx) < 3] > cy).any()

    # Inside the ring, the nodule's pixels are grey and bright (40 HU in a lung window).
    centre_px = rgb[round(cy), round(cx)]
    assert centre_px[0] == centre_px[1] == centre_px[2] > 200
    # The legend: text pixels on a black band; the band is the only part with white.
    band = rgb[slice_h:]
    assert (band.max(axis=2) > 128).sum() > 200
    assert (band[:, :, 0] == 0).mean() > 0.5
    assert sc.ImageComments == "Nodule, solid, 8.0 mm, p=0.97 - AI - not for diagnosis"


def test_most_probable_first_and_at_most_max_images(nodule_ct):
    source, mask = nodule_ct
    findings = [finding_of(mask, probability=p) for p in (0.6, 0.9, 0.75)]
    images = build_key_images(source, findings, model_name=MODEL, model_version=VERSION, max_images=2)
    assert [sc.InstanceNumber for sc in images] == [1, 2]
    assert ["p=0.90" in images[0].ImageComments, "p=0.75" in images[1].ImageComments] == [True, True]
    assert len({sc.SOPInstanceUID for sc in images}) == 2
    assert len({sc.SeriesInstanceUID for sc in images}) == 1
    assert len(build_key_images(source, findings, model_name=MODEL, model_version=VERSION)) == 3
    assert build_key_images(source, findings, model_name=MODEL, model_version=VERSION, max_images=0) == []
    assert build_key_images(source, [], model_name=MODEL, model_version=VERSION) == []


def test_a_finding_without_a_mask_gets_a_circle_of_its_diameter(nodule_ct):
    source, mask = nodule_ct
    finding = finding_of(mask)
    finding.mask = None
    (sc,) = build_key_images(source, [finding], model_name=MODEL, model_version=VERSION)
    outline = np.all(sc.pixel_array == OUTLINE_RGB, axis=2)
    rows, cols = np.nonzero(outline)
    scale = 512 / SHAPE[2]
    assert abs(rows.mean() - (CENTRE[1] + 0.5) * scale) < 3 and abs(cols.mean() - (CENTRE[2] + 0.5) * scale) < 3


def test_rebuilds_are_byte_identical(nodule_ct):
    source, mask = nodule_ct
    findings = [finding_of(mask, probability=p) for p in (0.9, 0.8)]
    a = build_key_images(source, findings, model_name=MODEL, model_version=VERSION, content_datetime=WHEN)
    b = build_key_images(source, findings, model_name=MODEL, model_version=VERSION, content_datetime=WHEN)
    assert [encoded(x) for x in a] == [encoded(x) for x in b]
    ka = build_kos(source, a, model_name=MODEL, model_version=VERSION, content_datetime=WHEN)
    kb = build_kos(source, b, model_name=MODEL, model_version=VERSION, content_datetime=WHEN)
    assert encoded(ka) == encoded(kb)
    other = build_key_images(source, findings, model_name=MODEL, model_version="1.0.1", content_datetime=WHEN)
    assert {x.SOPInstanceUID for x in a}.isdisjoint(x.SOPInstanceUID for x in other)


def test_source_without_body_part_still_passes_dciodvfy(tmp_path):
    """Without Body Part Examined dciodvfy demands Laterality on an SC: it gets an empty one."""
    hu = np.full((4, 64, 64), -850, dtype=np.int16)
    hu[2, 30:34, 30:34] = 40
    write_ct_series(tmp_path / "ct", hu, (1, 1, 1), uid_seed="no-body-part", body_part=None)
    source = load_series(scan_series(tmp_path / "ct")[0])
    finding = Finding(
        model=MODEL, model_version=VERSION, label="nodule", center_lps_mm=(0, 0, 0), diameter_mm=4.0,
        volume_mm3=16.0, type="solid", probability=0.8, slice_index=2,
        mask=np.ones((1, 4, 4), dtype=bool), mask_offset=(2, 30, 30),
    )
    (sc,) = build_key_images(source, [finding], model_name=MODEL, model_version=VERSION)
    assert "BodyPartExamined" not in sc and sc.Laterality == ""
    dciodvfy(sc, tmp_path / "sc.dcm")


def fake_sr(source) -> pydicom.Dataset:
    """What build_kos reads of an SR: its identity (the real one comes from dicom_node.sr)."""
    sr = pydicom.Dataset()
    sr.SOPClassUID = Comprehensive3DSRStorage
    sr.SOPInstanceUID = "2.25.1234"
    sr.SeriesInstanceUID = "2.25.5678"
    sr.StudyInstanceUID = source.study_uid
    return sr


def test_kos_lists_the_key_images_and_the_sr(nodule_ct, tmp_path):
    source, mask = nodule_ct
    images = build_key_images(
        source, [finding_of(mask, probability=p) for p in (0.9, 0.8)],
        model_name=MODEL, model_version=VERSION, content_datetime=WHEN,
    )
    sr = fake_sr(source)
    kos = build_kos(source, images, sr, model_name=MODEL, model_version=VERSION, content_datetime=WHEN)
    output = dciodvfy(kos, tmp_path / "kos.dcm")
    assert output.splitlines()[0] == "KeyObjectSelectionDocument"

    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")
    refs = [item for item in kos.ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")]
    assert [r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in refs] == [
        images[0].SOPInstanceUID, images[1].SOPInstanceUID, sr.SOPInstanceUID
    ]
    assert not any("ConceptNameCodeSequence" in r for r in refs), "TID 2010 references are unnamed"
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == {images[0].SOPInstanceUID, images[1].SOPInstanceUID, sr.SOPInstanceUID}
    assert kos.StudyInstanceUID == source.study_uid and kos.PatientID == source.header.PatientID
    assert kos.SeriesInstanceUID not in {images[0].SeriesInstanceUID, source.series_uid}

    dsrdump = shutil.which("dsrdump")
    if dsrdump:  # DCMTK's SR reader accepts it too
        result = subprocess.run(
            [dsrdump, str(tmp_path / "kos.dcm")], capture_output=True, text=True, check=False, timeout=60
        )
        assert result.returncode == 0 and "Of Interest" in result.stdout, result.stderr

    with pytest.raises(ValueError, match="at least one"):
        build_kos(source, [], model_name=MODEL, model_version=VERSION)
