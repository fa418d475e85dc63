"""Every output is checked before it is handed to delivery (DESIGN.md section 6).

Two layers:

- always: the object is encoded as a Part 10 file and read back, and the attributes every
  composite IOD needs to be stored and found in a PACS are present and well formed (SOP
  Common, Patient, General Study, General Series; PS3.3 C.12.1, C.7.1.1, C.7.2.1,
  C.7.3.1), UIDs valid (PS3.5 9.1), and the study is the input's;
- when ``dciodvfy`` (David Clunie's dicom3tools: Debian's ``dicom3tools`` package) is on
  the PATH: its full IOD check, where any line starting with ``Error`` fails the object.
  Its warnings are returned to be logged, not fatal.

An object that fails is never sent: the caller marks the study FAILED with the reason.
"""
from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from .uids import InvalidUID, validate_uid

DCIODVFY = "dciodvfy"
_REQUIRED = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "PatientID",
)


class OutputInvalid(ValueError):
    """An output that must not leave: the message says which object and why (no patient data)."""


@dataclass
class Verdict:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dciodvfy: bool = False  # whether the full IOD check ran

    @property
    def ok(self) -> bool:
        return not self.errors


def _part10_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def check_output(ds: Dataset, study_uid: str | None = None, *, use_dciodvfy: bool = True) -> Verdict:
    """Check one output data set; see the module docstring."""
    verdict = Verdict()
    try:
        data = _part10_bytes(ds)
        back = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # any encoding problem is a reason not to send
        verdict.errors.append(f"cannot be encoded as a DICOM file: {type(exc).__name__}")
        return verdict
    for keyword in _REQUIRED:
        if keyword not in back or back[keyword].value in (None, ""):
            if keyword == "PatientID" and "PatientID" in back:
                continue  # Type 2: present and empty is allowed
            verdict.errors.append(f"{keyword} is missing")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword in back and back[keyword].value:
            try:
                validate_uid(back[keyword].value, keyword)
            except InvalidUID as exc:
                verdict.errors.append(str(exc))
    if study_uid is not None and back.get("StudyInstanceUID") != study_uid:
        verdict.errors.append("StudyInstanceUID is not the input study's")
    if use_dciodvfy and shutil.which(DCIODVFY):
        verdict.dciodvfy = True
        errors, warnings = run_dciodvfy(data)
        verdict.errors.extend(errors)
        verdict.warnings.extend(warnings)
    return verdict


def run_dciodvfy(data: bytes | Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of ``dciodvfy`` on a Part 10 file or its bytes."""
    with tempfile.TemporaryDirectory(prefix="pacs-ai-verify-") as tmp:
        if isinstance(data, Path):
            path = data
        else:
            path = Path(tmp) / "object.dcm"
            path.write_bytes(data)
        proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln.strip() for ln in lines if ln.startswith("Error")]
    warnings = [ln.strip() for ln in lines if ln.startswith("Warning")]
    return errors, warnings


def require_valid(ds: Dataset, what: str, study_uid: str | None = None) -> Verdict:
    """:func:`check_output`, raising :class:`OutputInvalid` naming ``what`` on any error."""
    verdict = check_output(ds, study_uid)
    if not verdict.ok:
        raise OutputInvalid(f"{what}: {verdict.errors[0]}" + (f" (and {len(verdict.errors) - 1} more)" if len(verdict.errors) > 1 else ""))
    return verdict
