"""Prometheus metrics of pacs-ai, served at ``/metrics`` by ``study_queue.web`` (issue 7).

Two sources, because the two kinds of process see different things:

- **The node** reads the journal at scrape time (:class:`NodeCollector`). Several processes
  write the journal (ingest processes, the delivery worker, the dispatcher), so counters
  kept in the node's own memory would miss most events and start from zero at every
  restart; the journal holds every association, instance, transition and delivery attempt,
  survives restarts, and is the source of truth anyway (DESIGN.md section 4). Counters
  computed from it are therefore monotonic across restarts. The one thing it does not
  hold is a rejected association (``dicom_node.scp`` rejects before journaling): those
  are in the audit log only, and are not counted here.
- **An inference worker** counts in its own memory (:func:`observe_result`, called by the
  ``analyze`` task): the timings of an analysis exist only in the worker that ran it. The
  solo pool runs every task in the worker's process, so a plain registry is enough; with
  ``--concurrency N`` (prefork) ``study_queue.services`` switches prometheus-client to its
  multi-process mode before anything is counted.

Labels never carry patient data, nor study keys (one series per study would grow without
bound): only states, outcomes, stages, queue names, model names, engines and destinations
(AE@host:port of a configured peer).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from dicom_node.journal import (
    ANALYZED,
    COMPLETE,
    DELIVERED,
    IGNORED,
    QUEUED,
    RECEIVING,
    STATES,
)

log = logging.getLogger("pacs_ai.metrics")

#: Stages of a study's run, measured between the first entries of its states in the
#: journal's history: (name, start states, end states). ``receive`` includes the
#: ``node.study_idle_timeout`` that decides completion; ``queued`` is the hand-over to the
#: broker; ``analysis`` waiting for a worker plus the analysis; ``delivery`` every attempt
#: and backoff; ``total`` the first instance to DELIVERED.
STAGES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("receive", (RECEIVING,), (COMPLETE,)),
    ("queued", (COMPLETE,), (QUEUED,)),
    ("analysis", (QUEUED,), (ANALYZED, IGNORED)),
    ("delivery", (ANALYZED,), (DELIVERED,)),
    ("total", (RECEIVING,), (DELIVERED,)),
)
STAGE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                 7200.0, 21600.0, 86400.0)
WORKER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: The worker's stages, from the ``timings_s`` keys of a result (``study_queue.analysis``,
#: ``inference.pipeline``, ``study_queue.worker``): a prefix sums every model's or report
#: part's entry, ``total`` is the whole task (``worker_total``).
WORKER_STAGES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("scan", lambda k: k == "scan"),
    ("load", lambda k: k == "load"),
    ("preprocess", lambda k: k.startswith("preprocess:")),
    ("inference", lambda k: k.startswith("infer:")),
    ("postprocess", lambda k: k.startswith("postprocess:")),
    ("report", lambda k: k.startswith("report:")),
)


def stage_durations(firsts: Mapping[str, tuple[int, float]], new_after: int = 0) -> dict[str, float]:
    """Seconds of each finished stage of one run, from ``{state: (first history id, at)}``.

    Only stages whose end entered the history after id ``new_after`` are returned: the
    collector passes the last id it has seen, so each stage is observed once.
    """
    out: dict[str, float] = {}
    for name, starts, ends in STAGES:
        end = min((firsts[s] for s in ends if s in firsts), default=None)
        start = min((firsts[s] for s in starts if s in firsts), default=None)
        if end is None or start is None or end[0] <= new_after or start[0] > end[0]:
            continue
        out[name] = max(0.0, end[1] - start[1])
    return out


def read_journal(path: str | Path) -> sqlite3.Connection:
    """A read-only connection to the journal: the HTTP side never writes, and in WAL mode a
    reader neither waits for the node's writers nor makes them wait."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=5.0, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


class _Buckets:
    """One histogram's cumulative state per label value, fed incrementally."""

    def __init__(self, bounds: tuple[float, ...], labels: Iterable[str]) -> None:
        self.bounds = bounds
        self.counts = {label: [0] * (len(bounds) + 1) for label in labels}  # last: +Inf
        self.sums = {label: 0.0 for label in self.counts}

    def observe(self, label: str, value: float) -> None:
        counts = self.counts[label]
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self.sums[label] += value

    def family(self, name: str, doc: str, label_name: str) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=[label_name])
        for label, counts in self.counts.items():
            cumulative, running = [], 0
            for bound, n in zip([*map(str, self.bounds), "+Inf"], counts):
                running += n
                cumulative.append((bound, running))
            fam.add_metric([label], cumulative, self.sums[label])
        return fam


