#!/usr/bin/env python3
"""End-to-end benchmark: DCMTK ``storescu`` -> ``pacs-ai node`` + Redis + workers -> a PACS.

Two measurements, each with real processes (``tests.nodeproc``, ``tests.redisproc``) and
a pynetdicom storage SCP in this process standing in for the PACS (``tests.e2e.conftest``),
registered as the ``[[peers]]`` entry of the sending AE (``CT_SCANNER``), so the results go
back to the sender (``delivery.return_to = "sender"``):

* latency: a 300-slice phantom CT study (``pacs-ai phantom``) sent by ``storescu``, one at
  a time, to ``pacs-ai node`` on Redis with one ``pacs-ai worker``. Measured from the exit
  of ``storescu`` (the last instance acknowledged) to the C-STORE of the SR arriving at
  the PACS, and split per stage from the journal's history (``pacs-ai status --study KEY
  --json``), the worker's ``result.json`` (``timings_s``, and its mtime as the end of the
  analysis) and the PACS's arrival times:

    completion wait  ack -> COMPLETE         (the idle timeout and the completion poll)
    publish          COMPLETE -> QUEUED      (analyze message to Redis)
    queue wait       QUEUED -> worker start  (result.json mtime - worker_total)
    load             scan + load             (timings_s)
    inference        preprocess/infer/postprocess of every model
    report           worker_total - the analysis' total (SR, key images, KOS, validation, writes)
    worker other     the analysis' total - scan, load and model stages (series selection...)
    hand-off         worker end -> ANALYZED  (deliver message to the node's delivery worker)
    delivery         ANALYZED -> SR stored   (outbox copy, association, C-STORE)

  The stages add up to the end-to-end figure. The reference, measured in the same run
  once the node is stopped, is ``pacs-ai analyze`` of the same study (a fresh process: imports,
  model load, the same analysis and reports, no network): the ratio is end-to-end minus
  the idle timeout over it.

* throughput: 20 smaller phantom studies sent back to back by 4 concurrent ``storescu``
  processes (5 studies each, one association per study), with 1 and then 2 ``pacs-ai
  worker`` processes on the ``inference`` queue (a fresh Redis, spool and PACS for each):
  studies/hour from the first send to the last SR at the PACS, and a check that nothing
  was lost or duplicated: exactly one SR per StudyInstanceUID at the PACS, no SOP Instance
  UID stored twice (C-STORE requests are counted, not only instances), every study
  DELIVERED in the journal, and as many objects at the PACS as the journal's outputs.
  The runs are interleaved (1, 2, then 2, 1) ``--repeat`` times (default 2) for medians.

Every run prints the CPU seconds other processes used in its window, and is flagged
"noisy" when they took more than 10% of the machine.

Phantoms are cached under ``bench/out/cache/e2e/``. The node and workers run from a snapshot
of the sources (``bench/out/snapshot/<hash>``, as ``bench/ingest.py``); ``--rev REV`` runs a
committed revision instead (``git archive``), ``--live-code`` the working tree. Raw figures
go to ``--out`` (default ``bench/out/e2e.json``).

Exit status: 0 when every study was delivered once, 1 when something was lost,
duplicated or failed, 2 on a setup error, 130 on Ctrl-C. Every process started here is
stopped on the way out.
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.ingest import (
    NODE_PACKAGES,
    code_hash,
    snapshot_code,
    system_busy_seconds,
    tree_cpu_seconds,
)
from tests.conftest import free_port
from tests.e2e.conftest import StorageSCP
from tests.nodeproc import NodeProcess, WorkerProcess
from tests.redisproc import RedisProcess

DEFAULT_OUT = BENCH_DIR / "out"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SENDER_AET = "CT_SCANNER"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR, what the node sends
TERMINAL = ("DELIVERED", "FAILED", "IGNORED")
WORKER_LINE = re.compile(r"study ([0-9a-f]{16}) run (\d+): (analyzed|ignored|failed)\b")
ALREADY_LINE = re.compile(r"study ([0-9a-f]{16}) run (\d+): already analysed")
LOG_LEVEL_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (WARNING|ERROR|CRITICAL) (.*)$")

#: latency stages, in order; they add up to ack -> SR stored
#: whether the node's sources have http.worker_port (set by main from the code it runs)
WORKER_HTTP_PORT = False

#: a run in which other processes used more than this share of the machine is flagged as noisy
NOISY = 0.10

STAGES = ("completion wait", "publish", "queue wait", "load", "inference", "report", "worker other",
          "hand-off", "delivery")


class BenchError(Exception):
    """A setup problem: one line on stderr, exit status 2."""


def _on_sigterm(_signo: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def snapshot_rev(out: Path, rev: str) -> tuple[Path, str]:
    """The node's packages as committed at git revision ``rev`` (``git archive``), in
    out/snapshot/rev-<sha>: for a run while the working tree is half edited."""
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise BenchError(f"--rev {rev}: not a commit ({r.stderr.strip()})")
    sha = r.stdout.strip()
    dest = out / "snapshot" / f"rev-{sha[:12]}"
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha, *NODE_PACKAGES],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        (dest / ".complete").write_text("")
    return dest, sha[:12]


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # without it DCMTK waits ~40 ms per message (FIELD-NOTES.md)
    return env


def cli(*args: str) -> list[str]:
    """``pacs-ai ARGS`` as this interpreter runs it: PYTHONPATH, so the snapshot, applies, as long
    as the current directory is not the repository root (``-m`` puts it first on sys.path)."""
    return [sys.executable, "-m", "study_queue.cli", *args]


# ============================================================================
# phantoms (cached under bench/out/cache/e2e)
# ============================================================================
class Phantom:
    def __init__(self, folder: Path, seed: int, slices: int) -> None:
        from pydicom import dcmread

        self.folder = folder
        self.seed = seed
        self.slices = slices
        self.files = sorted(folder.glob("*.dcm"))
        self.nbytes = sum(f.stat().st_size for f in self.files)
        self.study_uid = str(dcmread(self.files[0], stop_before_pixels=True).StudyInstanceUID)


def phantom(cache: Path, seed: int, slices: int, nodules: int) -> Phantom:
    folder = cache / f"phantom-s{seed}-n{slices}-k{nodules}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        tmp = cache / f".tmp-{folder.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run(cli("phantom", "--out", str(tmp), "--seed", str(seed), "--slices", str(slices),
                               "--nodules", str(nodules)), capture_output=True, text=True, cwd=cache, check=False)
        if r.returncode != 0:
            raise BenchError(f"pacs-ai phantom --seed {seed} failed: {r.stderr.strip()[-500:]}")
        (tmp / ".complete").write_text("")
        tmp.rename(folder)
    return Phantom(folder, seed, slices)


def phantoms(cache: Path, seeds: range, slices: int, nodules: int) -> list[Phantom]:
    cache.mkdir(parents=True, exist_ok=True)
    todo = [s for s in seeds if not (cache / f"phantom-s{s}-n{slices}-k{nodules}" / ".complete").exists()]
    if todo:
        print(f"  writing {len(todo)} phantom(s) of {slices} slices (cached for next time) ...", flush=True)
    return [phantom(cache, s, slices, nodules) for s in seeds]


# ============================================================================
# the PACS: a StorageSCP that notes when each C-STORE arrived
# ============================================================================
class TimedPACS(StorageSCP):
    """``tests.e2e.conftest.StorageSCP`` plus one record per C-STORE request:
    (time stored, SOP Instance UID, StudyInstanceUID, SOP Class UID)."""

    def __init__(self, port: int) -> None:
        super().__init__(port, ae_title="PACS")
        self.log: list[tuple[float, str, str, str]] = []

    def _on_store(self, event):
        status = super()._on_store(event)
        ds = event.dataset  # decoded by StorageSCP._on_store
        with self.lock:
            self.log.append((time.time(), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SOPClassUID)))
        return status

    def records(self) -> list[tuple[float, str, str, str]]:
        with self.lock:
            return list(self.log)

    def first_sr(self, study_uid: str) -> float | None:
        times = [t for t, _sop, st, cls in self.records() if st == study_uid and cls == SR_CLASS]
        return min(times) if times else None

    def srs_by_study(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = collections.defaultdict(set)
        for _t, sop, st, cls in self.records():
            if cls == SR_CLASS:
                out[st].add(sop)
        return out


# ============================================================================
# one deployment: Redis + pacs-ai node + N workers + the PACS
# ============================================================================
class Deployment:
    def __init__(self, workdir: Path, workers: int, idle_timeout: float, ingest_processes: int) -> None:
        self.workdir = workdir
        self.n_workers = workers
        self.idle_timeout = idle_timeout
        self.ingest_processes = ingest_processes
        self.redis: RedisProcess | None = None
        self.pacs: TimedPACS | None = None
        self.node: NodeProcess | None = None
        self.workers: list[WorkerProcess] = []

    def start(self) -> Deployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisProcess(self.workdir / "redis").start()
        self.pacs = TimedPACS(free_port()).start()
        self.node = NodeProcess(
            self.workdir, command="node",
            peers=[{"ae_title": SENDER_AET, "host": "127.0.0.1", "port": self.pacs.port}],
            sections={"queue": {"broker_url": self.redis.url},
                      "delivery": {"outbox": str(self.workdir / "outbox")},
                      # the node's metrics/status page on a free port, not the fixed default
                      # (another node on this machine may hold it)
                      "http": {"port": free_port()}},
            study_idle_timeout=self.idle_timeout, ingest_processes=self.ingest_processes,
            shutdown_grace=10.0,
        )
        self.node.start(timeout=60)
        for i in range(self.n_workers):
            # Each worker's own metrics port (http.worker_port, where the sources have it): the
            # workers share one config file, and two on one host would both take the default.
            saved = os.environ.get("PACS_AI_HTTP_WORKER_PORT")
            if WORKER_HTTP_PORT:
                os.environ["PACS_AI_HTTP_WORKER_PORT"] = str(free_port())
            try:
                self.workers.append(WorkerProcess(self.node, name=f"worker{i + 1}").start())
            finally:
                if saved is None:
                    os.environ.pop("PACS_AI_HTTP_WORKER_PORT", None)
                else:
                    os.environ["PACS_AI_HTTP_WORKER_PORT"] = saved
        self.wait_consumers(1 + self.n_workers)  # the node's delivery worker + ours
        return self

    def wait_consumers(self, n: int, timeout: float = 120.0) -> None:
        """Until ``n`` Redis clients block in BRPOP (a Celery worker waiting for messages):
        the workers have loaded their models and consume; the first study's queue wait
        must not include a worker's start."""
        assert self.redis is not None
        client = self.redis.client()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for w in self.workers:
                    if not w.alive():
                        raise RuntimeError(f"{w.stderr_path.name} exited: {w.log_text()[-2000:]}")
                if sum(1 for c in client.client_list() if c.get("cmd") == "brpop") >= n:
                    return
                time.sleep(0.2)
        finally:
            client.close()
        raise RuntimeError(f"{n} consumers not waiting on Redis after {timeout:.0f} s")

    def pids(self) -> dict[str, int]:
        out = {}
        if self.node and self.node.proc:
            out["node"] = self.node.proc.pid
        for w in self.workers:
            if w.proc:
                out[w.stderr_path.stem] = w.proc.pid
        if self.redis and self.redis.proc:
            out["redis"] = self.redis.proc.pid
        return out

    def cpu(self) -> dict[str, float]:
        return {name: tree_cpu_seconds(pid) for name, pid in self.pids().items()}

    def status(self, key: str | None = None) -> Any:
        assert self.node is not None
        return self.node.status(key)

    def problems(self) -> list[str]:
        """WARNING/ERROR lines of the node's and workers' logs (spool/logs), and anything on a
        process's stderr that is not a log line (tracebacks, Python warnings), with counts."""
        counts: collections.Counter = collections.Counter()
        texts: list[str] = []
        if self.node is not None:
            for f in sorted((self.node.spool / "logs").glob("*.log*")):
                texts += f.read_text(errors="replace").splitlines()
            for line in texts:
                m = LOG_LEVEL_LINE.match(line)
                if m:
                    counts[f"{m.group(1)} {re.sub(r'[0-9a-f]{16}', 'KEY', m.group(2))}"[:300]] += 1
            stderrs = [self.node.stderr_path] + [w.stderr_path for w in self.workers]
            for path in stderrs:
                if not path.exists():
                    continue
                for line in path.read_text(errors="replace").splitlines():
                    if re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) or not line.strip():
                        continue
                    if re.search(r"Traceback|[A-Z]\w*(Error|Warning)\b|\b(Error|Warning)\b", line):
                        counts[f"{path.name}: {line.strip()}"[:300]] += 1
        return [f"{line}" + (f"  (x{n})" if n > 1 else "") for line, n in counts.most_common()]

    def worker_counts(self) -> dict[str, dict[str, int]]:
        """Per worker: studies it analysed, and messages it found already analysed."""
        out = {}
        for w in self.workers:
            text = w.log_text()
            out[w.stderr_path.stem] = {
                "analysed": len(WORKER_LINE.findall(text)),
                "already_analysed": len(ALREADY_LINE.findall(text)),
            }
        return out

    def stop(self) -> None:
        for w in self.workers:
            try:
                w.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"  (stopping {w.stderr_path.stem}: {exc})", file=sys.stderr)
        if self.node is not None:
            try:
                self.node.stop(timeout=40)
            except Exception as exc:  # noqa: BLE001
                print(f"  (stopping the node: {exc})", file=sys.stderr)
        if self.pacs is not None:
            self.pacs.stop()
        if self.redis is not None:
            self.redis.stop()


