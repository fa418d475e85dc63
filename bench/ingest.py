#!/usr/bin/env python3
"""Ingest benchmark: DCMTK ``storescu`` -> storescp --fork / Orthanc / pacs-ai node.

The same client (DCMTK ``storescu``, ``TCP_NODELAY=1``) sends

* ``ct``:    a synthetic 300-slice 512x512 16-bit CT series (about 158 MB), and
* ``small``: 2000 small CT instances (64x64, 20 studies of 100),

with 1 and 4 concurrent associations (k storescu processes, each sending
1/k of the files) to three receivers:

* ``storescp``: DCMTK ``storescp --fork`` (the reference, DESIGN.md section 10),
* ``orthanc``:  Orthanc started with a generated JSON configuration,
* ``node``:     ``pacs-ai node`` (one receiver per ``--node-processes`` value).

Every measured run starts its receiver fresh (empty storage in a temp dir
under ``bench/out/runs/``), waits for readiness with ``echoscu``, times from
the start of the first storescu to the exit of the last one (all responses
received), checks that every instance arrived, samples the receiver's CPU
seconds (its whole process tree, from ``/proc``) over the same window and
stops it. Runs are interleaved (repetition, then dataset, then associations,
then receiver in a rotating order) and the table shows medians.

Exit status: 0 when every instance of every run arrived, 1 when any went
missing (or a sender/receiver failed), 2 on a usage error, 130 on Ctrl-C.

The node runs from a snapshot of its sources taken at start
(``bench/out/snapshot/<hash>``, put first on its PYTHONPATH), so that edits
to the working tree during a run do not mix code versions; ``--live-code``
runs the working tree instead. The header names the snapshot's hash.

``--profile pyspy|cprofile`` instead runs the node alone, with
``ingest_processes=1``, under a profiler and prints where its CPU goes.

Only 127.0.0.1 and free ports are used; every process started here is
stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "out"
VENV_BIN = REPO / ".venv" / "bin"
PACS_AI = VENV_BIN / "pacs-ai"
PYTHON = VENV_BIN / "python"
PYSPY = VENV_BIN / "py-spy"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"

CLIENT_AET = "BENCHSCU"
CLK_TCK = os.sysconf("SC_CLK_TCK")
DATA_VERSION = "1"  # bump to regenerate the cached data sets

RECEIVER_ORDER = ("storescp", "orthanc", "node")
DATASETS = ("ct", "small")


NODE_PACKAGES = ("dicom_node", "study_queue", "inference")


def code_hash(root: Path = REPO) -> str:
    """A hash of the node's Python sources under ``root``."""
    h = hashlib.sha256()
    for pkg in NODE_PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def snapshot_code(out: Path, attempts: int = 5) -> tuple[Path, str]:
    """Copy the node's packages to out/snapshot/<hash>/: other people edit
    the working tree while a benchmark runs, and every run of one
    invocation must measure the same code."""
    for _ in range(attempts):
        digest = code_hash()
        dest = out / "snapshot" / digest
        if (dest / ".complete").exists() and code_hash(dest) == digest:
            return dest, digest
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for pkg in NODE_PACKAGES:
            if (REPO / pkg).is_dir():
                shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        if code_hash(dest) == digest:  # not edited while we copied
            (dest / ".complete").write_text("")
            return dest, digest
        shutil.rmtree(dest, ignore_errors=True)
        time.sleep(1)
    raise BenchError("the node's sources keep changing; could not take a consistent snapshot")


#: PYTHONPATH for the node (set by main: a snapshot, or None for the live tree)
NODE_PYTHONPATH: Path | None = None


def node_env() -> dict[str, str]:
    env = dcmtk_env()  # TCP_NODELAY is for DCMTK, harmless for the node
    if NODE_PYTHONPATH is not None:
        env["PYTHONPATH"] = str(NODE_PYTHONPATH) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class BenchError(Exception):
    """A setup problem: one line on stderr, exit status 2."""


# ============================================================================
# process bookkeeping: everything started here is stopped on the way out
# ============================================================================
_STARTED: list[subprocess.Popen] = []


