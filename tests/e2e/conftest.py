"""Shared pieces of the end-to-end tests: a phantom study, a storage SCP standing in for a
PACS, and reading findings back out of an SR."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from study_queue.cli import main

# Quick settings for processes under test: studies complete 1 s after their last instance,
# a queued study nobody analyses is taken back after 3 s, deliveries retry after 0.5-2 s.
QUICK = {
    "queue": {"stale_after": 3.0},
    "delivery": {"backoff_initial": 0.5, "backoff_max": 2.0, "max_attempts": 4, "timeout": 10.0},
}


def quick(workdir: Path, **sections: dict) -> dict:
    out = {name: dict(values) for name, values in QUICK.items()}
    out["delivery"]["outbox"] = str(workdir / "outbox")
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


@pytest.fixture(scope="session")
def phantom(tmp_path_factory) -> Path:
    """A 60-slice synthetic chest CT with two nodules (one solid 11 mm) and truth.json."""
    out = tmp_path_factory.mktemp("phantom") / "study"
    assert main(["phantom", "--out", str(out), "--seed", "3", "--slices", "60", "--nodules", "2"]) == 0
    return out


def phantom_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def truth(folder: Path) -> list[dict]:
    return json.loads((folder / "truth.json").read_text())["nodules"]


class StorageSCP:
    """A pynetdicom storage SCP as the PACS: keeps every data set it is sent, by SOP Instance
    UID, and answers ``status`` (0x0000 unless a test says otherwise)."""

    def __init__(self, port: int, ae_title: str = "PACS", status: int = 0x0000) -> None:
        self.port = port
        self.ae_title = ae_title
        self.status = status
        self.received: dict[str, Dataset] = {}
        self.stores = 0  # C-STORE requests, repeats included
        self.callers: list[str] = []
        self.lock = threading.Lock()
        self.server = None

    def _on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.stores += 1
            self.callers.append(event.assoc.requestor.ae_title)
            if self.status == 0x0000:
                self.received[str(ds.SOPInstanceUID)] = ds
        return self.status

    def start(self) -> "StorageSCP":
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def of_modality(self, modality: str) -> list[Dataset]:
        with self.lock:
            return [ds for ds in self.received.values() if ds.Modality == modality]

    def __enter__(self) -> "StorageSCP":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sr_points(ds: Dataset) -> list[np.ndarray]:
    """The centroid (LPS mm) of every SCOORD3D in an SR's content tree."""
    points = []

    def walk(items):
        for item in items:
            if item.get("ValueType") == "SCOORD3D":
                coords = np.asarray(item.GraphicData, dtype=float).reshape(-1, 3)
                points.append(coords[:-1].mean(axis=0) if len(coords) > 1 else coords[0])
            walk(item.get("ContentSequence", []))

    walk(ds.get("ContentSequence", []))
    return points


def assert_finds_truth(sr: Dataset, nodules: list[dict], min_diameter: float = 8.0) -> None:
    """Every truth nodule of ``min_diameter`` mm or more has an SR outline centred within
    its radius (in-plane the outline's centroid, across slices the slice it lies on)."""
    points = sr_points(sr)
    assert points, "the SR has no SCOORD3D"
    for nodule in nodules:
        if nodule["diameter_mm"] < min_diameter:
            continue
        centre = np.asarray(nodule["center_lps_mm"])
        best = min(float(np.linalg.norm(p - centre)) for p in points)
        assert best <= nodule["diameter_mm"] / 2, (
            f"no finding within {nodule['diameter_mm'] / 2:.1f} mm of the {nodule['diameter_mm']:.1f} mm "
            f"nodule at {centre}: nearest {best:.1f} mm")


def read(path_or_bytes) -> Dataset:
    import io

    if isinstance(path_or_bytes, (bytes, bytearray)):
        return dcmread(io.BytesIO(path_or_bytes))
    return dcmread(path_or_bytes)