def own_cpu() -> float:
    """CPU seconds of this process and its reaped children (storescu, pacs-ai status)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def other_cpu(dep: Deployment, before: tuple[float, float, dict[str, float]]) -> float:
    """CPU seconds the rest of the machine used since ``before`` (a noisy run shows here)."""
    busy0, own0, trees0 = before
    trees1 = dep.cpu()
    ours = sum(trees1.get(k, 0.0) - trees0.get(k, 0.0) for k in trees1) + own_cpu() - own0
    return system_busy_seconds() - busy0 - ours


def cpu_mark(dep: Deployment) -> tuple[float, float, dict[str, float]]:
    return system_busy_seconds(), own_cpu(), dep.cpu()


def storescu(port: int, files: list[Path]) -> tuple[float, float, str | None]:
    """Send ``files`` on one association; (start, exit) as time.time(), and an error or None."""
    cmd = ["storescu", "-aet", SENDER_AET, "-aec", "PACS_AI", "127.0.0.1", str(port), *map(str, files)]
    t0 = time.time()
    r = subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=900, check=False)
    t1 = time.time()
    err = None if r.returncode == 0 else f"storescu exited {r.returncode}: {r.stderr.strip()[-300:]}"
    return t0, t1, err


def wait_until(pred, what: str, timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_delivered(dep: Deployment, study_uid: str, timeout: float) -> str:
    """The study's key, once the journal has it DELIVERED."""
    def done():
        for s in dep.status():
            if s["study_uid"] == study_uid and s["state"] in TERMINAL:
                return s
        return None

    s = wait_until(done, "the journal's DELIVERED", timeout, interval=0.25)
    if s["state"] != "DELIVERED":
        raise RuntimeError(f"study {s['study_key']} ended {s['state']}: {s['reason']}")
    return s["study_key"]