def dcmtk_env() -> dict[str, str]:
    """Environment of every DCMTK tool and of Orthanc (FIELD-NOTES.md)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def spawn(cmd: list[str], *, log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start a process in its own session (Ctrl-C on the terminal reaches
    only us; we stop the children) with stdout+stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
        )
    _STARTED.append(proc)
    return proc


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen, *, graceful: int = signal.SIGTERM,
                 group: bool = True, timeout: float = 30.0) -> int | None:
    """Ask ``proc`` to stop (``graceful`` to it, or to its process group),
    wait, then SIGKILL whatever is left of its process group."""
    if proc.poll() is None:
        try:
            if group:
                _signal_group(proc, graceful)
            else:
                proc.send_signal(graceful)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
    # Leftovers in the group (storescp's forked children, the node's
    # ingest processes if the node itself was killed).
    _signal_group(proc, signal.SIGKILL)
    if proc in _STARTED:
        _STARTED.remove(proc)
    return proc.returncode


def stop_all() -> None:
    for proc in list(_STARTED):
        stop_process(proc, timeout=10.0)


def _on_sigterm(_signo: int, _frame: Any) -> None:
    raise KeyboardInterrupt


# ============================================================================
# helpers
# ============================================================================
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise BenchError(f"{tool} not found on PATH (install DCMTK)")
    return path


def echo_ok(aet: str, port: int) -> bool:
    r = subprocess.run(
        [need("echoscu"), "-aet", CLIENT_AET, "-aec", aet, "-to", "5", "-ta", "5", "-td", "5",
         "127.0.0.1", str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20,
    )
    return r.returncode == 0


def wait_ready(proc: subprocess.Popen, aet: str, port: int, what: str, log: Path,
               timeout: float = 60.0, extra: Callable[[], bool] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready; "
                               f"see {log}\n{tail(log)}")
        if echo_ok(aet, port) and (extra is None or extra()):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s; see {log}\n{tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def count_files(root: Path, suffix: str | None = None, exclude: Iterable[str] = ()) -> int:
    excluded = set(exclude)
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in excluded]
        n += sum(1 for f in filenames if suffix is None or f.endswith(suffix))
    return n


# -- CPU of a process tree, from /proc -----------------------------------------
def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime in ticks), zombies included."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode("ascii", "replace")
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()
        # rest[0] = state (field 3); ppid field 4; utime..cstime fields 14-17
        table[int(entry)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
    return table


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and every descendant: live and zombie ones by
    their own counters, reaped ones through their parents' cutime/cstime.
    The difference of two readings is the tree's CPU between them."""
    table = _proc_table()
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid][1]
        stack.extend(children.get(pid, ()))
    return total / CLK_TCK


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat: user, nice,
    system, irq, softirq; not idle, iowait or steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[i] for i in (0, 1, 2, 5, 6)) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children (the storescu senders)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ============================================================================
# data sets (cached under bench/out/cache)
# ============================================================================
@dataclass
class Dataset:
    name: str
    files: list[Path]
    nbytes: int
    description: str


def _uid(*parts: Any) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["pacs-ai-bench", DATA_VERSION, *map(str, parts)])


def _base_ct(study: str, series: str, frame: str, study_no: int) -> Any:
    """The header of a realistic axial CT image (CT Image IOD, PS3.3 A.3)."""
    from pydicom.dataset import Dataset as DS

    ds = DS()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20250314"
    ds.StudyTime = "101502"
    ds.SeriesTime = "101733"
    ds.AccessionNumber = f"BENCH{study_no:06d}"
    ds.Modality = "CT"
    ds.Manufacturer = "SIEMENS"
    ds.InstitutionName = "Bench General Hospital"
    ds.ReferringPhysicianName = "REFERRER^ANNA"
    ds.StationName = "CTAWP00001"
    ds.StudyDescription = "CT THORAX WITHOUT CONTRAST"
    ds.SeriesDescription = "Thorax 1.0 B30f"
    ds.ManufacturerModelName = "SOMATOM Definition AS"
    ds.PatientName = f"BENCH^PATIENT{study_no:04d}"
    ds.PatientID = f"PID{study_no:08d}"
    ds.PatientBirthDate = "19580704"
    ds.PatientSex = "M"
    ds.PatientAge = "066Y"
    ds.PatientWeight = "82"
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL_CT"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500.0"
    ds.SoftwareVersions = "syngo CT 2014A"
    ds.ProtocolName = "Thorax_Routine"
    ds.ReconstructionDiameter = "350.0"
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595.0"
    ds.GantryDetectorTilt = "0.0"
    ds.TableHeight = "158.0"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "190"
    ds.Exposure = "95"
    ds.FilterType = "FLAT"
    ds.GeneratorPower = "23"
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "B30f"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = str(study_no)
    ds.SeriesNumber = "2"
    ds.AcquisitionNumber = "1"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _phantom(n: int, z: float, rng: Any) -> Any:
    """An n x n thorax-like slice in stored values (HU + 1024), z in [0, 1]."""
    import numpy as np

    c = (np.arange(n) - (n - 1) / 2) / (n / 2)  # -1 .. 1
    y, x = np.meshgrid(c, c, indexing="ij")
    hu = np.full((n, n), -1000.0)
    body = (x / 0.82) ** 2 + ((y - 0.02) / 0.62) ** 2 <= 1
    hu[body] = 35.0
    fat = body & ((x / 0.78) ** 2 + ((y - 0.02) / 0.58) ** 2 > 1)
    hu[fat] = -95.0
    lung_r = 0.30 + 0.08 * np.sin(np.pi * z)
    for cx in (-0.38, 0.38):
        lung = ((x - cx) / lung_r) ** 2 + ((y + 0.02) / (lung_r * 1.45)) ** 2 <= 1
        hu[lung] = -860.0
        for k in range(6):  # vessels
            a = 2 * np.pi * (k / 6 + 0.3 * z)
            vx, vy = cx + 0.5 * lung_r * np.cos(a), 0.5 * lung_r * np.sin(a) * 1.4
            hu[(x - vx) ** 2 + (y - vy) ** 2 <= (0.012 + 0.008 * (k % 3)) ** 2] = 40.0
    heart = ((x + 0.08) / 0.22) ** 2 + ((y + 0.05) / 0.2) ** 2 <= 1
    hu[heart & (z < 0.6)] = 45.0
    spine = x ** 2 + (y - 0.42) ** 2 <= 0.07 ** 2
    hu[spine] = 650.0
    hu[x ** 2 + (y - 0.42) ** 2 <= 0.045 ** 2] = 250.0
    ring = ((x / 0.76) ** 2 + ((y - 0.02) / 0.56) ** 2 <= 1) & (
        (x / 0.72) ** 2 + ((y - 0.02) / 0.52) ** 2 > 1)
    ribs = ring & (np.sin(np.arctan2(y, x) * 9 + z * 20) > 0.55)
    hu[ribs] = 900.0
    table = (y > 0.70) & (y < 0.74) & (np.abs(x) < 0.9)
    hu[table] = 120.0
    hu += rng.normal(0.0, 12.0, (n, n))
    return np.clip(hu + 1024.0, 0, 4095).astype(np.uint16)


