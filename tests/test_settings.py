"""Settings: defaults, the TOML file, PACS_AI_* variables, validation, and
the masked effective configuration (DESIGN.md sections 5 and 10).

Every rule is checked through :func:`load_settings` on a real file, and each
error must be a :class:`ConfigError` whose one-line message names the key
(``node.port``, ``peers[0].ae_title``) or the variable.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from study_queue.errors import ConfigError, UsageError
from study_queue.settings import (
    DeliverySettings,
    HttpSettings,
    InferenceSettings,
    NodeSettings,
    OutputsSettings,
    PeerSettings,
    QueueSettings,
    Settings,
    effective_toml,
    load_settings,
    validate,
)


# -- helpers -------------------------------------------------------------------
def write_toml(tmp_path: Path, text: str, name: str = "pacs-ai.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    return load_settings(write_toml(tmp_path, text), env={} if env is None else env)


def config_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    """The message of the ConfigError that loading ``text`` must raise."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    message = str(info.value)
    assert "\n" not in message, f"a config error is one line, got {message!r}"
    return message


# -- defaults --------------------------------------------------------------------
def test_defaults_without_file_or_environment() -> None:
    s = load_settings(None, env={})
    assert s == Settings()
    n = s.node
    assert (n.ae_title, n.bind, n.port, n.spool) == ("PACS_AI", "0.0.0.0", 11112, "var/spool")
    assert (n.study_idle_timeout, n.study_max_wait, n.max_associations) == (5.0, 3600.0, 16)
    assert n.accept_unknown_callers is True
    assert (n.tls_cert, n.tls_key, n.tls_ca) == ("", "", "")
    assert s.peers == []
    assert s.delivery == DeliverySettings(return_to="sender", outbox="var/outbox", max_attempts=8)
    assert s.queue.broker_url == ""
    assert s.inference == InferenceSettings(engine="auto", models=["lung-nodule-ct", "lung-triage-ct"], batch_size=16)
    assert s.outputs == OutputsSettings(sr=True, key_images=True, seg=False)
    assert s.http == HttpSettings(bind="127.0.0.1", port=8110)
    # the defaults are themselves valid
    assert validate(Settings()) == Settings()


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "") == Settings()


def test_config_error_is_a_usage_error() -> None:
    """The CLI turns every UsageError into one line and exit status 2."""
    assert issubclass(ConfigError, UsageError)


# -- a full file -------------------------------------------------------------------
@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """Files that exist (validation checks existence; the node loads them)."""
    files = {}
    for name in ("cert.pem", "key.pem", "ca.pem"):
        files[name] = tmp_path / name
        files[name].write_text("-----BEGIN PLACEHOLDER-----\n", encoding="ascii")
    return files


def full_toml(tls_files: dict[str, Path]) -> str:
    return f"""
[node]
ae_title = "AI_NODE_16CHARS_"
bind = "127.0.0.1"
port = 11113
spool = "/srv/pacs-ai/spool"
study_idle_timeout = 2.5
study_max_wait = 600.0
max_associations = 4
accept_unknown_callers = false
tls_cert = "{tls_files['cert.pem']}"
tls_key = "{tls_files['key.pem']}"
tls_ca = "{tls_files['ca.pem']}"
ingest_processes = 2
max_pdu = 65536
acse_timeout = 10.0
dimse_timeout = 20.0
network_timeout = 30.0
shutdown_grace = 3.0
log_level = "DEBUG"

[[peers]]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

[[peers]]
ae_title = "CT_SCANNER"
host = "ct1.example.org"
port = 104

[delivery]
return_to = "ORTHANC"
outbox = "/srv/pacs-ai/outbox"
max_attempts = 3

[queue]
broker_url = "redis://:s3cret@redis.example.org:6379/0"

[inference]
engine = "onnxruntime"
models = ["lung-nodule-ct", "chest-triage"]
batch_size = 8

[outputs]
sr = false
key_images = false
seg = true

[http]
bind = "0.0.0.0"
port = 0
"""


