"""The HTTP side of pacs-ai (issue 7): health, readiness, Prometheus metrics and, on the node,
a status page for the people who run it.

Started by ``study_queue.services``: the node on ``http.bind:http.port``, each inference
worker on ``http.bind:http.worker_port`` (0 disables either; a delivery-only worker serves
nothing, its work is in the node's journal). The standard library's threading HTTP server
in a daemon thread: a handful of endpoints for operators and Prometheus need no framework,
and the page is plain HTML and CSS (a three-line script pauses the refresh while a token
is being typed).

Endpoints:

- ``GET /healthz``: ``ok``, the process is alive.
- ``GET /readyz``: ``ready``, or 503 with one line per failing check and its reason.
  Node: the spool is writable, the journal answers, the broker is reachable, the worker
  children run. Worker: the spool is readable, the broker is reachable, the models are
  loaded.
- ``GET /metrics``: Prometheus text format (``study_queue.metrics``).
- ``GET /`` (node): recent studies with their state, stage timings, model, findings count,
  Lung-RADS category and key-image thumbnails; FAILED studies with a replay button.
- ``GET /thumb/<study key>/<run>/KEY_nnn.png`` (node): a key image from the outbox as a
  small PNG. Each part of the path is matched by a regular expression before it names a
  file, so nothing outside the outbox (or the spool's work folder) can be read.
- ``POST /retry/<study key>`` (node): replays a FAILED study (``study_queue.replay``) when
  the form's ``token`` matches ``http.token`` (compared in constant time); 403 when no
  token is configured or it does not match; 303 back to the page on success.

Anything else is 404. Errors are one line of plain text; a failure inside a handler is
logged and answered 500, never with a traceback. Nothing served names a patient: studies
appear by study key only, thumbnails are the key images' pixels (no DICOM header), and no
DICOM attribute of the received data is read.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import html
import io
import json
import logging
import os
import re
import secrets
import socket
import sqlite3
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import parse_qs

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dicom_node.journal import (
    ANALYZED,
    DELIVERED,
    FAILED,
    STATES,
    IllegalTransition,
    Journal,
    Study,
    UnknownStudy,
)

from .metrics import NodeCollector, read_journal, stage_durations, worker_registry
from .settings import Settings
from .workdir import WorkDir

log = logging.getLogger("pacs_ai.web")
audit = logging.getLogger("pacs_ai.audit")

# Matched whole (\Z: "$" would also let a trailing newline through).
THUMB_RE = re.compile(r"/thumb/([0-9a-f]{16})/([1-9][0-9]{0,5})/(KEY_[0-9]{3})\.png\Z")
RETRY_RE = re.compile(r"/retry/([0-9a-f]{16})\Z")
KEY_IMAGE_RE = re.compile(r"KEY_[0-9]{3}\.dcm\Z")

RECENT_STUDIES = 50
THUMB_PX = 160  # the longer side of a thumbnail, shown at that size
THUMBS_PER_STUDY = 2
REFRESH_S = 10
BROKER_CACHE_S = 5.0
MAX_FORM_BYTES = 4096
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: A check answers None when all is well, else the reason in one line.
CheckFn = Callable[[], "str | None"]


@dataclass
class Check:
    name: str
    run: CheckFn


# -- readiness checks ---------------------------------------------------------------------------
def spool_writable(spool_root: Path) -> str | None:
    """Create, fsync and remove a probe file in ``spool/tmp``, as an instance is written."""
    folder = Path(spool_root) / "tmp"
    try:
        fd, name = tempfile.mkstemp(prefix=".readyz-", suffix=".probe", dir=folder)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return f"cannot write in {folder}: {exc.strerror or exc}"
    return None


def spool_readable(spool_root: Path) -> str | None:
    root = Path(spool_root)
    try:
        os.listdir(root)
    except OSError as exc:
        return f"cannot read {root}: {exc.strerror or exc}"
    if not os.access(root, os.R_OK | os.X_OK):
        return f"cannot read {root}: permission denied"
    return None


def journal_answers(journal_path: Path) -> str | None:
    try:
        conn = read_journal(journal_path)
        try:
            conn.execute("SELECT 1 FROM studies LIMIT 1").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"the journal does not answer: {exc}"
    return None


def models_loaded(settings: Settings) -> str | None:
    """The configured models are warm in this process (``study_queue.worker``'s cache; the
    solo pool loads them before taking the first message)."""
    from . import worker

    inf = settings.inference
    with worker._models_lock:
        loaded = (tuple(inf.models), inf.engine, inf.threads) in worker._models
    return None if loaded else "not loaded yet"


class BrokerProbe:
    """Whether the broker answers, and how many messages wait in each queue; measured at most
    every ``BROKER_CACHE_S`` seconds, one measurement at a time, for /readyz and /metrics.

    Redis: a connection through the Celery app (its URL, TLS and timeouts), one try of at
    most two seconds. The embedded broker: its messages folder is writable.
    """

    QUEUES = ("inference", "delivery")

    def __init__(self, app: Any, settings: Settings, cache_s: float = BROKER_CACHE_S) -> None:
        self.app = app
        self.embedded = not settings.queue.broker_url
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._reason: str | None = "not measured yet"
        self._messages: dict[str, int] = {}

    def measure(self) -> tuple[str | None, dict[str, int]]:
        with self._lock:
            if time.monotonic() - self._at >= self.cache_s:
                self._reason, self._messages = self._measure()
                self._at = time.monotonic()
            return self._reason, dict(self._messages)

    def _measure(self) -> tuple[str | None, dict[str, int]]:
        if self.embedded:
            folder = Path(self.app.conf.broker_transport_options["data_folder_in"])
            try:
                fd, name = tempfile.mkstemp(prefix=".readyz-", suffix=".probe", dir=folder)
                os.close(fd)
                os.unlink(name)
                names = os.listdir(folder)
            except OSError as exc:
                return f"embedded broker folder {folder}: {exc.strerror or exc}", {}
            return None, {q: sum(1 for n in names if n.partition(".")[2] == f"{q}.msg") for q in self.QUEUES}
        from kombu.exceptions import ChannelError

        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=2)
                messages = {}
                channel = conn.default_channel
                for queue in self.QUEUES:
                    try:
                        messages[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                    except ChannelError:  # Redis keeps no key for an empty queue: "not found"
                        messages[queue] = 0
                return None, messages
        except Exception as exc:  # noqa: BLE001 - kombu's OperationalError, OSError, timeouts...
            return f"unreachable: {type(exc).__name__}: {_one_line(str(exc))}", {}

    def check(self) -> str | None:
        return self.measure()[0]

    def families(self) -> list[Any]:
        reason, messages = self.measure()
        up = GaugeMetricFamily("pacs_ai_broker_up", "1 when the broker answered (cached a few seconds)")
        up.add_metric([], 0.0 if reason else 1.0)
        waiting = GaugeMetricFamily("pacs_ai_broker_messages", "Messages waiting in the broker by queue",
                                    labels=["queue"])
        for queue, n in sorted(messages.items()):
            waiting.add_metric([queue], n)
        return [up, waiting]


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Info(Collector):
    def __init__(self, role: str) -> None:
        self.role = role

    def collect(self) -> Iterable[Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("pacs-ai")
        except PackageNotFoundError:
            v = "unknown"
        fam = GaugeMetricFamily("pacs_ai_info", "This process: its role and the pacs-ai version",
                                labels=["role", "version"])
        fam.add_metric([self.role, v], 1)
        return [fam]


# -- thumbnails ---------------------------------------------------------------------------------
class ThumbnailError(Exception):
    """A key image that cannot be shown (one line)."""


def render_thumbnail(path: Path, max_px: int = THUMB_PX) -> bytes:
    """A key image (RGB Secondary Capture, 8 bits) as a PNG at most ``max_px`` on its longer side.
    Only the pixels are used: the PNG carries no DICOM attribute."""
    import numpy as np
    from PIL import Image
    from pydicom import dcmread

    try:
        ds = dcmread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds
        raise ThumbnailError(f"{path.name} does not read as DICOM ({type(exc).__name__})") from None
    if (str(ds.get("SOPClassUID", "")) != SECONDARY_CAPTURE or ds.get("PhotometricInterpretation") != "RGB"
            or ds.get("SamplesPerPixel") != 3 or ds.get("BitsAllocated") != 8):
        raise ThumbnailError(f"{path.name} is not an RGB Secondary Capture key image")
    if int(ds.Rows) * int(ds.Columns) > 4096 * 4096:
        raise ThumbnailError(f"{path.name} is larger than 4096 x 4096")
    from dicom_node.key_images import OUTLINE_RGB

    pixels = ds.pixel_array
    image = Image.fromarray(pixels, mode="RGB")
    image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    # The outline is what a key image is for, and at a third of its size a two-pixel ring
    # blurs into the grey: every thumbnail pixel that covers enough outline is painted with it.
    outline = Image.fromarray(np.all(pixels == OUTLINE_RGB, axis=-1).astype(np.uint8) * 255, mode="L")
    covered = np.asarray(outline.resize(image.size, Image.Resampling.BOX)) >= 64
    if covered.any():
        thumb = np.array(image)
        thumb[covered] = OUTLINE_RGB
        image = Image.fromarray(thumb, mode="RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class ThumbnailCache:
    """Rendered thumbnails by (file, modification time, size): a key image is rendered once."""

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, bytes] = OrderedDict()

    def get(self, path: Path) -> bytes:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        png = render_thumbnail(path)
        with self._lock:
            self._items[key] = png
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return png


# -- the status page ----------------------------------------------------------------------------
_SCRIPT = (
    f"setInterval(function(){{var busy=Array.prototype.some.call(document.querySelectorAll('input[name=token]'),"
    f"function(i){{return i.value!=='';}});if(!busy)location.reload();}},{REFRESH_S * 1000});"
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
PAGE_CSP = (f"default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f4f6f9}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
header .note{color:#f5c04a;font-size:12px}
main{padding:12px 20px}
.counts span{display:inline-block;margin:0 6px 6px 0;padding:2px 8px;border-radius:10px;background:#e3e7ee}
.msg{background:#e6f4ea;border:1px solid #8bc59a;padding:6px 10px;margin:8px 0}
table{border-collapse:collapse;width:100%;background:#fff;margin:6px 0 18px}
th,td{border-bottom:1px solid #e3e7ee;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600;white-space:nowrap}
td.num{text-align:right;white-space:nowrap}
code{font:12px ui-monospace,Menlo,Consolas,monospace}
.state{font-weight:600;white-space:nowrap}
.DELIVERED{color:#1e7b34}.FAILED{color:#b3261e}.ANALYZED,.QUEUED,.COMPLETE,.RECEIVING{color:#8a5a00}
.IGNORED,.SUPERSEDED{color:#666}
.reason{color:#555;font-size:12px;max-width:260px;overflow-wrap:anywhere}
.nowrap{white-space:nowrap}
.stages{display:grid;grid-template-columns:auto auto;column-gap:8px;font-size:12px;white-space:nowrap}
.stages span:nth-child(even){text-align:right}
.thumbs{white-space:nowrap}
.more{font-size:12px;color:#555;vertical-align:top}
.thumbs img{margin:0 4px 0 0;background:#000;border:1px solid #ccc;vertical-align:top}
form{display:flex;gap:6px}
input[type=password]{width:180px}
"""


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 10:
        return f"{value:.1f} s"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.0f} h"


