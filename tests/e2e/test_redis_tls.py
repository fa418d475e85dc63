"""Redis with TLS and a password (``rediss://``, issue 6): the node and a worker verify the
server against ``queue.tls_ca``; with the wrong CA nothing is handed over, and the study
waits COMPLETE in the journal instead."""
from __future__ import annotations

import subprocess
import time

import pytest

from tests.certs import make_pki
from tests.conftest import free_port
from tests.nodeproc import NodeProcess, WorkerProcess

from .conftest import quick
from .test_routing import send, small_study

pytestmark = pytest.mark.slow


@pytest.fixture
def tls_redis(tmp_path):
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
         "--tls-ca-cert-file", str(pki.ca_cert), "--tls-auth-clients", "no",
         "--requirepass", "tls-s3cret", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    assert proc.poll() is None, "redis-server did not start with TLS"
    yield pki, f"rediss://:tls-s3cret@localhost:{port}/0"
    proc.terminate()
    proc.wait(10)


def test_rediss_with_the_right_ca_carries_studies(tmp_path, tls_redis, dcmtk_env):
    pki, url = tls_redis
    node = NodeProcess(tmp_path, command="node", sections=quick(tmp_path, queue={"broker_url": url, "tls_ca": str(pki.ca_cert)}))
    worker = WorkerProcess(node)
    try:
        node.start(timeout=60)
        worker.start()
        send(node.port, small_study(tmp_path / "s"), "WARD_CT", dcmtk_env)
        [study] = node.wait_for(lambda s: s and s[0]["state"] == "IGNORED", "analysed through TLS Redis", timeout=90)
        assert "no model matched" in study["reason"]
        assert "tls-s3cret" not in node.log_text() + worker.log_text()
    finally:
        worker.stop()
        node.stop()


def test_rediss_with_a_ca_that_did_not_sign_the_server_hands_nothing_over(tmp_path, tls_redis, dcmtk_env):
    pki, url = tls_redis
    node = NodeProcess(tmp_path, command="node",
                       sections=quick(tmp_path, queue={"broker_url": url, "tls_ca": str(pki.other_ca_cert)}))
    try:
        node.start(timeout=60)
        send(node.port, small_study(tmp_path / "s"), "WARD_CT", dcmtk_env)
        [study] = node.wait_for(lambda s: s and s[0]["state"] == "COMPLETE", "COMPLETE")
        time.sleep(3)
        assert node.status()[0]["state"] == "COMPLETE"
        text = node.log_text()
        assert "broker unreachable" in text and "tls-s3cret" not in text
    finally:
        node.stop()
