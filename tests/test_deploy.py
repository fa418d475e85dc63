"""deploy/: the Dockerfile, docker-compose.yml, the systemd units, the Kubernetes manifests
and the PACS recipes agree with pacs-ai itself and with each other.

Nothing here needs Docker, a cluster or systemd: every command line they contain is given
to pacs-ai's own argument parser, every file they name must exist, the example configuration
must pass ``pacs-ai check-config``, and ports, paths, secrets and probes must match it. The
single-machine unit's ``ExecStart`` is run for real (its paths swapped for temporary ones):
it must answer a C-ECHO and stop with status 0 on SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from study_queue.cli import build_parser
from study_queue.errors import UsageError
from study_queue.settings import Settings, load_settings

from .conftest import free_port
from .nodeproc import write_config
from .redisproc import RedisProcess

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "pacs-ai.toml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
RECIPES = DEPLOY / "pacs"
VENV_PACS_AI = "/opt/pacs-ai/.venv/bin/pacs-ai"
CONFIG_PATH = "/etc/pacs-ai/pacs-ai.toml"
STATE_DIR = "/var/lib/pacs-ai"
UID = 10001
# ``pacs-ai node`` on SIGTERM: open associations get node.shutdown_grace, then each worker
# child gets max(30, shutdown_grace) (study_queue/services.py), one after the other.
CHILD_STOP = 30.0


# -- helpers ---------------------------------------------------------------------------------
def example() -> Settings:
    return load_settings(EXAMPLE, env={})


def subcommands() -> set[str]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def assert_pacs_ai_argv(argv: list[str], where: str) -> argparse.Namespace:
    """``argv`` (after the ``pacs-ai`` program) is a real subcommand with options it accepts."""
    assert argv and argv[0] in subcommands(), f"{where}: {argv[:1]} is not a pacs-ai subcommand ({sorted(subcommands())})"
    try:
        return build_parser().parse_args(argv)
    except UsageError as exc:  # one line naming the bad option
        raise AssertionError(f"{where}: pacs-ai rejects {argv}: {exc}") from None


def seconds(text: str | int) -> float:
    """A compose duration (``2m``, ``1m30s``, ``90s``) or a systemd time span in seconds (``120``)."""
    if isinstance(text, int) or str(text).isdigit():
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text).replace(" ", ""), text
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def node_stop_time(s: Settings, workers: int) -> float:
    return s.node.shutdown_grace + workers * max(CHILD_STOP, s.node.shutdown_grace)


# -- Dockerfile ------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, rest = buf.strip().partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def dockerfile_stages() -> dict[str, dict]:
    """Each named stage: its base, CMD and ENTRYPOINT (inherited from a parent stage), and
    its COPY, EXPOSE, VOLUME, USER, HEALTHCHECK instructions."""
    stages: dict[str, dict] = {}
    stage: dict | None = None
    for instr, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            base, name = m.groups()
            parent = stages.get(base)
            stage = {"base": base, "copy": [], "expose": [], "volume": [], "user": None,
                     "healthcheck": None, "entrypoint": None, "cmd": None}
            if parent:
                for key in ("entrypoint", "cmd", "expose", "volume", "user", "healthcheck"):
                    stage[key] = parent[key] if not isinstance(parent[key], list) else list(parent[key])
            stages[name] = stage
        elif stage is None:
            assert instr == "ARG", f"{instr} before the first FROM"
        elif instr in ("CMD", "ENTRYPOINT"):
            stage[instr.lower()] = json.loads(rest)  # exec form only: signals reach pacs-ai
        elif instr == "COPY":
            stage["copy"].append(rest)
        elif instr == "EXPOSE":
            stage["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif instr == "VOLUME":
            stage["volume"] += json.loads(rest) if rest.startswith("[") else rest.split()
        elif instr == "USER":
            stage["user"] = rest
        elif instr == "HEALTHCHECK":
            stage["healthcheck"] = rest
    return stages


def dockerignore_allows(path: str) -> bool:
    """deploy/Dockerfile.dockerignore: everything is excluded but the ``!`` entries."""
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert lines[0] == "*", "the ignore file starts by excluding everything"
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    path = path.rstrip("/")
    return any(path == a or path.startswith(a + "/") for a in allowed)


def test_dockerfile_stages_run_real_pacs_ai_commands_as_the_service_user():
    stages = dockerfile_stages()
    s = example()
    assert {"node", "worker-cpu", "worker-gpu"} <= set(stages)
    assert stages["node"]["base"] == "runtime" and stages["worker-cpu"]["base"] == "runtime"
    assert re.search(r"python:3\.11-slim", DOCKERFILE.read_text())
    assert re.search(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", DOCKERFILE.read_text())
    commands = {}
    for name in ("node", "worker-cpu", "worker-gpu"):
        st = stages[name]
        assert st["entrypoint"][-1] == "pacs-ai", f"{name}: ENTRYPOINT ends with pacs-ai"
        assert st["entrypoint"][0].endswith("tini"), f"{name}: an init as PID 1 passes SIGTERM on"
        args = assert_pacs_ai_argv(st["cmd"], f"Dockerfile {name} CMD")
        commands[name] = args.command
        assert args.config == CONFIG_PATH
        assert st["user"] == f"{UID}:{UID}", f"{name} runs as uid {UID}"
        assert st["volume"] == [STATE_DIR]
    assert commands == {"node": "node", "worker-cpu": "worker", "worker-gpu": "worker"}
    assert set(stages["node"]["expose"]) == {s.node.port, s.http.port}
    for name, port in (("node", s.http.port), ("worker-cpu", s.http.worker_port), ("worker-gpu", s.http.worker_port)):
        assert healthcheck_url(stages[name]) == f"http://127.0.0.1:{port}/healthz", name
        if name != "node":
            assert stages[name]["expose"] == [port]


def healthcheck_command(stage: dict) -> list[str]:
    """The exec-form HEALTHCHECK command: python -c with urllib (slim images have no curl)."""
    health = stage["healthcheck"]
    command = json.loads(health[health.index("CMD ") + 4:])
    assert command[0].endswith("python") and command[1] == "-c" and "urllib.request" in command[2], command
    return command


def healthcheck_url(stage: dict) -> str:
    [url] = re.findall(r"http://[\w.:]+/\w+", healthcheck_command(stage)[2])
    return url


def test_dockerfile_copies_every_package_and_the_example_config():
    stages = dockerfile_stages()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", pyproject["project"]["readme"]}
    for name in ("build", "worker-gpu"):  # the two stages that pip install the project
        copied = set()
        for rest in stages[name]["copy"]:
            assert not rest.startswith("--from"), rest
            *sources, _dest = json.loads(rest) if rest.startswith("[") else rest.split()
            copied |= {src.rstrip("/") for src in sources}
        assert needed <= copied, f"stage {name} does not copy {needed - copied}"
    for st in stages.values():
        for rest in st["copy"]:
            if rest.startswith("--from"):
                continue
            *sources, dest = json.loads(rest) if rest.startswith("[") else rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
                assert dockerignore_allows(src), f"COPY {src}: excluded by Dockerfile.dockerignore"
            if "deploy/pacs-ai.toml" in sources:
                assert dest == CONFIG_PATH


# -- docker compose --------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_builds_existing_targets_and_runs_real_commands():
    doc, stages, s = compose(), dockerfile_stages(), example()
    services = doc["services"]
    assert {"redis", "node", "worker-gpu"} <= set(services)
    expected = {"node": "node", "worker-gpu": "worker", "worker-cpu": "worker"}
    for name, svc in services.items():
        if "build" not in svc:
            continue
        build = svc["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages, f"{name}: target {build['target']!r} is not a Dockerfile stage"
        assert build["target"] == name, f"service {name} builds target {build['target']}"
        args = assert_pacs_ai_argv(svc["command"], f"compose {name}")
        assert args.command == expected[name] and args.config == CONFIG_PATH
        if args.command == "worker":
            assert args.queues == "inference"
        for volume in svc["volumes"]:
            source, target, *_ = volume.split(":")
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
                if target == CONFIG_PATH:
                    assert (DEPLOY / source).resolve() == EXAMPLE
            else:
                assert source in doc["volumes"], f"{name}: volume {source} is not declared"
        assert f"pacs-ai-data:{STATE_DIR}" in svc["volumes"], f"{name} has the spool at {STATE_DIR}"
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services and cond["condition"] in ("service_started", "service_healthy")
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert Path(s.node.spool).is_relative_to(STATE_DIR) and Path(s.delivery.outbox).is_relative_to(STATE_DIR)


def test_compose_redis_password_broker_url_ports_gpu_and_health():
    doc, s = compose(), example()
    services = doc["services"]
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    password = command[command.index("--requirepass") + 1]
    assert password.startswith("${REDIS_PASSWORD")
    assert "CMD" in redis["healthcheck"]["test"][0]
    for name in ("node", "worker-gpu", "worker-cpu"):
        url = services[name]["environment"]["PACS_AI_QUEUE_BROKER_URL"]
        parts = urlsplit(url.replace(password, "PW"))
        assert parts.scheme == "redis" and parts.password == "PW", url
        assert parts.hostname in services and parts.port == 6379
    node = services["node"]
    published = {int(str(p).rsplit(":", 1)[1]) for p in node["ports"]}
    assert published == {s.node.port, s.http.port}
    stages = dockerfile_stages()
    for name, stage in (("node", "node"), ("worker-gpu", "worker-gpu"), ("worker-cpu", "worker-cpu")):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1:] == ["python", *healthcheck_command(stages[stage])[1:]], name
    assert seconds(node["stop_grace_period"]) >= node_stop_time(s, workers=1)
    gpu = services["worker-gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert seconds(gpu["stop_grace_period"]) >= 300
    assert (DEPLOY / "env.example").read_text().count("REDIS_PASSWORD=") == 1


# -- Kubernetes ------------------------------------------------------------------------------
def k8s_objects() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects: dict[tuple[str, str], dict] = {}
    for resource in kustomization["resources"]:
        path = K8S / resource
        assert path.is_file(), f"kustomization names {resource}, which does not exist"
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objects, f"{key} defined twice"
                objects[key] = doc
    return objects


def pod_spec(objects, name: str) -> dict:
    return objects[("Deployment", name)]["spec"]["template"]["spec"]


def mounts_by_volume(pod: dict, container: dict) -> dict[str, tuple[dict, str]]:
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["name"]: (volumes[m["name"]], m["mountPath"]) for m in container["volumeMounts"]}


def test_kubernetes_node_and_worker_share_the_spool_and_run_real_commands():
    objects = k8s_objects()
    configmap = objects[("ConfigMap", "pacs-ai-config")]
    toml_text = configmap["data"]["pacs-ai.toml"]
    assert toml_text == EXAMPLE.read_text(), "the ConfigMap is deploy/pacs-ai.toml"
    s = example()
    pvc = objects[("PersistentVolumeClaim", "pacs-ai-spool")]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    spool_paths = {}
    for name, command in (("pacs-ai-node", "node"), ("pacs-ai-worker-gpu", "worker")):
        pod = pod_spec(objects, name)
        [container] = pod["containers"]
        args = assert_pacs_ai_argv(container["args"], f"kubernetes {name} args")
        assert args.command == command
        mounts = mounts_by_volume(pod, container)
        [spool] = [(v, p) for v, p in mounts.values() if v.get("persistentVolumeClaim")]
        assert spool[0]["persistentVolumeClaim"]["claimName"] == "pacs-ai-spool"
        spool_paths[name] = spool[1]
        [config] = [(v, p) for v, p in mounts.values() if v.get("configMap")]
        assert config[0]["configMap"]["name"] == "pacs-ai-config"
        assert Path(args.config).parent == Path(config[1]) and Path(args.config).name in configmap["data"]
        [broker] = [e for e in container["env"] if e["name"] == "PACS_AI_QUEUE_BROKER_URL"]
        ref = broker["valueFrom"]["secretKeyRef"]
        assert ref["key"] in objects[("Secret", ref["name"])]["stringData"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] == UID and security["fsGroup"] == UID
        assert pod["terminationGracePeriodSeconds"] >= (node_stop_time(s, 1) if command == "node" else 300)
    assert set(spool_paths.values()) == {STATE_DIR}, f"the spool at the same path: {spool_paths}"
    assert Path(s.node.spool).is_relative_to(STATE_DIR) and Path(s.delivery.outbox).is_relative_to(STATE_DIR)
    node = objects[("Deployment", "pacs-ai-node")]["spec"]
    assert node["replicas"] == 1 and node["strategy"]["type"] == "Recreate"
    [worker] = pod_spec(objects, "pacs-ai-worker-gpu")["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {"http": s.http.worker_port}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_kubernetes_probes_ports_services_and_images():
    objects, s = k8s_objects(), example()
    [node] = pod_spec(objects, "pacs-ai-node")["containers"]
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    assert ports == {"dicom": s.node.port, "http": s.http.port}
    assert s.http.bind == "0.0.0.0", "probes reach the pod's address, not 127.0.0.1"
    assert node["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert node["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service_ports = {(name, p["port"]) for (kind, name), o in objects.items() if kind == "Service"
                     for p in o["spec"]["ports"]}
    assert {("pacs-ai", s.node.port), ("pacs-ai", s.http.port), ("pacs-ai-dicom", s.node.port)} <= service_ports
    dicom = objects[("Service", "pacs-ai-dicom")]["spec"]
    assert dicom["externalTrafficPolicy"] == "Local"  # the PACS's own address for [[peers]] checks
    # The images kustomize retargets are the ones compose builds from the Dockerfile's targets.
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    built = {svc["image"].split(":")[0] for svc in compose()["services"].values() if "build" in svc}
    renamed = {i["name"] for i in kustomization["images"]}
    for name in ("pacs-ai-node", "pacs-ai-worker-gpu"):
        [container] = pod_spec(objects, name)["containers"]
        assert container["image"] in built and container["image"] in renamed


def test_kubernetes_redis_and_the_broker_secret_agree():
    objects = k8s_objects()
    secret = objects[("Secret", "pacs-ai-broker")]["stringData"]
    url = urlsplit(secret["broker-url"])
    assert url.scheme == "redis" and url.password == secret["redis-password"]
    service = objects[("Service", url.hostname)]
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    [redis] = [o for (kind, _), o in objects.items() if kind in ("Deployment", "StatefulSet")
               and o["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis:7")]
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    variable = re.fullmatch(r"\$\((\w+)\)", args[args.index("--requirepass") + 1]).group(1)
    [env] = [e for e in container["env"] if e["name"] == variable]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "pacs-ai-broker", "key": "redis-password"}


# -- systemd ---------------------------------------------------------------------------------
def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> every value given (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNITS = {"pacs-ai-node.service": "node", "pacs-ai-worker@.service": "worker", "pacs-ai.service": "run"}


@pytest.mark.parametrize("unit_name", sorted(UNITS))
def test_systemd_unit_runs_a_real_command_as_pacsai_hardened(unit_name):
    unit = parse_unit(SYSTEMD / unit_name)
    service = unit["Service"]
    one = {k: v[-1] for k, v in service.items()}
    [exec_start] = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == VENV_PACS_AI
    args = assert_pacs_ai_argv(argv[1:], f"{unit_name} ExecStart")
    assert args.command == UNITS[unit_name] and args.config == CONFIG_PATH
    assert one["User"] == "pacsai" and one["StateDirectory"] == "pacs-ai" and one["WorkingDirectory"] == STATE_DIR
    assert one["KillSignal"] == "SIGTERM" and one["KillMode"] == "mixed" and one["Restart"] == "on-failure"
    assert one["NoNewPrivileges"] == "yes" and one["ProtectSystem"] == "strict" and one["PrivateTmp"] == "yes"
    assert one["UMask"] == "0077" and STATE_DIR in one["ReadWritePaths"].split()
    s = example()
    needed = {"node": node_stop_time(s, 1), "run": node_stop_time(s, 2), "worker": 300}[args.command]
    assert seconds(one["TimeoutStopSec"]) >= needed, f"{unit_name}: TimeoutStopSec below {needed} s"
    for env_file in service.get("EnvironmentFile", []):
        assert env_file.startswith("-"), "the environment file is optional"
    environment = dict(e.split("=", 1) for e in service.get("Environment", []))
    if args.command == "worker":
        assert environment["CUDA_VISIBLE_DEVICES"] == "%i" and args.queues == "inference"
        assert "PrivateDevices" not in one, "a GPU worker needs /dev/nvidia*"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def wait_ready(url: str, deadline: float, log_path: Path) -> None:
    """Poll a /readyz until it answers 200 (what the Kubernetes readiness probes wait for)."""
    import urllib.error
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                assert answer.read().strip() == b"ready"
                return
        except urllib.error.HTTPError as exc:
            reason = exc.read().decode(errors="replace")
        except OSError as exc:
            reason = str(exc)
        assert time.monotonic() < deadline, f"{url}: {reason}\n" + log_path.read_text()[-3000:]
        time.sleep(0.3)


@pytest.mark.slow
def test_the_single_machine_unit_starts_answers_c_echo_and_stops_with_status_0(tmp_path):
    """pacs-ai.service's ExecStart, WorkingDirectory, Environment and UMask, with the
    example configuration (ports and paths made local) and the broker URL from the
    environment as /etc/pacs-ai/pacs-ai.env gives it: a Redis with a password."""
    service = parse_unit(SYSTEMD / "pacs-ai.service")["Service"]
    s = example()
    state, cache = tmp_path / "state", tmp_path / "cache"
    state.mkdir()
    data = tomllib.loads(EXAMPLE.read_text())
    node = {**data["node"], "spool": str(state / "spool"), "bind": "127.0.0.1", "port": free_port()}
    sections = {k: dict(v) for k, v in data.items() if k not in ("node", "peers")}
    sections["delivery"]["outbox"] = str(state / "outbox")
    sections["http"] = {**sections["http"], "bind": "127.0.0.1", "port": free_port(), "worker_port": free_port()}
    peers = [{**p, "host": "127.0.0.1"} for p in data["peers"]]
    config = write_config(tmp_path / "pacs-ai.toml", node, peers, sections)
    swap = {VENV_PACS_AI: None, CONFIG_PATH: str(config)}
    argv = [sys.executable, "-m", "study_queue.cli"]
    argv += [swap.get(a, a) for a in shlex.split(service["ExecStart"][0])[1:]]
    assert str(config) in argv
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    for assignment in service.get("Environment", []):
        key, value = assignment.split("=", 1)
        env[key] = str(cache) if value == "/var/cache" else value
    assert service["WorkingDirectory"] == [STATE_DIR]
    umask = int(service["UMask"][0], 8)
    password = "deploy-unit-pw"
    redis = RedisProcess(tmp_path / "redis", password=password).start()
    env["PACS_AI_QUEUE_BROKER_URL"] = redis.url
    log_path = tmp_path / "unit.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, cwd=state, env=env, stdout=log, stderr=log,
                            preexec_fn=lambda: os.umask(umask))
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"exited with {proc.returncode}: {log_path.read_text()[-3000:]}"
            ae = AE(ae_title=s.peers[0].ae_title)  # a [[peers]] entry: accept_unknown_callers is false
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", node["port"], ae_title=s.node.ae_title)
            if assoc.is_established:
                assert assoc.send_c_echo().Status == 0x0000
                assoc.release()
                break
            assert time.monotonic() < deadline, "no C-ECHO answer: " + log_path.read_text()[-3000:]
            time.sleep(0.3)
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(Verification)
        assert stranger.associate("127.0.0.1", node["port"], ae_title=s.node.ae_title).is_rejected
        assert (state / "spool" / "journal.sqlite").exists()
        assert (state / "spool" / "journal.sqlite").stat().st_mode & 0o077 == 0, "UMask=0077 applies"
        # The images' HEALTHCHECK command, pointed at this node's and its inference worker's ports.
        # Docker does not count failures inside --start-period (the worker loads its models
        # before it serves HTTP), so the command is run once the process says it is ready, as
        # Docker's first counted check would be.
        stages = dockerfile_stages()
        for stage, port in (("node", sections["http"]["port"]), ("worker-cpu", sections["http"]["worker_port"])):
            wait_ready(f"http://127.0.0.1:{port}/readyz", deadline, log_path)
            code = healthcheck_command(stages[stage])[2].replace(healthcheck_url(stages[stage]),
                                                                 f"http://127.0.0.1:{port}/healthz")
            check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
            assert check.returncode == 0, f"{stage} HEALTHCHECK: {check.stderr[-2000:]}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(seconds(service["TimeoutStopSec"][0])) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        redis.stop()
    text = log_path.read_text(errors="replace")
    assert "pacs-ai run ready" in text and password not in text


# -- the example configuration and the PACS recipes --------------------------------------------
def test_the_example_configuration_passes_check_config_with_the_broker_password_from_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    env["PACS_AI_QUEUE_BROKER_URL"] = "redis://:s3cret-Broker_pw@redis:6379/0"
    out = subprocess.run([sys.executable, "-m", "study_queue.cli", "check-config", str(EXAMPLE)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert 'broker_url = "redis://***@redis:6379/0"' in out.stdout and "s3cret" not in out.stdout
    s = example()
    assert s.node.spool == f"{STATE_DIR}/spool" and s.delivery.outbox == f"{STATE_DIR}/outbox"
    assert s.http.bind == "0.0.0.0" and [p.ae_title for p in s.peers] == ["ORTHANC"]
    assert urlsplit(s.queue.broker_url).hostname == "redis" and urlsplit(s.queue.broker_url).password is None
    assert "redis" in compose()["services"]


def test_the_orthanc_recipe_names_pacs_ai_as_configured():
    s = example()
    entries = json.loads((RECIPES / "orthanc" / "pacs-ai-modality.json").read_text())["DicomModalities"]
    [(name, entry)] = entries.items()
    assert entry["AET"] == s.node.ae_title and entry["Port"] == s.node.port and entry["AllowStore"] is True
    lua = (RECIPES / "orthanc" / "autorouting.lua").read_text()
    assert re.search(r"^function OnStoredInstance\(instanceId, tags, metadata, origin\)$", lua, re.MULTILINE)
    assert re.search(rf"^local PACS_AI_MODALITY = '{name}'", lua, re.MULTILINE)
    assert re.search(rf"^local PACS_AI_AET = '{s.node.ae_title}'", lua, re.MULTILINE)
    assert "SendToModality(instanceId, PACS_AI_MODALITY)" in lua
    assert "origin['RequestOrigin']" in lua and "origin['RemoteAet']" in lua
    # The JSON shown in orthanc.md is the file's entry.
    md = (RECIPES / "orthanc.md").read_text()
    [snippet] = re.findall(r"```json\n(.*?)```", md, re.DOTALL)
    shown = json.loads("{" + snippet + "}")
    assert shown["DicomModalities"] == entries and shown["LuaScripts"]


RECIPE_DOCS = ["orthanc.md", "dcm4chee.md", "modality-storescu.md"]


@pytest.mark.parametrize("doc", RECIPE_DOCS)
def test_each_recipe_names_ae_titles_ports_and_what_to_check_on_rejection(doc, tmp_path):
    s = example()
    text = (RECIPES / doc).read_text()
    assert s.node.ae_title in text and str(s.node.port) in text
    rejected = text.split("## When the association is rejected", 1)
    assert len(rejected) == 2, f"{doc} has a 'When the association is rejected' section"
    for needle in ("[[peers]]", "accept_unknown_callers", "called", s.node.ae_title, "firewall"):
        assert needle in rejected[1], f"{doc}: the rejection checklist does not mention {needle}"
    extra = {"orthanc.md": ["DicomModalities", "DicomAlwaysAllowStore", "LuaScripts"],
             "dcm4chee.md": ["dcmExportRule", "dcmURI", "dicomAETitle", "dcmExporterID"],
             "modality-storescu.md": ["storescu", "-aec PACS_AI", "TCP_NODELAY=1"]}[doc]
    for needle in extra:
        assert needle in text, f"{doc} does not mention {needle}"
    # Its TOML snippets are valid pacs-ai configuration.
    for i, snippet in enumerate(re.findall(r"```toml\n(.*?)```", text, re.DOTALL)):
        path = tmp_path / f"snippet{i}.toml"
        path.write_text(snippet)
        load_settings(path, env={})


def markdown_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.md"))


def test_every_pacs_ai_command_in_the_documents_is_accepted_by_pacs_ai():
    seen = 0
    for path in markdown_files():
        for block in re.findall(r"```(?:sh|bash)\n(.*?)```", path.read_text(), re.DOTALL):
            for line in block.splitlines():
                words = shlex.split(line.split("#", 1)[0]) if "pacs-ai" in line else []
                segment: list[str] = []  # the words of the current command, up to | && ; ||
                for word in words + [";"]:
                    if word not in ("|", "&&", ";", "||"):
                        segment.append(word)
                        continue
                    program = [i for i, w in enumerate(segment) if w == "pacs-ai" or w.endswith("/bin/pacs-ai")]
                    # `systemctl enable pacs-ai`, `kubectl -n pacs-ai`: a unit, a namespace.
                    if program and not {"systemctl", "journalctl", "kubectl"} & set(segment):
                        argv = segment[program[0] + 1:]
                        argv = argv[:argv.index(">")] if ">" in argv else argv
                        assert_pacs_ai_argv(argv, f"{path.relative_to(ROOT)}: {line.strip()}")
                        seen += 1
                    segment = []
    assert seen >= 8


def test_every_deploy_path_the_documents_and_files_name_exists():
    texts = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / "README.md"]
    missing = []
    for path in texts:
        for ref in re.findall(r"\bdeploy/[\w./@-]*[\w@-]", path.read_text(errors="replace")):
            if ref != "deploy/.env" and not (ROOT / ref).exists():  # .env: the user's copy of env.example
                missing.append(f"{path.relative_to(ROOT)} names {ref}")
    assert not missing, missing
