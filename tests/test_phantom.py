"""The synthetic chest CT phantoms: deterministic, anatomically plausible HU, and ground
truth that matches what was drawn."""
from __future__ import annotations

import math

import numpy as np
import pytest

from inference.phantom import MATRIX, NODULE_TYPES, _Builder, _Shape, generate_phantom


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(11, 5, slices=90, with_labels=True, with_lung_mask=True)


def test_same_seed_same_phantom():
    a = generate_phantom(5, 2, slices=40)
    b = generate_phantom(5, 2, slices=40)
    assert np.array_equal(a.volume.hu, b.volume.hu)
    assert a.truth() == b.truth()
    c = generate_phantom(6, 2, slices=40)
    assert not np.array_equal(a.volume.hu, c.volume.hu)


def test_acquisition_parameters_vary_within_the_documented_ranges():
    params = [_Builder(seed, None, None, None) for seed in range(300)]
    ps = [b.ps for b in params]
    st = [b.st for b in params]
    nz = [b.nz for b in params]
    assert 0.6 <= min(ps) < 0.65 and 0.85 < max(ps) <= 0.9
    assert 1.0 <= min(st) < 1.1 and 2.4 < max(st) <= 2.5
    assert 80 <= min(nz) < 120 and 300 < max(nz) <= 400
    # the body always fits in the field of view
    assert all(b.a + 10 < MATRIX * b.ps / 2 for b in params)


def test_tissues_have_their_hounsfield_units(phantom):
    hu = phantom.volume.hu
    lung = phantom.lung_mask & (phantom.labels == 0)
    assert hu.dtype == np.int16
    assert -870 < np.median(hu[lung]) < -820  # lung parenchyma, vessels included
    assert np.median(hu[:, :4, :4]) < -950  # air around the patient
    bright = (hu > 500).sum()
    assert bright > 1000  # ribs and spine
    assert hu.min() >= -1024 and hu.max() <= 3071
    # vessels: a real share of the lung is tissue-dense
    assert 0.005 < np.mean(hu[phantom.lung_mask] > -400) < 0.25


def test_nodules_are_where_the_truth_says(phantom):
    v = phantom.volume
    assert len(phantom.nodules) == 5
    for n, nod in enumerate(phantom.nodules, start=1):
        assert 3.0 <= nod.diameter_mm <= 30.0
        assert nod.type in NODULE_TYPES
        assert nod.laterality in ("right", "left")
        voxels = np.argwhere(phantom.labels == n)
        assert len(voxels), f"nodule {n} drew no voxel"
        centre = v.index_to_lps(voxels.mean(axis=0))
        # the label's centroid sits at the truth centre (within a voxel or two, juxtapleural
        # ones are clipped by nothing: the label is the whole shape)
        assert np.linalg.norm(centre - np.asarray(nod.center_lps_mm)) < max(v.spacing) * 1.5
        k, j, i = np.rint(v.lps_to_index(nod.center_lps_mm)).astype(int)
        if nod.type == "solid" and nod.diameter_mm > 2 * max(v.spacing):
            assert v.hu[k, j, i] > -300
        if nod.diameter_mm >= 10:
            counted = len(voxels) * float(np.prod(v.spacing))
            assert counted == pytest.approx(nod.volume_mm3, rel=0.25)
        # the laterality is the patient's side: right is -x in LPS
        assert (nod.center_lps_mm[0] < 0) == (nod.laterality == "right") or abs(nod.center_lps_mm[0]) < 20


def test_sphere_volume_and_lobulated_mean_radius():
    sphere = _Shape(5.0, None, lobulated=False)
    assert sphere.volume() == pytest.approx(4 / 3 * math.pi * 125, rel=1e-9)
    lob = _Shape(5.0, np.random.default_rng(1), lobulated=True)
    from inference.phantom import _SPHERE_DIRS

    assert lob.radius_along(_SPHERE_DIRS).mean() == pytest.approx(5.0, rel=1e-6)
    assert lob.max_radius() > 5.0


def test_normal_scan_and_truth_format():
    ph = generate_phantom(8, 0, slices=40)
    doc = ph.truth()
    assert doc["nodules"] == []
    assert doc["shape"] == [40, MATRIX, MATRIX]
    ph = generate_phantom(9, 3, slices=90)
    doc = ph.truth()
    assert set(doc["nodules"][0]) >= {"center_lps_mm", "diameter_mm", "volume_mm3", "type"}


@pytest.mark.parametrize("kwargs", [{"nodules": -1}, {"nodules": 21}, {"slices": 3}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        generate_phantom(1, **kwargs)
