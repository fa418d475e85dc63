"""Metrics, health and the status page end to end (issue 7): ``pacs-ai run`` with its HTTP
servers, DCMTK's storescu as the modality, a pynetdicom storage SCP as the PACS, and headless
Chromium as the person looking at the page.

One node run, two studies: the first is delivered (metrics of node and worker, the page
with its key-image thumbnail, rendered and screenshotted); the second finds the PACS down
and, with ``delivery.max_attempts = 1``, ends FAILED, and is replayed through the page's
button: refused with a wrong token, accepted with the right one, then DELIVERED.
"""
from __future__ import annotations

import http.client
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from study_queue.cli import main
from tests.conftest import free_port
from tests.nodeproc import NodeProcess

from .conftest import StorageSCP, phantom_files, quick
from .test_faults import peers, srs, storescu, wait_until

pytestmark = pytest.mark.slow

TOKEN = "a-token-of-16+chars"


def get(port: int, path: str, method: str = "GET", body: str | None = None) -> tuple[int, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def answers(port: int, path: str, status: int = 200):
    def probe():
        try:
            got = get(port, path)
        except OSError:
            return None
        return got if got[0] == status else None
    return probe


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Chromium is not installed: the README's test command installs it")
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--no-first-run", *args],
        capture_output=True, text=True, timeout=180, check=False)


def patient_values(folder: Path) -> list[str]:
    header = dcmread(phantom_files(folder)[0], stop_before_pixels=True)
    name = header.PatientName
    values = [str(name), str(header.PatientID), str(header.get("PatientBirthDate", "")), str(header.StudyInstanceUID)]
    values += [part for part in (name.family_name, name.given_name) if len(part) > 3]
    return [v for v in values if v]