def expected_full(tls_files: dict[str, Path]) -> Settings:
    return Settings(
        node=NodeSettings(
            ae_title="AI_NODE_16CHARS_", bind="127.0.0.1", port=11113, spool="/srv/pacs-ai/spool",
            study_idle_timeout=2.5, study_max_wait=600.0, max_associations=4,
            accept_unknown_callers=False, tls_cert=str(tls_files["cert.pem"]),
            tls_key=str(tls_files["key.pem"]), tls_ca=str(tls_files["ca.pem"]),
            ingest_processes=2, max_pdu=65536, acse_timeout=10.0, dimse_timeout=20.0,
            network_timeout=30.0, shutdown_grace=3.0, log_level="DEBUG",
        ),
        peers=[
            PeerSettings(ae_title="ORTHANC", host="127.0.0.1", port=4242),
            PeerSettings(ae_title="CT_SCANNER", host="ct1.example.org", port=104),
        ],
        delivery=DeliverySettings(return_to="ORTHANC", outbox="/srv/pacs-ai/outbox", max_attempts=3),
        queue=QueueSettings(broker_url="redis://:s3cret@redis.example.org:6379/0"),
        inference=InferenceSettings(engine="onnxruntime", models=["lung-nodule-ct", "chest-triage"],
                                    batch_size=8),
        outputs=OutputsSettings(sr=False, key_images=False, seg=True),
        http=HttpSettings(bind="0.0.0.0", port=0),
    )


