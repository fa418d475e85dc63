"""Orthanc as the PACS, end to end (issue 5): a phantom study is uploaded to Orthanc, Orthanc
C-STOREs it to the node as a hospital routing rule would, and the SR, key images and KOS
come back into Orthanc under the same study, with the finding where the phantom's truth says.

Run with the embedded broker (``pacs-ai run``) and with Redis and two ``pacs-ai worker``
processes (``pacs-ai node`` + workers), the two deployments the README describes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from pydicom import dcmread

from tests.conftest import free_port
from tests.nodeproc import NodeProcess, WorkerProcess
from tests.orthanc import OrthancProcess
from tests.redisproc import RedisProcess

from .conftest import assert_finds_truth, phantom_files, quick, read, truth

pytestmark = pytest.mark.slow


def _orthanc_round_trip(orthanc: OrthancProcess, node: NodeProcess, phantom) -> dict:
    study_uid = str(dcmread(phantom_files(phantom)[0], stop_before_pixels=True).StudyInstanceUID)
    orthanc.upload(phantom_files(phantom))
    study_id = orthanc.study_id_for_uid(study_uid)
    answer = orthanc.send_to_modality("pacsai", [study_id])
    assert answer["InstancesCount"] == 60 and answer["FailedInstancesCount"] == 0
    [sr_series] = orthanc.wait_for_series(study_uid, "SR", timeout=90)
    [sr_instance] = orthanc.instances_of_series(sr_series["ID"])
    sr = read(orthanc.instance_file(sr_instance["ID"]))
    assert sr.StudyInstanceUID == study_uid and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert_finds_truth(sr, truth(phantom))
    key_series = orthanc.wait_for_series(study_uid, "OT", timeout=30)  # Secondary Capture key images
    keys = [read(orthanc.instance_file(i["ID"])) for s in key_series for i in orthanc.instances_of_series(s["ID"])]
    assert keys and all(k.BurnedInAnnotation == "YES" and k.StudyInstanceUID == study_uid for k in keys)
    [kos_series] = orthanc.wait_for_series(study_uid, "KO", timeout=30)
    studies = node.wait_for(lambda s: len(s) == 1 and s[0]["state"] == "DELIVERED", "DELIVERED")
    [study] = studies
    assert study["destination"].startswith("ORTHANC@127.0.0.1:")
    # Exactly one copy of each output reached Orthanc: one SR, and as many key images as the journal sent.
    assert len(orthanc.instances_of_series(sr_series["ID"])) == 1
    assert len(study["outputs"]) == 2 + len(keys)  # SR, KOS and the key images
    return study


def sr_uid(orthanc: OrthancProcess, phantom) -> str:
    study_uid = str(dcmread(phantom_files(phantom)[0], stop_before_pixels=True).StudyInstanceUID)
    [series] = orthanc.wait_for_series(study_uid, "SR", timeout=5)
    [instance] = orthanc.instances_of_series(series["ID"])
    return str(read(orthanc.instance_file(instance["ID"])).SOPInstanceUID)


def _orthanc(tmp_path, node_port: int) -> OrthancProcess:
    return OrthancProcess(tmp_path / "orthanc", modalities={"pacsai": ("PACS_AI", "127.0.0.1", node_port)}).start()


def test_orthanc_sends_a_study_and_gets_the_report_back_embedded_broker(tmp_path, phantom):
    node_port = free_port()
    orthanc = _orthanc(tmp_path, node_port)
    node = NodeProcess(tmp_path, port=node_port, command="run", sections=quick(tmp_path),
                       peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}])
    try:
        node.start(timeout=60)
        study = _orthanc_round_trip(orthanc, node, phantom)
        detail = node.status(study["study_key"])
        states = [h["to_state"] for h in detail["history"]]
        assert states == ["RECEIVING", "COMPLETE", "QUEUED", "ANALYZED", "DELIVERED"], states
        outbox = tmp_path / "outbox" / study["study_key"] / "run-1"
        assert (outbox / "SR.dcm").is_file() and (outbox / "findings.json").is_file()
        prov = json.loads((outbox / "provenance.json").read_text())  # what ran, on what, and what the PACS said
        assert prov["state"] == "DELIVERED" and prov["deliveries"][-1]["outcome"] == "stored"
        [nodule_model] = [m for m in prov["provenance"]["models"] if m["name"] == "lung-nodule-ct"]
        assert len(nodule_model["onnx_sha256"]) == 64 and nodule_model["engine"] == "onnxruntime"
        assert len(prov["provenance"]["input_sop_instance_uids"]) == 60
        assert prov["output_uids"]["SR.dcm"] == str(sr_uid(orthanc, phantom))
        # A routing rule that forwards the whole study again, our outputs included: nothing new.
        study_id = orthanc.study_id_for_uid(dcmread(phantom_files(phantom)[0], stop_before_pixels=True).StudyInstanceUID)
        answer = orthanc.send_to_modality("pacsai", [study_id])
        assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] > 60
        time.sleep(3)  # three idle timeouts
        again = node.status(study["study_key"])
        assert (again["study"]["state"], again["study"]["run"]) == ("DELIVERED", 1)
        assert [h["to_state"] for h in again["history"]] == states
    finally:
        node.stop()
        orthanc.kill9()
    assert node.stop() is None


def test_orthanc_round_trip_on_redis_with_two_workers(tmp_path, phantom):
    redis = RedisProcess(tmp_path / "redis", password="s3cret-pw").start()  # a password, as in production
    node_port = free_port()
    orthanc = _orthanc(tmp_path, node_port)
    node = NodeProcess(tmp_path, port=node_port, command="node",
                       sections=quick(tmp_path, queue={"broker_url": redis.url}),
                       peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}])
    workers = [WorkerProcess(node, name=f"worker{i}") for i in (1, 2)]
    try:
        node.start(timeout=60)
        for w in workers:
            w.start()
        study = _orthanc_round_trip(orthanc, node, phantom)
        assert study["model"] == "lung-nodule-ct"
        assert all(w.alive() for w in workers)
        logs = node.log_text() + "".join(w.log_text() for w in workers)
        assert "s3cret-pw" not in logs and "redis://" in node.log_text()  # the broker is named, its password not
    finally:
        for w in workers:
            w.stop()
        node.stop()
        orthanc.kill9()
        redis.stop()


def test_a_pacs_that_refuses_our_ae_title_fails_the_study_with_its_reason_and_retry_delivers(tmp_path, phantom):
    """Orthanc without our AE title among its modalities rejects the association: FAILED with
    the PACS's words at once (no retry loop); once Orthanc knows us, ``pacs-ai retry`` delivers."""
    node_port = free_port()
    orthanc = OrthancProcess(tmp_path / "orthanc", modalities={"scanner": ("CT_SCANNER", "127.0.0.1", 4999)},
                             always_allow_store=False).start()
    node = NodeProcess(tmp_path, port=node_port, command="run",
                       sections=quick(tmp_path, delivery={"return_to": "ORTHANC"}),
                       peers=[{"ae_title": "CT_SCANNER", "host": "127.0.0.1", "port": 4999},
                              {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}])
    try:
        node.start(timeout=60)
        env_files = [str(p) for p in phantom_files(phantom)]
        sent = subprocess.run([sys.executable, "-m", "study_queue.cli", "send", *env_files,
                               "--to", f"PACS_AI@127.0.0.1:{node_port}", "--calling-ae", "CT_SCANNER"],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        [study] = node.wait_for(lambda s: len(s) == 1 and s[0]["state"] == "FAILED", "FAILED", timeout=90)
        assert "calling-AE-title-not-recognized" in study["reason"], study["reason"]
        assert study["attempts"] == 0  # refused at the first attempt, not retried
        orthanc.put_modality("pacsai", "PACS_AI", "127.0.0.1", node_port)
        retry = subprocess.run([sys.executable, "-m", "study_queue.cli", "retry", "--failed", "--config", str(node.config)],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert retry.returncode == 0 and "delivery queued" in retry.stdout, retry.stdout + retry.stderr
        node.wait_for(lambda s: s[0]["state"] == "DELIVERED", "DELIVERED after retry", timeout=60)
        study_uid = str(dcmread(phantom_files(phantom)[0], stop_before_pixels=True).StudyInstanceUID)
        assert orthanc.wait_for_series(study_uid, "SR", timeout=30)
    finally:
        node.stop()
        orthanc.kill9()