def _save(ds: Any, path: Path) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def _series_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.dcm"))


def _cached(cache: Path, name: str, params: dict[str, Any],
            build: Callable[[Path], None]) -> list[Path]:
    key = hashlib.sha256(json.dumps({"v": DATA_VERSION, **params}, sort_keys=True).encode()).hexdigest()[:10]
    directory = cache / f"{name}-{key}"
    marker = directory / ".complete"
    if not marker.exists():
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        t0 = time.monotonic()
        print(f"generating data set {name} in {directory} ...", file=sys.stderr, flush=True)
        build(directory)
        marker.write_text(json.dumps(params))
        print(f"  done in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return _series_files(directory)


def make_ct(cache: Path, slices: int = 300, size: int = 512) -> list[Path]:
    def build(directory: Path) -> None:
        import numpy as np

        rng = np.random.default_rng(20250314)
        study, series, frame = _uid("ct", "study"), _uid("ct", "series"), _uid("ct", "frame")
        spacing = 350.0 / size
        for i in range(slices):
            ds = _base_ct(study, series, frame, study_no=1)
            ds.SOPInstanceUID = _uid("ct", "sop", i)
            ds.InstanceNumber = str(i + 1)
            z = -50.0 - i * 1.0
            ds.ImagePositionPatient = [f"{-175 + spacing / 2:.4f}", f"{-175 + spacing / 2 - 20:.4f}", f"{z:.1f}"]
            ds.SliceLocation = f"{z:.1f}"
            ds.Rows = ds.Columns = size
            ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
            ds.AcquisitionTime = ds.ContentTime = f"1017{33 + i // 60:02d}.{(i % 60) * 16666:06d}"
            ds.PixelData = _phantom(size, i / max(1, slices - 1), rng).tobytes()
            _save(ds, directory / f"CT{i + 1:05d}.dcm")

    return _cached(cache, "ct", {"slices": slices, "size": size}, build)


def make_small(cache: Path, count: int = 2000, per_study: int = 100, size: int = 64) -> list[Path]:
    def build(directory: Path) -> None:
        import numpy as np

        rng = np.random.default_rng(7)
        templates = [_phantom(size, k / 15, rng) for k in range(16)]
        for i in range(count):
            s = i // per_study
            ds = _base_ct(_uid("small", "study", s), _uid("small", "series", s), _uid("small", "frame", s), s + 100)
            ds.SeriesDescription = "Scout 5.0"
            ds.SliceThickness = "5.0"
            ds.SOPInstanceUID = _uid("small", "sop", i)
            j = i % per_study
            ds.InstanceNumber = str(j + 1)
            ds.ImagePositionPatient = ["-175.0", "-195.0", f"{-j * 5.0:.1f}"]
            ds.SliceLocation = f"{-j * 5.0:.1f}"
            ds.Rows = ds.Columns = size
            ds.PixelSpacing = [f"{350 / size:.6f}"] * 2
            ds.AcquisitionTime = ds.ContentTime = "101733"
            px = templates[i % 16].astype(np.int32) + rng.integers(-6, 7, (size, size))
            ds.PixelData = np.clip(px, 0, 4095).astype(np.uint16).tobytes()
            _save(ds, directory / f"SM{i + 1:05d}.dcm")

    return _cached(cache, "small", {"count": count, "per_study": per_study, "size": size}, build)


def load_datasets(names: list[str], cache: Path, small_count: int) -> dict[str, Dataset]:
    out = {}
    for name in names:
        if name == "ct":
            files = make_ct(cache)
            desc = "300 x 512x512 CT"
        else:
            files = make_small(cache)[:small_count]
            desc = f"{small_count} x 64x64 CT"
        for f in files:  # into the page cache before the first measured run
            with open(f, "rb") as fh:
                while fh.read(1 << 20):
                    pass
        out[name] = Dataset(name, files, sum(f.stat().st_size for f in files), desc)
    return out


# ============================================================================
# receivers
# ============================================================================
class Receiver:
    """One receiver under test; ``start`` gives a fresh, empty one."""

    key: str = ""
    label: str = ""
    aet: str = ""

    def __init__(self, workroot: Path, pdu: int | None) -> None:
        self.workroot = Path(workroot).resolve()  # receivers run with cwd in their temp dir
        self.pdu = pdu
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.port = 0
        self.log: Path | None = None

    def start(self, run_id: str) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=self.workroot))
        self.port = free_port()
        self.log = self.workdir / "receiver.log"
        self.proc = self._launch()
        wait_ready(self.proc, self.aet, self.port, self.label, self.log, extra=self._ready_extra)

    def _launch(self) -> subprocess.Popen:
        raise NotImplementedError

    def _ready_extra(self) -> bool:
        return True

    def cpu(self) -> float:
        return tree_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def count(self) -> tuple[int, str]:
        """(instances that arrived, how they were counted)."""
        raise NotImplementedError

    def stop(self) -> list[str]:
        """Stop; return problems seen (bad exit, errors in its log)."""
        if self.proc is not None:
            stop_process(self.proc)
        return []

    def cleanup(self, keep: bool) -> None:
        if self.workdir is not None and not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None