def test_full_file_round_trips(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    s = load_text(tmp_path, full_toml(tls_files))
    assert s == expected_full(tls_files)
    assert isinstance(s.node.study_idle_timeout, float)
    assert s.peer("CT_SCANNER") == PeerSettings("CT_SCANNER", "ct1.example.org", 104)
    assert s.peer("NOBODY") is None


def test_integers_are_accepted_for_float_settings(tmp_path: Path) -> None:
    s = load_text(tmp_path, "[node]\nstudy_idle_timeout = 3\nstudy_max_wait = 30\n")
    assert s.node.study_idle_timeout == 3.0 and isinstance(s.node.study_idle_timeout, float)
    assert s.node.study_max_wait == 30.0


# -- every rule: a ConfigError naming the key ---------------------------------------
RULES: list[tuple[str, str, str]] = [
    # (id, TOML text, key the message must name)
    ("unknown-section", "[nope]\nx = 1\n", "nope"),
    ("unknown-key", "[node]\nnope = 1\n", "node.nope"),
    ("unknown-key-other-section", "[delivery]\nretries = 3\n", "delivery.retries"),
    ("unknown-peer-key", '[[peers]]\nae_title = "A"\nhost = "h"\nnope = 1\n', "peers[0].nope"),
    ("section-not-a-table", "node = 5\n", "node"),
    ("peers-not-an-array", 'peers = "ORTHANC"\n', "peers"),
    ("string-for-int", '[node]\nport = "11112"\n', "node.port"),
    ("float-for-int", "[node]\nmax_associations = 2.5\n", "node.max_associations"),
    ("bool-for-int", "[node]\nport = true\n", "node.port"),
    ("int-for-bool", "[node]\naccept_unknown_callers = 1\n", "node.accept_unknown_callers"),
    ("string-for-bool", '[outputs]\nseg = "yes"\n', "outputs.seg"),
    ("string-for-float", '[node]\nstudy_idle_timeout = "5"\n', "node.study_idle_timeout"),
    ("int-for-string", "[node]\nae_title = 5\n", "node.ae_title"),
    ("string-for-list", '[inference]\nmodels = "lung-nodule-ct"\n', "inference.models"),
    ("list-of-ints", "[inference]\nmodels = [1, 2]\n", "inference.models"),
    ("peer-port-string", '[[peers]]\nae_title = "A"\nhost = "h"\nport = "104"\n', "peers[0].port"),
    ("port-zero", "[node]\nport = 0\n", "node.port"),
    ("port-too-big", "[node]\nport = 65536\n", "node.port"),
    ("port-negative", "[node]\nport = -1\n", "node.port"),
    ("http-port-too-big", "[http]\nport = 70000\n", "http.port"),
    ("peer-port-out-of-range", '[[peers]]\nae_title = "A"\nhost = "h"\nport = 70000\n', "peers[0].port"),
    ("ae-title-too-long", '[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', "node.ae_title"),
    ("ae-title-backslash", '[node]\nae_title = "AI\\\\NODE"\n', "node.ae_title"),
    ("ae-title-empty", '[node]\nae_title = ""\n', "node.ae_title"),
    ("ae-title-spaces", '[node]\nae_title = "    "\n', "node.ae_title"),
    ("ae-title-control", '[node]\nae_title = "AI\\tNODE"\n', "node.ae_title"),
    ("peer-ae-title-too-long", '[[peers]]\nae_title = "ABCDEFGHIJKLMNOPQ"\nhost = "h"\n', "peers[0].ae_title"),
    ("peer-ae-title-missing", '[[peers]]\nhost = "h"\n', "peers[0].ae_title"),
    ("second-peer-ae-title-backslash",
     '[[peers]]\nae_title = "OK"\nhost = "h"\n[[peers]]\nae_title = "B\\\\AD"\nhost = "h"\n',
     "peers[1].ae_title"),
    ("peer-host-empty", '[[peers]]\nae_title = "A"\nhost = ""\n', "peers[0].host"),
    ("max-wait-below-idle", "[node]\nstudy_idle_timeout = 10.0\nstudy_max_wait = 5.0\n",
     "node.study_max_wait"),
    ("idle-timeout-zero", "[node]\nstudy_idle_timeout = 0\n", "node.study_idle_timeout"),
    ("idle-timeout-negative", "[node]\nstudy_idle_timeout = -1.0\n", "node.study_idle_timeout"),
    ("max-associations-zero", "[node]\nmax_associations = 0\n", "node.max_associations"),
    ("connections-per-address-negative", "[node]\nmax_connections_per_address = -1\n", "node.max_connections_per_address"),
    ("closed-node-without-peers", "[node]\naccept_unknown_callers = false\n", "node.accept_unknown_callers"),
    ("return-to-unknown-peer",
     '[[peers]]\nae_title = "ORTHANC"\nhost = "h"\n[delivery]\nreturn_to = "NOBODY"\n', "delivery.return_to"),
    ("return-to-without-peers", '[delivery]\nreturn_to = "ORTHANC"\n', "delivery.return_to"),
    ("max-attempts-zero", "[delivery]\nmax_attempts = 0\n", "delivery.max_attempts"),
    ("broker-url-scheme", '[queue]\nbroker_url = "amqp://guest@host//"\n', "queue.broker_url"),
    ("engine-unknown", '[inference]\nengine = "tpu"\n', "inference.engine"),
    ("batch-size-zero", "[inference]\nbatch_size = 0\n", "inference.batch_size"),
    ("key-images-zero", "[outputs]\nmax_key_images = 0\n", "outputs.max_key_images"),
    ("log-level-unknown", '[node]\nlog_level = "LOUD"\n', "node.log_level"),
    ("tls-key-without-cert", '[node]\ntls_key = "key.pem"\n', "node.tls_key"),
    ("tls-ca-without-cert", '[node]\ntls_ca = "ca.pem"\n', "node.tls_ca"),
    ("tls-cert-missing-file", '[node]\ntls_cert = "/nonexistent/pacs-ai/cert.pem"\n', "node.tls_cert"),
]


@pytest.mark.parametrize("text, key", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule_raises_config_error_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(tmp_path, text)
    assert message.startswith(f"{key}:"), f"the message should start with {key!r}: {message!r}"


def test_nan_timeouts_are_rejected(tmp_path: Path) -> None:
    """TOML has ``nan``; a NaN timeout passes ``value <= 0`` and
    ``max_wait < idle`` (every comparison with NaN is false), so a study
    would never complete and never be forced. It must be a ConfigError."""
    message = config_error(
        tmp_path, "[node]\nstudy_idle_timeout = nan\nstudy_max_wait = nan\n"
    )
    assert message.startswith("node.study_idle_timeout:") or message.startswith("node.study_max_wait:"), message


def test_tls_key_file_missing(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    text = f'[node]\ntls_cert = "{tls_files["cert.pem"]}"\ntls_key = "{tmp_path / "absent.key"}"\n'
    assert config_error(tmp_path, text).startswith("node.tls_key:")


def test_tls_ca_file_missing(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    text = f'[node]\ntls_cert = "{tls_files["cert.pem"]}"\ntls_ca = "{tmp_path / "absent-ca.pem"}"\n'
    assert config_error(tmp_path, text).startswith("node.tls_ca:")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[node]\nport = \n", name="broken.toml")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "TOML" in message


def test_duplicate_key_is_invalid_toml(tmp_path: Path) -> None:
    assert "TOML" in config_error(tmp_path, "[node]\nport = 1\nport = 2\n")


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing, env={})
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_directory_as_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, env={})
    assert str(tmp_path) in str(info.value)


# -- what is allowed at the edges ---------------------------------------------------
@pytest.mark.parametrize("title", ["A", "ABCDEFGHIJKLMNOP", "AI NODE", "a-b_c.d"])
def test_valid_ae_titles(tmp_path: Path, title: str) -> None:
    assert load_text(tmp_path, f'[node]\nae_title = "{title}"\n').node.ae_title == title


@pytest.mark.parametrize("port", [1, 104, 65535])
def test_valid_ports(tmp_path: Path, port: int) -> None:
    assert load_text(tmp_path, f"[node]\nport = {port}\n").node.port == port


def test_http_port_zero_disables(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[http]\nport = 0\n").http.port == 0


def test_max_wait_equal_to_idle_is_allowed(tmp_path: Path) -> None:
    s = load_text(tmp_path, "[node]\nstudy_idle_timeout = 7.0\nstudy_max_wait = 7.0\n")
    assert s.node.study_max_wait == 7.0


def test_closed_node_with_peers_and_return_to_a_peer(tmp_path: Path) -> None:
    s = load_text(
        tmp_path,
        '[node]\naccept_unknown_callers = false\n'
        '[[peers]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
        '[delivery]\nreturn_to = "ORTHANC"\n',
    )
    assert s.node.accept_unknown_callers is False
    assert s.delivery.return_to == "ORTHANC"
    assert s.peers == [PeerSettings("ORTHANC", "127.0.0.1", 4242)]


@pytest.mark.parametrize("return_to", ["sender", "none"])
def test_return_to_keywords(tmp_path: Path, return_to: str) -> None:
    assert load_text(tmp_path, f'[delivery]\nreturn_to = "{return_to}"\n').delivery.return_to == return_to


def test_peer_port_defaults_to_104(tmp_path: Path) -> None:
    s = load_text(tmp_path, '[[peers]]\nae_title = "CT"\nhost = "ct.example.org"\n')
    assert s.peers[0].port == 104


# -- environment -------------------------------------------------------------------
def test_env_port_is_parsed_to_int() -> None:
    s = load_settings(None, env={"PACS_AI_NODE_PORT": "1234"})
    assert s.node.port == 1234 and type(s.node.port) is int


def test_env_wins_over_file_and_overrides_win_over_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[node]\nport = 2000\nae_title = \"FROM_FILE\"\n")
    s = load_settings(path, env={"PACS_AI_NODE_PORT": "3000"})
    assert (s.node.port, s.node.ae_title) == (3000, "FROM_FILE")
    s = load_settings(path, env={"PACS_AI_NODE_PORT": "3000"}, overrides={"node": {"port": 4000, "ae_title": None}})
    assert (s.node.port, s.node.ae_title) == (4000, "FROM_FILE")


def test_env_accept_unknown_callers_false(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[[peers]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n')
    s = load_settings(path, env={"PACS_AI_NODE_ACCEPT_UNKNOWN_CALLERS": "false"})
    assert s.node.accept_unknown_callers is False


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("False", False), ("0", False),
                                         ("no", False), ("on", True)])
def test_env_booleans(text: str, value: bool) -> None:
    assert load_settings(None, env={"PACS_AI_OUTPUTS_SEG": text}).outputs.seg is value


def test_env_accept_unknown_callers_false_without_peers_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={"PACS_AI_NODE_ACCEPT_UNKNOWN_CALLERS": "false"})
    assert str(info.value).startswith("node.accept_unknown_callers:")


def test_env_list() -> None:
    assert load_settings(None, env={"PACS_AI_INFERENCE_MODELS": "a,b"}).inference.models == ["a", "b"]
    assert load_settings(None, env={"PACS_AI_INFERENCE_MODELS": " a , b ,"}).inference.models == ["a", "b"]


def test_env_float_and_string() -> None:
    s = load_settings(None, env={"PACS_AI_NODE_STUDY_IDLE_TIMEOUT": "2.5",
                                 "PACS_AI_QUEUE_BROKER_URL": "redis://localhost:6379/0"})
    assert s.node.study_idle_timeout == 2.5
    assert s.queue.broker_url == "redis://localhost:6379/0"


def test_env_other_variables_are_ignored() -> None:
    s = load_settings(None, env={"HOME": "/root", "PACS_AIX": "1", "NODE_PORT": "1"})
    assert s == Settings()


@pytest.mark.parametrize("name", ["PACS_AI_NODE_NOPE", "PACS_AI_FOO_BAR", "PACS_AI_NODE", "PACS_AI_PEERS_HOST"])
def test_env_naming_no_setting_is_an_error(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={name: "1"})
    message = str(info.value)
    assert message.startswith(f"{name}:"), message
    assert "\n" not in message


@pytest.mark.parametrize("name, value, key", [
    ("PACS_AI_NODE_PORT", "abc", "node.port"),
    ("PACS_AI_NODE_PORT", "70000", "node.port"),
    ("PACS_AI_NODE_ACCEPT_UNKNOWN_CALLERS", "maybe", "node.accept_unknown_callers"),
    ("PACS_AI_NODE_STUDY_IDLE_TIMEOUT", "soon", "node.study_idle_timeout"),
])
def test_env_bad_value_names_the_key(name: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={name: value})
    assert key in str(info.value) or name in str(info.value), str(info.value)


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_AI_NODE_PORT", "4321")
    assert load_settings(None).node.port == 4321
    monkeypatch.setenv("PACS_AI_NODE_TYPO", "1")
    with pytest.raises(ConfigError, match="PACS_AI_NODE_TYPO"):
        load_settings(None)


# -- effective configuration ------------------------------------------------------------
SECRET_URL = "redis://:s3cret@host:6379/0"


def _as_dict(s: Settings) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    for table in ("peers", "routes"):  # an empty array of tables is written as nothing
        if not d[table]:
            del d[table]
    return d


def test_effective_toml_masks_the_broker_password() -> None:
    s = load_settings(None, env={"PACS_AI_QUEUE_BROKER_URL": SECRET_URL})
    text = effective_toml(s)
    assert "s3cret" not in text
    parsed = tomllib.loads(text)
    assert parsed["queue"]["broker_url"].startswith("redis://")
    assert parsed["queue"]["broker_url"].endswith("@host:6379/0")


def test_effective_toml_masks_user_and_password() -> None:
    s = load_settings(None, env={"PACS_AI_QUEUE_BROKER_URL": "rediss://pacs:hunter2@redis.example.org:6380/1"})
    text = effective_toml(s)
    assert "hunter2" not in text
    assert "redis.example.org:6380/1" in text


def test_effective_toml_masks_a_password_containing_at() -> None:
    """A raw '@' in the password is how urllib (and so kombu/redis-py) read
    it: ``urlparse("redis://:s3@cret@host:6379/0").password == "s3@cret"``.
    No part of the password may be shown."""
    s = load_settings(None, env={"PACS_AI_QUEUE_BROKER_URL": "redis://:s3@cret@host:6379/0"})
    text = effective_toml(s)
    broker = tomllib.loads(text)["queue"]["broker_url"]
    assert "cret" not in broker, f"part of the password is shown: {broker!r}"
    assert broker.endswith("@host:6379/0"), broker


def test_effective_toml_masks_tls_key(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    s = load_text(tmp_path, full_toml(tls_files))
    text = effective_toml(s)
    parsed = tomllib.loads(text)
    assert parsed["node"]["tls_key"] == "***"
    assert str(tls_files["key.pem"]) not in text
    assert "s3cret" not in text
    # the certificate and CA are not secrets
    assert parsed["node"]["tls_cert"] == str(tls_files["cert.pem"])
    assert parsed["node"]["tls_ca"] == str(tls_files["ca.pem"])


def test_effective_toml_parses_back_to_the_same_settings(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    s = load_text(tmp_path, full_toml(tls_files))
    parsed = tomllib.loads(effective_toml(s))
    expected = _as_dict(s)
    expected["node"]["tls_key"] = "***"
    expected["queue"]["broker_url"] = parsed["queue"]["broker_url"]  # masked, checked above
    assert parsed["queue"]["broker_url"].startswith("redis://") and "s3cret" not in parsed["queue"]["broker_url"]
    assert parsed == expected


def test_effective_toml_of_defaults_loads_back_equal(tmp_path: Path) -> None:
    s = load_settings(None, env={})
    text = effective_toml(s)
    assert tomllib.loads(text) == _as_dict(s)
    assert load_text(tmp_path, text) == s


def test_effective_toml_without_secrets_loads_back_equal(tmp_path: Path) -> None:
    original = load_text(
        tmp_path,
        '[node]\nae_title = "RT"\nport = 2104\nstudy_idle_timeout = 0.25\nstudy_max_wait = 1e6\n'
        'accept_unknown_callers = false\n'
        '[[peers]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
        '[[peers]]\nae_title = "CT 2"\nhost = "::1"\n'
        '[delivery]\nreturn_to = "CT 2"\n'
        '[inference]\nmodels = []\n',
    )
    again = load_text(tmp_path, effective_toml(original))
    assert again == original


def test_effective_toml_quotes_awkward_strings(tmp_path: Path) -> None:
    original = load_settings(None, env={
        "PACS_AI_NODE_SPOOL": 'C:\\pacs "ai"\\spool ünïcode',
        "PACS_AI_DELIVERY_OUTBOX": "out\tbox",
    })
    text = effective_toml(original)
    assert tomllib.loads(text)["node"]["spool"] == 'C:\\pacs "ai"\\spool ünïcode'
    assert load_text(tmp_path, text) == original


def test_effective_toml_escapes_control_characters(tmp_path: Path) -> None:
    """A path may hold any character but NUL and '/'; TOML basic strings
    must escape control characters (TOML 1.0: U+0000-U+0008, U+000A-U+001F,
    U+007F), or check-config prints something that is not TOML."""
    for outbox in ("line\nbreak", "escape\x1b[31m", "del\x7f"):
        original = load_settings(None, env={"PACS_AI_DELIVERY_OUTBOX": outbox})
        text = effective_toml(original)
        try:
            parsed = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            pytest.fail(f"effective_toml wrote invalid TOML for outbox={outbox!r}: {exc}")
        assert parsed["delivery"]["outbox"] == outbox


def test_routes_are_validated_and_round_trip(tmp_path: Path) -> None:
    text = ('[inference]\nmodels = ["lung-nodule-ct"]\n'
            '[[routes]]\nname = "er"\ncalling_ae = "ER_CT"\npriority = "urgent"\nmodels = ["lung-nodule-ct"]\n'
            '[[routes]]\nname = "rest"\nmodality = "CT"\nseries_description = "lung|chest"\n')
    s = load_text(tmp_path, text)
    assert [(r.name, r.priority, r.models) for r in s.routes] == [("er", "urgent", ["lung-nodule-ct"]), ("rest", "normal", [])]
    assert load_text(tmp_path, effective_toml(s)) == s
    for bad, key in (('priority = "now"', "routes[0].priority"), ('action = "drop"', "routes[0].action"),
                     ('series_description = "(["', "routes[0].series_description"),
                     ('models = ["lung-triage-ct"]', "routes[0].models")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_text(tmp_path, f'[inference]\nmodels = ["lung-nodule-ct"]\n[[routes]]\n{bad}\n')