class NodeCollector(Collector):
    """The node's metrics, read from the journal at each scrape.

    The stage histograms are built incrementally: history rows are append-only with
    increasing ids (one writer at a time), so each scrape reads only the runs touched since
    the last id it saw. The first scrape after a start reads the whole history once, which
    gives the same counts as before the restart.
    """

    def __init__(self, journal_path: str | Path, broker: Any = None) -> None:
        self.journal_path = Path(journal_path)
        self.broker = broker  # a study_queue.web.BrokerProbe, or None
        self._lock = threading.Lock()
        self._stages = _Buckets(STAGE_BUCKETS, [name for name, _, _ in STAGES])
        self._history_id = 0

    def collect(self) -> Iterable[Any]:
        families: list[Any] = []
        with self._lock:
            up = 1.0
            try:
                conn = read_journal(self.journal_path)
                try:
                    conn.execute("BEGIN")  # one snapshot for every query of this scrape
                    families += self._from_journal(conn)
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                log.error("metrics: the journal did not answer: %s", exc)
                families, up = [], 0.0
        up_family = GaugeMetricFamily("pacs_ai_journal_up", "1 when the journal answered this scrape")
        up_family.add_metric([], up)
        families.append(up_family)
        if self.broker is not None:
            families += self.broker.families()
        return families

    def _from_journal(self, conn: sqlite3.Connection) -> list[Any]:
        fams: list[Any] = []

        assoc = CounterMetricFamily("pacs_ai_associations", "Closed DICOM associations by outcome, "
                                    "rejected ones as 'rejected: <reason>'", labels=["outcome"])
        for row in conn.execute("SELECT outcome, COUNT(*) FROM associations WHERE closed_at IS NOT NULL "
                                "GROUP BY outcome ORDER BY outcome"):
            assoc.add_metric([row[0] or "unknown"], row[1])
        fams.append(assoc)
        opened = GaugeMetricFamily("pacs_ai_associations_open", "Associations open now")
        opened.add_metric([], conn.execute("SELECT COUNT(*) FROM associations WHERE closed_at IS NULL").fetchone()[0])
        fams.append(opened)

        instances, size, dups = conn.execute(
            "SELECT COALESCE(SUM(instance_count), 0), COALESCE(SUM(received_bytes), 0), "
            "COALESCE(SUM(duplicates), 0) FROM studies").fetchone()
        for name, doc, value in (
            ("pacs_ai_instances_received", "Instances stored (first copies)", instances),
            ("pacs_ai_received_bytes", "Bytes of the instances stored", size),
            ("pacs_ai_duplicate_instances", "Instances received again (Success, the first copy kept)", dups),
        ):
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], value)
            fams.append(fam)

        counts = dict.fromkeys(STATES, 0)
        for row in conn.execute("SELECT state, COUNT(*) FROM studies GROUP BY state"):
            counts[row[0]] = row[1]
        states = GaugeMetricFamily("pacs_ai_studies", "Studies in the journal by state", labels=["state"])
        for state, n in counts.items():
            states.add_metric([state], n)
        fams.append(states)
        depth = GaugeMetricFamily("pacs_ai_queue_depth", "Studies waiting for a queue's work or in it "
                                  "(journal: QUEUED for inference, ANALYZED for delivery)", labels=["queue"])
        depth.add_metric(["inference"], counts[QUEUED])
        depth.add_metric(["delivery"], counts[ANALYZED])
        fams.append(depth)

        deliveries = CounterMetricFamily("pacs_ai_delivery_attempts", "Delivery attempts by destination "
                                         "and outcome (stored, retry, failed)", labels=["destination", "outcome"])
        for row in conn.execute("SELECT destination, outcome, COUNT(*) FROM deliveries "
                                "GROUP BY destination, outcome ORDER BY destination, outcome"):
            deliveries.add_metric([row[0], row[1]], row[2])
        fams.append(deliveries)

        self._update_stages(conn)
        fams.append(self._stages.family("pacs_ai_stage_seconds", "Seconds a study's run spent in each stage "
                                        "(receive, queued, analysis, delivery, total)", "stage"))
        return fams

    def _update_stages(self, conn: sqlite3.Connection) -> None:
        last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM history").fetchone()[0]
        if last <= self._history_id:
            return
        runs: dict[tuple[str, int], dict[str, tuple[int, float]]] = {}
        if self._history_id == 0:  # the first scrape: every run
            sql, params = ("SELECT study_key, run, to_state, MIN(id), MIN(at) FROM history WHERE id <= ? "
                           "GROUP BY study_key, run, to_state", (last,))
        else:  # the runs with news since the last scrape, with their whole history
            sql, params = ("SELECT h.study_key, h.run, h.to_state, MIN(h.id), MIN(h.at) FROM history h "
                           "JOIN (SELECT DISTINCT study_key, run FROM history WHERE id > ? AND id <= ?) t "
                           "ON h.study_key = t.study_key AND h.run = t.run WHERE h.id <= ? "
                           "GROUP BY h.study_key, h.run, h.to_state", (self._history_id, last, last))
        for row in conn.execute(sql, params):
            runs.setdefault((row[0], row[1]), {})[row[2]] = (row[3], row[4])
        for firsts in runs.values():
            for stage, seconds in stage_durations(firsts, new_after=self._history_id).items():
                self._stages.observe(stage, seconds)
        self._history_id = last