# ============================================================================
# latency
# ============================================================================
def stages_of(dep: Deployment, key: str, t_ack: float, t_sr: float) -> dict[str, Any]:
    """Split ack -> SR stored into STAGES (seconds), from the journal and result.json."""
    doc = dep.status(key)
    hist = doc["history"]

    def first(to: str, frm: str | None = None) -> float:
        for h in hist:
            if h["to_state"] == to and (frm is None or h["from_state"] == frm):
                return float(h["at"])
        raise RuntimeError(f"study {key}: no {to} in the history {[h['to_state'] for h in hist]}")

    t_complete, t_queued = first("COMPLETE"), first("QUEUED", "COMPLETE")
    t_analyzed, t_delivered = first("ANALYZED"), first("DELIVERED")
    assert dep.node is not None
    result_path = dep.node.spool / "work" / key / f"run-{doc['study']['run']}" / "result.json"
    result = json.loads(result_path.read_text())
    tm = result["timings_s"]
    t_wend = result_path.stat().st_mtime
    t_wstart = t_wend - tm["worker_total"]
    load = tm.get("scan", 0.0) + tm.get("load", 0.0)
    inference = sum(v for k, v in tm.items() if k.split(":")[0] in ("preprocess", "infer", "postprocess"))
    report = tm["worker_total"] - tm["total"]
    stages = {
        "completion wait": t_complete - t_ack,
        "publish": t_queued - t_complete,
        "queue wait": t_wstart - t_queued,
        "load": load,
        "inference": inference,
        "report": report,
        "worker other": tm["total"] - load - inference,
        "hand-off": t_analyzed - t_wend,
        "delivery": t_sr - t_analyzed,
    }
    last_received = doc["study"].get("last_received_at")
    return {
        "study_key": key,
        "stages_s": {k: round(v, 4) for k, v in stages.items()},
        "end_to_end_s": round(t_sr - t_ack, 4),
        "stages_sum_s": round(sum(stages.values()), 4),
        "timings_s": tm,
        "delivered_after_sr_s": round(t_delivered - t_sr, 4),
        "last_instance_to_ack_s": round(t_ack - last_received, 4) if last_received else None,
        "findings": result.get("findings"),
        "outputs": len(result.get("outputs", [])),
        "history": [(round(h["at"] - t_ack, 3), h["from_state"], h["to_state"], h["reason"]) for h in hist],
    }


