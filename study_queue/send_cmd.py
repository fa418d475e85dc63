"""``pacs-ai echo`` and ``pacs-ai send``: the DICOM sender on the command line.

The work is done by :mod:`dicom_node.sender`; this module turns arguments
into calls and outcomes into exit statuses:

- 0: the peer answered / stored every file found;
- 1: the peer was unreachable, refused, or failed at least one file (one line
  ``pacs-ai: error: ...`` on stderr, never a traceback);
- 2: a bad command line (raised as :class:`UsageError`, printed by the main
  CLI as one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicom_node.errors import DicomNodeError
from dicom_node.sender import (
    DEFAULT_CALLING_AE,
    Destination,
    ProgressBar,
    echo,
    format_summary,
    parse_destination,
    send_paths,
    validate_ae_title,
)

from .errors import UsageError

PROG = "pacs-ai"


def _seconds(text: str) -> float:
    """argparse type for --timeout: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``echo`` and ``send`` subcommands to the main CLI's parser."""
    p = subparsers.add_parser("echo", help="C-ECHO a DICOM peer: is it there, does it know us?")
    p.add_argument("destination", metavar="AE@HOST:PORT", help="the peer, e.g. ORTHANC@127.0.0.1:4242")
    _common(p, default_timeout=10.0)
    p.set_defaults(func=cmd_echo)

    p = subparsers.add_parser("send", help="C-STORE DICOM files and folders to a peer")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files, or folders searched recursively")
    p.add_argument("--to", required=True, metavar="AE@HOST:PORT", help="the peer, e.g. ORTHANC@127.0.0.1:4242")
    _common(p, default_timeout=30.0)
    p.set_defaults(func=cmd_send)


def _common(p: argparse.ArgumentParser, default_timeout: float) -> None:
    p.add_argument(
        "--calling-ae",
        dest="calling_ae",
        default=DEFAULT_CALLING_AE,
        metavar="AE",
        help=f"our AE title, as the peer knows it (default {DEFAULT_CALLING_AE})",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=default_timeout,
        metavar="S",
        help=f"seconds to wait for a connection or an answer (default {default_timeout:g})",
    )


def _destination(text: str) -> Destination:
    try:
        return parse_destination(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _calling_ae(text: str) -> str:
    try:
        return validate_ae_title(text, "--calling-ae")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def cmd_echo(args: argparse.Namespace) -> int:
    """``pacs-ai echo AE@HOST:PORT``: one C-ECHO, its round trip on stdout."""
    dest = _destination(args.destination)
    calling_ae = _calling_ae(args.calling_ae)
    try:
        seconds = echo(dest, calling_ae=calling_ae, timeout=args.timeout)
    except DicomNodeError as exc:
        return _fail(str(exc))
    print(f"{dest} answered C-ECHO in {seconds * 1000:.1f} ms")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    """``pacs-ai send PATH... --to AE@HOST:PORT``: C-STORE with a progress bar."""
    dest = _destination(args.to)
    calling_ae = _calling_ae(args.calling_ae)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise UsageError(f"{missing[0]}: no such file or folder")
    try:
        with ProgressBar(label=f"C-STORE to {dest.ae_title}") as bar:
            report = send_paths(args.paths, dest, calling_ae=calling_ae, timeout=args.timeout, progress=bar)
    except DicomNodeError as exc:
        return _fail(str(exc))
    if not report.outcomes:
        what = f" ({len(report.skipped)} files skipped, none is a DICOM instance)" if report.skipped else ""
        return _fail(f"nothing to send in {', '.join(args.paths)}{what}")
    print(format_summary(report))
    if not report.ok:
        return _fail(f"{report.failed} of {len(report.outcomes)} instances were not stored by {dest}")
    return 0
