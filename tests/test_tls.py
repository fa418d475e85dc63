"""DICOM TLS on ``pacs-ai node`` (PS3.15 B.1; DESIGN.md section 5, ``[node]
tls_cert``/``tls_key``/``tls_ca``), with certificates made by tests/certs.py.

The node is started for real (``pacs-ai node --config FILE``, two ingest
processes sharing the listening socket, so the TLS handshake runs in
``SharedSocketAssociationServer.get_request`` of a spawned child) and driven
by pynetdicom clients with an :class:`ssl.SSLContext`, and by DCMTK's
``echoscu``/``storescu`` with ``+tls``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from .certs import Pki, make_pki
from .factory import ct_dataset

CLI = [sys.executable, "-m", "study_queue.cli"]
SUCCESS = 0x0000


# -- fixtures and helpers ----------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}


@dataclass
class NodeRun:
    proc: subprocess.Popen[bytes]
    port: int
    spool: Path
    stderr_path: Path

    @property
    def log_path(self) -> Path:
        return self.spool / "logs" / "pacs-ai.log"

    def logs(self) -> str:
        text = self.stderr_path.read_text(errors="replace")
        if self.log_path.exists():
            text += self.log_path.read_text(errors="replace")
        return text

    def wait_for_log(self, needle: str, count: int = 1, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.stderr_path.read_text(errors="replace")
            if text.count(needle) >= count:
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"{count} x {needle!r} expected in the node's log within {timeout} s:\n{text}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                pytest.fail(f"pacs-ai node did not stop within {timeout} s of SIGTERM")
        return self.proc.returncode


@contextlib.contextmanager
def running_node(tmp_path: Path, port: int, pki: Pki, *, mutual: bool) -> Iterator[NodeRun]:
    spool = tmp_path / "spool"
    tls = f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
    if mutual:
        tls += f'tls_ca = "{pki.ca_cert}"\n'
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\nbind = "127.0.0.1"\nport = {port}\nspool = "{spool}"\n'
        f"ingest_processes = 2\nstudy_idle_timeout = 1.0\nshutdown_grace = 2.0\n"
        f"acse_timeout = 5.0\n{tls}",
        encoding="utf-8",
    )
    stderr_path = tmp_path / "node.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*CLI, "node", "--config", str(cfg)], cwd=tmp_path, env=clean_env(),
            stdout=subprocess.DEVNULL, stderr=err,
        )
    run = NodeRun(proc, port, spool, stderr_path)
    try:
        # Listening once this line is out: the socket is bound and listening
        # before it is logged, so connections wait in the backlog until an
        # ingest process accepts them. (No probe connection: it would itself
        # be a failed TLS handshake in the log.)
        deadline = time.monotonic() + 30
        while "listening on" not in stderr_path.read_text(errors="replace"):
            if proc.poll() is not None:
                pytest.fail(f"pacs-ai node exited with {proc.returncode}: {stderr_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"pacs-ai node did not start within 30 s: {stderr_path.read_text()}")
            time.sleep(0.05)
        assert "(TLS," in stderr_path.read_text(), stderr_path.read_text()
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS client context trusting the test CA, optionally with a client certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def make_ae() -> AE:
    ae = AE(ae_title="TLS_SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.connection_timeout = 15  # covers the TCP connect and the TLS handshake
    ae.acse_timeout = 10
    ae.dimse_timeout = 10
    ae.network_timeout = 10
    return ae


def associate(port: int, ctx: ssl.SSLContext | None):
    tls_args = (ctx, "localhost") if ctx is not None else None
    return make_ae().associate("127.0.0.1", port, ae_title="PACS_AI", tls_args=tls_args)


def make_ct(study_uid: str | None = None) -> Dataset:
    """A small but complete CT Image instance (64 x 64, 16 bit)."""
    return ct_dataset(study_uid or generate_uid(), generate_uid())


def echo_and_store(port: int, ctx: ssl.SSLContext, ds: Dataset) -> None:
    """Associate over TLS, C-ECHO, C-STORE ``ds``, release; all must succeed."""
    assoc = associate(port, ctx)
    assert assoc.is_established, "a client the node should accept could not associate over TLS"
    try:
        status = assoc.send_c_echo()
        assert status is not None and status.Status == SUCCESS, f"C-ECHO status {status}"
        status = assoc.send_c_store(ds)
        assert status is not None and status.Status == SUCCESS, f"C-STORE status {status}"
    finally:
        assoc.release()


def assert_cannot_associate(port: int, ctx: ssl.SSLContext | None, what: str) -> None:
    try:
        assoc = associate(port, ctx)
    except ssl.SSLError:
        return  # refused during the handshake, before any association: fine
    if assoc.is_established:
        assoc.release()
        pytest.fail(f"{what}: associated, but the node must refuse it")


def spool_file(spool: Path, ds: Dataset) -> Path:
    return spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def assert_stored(run: NodeRun, ds: Dataset, calling_ae: str = "TLS_SCU") -> None:
    """The instance is in the spool, byte-identical in content, and in the journal."""
    from pydicom import dcmread

    path = spool_file(run.spool, ds)
    assert path.is_file(), f"{path} not in the spool"
    stored = dcmread(path)
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.pixel_array.shape == (64, 64)
    assert stored.PixelData == ds.PixelData
    status = subprocess.run(
        [*CLI, "status", "--spool", str(run.spool), "--json"],
        env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 0, status.stderr
    studies = {s["study_uid"]: s for s in json.loads(status.stdout)}
    assert ds.StudyInstanceUID in studies, status.stdout
    assert studies[ds.StudyInstanceUID]["instance_count"] >= 1
    assert studies[ds.StudyInstanceUID]["calling_ae"] == calling_ae


# -- server-only TLS -------------------------------------------------------------
def test_server_tls_echo_store_and_plain_client_refused(tmp_path: Path, port: int, pki: Pki) -> None:
    with running_node(tmp_path, port, pki, mutual=False) as run:
        ds = make_ct()
        echo_and_store(port, client_context(pki), ds)
        assert_stored(run, ds)

        # A plain DICOM client: its A-ASSOCIATE-RQ is not a TLS ClientHello.
        assert_cannot_associate(port, None, "a plain (non-TLS) client")
        run.wait_for_log("tls-handshake-failed")

        # A TLS client that does not trust the node's CA refuses the node.
        with pytest.raises(ssl.SSLCertVerificationError):
            stranger = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.other_ca_cert))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                stranger.wrap_socket(raw, server_hostname="localhost")

        # Server-only TLS: a client certificate is not needed, but allowed.
        ds2 = make_ct()
        echo_and_store(port, client_context(pki, pki.client_cert, pki.client_key), ds2)
        assert_stored(run, ds2)
        assert run.stop() == 0, run.logs()
    assert "Traceback" not in run.logs(), run.logs()


# -- mutual TLS ------------------------------------------------------------------
def test_mutual_tls(tmp_path: Path, port: int, pki: Pki) -> None:
    with running_node(tmp_path, port, pki, mutual=True) as run:
        ds = make_ct()
        echo_and_store(port, client_context(pki, pki.client_cert, pki.client_key), ds)
        assert_stored(run, ds)

        refused = {
            "a TLS client without a certificate": client_context(pki),
            "a client certificate signed by another CA":
                client_context(pki, pki.wrong_ca_client_cert, pki.wrong_ca_client_key),
            "an expired client certificate signed by the right CA":
                client_context(pki, pki.expired_client_cert, pki.expired_client_key),
            "a plain (non-TLS) client": None,
        }
        for what, ctx in refused.items():
            assert_cannot_associate(port, ctx, what)

        # every refusal is audited, and the node lives on
        log = run.wait_for_log("tls-handshake-failed", count=len(refused))
        audit = [line for line in log.splitlines() if "tls-handshake-failed" in line]
        assert all("pacs_ai.audit" in line and "peer=127.0.0.1:" in line for line in audit), audit
        assert all(line.rstrip().endswith(")") and "()" not in line for line in audit), audit
        assert run.proc.poll() is None, run.logs()
        ds2 = make_ct()
        echo_and_store(port, client_context(pki, pki.client_cert, pki.client_key), ds2)
        assert_stored(run, ds2)

        # the audit line also lands in the log file under the spool
        deadline = time.monotonic() + 5
        while "tls-handshake-failed" not in (run.log_path.read_text() if run.log_path.exists() else ""):
            assert time.monotonic() < deadline, "no tls-handshake-failed line in spool/logs/pacs-ai.log"
            time.sleep(0.1)
        assert run.stop() == 0, run.logs()
    assert "Traceback" not in run.logs(), run.logs()


def test_idle_connection_does_not_block_tls_clients(tmp_path: Path, port: int, pki: Pki) -> None:
    """A peer that opens TCP connections and never starts the TLS handshake
    (a port scanner, a health check, a slow or hostile client) must not stop
    good clients from associating. One idle connection per ingest process is
    enough to test it: the handshake runs in the accept loop, which then
    waits ``acse_timeout`` (5 s here, 30 s by default) for each of them."""
    with running_node(tmp_path, port, pki, mutual=True) as run:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.5)  # let the ingest processes accept them
            ctx = client_context(pki, pki.client_cert, pki.client_key)
            ae = make_ae()
            ae.connection_timeout = 3
            started = time.monotonic()
            assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AI", tls_args=(ctx, "localhost"))
            took = time.monotonic() - started
            established = assoc.is_established
            if established:
                assoc.release()
        finally:
            for s in idle:
                s.close()
        assert established and took < 3, (
            f"with 2 idle TCP connections open, a good TLS client "
            f"{'associated only after' if established else 'failed after'} {took:.1f} s"
        )
        assert run.stop() == 0, run.logs()


# -- TLS files that exist but cannot be used ------------------------------------------
@pytest.mark.parametrize("which", ["tls_cert", "tls_key", "tls_ca"])
def test_unusable_tls_file_is_one_line_naming_it(tmp_path: Path, port: int, pki: Pki, which: str) -> None:
    """A file that passes validation (it exists) but does not load: ``pacs-ai
    node`` stops with one line naming that setting, exit 2, no traceback."""
    files = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_ca": pki.ca_cert}
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    files[which] = junk
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\nbind = "127.0.0.1"\nport = {port}\nspool = "{tmp_path / "spool"}"\n'
        + "".join(f'{k} = "{v}"\n' for k, v in files.items()),
        encoding="utf-8",
    )
    result = subprocess.run([*CLI, "node", "--config", str(cfg)], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    where = f"exit {result.returncode}, stderr {result.stderr!r}"
    assert result.returncode == 2, where
    assert "Traceback" not in result.stderr, where
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pacs-ai: error:"), where
    assert f"node.{which}" in lines[0], f"the message should name node.{which}: {where}"


def test_key_that_does_not_match_the_certificate(tmp_path: Path, port: int, pki: Pki) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\nbind = "127.0.0.1"\nport = {port}\nspool = "{tmp_path / "spool"}"\n'
        f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.client_key}"\n',
        encoding="utf-8",
    )
    result = subprocess.run([*CLI, "node", "--config", str(cfg)], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    where = f"exit {result.returncode}, stderr {result.stderr!r}"
    assert result.returncode == 2 and "Traceback" not in result.stderr, where
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pacs-ai: error:"), where
    assert "node.tls_cert" in lines[0] or "node.tls_key" in lines[0], where


# -- DCMTK as a foreign TLS peer -------------------------------------------------------
def _dcmtk_has_tls() -> bool:
    tool = shutil.which("echoscu")
    if tool is None:
        return False
    out = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=30)
    return "--enable-tls" in out.stdout + out.stderr


requires_dcmtk_tls = pytest.mark.skipif(
    not _dcmtk_has_tls(),
    reason="this DCMTK was built without OpenSSL: `echoscu --help` lists no +tls/--enable-tls option",
)


def _dcmtk(tool: str, port: int, env: dict[str, str], *options: str | Path,
           files: tuple[Path, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, *map(str, options), "-aet", "DCMTK_TLS", "-aec", "PACS_AI", "-to", "5", "-ta", "5", "-td", "5",
         "127.0.0.1", str(port), *map(str, files)],
        env=env, capture_output=True, text=True, timeout=30,
    )


@pytest.mark.dcmtk
@requires_dcmtk_tls
def test_dcmtk_server_only_tls(tmp_path: Path, port: int, pki: Pki, dcmtk_env: dict[str, str]) -> None:
    with running_node(tmp_path, port, pki, mutual=False) as run:
        # anonymous TLS client (no certificate of its own), verifying the node
        result = _dcmtk("echoscu", port, dcmtk_env, "+tla", "+cf", pki.ca_cert)
        assert result.returncode == 0, result.stdout + result.stderr + run.logs()
        ds = make_ct()
        dcm = tmp_path / "ct.dcm"
        ds.save_as(dcm, enforce_file_format=True)
        result = _dcmtk("storescu", port, dcmtk_env, "+tla", "+cf", pki.ca_cert, files=(dcm,))
        assert result.returncode == 0, result.stdout + result.stderr + run.logs()
        assert spool_file(run.spool, ds).is_file()
        # DCMTK refuses a node whose certificate it cannot verify
        result = _dcmtk("echoscu", port, dcmtk_env, "+tla", "+cf", pki.other_ca_cert)
        assert result.returncode != 0, "echoscu accepted a server certificate from an untrusted CA"
        # and plain DICOM is refused by the node
        result = _dcmtk("echoscu", port, dcmtk_env)
        assert result.returncode != 0, "a plain echoscu associated with a TLS node"
        assert run.stop() == 0, run.logs()


@pytest.mark.dcmtk
@requires_dcmtk_tls
def test_dcmtk_mutual_tls(tmp_path: Path, port: int, pki: Pki, dcmtk_env: dict[str, str]) -> None:
    good = ("+tls", pki.client_key, pki.client_cert, "-pw", "+cf", pki.ca_cert)
    with running_node(tmp_path, port, pki, mutual=True) as run:
        result = _dcmtk("echoscu", port, dcmtk_env, *good)
        assert result.returncode == 0, result.stdout + result.stderr + run.logs()
        ds = make_ct()
        dcm = tmp_path / "ct.dcm"
        ds.save_as(dcm, enforce_file_format=True)
        result = _dcmtk("storescu", port, dcmtk_env, *good, files=(dcm,))
        assert result.returncode == 0, result.stdout + result.stderr + run.logs()
        assert_stored(run, ds, calling_ae="DCMTK_TLS")

        bad = {
            "no client certificate": ("+tla", "+cf", pki.ca_cert),
            "client certificate from another CA":
                ("+tls", pki.wrong_ca_client_key, pki.wrong_ca_client_cert, "-pw", "+cf", pki.ca_cert),
            "expired client certificate":
                ("+tls", pki.expired_client_key, pki.expired_client_cert, "-pw", "+cf", pki.ca_cert),
        }
        for what, options in bad.items():
            result = _dcmtk("echoscu", port, dcmtk_env, *options)
            assert result.returncode != 0, f"echoscu with {what} associated"
        run.wait_for_log("tls-handshake-failed", count=len(bad))
        result = _dcmtk("echoscu", port, dcmtk_env, *good)
        assert result.returncode == 0, result.stdout + result.stderr + run.logs()
        assert run.stop() == 0, run.logs()
