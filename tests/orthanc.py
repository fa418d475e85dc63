"""Run a real Orthanc (the Debian ``orthanc`` package, 1.10) as the PACS in tests.

``OrthancProcess`` writes a JSON configuration into its work directory, starts
``/usr/sbin/Orthanc`` on two free ports (HTTP and DICOM, both on 127.0.0.1 for
REST since ``RemoteAccessAllowed`` is false) and talks to it over its REST API
with ``urllib`` only.

Who may C-STORE to Orthanc (checked with pynetdicom against Orthanc 1.10.1):

* ``always_allow_store=True`` (``DicomAlwaysAllowStore``): any calling AE title
  is accepted and its instances are stored; the called AE title is not checked
  either (``DicomCheckCalledAet`` false).
* ``always_allow_store=False``: the helper also sets ``DicomAlwaysAllowEcho``
  false (unless ``extra_config`` says otherwise). Orthanc first asks whether the
  *connection* is allowed, and it is whenever any ``DicomAlwaysAllow*`` option
  is true; with all of them false a caller whose AE title is not one of the
  ``modalities`` gets an A-ASSOCIATE-RJ: result 1 (rejected permanent), source 1
  (DICOM UL service-user), reason 3 (calling AE title not recognised).
  pynetdicom reports ``assoc.is_rejected`` (not ``is_aborted``); the
  ``A_ASSOCIATE_RJ`` PDU (``evt.EVT_PDU_RECV``, ``event.pdu``) has ``result``
  1, ``source`` 1, ``reason_diagnostic`` 3. Orthanc logs "Rejected association
  for remote AET X on IP 127.0.0.1".
  A caller that *is* a known modality is accepted and may store.
  If ``DicomAlwaysAllowEcho`` is left true instead (``extra_config``), the
  association of an unknown caller *is* accepted, storage presentation contexts
  included, and Orthanc answers the C-STORE-RQ with an A-ABORT (source 0, DUL
  service-user, reason 0) instead of a C-STORE-RSP: pynetdicom's
  ``send_c_store`` returns an empty ``Dataset`` and ``assoc.is_aborted`` is true.
  The log says "Rejected Store request from remote DICOM modality with AET ...".

Other Orthanc 1.10 behaviours worth knowing in tests:

* ``"Plugins": []`` is explicit: the Debian package's /etc/orthanc/*.json
  loads the plugins in /usr/share/orthanc/plugins (ModalityWorklists,
  ServeFolders). Orthanc reads only the file given on its command line, and keys
  missing there take Orthanc's built-in defaults, so no plugin is loaded.
* Orthanc keeps the association it opened as an SCU (``send_to_modality``)
  open for ``DicomAssociationCloseDelay`` seconds (default 5) to reuse it for
  the next C-STORE to the same modality; the helper sets it to 0 by default so
  that every ``send_to_modality`` uses a fresh association (override it in
  ``extra_config``).
* ``PUT /modalities/{name}`` with ``{"AET", "Host", "Port"}`` creates or
  updates a modality at runtime, in memory (``DicomModalitiesInDatabase``
  false): it is lost when Orthanc restarts, unlike ``modalities`` given to the
  constructor, which are written into the configuration file. It takes effect
  for the next C-STORE at once, even with ``DicomAssociationCloseDelay`` 5 and
  an association to the old address still open (checked). It answers an empty
  body; ``GET /modalities?expand`` shows the entries.
* ``POST /modalities/{name}/store`` with ``"Synchronous": true`` answers
  ``{"Description", "FailedInstancesCount", "InstancesCount", "LocalAet",
  "ParentResources", "RemoteAet"}`` on success and HTTP 500 with a JSON error
  body when the peer cannot be reached or refuses: ``send_to_modality`` raises
  ``OrthancHTTPError`` then. ``"Synchronous": false`` answers
  ``{"ID", "Path"}`` of the job at once.
* ``POST /modalities/{name}/echo`` answers 200 ``{}`` or HTTP 500.
* Start-up takes ~0.1 s; a graceful stop (SIGTERM) takes ~3.5 s whatever the
  settings (Orthanc's HTTP server, DICOM server and jobs engine each finish a
  ~1 s polling loop). ``kill9()`` is instant; tests that throw the storage
  away can use it.
* Uploading the same file twice answers the same instance ID
  (``"Status": "AlreadyStored"``); a series becomes ``IsStable`` ``StableAge``
  seconds (2 here) after its last instance.
* A modality that cannot be reached makes Orthanc log ``E`` lines
  ("TCP Initialization Error: Connection refused"); a C-STORE-RSP failure
  status makes ``send_to_modality`` raise with HTTP 500, ``Details``
  'C-STORE SCU to AET "X" has failed with DIMSE status 0xA700'.
* Orthanc's DCMTK leaves Nagle's algorithm on unless the environment has
  ``TCP_NODELAY=1`` (each DIMSE message would wait ~40 ms); the helper sets it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

from .conftest import free_port, kill9, terminate

ORTHANC = "/usr/sbin/Orthanc"


class OrthancHTTPError(RuntimeError):
    """An HTTP error answer of Orthanc's REST API, with its status and body."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        try:
            self.json: Any = json.loads(body)
        except ValueError:
            self.json = None
        super().__init__(f"Orthanc {method} {path}: HTTP {status}: {body[:2000].decode(errors='replace')}")