def run_latency(args: argparse.Namespace, studies: list[Phantom], warm: Phantom | None, workroot: Path) -> dict:
    dep = Deployment(workroot / "latency", 1, args.idle_timeout, args.ingest_processes)
    runs: list[dict] = []
    try:
        dep.start()
        assert dep.pacs is not None and dep.node is not None
        if warm is not None:
            t0, t_ack, err = storescu(dep.node.port, warm.files)
            if err:
                raise RuntimeError(f"warm-up: {err}")
            t_sr = wait_until(lambda: dep.pacs.first_sr(warm.study_uid), "the warm-up SR", args.timeout)
            wait_delivered(dep, warm.study_uid, args.timeout)
            print(f"  warm-up ({warm.slices} slices, not measured): last ack -> SR {t_sr - t_ack:.1f} s", flush=True)
        for i, ph in enumerate(studies, 1):
            time.sleep(1.0)  # let the previous study's tail (journal, logs) settle
            mark = cpu_mark(dep)
            t0, t_ack, err = storescu(dep.node.port, ph.files)
            if err:
                raise RuntimeError(f"seed {ph.seed}: {err}")
            t_sr = wait_until(lambda uid=ph.study_uid: dep.pacs.first_sr(uid), f"the SR of seed {ph.seed}",
                              args.timeout)
            other = other_cpu(dep, mark)
            key = wait_delivered(dep, ph.study_uid, args.timeout)
            rec = stages_of(dep, key, t_ack, t_sr)
            outputs_at = [t for t, _s, st, _c in dep.pacs.records() if st == ph.study_uid]
            rec.update(seed=ph.seed, slices=ph.slices, mb=round(ph.nbytes / 1e6, 1), send_s=round(t_ack - t0, 3),
                       all_outputs_stored_s=round(max(outputs_at) - t_ack, 4), other_cpu_s=round(other, 2))
            runs.append(rec)
            st = rec["stages_s"]
            print(f"  [{i}/{len(studies)}] seed {ph.seed}: send {rec['send_s']:.1f} s; last ack -> SR stored "
                  f"{rec['end_to_end_s']:.2f} s (minus idle timeout {rec['end_to_end_s'] - args.idle_timeout:.2f} s): "
                  + ", ".join(f"{k} {st[k]:.2f}" for k in STAGES)
                  + f"; {rec['findings']} finding(s), {rec['outputs']} objects; other CPU {other:.1f} s"
                  + (" (noisy)" if other > NOISY * (os.cpu_count() or 1) * (t_sr - t0) else ""), flush=True)
        cpu = dep.cpu()
        problems = dep.problems()
    finally:
        dep.stop()
    return {"runs": runs, "cpu_s": cpu, "problems": problems}


def run_reference(studies: list[Phantom], workroot: Path) -> list[dict]:
    """``pacs-ai analyze`` of each latency study, in a fresh process, nothing else running."""
    out = []
    for ph in studies:
        dest = Path(tempfile.mkdtemp(prefix="analyze-", dir=workroot))
        t0 = time.monotonic()
        r = subprocess.run(cli("analyze", str(ph.folder), "--out", str(dest)), capture_output=True, text=True,
                           check=False, cwd=workroot)
        wall = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"pacs-ai analyze failed: {r.stderr.strip()[-500:]}")
        tm = json.loads((dest / "findings.json").read_text())["timings_s"]
        out.append({"seed": ph.seed, "wall_s": round(wall, 3), "timings_s": tm})
        shutil.rmtree(dest, ignore_errors=True)
    return out


