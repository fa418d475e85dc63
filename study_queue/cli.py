"""``pacs-ai``: the command line, and the composition root that wires
``dicom_node`` (and later ``inference`` and the Celery queue) together.

Every failure a user can cause (bad flag, bad config, unknown study) is one
line on stderr and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, UsageError
from .settings import Settings, effective_toml, load_settings

PROG = "pacs-ai"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


# -- helpers -------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> Settings:
    node: dict[str, Any] = {}
    for flag, key in (("port", "port"), ("ae_title", "ae_title"), ("spool", "spool"), ("log_format", "log_format")):
        value = getattr(args, flag, None)
        if value is not None:
            node[key] = value
    return load_settings(getattr(args, "config", None), overrides={"node": node})


def setup_logging(level: str = "INFO", spool: str | None = None, filename: str = "pacs-ai.log",
                  log_format: str = "text") -> None:
    """Lines on stderr and, with a spool, in spool/logs/``filename`` (one file per process
    kind and host: several processes never rotate the same file); ``log_format`` text or json."""
    from .logs import formatter as make_formatter

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter = make_formatter(log_format)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    if spool:
        logs = Path(spool) / "logs"
        logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        fh = logging.handlers.RotatingFileHandler(
            logs / filename, maxBytes=10 * 1024 * 1024, backupCount=5
        )
        fh.setFormatter(formatter)
        root.addHandler(fh)
        try:
            os.chmod(logs / filename, 0o600)
        except OSError:
            pass
    root.setLevel(level.upper())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Celery's INFO lines name every task message's id; its warnings and errors are kept.
    logging.getLogger("celery").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("kombu").setLevel(max(logging.WARNING, root.level))
    # highdicom logs every module it copies, with the source's UIDs, at INFO.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _open_journal(settings: Settings):  # -> Journal
    from dicom_node.journal import Journal
    from dicom_node.spool import Spool

    spool = Spool(settings.node.spool)
    if not spool.journal_path.exists():
        raise UsageError(f"node.spool: no journal in {str(spool.root)!r} (has a node run there?)")
    return Journal(spool.journal_path)


def scp_config(settings: Settings):  # -> ScpConfig
    from dicom_node.scp import PeerEntry, ScpConfig

    n = settings.node
    return ScpConfig(
        ae_title=n.ae_title,
        spool=n.spool,
        peers=[PeerEntry(p.ae_title, p.host, p.port) for p in settings.peers],
        accept_unknown_callers=n.accept_unknown_callers,
        max_associations=n.max_associations,
        max_connections_per_address=n.max_connections_per_address,
        max_pdu=n.max_pdu,
        acse_timeout=n.acse_timeout,
        dimse_timeout=n.dimse_timeout,
        network_timeout=n.network_timeout,
        tls_cert=n.tls_cert,
        tls_key=n.tls_key,
        tls_ca=n.tls_ca,
        min_free_bytes=n.min_free_mb << 20,
        max_instance_bytes=n.max_instance_mb << 20,
        max_instances_per_study=n.max_instances_per_study,
    )


def ingest_process_count(settings: Settings) -> int:
    """``node.ingest_processes``, or by default two per core (at most 8):
    pynetdicom holds the GIL per process, and the ingest benchmark on 2 cores
    with 4 associations ran 0.25x of storescp with 1 process, 0.31x with 2
    and 0.35x with 4."""
    n = settings.node.ingest_processes
    return n if n > 0 else max(1, min(8, 2 * (os.cpu_count() or 1)))


# -- commands ------------------------------------------------------------------
def check_tls(settings: Settings) -> None:
    """Load the TLS files one by one so an error names the one that is bad."""
    import ssl

    from dicom_node.scp import make_ssl_context

    n = settings.node
    if not n.tls_cert:
        return
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_verify_locations(cafile=n.tls_cert)  # parses the PEM certificate(s)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"node.tls_cert: {n.tls_cert!r} is not a PEM certificate ({exc})") from None
    try:
        probe.load_cert_chain(n.tls_cert, n.tls_key or None)
    except (ssl.SSLError, OSError, ValueError) as exc:
        key = "node.tls_key" if n.tls_key else "node.tls_cert"
        raise ConfigError(f"{key}: the private key does not load or does not match the certificate ({exc})") from None
    if n.tls_ca:
        try:
            probe.load_verify_locations(cafile=n.tls_ca)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"node.tls_ca: {n.tls_ca!r} is not a PEM CA certificate ({exc})") from None
    make_ssl_context(scp_config(settings))


def _forward(args: argparse.Namespace) -> list[str]:
    """The options a child ``pacs-ai worker`` needs to see the same settings."""
    out: list[str] = []
    for flag, attr in (("--config", "config"), ("--spool", "spool"), ("--ae-title", "ae_title"), ("--port", "port"),
                       ("--log-format", "log_format")):
        value = getattr(args, attr, None)
        if value is not None:
            out += [flag, str(Path(value).resolve()) if attr in ("config", "spool") else str(value)]
    return out


def _node(args: argparse.Namespace, inference: bool) -> int:
    from dicom_node.node import Node

    from .services import serve_node, stop_signal

    settings = _settings(args)
    n = settings.node
    cfg = scp_config(settings)
    check_tls(settings)
    try:
        Path(n.spool).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"node.spool: cannot create {n.spool!r}: {exc.strerror}") from None
    setup_logging(n.log_level, n.spool, log_format=n.log_format)
    if inference:
        _check_models(settings)
    node = Node(
        cfg,
        bind=n.bind,
        port=n.port,
        study_idle_timeout=n.study_idle_timeout,
        study_max_wait=n.study_max_wait,
        ingest_processes=ingest_process_count(settings),
        shutdown_grace=n.shutdown_grace,
    )
    done = stop_signal()
    try:
        node.start()
    except OSError as exc:
        print(f"{PROG}: error: node.port: cannot listen on {n.bind}:{n.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return serve_node(settings, node, _forward(args), inference=inference, done=done)


def _check_models(settings: Settings) -> None:
    """Every configured model has a spec that loads: else one line now, not a worker crash loop."""
    from inference.spec import SpecError, find_model

    for name in settings.inference.models:
        try:
            find_model(name)
        except SpecError as exc:
            raise ConfigError(f"inference.models: {exc}") from None


def _private_files() -> None:
    """Everything the service writes (spool, work files, outputs with patient data, outbox,
    queue messages, logs) is readable by the service user only, whatever made the file."""
    os.umask(0o077)


def cmd_node(args: argparse.Namespace) -> int:
    _private_files()
    return _node(args, inference=False)


def cmd_run(args: argparse.Namespace) -> int:
    _private_files()
    return _node(args, inference=True)


def cmd_worker(args: argparse.Namespace) -> int:
    import socket

    _private_files()
    from .celery_app import INFERENCE_QUEUE, QUEUES, URGENT_QUEUE
    from .services import serve_worker

    settings = _settings(args)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if not queues or unknown:
        raise UsageError(f"--queues: {', '.join(unknown) or 'none given'}: the queues are {', '.join(QUEUES)}")
    if INFERENCE_QUEUE in queues and URGENT_QUEUE not in queues:
        queues.insert(queues.index(INFERENCE_QUEUE), URGENT_QUEUE)  # urgent studies first, always
    if args.concurrency < 1:
        raise UsageError("--concurrency: at least 1")
    if INFERENCE_QUEUE in queues or URGENT_QUEUE in queues:
        _check_models(settings)
    n = settings.node
    try:
        Path(n.spool).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"node.spool: cannot create {n.spool!r}: {exc.strerror}") from None
    # One file per worker process (several workers per host: one per GPU), pruned with the
    # spool's retention; a rotating file shared by processes would lose lines at rotation.
    setup_logging(n.log_level, n.spool, filename=f"worker-{'+'.join(queues)}-{socket.gethostname()}-{os.getpid()}.log",
                  log_format=n.log_format)
    return serve_worker(settings, queues, args.concurrency, n.log_level.upper())


def _chosen_studies(args: argparse.Namespace, older_than_days: float = 0.0):
    """(settings, journal, studies) for ``STUDY_KEY`` or ``--failed`` (FAILED at least
    ``older_than_days`` ago): the selection retry and purge share."""
    from dicom_node.journal import FAILED, UnknownStudy

    if bool(args.study) == bool(args.failed):
        raise UsageError("give a STUDY_KEY or --failed (every FAILED study)")
    settings = _settings(args)
    journal = _open_journal(settings)
    if args.study:
        try:
            return settings, journal, [journal.get(args.study)]
        except UnknownStudy:
            raise UsageError(f"STUDY_KEY: no study with key {args.study!r}") from None
    cutoff = time.time() - older_than_days * 86400
    return settings, journal, [s for s in journal.studies([FAILED]) if s.updated_at <= cutoff]


def cmd_retry(args: argparse.Namespace) -> int:
    from .celery_app import make_app
    from .replay import NotReplayable, retry_study

    settings, journal, studies = _chosen_studies(args)
    app = make_app(settings)
    for study in studies:
        try:
            print(f"{study.study_key}: {retry_study(settings, journal, app, study)}")
        except NotReplayable as exc:
            raise UsageError(str(exc)) from None
    if not studies:
        print("no FAILED studies")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from .retention import NotPurgeable, purge_study

    settings, journal, studies = _chosen_studies(args, older_than_days=args.older_than)
    for study in studies:
        try:
            purge_study(settings, journal, study, "pacs-ai purge")
        except NotPurgeable as exc:
            raise UsageError(str(exc)) from None
        print(f"{study.study_key}: deleted ({study.state}, {study.instance_count} instances)")
    if not studies:
        print("nothing to delete")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    journal = _open_journal(settings)
    now = time.time()
    if args.study:
        from dicom_node.journal import UnknownStudy

        try:
            study = journal.get(args.study)
        except UnknownStudy:
            raise UsageError(f"--study: no study with key {args.study!r}") from None
        history = journal.history(args.study)
        series = journal.series(args.study)
        deliveries = list(reversed(journal.deliveries(args.study)))
        if args.json:
            print(json.dumps({
                "study": {k: v for k, v in study.__dict__.items()},
                "series": series,
                "history": [dict(h) for h in history],
                "deliveries": deliveries,
            }, indent=2))
            return 0
        print(f"study       {study.study_key}")
        print(f"state       {study.state}" + (f" ({study.reason})" if study.reason else ""))
        print(f"run         {study.run}   attempts {study.attempts}")
        print(f"calling AE  {study.calling_ae or '-'} from {study.peer_host or '-'}")
        print(f"instances   {study.instance_count} ({study.received_bytes / 1e6:.1f} MB), "
              f"duplicates {study.duplicates} ({study.duplicate_conflicts} with other content)")
        print(f"modalities  {','.join(study.modalities) or '-'}")
        print(f"received    {_age(now - study.created_at)} ago, last instance "
              f"{_age(now - (study.last_received_at or study.created_at))} ago")
        print("series:")
        for s in series:
            print(f"  {s['modality'] or '-':<4} {s['instances']:>6} instances")
        print("history:")
        for h in history:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["at"]))
            reason = f"  ({h['reason']})" if h["reason"] else ""
            print(f"  {when}  run {h['run']}  {h['from_state'] or 'NEW':>10} -> {h['to_state']}{reason}")
        if deliveries:
            print("deliveries:")
        for d in deliveries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["at"]))
            print(f"  {when}  run {d['run']}  attempt {d['attempt']}  {d['destination']}  {d['outcome']}"
                  + (f"  {d['seconds']:.2f} s" if d["seconds"] is not None else ""))
        return 0
    studies = journal.studies(limit=args.limit)
    if args.json:
        print(json.dumps([s.__dict__ for s in studies], indent=2))
        return 0
    print(f"{'STUDY KEY':<17} {'STATE':<11} {'INSTANCES':>9}  {'CALLING AE':<16} {'MOD':<8} {'AGE':>5}")
    for s in studies:
        print(f"{s.study_key:<17} {s.state:<11} {s.instance_count:>9}  {(s.calling_ae or '-'):<16} "
              f"{(','.join(s.modalities) or '-')[:8]:<8} {_age(now - s.created_at):>5}")
    if not studies:
        print("(no studies yet)")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.file, path_name="FILE")
    check_tls(settings)
    print(effective_toml(settings), end="")
    return 0


# -- parser --------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, overrides: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    if overrides:
        p.add_argument("--port", type=int, help="override node.port")
        p.add_argument("--ae-title", dest="ae_title", help="override node.ae_title")
    p.add_argument("--spool", metavar="DIR", help="override node.spool")
    if overrides:
        p.add_argument("--log-format", dest="log_format", choices=["text", "json"],
                       help="override node.log_format: text (default) or json lines")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="pacs-ai: a DICOM node that runs AI models on studies")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="run the node and a worker on this machine (embedded broker unless queue.broker_url)")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("node", help="run the DICOM node (SCP, journal, completion, dispatch, delivery) without a worker")
    _common(p)
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("worker", help="run a Celery worker (inference queue by default) for a node sharing the spool")
    _common(p)
    p.add_argument("--queues", default="inference",
                   help="comma-separated: inference (with inference-urgent, served first), delivery (default inference)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="studies at a time (default 1: the solo pool, one process per GPU; more: prefork)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("retry", help="replay a FAILED study (delivery, or analysis if it has no outputs)")
    _common(p, overrides=False)
    p.add_argument("study", nargs="?", metavar="STUDY_KEY", help="the study's key (pacs-ai status lists them)")
    p.add_argument("--failed", action="store_true", help="every FAILED study")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("status", help="list studies in the journal, or one study's history")
    _common(p, overrides=False)
    p.add_argument("--study", metavar="KEY", help="show one study: series and state history")
    p.add_argument("--limit", type=int, default=50, help="how many recent studies (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("purge", help="delete a finished study (spool, work files, outbox, journal rows)")
    _common(p, overrides=False)
    p.add_argument("study", nargs="?", metavar="STUDY_KEY", help="the study's key (pacs-ai status lists them)")
    p.add_argument("--failed", action="store_true", help="every FAILED study")
    p.add_argument("--older-than", dest="older_than", type=float, default=0.0, metavar="DAYS",
                   help="with --failed: only those that failed at least DAYS ago")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("check-config", help="validate a config file and print the effective settings")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_check_config)

    from . import analyze_cmd, engine_cmd, send_cmd

    send_cmd.register(sub)
    analyze_cmd.register(sub)
    engine_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.func not in (cmd_node, cmd_run, cmd_worker):
            setup_logging("WARNING")  # warnings of echo/send/status as plain lines
            # pynetdicom's own errors repeat what the one-line error says
            logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
