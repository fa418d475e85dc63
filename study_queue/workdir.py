"""Where one analysis of one study lives on the shared spool: ``<spool>/work/<study key>/run-<n>/``.

- ``heartbeat``: touched every few seconds while a worker analyses the study. The node reads
  its age to tell an analysis that is running from one whose worker died (kill -9, power).
- ``outputs/``: the SR, key images, KOS and SEG, as they will be sent.
- ``findings.json``: DESIGN.md section 5.
- ``result.json``: written last, atomically: the analysis is done. A second analysis of the
  same run (a message delivered twice) finds it and does not compute again, and the node can
  hand it to delivery again if the ``deliver`` message is lost.

Workers and the node may run on different hosts; only files on the shared spool pass
between them besides the broker's messages, never the journal (SQLite is not for network
file systems).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

WORK_DIR = "work"
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")


class BadMessage(ValueError):
    """A task message whose fields are missing or malformed."""


def check_key(value: Any) -> str:
    """A study key as the journal makes them (16 hex digits): safe in a path."""
    if not isinstance(value, str) or not _KEY_RE.match(value):
        raise BadMessage("study_key must be 16 hexadecimal digits")
    return value


def check_run(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 1_000_000:
        raise BadMessage("run must be a positive integer")
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WorkDir:
    """The folder of one run of one study's analysis."""

    def __init__(self, spool_root: str | Path, study_key: str, run: int) -> None:
        self.spool_root = Path(spool_root)
        self.study_key = check_key(study_key)
        self.run = check_run(run)
        self.path = self.spool_root / WORK_DIR / self.study_key / f"run-{self.run}"

    @property
    def outputs(self) -> Path:
        return self.path / "outputs"

    @property
    def heartbeat_path(self) -> Path:
        return self.path / "heartbeat"

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.spool_root))

    def read_result(self) -> dict | None:
        try:
            doc = json.loads(self.result_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def write_result(self, doc: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(self.result_path, json.dumps(doc, indent=2) + "\n")

    def write_json(self, name: str, doc: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(self.path / name, json.dumps(doc, indent=2) + "\n")

    def heartbeat_age(self, now: float | None = None) -> float | None:
        """Seconds since the last heartbeat, None when no analysis ever started."""
        try:
            mtime = self.heartbeat_path.stat().st_mtime
        except FileNotFoundError:
            return None
        return max(0.0, (time.time() if now is None else now) - mtime)

    def clear_heartbeat(self) -> None:
        try:
            self.heartbeat_path.unlink()
        except FileNotFoundError:
            pass


class Heartbeat:
    """Touch ``workdir.heartbeat_path`` every ``interval`` seconds while the block runs."""

    def __init__(self, workdir: WorkDir, interval: float) -> None:
        self.workdir = workdir
        self.interval = max(0.05, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _touch(self) -> None:
        path = self.workdir.heartbeat_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path, "a"):
            pass
        os.utime(path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._touch()
            except OSError:
                pass  # a full or unmounted spool shows up in the analysis itself

    def __enter__(self) -> "Heartbeat":
        self._touch()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