# -- the worker's in-process metrics -----------------------------------------------------------
WORKER_REGISTRY = CollectorRegistry()
ANALYSES = Counter("pacs_ai_analyses", "Analyses by outcome (analyzed, ignored, failed, error, dropped)",
                   ["outcome"], registry=WORKER_REGISTRY)
INFERENCE_SECONDS = Histogram("pacs_ai_inference_seconds", "Seconds of one model's inference on one study",
                              ["model", "engine"], buckets=WORKER_BUCKETS, registry=WORKER_REGISTRY)
WORKER_STAGE_SECONDS = Histogram("pacs_ai_worker_stage_seconds", "Seconds of each stage of an analysis "
                                 "(scan, load, preprocess, inference, postprocess, report, total)",
                                 ["stage"], buckets=WORKER_BUCKETS, registry=WORKER_REGISTRY)

_seen_lock = threading.Lock()
_seen: dict[tuple, None] = {}  # recent results, so one handed on again is not counted twice


def observe_result(result: Mapping[str, Any]) -> None:
    """Count one result of ``study_queue.worker.analyze_study`` (its outcome and timings).

    A study analysed already is answered with its stored result (same timings): that one is
    not counted again.
    """
    timings = result.get("timings_s") or {}
    if not isinstance(timings, Mapping):
        timings = {}
    marker = (result.get("study_key"), result.get("run"), timings.get("worker_total"))
    if marker[2] is not None:
        with _seen_lock:
            if marker in _seen:
                return
            _seen[marker] = None
            while len(_seen) > 1024:
                del _seen[next(iter(_seen))]
    ANALYSES.labels(outcome=str(result.get("outcome") or "unknown")).inc()
    engines = result.get("engines") or {}
    sums: dict[str, float] = {}
    for key, value in timings.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.startswith("infer:"):
            model = key.partition(":")[2]
            engine = engines.get(model, "unknown") if isinstance(engines, Mapping) else "unknown"
            INFERENCE_SECONDS.labels(model=model, engine=str(engine)).observe(value)
        for stage, matches in WORKER_STAGES:
            if matches(key):
                sums[stage] = sums.get(stage, 0.0) + float(value)
    total = timings.get("worker_total", timings.get("total"))
    if isinstance(total, (int, float)) and not isinstance(total, bool):
        sums["total"] = float(total)
    for stage, seconds in sums.items():
        WORKER_STAGE_SECONDS.labels(stage=stage).observe(seconds)


def observe_dropped() -> None:
    """An analyze message dropped as malformed."""
    ANALYSES.labels(outcome="dropped").inc()


class ModelsCollector(Collector):
    """``pacs_ai_models_loaded{model,version,engine}``: the warm models of this worker
    process (``study_queue.worker``'s cache), which shows whether TensorRT or ONNX Runtime
    runs each model."""

    def collect(self) -> Iterable[Any]:
        from . import worker

        fam = GaugeMetricFamily("pacs_ai_models_loaded", "Models loaded in this worker, by engine",
                                labels=["model", "version", "engine"])
        with worker._models_lock:
            loaded = [m for models in worker._models.values() for m in models]
        for m in loaded:
            fam.add_metric([m.spec.name, m.spec.version, m.engine.name], 1)
        return [fam]


def worker_registry() -> CollectorRegistry:
    """What a worker's ``/metrics`` serves: the in-process registry, or in multi-process
    mode (prefork pool) the merge of every pool process's files."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    registry = CollectorRegistry()
    registry.register(_Forward(WORKER_REGISTRY))
    registry.register(ModelsCollector())
    return registry


class _Forward(Collector):
    """Another registry's metrics, inside this one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Any]:
        return self.registry.collect()