def test_metrics_status_page_and_replay(tmp_path, phantom, dcmtk_env):
    http_port, worker_port, pacs_port = free_port(), free_port(), free_port()
    sections = quick(tmp_path, http={"port": http_port, "worker_port": worker_port, "token": TOKEN},
                     delivery={"max_attempts": 1})
    node = NodeProcess(tmp_path, command="run", sections=sections, peers=peers(pacs_port))
    pacs = StorageSCP(pacs_port).start()
    try:
        node.start(timeout=90)
        wait_until(answers(http_port, "/healthz"), "the node's /healthz", timeout=30, node=node)
        wait_until(answers(worker_port, "/readyz"), "the inference worker's /readyz (models loaded)",
                   timeout=120, node=node)
        wait_until(answers(http_port, "/readyz"), "the node's /readyz", timeout=30, node=node)

        # -- the first study: delivered -----------------------------------------------------------
        storescu(node.port, phantom_files(phantom), dcmtk_env)
        [study] = node.wait_for(lambda s: s and s[0]["state"] == "DELIVERED", "DELIVERED", timeout=180)
        key = study["study_key"]
        assert srs(pacs)

        status, headers, text = get(http_port, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert 'pacs_ai_studies{state="DELIVERED"} 1.0' in text
        assert f'pacs_ai_delivery_attempts_total{{destination="CT_SCANNER@127.0.0.1:{pacs_port}",outcome="stored"}} 1.0' in text
        assert 'pacs_ai_stage_seconds_count{stage="total"} 1.0' in text
        assert re.search(r'^pacs_ai_instances_received_total 60\.0$', text, re.MULTILINE)
        assert re.search(r'^pacs_ai_associations_total\{outcome="released"\} [1-9]', text, re.MULTILINE), text
        assert key not in text

        worker_text = get(worker_port, "/metrics")[2]
        assert re.search(r'^pacs_ai_inference_seconds_count\{engine="\w+",model="lung-nodule-ct"\} 1\.0$',
                         worker_text, re.MULTILINE), worker_text
        assert re.search(r'^pacs_ai_inference_seconds_bucket\{engine="\w+",le="\+Inf",model="lung-triage-ct"\} 1\.0$',
                         worker_text, re.MULTILINE)
        assert 'pacs_ai_analyses_total{outcome="analyzed"} 1.0' in worker_text
        assert 'pacs_ai_worker_stage_seconds_count{stage="report"} 1.0' in worker_text
        assert re.search(r'^pacs_ai_models_loaded\{engine="\w+",model="lung-nodule-ct",version="[^"]+"\} 1\.0$',
                         worker_text, re.MULTILINE)

        # -- the page, as a browser renders it -----------------------------------------------------
        url = f"http://127.0.0.1:{http_port}/"
        dom = chromium(tmp_path, "--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        row = re.search(rf'<tr data-study-key="{key}">.*?</tr>', html, re.DOTALL)
        assert row, html[-3000:]
        assert "DELIVERED" in row.group(0) and "lung-nodule-ct" in row.group(0)
        thumbs = re.findall(rf'<img src="(/thumb/{key}/1/KEY_\d{{3}}\.png)"', row.group(0))
        assert thumbs, row.group(0)
        png = tmp_path / "page.png"
        shot = chromium(tmp_path, f"--screenshot={png}", url)
        assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
        pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
        r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
        # The key images' outline is yellow (dicom_node.key_images.OUTLINE_RGB); the page itself
        # has no yellow, and a thumbnail's greys and white legend are never saturated.
        yellow = (r > 150) & (g > 150) & (np.abs(r - g) < 40) & (b < 0.55 * np.minimum(r, g))
        assert yellow.sum() >= 20, f"{yellow.sum()} yellow pixels in the screenshot"
        status, headers, _ = get(http_port, thumbs[0])
        assert status == 200 and headers["content-type"] == "image/png"

        # -- the second study: the PACS is down, FAILED after one attempt, replayed from the page --
        pacs.stop()
        second = tmp_path / "second"
        assert main(["phantom", "--out", str(second), "--seed", "5", "--slices", "60", "--nodules", "2"]) == 0
        storescu(node.port, phantom_files(second), dcmtk_env)
        studies = node.wait_for(lambda s: any(x["state"] == "FAILED" for x in s), "the second study FAILED",
                                timeout=180)
        [failed] = [s for s in studies if s["state"] == "FAILED"]
        other = failed["study_key"]
        assert other != key and "in 1 attempts" in failed["reason"]

        page = get(http_port, "/")[2]
        assert f"action='/retry/{other}'" in page and TOKEN not in page
        status, _, body = get(http_port, f"/retry/{other}", "POST", "token=not-the-right-token")
        assert (status, body) == (403, "wrong token\n")
        assert node.study(other)["study"]["state"] == "FAILED"

        pacs = StorageSCP(pacs_port).start()
        status, headers, body = get(http_port, f"/retry/{other}", "POST", "token=" + TOKEN.replace("+", "%2B"))
        assert status == 303, body
        assert f"study {other}: delivery queued" in get(http_port, headers["location"])[2]
        node.wait_for(lambda s: all(x["state"] == "DELIVERED" for x in s) and len(s) == 2,
                      "the replayed study DELIVERED", timeout=120)
        assert len(srs(pacs)) == 1  # the second study's report, on the PACS that came back
        text = get(http_port, "/metrics")[2]
        assert 'pacs_ai_studies{state="DELIVERED"} 2.0' in text and 'pacs_ai_studies{state="FAILED"} 0.0' in text
        assert f'pacs_ai_delivery_attempts_total{{destination="CT_SCANNER@127.0.0.1:{pacs_port}",outcome="failed"}} 1.0' in text
        assert f'pacs_ai_delivery_attempts_total{{destination="CT_SCANNER@127.0.0.1:{pacs_port}",outcome="stored"}} 2.0' in text
        assert "replay study=" + other in node.log_text()  # the audit line

        # -- no patient data in what the page serves ---------------------------------------------
        final = chromium(tmp_path, "--dump-dom", url).stdout + get(http_port, "/")[2]
        assert f'data-study-key="{other}"' in final
        for value in patient_values(phantom) + patient_values(second):
            assert value not in final, f"patient data {value!r} on the status page"
    finally:
        pacs.stop()
        node.stop()