class Storescp(Receiver):
    key = label = "storescp"
    aet = "STORESCP"

    def _launch(self) -> subprocess.Popen:
        self.storage = self.workdir / "storage"
        self.storage.mkdir()
        cmd = [need("storescp"), "--fork", "-aet", self.aet, "-od", self.storage]
        if self.pdu:
            cmd += ["--max-pdu", str(self.pdu)]
        cmd.append(str(self.port))
        return spawn(cmd, log=self.log, env=dcmtk_env())

    def count(self) -> tuple[int, str]:
        return count_files(self.storage), "files"

    def stop(self) -> list[str]:
        super().stop()
        problems = []
        text = self.log.read_text(errors="replace") if self.log and self.log.exists() else ""
        bad = [l for l in text.splitlines() if l.startswith(("E:", "F:"))]
        if bad:
            problems.append(f"storescp log: {len(bad)} error line(s), e.g. {bad[0]!r}")
        return problems


class Orthanc(Receiver):
    key = label = "orthanc"
    aet = "ORTHANC"

    def _launch(self) -> subprocess.Popen:
        self.http_port = free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        storage = self.workdir / "storage"
        config = {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,   # localhost only ...
            "AuthenticationEnabled": False,  # ... and no credentials there
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "SaveJobs": False,
        }
        if self.pdu:
            config["MaximumPduLength"] = self.pdu
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        return spawn([ORTHANC, cfg], log=self.log, env=dcmtk_env(), cwd=self.workdir)

    def _rest(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def _ready_extra(self) -> bool:
        try:
            self._rest("/system")
            return True
        except OSError:
            return False

    def count(self) -> tuple[int, str]:
        return int(self._rest("/statistics")["CountInstances"]), "REST /statistics"

    def stop(self) -> list[str]:
        super().stop()
        problems = []
        text = self.log.read_text(errors="replace") if self.log and self.log.exists() else ""
        bad = [l for l in text.splitlines() if l[:1] == "E"]
        if bad:
            problems.append(f"Orthanc log: {len(bad)} error line(s), e.g. {bad[0]!r}")
        return problems


class Node(Receiver):
    key = "node"
    aet = "PACS_AI"

    def __init__(self, workroot: Path, pdu: int | None, processes: int,
                 profiler: str | None = None) -> None:
        super().__init__(workroot, pdu)
        self.processes = processes
        self.profiler = profiler
        self.label = "node" if processes == 0 else f"node p={processes}"
        self.key = f"node:{processes}"
        self.profile_out: Path | None = None

    def _launch(self) -> subprocess.Popen:
        self.spool = self.workdir / "spool"
        self.config = self.workdir / "node.toml"
        lines = [
            "[node]",
            f'ae_title = "{self.aet}"',
            'bind = "127.0.0.1"',
            f"port = {self.port}",
            f'spool = "{self.spool}"',
            f"ingest_processes = {self.processes}",
        ]
        if self.pdu:
            lines.append(f"max_pdu = {self.pdu}")
        self.config.write_text("\n".join(lines) + "\n")
        cmd: list[Any] = [PYTHON, "-m", "study_queue.cli", "node", "--config", self.config]
        if self.profiler == "pyspy":
            self.profile_out = self.workdir / "pyspy.txt"
            # --gil: only samples where a thread holds the GIL, i.e. runs
            # Python code (sleeps, fsync, socket waits release it); without
            # it pynetdicom's 1 ms polling sleeps count as activity.
            cmd = [PYSPY, "record", "--rate", "1000", "--gil", "--format", "raw", "--subprocesses",
                   "--output", self.profile_out, "--", PYTHON, "-m", "study_queue.cli",
                   "node", "--config", self.config]
        elif self.profiler == "cprofile":
            self.profile_out = self.workdir / "node.pstats"
            cmd = [PYTHON, BENCH_DIR / "_cprofile_threads.py", self.profile_out,
                   "node", "--config", self.config]
        # The node's environment is ours (PACS_AI_* variables would reach it
        # just as they reach a user's node), plus PYTHONPATH to the snapshot.
        return spawn(cmd, log=self.log, env=node_env(), cwd=self.workdir)

    def count(self) -> tuple[int, str]:
        r = subprocess.run(
            [str(PYTHON), "-m", "study_queue.cli", "status", "--config", str(self.config), "--json",
             "--limit", "1000000"],
            capture_output=True, text=True, timeout=60, env=node_env(),
        )
        if r.returncode != 0:
            raise RuntimeError(f"pacs-ai status failed ({r.returncode}): {r.stderr.strip()}")
        journaled = sum(int(s["instance_count"]) for s in json.loads(r.stdout))
        self.files = count_files(self.spool, ".dcm", exclude=("tmp", "logs"))
        self.spread = self._spread()
        return journaled, "status --json"

    def _spread(self) -> str:
        """How the associations that carried instances were spread over the
        ingest processes, e.g. "2+2" or "4" (best effort: reads the
        journal's associations table, an internal schema)."""
        import sqlite3

        try:
            conn = sqlite3.connect(f"file:{self.spool / 'journal.sqlite'}?mode=ro", uri=True, timeout=10)
            try:
                rows = conn.execute(
                    "SELECT a.pid, COUNT(DISTINCT i.assoc_id) FROM instances i "
                    "JOIN associations a ON a.assoc_id = i.assoc_id GROUP BY a.pid"
                ).fetchall()
            finally:
                conn.close()
        except Exception:
            return "?"
        return "+".join(str(n) for n in sorted((n for _pid, n in rows), reverse=True)) or "-"

    def stop(self) -> list[str]:
        problems = []
        if self.proc is not None:
            # SIGTERM to the node only: it stops its ingest processes itself.
            if self.profiler == "pyspy":
                # py-spy writes its output once the node it launched exits.
                table = _proc_table()
                for pid, (ppid, _) in table.items():
                    if ppid == self.proc.pid:
                        os.kill(pid, signal.SIGTERM)
                try:
                    self.proc.wait(120)
                except subprocess.TimeoutExpired:
                    pass
            rc = stop_process(self.proc, group=False, timeout=60.0)
            if rc != 0:
                problems.append(f"{self.label}: exited with status {rc} after SIGTERM")
        spool = getattr(self, "spool", None)
        logs = [self.log] + (sorted((spool / "logs").glob("pacs-ai.log*")) if spool else [])
        seen = set()
        for log in logs:
            if not log or not log.exists():
                continue
            for line in log.read_text(errors="replace").splitlines():
                m = re.search(r" (WARNING|ERROR|CRITICAL) ", line)
                if m or line.startswith("Traceback"):
                    text = re.sub(r"^\S+ \S+ ", "", line)  # drop the timestamp
                    if text not in seen:
                        seen.add(text)
                        problems.append(f"{self.label} log: {text[:300]}")
        return problems


# ============================================================================
# one measured run
# ============================================================================
@dataclass
class RunResult:
    receiver: str
    label: str
    dataset: str
    assocs: int
    rep: int
    expected: int
    arrived: int
    counted_by: str
    seconds: float
    nbytes: int
    cpu_s: float
    sender_failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sender_cpu_s: float = 0.0
    background_cpu_s: float = 0.0
    spread: str = ""  # node: associations per ingest process

    @property
    def ips(self) -> float:
        return self.expected / self.seconds

    @property
    def mbps(self) -> float:
        return self.nbytes / 1e6 / self.seconds

    @property
    def ok(self) -> bool:
        return self.arrived == self.expected and not self.sender_failures


def split(files: list[Path], k: int) -> list[list[Path]]:
    n = len(files)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [files[bounds[i]:bounds[i + 1]] for i in range(k) if bounds[i] < bounds[i + 1]]


def send(receiver: Receiver, ds: Dataset, assocs: int, logdir: Path) -> tuple[float, list[str]]:
    """k storescu processes, each with 1/k of the files; wall time from the
    first start to the last exit."""
    storescu = need("storescu")
    env = dcmtk_env()
    procs = []
    t0 = time.perf_counter()
    for i, part in enumerate(split(ds.files, assocs)):
        cmd = [storescu, "-aet", CLIENT_AET, "-aec", receiver.aet, "-nh",
               "127.0.0.1", str(receiver.port), *map(str, part)]
        procs.append((spawn(cmd, log=logdir / f"storescu-{i}.log", env=env), logdir / f"storescu-{i}.log"))
    failures = []
    for proc, log in procs:
        rc = proc.wait()
        if proc in _STARTED:
            _STARTED.remove(proc)
        if rc != 0:
            failures.append(f"storescu exited with {rc}: {tail(log, 3)}")
    seconds = time.perf_counter() - t0
    for _proc, log in procs:
        text = log.read_text(errors="replace") if log.exists() else ""
        bad = [l for l in text.splitlines() if l.startswith(("E:", "F:", "W: Store"))]
        if bad:
            failures.append(f"storescu log {log.name}: {len(bad)} error line(s), e.g. {bad[0]!r}")
    return seconds, failures


def measure(receiver: Receiver, ds: Dataset, assocs: int, rep: int, keep: bool) -> RunResult:
    run_id = f"{receiver.key.replace(':', '')}-{ds.name}-a{assocs}-r{rep}"
    # Each run starts with no dirty pages of an earlier one still being
    # written back (storescp and Orthanc do not fsync, the node does).
    os.sync()
    try:
        receiver.start(run_id)
        cpu0, sys0, snd0 = receiver.cpu(), system_busy_seconds(), children_cpu_seconds()
        seconds, failures = send(receiver, ds, assocs, receiver.workdir / "senders")
        time.sleep(0.2)  # let forked children exit and be accounted
        cpu = receiver.cpu() - cpu0
        sender_cpu = children_cpu_seconds() - snd0
        # Whatever else ran on the machine meanwhile (other people's tests,
        # kernel writeback and softirq threads): a run with a lot of it is noisy.
        background = max(0.0, system_busy_seconds() - sys0 - cpu - sender_cpu)
        arrived, how = receiver.count()
        problems = []
        if isinstance(receiver, Node) and receiver.files != arrived:
            problems.append(f"{receiver.label}: journal counts {arrived} instances, spool holds "
                            f"{receiver.files} .dcm files")
        problems += receiver.stop()
    except KeyboardInterrupt:
        receiver.stop()
        receiver.cleanup(keep=False)
        raise
    except BaseException:
        receiver.stop()
        if receiver.workdir is not None:
            print(f"  (kept {receiver.workdir} for inspection)", file=sys.stderr)
        raise
    result = RunResult(receiver.key, receiver.label, ds.name, assocs, rep, len(ds.files), arrived, how,
                       seconds, ds.nbytes, cpu, failures, problems, sender_cpu, background,
                       getattr(receiver, "spread", ""))
    if not result.ok and not keep:
        keep = True  # leave the evidence
        print(f"  (kept {receiver.workdir} for inspection)", file=sys.stderr)
    receiver.cleanup(keep)
    return result


# ============================================================================
# report
# ============================================================================
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(results: list[RunResult], receivers: list[Receiver], datasets: dict[str, Dataset],
                assoc_list: list[int], repeat: int, out: Any = sys.stdout) -> None:
    by: dict[tuple[str, str, int], list[RunResult]] = collections.defaultdict(list)
    for r in results:
        by[(r.receiver, r.dataset, r.assocs)].append(r)
    header = (f"{'receiver':<12} {'dataset':<18} {'assoc':>5} {'inst/s':>8} {'MB/s':>7} "
              f"{'vs storescp':>11} {'CPU s':>6} {'CPU ms/inst':>11} {'other CPU s':>11} {'arrived':>11}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for dname, ds in datasets.items():
        for a in assoc_list:
            ref = by.get(("storescp", dname, a))
            ref_ips = median([r.ips for r in ref]) if ref else None
            for rc in receivers:
                runs = by.get((rc.key, dname, a))
                if not runs:
                    continue
                ips = median([r.ips for r in runs])
                mbps = median([r.mbps for r in runs])
                cpu = median([r.cpu_s for r in runs])
                bg = median([r.background_cpu_s for r in runs])
                ratio = f"{ips / ref_ips:.2f}x" if ref_ips else "-"
                arrived = f"{min(r.arrived for r in runs)}/{runs[0].expected}"
                if any(not r.ok for r in runs):
                    arrived += " !"
                print(f"{rc.label:<12} {ds.description:<18} {a:>5} {ips:>8.1f} {mbps:>7.1f} {ratio:>11} "
                      f"{cpu:>6.2f} {1000 * cpu / runs[0].expected:>11.2f} {bg:>11.2f} {arrived:>11}", file=out)
        print(file=out)
    print(f"medians of {repeat} interleaved run(s); time = first storescu start to last storescu exit; "
          f"CPU s = receiver process tree over that window; other CPU s = the rest of the machine "
          f"over that window (not receiver, not storescu); 'arrived' = fewest instances counted in any run",
          file=out)


# ============================================================================
# profile mode
# ============================================================================
def summarise_pyspy(path: Path, top: int = 15) -> str:
    """Self and inclusive sample counts per function from py-spy's raw
    (collapsed stack) output; startup imports are reported separately."""
    self_c: collections.Counter = collections.Counter()
    incl_c: collections.Counter = collections.Counter()
    area_c: collections.Counter = collections.Counter()
    total = startup = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        frames = stack.split(";")
        if any(f.startswith(("_find_and_load", "<module> ")) for f in frames):
            startup += n  # imports at start (or a lazy import later)
            continue
        total += n
        # strip "process 123:"/"thread" prefixes py-spy may add
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames
                  if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
        leaf = frames[-1]
        area_c[_area(leaf)] += n
    lines = [f"py-spy --gil samples (a thread holding the GIL, 1000 Hz): {total} while serving "
             f"(= {total / 1000:.2f} s), {startup} in startup imports (excluded)"]
    lines.append("\nself time by area (leaf frame):")
    for area, n in area_c.most_common():
        lines.append(f"  {100 * n / total:5.1f}%  {area}")
    lines.append(f"\ntop {top} functions by self samples:")
    for f, n in self_c.most_common(top):
        lines.append(f"  {100 * n / total:5.1f}%  {f}")
    lines.append(f"\ntop {top} functions by inclusive samples (thread entry frames left out):")
    skip = ("_bootstrap (", "_bootstrap_inner (", "run (threading.py")
    shown = 0
    for f, n in incl_c.most_common():
        if f.startswith(skip) or "threading.py" in f:
            continue
        lines.append(f"  {100 * n / total:5.1f}%  {f}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines)


def _area(frame: str) -> str:
    m = re.search(r"\(([^()]*?)(?::\d+)?\)$", frame)
    path = m.group(1) if m else frame
    for key, name in (("dicom_node/", "our code: dicom_node/" ), ("pynetdicom/", "pynetdicom"),
                      ("pydicom/", "pydicom"), ("sqlite3", "sqlite3"), ("logging/", "logging"),
                      ("threading.py", "threading"), ("socket", "socket/selectors"),
                      ("selectors", "socket/selectors"), ("queue.py", "queue")):
        if key in path:
            if name.startswith("our code"):
                return "our code: " + path.split("dicom_node/")[-1]
            return name
    return "other: " + "/".join(Path(path).parts[-2:])


def profile(args: argparse.Namespace, datasets: dict[str, Dataset], workroot: Path) -> int:
    ds = datasets["ct"] if "ct" in datasets else next(iter(datasets.values()))
    assocs = args.assocs[-1]
    rc = 0
    node = Node(workroot, args.pdu, processes=1, profiler=args.profile)
    result = measure(node, ds, assocs, 0, keep=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = args.out / f"profile-{args.profile}-{stamp}"
    dest.mkdir(parents=True, exist_ok=True)
    prof = node.profile_out
    print(f"node code {args.code}")
    print(f"node p=1 under {args.profile}: {ds.description}, {assocs} association(s): "
          f"{result.ips:.1f} inst/s, {result.mbps:.1f} MB/s, CPU {result.cpu_s:.2f} s "
          f"(profiler overhead included), arrived {result.arrived}/{result.expected}")
    for p in result.problems + result.sender_failures:
        print(f"  problem: {p}")
    if not result.ok:
        rc = 1
    if prof is None or not prof.exists():
        print(f"no profile written; see {node.log}\n{tail(node.log)}", file=sys.stderr)
        return 1
    shutil.copy2(prof, dest / prof.name)
    if args.profile == "pyspy":
        text = summarise_pyspy(prof)
    else:
        text = summarise_pstats(prof)
    (dest / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"\nprofile and summary in {dest}")
    return rc


def summarise_pstats(path: Path, top: int = 15) -> str:
    import io
    import pstats

    lines = []
    for key, title in (("tottime", "self (tottime)"), ("cumulative", "cumulative")):
        buf = io.StringIO()
        st = pstats.Stats(str(path), stream=buf)
        st.sort_stats(key).print_stats(top)
        text = buf.getvalue()
        lines.append(f"== top {top} by {title}; CPU time per thread (time.thread_time), all threads ==")
        lines.append(text[text.find("   ncalls"):].rstrip() if "   ncalls" in text else text)
    for pattern in (r"scp.py.*\(_store\)", r"dimse_messages.py.*\(decode_msg\)", r"dimse.py.*\(send_msg\)"):
        buf = io.StringIO()
        pstats.Stats(str(path), stream=buf).sort_stats("cumulative").print_callees(pattern)
        text = buf.getvalue()
        lines.append(f"== callees of {pattern} ==")
        lines.append(text[text.find("Function"):].rstrip() if "Function" in text else text)
    st = pstats.Stats(str(path))
    area: collections.Counter = collections.Counter()
    total = 0.0
    for (fname, _line, func), (_cc, _nc, tt, _ct, callers) in st.stats.items():  # type: ignore[attr-defined]
        if fname == "~" and callers:
            # a built-in (write, fsync, sqlite execute...): charge its callers
            for (cf, _cl, _cfn), entry in callers.items():
                area[_area(f"x ({cf}:1)") + f" [{func.strip('<>')[:40]}]" if "dicom_node/" in cf
                     else _area(f"x ({cf}:1)")] += entry[2]
        else:
            area[_area(f"x ({fname}:1)")] += tt
        total += tt
    lines.append("== self time by area (built-ins charged to their caller's area) ==")
    for name, t in area.most_common(25):
        lines.append(f"  {100 * t / total:5.1f}%  {t:7.2f}s  {name}")
    return "\n".join(lines)


# ============================================================================
# main
# ============================================================================
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/ingest.py",
        description="Ingest benchmark: DCMTK storescu to storescp --fork, Orthanc and pacs-ai node.",
    )
    p.add_argument("--repeat", type=int, default=None, help="measured runs per configuration (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --repeat 1 and 400 small instances instead of 2000")
    p.add_argument("--only", default=",".join(RECEIVER_ORDER),
                   help="receivers, comma-separated: storescp,orthanc,node (default all)")
    p.add_argument("--dataset", default=",".join(DATASETS), help="ct,small (default both)")
    p.add_argument("--assocs", default="1,4", help="concurrent associations to try (default 1,4)")
    p.add_argument("--node-processes", default="0",
                   help="node ingest_processes; a comma list (e.g. 1,2,3) benchmarks each as its own "
                        "receiver (default 0 = the node's auto: one per core, at most 4)")
    p.add_argument("--small-count", type=int, default=None, help="small instances to send (default 2000)")
    p.add_argument("--pdu", default="131072",
                   help="max receive PDU for all three receivers (storescp --max-pdu, Orthanc "
                        "MaximumPduLength, node max_pdu); 'default' leaves each at its own default "
                        "(16384, 16384, 131072). Default 131072")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cache, temp dirs and results (default bench/out)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the unmeasured warm-up run of each receiver")
    p.add_argument("--live-code", action="store_true",
                   help="run the node from the working tree instead of a snapshot of its sources "
                        "taken at start (bench/out/snapshot/<hash>)")
    p.add_argument("--keep", action="store_true", help="keep every receiver's storage and logs")
    p.add_argument("--profile", choices=("pyspy", "cprofile"),
                   help="instead of the table: run the node (ingest_processes=1) on the CT series "
                        "with the last --assocs value under py-spy or per-thread cProfile and summarise")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    args.small_count = args.small_count if args.small_count is not None else (400 if args.quick else 2000)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    args.dataset = [x.strip() for x in args.dataset.split(",") if x.strip()]
    try:
        args.assocs = [int(x) for x in args.assocs.split(",") if x.strip()]
        args.node_processes = [int(x) for x in args.node_processes.split(",") if x.strip()]
        args.pdu = None if args.pdu == "default" else int(args.pdu)
    except ValueError as exc:
        p.error(str(exc))
    for x in args.only:
        if x not in RECEIVER_ORDER:
            p.error(f"--only: unknown receiver {x!r} (storescp, orthanc, node)")
    for x in args.dataset:
        if x not in DATASETS:
            p.error(f"--dataset: unknown data set {x!r} (ct, small)")
    if args.repeat < 1 or not args.assocs or min(args.assocs) < 1 or not args.node_processes:
        p.error("--repeat, --assocs and --node-processes need positive values")
    if not 1 <= args.small_count <= 2000:
        p.error("--small-count must be between 1 and 2000")
    if args.pdu is not None and not 4096 <= args.pdu <= 131072:
        p.error("--pdu must be between 4096 and 131072 (storescp's range) or 'default'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    for tool in ("storescu", "echoscu") + (("storescp",) if "storescp" in args.only else ()):
        need(tool)
    if "orthanc" in args.only and not Path(ORTHANC).exists():
        raise BenchError(f"Orthanc not found at {ORTHANC}")
    if ("node" in args.only or args.profile) and not PACS_AI.exists():
        raise BenchError(f"{PACS_AI} not found (make the virtualenv and pip install -e . first)")
    if args.profile == "pyspy" and not PYSPY.exists():
        raise BenchError(f"{PYSPY} not found ({VENV_BIN}/pip install py-spy)")

    args.out.mkdir(parents=True, exist_ok=True)
    global NODE_PYTHONPATH
    if args.live_code:
        NODE_PYTHONPATH, args.code = None, code_hash() + " (live working tree)"
    else:
        NODE_PYTHONPATH, digest = snapshot_code(args.out)
        args.code = f"{digest} (snapshot {NODE_PYTHONPATH.relative_to(args.out)})"
    workroot = args.out / "runs"
    workroot.mkdir(exist_ok=True)
    datasets = load_datasets(args.dataset, args.out / "cache", args.small_count)
    if args.profile:
        return profile(args, datasets, workroot)

    receivers: list[Receiver] = []
    for key in args.only:
        if key == "storescp":
            receivers.append(Storescp(workroot, args.pdu))
        elif key == "orthanc":
            receivers.append(Orthanc(workroot, args.pdu))
    if "node" in args.only:
        receivers += [Node(workroot, args.pdu, n) for n in args.node_processes]
    receivers.sort(key=lambda r: RECEIVER_ORDER.index(r.key.split(":")[0]))

    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    print(f"bench/ingest.py: {', '.join(r.label for r in receivers)}; "
          f"{', '.join(d.description + f' ({d.nbytes / 1e6:.0f} MB)' for d in datasets.values())}; "
          f"associations {args.assocs}; repeat {args.repeat}; PDU {args.pdu or 'receiver defaults'}; "
          f"{os.cpu_count()} CPUs; git {git}; node code {args.code}", flush=True)
    if args.warmup:
        first = next(iter(datasets.values()))
        print(f"warm-up (not measured): each receiver once, {first.name} x1", flush=True)
        for rc in receivers:
            measure(rc, first, 1, -1, keep=False)
    results: list[RunResult] = []
    errors: list[str] = []
    total = args.repeat * len(datasets) * len(args.assocs) * len(receivers)
    t_start = time.monotonic()
    for rep in range(args.repeat):
        for dname, ds in datasets.items():
            for a in args.assocs:
                shift = (rep + len(results)) % len(receivers)
                for rc in receivers[shift:] + receivers[:shift]:
                    try:
                        r = measure(rc, ds, a, rep, args.keep)
                    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
                        errors.append(f"{rc.label} {dname} x{a} rep {rep + 1}: {exc}")
                        print(f"[-/{total}] rep {rep + 1} {rc.label:<11} {dname:<5} x{a}: ERROR {exc}",
                              flush=True)
                        continue
                    results.append(r)
                    flag = "" if r.ok else f"  MISSING {r.expected - r.arrived}"
                    print(f"[{len(results)}/{total}] rep {rep + 1} {rc.label:<11} {dname:<5} x{a}: "
                          f"{r.seconds:6.2f}s {r.ips:7.1f} inst/s  CPU {r.cpu_s:5.2f}s  "
                          f"storescu {r.sender_cpu_s:5.2f}s  other {r.background_cpu_s:5.2f}s  "
                          f"arrived {r.arrived}/{r.expected}{flag}"
                          + (f"  assoc/process {r.spread}" if r.spread else ""), flush=True)
                    for prob in r.sender_failures + r.problems:
                        print(f"    ! {prob}", flush=True)
    print(f"\n{len(results)} runs in {time.monotonic() - t_start:.0f}s\n")
    print_table(results, receivers, datasets, args.assocs, args.repeat)

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_json = args.out / f"ingest-{stamp}.json"
    out_json.write_text(json.dumps({
        "argv": sys.argv, "git": git, "node_code": args.code, "cpus": os.cpu_count(),
        "runs": [dict(r.__dict__, ips=r.ips, mbps=r.mbps, ok=r.ok) for r in results],
    }, indent=2))
    if not args.live_code and code_hash() != args.code.split()[0]:
        print(f"\nnote: the node's sources in the working tree changed during the run; "
              f"every run measured the snapshot {args.code.split()[0]}")
    problems = sorted({p for r in results for p in r.problems})
    if problems:
        print("\nproblems seen in receiver logs or counts:")
        for p in problems:
            print(f"  {p}")
    print(f"\nraw results: {out_json}")
    missing = [r for r in results if not r.ok]
    if errors:
        print(f"\nFAILED: {len(errors)} run(s) could not be measured:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
    if missing:
        print(f"\nFAILED: {len(missing)} run(s) lost instances or had sender errors:", file=sys.stderr)
        for r in missing:
            print(f"  {r.label} {r.dataset} x{r.assocs} rep {r.rep + 1}: arrived {r.arrived}/{r.expected} "
                  f"{'; '.join(r.sender_failures)}", file=sys.stderr)
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        code = main()
    except BenchError as exc:
        print(f"bench/ingest.py: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything started", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all()
    sys.exit(code)
