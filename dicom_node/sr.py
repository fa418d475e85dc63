"""The findings of a study as a Comprehensive 3D SR: the TID 1500 Measurement Report.

What a radiologist's viewer gets (DESIGN.md section 6), built with highdicom's TID 1500
classes (PS3.16 Annex A), never by hand-assembling content items:

- the report (TID 1500): language (TID 1204), a device observer (TID 1004: our AE title,
  manufacturer, model name), procedure reported "CT Chest", and an image library (TID 1600)
  of only the slices the findings lie on (listing every slice cost 1.5 s and 260 kB for
  64 slices, FIELD-NOTES.md); the same slices are the evidence (Current Requested
  Procedure Evidence). Without findings the "no nodule" statement is about the whole
  series, so every slice is evidence, and there is no image library (highdicom builds none
  without images);
- a study-level group (TID 1501) of the detection model: "Nodule: Present/Absent" (an
  explicit "no finding" when nothing was found: a report without groups would not say it)
  and, when given, the Lung-RADS v2022 category and its recommended follow-up;
- a study-level group (TID 1501) of the triage model, when given: its result and probability;
- one planar ROI group (TID 1410) per finding: tracking identifier and UID, finding (nodule),
  finding site (lung, lobe when known, laterality), long and short axis, mean diameter,
  volume, solid component of a part-solid nodule, the model's confidence, the nodule type,
  and the outline on its centre slice as a SCOORD3D POLYGON in the source frame of
  reference; the in-plane measurements name that slice as their source (TID 300
  "Source of Measurement").

Every group carries the algorithm identification (TID 4019) of the model that produced it.
Study-level results sit in TID 1501 groups rather than in TID 1500's bare "Qualitative
Evaluations" container because only a group can say which algorithm (and version) made
them, and because highdicom builds groups but not that container.

Idempotence (DESIGN.md section 4): every UID comes from :func:`output_uids`, a function of
(study UID, the input SOP Instance UIDs, model name and version), and every date and time
from ``content_datetime`` (highdicom's clock stamps are overwritten), so rebuilding the
same result gives the same bytes.

Same patient and study as the source, a new series described as "not for clinical use",
Completion Flag PARTIAL and Verification Flag UNVERIFIED (PS3.3 Section C.17.2): nobody has
verified what a model found.

This module never imports ``inference``: findings are read by attribute (those of
``inference.findings.Finding``), the triage result likewise (``Classification``) and the
Lung-RADS assessment as ``dicom_node.lung_rads.Assessment`` describes it.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian
from skimage.measure import approximate_polygon, find_contours

from .errors import DicomNodeError
from .series import LoadedSeries
from .uids import derived_uid, output_uids  # noqa: F401  (output_uids: part of this module's API)

log = logging.getLogger(__name__)

# --- codes --------------------------------------------------------------------------------
# Every coded concept this SR writes, in one place. Standard codes come from pydicom's
# code dictionary (PS3.16 Annex D for DCM, SNOMED CT for SCT, UCUM for units); the context
# group (CID) each belongs to is named where there is one. Codes in PRIVATE_SCHEME exist
# where no standard code is known for sure; the scheme is declared in the Coding Scheme
# Identification Sequence of every SR (PS3.3 Section C.12.1.1.3, PS3.16 Section 8: private
# designators start with "99").

PRIVATE_SCHEME = "99PACSAI"
PRIVATE_SCHEME_NAME = "pacs-ai private concepts"  # as dicom_node.lung_rads.CODING_SCHEME names it
PRIVATE_SCHEME_OWNER = "pacs-ai"


def _private(value: str, meaning: str) -> Code:
    # Code Value is SH (16 characters) and Code Meaning LO (64): longer values would move
    # to Long Code Value, which older readers do not know (PS3.3 Section 8.1).
    return Code(value[:16], PRIVATE_SCHEME, meaning[:64])


#: TID 1500 row 1, CID 7021: DCM 126000 "Imaging Measurement Report".
TITLE = codes.cid7021.ImagingMeasurementReport
#: TID 1500 row 4 "Procedure reported": LOINC 24627-2, the LOINC/RSNA Radiology Playbook code
#: for CT of the chest (LOINC's name "CT Chest"; PS3.16 CID 7000 lists it as a report title).
PROCEDURE_CT_CHEST = Code("24627-2", "LN", "CT Chest")
#: TID 1204: RFC 5646 "en-US", highdicom's default language.
LANGUAGE = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
#: TID 1002 "Observer Type", CID 270: DCM 121007 "Device".
OBSERVER_DEVICE = codes.cid270.Device

#: The finding (TID 1410 row "Finding"): SCT 27925004 "Nodule" (CID 6104).
NODULE = codes.SCT.Nodule
#: Finding site: SCT 39607008 "Lung" (CID 6100), or a lobe when the finding knows it.
LUNG = codes.SCT.Lung
LOBES = {
    "upper": codes.SCT.UpperLobeOfLung,  # SCT 45653009
    "middle": codes.SCT.MiddleLobeOfRightLung,  # SCT 72481006
    "lower": codes.SCT.LowerLobeOfLung,  # SCT 90572001
}
#: Laterality modifiers of the finding site, CID 244.
LATERALITY = {"right": codes.SCT.Right, "left": codes.SCT.Left}  # SCT 24028007, 7771000

#: Measurements (CID 7470 linear, CID 7469 generic size measurements).
LONG_AXIS = codes.SCT.LongAxis  # SCT 103339001
SHORT_AXIS = codes.SCT.ShortAxis  # SCT 103340004
DIAMETER = codes.SCT.Diameter  # SCT 81827009, with derivation "Mean": Lung-RADS' mean diameter
MEAN = codes.SCT.Mean  # SCT 373098007, CID 7464 "General Region of Interest Measurement Modifier"
VOLUME = codes.SCT.Volume  # SCT 118565006
SOLID_COMPONENT = _private("SOLID-COMPONENT", "Solid component mean diameter")
#: The model's probability that the finding is real. DCM 111047 "Probability of cancer"
#: would claim malignancy, which a detector does not estimate; DCM 111012 "Certainty of
#: Finding" (CID 6048, the CAD SR templates' concept for a CAD mark's likelihood of being a
#: true finding) is the standard concept for exactly this, and the CAD SR templates give it
#: in percent (UCUM "%", 0-100), which is also how a radiologist reads a confidence.
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding
MILLIMETER = codes.UCUM.Millimeter  # UCUM "mm"
CUBIC_MILLIMETER = codes.UCUM.CubicMillimeter  # UCUM "mm3"
PERCENT = codes.UCUM.Percent  # UCUM "%"

#: Nodule type as Lung-RADS distinguishes it. Only ground glass has a standard code here
#: (DCM 112120, CID 6104); SNOMED's solid/part-solid concepts are not known for sure.
NODULE_TYPE = _private("NODULE-TYPE", "Nodule type")
NODULE_TYPES = {
    "solid": _private("SOLID", "Solid"),
    "part-solid": _private("PART-SOLID", "Part-solid"),
    "ground-glass": codes.DCM.GroundGlassOpacity,
}
#: Presence of the finding in the study, CID 240: SCT 52101004 / 272519000.
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent

#: Lung-RADS v2022 (ACR): no established codes known, so private ones, the same as
#: dicom_node.lung_rads (CATEGORY_CONCEPT; the value is the assessment's own ``code`` when
#: it has one, else "LRADS-<category>")...
LUNG_RADS_CATEGORY = _private("LRADS-CATEGORY", "Lung-RADS assessment category")
LUNG_RADS_DESCRIPTORS = {
    "0": "Incomplete",
    "1": "Negative",
    "2": "Benign",
    "3": "Probably Benign",
    "4A": "Suspicious",
    "4B": "Very Suspicious",
    "4X": "Very Suspicious",
}
#: ... and its management, named by DCM 111053 "Recommended Follow-up"; one code per
#: distinct management of the Lung-RADS v2022 table (categories 1 and 2 share one).
RECOMMENDED_FOLLOW_UP = codes.DCM.RecommendedFollowUp
LUNG_RADS_MANAGEMENT = {
    "0": _private("LRADS-MGMT-0", "Comparison with prior CT, or additional or 1-3 month LDCT"),
    "1": _private("LRADS-MGMT-12M", "12-month screening LDCT"),
    "2": _private("LRADS-MGMT-12M", "12-month screening LDCT"),
    "3": _private("LRADS-MGMT-6M", "6-month LDCT"),
    "4A": _private("LRADS-MGMT-3M", "3-month LDCT; PET/CT if solid component >= 8 mm"),
    "4B": _private("LRADS-MGMT-DX", "Diagnostic chest CT; PET/CT, tissue sampling or referral"),
    "4X": _private("LRADS-MGMT-DX", "Diagnostic chest CT; PET/CT, tissue sampling or referral"),
}

#: The triage model's study-level result.
TRIAGE_RESULT = _private("TRIAGE-RESULT", "AI triage result")
TRIAGE_POSITIVE = _private("TRIAGE-POSITIVE", "Positive (flagged for review)")
TRIAGE_NEGATIVE = _private("TRIAGE-NEGATIVE", "Negative (not flagged)")
TRIAGE_PROBABILITY = _private("TRIAGE-PROB", "AI triage probability")

#: Keys of ``ModelInfo.codes`` (the model spec's [codes] table) that replace the defaults.
CODE_KEYS = {
    "finding": NODULE,
    "finding_site": LUNG,
    "right": LATERALITY["right"],
    "left": LATERALITY["left"],
    "long_axis": LONG_AXIS,
    "volume": VOLUME,
    "probability": CERTAINTY_OF_FINDING,
}

# --- public API ---------------------------------------------------------------------------

#: A series description is LO: at most 64 characters (PS3.5 Table 6.2-1).
_LO_MAX = 64
#: Fewer mask pixels than this on the centre slice give a fallback outline instead.
MIN_OUTLINE_PIXELS = 3
#: Half-diagonal (mm) of the fallback outline when the finding has no usable diameter.
MIN_FALLBACK_RADIUS_MM = 1.5


class SRError(DicomNodeError):
    """The SR cannot be built from what it was given. The message names the problem, never
    the patient; retrying with the same input gives the same answer."""


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """The device that writes the SR: the device observer (TID 1004) and the General
    Equipment module. ``device_uid`` defaults to a UID derived from the other fields."""

    ae_title: str = "PACS_AI"
    manufacturer: str = "pacs-ai"
    model_name: str = "pacs-ai"
    software_version: str
    device_uid: str | None = None
    station_name: str | None = None

    @property
    def observer_uid(self) -> str:
        return self.device_uid or derived_uid("device", self.ae_title, self.manufacturer, self.model_name)


@dataclass(frozen=True)
class ModelInfo:
    """The model whose findings the SR reports (e.g. ``lung-nodule-ct`` ``1.0.0``).

    ``codes`` optionally replaces coded concepts (the model spec's ``[codes]`` table):
    keys of :data:`CODE_KEYS`, values ``(value, scheme designator, meaning)`` tuples or
    objects with ``value``, ``scheme`` and ``meaning`` attributes.
    """

    name: str
    version: str
    codes: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)

    def code(self, key: str) -> Code:
        given = (self.codes or {}).get(key)
        return CODE_KEYS[key] if given is None else _as_code(given)


def _as_code(given: Any) -> Code:
    """A pydicom ``Code`` from a Code, a highdicom CodedConcept, an object with ``value``,
    ``scheme`` and ``meaning`` (``inference.spec.Code``) or a (value, scheme, meaning) tuple."""
    if isinstance(given, Code):
        return given
    if hasattr(given, "value") and hasattr(given, "meaning"):
        scheme = getattr(given, "scheme_designator", None) or given.scheme
        return Code(str(given.value), str(scheme), str(given.meaning))
    value, scheme, meaning = given
    return Code(str(value), str(scheme), str(meaning))


def finding_polygon(finding: Any, source: LoadedSeries) -> np.ndarray:
    """The outline of ``finding`` on its ``slice_index`` as N x 3 LPS points (mm), closed.

    Traced with :func:`skimage.measure.find_contours` at level 0.5 around the slice's mask
    (padded, so the contour always closes), simplified to within 0.35 pixel, and mapped to
    the patient with that slice's Image Position (Patient) and the row/column vectors:
    every point lies exactly on the slice plane. Without a mask on that slice, or with
    fewer than :data:`MIN_OUTLINE_PIXELS` pixels, a diamond around the finding's centre
    (projected on the slice) with half the long axis as half-diagonal.
    """
    k = _slice_index(finding, source)
    position = np.asarray(source.positions[k], dtype=np.float64)
    row_step = source.spacing[1] * np.asarray(source.direction[1], dtype=np.float64)
    col_step = source.spacing[2] * np.asarray(source.direction[2], dtype=np.float64)

    got = finding.slice_mask(k) if callable(getattr(finding, "slice_mask", None)) else None
    if got is not None:
        mask, (row0, col0) = got
        mask = np.asarray(mask, dtype=bool)
        if int(mask.sum()) >= MIN_OUTLINE_PIXELS:
            contours = find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
            if contours:
                contour = max(contours, key=len)
                contour = approximate_polygon(contour, tolerance=0.35)
                if len(contour) >= 4 and np.array_equal(contour[0], contour[-1]):
                    rows = contour[:, 0] - 1 + row0
                    cols = contour[:, 1] - 1 + col0
                    points = position + np.outer(rows, row_step) + np.outer(cols, col_step)
                    points[-1] = points[0]
                    return points
    return _diamond(finding, source, k, position)


def build_sr(
    source: LoadedSeries,
    findings: Sequence[Any],
    *,
    model: ModelInfo,
    device: DeviceInfo,
    triage: Any = None,
    assessment: Any = None,
    predecessor: Any = None,
    series_number: int = 9001,
    instance_number: int = 1,
    content_datetime: _dt.datetime | None = None,
    extra_references: Sequence[Any] | None = None,
    input_sop_instance_uids: Iterable[str] | None = None,
    image_library: bool = True,
) -> Dataset:
    """The Comprehensive 3D SR of ``findings`` on ``source`` (see the module docstring).

    ``triage``: the triage model's study-level result (``model``, ``model_version``,
    ``label``, ``probability``, ``positive``, ``threshold``). ``assessment``: the Lung-RADS
    assessment (``category``, ``descriptor``, ``management``, ``version``).
    ``predecessor``: the (study UID, series UID, SOP Class UID, SOP Instance UID) of the SR
    this one supersedes, or several of them. ``content_datetime``: the Content, Series and
    Instance Creation date and time; pass the same value to rebuild the same bytes (default:
    now). ``extra_references``: other instances to list as evidence (key images, a SEG),
    as such tuples or as data sets. ``input_sop_instance_uids``: the input set the UIDs are
    derived from (default: the source series' instances). ``image_library``: False leaves
    out TID 1600 (about 4 kB and 18 ms per referenced slice; DCMTK's TID 1500 model requires
    the container, highdicom does not).

    Raises :class:`SRError` when the input cannot make a valid SR.
    """
    if not source.study_uid or not source.frame_of_reference_uid:
        raise SRError("the source series has no Study Instance UID or Frame of Reference UID")
    when = content_datetime or _dt.datetime.now()
    inputs = source.sop_instance_uids if input_sop_instance_uids is None else input_sop_instance_uids
    uids = output_uids(source.study_uid, inputs, model.name, model.version)
    try:
        with warnings.catch_warnings(record=True) as caught:
            # highdicom warns about odd person names with the name in the message: keep
            # patient data out of every log (DESIGN.md section 9).
            warnings.simplefilter("always")
            sr = _build(
                source, list(findings), model, device, triage, assessment, predecessor,
                series_number, instance_number, when, extra_references, uids, image_library,
            )
    except SRError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        message = _scrub(f"{type(exc).__name__}: {exc}", source.header)
        raise SRError(f"cannot build the SR: {message}") from None
    if caught:
        log.debug("build_sr: %d warning(s) from highdicom suppressed (they may quote patient data)", len(caught))
    return sr


# --- internals ----------------------------------------------------------------------------


#: Header attributes whose values must never reach a log or an exception message.
_PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
    "PatientMotherBirthName", "AccessionNumber", "ReferringPhysicianName",
)


def _scrub(text: str, header: Dataset) -> str:
    """``text`` with every patient identifier of ``header`` (and each part of a name) masked:
    a library's message may quote the data it choked on."""
    secrets: set[str] = set()
    for keyword in _PATIENT_KEYWORDS:
        value = header.get(keyword)
        if value is None:
            continue
        for v in value if isinstance(value, (MultiValue, list, tuple)) else [value]:
            whole = str(v)
            secrets.add(whole)
            secrets.update(part for part in whole.replace("=", "^").split("^"))
    for secret in sorted((s.strip() for s in secrets if len(s.strip()) >= 2), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _slice_index(finding: Any, source: LoadedSeries) -> int:
    k = int(finding.slice_index)
    if not 0 <= k < len(source.positions):
        raise SRError(f"a finding lies on slice index {k}, outside the {len(source.positions)} slices of the series")
    return k


def _diamond(finding: Any, source: LoadedSeries, k: int, position: np.ndarray) -> np.ndarray:
    row_dir = np.asarray(source.direction[1], dtype=np.float64)
    col_dir = np.asarray(source.direction[2], dtype=np.float64)
    normal = np.cross(col_dir, row_dir)
    normal /= np.linalg.norm(normal)
    centre = np.asarray(finding.center_lps_mm, dtype=np.float64)
    centre = centre - float((centre - position) @ normal) * normal
    radius = max(float(getattr(finding, "diameter_mm", 0.0) or 0.0) / 2, MIN_FALLBACK_RADIUS_MM)
    offsets = [col_dir, row_dir, -col_dir, -row_dir, col_dir]
    return np.array([centre + radius * o for o in offsets])


def _mean_diameter(finding: Any) -> float:
    mean = getattr(finding, "mean_diameter_mm", None)
    if mean is not None:
        return float(mean)
    short = float(getattr(finding, "short_axis_mm", 0.0) or 0.0)
    return (float(finding.diameter_mm) + (short or float(finding.diameter_mm))) / 2


def _mm(value: float) -> float:
    return round(float(value), 2)


def _algorithm(name: str, version: str, parameters: Sequence[str] | None = None) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=str(name), version=str(version), parameters=parameters or None)


def _evidence_item(source: LoadedSeries, k: int, template: Dataset | None = None) -> Dataset:
    """Slice ``k`` as highdicom wants evidence and image library entries: the source header
    (patient, study, geometry) with this slice's UIDs and position, or only the UIDs."""
    sop_class, sop_instance = source.source_images[k]
    ds = Dataset()
    if template is None:
        ds.StudyInstanceUID = source.study_uid
        ds.SeriesInstanceUID = source.series_uid
        changes: dict[str, Any] = {}
    else:
        # Shares the template's elements: replace (never modify) those that differ.
        ds.update(template)
        changes = {"ImagePositionPatient": [float(v) for v in source.positions[k]]}
        if source.instance_numbers[k] is not None:
            changes["InstanceNumber"] = source.instance_numbers[k]
    changes.update(SOPClassUID=sop_class, SOPInstanceUID=sop_instance)
    for keyword, value in changes.items():
        if keyword in ds:
            del ds[keyword]
        setattr(ds, keyword, value)
    return ds


def _header_template(source: LoadedSeries) -> Dataset:
    """The source header with every attribute highdicom reads from the first evidence item."""
    header = copy.deepcopy(source.header)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        if keyword not in header:
            setattr(header, keyword, None)
    for keyword in ("StudyDate", "StudyTime"):
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _reference_dataset(ref: Any) -> Dataset:
    if isinstance(ref, Dataset):
        return ref
    study, series, sop_class, sop_instance = ref
    ds = Dataset()
    ds.StudyInstanceUID = str(study)
    ds.SeriesInstanceUID = str(series)
    ds.SOPClassUID = str(sop_class)
    ds.SOPInstanceUID = str(sop_instance)
    return ds


def _predecessors(predecessor: Any) -> list[Dataset]:
    if predecessor is None:
        return []
    if isinstance(predecessor, Dataset) or (
        isinstance(predecessor, (tuple, list)) and len(predecessor) == 4 and all(isinstance(p, str) for p in predecessor)
    ):
        predecessor = [predecessor]
    return [_reference_dataset(p) for p in predecessor]


def _finding_group(
    n: int, finding: Any, source: LoadedSeries, model: ModelInfo, uids: dict[str, Any]
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    k = _slice_index(finding, source)
    sop_class, sop_instance = source.source_images[k]
    on_slice = [hd.sr.SourceImageForMeasurement(sop_class, sop_instance)]

    # Graphic Data is FL (float32). Round to float32 first, then let highdicom check the
    # plane in float64: its coplanarity tolerance (1e-5 mm) is below float32's resolution
    # at a few hundred mm, and failed small outlines checked as float32.
    polygon = finding_polygon(finding, source).astype(np.float32).astype(np.float64)
    polygon[-1] = polygon[0]
    region = hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
        graphic_data=polygon,
        frame_of_reference_uid=source.frame_of_reference_uid,
    )
    lobe = LOBES.get(str(getattr(finding, "lobe", "") or "").lower())
    side = str(getattr(finding, "laterality", "") or "").lower()
    site = hd.sr.FindingSite(
        anatomic_location=lobe or model.code("finding_site"),
        laterality=model.code(side) if side in LATERALITY else None,
    )

    measurements = [
        hd.sr.Measurement(
            name=model.code("long_axis"), value=_mm(finding.diameter_mm), unit=MILLIMETER, referenced_images=on_slice
        )
    ]
    short = float(getattr(finding, "short_axis_mm", 0.0) or 0.0)
    if short > 0:
        measurements.append(
            hd.sr.Measurement(name=SHORT_AXIS, value=_mm(short), unit=MILLIMETER, referenced_images=on_slice)
        )
    measurements.append(
        hd.sr.Measurement(
            name=DIAMETER, value=_mm(_mean_diameter(finding)), unit=MILLIMETER, derivation=MEAN,
            referenced_images=on_slice,
        )
    )
    measurements.append(
        hd.sr.Measurement(name=model.code("volume"), value=round(float(finding.volume_mm3), 1), unit=CUBIC_MILLIMETER)
    )
    nodule_type = str(getattr(finding, "type", "") or "").lower()
    solid = float(getattr(finding, "solid_component_mm", 0.0) or 0.0)
    if nodule_type == "part-solid" and solid > 0:
        measurements.append(hd.sr.Measurement(name=SOLID_COMPONENT, value=_mm(solid), unit=MILLIMETER))
    measurements.append(
        hd.sr.Measurement(
            name=model.code("probability"), value=round(100 * float(finding.probability), 2), unit=PERCENT
        )
    )
    evaluations = []
    if nodule_type in NODULE_TYPES:
        evaluations.append(hd.sr.QualitativeEvaluation(NODULE_TYPE, NODULE_TYPES[nodule_type]))

    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids["tracking"](n), identifier=f"Nodule {n}"),
        referenced_region=region,
        finding_type=model.code("finding"),
        algorithm_id=_algorithm(
            getattr(finding, "model", None) or model.name, getattr(finding, "model_version", None) or model.version
        ),
        finding_sites=[site],
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


