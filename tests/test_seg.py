"""dicom_node.seg: the findings' masks as a BINARY DICOM Segmentation on the source geometry.

Also the timing target of the outputs issue: key images and SEG for a study
with 5 findings in under a second once the process is warm.
"""

from __future__ import annotations

import time

import highdicom as hd
import numpy as np
import pytest
from pydicom.uid import SegmentationStorage

from dicom_node.ct_writer import write_ct_series
from dicom_node.key_images import build_key_images, build_kos
from dicom_node.seg import build_seg, segment_references
from dicom_node.series import load_series, scan_series
from tests.test_key_images import (
    MODEL,
    SHAPE,
    SPACING,
    VERSION,
    WHEN,
    ball,
    dciodvfy,
    encoded,
    finding_of,
)

SOLID_CENTRE = (12, 40, 56)
GLASS_CENTRE = (6, 70, 25)


@pytest.fixture(scope="module")
def two_nodule_ct(tmp_path_factory):
    """(LoadedSeries, solid ball mask, ground-glass ball mask)."""
    solid = ball(centre=SOLID_CENTRE, radius_mm=4.0)
    glass = ball(centre=GLASS_CENTRE, radius_mm=3.0)
    hu = np.full(SHAPE, -850, dtype=np.int16)
    hu[solid] = 40
    hu[glass] = -500
    folder = tmp_path_factory.mktemp("ct")
    write_ct_series(folder, hu, SPACING, (-38.4, -38.4, -24.0), uid_seed="seg")
    return load_series(scan_series(folder)[0]), solid, glass


def build(source, findings, **kwargs):
    return build_seg(source, findings, model_name=MODEL, model_version=VERSION, content_datetime=WHEN, **kwargs)


def test_seg_passes_dciodvfy_and_describes_its_segments(two_nodule_ct, tmp_path):
    source, solid, glass = two_nodule_ct
    seg = build(source, [finding_of(glass, type="ground-glass", probability=0.7), finding_of(solid)])
    output = dciodvfy(seg, tmp_path / "seg.dcm")
    assert output.splitlines()[0] == "Segmentation"
    assert "Warning" not in output, output

    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.BodyPartExamined == "CHEST"
    assert seg.StudyInstanceUID == source.study_uid and seg.PatientID == source.header.PatientID
    assert seg.FrameOfReferenceUID == source.frame_of_reference_uid
    assert seg.SeriesNumber == 9003
    assert seg.SeriesDescription == f"pacs-ai {MODEL} {VERSION} segmentation - not for clinical use"
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.series_uid
    # One segment per class, solid first whatever the findings' order.
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Nodule, solid", "Nodule, ground-glass"]
    for number, segment in enumerate(seg.SegmentSequence, start=1):
        assert segment.SegmentNumber == number
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL, VERSION)


def test_seg_read_back_is_the_ball_on_the_right_source_slices(two_nodule_ct, tmp_path):
    source, solid, glass = two_nodule_ct
    seg = build(source, [finding_of(solid), finding_of(glass, type="ground-glass")])
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    back = hd.seg.segread(path)
    touched = sorted(set(np.flatnonzero(solid.any(axis=(1, 2)))) | set(np.flatnonzero(glass.any(axis=(1, 2)))))
    assert back.NumberOfFrames == solid.any(axis=(1, 2)).sum() + glass.any(axis=(1, 2)).sum()
    pixels = back.get_pixels_by_source_instance(
        [source.sop_instance_uids[k] for k in range(SHAPE[0])],
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    )
    assert pixels.shape == (SHAPE[0], SHAPE[1], SHAPE[2], 2)
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), solid)
    np.testing.assert_array_equal(pixels[..., 1].astype(bool), glass)
    # Each frame sits where its source slice is.
    for group in back.PerFrameFunctionalGroupsSequence:
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = source.sop_instance_uids.index(uid)
        assert k in touched
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, source.positions[k], atol=1e-3)


