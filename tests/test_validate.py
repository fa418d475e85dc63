"""The last check before an output leaves: encodable, the attributes a PACS needs, the
input's study, and dciodvfy's IOD check."""
from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from dicom_node.ct_writer import write_ct_series
from dicom_node.validate import OutputInvalid, check_output, require_valid


@pytest.fixture
def ct(tmp_path):
    (path,) = write_ct_series(tmp_path, np.full((1, 16, 16), -800, np.int16), (1.0, 0.7, 0.7), uid_seed="validate")
    return pydicom.dcmread(path)


def test_a_good_object_passes_with_dciodvfy(ct):
    assert shutil.which("dciodvfy"), "dciodvfy (Debian's dicom3tools) is part of the test install"
    verdict = check_output(ct, ct.StudyInstanceUID)
    assert verdict.ok, verdict.errors
    assert verdict.dciodvfy


def test_missing_and_malformed_attributes_fail(ct):
    del ct.SOPInstanceUID
    ct.SeriesInstanceUID = "1.2.abc"
    verdict = check_output(ct, use_dciodvfy=False)
    assert "SOPInstanceUID is missing" in verdict.errors
    assert any("SeriesInstanceUID" in e and "digits and dots" in e for e in verdict.errors)


def test_another_study_fails_and_require_valid_names_the_object(ct):
    with pytest.raises(OutputInvalid, match=r"^key image 1: StudyInstanceUID is not the input study's"):
        require_valid(ct, "key image 1", study_uid="1.2.3")


def test_dciodvfy_errors_fail(ct):
    del ct.Rows  # Type 1 in Image Pixel: dciodvfy must say so
    verdict = check_output(ct)
    assert not verdict.ok
    assert any(e.startswith("Error") and "Rows" in e for e in verdict.errors)
