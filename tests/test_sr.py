"""dicom_node.sr: the TID 1500 Measurement Report of a study's findings.

No external validator checks TID 1500's template rules (FIELD-NOTES.md): dciodvfy checks
the IOD and DCMTK's dsrdump the SR encoding and relationship constraints, so the content
tree is asserted here, read back with highdicom and by walking the Content Sequence.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import shutil
import subprocess
import sys
import time
import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import sr as srmod
from dicom_node.sr import DeviceInfo, ModelInfo, SRError, build_sr, finding_polygon, output_uids

from . import report_fixtures as fx
from .factory import SENTINEL_BIRTH_DATE, SENTINEL_ID, SENTINEL_NAME

WHEN = dt.datetime(2024, 2, 1, 10, 30, 15)
MODEL = ModelInfo(fx.MODEL, fx.MODEL_VERSION)
DEVICE = DeviceInfo(software_version="0.9.0", station_name="PACSAI01")
ASSESSMENT = fx.Assessment("4A", "Suspicious", "3-month LDCT", nodule_index=2)
PREDECESSOR = (fx.STUDY_UID, "1.2.826.0.1.3680043.8.498.77", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.826.0.1.3680043.8.498.78")


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    fx.write_source(folder)
    return fx.load_source(folder)


@pytest.fixture(scope="module")
def findings(source):
    return fx.findings_for(source)


def _build(source, findings, **kwargs):
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("device", DEVICE)
    kwargs.setdefault("content_datetime", WHEN)
    return build_sr(source, findings, **kwargs)


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def full(source, findings):
    """5 findings, triage, Lung-RADS and a predecessor: (bytes, dataset read back)."""
    data = _bytes(_build(source, findings, triage=fx.triage(), assessment=ASSESSMENT, predecessor=PREDECESSOR))
    return data, pydicom.dcmread(io.BytesIO(data))


@pytest.fixture(scope="module")
def empty(source):
    data = _bytes(_build(source, [], triage=fx.triage(positive=False, probability=0.12)))
    return data, pydicom.dcmread(io.BytesIO(data))


@pytest.fixture
def as_file(tmp_path):
    def write(data: bytes, name="sr.dcm"):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write


# --- helpers to walk the tree -------------------------------------------------------------


def _code(item) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return (c.CodeValue, c.CodingSchemeDesignator)


def _key(code) -> tuple[str, str]:
    return (code.value, code.scheme_designator)


def _children(item, concept=None):
    found = list(item.get("ContentSequence", []))
    return [c for c in found if concept is None or _code(c) == _key(concept)]


def _one(item, concept):
    found = _children(item, concept)
    assert len(found) == 1, (concept, [_code(c) for c in _children(item)])
    return found[0]


def _coded_value(item) -> tuple[str, str]:
    c = item.ConceptCodeSequence[0]
    return (c.CodeValue, c.CodingSchemeDesignator)


def _num(item) -> tuple[float, tuple[str, str]]:
    mv = item.MeasuredValueSequence[0]
    unit = mv.MeasurementUnitsCodeSequence[0]
    return float(mv.NumericValue), (unit.CodeValue, unit.CodingSchemeDesignator)


def _groups(ds):
    measurements = _one(ds, codes.DCM.ImagingMeasurements)
    return _children(measurements, codes.DCM.MeasurementGroup)


def _group_by_tracking(ds, identifier):
    for group in _groups(ds):
        if _one(group, codes.DCM.TrackingIdentifier).TextValue == identifier:
            return group
    raise AssertionError(f"no group {identifier!r}")


def _assert_algorithm(group, name, version):
    assert _one(group, codes.DCM.AlgorithmName).TextValue == name
    assert _one(group, codes.DCM.AlgorithmName).RelationshipType == "HAS CONCEPT MOD"
    assert _one(group, codes.DCM.AlgorithmVersion).TextValue == version


def _dciodvfy(path) -> tuple[list[str], list[str], str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy is not installed (Debian package dicom3tools)")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    output = (result.stdout + result.stderr).strip()
    lines = output.splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")], output


# --- validators ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["full", "empty"])
def test_dciodvfy_reports_no_errors(request, as_file, which):
    data, _ = request.getfixturevalue(which)
    errors, warns, output = _dciodvfy(as_file(data))
    assert output.splitlines()[0] == "Comprehensive3DSR", output
    assert errors == [], output
    # The only thing it may say: it does not know our private coding scheme (declared in
    # the Coding Scheme Identification Sequence, which dciodvfy does not consult).
    assert all("<99PACSAI>" in w for w in warns), output


@pytest.mark.dcmtk
@pytest.mark.parametrize("which", ["full", "empty"])
def test_dsrdump_reads_it_without_complaint(request, as_file, which):
    tool = shutil.which("dsrdump")
    if tool is None:
        pytest.fail("DCMTK's dsrdump is not installed")
    data, _ = request.getfixturevalue(which)
    # Without -Ec/-Ee dsrdump enforces the Comprehensive 3D SR relationship constraints.
    result = subprocess.run([tool, "-v", str(as_file(data))], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith(("E:", "W:", "F:"))], result.stderr
    assert "Imaging Measurement Report" in result.stdout
    assert "PARTIAL" in result.stdout and "UNVERIFIED" in result.stdout


# --- header -------------------------------------------------------------------------------


def test_same_patient_and_study_new_series_partial_unverified(full, source):
    _, ds = full
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    assert ds.Modality == "SR"
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate) == (SENTINEL_NAME, SENTINEL_ID, SENTINEL_BIRTH_DATE)
    assert ds.StudyInstanceUID == source.study_uid == fx.STUDY_UID
    assert ds.AccessionNumber == "ACC0001"
    assert ds.SeriesInstanceUID != source.series_uid
    assert ds.SeriesDescription == "pacs-ai lung-nodule-ct 1.0.0 - not for clinical use"
    assert (ds.SeriesNumber, ds.InstanceNumber) == (9001, 1)
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions) == ("pacs-ai", "pacs-ai", "0.9.0")
    assert ds.StationName == "PACSAI01"
    assert (ds.ContentDate, ds.ContentTime) == ("20240201", "103015")
    assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == ("20240201", "103015")
    assert (ds.SeriesDate, ds.SeriesTime) == ("20240201", "103015")
    schemes = {item.CodingSchemeDesignator: item for item in ds.CodingSchemeIdentificationSequence}
    assert schemes["99PACSAI"].CodingSchemeName == "pacs-ai private concepts"


def test_predecessor_document_is_referenced(full):
    _, ds = full
    (study,) = ds.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == PREDECESSOR[0]
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == PREDECESSOR[1]
    (instance,) = series.ReferencedSOPSequence
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == PREDECESSOR[2:]


def test_no_predecessor_no_sequence(empty):
    assert "PredecessorDocumentsSequence" not in empty[1]


def test_a_document_cannot_supersede_itself(source, findings):
    uids = output_uids(source.study_uid, source.sop_instance_uids, MODEL.name, MODEL.version)
    itself = (source.study_uid, uids["sr_series"], "1.2.840.10008.5.1.4.1.1.88.34", uids["sr_instance"])
    with pytest.raises(SRError, match="itself"):
        _build(source, findings[:1], predecessor=itself)


def test_evidence_is_only_the_referenced_slices(full, source, findings):
    _, ds = full
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source.study_uid
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.series_uid
    listed = {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence}
    assert listed == {source.source_images[f.slice_index] for f in findings}
    assert len(listed) < len(source.sop_instance_uids)


def test_without_findings_the_whole_series_is_evidence(empty, source):
    _, ds = empty
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    listed = [i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence]
    assert sorted(listed) == sorted(source.sop_instance_uids)


def test_extra_references_join_the_evidence(source, findings):
    key_image = (source.study_uid, "1.2.826.0.1.3680043.8.498.91", "1.2.840.10008.5.1.4.1.1.7", "1.2.826.0.1.3680043.8.498.92")
    ds = _build(source, findings[:1], extra_references=[key_image])
    series = {s.SeriesInstanceUID: s for s in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
    assert series[key_image[1]].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key_image[3]


# --- content tree -------------------------------------------------------------------------


def test_report_level_rows(full):
    _, ds = full
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert _code(ds) == ("126000", "DCM")  # Imaging Measurement Report
    language = _one(ds, codes.DCM.LanguageOfContentItemAndDescendants)
    assert language.RelationshipType == "HAS CONCEPT MOD" and _coded_value(language) == ("en-US", "RFC5646")
    observer_type = _one(ds, codes.DCM.ObserverType)
    assert observer_type.RelationshipType == "HAS OBS CONTEXT" and _coded_value(observer_type) == ("121007", "DCM")
    assert _one(ds, codes.DCM.DeviceObserverUID).UID == DEVICE.observer_uid
    assert _one(ds, codes.DCM.DeviceObserverName).TextValue == "PACSAI01"
    assert _one(ds, codes.DCM.DeviceObserverManufacturer).TextValue == "pacs-ai"
    assert _one(ds, codes.DCM.DeviceObserverModelName).TextValue == "pacs-ai"
    procedure = _one(ds, codes.DCM.ProcedureReported)
    assert procedure.RelationshipType == "HAS CONCEPT MOD" and _coded_value(procedure) == ("24627-2", "LN")
    assert _one(ds, codes.DCM.ImagingMeasurements).RelationshipType == "CONTAINS"


def test_image_library_lists_the_referenced_slices_with_their_geometry(full, source, findings):
    _, ds = full
    library = _one(ds, codes.DCM.ImageLibrary)
    (group,) = _children(library, codes.DCM.ImageLibraryGroup)
    entries = [c for c in group.ContentSequence if c.ValueType == "IMAGE"]
    by_uid = {e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: e for e in entries}
    referenced = sorted({f.slice_index for f in findings})
    assert set(by_uid) == {source.sop_instance_uids[k] for k in referenced}
    for k in referenced:
        entry = by_uid[source.sop_instance_uids[k]]
        z = _one(entry, codes.DCM.ImagePositionPatientZ)
        assert _num(z)[0] == pytest.approx(source.positions[k][2])


def test_study_level_group_says_nodules_present_and_lung_rads(full):
    _, ds = full
    group = _group_by_tracking(ds, "Study-level nodule assessment")
    assert group.ContentTemplateSequence[0].TemplateIdentifier == "1501"
    _assert_algorithm(group, MODEL.name, MODEL.version)
    parameters = [item.TextValue for item in _children(group, codes.DCM.AlgorithmParameters)]
    assert parameters == ["Lung-RADS v2022 baseline screening rules", "category 4A: Suspicious"]
    presence = _one(group, srmod.NODULE)
    assert presence.RelationshipType == "CONTAINS" and _coded_value(presence) == ("52101004", "SCT")
    category = _one(group, srmod.LUNG_RADS_CATEGORY)
    assert _coded_value(category) == ("LRADS-4A", "99PACSAI")
    assert category.ConceptCodeSequence[0].CodeMeaning == "Lung-RADS v2022 category 4A"
    follow_up = _one(group, codes.DCM.RecommendedFollowUp)
    assert _coded_value(follow_up) == ("LRADS-MGMT-3M", "99PACSAI")
    assert follow_up.ConceptCodeSequence[0].CodeMeaning.startswith("3-month LDCT")


def test_triage_group_carries_its_own_model(full, empty):
    for ds, result, probability in ((full[1], "TRIAGE-POSITIVE", 82.0), (empty[1], "TRIAGE-NEGATIVE", 12.0)):
        group = _group_by_tracking(ds, "Study-level triage")
        _assert_algorithm(group, "lung-triage-ct", "1.0.0")
        assert _coded_value(_one(group, srmod.TRIAGE_RESULT)) == (result, "99PACSAI")
        assert _num(_one(group, srmod.TRIAGE_PROBABILITY)) == (probability, ("%", "UCUM"))


def test_no_findings_is_said_explicitly(empty):
    _, ds = empty
    groups = _groups(ds)
    assert len(groups) == 2  # study level and triage; no ROI groups
    study = _group_by_tracking(ds, "Study-level nodule assessment")
    presence = _one(study, srmod.NODULE)
    assert _coded_value(presence) == ("272519000", "SCT")  # Absent
    assert presence.ConceptCodeSequence[0].CodeMeaning == "Absent"
    assert not _children(study, srmod.LUNG_RADS_CATEGORY)  # none was given


def test_one_group_per_finding_with_everything_in_it(full, source, findings):
    _, ds = full
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    planar = report.get_planar_roi_measurement_groups()
    assert len(planar) == len(findings)
    tracking_uids = set()
    for n, (finding, group_t) in enumerate(zip(findings, planar), start=1):
        group = group_t[0]
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1410"
        assert group_t.tracking_identifier == f"Nodule {n}"
        assert _one(group, codes.DCM.TrackingIdentifier).RelationshipType == "HAS OBS CONTEXT"
        tracking_uids.add(group_t.tracking_uid)
        _assert_algorithm(group, finding.model, finding.model_version)

        found = _one(group, codes.DCM.Finding)
        assert found.RelationshipType == "CONTAINS" and _coded_value(found) == ("27925004", "SCT")
        site = _one(group, codes.SCT.FindingSite)
        assert site.RelationshipType == "HAS CONCEPT MOD" and _coded_value(site) == ("39607008", "SCT")
        side = _one(site, codes.SCT.Laterality)
        assert _coded_value(side) == {"right": ("24028007", "SCT"), "left": ("7771000", "SCT")}[finding.laterality]

        slice_ref = source.source_images[finding.slice_index]

        def measurement(concept, unit, expected, tol, *, on_slice, group=group, slice_ref=slice_ref):
            item = _one(group, concept)
            assert item.RelationshipType == "CONTAINS"
            value, got_unit = _num(item)
            assert got_unit == unit
            assert value == pytest.approx(expected, abs=tol)
            sources = [c for c in _children(item) if c.ValueType == "IMAGE"]
            if on_slice:
                (ref,) = sources
                assert ref.RelationshipType == "INFERRED FROM"
                assert _code(ref) == ("121112", "DCM")  # Source of Measurement
                sop = ref.ReferencedSOPSequence[0]
                assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == slice_ref
            else:
                assert not sources
            return item

        measurement(srmod.LONG_AXIS, ("mm", "UCUM"), finding.diameter_mm, 0.005, on_slice=True)
        measurement(srmod.SHORT_AXIS, ("mm", "UCUM"), finding.short_axis_mm, 0.005, on_slice=True)
        mean = measurement(srmod.DIAMETER, ("mm", "UCUM"), finding.mean_diameter_mm, 0.005, on_slice=True)
        assert _coded_value(_one(mean, codes.DCM.Derivation)) == ("373098007", "SCT")
        measurement(srmod.VOLUME, ("mm3", "UCUM"), finding.volume_mm3, 0.05, on_slice=False)
        measurement(codes.DCM.CertaintyOfFinding, ("%", "UCUM"), 100 * finding.probability, 0.005, on_slice=False)
        solid = _children(group, srmod.SOLID_COMPONENT)
        if finding.type == "part-solid":
            assert _num(solid[0])[0] == pytest.approx(finding.solid_component_mm, abs=0.005)
        else:
            assert not solid
        nodule_type = _coded_value(_one(group, srmod.NODULE_TYPE))
        assert nodule_type == _key(srmod.NODULE_TYPES[finding.type])

        region = _one(group, codes.DCM.ImageRegion)
        assert region.ValueType == "SCOORD3D" and region.RelationshipType == "CONTAINS"
        assert region.GraphicType == "POLYGON"
        assert region.ReferencedFrameOfReferenceUID == source.frame_of_reference_uid
        points = np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 3)
        assert len(points) >= 4 and np.array_equal(points[0], points[-1])
        # On the plane of the slice it names, around the finding's centre.
        assert np.allclose(points[:, 2], source.positions[finding.slice_index][2], atol=1e-3)
        centre = np.asarray(finding.center_lps_mm)
        assert np.allclose(points[:-1, :2].mean(axis=0), centre[:2], atol=1.0)
        radius = np.linalg.norm(points[:, :2] - centre[:2], axis=1)
        assert radius.max() <= finding.diameter_mm / 2 + 1.5
    assert len(tracking_uids) == len(findings)


def test_algorithm_identification_on_every_group(full, empty):
    for _, ds in (full, empty):
        for group in _groups(ds):
            assert _children(group, codes.DCM.AlgorithmName) and _children(group, codes.DCM.AlgorithmVersion)


def test_codes_from_the_model_spec_replace_the_defaults(source, findings):
    class SpecCode:  # inference.spec.Code's shape
        def __init__(self, value, scheme, meaning):
            self.value, self.scheme, self.meaning = value, scheme, meaning

    model = ModelInfo(
        fx.MODEL,
        fx.MODEL_VERSION,
        codes={"finding": ("427359005", "SCT", "Solitary nodule of lung"), "long_axis": SpecCode("103339001", "SCT", "Long axis")},
    )
    ds = _build(source, findings[:1], model=model)
    group = _group_by_tracking(ds, "Nodule 1")
    assert _coded_value(_one(group, codes.DCM.Finding)) == ("427359005", "SCT")
    assert _children(group, Code("103339001", "SCT", "Long axis"))


def test_lobe_when_the_finding_knows_it(source, findings):
    finding = dataclasses.replace(findings[0])
    finding.lobe = "upper"  # not a Finding field (yet): read when present
    ds = _build(source, [finding])
    site = _one(_group_by_tracking(ds, "Nodule 1"), codes.SCT.FindingSite)
    assert _coded_value(site) == ("45653009", "SCT")
    assert _coded_value(_one(site, codes.SCT.Laterality)) == ("24028007", "SCT")


# --- polygons -----------------------------------------------------------------------------


def test_polygon_traces_the_mask_on_its_slice(source, findings):
    for finding in findings:
        points = finding_polygon(finding, source)
        assert points.shape[1] == 3 and len(points) >= 4
        assert np.array_equal(points[0], points[-1])
        plane = source.positions[finding.slice_index]
        assert np.allclose(points[:, 2], plane[2])
    # The largest ball (radius 5.5 mm, 0.8 mm pixels): the outline spans its diameter.
    big = findings[2]
    points = finding_polygon(big, source)
    extent = points[:, :2].max(axis=0) - points[:, :2].min(axis=0)
    assert np.all(np.abs(extent - big.diameter_mm) < 2 * 0.8)


def test_polygon_falls_back_to_a_diamond_around_the_centre(source, findings):
    without_mask = dataclasses.replace(findings[0], mask=None)
    one_pixel = dataclasses.replace(findings[0], mask=np.ones((1, 1, 1), dtype=bool), mask_offset=(findings[0].slice_index, 20, 16))
    for finding in (without_mask, one_pixel):
        points = finding_polygon(finding, source)
        assert len(points) == 5 and np.array_equal(points[0], points[-1])
        assert np.allclose(points[:, 2], source.positions[finding.slice_index][2])
        centre = np.asarray(finding.center_lps_mm)
        assert np.allclose(np.linalg.norm(points[:-1, :2] - centre[:2], axis=1), finding.diameter_mm / 2)


def test_a_finding_outside_the_series_is_refused(source, findings):
    bad = dataclasses.replace(findings[0], slice_index=len(source.positions))
    with pytest.raises(SRError, match="outside the 20 slices"):
        _build(source, [bad])


# --- idempotence --------------------------------------------------------------------------


def test_rebuilding_gives_the_same_bytes(full, source, findings):
    data, first = full
    again = _bytes(_build(source, findings, triage=fx.triage(), assessment=ASSESSMENT, predecessor=PREDECESSOR))
    assert again == data
    uids = output_uids(source.study_uid, reversed(source.sop_instance_uids), MODEL.name, MODEL.version)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (uids["sr_series"], uids["sr_instance"])


def test_uids_follow_the_input_set_and_the_model(source):
    sops = list(source.sop_instance_uids)
    base = output_uids(fx.STUDY_UID, sops, "m", "1.0.0")
    same = output_uids(fx.STUDY_UID, list(reversed(sops)) + sops[:3], "m", "1.0.0")
    assert {k: v for k, v in base.items() if isinstance(v, str)} == {k: v for k, v in same.items() if isinstance(v, str)}
    assert base["sc_instance"](3) == same["sc_instance"](3) != base["sc_instance"](4)
    changed = [
        output_uids(fx.STUDY_UID, sops[:-1] + ["1.2.3.4"], "m", "1.0.0"),
        output_uids(fx.STUDY_UID, sops[:-1], "m", "1.0.0"),
        output_uids(fx.STUDY_UID, sops, "m", "1.0.1"),
        output_uids(fx.STUDY_UID, sops, "n", "1.0.0"),
        output_uids("1.2.3", sops, "m", "1.0.0"),
    ]
    for other in changed:
        for key in ("sr_series", "sr_instance", "sc_series", "seg_series", "seg_instance", "kos_series", "kos_instance"):
            assert other[key] != base[key], key
    strings = [v for v in base.values() if isinstance(v, str)]
    assert len(set(strings)) == len(strings)
    assert all(u.startswith("2.25.") and len(u) <= 64 for u in strings)


def test_the_sr_uids_change_with_an_input_instance_or_the_model_version(full, source, findings):
    _, first = full
    renamed = dataclasses.replace(source, sop_instance_uids=source.sop_instance_uids[:-1] + ("1.2.826.0.1.3680043.8.498.5",))
    other_input = _build(renamed, findings[:1])
    other_version = _build(source, findings[:1], model=ModelInfo(fx.MODEL, "1.0.1"))
    for ds in (other_input, other_version):
        assert ds.SOPInstanceUID != first.SOPInstanceUID and ds.SeriesInstanceUID != first.SeriesInstanceUID


# --- privacy, size, speed -----------------------------------------------------------------


def test_no_patient_data_in_logs_warnings_or_errors(tmp_path, caplog):
    folder = tmp_path / "ct"
    # A one-component name makes highdicom warn, quoting it.
    fx.write_source(folder, patient_name="SENTINELNAME")
    source = fx.load_source(folder)
    findings = fx.findings_for(source)[:2]
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _bytes(_build(source, findings))
        errors = []
        for bad in (
            dataclasses.replace(findings[0], slice_index=99),
            dataclasses.replace(findings[0], volume_mm3="SENTINELNAME"),
        ):
            with pytest.raises(SRError) as info:
                _build(source, [bad])
            errors.append(str(info.value))
    said = caplog.text + "".join(str(w.message) for w in caught) + "".join(errors)
    for secret in ("SENTINELNAME", SENTINEL_ID, SENTINEL_BIRTH_DATE):
        assert secret not in said


def test_small_and_fast(source, findings):
    _build(source, findings)  # warm-up (the first SR in a process takes about 0.5 s)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        data = _bytes(_build(source, findings, triage=fx.triage(), assessment=ASSESSMENT))
        times.append(time.perf_counter() - start)
    print(f"\nSR with {len(findings)} findings: {min(times) * 1000:.0f} ms (best of 3), {len(data) / 1000:.1f} kB")
    assert len(data) < 50_000
    assert min(times) < 2.0  # generous: the target for every output of the study is 1 s


def test_dicom_node_sr_imports_neither_inference_nor_celery():
    code = (
        "import sys, dicom_node.sr; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('inference', 'celery', 'study_queue')]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_every_code_fits_short_code_value_and_meaning(full):
    _, ds = full

    def walk(item):
        for child in item.get("ContentSequence", []):
            for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                for code in child.get(keyword, []):
                    assert "CodeValue" in code and len(code.CodeValue) <= 16, code
                    assert len(code.CodeMeaning) <= 64, code
            walk(child)

    walk(ds)


def test_image_library_can_be_left_out(source, findings, as_file):
    data = _bytes(_build(source, findings, image_library=False))
    ds = pydicom.dcmread(io.BytesIO(data))
    assert not _children(ds, codes.DCM.ImageLibrary)
    assert len(_groups(ds)) == 1 + len(findings)
    errors, _, output = _dciodvfy(as_file(data))
    assert errors == [], output


def test_the_lung_rads_module_s_assessment_and_codes_go_in_as_they_are(source, findings, as_file):
    lung_rads = pytest.importorskip("dicom_node.lung_rads")
    assessment = lung_rads.assess(findings)
    data = _bytes(_build(source, findings, assessment=assessment))
    ds = pydicom.dcmread(io.BytesIO(data))
    group = _group_by_tracking(ds, "Study-level nodule assessment")
    category = _one(group, srmod.LUNG_RADS_CATEGORY).ConceptCodeSequence[0]
    expected = assessment.code
    assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) == (
        expected.value, expected.scheme_designator, expected.meaning
    )
    assert _coded_value(_one(group, codes.DCM.RecommendedFollowUp))[1] == "99PACSAI"
    errors, _, output = _dciodvfy(as_file(data))
    assert errors == [], output
