"""Model specs, preprocessing geometry and postprocessing on arrays whose answer is known."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from inference.findings import Finding
from inference.postprocess import classification, nodule_type, segmentation_findings
from inference.preprocess import Grid, pad_to_multiple, prepare, region_bbox, resample, slice_stack, window
from inference.spec import RescoreSpec, SpecError, available_models, find_model, load_spec
from inference.volume import AXIAL_DIRECTION, Volume

NODULE_TOML = (Path(__file__).resolve().parents[1] / "inference" / "models" / "lung-nodule-ct" / "model.toml").read_text()


# -- specs ------------------------------------------------------------------------------------
def test_reference_specs_load():
    assert {"lung-nodule-ct", "lung-triage-ct"} <= set(available_models())
    nod = find_model("lung-nodule-ct")
    assert nod.task == "segmentation" and nod.version == "1.4.0"
    assert nod.input.context_slices == 7 and nod.input.crop == "lungs"
    assert nod.codes["finding"].value == "27925004"
    tri = find_model("lung-triage-ct")
    assert tri.task == "classification" and tri.input.size == (256, 256)
    assert tri.onnx_path.name == "model.onnx"


def _spec_dir(tmp_path, text):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "model.toml").write_text(text)
    return d


@pytest.mark.parametrize(
    "change, message",
    [
        (('task = "segmentation"', 'task = "detection"'), "task must be one of"),
        (("[input]", "[input]\nbogus = 1"), "[input]: unknown key 'bogus'"),
        (("context_slices = 7", "context_slices = 4"), "[input].context_slices"),
        (('crop = "lungs"', 'crop = "liver"'), "[input].crop"),
        (("hu_window = [-1000.0, 400.0]", "hu_window = [400.0, -1000.0]"), "[input].hu_window"),
        (("threshold = 0.0556", "threshold = 1.5"), "[output].threshold"),
        (("region_threshold = 0.43", "region_threshold = 1.0"), "[output].region_threshold: a model with [rescore] cuts"),
        (("min_slices = 40", 'min_slices = "many"'), "[selector].min_slices: expected int"),
        (('series_description = ""', 'series_description = "("'), "not a regular expression"),
        (('finding = ["27925004", "SCT", "Nodule"]', 'finding = ["27925004", "SCT"]'), "[codes].finding"),
        (('name = "lung-nodule-ct"', "name = 3"), "name must be a non-empty string"),
    ],
)
def test_bad_spec_is_one_line_naming_the_key(tmp_path, change, message):
    old, new = change
    assert old in NODULE_TOML
    with pytest.raises(SpecError) as exc:
        load_spec(_spec_dir(tmp_path, NODULE_TOML.replace(old, new, 1)))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_model_lists_the_known_ones(tmp_path):
    with pytest.raises(SpecError, match="unknown model 'nope' .*lung-nodule-ct"):
        find_model("nope")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(_spec_dir(tmp_path, "name = "))
    # a site's own model folder is found by path and by name under a search folder
    site = tmp_path / "site"
    (site / "my-model").mkdir(parents=True)
    (site / "my-model" / "model.toml").write_text(NODULE_TOML.replace("lung-nodule-ct", "my-model"))
    assert find_model("my-model", [site]).name == "my-model"
    assert find_model(str(site / "my-model")).name == "my-model"


# -- preprocessing ----------------------------------------------------------------------------
def _ramp_volume(shape=(20, 40, 50), spacing=(2.5, 0.8, 0.7), origin=(-10.0, 20.0, -300.0)):
    k, j, i = np.indices(shape)
    hu = (k * 100 + j * 3 + i).astype(np.int16)  # linear, so linear resampling is exact
    return Volume(hu=hu, spacing=spacing, origin=origin, direction=AXIAL_DIRECTION)


def test_resample_keeps_geometry_exact():
    v = _ramp_volume()
    bbox = (slice(2, 18), slice(5, 35), slice(4, 40))
    g = resample(v, bbox, (1.25, 1.0, 1.0))
    assert g.spacing == (1.25, 1.0, 1.0)
    for idx in [(0, 0, 0), (5, 7, 9), (g.hu.shape[0] - 1, g.hu.shape[1] - 1, g.hu.shape[2] - 1)]:
        src = g.to_source_index(idx)
        expect = src[0] * 100 + src[1] * 3 + src[2]
        assert g.hu[idx] == pytest.approx(expect, abs=1.0)
        # model voxel -> source index -> patient position -> back
        lps = v.index_to_lps(src)
        assert np.allclose(v.lps_to_index(lps), src)
    # the grid stays inside the box: its last voxel is on or before the box's last voxel
    last = g.to_source_index(np.array(g.hu.shape) - 1)
    assert np.all(last <= [17, 34, 39])


def test_resize_to_fixed_size_and_padding():
    v = _ramp_volume()
    g = resample(v, tuple(slice(0, n) for n in v.shape), (5.0, 0.0, 0.0), (32, 32))
    assert g.hu.shape == (10, 32, 32)
    assert np.allclose(g.to_source_index((0, 31, 31))[1:], (39, 49))
    g = pad_to_multiple(Grid(hu=np.zeros((3, 10, 13), np.int16), offset=np.zeros(3), scale=np.ones(3),
                             spacing=(1, 1, 1), valid=(3, 10, 13)), 8)
    assert g.hu.shape == (3, 16, 16) and g.hu[0, 15, 15] == -1024 and g.valid == (3, 10, 13)


def test_window_and_slice_stack():
    hu = np.array([[-2000, -1000, -300, 400, 3000]], dtype=np.int16)
    w = window(hu, (-1000, 400))
    assert w.dtype == np.float32
    assert np.allclose(w, [[0, 0, 0.5, 1, 1]])
    vol = np.arange(5, dtype=np.int16)[:, None, None] * np.ones((1, 2, 2), np.int16)
    st = slice_stack(vol, np.array([0, 4]), 5)
    assert st.shape == (2, 5, 2, 2)
    assert list(st[0, :, 0, 0]) == [0, 0, 0, 1, 2] and list(st[1, :, 0, 0]) == [2, 3, 4, 4, 4]


def test_lung_box_excludes_the_air_around_the_patient():
    from inference.phantom import generate_phantom

    ph = generate_phantom(4, 1, slices=60, with_lung_mask=True)
    box = region_bbox(ph.volume, "lungs")
    lung = np.argwhere(ph.lung_mask)
    for axis in range(3):
        assert box[axis].start <= lung[:, axis].min() and lung[:, axis].max() < box[axis].stop
    assert box[2].stop - box[2].start < 0.9 * 512  # not the whole field of view
    spec = find_model("lung-nodule-ct").input
    g = prepare(ph.volume, spec)
    assert g.hu.shape[1] % 8 == 0 and g.hu.shape[2] % 8 == 0


# -- postprocessing ---------------------------------------------------------------------------
def _anywhere(spec, threshold: float = 0.5, region_threshold: float = 0.0):
    """The nodule spec without its lungs-only rule (these volumes are lung from edge to
    edge), reporting at ``threshold`` with regions cut at half of it unless
    ``region_threshold`` is given: the probabilities below are written by hand, and a
    finding's probability is the map's peak (no rescorer; tests/test_rescore.py has it)."""
    return dataclasses.replace(spec, rescore=RescoreSpec(), output=dataclasses.replace(
        spec.output, within="anywhere", threshold=threshold, region_threshold=region_threshold))


def _ball(shape, centre, radius_vox):
    idx = np.indices(shape).astype(np.float64)
    d = np.sqrt(sum((idx[a] - centre[a]) ** 2 for a in range(3)))
    return d <= radius_vox


def test_probability_blobs_become_findings_with_geometry():
    spec = _anywhere(find_model("lung-nodule-ct"))
    shape = (30, 60, 60)
    hu = np.full(shape, -850, dtype=np.int16)
    solid = _ball(shape, (10, 20, 15), 5)  # 10 mm across at 1 mm
    ggo = _ball(shape, (20, 40, 45), 3)
    hu[solid] = 30
    hu[ggo] = -550
    v = Volume(hu=hu, spacing=(1.0, 1.0, 1.0), origin=(-100.0, -50.0, 200.0))
    prob = np.zeros(shape, dtype=np.float32)
    prob[solid] = 0.9
    prob[ggo] = 0.7
    prob[0, 0, 0] = 0.95  # a single voxel: below min_component_mm3
    grid = Grid(hu=hu, offset=np.zeros(3), scale=np.ones(3), spacing=(1.0, 1.0, 1.0), valid=shape)
    found = segmentation_findings(prob, grid, v, spec)
    assert [f.type for f in found] == ["solid", "ground-glass"]
    a, b = found
    assert a.probability == pytest.approx(0.9) and b.probability == pytest.approx(0.7)
    assert np.allclose(a.center_lps_mm, (-100 + 15, -50 + 20, 200 + 10))
    assert a.slice_index == 10
    assert a.diameter_mm == pytest.approx(11.0, abs=1.0)  # 11 voxels across at the equator
    assert a.volume_mm3 == pytest.approx(solid.sum())
    assert a.volume_mm3 == pytest.approx(4 / 3 * math.pi * 125, rel=0.1)
    # the source-resolution mask is the ball
    m, (r0, c0) = a.slice_mask()
    assert m.sum() == solid[10].sum() and (r0, c0) == (a.mask_offset[1], a.mask_offset[2])
    # raising the bar drops the weaker one; lowering it for FROC keeps every candidate
    assert len(segmentation_findings(prob, grid, v, spec, min_probability=0.8)) == 1
    assert a.as_json()["center_lps_mm"] == [-85.0, -30.0, 210.0]


def test_a_region_threshold_keeps_regions_apart_at_any_reporting_threshold():
    """Two blobs joined by a faint bridge (0.1): cut at half of a low evaluation threshold
    (0.025) they are one region; with the spec's region_threshold (0.3) they stay two,
    whatever threshold the caller asks for, and each keeps its own score."""
    shape = (20, 40, 60)
    hu = np.full(shape, -850, dtype=np.int16)
    a, b = _ball(shape, (10, 20, 15), 4), _ball(shape, (10, 20, 45), 4)
    prob = np.zeros(shape, dtype=np.float32)
    prob[10, 20, 15:46] = 0.1
    prob[a], prob[b] = 0.97, 0.8
    v = Volume(hu=hu, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    grid = Grid(hu=hu, offset=np.zeros(3), scale=np.ones(3), spacing=(1.0, 1.0, 1.0), valid=shape)
    base = find_model("lung-nodule-ct")
    merged = segmentation_findings(prob, grid, v, _anywhere(base, 0.5), min_probability=0.05)
    assert len(merged) == 1
    apart = segmentation_findings(prob, grid, v, _anywhere(base, 0.95, region_threshold=0.3), min_probability=0.05)
    assert [round(f.probability, 2) for f in apart] == [0.97, 0.8]
    assert [round(f.center_index[2]) for f in apart] == [15, 45]
    # at the spec's own threshold only the stronger one is reported
    assert len(segmentation_findings(prob, grid, v, _anywhere(base, 0.95, region_threshold=0.3))) == 1
    # the reference model's spec cuts its regions where its temperature-4 sigmoid needs it
    # (its reporting threshold is on its rescorer's scale: tests/test_rescore.py)
    assert 0.0 < base.output.region_threshold < 1.0 and base.rescore.features


def test_findings_on_a_resampled_grid_map_back_to_the_source():
    spec = _anywhere(find_model("lung-nodule-ct"))
    shape = (40, 80, 80)
    hu = np.full(shape, -850, dtype=np.int16)
    ball = _ball(shape, (20, 40, 30), 6)
    hu[ball] = 20
    v = Volume(hu=hu, spacing=(1.0, 0.5, 0.5), origin=(0.0, 0.0, 0.0))
    g = resample(v, tuple(slice(0, n) for n in shape), (2.0, 1.0, 1.0))
    prob = (g.hu > -400).astype(np.float32) * 0.8
    (f,) = segmentation_findings(prob, g, v, spec)
    assert np.allclose(f.center_lps_mm, v.index_to_lps((20, 40, 30)), atol=0.6)
    assert f.type == "solid"
    # the mask is at source resolution (a 13-voxel ball there, 6-7 voxels on the grid)
    assert f.mask.shape[1:] == pytest.approx((13, 13), abs=2)
    assert f.mask.sum() == pytest.approx(ball.sum(), rel=0.35)


def test_nodule_type_thresholds():
    spec = find_model("lung-nodule-ct")
    assert nodule_type(np.full(100, 20), spec) == "solid"
    assert nodule_type(np.r_[np.full(90, -550), np.full(10, 20)], spec) == "part-solid"
    assert nodule_type(np.full(100, -550), spec) == "ground-glass"


def test_classification_aggregates():
    spec = find_model("lung-triage-ct")
    c = classification(np.array([0.1, 0.7, 0.2]), spec)
    assert c.probability == pytest.approx(0.7) and c.positive and c.label == "suspicious for lung nodule"
    assert not classification(np.array([0.1, 0.2]), spec).positive
    assert classification(np.zeros(0), spec).probability == 0.0


def test_finding_json_has_the_documented_keys():
    f = Finding("m", "1", "nodule", (1.0, 2.0, 3.0), 5.0, 60.0, "solid", 0.9)
    assert set(f.as_json()) >= {"model", "model_version", "label", "center_lps_mm", "diameter_mm", "volume_mm3", "type", "probability"}
    assert f.slice_mask() is None


def test_long_and_short_axis_of_an_ellipse_and_a_part_solid_core():
    from inference.postprocess import axes_mm

    j, i = np.indices((60, 60))
    ellipse = ((j - 30) / 5.0) ** 2 + ((i - 30) / 10.0) ** 2 <= 1.0  # 21 x 11 pixels
    long_axis, short_axis = axes_mm(ellipse, 0.5, 0.5)
    assert long_axis == pytest.approx(10.5, abs=0.5) and short_axis == pytest.approx(5.5, abs=0.5)
    # a tilted ellipse measures the same
    jj, ii = (j - 30) * 0.8 + (i - 30) * 0.6, -(j - 30) * 0.6 + (i - 30) * 0.8
    tilted = (jj / 5.0) ** 2 + (ii / 10.0) ** 2 <= 1.0
    assert axes_mm(tilted, 0.5, 0.5) == pytest.approx((long_axis, short_axis), abs=0.8)

    spec = _anywhere(find_model("lung-nodule-ct"))
    shape = (20, 60, 60)
    hu = np.full(shape, -850, dtype=np.int16)
    outer = _ball(shape, (10, 30, 30), 8)
    core = _ball(shape, (10, 30, 30), 3)
    hu[outer] = -550
    hu[core] = 30
    v = Volume(hu=hu, spacing=(1.0, 1.0, 1.0))
    grid = Grid(hu=hu, offset=np.zeros(3), scale=np.ones(3), spacing=(1.0, 1.0, 1.0), valid=shape)
    (f,) = segmentation_findings(outer.astype(np.float32) * 0.9, grid, v, spec)
    assert f.type == "part-solid"
    assert f.diameter_mm == pytest.approx(17, abs=1) and f.short_axis_mm == pytest.approx(17, abs=1)
    assert f.solid_component_mm == pytest.approx(7, abs=1)
    assert f.as_json()["mean_diameter_mm"] == pytest.approx(17, abs=1)


def test_lung_nodules_must_lie_in_the_lungs():
    """A body of soft tissue in air, one lung in it: a candidate in the lung (or on its
    pleura) is kept, one in the chest wall, one in the air around the patient are not."""
    spec = find_model("lung-nodule-ct")
    assert spec.output.within == "lungs"
    spec = dataclasses.replace(spec, rescore=RescoreSpec())  # the map's peak is the score here
    shape = (20, 80, 80)
    hu = np.full(shape, -1000, dtype=np.int16)
    k, j, i = np.indices(shape)
    hu[(j - 40) ** 2 + (i - 40) ** 2 < 36**2] = 40  # body
    hu[(j - 40) ** 2 + (i - 40) ** 2 < 22**2] = -850  # lung
    v = Volume(hu=hu, spacing=(1.0, 1.0, 1.0))
    grid = Grid(hu=hu, offset=np.zeros(3), scale=np.ones(3), spacing=(1.0, 1.0, 1.0), valid=shape)
    prob = np.zeros(shape, dtype=np.float32)
    for centre in ((10, 40, 40), (10, 40, 70), (10, 3, 3)):  # lung, chest wall, outside air
        prob[_ball(shape, centre, 2.5)] = 0.99  # above the reference model's reporting threshold
    found = segmentation_findings(prob, grid, v, spec)
    assert [tuple(np.rint(f.center_index).astype(int)) for f in found] == [(10, 40, 40)]
    # on the pleura: centre just outside the lung, within the margin
    prob[:] = 0
    prob[_ball(shape, (10, 40, 64), 2.5)] = 0.99  # above the reference model's reporting threshold
    assert len(segmentation_findings(prob, grid, v, spec)) == 1