def _study_group(
    findings: Sequence[Any], model: ModelInfo, assessment: Any, uids: dict[str, Any]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    finding_code = model.code("finding")
    evaluations = [hd.sr.QualitativeEvaluation(finding_code, PRESENT if findings else ABSENT)]
    parameters = None
    if assessment is not None:
        category = str(assessment.category).strip().upper()
        base = category[:-1] if len(category) > 1 and category.endswith("S") else category
        version = str(getattr(assessment, "version", "") or "v2022")
        given = getattr(assessment, "code", None)
        value = _as_code(given) if given is not None else _private(
            f"LRADS-{category}", f"Lung-RADS {version} category {category}"
        )
        evaluations.append(hd.sr.QualitativeEvaluation(LUNG_RADS_CATEGORY, value))
        management = LUNG_RADS_MANAGEMENT.get(base)
        if management is None:
            text = str(getattr(assessment, "management", "") or "unspecified")
            management = _private(f"LRADS-MGMT-{base}", text[:_LO_MAX])
        evaluations.append(hd.sr.QualitativeEvaluation(RECOMMENDED_FOLLOW_UP, management))
        descriptor = str(getattr(assessment, "descriptor", "") or "") or LUNG_RADS_DESCRIPTORS.get(base, "")
        parameters = [f"Lung-RADS {version} baseline screening rules"]
        if descriptor:
            parameters.append(f"category {category}: {descriptor}")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids["tracking"]("study"), identifier="Study-level nodule assessment"),
        algorithm_id=_algorithm(model.name, model.version, parameters),
        qualitative_evaluations=evaluations,
    )