def test_segment_references_point_each_finding_at_its_segment_and_frames(two_nodule_ct):
    source, solid, glass = two_nodule_ct
    findings = [finding_of(glass, type="ground-glass"), finding_of(solid), finding_of(solid, diameter_mm=1)]
    findings[2].mask = None  # no mask: not in the SEG
    seg = build(source, findings)
    refs = segment_references(seg, source, findings)
    assert refs[2] is None
    assert [r.segment_number for r in refs[:2]] == [2, 1]
    assert [r.segment_label for r in refs[:2]] == ["Nodule, ground-glass", "Nodule, solid"]
    for ref, mask in zip(refs[:2], (glass, solid)):
        assert ref.sop_instance_uid == seg.SOPInstanceUID and ref.sop_class_uid == SegmentationStorage
        assert ref.source_series_uid == source.series_uid
        groups = [seg.PerFrameFunctionalGroupsSequence[n - 1] for n in ref.frame_numbers]
        assert {g.SegmentIdentificationSequence[0].ReferencedSegmentNumber for g in groups} == {ref.segment_number}
        slices = [
            source.sop_instance_uids.index(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for g in groups
        ]
        assert sorted(slices) == list(np.flatnonzero(mask.any(axis=(1, 2))))
        item = ref.referenced_segment()[0]
        assert item.ReferencedSOPSequence[0].ReferencedSegmentNumber == ref.segment_number


def test_single_segment_seg_reference_without_from_segmentation(two_nodule_ct):
    """highdicom's ReferencedSegment.from_segmentation() raises on a one-segment SEG; ours does not."""
    source, solid, _ = two_nodule_ct
    seg = build(source, [finding_of(solid)])
    assert len(seg.SegmentSequence) == 1
    (ref,) = segment_references(seg, source, [finding_of(solid)])
    content = ref.referenced_segment()
    assert content[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert content[1].UID == source.series_uid


def test_rebuild_is_byte_identical_and_nothing_to_segment_is_none(two_nodule_ct):
    source, solid, glass = two_nodule_ct
    findings = [finding_of(solid), finding_of(glass, type="ground-glass")]
    assert encoded(build(source, findings)) == encoded(build(source, findings))
    unmasked = finding_of(solid)
    unmasked.mask = None
    assert build(source, [unmasked]) is None
    assert build(source, []) is None


def test_mask_box_over_the_volume_edge_is_clipped(two_nodule_ct):
    source, solid, _ = two_nodule_ct
    finding = finding_of(solid)
    # The same region, in a box that starts 3 voxels before the volume in j.
    j0 = finding.mask_offset[1]
    finding.mask = np.pad(finding.mask, ((0, 0), (j0 + 3, 0), (0, 0)))
    finding.mask_offset = (finding.mask_offset[0], -3, finding.mask_offset[2])
    seg = build(source, [finding])
    pixels = seg.get_pixels_by_source_instance(
        list(source.sop_instance_uids), segment_numbers=[1], assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), solid)


@pytest.fixture(scope="module")
def chest_sized_ct(tmp_path_factory):
    """A 512x512 x 40 series with five nodules of 4-16 mm, and their findings."""
    shape, spacing = (40, 512, 512), (1.25, 0.7, 0.7)
    centres = [(10, 150, 160), (18, 300, 120), (25, 220, 380), (30, 380, 300), (15, 120, 330)]
    radii = [2.0, 3.5, 5.0, 6.5, 8.0]
    hu = np.full(shape, -850, dtype=np.int16)
    masks = []
    for centre, radius in zip(centres, radii):
        m = ball(shape, centre, radius, spacing)
        hu[m] = 30
        masks.append(m)
    folder = tmp_path_factory.mktemp("chest")
    write_ct_series(folder, hu, spacing, (-179.0, -179.0, -50.0), uid_seed="timing")
    source = load_series(scan_series(folder)[0])
    findings = [
        finding_of(m, probability=0.5 + 0.1 * n, diameter_mm=2 * r) for n, (m, r) in enumerate(zip(masks, radii))
    ]
    return source, findings


def test_five_findings_key_images_and_seg_within_a_second_when_warm(chest_sized_ct, capsys):
    source, findings = chest_sized_ct

    def outputs():
        images = build_key_images(source, findings, model_name=MODEL, model_version=VERSION, content_datetime=WHEN)
        seg = build_seg(source, findings, model_name=MODEL, model_version=VERSION, content_datetime=WHEN)
        kos = build_kos(source, images, model_name=MODEL, model_version=VERSION, content_datetime=WHEN)
        return images, seg, kos

    outputs()  # warm-up: the first study in a process
    started = time.perf_counter()
    images, seg, kos = outputs()
    elapsed = time.perf_counter() - started
    sizes = [len(encoded(x)) for x in (*images, seg, kos)]
    with capsys.disabled():
        print(
            f"\n5 key images + SEG + KOS on 512x512x40, warm: {elapsed * 1000:.0f} ms; "
            f"sizes: SC {sizes[0] / 1e3:.0f} kB each, SEG {sizes[5] / 1e3:.1f} kB ({seg.NumberOfFrames} frames), "
            f"KOS {sizes[6] / 1e3:.1f} kB"
        )
    assert len(images) == 5 and len(seg.SegmentSequence) == 1
    assert elapsed < 2.0, f"{elapsed:.2f} s (target: under 1 s)"


def test_uids_given_from_one_place_are_used(two_nodule_ct):
    """The worker may hand every builder the result's UIDs (dicom_node.uids.output_uids) instead."""
    source, solid, _ = two_nodule_ct
    uids = {
        "sc_series": "2.25.11", "sc_instance": lambda n: f"2.25.12{n}",
        "seg_series": "2.25.21", "seg_instance": "2.25.22", "kos_series": "2.25.31", "kos_instance": "2.25.32",
        "kos_device": "2.25.33", "seg_dimension_organization": "2.25.23",
    }
    kwargs = {"model_name": MODEL, "model_version": VERSION, "uids": uids}
    (sc,) = build_key_images(source, [finding_of(solid)], **kwargs)
    seg = build_seg(source, [finding_of(solid)], **kwargs)
    kos = build_kos(source, [sc], **kwargs)
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == ("2.25.11", "2.25.121")
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == ("2.25.21", "2.25.22")
    assert (kos.SeriesInstanceUID, kos.SOPInstanceUID) == ("2.25.31", "2.25.32")
