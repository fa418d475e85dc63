"""``pacs-ai build-engine MODEL``: build and cache a TensorRT engine.

The work is done by :func:`inference.engines.tensorrt_engine.build_engine`;
this module resolves MODEL, draws TensorRT's progress monitor as a bar on
stderr, prints the engine's path on stdout, and maps outcomes to exit
statuses:

- 0: the engine is built (or already in the cache);
- 1: TensorRT, pycuda or a GPU is missing, or the build failed (one line
  ``pacs-ai: error: ...`` on stderr, never a traceback);
- 2: a bad command line or an unknown MODEL (:class:`UsageError`, printed by
  the main CLI as one line);
- 130: Ctrl-C (the build is cancelled through the progress monitor).

Build engines before starting workers: a worker that finds no engine in the
cache builds one itself, which delays its first study by minutes.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from dicom_node.sender import ProgressBar
from inference.engines.errors import EngineError, EngineUnavailable
from inference.spec import MODELS_DIR as spec_models_dir

from .errors import UsageError

PROG = "pacs-ai"
MODELS_DIR = spec_models_dir
"""Where model folders live: ``inference/models/<name>/model.onnx`` (the specs' folder)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``build-engine`` subcommand to the main CLI's parser."""
    p = subparsers.add_parser(
        "build-engine",
        help="build and cache the TensorRT engine of a model (NVIDIA GPU, pacs-ai[gpu])",
        description="Build the TensorRT engine of MODEL for this GPU and TensorRT version and keep it in the "
        "engine cache, where workers find it.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a model name (inference/models/NAME/model.onnx), a model folder or an .onnx file")
    p.add_argument("--cache-dir", dest="cache_dir", metavar="DIR",
                   help="engine cache (default ~/.cache/pacs-ai/engines, or under $XDG_CACHE_HOME)")
    p.add_argument("--max-batch", dest="max_batch", type=_positive, default=16, metavar="N",
                   help="largest batch the engine takes (default 16, as inference.batch_size)")
    p.add_argument("--opt-batch", dest="opt_batch", type=_positive, metavar="N",
                   help="batch size TensorRT tunes for (default: --max-batch)")
    p.add_argument("--precision", choices=("onnx", "fp16"), default="onnx",
                   help="onnx: as typed in the ONNX file (default; the only choice on TensorRT 11); "
                   "fp16: TensorRT 10's FP16 builder flag")
    p.add_argument("--device", type=_non_negative, default=0, metavar="I", help="CUDA device index (default 0)")
    p.add_argument("--rebuild", action="store_true", help="build even if the cache has this engine")
    p.set_defaults(func=cmd_build_engine)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 0")
    return value


def known_models(models_dir: Path | None = None) -> list[str]:
    root = MODELS_DIR if models_dir is None else models_dir
    try:
        return sorted(p.name for p in root.iterdir() if (p / "model.onnx").is_file())
    except OSError:
        return []


def resolve_model(text: str, models_dir: Path | None = None) -> Path:
    """MODEL as an ONNX file: an ``.onnx`` path, a folder holding
    ``model.onnx``, or a model name under ``inference/models/``.

    (A private stand-in for ``inference.spec.find_model``, which resolves
    names for the pipeline; only the ONNX file matters here.)
    """
    path = Path(text)
    if path.suffix.lower() == ".onnx":
        if path.is_file():
            return path
        raise UsageError(f"MODEL: {text}: no such ONNX file")
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        raise UsageError(f"MODEL: {text}: this folder has no model.onnx")
    root = MODELS_DIR if models_dir is None else models_dir
    candidate = root / text / "model.onnx"
    if "/" not in text and "\\" not in text and text not in ("", ".", ".."):
        if candidate.is_file():
            return candidate
        if candidate.parent.is_dir():
            raise UsageError(f"MODEL: {text}: {candidate.parent} has no model.onnx (export the model first)")
    names = known_models(root)
    known = f"known models: {', '.join(names)}" if names else f"no models in {root}"
    raise UsageError(f"MODEL: {text!r} is no model name, .onnx file or model folder ({known})")


class BuildProgressBar(ProgressBar):
    """TensorRT's build progress as one line on stderr (the sender's bar, drawn per phase).

    TensorRT reports nested phases, each with a number of steps; the bar
    follows the outermost phase and the label names the innermost one, e.g.
    ``building engine [#####.....] 3/7 Timing graph nodes  42s``. Like the
    sender's bar it draws only on a terminal; TensorRT calls it from several
    threads, so drawing is locked. Returns ``True`` from ``step_complete`` to
    let the build go on.
    """

    def __init__(self, label: str = "building engine", stream: TextIO | None = None, min_interval: float = 0.1) -> None:
        super().__init__(label, stream, min_interval)
        self._lock = threading.Lock()
        self._phases: list[list] = []  # [name, steps, done], outermost first
        self.phases_seen = 0

    def phase_start(self, name: str, parent: str | None, num_steps: int) -> None:
        with self._lock:
            self.phases_seen += 1
            if parent is None:
                self._phases = []
            else:
                names = [p[0] for p in self._phases]
                if parent in names:
                    del self._phases[names.index(parent) + 1:]
            self._phases.append([name, max(0, int(num_steps)), 0])
            self._draw(force=True)

    def step_complete(self, name: str, step: int) -> bool:
        with self._lock:
            for phase in self._phases:
                if phase[0] == name:
                    phase[2] = max(phase[2], int(step) + 1)
            self._draw()
        return True

    def phase_finish(self, name: str) -> None:
        with self._lock:
            names = [p[0] for p in self._phases]
            if name in names:
                i = names.index(name)
                self._phases[i][2] = self._phases[i][1]
                if i > 0:
                    del self._phases[i:]
            self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled or not self._phases:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self._min_interval:
            return
        self._last_draw = now
        _, total, done = self._phases[0]
        self.draw(done, total, f" {done}/{total} {self._phases[-1][0]}  {now - self._started:.0f}s")

    def close(self) -> None:
        with self._lock:
            super().close()

    def __enter__(self) -> "BuildProgressBar":
        return self


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def cmd_build_engine(args: argparse.Namespace) -> int:
    """``pacs-ai build-engine MODEL``: the engine's path on stdout."""
    from inference.engines import choose_engine_kind
    from inference.engines import tensorrt_engine as te

    onnx_path = resolve_model(args.model)
    if args.opt_batch is not None and args.opt_batch > args.max_batch:
        raise UsageError(f"--opt-batch: {args.opt_batch} is larger than --max-batch {args.max_batch}")
    try:
        choose_engine_kind("tensorrt")
    except EngineUnavailable as exc:
        return _fail(str(exc))
    cache_dir = Path(args.cache_dir) if args.cache_dir else te.default_cache_dir()
    try:
        cached = not args.rebuild and te.engine_cache_path(
            onnx_path, cache_dir, args.max_batch, args.opt_batch, precision=args.precision, device=args.device
        ).is_file()
        started = time.monotonic()
        with BuildProgressBar(label=f"building {onnx_path.parent.name or onnx_path.stem}") as bar:
            path = te.build_engine(onnx_path, cache_dir, args.max_batch, args.opt_batch, bar,
                                   precision=args.precision, device=args.device, rebuild=args.rebuild)
    except EngineError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"--cache-dir: {cache_dir}: {exc.strerror or exc}")
    if cached:
        print(f"{PROG}: engine already in the cache (--rebuild builds it again)", file=sys.stderr)
    else:
        print(f"{PROG}: engine built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(path)
    return 0
