"""``pacs-ai phantom`` then ``pacs-ai analyze``: a synthetic study written as DICOM, read
back by the series loader and run through both reference models, without a network."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from study_queue.cli import main

SEED = 21  # an evaluation seed (below inference.training.TRAIN_SEED_START)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    assert main(["phantom", "--out", str(out), "--seed", str(SEED), "--nodules", "3", "--slices", "120"]) == 0
    return out


def test_phantom_writes_a_ct_study_and_its_truth(phantom_dir, capsys):
    files = sorted(phantom_dir.glob("*.dcm"))
    assert len(files) == 120
    truth = json.loads((phantom_dir / "truth.json").read_text())
    assert len(truth["nodules"]) == 3
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST"
    assert ds.Rows == ds.Columns == 512
    assert float(ds.PixelSpacing[0]) == pytest.approx(truth["spacing_mm"][1], abs=1e-3)
    # the first file is the first slice of the phantom: its position is the volume origin
    assert len({pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files[:5]}) == 1


def test_phantom_is_deterministic_and_refuses_to_mix_studies(phantom_dir, tmp_path, capsys):
    again = tmp_path / "again"
    assert main(["phantom", "--out", str(again), "--seed", str(SEED), "--nodules", "3", "--slices", "120"]) == 0
    a = pydicom.dcmread(sorted(phantom_dir.glob("*.dcm"))[7])
    b = pydicom.dcmread(sorted(again.glob("*.dcm"))[7])
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.PixelData == b.PixelData
    capsys.readouterr()
    assert main(["phantom", "--out", str(again), "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pacs-ai: error: --out") and "already holds DICOM files" in err and "\n" not in err
    assert main(["phantom", "--out", str(tmp_path / "x"), "--nodules", "-2"]) == 2
    assert "must not be negative" in capsys.readouterr().err


def test_analyze_finds_the_phantoms_nodules(phantom_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", str(phantom_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "findings.json").read_text())
    truth = json.loads((phantom_dir / "truth.json").read_text())["nodules"]
    study_uid = pydicom.dcmread(next(phantom_dir.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    assert doc["study_uid"] == study_uid
    assert doc["not_for_clinical_use"] is True
    assert {m["name"] for m in doc["models"]} == {"lung-nodule-ct", "lung-triage-ct"}
    assert doc["triage"]["model"] == "lung-triage-ct" and 0.0 <= doc["triage"]["probability"] <= 1.0
    assert {"scan", "load", "infer:lung-nodule-ct", "infer:lung-triage-ct", "total"} <= set(doc["timings_s"])
    # every truth nodule of 6 mm or more is found: a finding's centre within its radius
    for nod in truth:
        if nod["diameter_mm"] < 6:
            continue
        hits = [f for f in doc["findings"]
                if np.linalg.norm(np.subtract(f["center_lps_mm"], nod["center_lps_mm"])) <= nod["diameter_mm"] / 2]
        assert hits, f"missed a {nod['diameter_mm']:.1f} mm {nod['type']} nodule"
        assert hits[0]["diameter_mm"] == pytest.approx(nod["diameter_mm"], rel=0.5, abs=2.0)
    assert len(doc["findings"]) <= len(truth) + 2  # few false positives on one scan
    assert "finding" in printed and "not for clinical use" in printed


def test_analyze_explains_a_study_no_model_takes(tmp_path, capsys):
    from dicom_node.ct_writer import write_ct_series

    src = tmp_path / "short"
    write_ct_series(src, np.full((5, 32, 32), -800, np.int16), (2.0, 0.7, 0.7), uid_seed="short")
    assert main(["analyze", str(src), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((tmp_path / "o" / "findings.json").read_text())
    assert doc["findings"] == [] and doc["triage"] is None
    assert "want at least 40" in " ".join(doc["skipped"]["lung-nodule-ct"])
    assert "lung-nodule-ct: no matching series" in printed


def test_analyze_bad_input_is_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "pacs-ai: error: no DICOM images found"
    assert main(["analyze", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_analyze_writes_checked_reports_a_viewer_shows(phantom_dir, tmp_path, capsys):
    """The outputs a PACS would receive: SR, key images, KOS, SEG; valid, rebuilt byte for
    byte, and the key image's outline drawn where the truth nodule is."""
    from PIL import Image

    from dicom_node.key_images import OUTLINE_RGB
    from dicom_node.validate import run_dciodvfy

    out = tmp_path / "out"
    assert main(["analyze", str(phantom_dir), "--out", str(out), "--seg"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "findings.json").read_text())
    assert doc["outputs"][0] == "SR.dcm" and {"KOS.dcm", "SEG.dcm"} <= set(doc["outputs"])
    assert doc["lung_rads"] in {"2", "3", "4A", "4B"} and "Lung-RADS v2022 category" in printed
    keys = sorted(out.glob("KEY_*.dcm"))
    assert len(keys) == min(5, len(doc["findings"]))
    for path in [out / "SR.dcm", out / "SEG.dcm", out / "KOS.dcm", *keys]:
        errors, _ = run_dciodvfy(path)
        assert errors == [], (path.name, errors)
    sr = pydicom.dcmread(out / "SR.dcm")
    study_uid = pydicom.dcmread(next(phantom_dir.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    assert sr.StudyInstanceUID == study_uid and sr.VerificationFlag == "UNVERIFIED"

    # a second run over the same files writes the same bytes (deterministic UIDs and dates)
    again = tmp_path / "again"
    assert main(["analyze", str(phantom_dir), "--out", str(again), "--seg"]) == 0
    for name in doc["outputs"]:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name

    # the most probable finding's key image: the outline surrounds the truth nodule it found
    truth = json.loads((phantom_dir / "truth.json").read_text())["nodules"]
    top = doc["findings"][0]
    nod = min(truth, key=lambda n: np.linalg.norm(np.subtract(n["center_lps_mm"], top["center_lps_mm"])))
    assert np.linalg.norm(np.subtract(nod["center_lps_mm"], top["center_lps_mm"])) <= nod["diameter_mm"] / 2
    key = pydicom.dcmread(keys[0])
    png = tmp_path / "key.png"
    Image.fromarray(key.pixel_array).save(png)
    rgb = np.asarray(Image.open(png))
    ct = pydicom.dcmread(sorted(phantom_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    origin = np.array(ct.ImagePositionPatient, dtype=float)
    spacing = float(ct.PixelSpacing[0])
    scale = 512 / int(ct.Columns)
    col = (nod["center_lps_mm"][0] - origin[0]) / spacing * scale
    row = (nod["center_lps_mm"][1] - origin[1]) / spacing * scale
    outline = np.argwhere(np.all(rgb == OUTLINE_RGB, axis=-1))
    assert len(outline) > 8
    centre = outline.mean(axis=0)
    assert np.hypot(centre[0] - row, centre[1] - col) < nod["diameter_mm"] / 2 / spacing * scale + 3
    radius = np.hypot(*(outline - centre).T).max()
    assert radius < (nod["diameter_mm"] / 2 / spacing + 6) * scale  # around the nodule, not the whole lung