def _triage_group(triage: Any, uids: dict[str, Any]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    parameters = [f"label: {triage.label}", f"threshold: {float(triage.threshold):g}"]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids["tracking"]("triage"), identifier="Study-level triage"),
        algorithm_id=_algorithm(triage.model, triage.model_version, parameters),
        measurements=[
            hd.sr.Measurement(name=TRIAGE_PROBABILITY, value=round(100 * float(triage.probability), 2), unit=PERCENT)
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(TRIAGE_RESULT, TRIAGE_POSITIVE if triage.positive else TRIAGE_NEGATIVE)
        ],
    )


def _build(
    source: LoadedSeries,
    findings: list[Any],
    model: ModelInfo,
    device: DeviceInfo,
    triage: Any,
    assessment: Any,
    predecessor: Any,
    series_number: int,
    instance_number: int,
    when: _dt.datetime,
    extra_references: Sequence[Any] | None,
    uids: dict[str, Any],
    image_library: bool,
) -> Dataset:
    groups: list[Any] = [_study_group(findings, model, assessment, uids)]
    if triage is not None:
        groups.append(_triage_group(triage, uids))
    groups.extend(_finding_group(n, f, source, model, uids) for n, f in enumerate(findings, start=1))

    # The slices the findings lie on, in slice order, once each. Without findings the
    # "no nodule" statement is about the whole series, so every slice is evidence.
    referenced = sorted({_slice_index(f, source) for f in findings})
    template = _header_template(source)
    library = [_evidence_item(source, k, template) for k in referenced]
    evidence = list(library) if library else [
        _evidence_item(source, k, template if k == 0 else None) for k in range(len(source.positions))
    ]
    evidence.extend(_reference_dataset(r) for r in extra_references or ())

    observer = hd.sr.ObserverContext(
        observer_type=OBSERVER_DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device.observer_uid,
            name=device.station_name or device.ae_title,
            manufacturer_name=device.manufacturer,
            model_name=device.model_name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CT_CHEST,
        imaging_measurements=groups,
        title=TITLE,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(LANGUAGE),
        referenced_images=(library or None) if image_library else None,
    )

    date, time = when.date(), when.time()
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids["sr_series"],
        series_number=int(series_number),
        sop_instance_uid=uids["sr_instance"],
        instance_number=int(instance_number),
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.model_name,
        software_versions=device.software_version,
        series_description=f"pacs-ai {model.name} {model.version} - not for clinical use"[:_LO_MAX],
        is_complete=False,
        is_final=False,
        is_verified=False,
        previous_versions=_predecessors(predecessor) or None,
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME, responsible_organization=PRIVATE_SCHEME_OWNER
            )
        ],
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # highdicom stamps the creation time and its own contribution with the clock; the
    # result must not depend on it (same input, same bytes).
    stamp = when.strftime("%Y%m%d%H%M%S.%f" if when.microsecond else "%Y%m%d%H%M%S")
    sr.InstanceCreationDate = stamp[:8]
    sr.InstanceCreationTime = stamp[8:]
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = stamp
    if device.station_name:
        sr.StationName = device.station_name
    for pre in _predecessors(predecessor):
        if pre.SOPInstanceUID == sr.SOPInstanceUID:
            raise SRError("the predecessor document is this SR itself (same SOP Instance UID)")
    return sr
