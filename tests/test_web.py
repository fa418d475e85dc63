"""The HTTP side (issue 7), fast: a real journal in tmp_path, a real server on a free port,
real requests. The full round trip (pacs-ai run, a PACS, Chromium) is in
tests/e2e/test_status_page.py."""
from __future__ import annotations

import http.client
import io
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node import journal as j
from dicom_node.journal import InstanceRecord, Journal
from dicom_node.spool import Spool
from study_queue import metrics, web
from study_queue.celery_app import embedded_folders, make_app
from study_queue.settings import load_settings
from study_queue.web import Check, start_node_http, start_worker_http
from tests.conftest import free_port

TOKEN = "a-token-of-16+chars"


def record(journal: Journal, study_uid: str, n: int = 2, calling_ae: str = "CT_SCANNER") -> str:
    for i in range(n):
        journal.record_instance(
            InstanceRecord(study_uid, study_uid + ".1", f"{study_uid}.1.{i}", "1.2.840.10008.5.1.4.1.1.2",
                           "1.2.840.10008.1.2.1", "CT", f"{study_uid}/{study_uid}.1/{i}.dcm", 1000),
            calling_ae=calling_ae, peer_host="127.0.0.1", assoc_id=None,
        )
    return journal.study_key(study_uid)


def deliver(journal: Journal, key: str) -> None:
    for state in (j.COMPLETE, j.QUEUED):
        journal.transition(key, state)
    journal.transition(key, j.ANALYZED, "2 finding(s)", model="lung-nodule-ct", model_version="1.0.0",
                       outputs=["work/x/SR.dcm"])
    journal.record_delivery(key, 1, "PACS@127.0.0.1:4242", 1, "retry", 0.1, "refused")
    journal.record_delivery(key, 1, "PACS@127.0.0.1:4242", 2, "stored", 0.2, "{}")
    journal.transition(key, j.DELIVERED, "stored")


