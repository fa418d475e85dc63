"""The one typed settings object of pacs-ai (DESIGN.md section 5).

Sources, later ones winning: the defaults embedded here, the TOML file
(``--config``), environment variables ``PACS_AI_<SECTION>_<KEY>``, then the
command-line overrides. Everything is validated at start; a bad value stops
the process with one line naming the key and the rule (:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

ENV_PREFIX = "PACS_AI_"
SECRET_KEYS = {"password", "broker_url", "tls_key", "token"}


@dataclass
class NodeSettings:
    ae_title: str = "PACS_AI"
    bind: str = "0.0.0.0"
    port: int = 11112
    spool: str = "var/spool"
    study_idle_timeout: float = 5.0
    study_max_wait: float = 3600.0
    max_associations: int = 16
    max_connections_per_address: int = 16  # per ingest process; more are closed at once (0: no limit)
    accept_unknown_callers: bool = True
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    ingest_processes: int = 0  # 0 = two per core, at most 8
    max_pdu: int = 131072
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per line, with study_key)
    min_free_mb: int = 1024  # below this free space on the spool's disk, new associations are refused
    max_instance_mb: int = 2048  # a larger instance is refused (0: no limit)
    max_instances_per_study: int = 100000  # then the study takes no more (0: no limit)
    retention_days: float = 30.0  # DELIVERED and IGNORED studies are deleted after this (0: kept)


@dataclass
class PeerSettings:
    ae_title: str = ""
    host: str = ""
    port: int = 104


@dataclass
class RouteSettings:
    """One ``[[routes]]`` entry (``study_queue.routing``)."""

    name: str = ""
    calling_ae: str = ""
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    priority: str = "normal"  # normal | urgent
    models: list[str] = field(default_factory=list)  # empty: every model of inference.models
    action: str = "analyze"  # analyze | ignore


@dataclass
class DeliverySettings:
    return_to: str = "sender"
    outbox: str = "var/outbox"
    max_attempts: int = 8
    backoff_initial: float = 10.0  # seconds before the 2nd attempt; doubles each time
    backoff_max: float = 600.0  # the cap of the doubling
    timeout: float = 30.0  # connect, negotiate, and wait for each C-STORE response


@dataclass
class QueueSettings:
    broker_url: str = ""
    tls_ca: str = ""  # CA certificate(s) for a rediss:// broker; empty = the system's
    stale_after: float = 120.0  # a queued study no worker has taken is queued again after this
    max_attempts: int = 3  # analyses that die (worker killed, crash) before the study is FAILED
    visibility_timeout: float = 7200.0  # Redis: an unacknowledged message is redelivered after this


@dataclass
class InferenceSettings:
    engine: str = "auto"
    models: list[str] = field(default_factory=lambda: ["lung-nodule-ct", "lung-triage-ct"])
    batch_size: int = 16
    threads: int = 2  # ONNX Runtime intra-op threads per worker process


@dataclass
class OutputsSettings:
    sr: bool = True
    key_images: bool = True
    seg: bool = False
    max_key_images: int = 5  # key images per study, the most probable findings first


@dataclass
class HttpSettings:
    bind: str = "127.0.0.1"
    port: int = 8110  # the node: /metrics, /healthz, /readyz, the status page; 0 disables
    worker_port: int = 8111  # each inference worker: /metrics, /healthz, /readyz; 0 disables
    token: str = ""  # guards the status page's replay button; empty: no replay from the page


@dataclass
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    peers: list[PeerSettings] = field(default_factory=list)
    routes: list[RouteSettings] = field(default_factory=list)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    outputs: OutputsSettings = field(default_factory=OutputsSettings)
    http: HttpSettings = field(default_factory=HttpSettings)

    def peer(self, ae_title: str) -> PeerSettings | None:
        return next((p for p in self.peers if p.ae_title == ae_title), None)


SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "delivery": DeliverySettings,
    "queue": QueueSettings,
    "inference": InferenceSettings,
    "outputs": OutputsSettings,
    "http": HttpSettings,
}


# -- value coercion -----------------------------------------------------------
def _coerce(where: str, value: Any, typ: Any, from_env: bool) -> Any:
    """Check (file) or parse (environment) one value against its field type."""
    if typ is bool or typ == "bool":
        if isinstance(value, bool):
            return value
        if from_env and str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if from_env and str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    if typ in (int, "int", float, "float"):
        integer = typ in (int, "int")
        accepted = (int,) if integer else (int, float)
        what = "an integer" if integer else "a number"
        if isinstance(value, accepted) and not isinstance(value, bool):
            return value if integer else float(value)
        if from_env and isinstance(value, str):
            try:
                return int(value.strip()) if integer else float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: must be {what}, got {value!r}")
    if typ is str or typ == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: must be a string, got {value!r}")
    if typ == "list[str]" or typ == list[str]:
        if from_env and isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{where}: must be a list of strings, got {value!r}")
    raise ConfigError(f"{where}: unsupported setting type")


def _apply(obj: Any, section: str, values: Mapping[str, Any], from_env: bool = False) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        where = f"{section}.{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown setting (known: {', '.join(sorted(known))})")
        setattr(obj, key, _coerce(where, value, known[key].type, from_env))


def _parse_tables(value: Any, name: str, make: type, hint: str = "") -> list:
    """An array of tables (``[[peers]]``, ``[[routes]]``), each checked like a section."""
    if not isinstance(value, list):
        raise ConfigError(f"{name}: must be an array of tables ([[{name}]])")
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{name}[{i}]: must be a table{hint}")
        obj = make()
        _apply(obj, f"{name}[{i}]", item)
        items.append(obj)
    return items


def _parse_routes(value: Any) -> list[RouteSettings]:
    return _parse_tables(value, "routes", RouteSettings)


def _parse_peers(value: Any) -> list[PeerSettings]:
    return _parse_tables(value, "peers", PeerSettings, " with ae_title, host and port")


# -- validation --------------------------------------------------------------
def _check_ae_title(where: str, value: str) -> None:
    """PS3.5 Table 6.2-1, AE: 1-16 characters, no backslash or control
    characters, not only spaces."""
    if not value.strip():
        raise ConfigError(f"{where}: an AE title must not be empty")
    if len(value) > 16:
        raise ConfigError(f"{where}: an AE title has at most 16 characters, got {len(value)}")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ConfigError(f"{where}: an AE title has printable ASCII characters other than backslash")


def _check_port(where: str, value: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(f"{where}: must be a TCP port between {low} and 65535, got {value}")


def _check_positive(where: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: must be greater than 0, got {value}")


def validate(s: Settings) -> Settings:
    n = s.node
    _check_ae_title("node.ae_title", n.ae_title)
    if not n.bind.strip():
        raise ConfigError("node.bind: must be an address to listen on, e.g. 0.0.0.0")
    _check_port("node.port", n.port)
    if not n.spool.strip():
        raise ConfigError("node.spool: must be a directory path")
    for key in ("study_idle_timeout", "study_max_wait", "acse_timeout", "dimse_timeout",
                "network_timeout", "shutdown_grace"):
        _check_positive(f"node.{key}", getattr(n, key))
    if n.study_max_wait < n.study_idle_timeout:
        raise ConfigError("node.study_max_wait: must not be shorter than node.study_idle_timeout")
    if n.max_associations < 1:
        raise ConfigError(f"node.max_associations: must be at least 1, got {n.max_associations}")
    if not 0 <= n.ingest_processes <= 64:
        raise ConfigError(f"node.ingest_processes: must be 0 (auto) to 64, got {n.ingest_processes}")
    if not 4096 <= n.max_pdu <= 16 * 1024 * 1024:
        raise ConfigError(f"node.max_pdu: must be 4096 to 16777216 bytes, got {n.max_pdu}")
    if n.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"node.log_level: must be DEBUG, INFO, WARNING or ERROR, got {n.log_level!r}")
    for key in ("min_free_mb", "max_instance_mb", "max_instances_per_study", "max_connections_per_address"):
        if getattr(n, key) < 0:
            raise ConfigError(f"node.{key}: must be 0 or more, got {getattr(n, key)}")
    if n.retention_days < 0 or not math.isfinite(n.retention_days):
        raise ConfigError(f"node.retention_days: must be 0 (keep) or more, got {n.retention_days}")
    if n.log_format not in ("text", "json"):
        raise ConfigError(f"node.log_format: must be text or json, got {n.log_format!r}")
    if n.tls_key and not n.tls_cert:
        raise ConfigError("node.tls_key: set node.tls_cert too (DICOM TLS needs a certificate)")
    if n.tls_ca and not n.tls_cert:
        raise ConfigError("node.tls_ca: set node.tls_cert too (mutual TLS needs a server certificate)")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(n, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"node.{key}: file {path!r} does not exist")
    titles = set()
    for i, peer in enumerate(s.peers):
        _check_ae_title(f"peers[{i}].ae_title", peer.ae_title)
        if not peer.host.strip():
            raise ConfigError(f"peers[{i}].host: must be a host name or address")
        _check_port(f"peers[{i}].port", peer.port)
        titles.add(peer.ae_title)
    if not n.accept_unknown_callers and not s.peers:
        raise ConfigError(
            "node.accept_unknown_callers: false needs at least one [[peers]] entry, "
            "or nobody could associate"
        )
    d = s.delivery
    if d.return_to not in ("sender", "none") and d.return_to not in titles:
        raise ConfigError(
            f"delivery.return_to: must be \"sender\", \"none\" or a [[peers]] ae_title, got {d.return_to!r}"
        )
    if d.max_attempts < 1:
        raise ConfigError(f"delivery.max_attempts: must be at least 1, got {d.max_attempts}")
    if s.queue.broker_url and s.queue.broker_url.split("://")[0] not in ("redis", "rediss"):
        raise ConfigError("queue.broker_url: must be empty (embedded) or a redis:// or rediss:// URL")
    if s.queue.tls_ca and not Path(s.queue.tls_ca).is_file():
        raise ConfigError(f"queue.tls_ca: file {s.queue.tls_ca!r} does not exist")
    for key in ("stale_after", "visibility_timeout"):
        _check_positive(f"queue.{key}", getattr(s.queue, key))
    if s.queue.max_attempts < 1:
        raise ConfigError(f"queue.max_attempts: must be at least 1, got {s.queue.max_attempts}")
    for key in ("backoff_initial", "backoff_max", "timeout"):
        _check_positive(f"delivery.{key}", getattr(s.delivery, key))
    if s.delivery.backoff_max < s.delivery.backoff_initial:
        raise ConfigError("delivery.backoff_max: must not be shorter than delivery.backoff_initial")
    if not 1 <= s.inference.threads <= 256:
        raise ConfigError(f"inference.threads: must be 1 to 256, got {s.inference.threads}")
    if s.inference.engine not in ("auto", "tensorrt", "onnxruntime"):
        raise ConfigError(f"inference.engine: must be auto, tensorrt or onnxruntime, got {s.inference.engine!r}")
    if not 1 <= s.outputs.max_key_images <= 50:
        raise ConfigError(f"outputs.max_key_images: between 1 and 50, got {s.outputs.max_key_images}")
    if s.inference.batch_size < 1:
        raise ConfigError(f"inference.batch_size: must be at least 1, got {s.inference.batch_size}")
    for i, route in enumerate(s.routes):
        where = f"routes[{i}]"
        if route.priority not in ("normal", "urgent"):
            raise ConfigError(f"{where}.priority: must be normal or urgent, got {route.priority!r}")
        if route.action not in ("analyze", "ignore"):
            raise ConfigError(f"{where}.action: must be analyze or ignore, got {route.action!r}")
        if route.calling_ae:
            _check_ae_title(f"{where}.calling_ae", route.calling_ae)
        if route.series_description:
            try:
                re.compile(route.series_description)
            except re.error as exc:
                raise ConfigError(f"{where}.series_description: not a regular expression ({exc})") from None
        unknown = [m for m in route.models if m not in s.inference.models]
        if unknown:
            raise ConfigError(f"{where}.models: {', '.join(unknown)} not in inference.models (workers load only those)")
    _check_port("http.port", s.http.port, allow_zero=True)
    _check_port("http.worker_port", s.http.worker_port, allow_zero=True)
    if s.http.token and len(s.http.token) < 16:
        raise ConfigError("http.token: at least 16 characters (it guards replaying studies), or empty")
    return s


# -- loading -----------------------------------------------------------------
def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    path_name: str = "--config",
) -> Settings:
    """Defaults, then the TOML file, then ``PACS_AI_*`` variables, then overrides."""
    s = Settings()
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path_name}: file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path_name}: cannot read {str(path)!r}: {exc.strerror}") from None
        for section, values in data.items():
            if section == "peers":
                s.peers = _parse_peers(values)
                continue
            if section == "routes":
                s.routes = _parse_routes(values)
                continue
            if section not in SECTIONS:
                raise ConfigError(f"{section}: unknown section (known: {', '.join(sorted([*SECTIONS, 'peers', 'routes']))})")
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: must be a table ([{section}])")
            _apply(getattr(s, section), section, values)
    env = os.environ if env is None else env
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(f"{name}: names no setting (use PACS_AI_<SECTION>_<KEY>, e.g. PACS_AI_NODE_PORT)")
        obj = getattr(s, section)
        if key not in {f.name for f in fields(obj)}:
            raise ConfigError(f"{name}: names no setting ({section} has no key {key!r})")
        _apply(obj, section, {key: value}, from_env=True)
    for section, values in (overrides or {}).items():
        _apply(getattr(s, section), section, {k: v for k, v in values.items() if v is not None})
    return validate(s)


def _mask(key: str, value: Any) -> Any:
    if not value or not isinstance(value, str):
        return value
    if key in SECRET_KEYS or key.endswith("_password") or key.endswith("_token"):
        if "://" in value:  # keep the scheme and host of a URL, hide its credentials
            scheme, _, rest = value.partition("://")
            if "@" in rest:  # the password may itself hold "@": the host follows the last one
                return f"{scheme}://***@{rest.rpartition('@')[2]}"
            return value
        return "***"
    return value


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    out = []
    for ch in str(value):
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def effective_toml(s: Settings) -> str:
    """The effective configuration as TOML, secrets masked."""
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for k, v in dataclasses.asdict(getattr(s, section)).items():
            lines.append(f"{k} = {toml_value(_mask(k, v))}")
        lines.append("")
    for peer in s.peers:
        lines.append("[[peers]]")
        for k, v in dataclasses.asdict(peer).items():
            lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
    for route in s.routes:
        lines.append("[[routes]]")
        for k, v in dataclasses.asdict(route).items():
            lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
    return "\n".join(lines)