def _fmt_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


class NodeSite:
    """What the node's server needs: the journal (read it, and write it for a replay), the
    Celery app, where the outputs are, and the flash messages shown after a replay."""

    def __init__(self, settings: Settings, journal: Journal, app: Any, spool_root: Path) -> None:
        self.settings = settings
        self.journal = journal
        self.app = app
        self.spool_root = Path(spool_root).resolve()
        self.outbox = Path(settings.delivery.outbox).resolve()
        self.thumbnails = ThumbnailCache()
        self._flash_lock = threading.Lock()
        self._flash: OrderedDict[str, str] = OrderedDict()

    # -- files of a study's run
    def output_folders(self, key: str, run: int) -> list[Path]:
        """Where a run's key images are: the outbox (``study_queue.delivery``), else the
        spool's work folder (analysed, not yet copied to the outbox)."""
        return [self.outbox / key / f"run-{run}", WorkDir(self.spool_root, key, run).outputs]

    def key_images(self, key: str, run: int) -> list[str]:
        for folder in self.output_folders(key, run):
            try:
                names = sorted(n for n in os.listdir(folder) if KEY_IMAGE_RE.match(n))
            except OSError:
                continue
            if names:
                return [n[:-4] for n in names]
        return []

    def key_image_path(self, key: str, run: int, name: str) -> Path | None:
        for folder in self.output_folders(key, run):
            path = folder / f"{name}.dcm"
            if path.is_file():
                resolved, base = path.resolve(), folder.resolve()
                if base in resolved.parents:
                    return resolved
        return None

    def result(self, study: Study) -> dict:
        doc = WorkDir(self.spool_root, study.study_key, study.run).read_result()
        if doc is None:
            try:
                doc = json.loads((self.outbox / study.study_key / f"run-{study.run}" / "result.json").read_text())
            except (OSError, ValueError):
                doc = None
        return doc if isinstance(doc, dict) else {}

    # -- flash messages after a replay (kept here, so the page never echoes a query string)
    def flash(self, text: str) -> str:
        """Keep ``text`` for the page after the redirect; returns its id for the URL."""
        flash_id = secrets.token_urlsafe(9)
        with self._flash_lock:
            self._flash[flash_id] = text
            while len(self._flash) > 64:
                self._flash.popitem(last=False)
        return flash_id

    def flashed(self, flash_id: str | None) -> str | None:
        if not flash_id:
            return None
        with self._flash_lock:
            return self._flash.get(flash_id)

    # -- the page
    def page(self, message: str | None = None) -> str:
        now = time.time()
        conn = read_journal(self.journal.path)
        try:
            conn.execute("BEGIN")
            counts = dict.fromkeys(STATES, 0)
            for row in conn.execute("SELECT state, COUNT(*) FROM studies GROUP BY state"):
                counts[row[0]] = row[1]
            recent = [Study.from_row(r) for r in conn.execute(
                "SELECT * FROM studies ORDER BY created_at DESC LIMIT ?", (RECENT_STUDIES,))]
            failed = [Study.from_row(r) for r in conn.execute(
                "SELECT * FROM studies WHERE state = ? ORDER BY updated_at DESC LIMIT 100", (FAILED,))]
            firsts: dict[str, dict[str, tuple[int, float]]] = {}
            by_key = {s.study_key: s for s in [*recent, *failed]}
            if by_key:
                marks = ",".join("?" * len(by_key))
                for row in conn.execute(
                    f"SELECT study_key, run, to_state, MIN(id), MIN(at) FROM history WHERE study_key IN ({marks}) "
                    "GROUP BY study_key, run, to_state", list(by_key)):
                    if row[1] == by_key[row[0]].run:
                        firsts.setdefault(row[0], {})[row[2]] = (row[3], row[4])
        finally:
            conn.close()

        parts = [
            "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
            "<meta name=viewport content='width=device-width, initial-scale=1'>",
            f"<title>pacs-ai {_e(self.settings.node.ae_title)}</title><style>{_CSS}</style></head><body>",
            f"<header><h1>pacs-ai &middot; {_e(self.settings.node.ae_title)}</h1>",
            f"<span>{_e(time.strftime('%Y-%m-%d %H:%M:%S'))}, refreshes every {REFRESH_S} s</span>",
            "<span class=note>demonstration models, not for clinical use</span></header><main>",
        ]
        if message:
            parts.append(f"<p class=msg role=status>{_e(message)}</p>")
        parts.append("<p class=counts>" + "".join(
            f"<span class='{_e(state)}'>{_e(state)} {n}</span>" for state, n in counts.items()) + "</p>")

        parts.append("<h2>Recent studies</h2><table id=studies><thead><tr><th>Study key</th><th>State</th>"
                     "<th>Calling AE</th><th>Instances</th><th>Age</th><th>Stages</th><th>Model</th><th>Findings</th>"
                     "<th>Lung-RADS</th><th>Key images</th></tr></thead><tbody>")
        for s in recent:
            stages = stage_durations(firsts.get(s.study_key, {}))
            result = self.result(s)
            model = s.model or result.get("model")
            version = s.model_version or result.get("model_version")
            engines = result.get("engines") if isinstance(result.get("engines"), dict) else {}
            engine = engines.get(model) if model else None
            thumbs = ""
            if s.state in (ANALYZED, DELIVERED, FAILED):
                names = self.key_images(s.study_key, s.run)
                thumbs = "".join(
                    f"<img src='/thumb/{_e(s.study_key)}/{s.run}/{_e(n)}.png' alt='key image {_e(n)}' "
                    f"loading=eager>" for n in names[:THUMBS_PER_STUDY])
                if len(names) > THUMBS_PER_STUDY:
                    thumbs += f"<span class=more>+{len(names) - THUMBS_PER_STUDY} more</span>"
            parts.append(
                f"<tr data-study-key='{_e(s.study_key)}'><td><code>{_e(s.study_key)}</code>"
                + (f"<br><small>run {s.run}</small>" if s.run > 1 else "")
                + f"</td><td><span class='state {_e(s.state)}'>{_e(s.state)}</span>"
                + (f"<div class=reason>{_e(s.reason)}</div>" if s.reason else "")
                + f"</td><td>{_e(s.calling_ae or '–')}</td><td class=num>{s.instance_count}</td>"
                f"<td class=num>{_e(_fmt_age(now - s.created_at))}</td>"
                + "<td><div class=stages>" + "".join(
                    f"<span>{st}</span><span>{_e(_fmt_seconds(stages.get(st)))}</span>"
                    for st in ("receive", "queued", "analysis", "delivery", "total")) + "</div></td>"
                + f"<td class=nowrap>{_e(model or '–')}" + (f" {_e(version)}" if version else "")
                + (f"<br><small>{_e(engine)}</small>" if engine else "")
                + f"</td><td class=num>{_e(result.get('findings', '–'))}</td>"
                f"<td>{_e(result.get('lung_rads') or '–')}</td><td class=thumbs>{thumbs}</td></tr>")
        if not recent:
            parts.append("<tr><td colspan=10>no studies yet</td></tr>")
        parts.append("</tbody></table>")

        parts.append("<h2>Failed studies</h2>")
        if not self.settings.http.token:
            parts.append("<p>Replay from this page is off: set <code>http.token</code>, "
                         "or run <code>pacs-ai retry STUDY_KEY</code>.</p>")
        parts.append("<table id=failed><thead><tr><th>Study key</th><th>Failed</th><th>Reason</th>"
                     "<th>Replay</th></tr></thead><tbody>")
        for s in failed:
            form = ""
            if self.settings.http.token:
                form = (f"<form method=post action='/retry/{_e(s.study_key)}'>"
                        "<input type=password name=token placeholder='http.token' autocomplete=off "
                        "required aria-label='replay token'><button type=submit>Replay</button></form>")
            parts.append(f"<tr data-study-key='{_e(s.study_key)}'><td><code>{_e(s.study_key)}</code></td>"
                         f"<td class=num>{_e(_fmt_age(now - s.updated_at))} ago</td>"
                         f"<td class=reason>{_e(s.reason)}</td><td>{form}</td></tr>")
        if not failed:
            parts.append("<tr><td colspan=4>none</td></tr>")
        parts.append(f"</tbody></table></main><script>{_SCRIPT}</script></body></html>")
        return "".join(parts)

    # -- replay
    def retry(self, key: str, token: str, client: str) -> tuple[int, str]:
        """(HTTP status, one line, or the flash id after a 303) of a replay request."""
        from .replay import NotReplayable, retry_study

        expected = self.settings.http.token
        if not expected:
            return 403, "replay from the status page is off: http.token is not set"
        if not hmac.compare_digest(token.encode("utf-8", "replace"), expected.encode("utf-8")):
            log.warning("replay of study %s refused: wrong token (from %s)", key, client,
                        extra={"study_key": key})
            return 403, "wrong token"
        try:
            study = self.journal.get(key)
        except UnknownStudy:
            return 404, f"no study {key}"
        try:
            what = retry_study(self.settings, self.journal, self.app, study, who="replayed from the status page")
        except (NotReplayable, IllegalTransition) as exc:
            return 409, str(exc)
        audit.info("replay study=%s client=%s via=status-page: %s", key, client, what,
                   extra={"study_key": key})
        return 303, self.flash(f"study {key}: {what}")


