"""Routing rules (issue 7): which studies are analysed, and urgent ones first."""
from __future__ import annotations

import subprocess

import pytest
from pydicom.uid import generate_uid

from tests.factory import ct_dataset
from tests.nodeproc import NodeProcess, WorkerProcess

from .conftest import quick

pytestmark = pytest.mark.slow


def small_study(folder, n: int = 3) -> list:
    """A 3-slice CT study: too few slices for any model, so a worker ends it IGNORED quickly."""
    study = generate_uid()
    folder.mkdir(parents=True)
    files = []
    for i in range(n):
        path = folder / f"{i}.dcm"
        ct_dataset(study, index=i).save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send(port: int, files, aet: str, env) -> None:
    out = subprocess.run(["storescu", "-aet", aet, "-aec", "PACS_AI", "127.0.0.1", str(port), *map(str, files)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


ROUTES = [{"name": "emergency", "calling_ae": "ER_CT", "priority": "urgent"},
          {"name": "ct", "modality": "CT"}]


def test_an_urgent_study_is_analysed_before_the_studies_queued_before_it(tmp_path, dcmtk_env):
    """Three ward studies wait in the queue; two emergency studies arrive last; the worker
    that starts then takes both emergency studies first (their own queue, always asked first:
    kombu's default round robin between queues would take a ward study second)."""
    node = NodeProcess(tmp_path, command="node", sections=quick(tmp_path))
    with open(node.config, "a") as f:
        for route in ROUTES:
            f.write("\n[[routes]]\n" + "".join(f'{k} = "{v}"\n' for k, v in route.items()))
    worker = WorkerProcess(node)
    try:
        node.start(timeout=60)
        for n in range(3):
            send(node.port, small_study(tmp_path / f"ward{n}"), "WARD_CT", dcmtk_env)
        node.wait_for(lambda s: len(s) == 3 and all(x["state"] == "QUEUED" for x in s), "3 ward studies QUEUED")
        for n in range(2):
            send(node.port, small_study(tmp_path / f"er{n}"), "ER_CT", dcmtk_env)
        node.wait_for(lambda s: len(s) == 5 and all(x["state"] == "QUEUED" for x in s), "5 studies QUEUED")
        worker.start()
        studies = node.wait_for(lambda s: all(x["state"] == "IGNORED" for x in s), "all analysed", timeout=90)
        finished = sorted(studies, key=lambda s: s["updated_at"])
        order = [s["calling_ae"] for s in finished]
        assert order[:2] == ["ER_CT", "ER_CT"], order
        assert "no model matched" in finished[0]["reason"]
    finally:
        worker.stop()
        node.stop()


def test_a_study_no_route_takes_is_ignored_without_a_worker(tmp_path, dcmtk_env):
    node = NodeProcess(tmp_path, command="node", sections=quick(tmp_path))
    with open(node.config, "a") as f:
        f.write('\n[[routes]]\nname = "emergency only"\ncalling_ae = "ER_CT"\n')
        f.write('\n[[routes]]\nname = "no MR"\nmodality = "MR"\naction = "ignore"\n')
    try:
        node.start(timeout=60)
        send(node.port, small_study(tmp_path / "ward"), "WARD_CT", dcmtk_env)
        [study] = node.wait_for(lambda s: s and s[0]["state"] == "IGNORED", "IGNORED")
        assert study["reason"] == "no [[routes]] entry matched"
        assert [h["to_state"] for h in node.status(study["study_key"])["history"]] == ["RECEIVING", "COMPLETE", "IGNORED"]
    finally:
        node.stop()