def key_image(path: Path, size: int = 96) -> None:
    """A small RGB Secondary Capture like dicom_node.key_images writes: grey with a yellow ring."""
    rgb = np.full((size, size, 3), 90, dtype=np.uint8)
    rgb[20:76, 20:24] = rgb[20:76, 72:76] = rgb[20:24, 20:76] = rgb[72:76, 20:76] = (255, 255, 0)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = web.SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = web.SECONDARY_CAPTURE, uid
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-12345"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def request(service, method: str, path: str, body: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def node(tmp_path):
    """A journal with a DELIVERED study (and its key image in the outbox) and a FAILED one,
    served by the node's server; ``make(**http)`` starts it with other [http] settings."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    journal = Journal(spool.journal_path)
    delivered = record(journal, "1.2.826.0.1.3680043.8.498.1")
    deliver(journal, delivered)
    failed = record(journal, "1.2.826.0.1.3680043.8.498.2", n=1)
    journal.transition(failed, j.COMPLETE)
    journal.transition(failed, j.QUEUED)
    journal.transition(failed, j.FAILED, "analysis: <b>unreadable</b> series")
    journal.open_association("a1", calling_ae="CT_SCANNER", called_ae="PACS_AI", peer_host="127.0.0.1", peer_port=1)
    journal.close_association("a1", "released", instances=3)
    journal.open_association("a2", calling_ae="CT_SCANNER", called_ae="PACS_AI", peer_host="127.0.0.1", peer_port=2)
    key_image(tmp_path / "outbox" / delivered / "run-1" / "KEY_001.dcm")
    started = []

    def make(sections: dict | None = None, **http_settings):
        s = load_settings(env={}, overrides={
            "node": {"spool": str(spool.root)}, "delivery": {"outbox": str(tmp_path / "outbox")},
            "http": {"port": free_port(), **http_settings}, **(sections or {})})
        service = start_node_http(s, journal, make_app(s), spool.root, checks=[Check("workers", lambda: None)])
        assert service is not None
        started.append(service)
        return service

    make.journal, make.spool, make.delivered, make.failed = journal, spool, delivered, failed
    yield make
    for service in started:
        service.stop()
    journal.close()


def test_healthz_and_readyz(node):
    service = node()
    assert request(service, "GET", "/healthz")[::2] == (200, b"ok\n")
    status, _, body = request(service, "GET", "/readyz")
    assert (status, body) == (200, b"ready\n")
    assert not list(node.spool.tmp.iterdir())  # the probe file is gone


def test_readyz_names_an_unwritable_spool(node):
    service = node()
    node.spool.tmp.rmdir()
    node.spool.tmp.write_text("not a folder")  # root ignores permissions; a file in the way does not
    status, _, body = request(service, "GET", "/readyz")
    assert status == 503
    [line] = body.decode().splitlines()
    assert line.startswith("spool: cannot write in ") and "Not a directory" in line


def test_readyz_names_an_unreachable_broker(node):
    closed = free_port()
    service = node(sections={"queue": {"broker_url": f"redis://:s3cret@127.0.0.1:{closed}/0"}})
    t0 = time.monotonic()
    status, _, body = request(service, "GET", "/readyz")
    assert status == 503 and time.monotonic() - t0 < 10
    lines = body.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("broker: unreachable"), lines
    assert "s3cret" not in body.decode()


def test_readyz_lists_every_failing_check(node, tmp_path):
    s = load_settings(env={}, overrides={"node": {"spool": str(node.spool.root)}, "http": {"port": free_port()}})
    service = start_node_http(s, node.journal, make_app(s), node.spool.root, checks=[
        Check("workers", lambda: "worker child not running, being restarted: inference (exit status -9)"),
        Check("node", lambda: "stopping")])
    try:
        status, _, body = request(service, "GET", "/readyz")
    finally:
        service.stop()
    assert status == 503
    assert body.decode().splitlines() == [
        "workers: worker child not running, being restarted: inference (exit status -9)", "node: stopping"]


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text exposition."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted(p for p in re.findall(r'\w+="[^"]*"', m.group(2) or "")))
            if got == want:
                return float(m.group(3))
    return None


def test_metrics_from_the_journal(node):
    service = node()
    node.journal.record_rejected_association(calling_ae="INTRUDER", called_ae="PACS_AI", peer_host="10.0.0.9",
                                                peer_port=5000, reason="calling-AE-title-not-recognized (wrong address)")
    status, headers, body = request(service, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    text = body.decode()
    assert sample(text, "pacs_ai_studies", state="DELIVERED") == 1.0
    assert sample(text, "pacs_ai_studies", state="FAILED") == 1.0
    for state in j.STATES:  # every state, zeros included
        assert sample(text, "pacs_ai_studies", state=state) is not None, state
    assert sample(text, "pacs_ai_associations_total", outcome="released") == 1.0
    assert sample(text, "pacs_ai_associations_total", outcome="rejected: calling-AE-title-not-recognized") == 1.0
    assert sample(text, "pacs_ai_associations_open") == 1.0
    assert sample(text, "pacs_ai_instances_received_total") == 3.0
    assert sample(text, "pacs_ai_received_bytes_total") == 3000.0
    assert sample(text, "pacs_ai_delivery_attempts_total", destination="PACS@127.0.0.1:4242", outcome="stored") == 1.0
    assert sample(text, "pacs_ai_delivery_attempts_total", destination="PACS@127.0.0.1:4242", outcome="retry") == 1.0
    assert sample(text, "pacs_ai_queue_depth", queue="inference") == 0.0
    assert sample(text, "pacs_ai_stage_seconds_count", stage="total") == 1.0
    assert sample(text, "pacs_ai_stage_seconds_count", stage="receive") == 2.0  # both studies completed
    assert sample(text, "pacs_ai_stage_seconds_count", stage="analysis") == 1.0  # the failed one never ended it
    assert sample(text, "pacs_ai_journal_up") == 1.0 and sample(text, "pacs_ai_broker_up") == 1.0
    assert sample(text, "pacs_ai_broker_messages", queue="inference") == 0.0
    assert sample(text, "pacs_ai_info", role="node", version=sample_version(text)) == 1.0
    assert node.delivered not in text and "1.2.826.0.1.3680043.8.498" not in text  # no keys, no UIDs


def sample_version(text: str) -> str:
    return re.search(r'pacs_ai_info\{role="node",version="([^"]*)"\}', text).group(1)


def test_stage_histograms_count_each_run_once_and_again_after_a_restart(node):
    collector = metrics.NodeCollector(node.journal.path)

    def counts(c):
        fam = next(f for f in c.collect() if f.name == "pacs_ai_stage_seconds")
        return {s.labels["stage"]: s.value for s in fam.samples if s.name.endswith("_count")}

    first = counts(collector)
    assert first == {"receive": 2, "queued": 2, "analysis": 1, "delivery": 1, "total": 1}
    assert counts(collector) == first  # nothing new: nothing counted twice
    key = record(node.journal, "1.2.826.0.1.3680043.8.498.3")
    deliver(node.journal, key)
    second = counts(collector)
    assert second == {k: v + 1 for k, v in first.items()}
    assert counts(metrics.NodeCollector(node.journal.path)) == second  # a restarted node reads the same


def test_unknown_paths_are_404(node):
    service = node()
    for path in ("/nope", "/metrics/x", "/thumb", "/retry", "/index.html", "/metrics/", "/healthz/x"):
        status, _, body = request(service, "GET", path)
        assert (status, body) == (404, b"not found\n"), path
    assert request(service, "POST", "/metrics", body="")[0] == 404
    assert request(service, "POST", "/retry/../../etc", body="")[0] == 404


def test_thumbnail_is_a_small_png_of_the_key_image(node):
    service = node()
    status, headers, body = request(service, "GET", f"/thumb/{node.delivered}/1/KEY_001.png")
    assert status == 200 and headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    assert max(image.shape[:2]) <= web.THUMB_PX
    yellow = (image[..., 0] > 200) & (image[..., 1] > 200) & (image[..., 2] < 60)
    assert yellow.sum() > 50
    assert b"Doe" not in body and b"PID-12345" not in body  # pixels only, no DICOM header


def test_thumbnail_urls_cannot_leave_the_outbox(node, tmp_path):
    service = node()
    secret = tmp_path / "secret.dcm"
    key_image(secret)
    link = tmp_path / "outbox" / node.delivered / "run-1" / "KEY_002.dcm"
    link.symlink_to(secret)  # a link out of the outbox is not followed
    key = node.delivered
    for path in (
        f"/thumb/{key}/1/KEY_002.png",
        f"/thumb/{key}/1/../../../secret.png",
        f"/thumb/{key}/1/%2e%2e%2fsecret.png",
        f"/thumb/{key}/1/KEY_001.dcm",
        f"/thumb/{key}/1/KEY_1.png",
        f"/thumb/{key}/0/KEY_001.png",
        f"/thumb/{key}/-1/KEY_001.png",
        f"/thumb/{key.upper()}/1/KEY_001.png",
        f"/thumb/../{key}/1/KEY_001.png",
        "/thumb/..%2f..%2fspool/1/KEY_001.png",
        f"/thumb/{key}/1/KEY_001.png/..",
        f"/thumb/{key}/99/KEY_001.png",
        f"/thumb/{'0' * 16}/1/KEY_001.png",
    ):
        status, _, body = request(service, "GET", path)
        assert status == 404 and b"\n" == body[-1:] and body.count(b"\n") == 1, (path, status, body)


def test_status_page_lists_studies_escaped_with_thumbnails(node):
    service = node(token=TOKEN)
    status, headers, body = request(service, "GET", "/")
    page = body.decode()
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["content-security-policy"]
    assert f"<tr data-study-key='{node.delivered}'>" in page
    assert f"src='/thumb/{node.delivered}/1/KEY_001.png'" in page
    assert "&lt;b&gt;unreadable&lt;/b&gt;" in page and "<b>unreadable" not in page
    assert f"action='/retry/{node.failed}'" in page and "name=token" in page
    assert TOKEN not in page  # the page never holds the token
    assert "lung-nodule-ct 1.0.0" in page
    script = re.search(r"<script>(.*)</script>", page).group(1)
    import base64
    import hashlib

    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in headers["content-security-policy"]  # the CSP allows the refresh script


def test_status_page_without_a_token_has_no_replay_form(node):
    page = request(node(), "GET", "/")[2].decode()
    assert "Replay from this page is off" in page and "<form" not in page


def test_replay_needs_the_configured_token(node):
    service = node()  # no http.token
    status, _, body = request(service, "POST", f"/retry/{node.failed}", body=f"token={TOKEN}")
    assert (status, body) == (403, b"replay from the status page is off: http.token is not set\n")
    service = node(token=TOKEN)
    for form in ("token=wrong-token-of-enough-length", "", "token=", f"token={TOKEN}x", f"tok={TOKEN}"):
        status, _, body = request(service, "POST", f"/retry/{node.failed}", body=form)
        assert (status, body) == (403, b"wrong token\n"), form
    assert node.journal.get(node.failed).state == j.FAILED


def test_replay_with_the_token_queues_the_study_and_redirects(node):
    service = node(token=TOKEN)
    status, headers, body = request(service, "POST", f"/retry/{node.failed}", body=f"token={TOKEN.replace('+', '%2B')}")
    assert status == 303, body
    assert re.fullmatch(r"/\?m=[\w-]+", headers["location"])
    study = node.journal.get(node.failed)
    assert study.state == j.QUEUED and "replayed from the status page" in study.reason
    messages = os.listdir(embedded_folders(node.spool.root)["messages"])
    assert [n for n in messages if n.endswith(".inference.msg")]
    page = request(service, "GET", headers["location"])[2].decode()
    assert f"study {node.failed}: analysis queued" in page
    # Twice: the study is no longer FAILED, one line says so.
    status, _, body = request(service, "POST", f"/retry/{node.failed}", body=f"token={TOKEN.replace('+', '%2B')}")
    assert status == 409 and body.decode().count("\n") == 1 and "QUEUED" in body.decode()
    status, _, body = request(service, "POST", f"/retry/{'f' * 16}", body=f"token={TOKEN.replace('+', '%2B')}")
    assert (status, body) == (404, f"no study {'f' * 16}\n".encode())


def test_a_failing_handler_answers_one_line_and_logs(node, monkeypatch, caplog):
    service = node()

    def broken(message=None):
        raise RuntimeError("boom /secret/path")

    monkeypatch.setattr(service.site, "page", broken)
    status, _, body = request(service, "GET", "/")
    assert (status, body) == (500, b"internal error (see the log)\n")
    assert "Traceback" not in body.decode() and "boom" not in body.decode()
    assert any("failed" in r.getMessage() for r in caplog.records if r.name == "pacs_ai.web")


def test_port_zero_disables_and_a_taken_port_is_one_logged_line(node, tmp_path, caplog):
    s = load_settings(env={}, overrides={"node": {"spool": str(node.spool.root)}, "http": {"port": 0}})
    assert start_node_http(s, node.journal, make_app(s), node.spool.root) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        s.http.port = taken.getsockname()[1]
        assert start_node_http(s, node.journal, make_app(s), node.spool.root) is None
    [line] = [r.getMessage() for r in caplog.records if r.name == "pacs_ai.web"]
    assert line.startswith("http.port: cannot listen on 127.0.0.1:") and "\n" not in line


# -- the worker --------------------------------------------------------------------------------
RESULT = {
    "study_key": "0123456789abcdef", "run": 1, "outcome": "analyzed",
    "engines": {"lung-nodule-ct": "onnxruntime", "lung-triage-ct": "onnxruntime"},
    "timings_s": {"scan": 0.03, "load": 0.13, "preprocess:lung-nodule-ct": 0.08, "infer:lung-nodule-ct": 1.04,
                  "postprocess:lung-nodule-ct": 0.1, "preprocess:lung-triage-ct": 0.04,
                  "infer:lung-triage-ct": 0.41, "postprocess:lung-triage-ct": 0.0, "total": 1.84,
                  "report:key_images": 0.59, "report:sr": 0.18, "report:validate": 0.14, "worker_total": 2.9},
}


def test_observe_result_counts_outcomes_and_timings_once():
    reg = metrics.WORKER_REGISTRY
    before = reg.get_sample_value("pacs_ai_analyses_total", {"outcome": "analyzed"}) or 0.0
    infer = reg.get_sample_value("pacs_ai_inference_seconds_count",
                                 {"model": "lung-nodule-ct", "engine": "onnxruntime"}) or 0.0
    report = reg.get_sample_value("pacs_ai_worker_stage_seconds_sum", {"stage": "report"}) or 0.0
    result = {**RESULT, "timings_s": {**RESULT["timings_s"], "worker_total": 2.9 + time.time() % 1}}
    metrics.observe_result(result)
    metrics.observe_result(result)  # the same result handed on again: not counted twice
    assert reg.get_sample_value("pacs_ai_analyses_total", {"outcome": "analyzed"}) == before + 1
    assert reg.get_sample_value("pacs_ai_inference_seconds_count",
                                {"model": "lung-nodule-ct", "engine": "onnxruntime"}) == infer + 1
    assert reg.get_sample_value("pacs_ai_worker_stage_seconds_sum", {"stage": "report"}) == pytest.approx(
        report + 0.59 + 0.18 + 0.14)
    errors = reg.get_sample_value("pacs_ai_analyses_total", {"outcome": "error"}) or 0.0
    metrics.observe_result({"study_key": "0123456789abcdef", "run": 1, "outcome": "error", "reason": "x"})
    assert reg.get_sample_value("pacs_ai_analyses_total", {"outcome": "error"}) == errors + 1


def test_worker_server(tmp_path, monkeypatch):
    from study_queue import worker

    monkeypatch.setattr(worker, "_models", {})
    s = load_settings(env={}, overrides={"node": {"spool": str(tmp_path / "spool")},
                                         "http": {"worker_port": free_port()}})
    Spool(s.node.spool).prepare()
    metrics.observe_result({**RESULT, "timings_s": {**RESULT["timings_s"], "worker_total": time.time()}})
    service = start_worker_http(s, make_app(s), Path(s.node.spool))
    try:
        assert request(service, "GET", "/healthz")[::2] == (200, b"ok\n")
        status, _, body = request(service, "GET", "/readyz")
        assert (status, body) == (503, b"models: not loaded yet\n")
        text = request(service, "GET", "/metrics")[2].decode()
        assert sample(text, "pacs_ai_inference_seconds_count", model="lung-nodule-ct", engine="onnxruntime") >= 1
        assert sample(text, "pacs_ai_info", role="worker", version=re.search(
            r'pacs_ai_info\{role="worker",version="([^"]*)"\}', text).group(1)) == 1.0
        assert request(service, "GET", "/")[0] == 404  # the page is the node's
        assert request(service, "GET", "/thumb/0123456789abcdef/1/KEY_001.png")[0] == 404
        assert request(service, "POST", "/retry/0123456789abcdef", body=f"token={TOKEN}")[0] == 404
    finally:
        service.stop()