# -- the server ---------------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: "HttpService") -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.service = service
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "pacs-ai"
    sys_version = ""
    timeout = 15  # a client that stops talking does not hold a thread for ever

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        self._guarded(self.server.service.get)

    def do_POST(self) -> None:
        self._guarded(self.server.service.post)

    def _guarded(self, route: Callable[["_Handler"], None]) -> None:
        try:
            route(self)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            log.exception("http %s %s failed", self.command, self.path.partition("?")[0][:200])
            try:
                self.reply_text(500, "internal error (see the log)")
            except OSError:
                pass

    # -- answers
    def reply(self, status: int, body: bytes, content_type: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        names = {name.lower() for name, _ in headers}
        if "cache-control" not in names:
            self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_text(self, status: int, text: str) -> None:
        self.reply(status, (_one_line(text) + "\n").encode(), "text/plain; charset=utf-8")

    def read_form(self) -> dict[str, str]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length < 0 or length > MAX_FORM_BYTES:
            self.close_connection = True
            return {}
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        try:
            return {k: v[0] for k, v in parse_qs(body, max_num_fields=20).items()}
        except ValueError:  # more fields than any form of ours has
            return {}


class HttpService:
    """One HTTP server in a daemon thread: the common endpoints, plus the node's page when
    ``site`` is given."""

    def __init__(self, role: str, bind: str, port: int, registry: CollectorRegistry, checks: list[Check],
                 site: NodeSite | None = None) -> None:
        self.role = role
        self.registry = registry
        self.checks = checks
        self.site = site
        self._server = _Server((bind, port), self)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def start(self) -> "HttpService":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name=f"http-{self.role}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -- routes
    def readiness(self) -> list[str]:
        failing = []
        for check in self.checks:
            try:
                reason = check.run()
            except Exception as exc:  # noqa: BLE001 - a broken check is a failing one
                log.warning("readiness check %s broke: %s: %s", check.name, type(exc).__name__, exc)
                reason = f"check failed: {type(exc).__name__}"
            if reason:
                failing.append(f"{check.name}: {_one_line(reason)}")
        return failing

    def get(self, h: _Handler) -> None:
        path, _, query = h.path.partition("?")
        if path == "/healthz":
            return h.reply_text(200, "ok")
        if path == "/readyz":
            failing = self.readiness()
            if failing:
                return h.reply(503, ("\n".join(failing) + "\n").encode(), "text/plain; charset=utf-8")
            return h.reply_text(200, "ready")
        if path == "/metrics":
            return h.reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if self.site is not None:
            if path == "/":
                flash = parse_qs(query).get("m", [None])[0]
                page = self.site.page(self.site.flashed(flash))
                return h.reply(200, page.encode(), "text/html; charset=utf-8", [
                    ("Content-Security-Policy", PAGE_CSP), ("X-Frame-Options", "DENY"),
                    ("Referrer-Policy", "no-referrer")])
            m = THUMB_RE.match(path)
            if m:
                return self._thumbnail(h, m.group(1), int(m.group(2)), m.group(3))
        h.reply_text(404, "not found")

    def _thumbnail(self, h: _Handler, key: str, run: int, name: str) -> None:
        assert self.site is not None
        path = self.site.key_image_path(key, run, name)
        if path is None:
            return h.reply_text(404, "no such key image")
        try:
            png = self.site.thumbnails.get(path)
        except ThumbnailError as exc:
            log.warning("thumbnail of study %s %s: %s", key, name, exc, extra={"study_key": key})
            return h.reply_text(404, str(exc))
        h.reply(200, png, "image/png", [("Cache-Control", "private, max-age=300")])

    def post(self, h: _Handler) -> None:
        path = h.path.partition("?")[0]
        m = RETRY_RE.match(path) if self.site is not None else None
        if m is None:
            return h.reply_text(404, "not found")
        form = h.read_form()
        status, text = self.site.retry(m.group(1), form.get("token", ""), h.client_address[0])  # type: ignore[union-attr]
        if status == 303:
            h.reply(303, b"", "text/plain; charset=utf-8", [("Location", f"/?m={text}")])
        else:
            h.reply_text(status, text)


# -- what services.py starts -------------------------------------------------------------------
def _listen(role: str, bind: str, port: int, registry: CollectorRegistry, checks: list[Check],
            site: NodeSite | None = None) -> HttpService | None:
    try:
        service = HttpService(role, bind, port, registry, checks, site).start()
    except OSError as exc:
        key = "http.port" if role == "node" else "http.worker_port"
        log.error("%s: cannot listen on %s:%d (%s): no metrics, health or status page from this %s",
                  key, bind, port, exc.strerror or exc, role)
        return None
    log.info("http on %s (%s)", service.url, "status page, /metrics, /healthz, /readyz" if site
             else "/metrics, /healthz, /readyz")
    return service


def start_node_http(settings: Settings, journal: Journal, app: Any, spool_root: Path,
                    checks: Sequence[Check] = ()) -> HttpService | None:
    """The node's server on ``http.bind:http.port`` (None when the port is 0 or taken)."""
    if not settings.http.port:
        return None
    broker = BrokerProbe(app, settings)
    registry = CollectorRegistry()
    collector = NodeCollector(journal.path, broker)
    registry.register(collector)
    # The first reading of the history is the long one (about 2 s per 100,000 studies on two
    # cores): done now, in the background, rather than by the first scrape.
    threading.Thread(target=collector.collect, name="metrics-warm-up", daemon=True).start()
    registry.register(_Info("node"))
    ProcessCollector(registry=registry)
    all_checks = [
        Check("spool", lambda: spool_writable(spool_root)),
        Check("journal", lambda: journal_answers(journal.path)),
        Check("broker", broker.check),
        *checks,
    ]
    return _listen("node", settings.http.bind, settings.http.port, registry, all_checks,
                   NodeSite(settings, journal, app, spool_root))


def start_worker_http(settings: Settings, app: Any, spool_root: Path, models: bool = True,
                      checks: Sequence[Check] = ()) -> HttpService | None:
    """An inference worker's server on ``http.bind:http.worker_port`` (None when 0 or taken).
    ``models``: the models load in this process (the solo pool), so readiness waits for them."""
    if not settings.http.worker_port:
        return None
    broker = BrokerProbe(app, settings)
    registry = worker_registry()
    registry.register(_Info("worker"))
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        ProcessCollector(registry=registry)
    all_checks = [
        Check("spool", lambda: spool_readable(spool_root)),
        Check("broker", broker.check),
        *checks,
    ]
    if models:
        all_checks.append(Check("models", lambda: models_loaded(settings)))
    return _listen("worker", settings.http.bind, settings.http.worker_port, registry, all_checks)