class OrthancProcess:
    """A real Orthanc with its own storage, ports and configuration in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        always_allow_store: bool = True,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        storage = self.workdir / "storage"
        self.config: dict[str, Any] = {
            "Name": f"test-{aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowStore": always_allow_store,
            # With any DicomAlwaysAllow* true, Orthanc accepts every association and
            # only rejects presentation contexts; false makes unknown callers rejected
            # at association (see the module docstring).
            "DicomAlwaysAllowEcho": always_allow_store,
            "DicomModalities": {name: [a, host, int(port)] for name, (a, host, port) in (modalities or {}).items()},
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 10,
            "DicomAssociationCloseDelay": 0,
            "StableAge": 2,
            "SaveJobs": False,
            "SyncStorageArea": False,
            "OverwriteInstances": False,
        }
        self.config.update(extra_config or {})
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.log_path = self.workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # ------------------------------------------------------------------ process

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> OrthancProcess:
        env = dict(os.environ)
        env["TCP_NODELAY"] = "1"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed by stop/kill9)
        self.proc = subprocess.Popen(
            [ORTHANC, str(self.config_path)],
            stdout=self._log,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._close_log()
                self.proc = None
                raise RuntimeError(f"Orthanc exited with {code}: {self.log_text()[-3000:]}")
            try:
                self.get("/system", timeout=1.0)
                return self
            except (OSError, OrthancHTTPError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system within {timeout} s: {self.log_text()[-3000:]}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        code = terminate(self.proc, timeout)
        self.proc = None
        self._close_log()
        return code

    def kill9(self) -> None:
        if self.proc is None:
            return
        kill9(self.proc)
        self.proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------------- REST

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | list | None = None,
        content_type: str | None = None,
        timeout: float = 60.0,
    ) -> bytes:
        """One REST call; the raw answer body. HTTP errors raise ``OrthancHTTPError``."""
        data: bytes | None
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise OrthancHTTPError(method, path, e.code, e.read()) from None

    def _json(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        raw = self.request(method, path, body, timeout=timeout)
        return json.loads(raw) if raw.strip() else None

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return self._json("GET", path, timeout=timeout)

    def post(self, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        return self._json("POST", path, body if body is not None else b"", timeout=timeout)

    def put(self, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        return self._json("PUT", path, body if body is not None else b"", timeout=timeout)

    def delete(self, path: str, timeout: float = 60.0) -> Any:
        return self._json("DELETE", path, timeout=timeout)

    def system(self) -> dict[str, Any]:
        return self.get("/system")

    def statistics(self) -> dict[str, Any]:
        return self.get("/statistics")

    def upload(self, paths: Path | str | Iterable[Path | str]) -> list[str]:
        """POST every file (folders recursively) to /instances; the Orthanc instance IDs."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        files: list[Path] = []
        for p in map(Path, paths):
            files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        ids = []
        for f in files:
            answer = json.loads(self.request("POST", "/instances", f.read_bytes(), "application/dicom"))
            ids.append(answer["ID"])
        return ids

    def studies(self) -> list[str]:
        return self.get("/studies")

    def patients(self) -> list[str]:
        return self.get("/patients")

    def study_id_for_uid(self, study_uid: str) -> str | None:
        for hit in self.post("/tools/lookup", study_uid) or []:
            if hit.get("Type") == "Study":
                return hit["ID"]
        return None

    def series_of(self, study_id: str) -> list[dict[str, Any]]:
        """The study's series, each with ``ID``, ``MainDicomTags``, ``Instances``..."""
        return self.get(f"/studies/{study_id}/series")

    def instances_of_series(self, series_id: str) -> list[dict[str, Any]]:
        """The series' instances, each with ``ID``, ``MainDicomTags`` (SOPInstanceUID...)."""
        return self.get(f"/series/{series_id}/instances")

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")

    def modalities(self) -> list[str]:
        return self.get("/modalities")

    def put_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Create or update a modality at runtime (in memory, not in the configuration)."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": int(port)})

    def send_to_modality(self, modality_name: str, resources: list[str], synchronous: bool = True,
                         timeout: float = 120.0) -> dict[str, Any]:
        """C-STORE the resources (any level: instance, series, study, patient IDs)."""
        return self.post(f"/modalities/{modality_name}/store",
                         {"Resources": list(resources), "Synchronous": synchronous}, timeout=timeout)

    def echo(self, modality_name: str) -> bool:
        try:
            self.post(f"/modalities/{modality_name}/echo", {})
            return True
        except OrthancHTTPError:
            return False

    def wait_for_series(self, study_uid: str, modality: str, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Poll until the study has at least ``count`` series of ``modality``; those series."""
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while True:
            study_id = self.study_id_for_uid(study_uid)
            if study_id is not None:
                found = [s for s in self.series_of(study_id) if s["MainDicomTags"].get("Modality") == modality]
                if len(found) >= count:
                    return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"Orthanc has {len(found)} {modality} series in study {study_uid} after {timeout} s, "
                    f"expected {count}; series: {self.series_of(study_id) if study_id else 'no such study'}")
            time.sleep(0.2)

    def delete_all(self) -> None:
        for patient in self.patients():
            self.delete(f"/patients/{patient}")