# ============================================================================
# throughput
# ============================================================================
def run_throughput(args: argparse.Namespace, studies: list[Phantom], n_workers: int, workdir: Path) -> dict:
    dep = Deployment(workdir, n_workers, args.idle_timeout, args.ingest_processes)
    sends: dict[str, dict] = {}
    errors: list[str] = []
    lock = threading.Lock()
    try:
        dep.start()
        assert dep.pacs is not None and dep.node is not None
        port = dep.node.port
        per_sender = [studies[i * len(studies) // args.senders:(i + 1) * len(studies) // args.senders]
                      for i in range(args.senders)]
        barrier = threading.Barrier(args.senders + 1)

        def sender(idx: int, mine: list[Phantom]) -> None:
            barrier.wait()
            for ph in mine:
                try:
                    t0, t1, err = storescu(port, ph.files)
                except Exception as exc:  # noqa: BLE001 - reported, the others go on
                    t0 = t1 = time.time()
                    err = f"{type(exc).__name__}: {exc}"
                with lock:
                    sends[ph.study_uid] = {"seed": ph.seed, "sender": idx, "start": t0, "ack": t1}
                    if err:
                        errors.append(f"sender {idx + 1}, seed {ph.seed}: {err}")

        threads = [threading.Thread(target=sender, args=(i, m), daemon=True) for i, m in enumerate(per_sender)]
        for t in threads:
            t.start()
        mark = cpu_mark(dep)
        cpu0, busy0 = mark[2], mark[0]
        barrier.wait()
        t_first = time.time()
        expected = {ph.study_uid for ph in studies}
        deadline = time.monotonic() + args.timeout
        journal: list[dict] = []
        last_look = 0.0
        while time.monotonic() < deadline:
            time.sleep(0.2)
            srs = dep.pacs.srs_by_study()
            if all(uid in srs for uid in expected):
                break
            # an SR missing: look at the journal now and then (a pacs-ai status costs CPU)
            if any(t.is_alive() for t in threads) or time.monotonic() - last_look < 10:
                continue
            last_look = time.monotonic()
            journal = dep.status()
            ours = [s for s in journal if s["study_uid"] in expected]
            if len(ours) == len(expected) and all(s["state"] in TERMINAL for s in ours):
                break  # every study settled; some without an SR
        else:
            errors.append(f"timed out after {args.timeout:.0f} s")
        for t in threads:
            t.join(timeout=60)
        t_last_sr_wait = time.time()
        # the journal's DELIVERED comes just after the SR; then give late duplicates a chance
        try:
            wait_until(lambda: all(s["state"] in TERMINAL for s in dep.status() if s["study_uid"] in expected)
                       and len([s for s in dep.status() if s["study_uid"] in expected]) == len(expected),
                       "every study terminal in the journal", timeout=60, interval=1.0)
        except RuntimeError as exc:
            errors.append(str(exc))
        cpu1, busy1 = dep.cpu(), system_busy_seconds()
        other = other_cpu(dep, mark)
        time.sleep(args.settle)
        journal = dep.status()
        records = dep.pacs.records()
        workers = dep.worker_counts()
        histories = {s["study_key"]: dep.status(s["study_key"])["history"] for s in journal
                     if s["study_uid"] in expected}
        problems = dep.problems()
    finally:
        dep.stop()

    # -- what arrived, and what the journal says ------------------------------
    by_study = {s["study_uid"]: s for s in journal}
    srs: dict[str, set[str]] = collections.defaultdict(set)
    sop_requests = collections.Counter(sop for _t, sop, _st, _c in records)
    first_sr: dict[str, float] = {}
    for t, sop, st, cls in records:
        if cls == SR_CLASS:
            srs[st].add(sop)
            first_sr[st] = min(first_sr.get(st, t), t)
    lost = sorted(uid for uid in expected if not srs.get(uid))
    dup_sr = sorted(uid for uid in expected if len(srs.get(uid, ())) > 1)
    dup_objects = sum(n - 1 for n in sop_requests.values() if n > 1)
    foreign = sorted({st for _t, _s, st, _c in records} - expected)
    delivered = [uid for uid in expected if by_study.get(uid, {}).get("state") == "DELIVERED"]
    not_delivered = {uid: (by_study[uid]["state"], by_study[uid]["reason"]) if uid in by_study else ("absent", "")
                     for uid in expected if uid not in delivered}
    journal_outputs = sum(len(by_study[uid].get("outputs") or []) for uid in delivered)
    instances = sum(by_study[uid]["instance_count"] for uid in expected if uid in by_study)
    node_dups = sum(by_study[uid]["duplicates"] for uid in expected if uid in by_study)
    requeued = sum(1 for h in histories.values() for e in h
                   if e["from_state"] == "QUEUED" and e["to_state"] == "QUEUED")
    attempts = sum(1 for h in histories.values() for e in h if "did not finish" in (e["reason"] or ""))
    delivery_retries = sum(1 for h in histories.values() for e in h if "delivery attempt" in (e["reason"] or ""))
    arrived = [first_sr[uid] for uid in expected if uid in first_sr]
    t_end = max(arrived) if arrived else t_last_sr_wait
    window = t_end - t_first
    per_study = sorted(first_sr[uid] - sends[uid]["ack"] for uid in expected if uid in first_sr and uid in sends)
    cpu = {k: round(cpu1.get(k, 0.0) - cpu0.get(k, 0.0), 2) for k in cpu1}
    return {
        "workers": n_workers,
        "studies": len(studies),
        "slices": studies[0].slices,
        "mb_per_study": round(statistics.mean(p.nbytes for p in studies) / 1e6, 1),
        "senders": args.senders,
        "window_s": round(window, 3),
        "studies_per_hour": round(len(arrived) / window * 3600, 1) if window > 0 else None,
        "sending_s": round(max(s["ack"] for s in sends.values()) - t_first, 3) if sends else None,
        "ack_to_sr_s": {"median": round(statistics.median(per_study), 3), "max": round(max(per_study), 3)}
        if per_study else None,
        "srs_received": len(arrived),
        "lost": len(lost),
        "lost_study_uids": lost,
        "duplicated_sr_studies": len(dup_sr),
        "duplicated_sr_study_uids": dup_sr,
        "objects_stored_twice": dup_objects,
        "c_store_requests": len(records),
        "distinct_objects": len(sop_requests),
        "journal_outputs": journal_outputs,
        "other_studies_at_pacs": foreign,
        "delivered": len(delivered),
        "not_delivered": not_delivered,
        "instances_received": instances,
        "instances_sent": sum(len(p.files) for p in studies),
        "node_duplicate_instances": node_dups,
        "requeued_without_attempt": requeued,
        "analysis_attempts_broken": attempts,
        "delivery_retries": delivery_retries,
        "per_worker": workers,
        "cpu_s": cpu,
        "machine_busy_s": round(busy1 - busy0, 2),
        "other_cpu_s": round(other, 2),
        "machine_busy_fraction": round((busy1 - busy0) / ((os.cpu_count() or 1) * max(window, 1e-9)), 3),
        "errors": errors,
        "problems": problems,
    }


# ============================================================================
# printing
# ============================================================================
def print_latency(lat: dict, ref: list[dict], idle: float) -> dict:
    runs = lat["runs"]
    med = {k: statistics.median(r["stages_s"][k] for r in runs) for k in STAGES}
    e2e = [r["end_to_end_s"] for r in runs]
    e2e_med = statistics.median(e2e)
    print(f"\nlatency per stage, seconds (median, min, max of {len(runs)}; the stages add up to end-to-end):")
    print(f"  {'stage':<17} {'median':>7} {'min':>7} {'max':>7}")
    for k in STAGES:
        vals = [r["stages_s"][k] for r in runs]
        print(f"  {k:<17} {med[k]:7.2f} {min(vals):7.2f} {max(vals):7.2f}")
    print(f"  {'end-to-end':<17} {e2e_med:7.2f} {min(e2e):7.2f} {max(e2e):7.2f}   "
          "(last instance acknowledged -> SR stored at the PACS)")
    comp = statistics.median(r["stages_s"]["completion wait"] for r in runs)
    worker = statistics.median(r["timings_s"]["worker_total"] for r in runs)
    print(f"  (not in it: the send itself {statistics.median(r['send_s'] for r in runs):.2f} s; every output "
          f"stored {statistics.median(r['all_outputs_stored_s'] for r in runs):.2f} s after the ack; DELIVERED "
          f"journaled {statistics.median(r['delivered_after_sr_s'] for r in runs):.2f} s after the SR; completion "
          f"wait beyond the idle timeout {comp - idle:.2f} s; worker total {worker:.2f} s)")
    minus = e2e_med - idle
    verdict = "met" if minus < 45 else "NOT met"
    print(f"end-to-end minus idle timeout ({idle:g} s): {minus:.2f} s (target < 45 s: {verdict})")
    summary = {"median_stages_s": {k: round(v, 4) for k, v in med.items()}, "end_to_end_median_s": e2e_med,
               "end_to_end_minus_idle_s": round(minus, 4), "target_met": minus < 45}
    if ref:
        ref_wall = statistics.median(r["wall_s"] for r in ref)
        ref_total = statistics.median(r["timings_s"]["total"] for r in ref)
        ref_infer = statistics.median(sum(v for k, v in r["timings_s"].items()
                                          if k.split(":")[0] in ("preprocess", "infer", "postprocess")) for r in ref)
        w_total = statistics.median(r["timings_s"]["total"] for r in runs)
        print(f"reference: pacs-ai analyze of the same study (fresh process, model load, reports, no network): "
              f"{ref_wall:.2f} s wall, of which analysis {ref_total:.2f} s (inference {ref_infer:.2f} s)")
        print(f"  end-to-end minus idle timeout / pacs-ai analyze: {minus / ref_wall:.2f}x; worker's analysis "
              f"{w_total:.2f} s / analyze's {ref_total:.2f} s: {w_total / ref_total:.2f}x; worker inference "
              f"{med['inference']:.2f} s / analyze's {ref_infer:.2f} s: {med['inference'] / ref_infer:.2f}x")
        summary.update(reference_wall_s=ref_wall, ratio_to_reference=round(minus / ref_wall, 3))
    return summary


def print_throughput(tp: dict) -> None:
    w = tp["workers"]
    ok = tp["lost"] == 0 and tp["duplicated_sr_studies"] == 0 and tp["objects_stored_twice"] == 0
    per = ", ".join(f"{k} {v['analysed']}" + (f" (+{v['already_analysed']} already analysed)"
                                                if v["already_analysed"] else "") for k, v in tp["per_worker"].items())
    cpu = ", ".join(f"{k} {v:.0f}" for k, v in tp["cpu_s"].items())
    a2s = tp["ack_to_sr_s"] or {"median": float("nan"), "max": float("nan")}
    print(f"  {w} worker{'s' if w > 1 else ' '}: {tp['srs_received']}/{tp['studies']} SRs in {tp['window_s']:.1f} s "
          f"(first send -> last SR) = {tp['studies_per_hour'] or 0:.0f} studies/h; sending took "
          f"{tp['sending_s'] or 0:.1f} s; ack -> SR per study median {a2s['median']:.1f} s, max {a2s['max']:.1f} s")
    print(f"    lost {tp['lost']}, duplicated {tp['duplicated_sr_studies'] + tp['objects_stored_twice']} "
          f"(studies with >1 SR {tp['duplicated_sr_studies']}, objects stored twice {tp['objects_stored_twice']}; "
          f"{tp['c_store_requests']} C-STOREs, {tp['distinct_objects']} distinct objects, journal outputs "
          f"{tp['journal_outputs']}){'' if ok else '  <-- FAIL'}")
    print(f"    journal: {tp['delivered']}/{tp['studies']} DELIVERED; instances {tp['instances_received']}/"
          f"{tp['instances_sent']}, duplicates {tp['node_duplicate_instances']}; queued again (not taken in "
          f"stale_after) {tp['requeued_without_attempt']}, broken attempts {tp['analysis_attempts_broken']}, "
          f"delivery retries {tp['delivery_retries']}")
    print(f"    per worker: {per}; CPU s in the window: {cpu}; machine busy "
          f"{100 * tp['machine_busy_fraction']:.0f}% of {os.cpu_count()} CPUs, of which other processes "
          f"{tp['other_cpu_s']:.0f} s")
    share = tp["other_cpu_s"] / ((os.cpu_count() or 1) * max(tp["window_s"], 1e-9))
    if share > NOISY:
        print(f"    ! noisy: other processes used {100 * share:.0f}% of the machine in the window; "
              "rerun when the machine is quiet")
    for uid, (state, reason) in tp["not_delivered"].items():
        print(f"    ! not delivered: {uid}: {state} {reason or ''}")
    for e in tp["errors"]:
        print(f"    ! {e}")


def print_problems(title: str, problems: list[str], limit: int = 12) -> None:
    if not problems:
        return
    print(f"  warnings/errors in the logs ({title}):")
    for p in problems[:limit]:
        print(f"    {p}")
    if len(problems) > limit:
        print(f"    ... {len(problems) - limit} more (see --keep)")


# ============================================================================
# main
# ============================================================================
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/e2e.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 latency study (300 slices) and 8 throughput studies of 60 slices")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "e2e.json", help="JSON of the figures "
                   "(default bench/out/e2e.json)")
    p.add_argument("--latency-studies", type=int, help="latency repetitions (default 3, --quick 1)")
    p.add_argument("--latency-slices", type=int, default=300, help="slices of the latency study (default 300)")
    p.add_argument("--studies", type=int, help="throughput studies (default 20, --quick 8)")
    p.add_argument("--slices", type=int, help="slices per throughput study (default 100, --quick 60)")
    p.add_argument("--senders", type=int, default=4, help="concurrent storescu senders (default 4)")
    p.add_argument("--repeat", type=int, default=None,
                   help="throughput runs per worker count, interleaved (1,2 then 2,1...); medians "
                        "(default 2, --quick 1)")
    p.add_argument("--workers", default="1,2", help="worker counts for throughput (default 1,2)")
    p.add_argument("--idle-timeout", type=float, default=2.0, help="node.study_idle_timeout (default 2.0 s)")
    p.add_argument("--ingest-processes", type=int, default=0,
                   help="node.ingest_processes (default 0: the node's auto)")
    p.add_argument("--nodules", type=int, default=2, help="nodules per phantom (default 2)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait after the last study settled before counting (late duplicates)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up on a phase after this (default 900 s)")
    p.add_argument("--only", default="latency,throughput", help="latency,throughput (default both)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the unmeasured warm-up study before the latency runs")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the pacs-ai analyze reference")
    p.add_argument("--live-code", action="store_true",
                   help="run the node and workers from the working tree, not a snapshot of the sources")
    p.add_argument("--rev", metavar="REV",
                   help="run the node and workers from the sources committed at git revision REV "
                        "(e.g. HEAD; git archive into bench/out/snapshot/rev-<sha>) instead of the working tree")
    p.add_argument("--keep", action="store_true", help="keep the runs' spools, logs and Redis data")
    args = p.parse_args(argv)
    args.latency_studies = args.latency_studies or (1 if args.quick else 3)
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 2)
    args.studies = args.studies or (8 if args.quick else 20)
    args.slices = args.slices or (60 if args.quick else 100)
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    try:
        args.workers = [int(x) for x in args.workers.split(",") if x.strip()]
    except ValueError as exc:
        p.error(f"--workers: {exc}")
    if args.only - {"latency", "throughput"} or not args.only:
        p.error("--only: latency, throughput")
    if args.repeat < 1:
        p.error("--repeat: at least 1")
    if args.senders < 1 or args.studies < args.senders or not args.workers or min(args.workers) < 1:
        p.error("--senders, --studies and --workers need positive values, at least one study per sender")
    if not (40 <= args.slices <= 1000 and 40 <= args.latency_slices <= 1000):
        p.error("--slices and --latency-slices: 40 to 1000 (lung-nodule-ct needs 40)")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for tool in ("storescu", "redis-server"):
        if not shutil.which(tool) and not Path(f"/usr/bin/{tool}").exists():
            raise BenchError(f"{tool} not found (install DCMTK and redis-server)")
    if Path(sys.executable).resolve() != VENV_PYTHON.resolve() and not os.environ.get("VIRTUAL_ENV"):
        print(f"note: running under {sys.executable}, not {VENV_PYTHON}", file=sys.stderr)

    out_dir = DEFAULT_OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.live_code:
        code = code_hash() + " (live working tree)"
    elif args.rev:
        snap, sha = snapshot_rev(out_dir, args.rev)
        os.environ["PYTHONPATH"] = str(snap) + (os.pathsep + os.environ["PYTHONPATH"]
                                                if os.environ.get("PYTHONPATH") else "")
        code = f"git {sha} (--rev {args.rev}, snapshot {snap.relative_to(out_dir)})"
    else:
        snap, digest = snapshot_code(out_dir)
        os.environ["PYTHONPATH"] = str(snap) + (os.pathsep + os.environ["PYTHONPATH"]
                                                if os.environ.get("PYTHONPATH") else "")
        code = f"{digest} (snapshot {snap.relative_to(out_dir)})"
    global WORKER_HTTP_PORT
    src = (REPO if args.live_code else snap) / "study_queue" / "settings.py"
    WORKER_HTTP_PORT = "worker_port" in src.read_text()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workroot = out_dir / "runs" / f"e2e-{stamp}"
    workroot.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "cache" / "e2e"
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, check=False).stdout.strip()
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             check=False).stdout.split()[2]
    print(f"bench/e2e.py: storescu -> pacs-ai node (Redis {redis_v.removeprefix('v=')}) -> worker(s) -> "
          f"pynetdicom PACS; node.study_idle_timeout {args.idle_timeout:g} s; ingest_processes "
          f"{args.ingest_processes or 'auto'}; queue/delivery settings: defaults; {os.cpu_count()} CPUs; "
          f"git {git}; node code {code}", flush=True)

    t_start = time.monotonic()
    results: dict[str, Any] = {"argv": sys.argv, "git": git, "node_code": code, "cpus": os.cpu_count(),
                               "idle_timeout_s": args.idle_timeout, "ingest_processes": args.ingest_processes}
    failed = False
    if "latency" in args.only:
        studies = phantoms(cache, range(5000, 5000 + args.latency_studies), args.latency_slices, args.nodules)
        warm = phantoms(cache, range(5099, 5100), 60, args.nodules)[0] if args.warmup else None
        mb = studies[0].nbytes / 1e6
        print(f"\nlatency: {len(studies)} x {args.latency_slices}-slice phantom CT ({mb:.0f} MB each), one at a time, "
              f"1 worker", flush=True)
        try:
            lat = run_latency(args, studies, warm, workroot)
            print_problems("latency run", lat["problems"])
            ref = []
            if args.reference:
                print("  reference: pacs-ai analyze of the same studies ...", flush=True)
                ref = run_reference(studies, workroot)
            results["latency"] = {**lat, "reference": ref, "summary": print_latency(lat, ref, args.idle_timeout)}
        except RuntimeError as exc:
            print(f"  FAILED: {exc}", flush=True)
            results["latency"] = {"error": str(exc)}
            failed = args.keep = True

    if "throughput" in args.only:
        tps = phantoms(cache, range(5100, 5100 + args.studies), args.slices, args.nodules)
        mb = statistics.mean(p.nbytes for p in tps) / 1e6
        print(f"\nthroughput: {len(tps)} x {args.slices}-slice phantom CT ({mb:.0f} MB each) sent back to back by "
              f"{args.senders} concurrent storescu ({len(tps) // args.senders} studies each, one association per "
              f"study); workers {args.workers} (each a pacs-ai worker process on the inference queue)", flush=True)
        runs: list[dict] = []
        workroot_runs = 0
        for rep in range(args.repeat):
            order = args.workers if rep % 2 == 0 else list(reversed(args.workers))
            for n in order:
                workroot_runs += 1
                label = f"rep {rep + 1} " if args.repeat > 1 else ""
                try:
                    tp = run_throughput(args, tps, n, workroot / f"throughput-{workroot_runs}-{n}w")
                except RuntimeError as exc:
                    print(f"  {label}{n} worker(s): FAILED: {exc}", flush=True)
                    runs.append({"workers": n, "rep": rep + 1, "error": str(exc), "studies_per_hour": None})
                    failed = args.keep = True
                    continue
                tp["rep"] = rep + 1
                runs.append(tp)
                if label:
                    print(f"  {label.strip()}:", flush=True)
                print_throughput(tp)
                print_problems(f"{n} worker(s)", tp["problems"])
                if tp["lost"] or tp["duplicated_sr_studies"] or tp["objects_stored_twice"] or tp["errors"] \
                        or tp["not_delivered"]:
                    failed = True
        rates: dict[int, float] = {}
        summary: dict[str, Any] = {}
        for n in args.workers:
            mine = [r for r in runs if r["workers"] == n and r.get("studies_per_hour")]
            if not mine:
                continue
            rates[n] = statistics.median(r["studies_per_hour"] for r in mine)
            summary[str(n)] = {
                "studies_per_hour_median": rates[n],
                "studies_per_hour_runs": [r["studies_per_hour"] for r in mine],
                "lost": sum(r["lost"] for r in mine),
                "duplicated": sum(r["duplicated_sr_studies"] + r["objects_stored_twice"] for r in mine),
            }
        results["throughput"] = {"runs": runs, "summary": summary}
        if args.repeat > 1:
            for n, r in rates.items():
                runs_n = summary[str(n)]["studies_per_hour_runs"]
                print(f"  {n} worker{'s' if n > 1 else ''}: median {r:.0f} studies/h over {len(runs_n)} runs "
                      f"({', '.join(f'{x:.0f}' for x in runs_n)}); lost {summary[str(n)]['lost']}, "
                      f"duplicated {summary[str(n)]['duplicated']}")
        if rates.get(1):
            for n, r in rates.items():
                if n != 1:
                    print(f"  {n} workers / 1 worker: {r / rates[1]:.2f}x "
                          f"({r:.0f} vs {rates[1]:.0f} studies/h on {os.cpu_count()} CPUs)")
    print(f"\ntotal {time.monotonic() - t_start:.0f} s")
    if not args.live_code and not args.rev and code_hash() != code.split()[0]:
        print(f"note: the node's sources in the working tree changed during the run; every run measured "
              f"the snapshot {code.split()[0]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"raw results: {args.out}")
    if not args.keep:
        shutil.rmtree(workroot, ignore_errors=True)
    else:
        print(f"spools, logs and Redis data kept in {workroot}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        code = main()
    except BenchError as exc:
        print(f"bench/e2e.py: error: {exc}", file=sys.stderr)
        code = 2
    except RuntimeError as exc:
        print(f"bench/e2e.py: FAILED: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything started", file=sys.stderr)
        code = 130
    sys.exit(code)
