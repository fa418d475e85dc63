"""The nodule model's second stage: candidate features, the ``[rescore]`` table of a model
spec, its logistic regression and how the training command writes it into model.toml."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest

from inference.postprocess import hessian_features, region_features, rescored, segmentation_findings
from inference.preprocess import Grid
from inference.spec import RESCORE_FEATURES, RescoreSpec, SpecError, find_model, load_spec
from inference.training import TRAIN_SEED_START
from inference.training.rescore import candidate_table, fit_logistic, rescore_table, write_rescore
from inference.volume import Volume

MODEL_DIR = Path(__file__).resolve().parents[1] / "inference" / "models" / "lung-nodule-ct"
NODULE_TOML = (MODEL_DIR / "model.toml").read_text()


def _ball(shape, centre, radius):
    idx = np.indices(shape).astype(np.float64)
    return np.sqrt(sum((idx[a] - centre[a]) ** 2 for a in range(3))) <= radius


def _features(region, prob, hu, spacing=(2.0, 1.0, 1.0)):
    from inference.postprocess import _largest_axes

    long_axis, short_axis = _largest_axes(region, spacing[1], spacing[2])
    return region_features(region, prob, float(prob[region].max()), hu, spacing, long_axis, short_axis)


def test_features_tell_a_ball_from_a_vessel_crossing_one_slice():
    shape = (12, 40, 40)
    hu = np.full(shape, -850, dtype=np.int16)
    prob = np.zeros(shape, dtype=np.float32)
    # a 10 mm ball on a (2, 1, 1) mm grid
    ball = _ball(shape, (6, 20, 20), 5) & (np.abs(np.indices(shape)[0] - 6) * 2 <= 5)
    hu[ball] = 20
    prob[ball] = 0.9
    f = _features(ball, prob, hu)
    assert tuple(f) == RESCORE_FEATURES[: len(f)]  # the shape, probability and HU features
    assert set(f) | set(hessian_features(hu, (6, 20, 20), (2.0, 1.0, 1.0), 10.0)) == set(RESCORE_FEATURES)
    assert f["single_slice"] == 0.0
    assert f["log_z_extent"] == pytest.approx(math.log(ball.any(axis=(1, 2)).sum() * 2.0))
    assert f["log_volume"] == pytest.approx(math.log(ball.sum() * 2.0))
    assert f["logit"] == pytest.approx(math.log(0.9 / 0.1), rel=1e-5)
    assert f["mean_probability"] == pytest.approx(0.9)
    assert f["mean_hu"] == pytest.approx(20.0) and f["std_hu"] == pytest.approx(0.0)
    assert f["log_elongation"] < 0.3  # round: the eigenvalues are alike
    assert 0.6 < f["fill"] < 1.2  # an ellipsoid fills its own ellipsoid
    # a vessel lying in one slice: 14 mm long, 2 mm wide
    vessel = np.zeros(shape, dtype=bool)
    vessel[3, 10:24, 5:7] = True
    g = _features(vessel, np.where(vessel, 0.99, 0.0).astype(np.float32), hu)
    assert g["single_slice"] == 1.0
    assert g["log_z_extent"] == pytest.approx(math.log(2.0))
    assert g["log_elongation"] > 1.5 and g["log_elongation_2"] > 1.0


def test_hessian_features_tell_a_small_ball_from_a_vessel_and_a_wall():
    """A 4 mm solid ball, a 4 mm vessel running along the slices and a pleural wall, all
    at 0 HU in lung at -850 HU, on the (2, 1, 1) mm grid with CT-like noise: only the ball
    curves down along all three axes."""
    shape = (20, 48, 48)
    zz, yy, xx = np.indices(shape).astype(np.float64)
    zz *= 2.0  # mm
    rng = np.random.default_rng(3)
    scenes = {
        "ball": np.sqrt((zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2) <= 2.0,
        "vessel": np.sqrt((yy - 24) ** 2 + (xx - 24) ** 2) <= 2.0,
        "wall": xx >= 24,
    }
    f = {}
    for name, inside in scenes.items():
        hu = np.where(inside, 0.0, -850.0) + rng.normal(0, 15, shape)
        f[name] = hessian_features(np.rint(hu).astype(np.int16), (10, 24, 24), (2.0, 1.0, 1.0), 4.0)
    for scale in ("fitted", "1_5mm", "3mm"):
        assert f["ball"][f"blob_{scale}"] > 0.5, f["ball"]
        assert f["vessel"][f"blob_{scale}"] < 0.2, f["vessel"]
        assert f["wall"][f"blob_{scale}"] < 0.2, f["wall"]
        assert f["ball"][f"curvature_{scale}"] > 3.0  # ln(1 + hundreds of HU)
    # uniform lung: nothing curves
    empty = hessian_features(np.full(shape, -850, dtype=np.int16), (10, 24, 24), (2.0, 1.0, 1.0), 4.0)
    assert all(v == 0.0 for v in empty.values())


def _rescoring_spec(weights: dict[str, float], bias: float, threshold: float):
    spec = find_model("lung-nodule-ct")
    return dataclasses.replace(
        spec,
        rescore=RescoreSpec(tuple(weights), tuple(weights.values()), bias),
        output=dataclasses.replace(spec.output, within="anywhere", threshold=threshold, region_threshold=0.5),
    )


def test_a_rescorer_replaces_the_peak_and_the_thresholds_apply_to_its_scale():
    """A ball with a peak of 0.9 and a one-slice streak with a peak of 0.999: the network
    ranks the streak first, a rescorer that knows single-slice regions ranks the ball
    first. Its probability is sigmoid(bias + sum(weight * feature)), and the reporting
    threshold (0.3 here, below the region cut) is on that scale."""
    shape = (12, 40, 60)
    hu = np.full(shape, -850, dtype=np.int16)
    ball = _ball(shape, (6, 20, 15), 4)
    streak = np.zeros(shape, dtype=bool)
    streak[3, 10:24, 44:47] = True
    hu[ball] = 20
    hu[streak] = 40
    prob = np.zeros(shape, dtype=np.float32)
    prob[ball], prob[streak] = 0.9, 0.999
    v = Volume(hu=hu, spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    grid = Grid(hu=hu, offset=np.zeros(3), scale=np.ones(3), spacing=(2.0, 1.0, 1.0), valid=shape)
    spec = _rescoring_spec({"logit": 0.5, "single_slice": -6.0}, bias=0.0, threshold=0.3)
    found = segmentation_findings(prob, grid, v, spec, min_probability=0.0)
    assert [round(f.center_index[2]) for f in found] == [15, 45]  # the ball first
    ball_f, streak_f = found
    assert ball_f.probability == pytest.approx(1 / (1 + math.exp(-0.5 * math.log(9))), rel=1e-5)
    assert streak_f.probability == pytest.approx(1 / (1 + math.exp(-(0.5 * math.log(999) - 6))), rel=1e-4)
    assert ball_f.probability == pytest.approx(rescored(ball_f.features, spec))
    assert set(ball_f.features) == set(RESCORE_FEATURES)
    # at the spec's own threshold (0.3) the streak (0.03) is not reported, the ball (0.75) is
    assert [round(f.center_index[2]) for f in segmentation_findings(prob, grid, v, spec)] == [15]
    # the same spec without a rescorer scores by the peak: the streak first
    plain = dataclasses.replace(spec, rescore=RescoreSpec())
    assert [round(f.probability, 3) for f in segmentation_findings(prob, grid, v, plain, min_probability=0.5)] == [0.999, 0.9]


@pytest.mark.parametrize(
    "table, message",
    [
        ('[rescore]\nfeatures = ["logit", "colour"]\nweights = [1.0, 2.0]\n', "[rescore].features: unknown 'colour'"),
        ('[rescore]\nfeatures = ["logit", "fill"]\nweights = [1.0]\n', "[rescore].weights: one per feature (2), got 1"),
        ('[rescore]\nfeatures = ["logit", "logit"]\nweights = [1.0, 1.0]\n', "a feature is named twice"),
        ('[rescore]\nfeatures = ["logit"]\nweights = ["high"]\n', "[rescore].weights: numbers"),
        ('[rescore]\nfeatures = ["logit"]\nweights = [1.0]\nbias = "low"\n', "[rescore].bias: expected float"),
        ('[rescore]\nfeatures = ["logit"]\nweights = [1.0]\nscale = 2\n', "[rescore]: unknown key 'scale'"),
    ],
)
def test_a_bad_rescore_table_is_one_line_naming_the_key(tmp_path, table, message):
    (tmp_path / "model.toml").write_text(_without_rescore(NODULE_TOML) + "\n" + table)
    with pytest.raises(SpecError) as exc:
        load_spec(tmp_path)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def _without_rescore(text: str) -> str:
    return text.split("\n[rescore]")[0]


def test_a_rescorer_needs_a_region_cut_and_a_segmentation_model(tmp_path):
    table = '\n[rescore]\nfeatures = ["logit"]\nweights = [1.0]\n'
    base = _without_rescore(NODULE_TOML)
    (tmp_path / "model.toml").write_text(base.replace("region_threshold = ", "# region_threshold = ") + table)
    with pytest.raises(SpecError, match=r"\[output\].region_threshold: a model with \[rescore\] cuts its regions there"):
        load_spec(tmp_path)
    triage = (MODEL_DIR.parent / "lung-triage-ct" / "model.toml").read_text()
    (tmp_path / "model.toml").write_text(triage + table)
    with pytest.raises(SpecError, match=r"\[rescore\]: only for segmentation models"):
        load_spec(tmp_path)
    low = re.sub(r"(?m)^threshold = .*$", "threshold = 0.2", base)  # below the region cut (0.43)
    # without a rescorer both are on the network's scale, and regions cut above the
    # reporting threshold would hide findings
    (tmp_path / "model.toml").write_text(low)
    with pytest.raises(SpecError, match=r"\[output\].region_threshold: between 0 and the threshold \(0.2\)"):
        load_spec(tmp_path)
    # with one the reporting threshold may lie below the region cut: different scales
    (tmp_path / "model.toml").write_text(low + table)
    spec = load_spec(tmp_path)
    assert spec.output.threshold == 0.2 and spec.rescore.features == ("logit",)


def test_logistic_fit_recovers_known_weights_on_raw_features():
    rng = np.random.default_rng(5)
    n = 40_000
    x = np.c_[rng.normal(3.0, 2.0, n), rng.normal(-100.0, 50.0, n), rng.integers(0, 2, n)]
    true_w, true_b = np.array([0.8, 0.02, -1.5]), 0.5
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ true_w + true_b)))).astype(float)
    w, b = fit_logistic(x, y, l2=0.01)
    assert np.allclose(w, true_w, rtol=0.1)
    assert b == pytest.approx(true_b, abs=0.25)
    with pytest.raises(ValueError, match="both kinds"):
        fit_logistic(x[:10], np.zeros(10))


def test_write_rescore_replaces_only_its_table(tmp_path):
    (tmp_path / "model.toml").write_text(NODULE_TOML)
    weights = np.arange(len(RESCORE_FEATURES), dtype=float) / 10
    write_rescore(tmp_path / "model.toml", rescore_table(weights, -2.5, "a test fit"))
    text = (tmp_path / "model.toml").read_text()
    assert text.count("\n[rescore]") == 1 and "# a test fit" in text
    spec = load_spec(tmp_path)
    assert spec.rescore.features == RESCORE_FEATURES
    assert spec.rescore.weights == pytest.approx(tuple(weights)) and spec.rescore.bias == -2.5
    # everything outside the table stays as written, comments included
    assert text.split("\n[rescore]")[0].rstrip() == NODULE_TOML.split("\n[rescore]")[0].rstrip()
    # again: replaced, not appended
    write_rescore(tmp_path / "model.toml", rescore_table(weights * 2, 1.0, "second fit"))
    text = (tmp_path / "model.toml").read_text()
    assert text.count("\n[rescore]") == 1 and "second fit" in text and load_spec(tmp_path).rescore.bias == 1.0
    # a table that does not load leaves the file as it was
    before = text
    with pytest.raises(SpecError):
        write_rescore(tmp_path / "model.toml", '[rescore]\nfeatures = ["nope"]\nweights = [1.0]\n')
    assert (tmp_path / "model.toml").read_text() == before


def test_candidates_of_a_phantom_are_labelled_by_its_truth():
    """The fitting data of the shipped network on one phantom after the training ones: a
    row per candidate region, in RESCORE_FEATURES order, labelled a nodule when its centre
    lies within a truth nodule (this phantom has six)."""
    x, y = candidate_table((TRAIN_SEED_START + 159, str(MODEL_DIR)))
    assert x.shape == (len(y), len(RESCORE_FEATURES)) and len(y) > 10
    assert y.sum() >= 4
    logit = x[:, RESCORE_FEATURES.index("logit")]
    single = x[:, RESCORE_FEATURES.index("single_slice")]
    assert set(np.unique(single)) <= {0.0, 1.0}
    # nodules span more slices than the false positives, and the network is surer of them
    assert single[y == 1].mean() < single[y == 0].mean()
    assert np.median(logit[y == 1]) > np.median(logit[y == 0])
    # the shipped rescorer ranks the nodules above the median false positive
    spec = find_model("lung-nodule-ct")
    scores = np.array([rescored(dict(zip(RESCORE_FEATURES, row)), spec) for row in x])
    assert spec.rescore.features and np.min(scores[y == 1]) > np.median(scores[y == 0])
