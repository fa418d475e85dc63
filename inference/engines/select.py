"""Which engine runs, and one warm engine per model per process.

:func:`choose_engine_kind` resolves ``inference.engine`` (``auto``,
``tensorrt`` or ``onnxruntime``) and says why. How it decides ``auto``,
cheaply and without creating a CUDA context, so it is safe in a Celery parent
before it forks its workers:

1. ``import tensorrt`` must work and be a full TensorRT (it has ``Builder``);
2. ``import pycuda.driver`` must work (it loads ``libcuda.so.1``, so it fails
   without an NVIDIA driver); ``pycuda.autoinit`` is never imported and
   ``cuInit`` is never called here;
3. a GPU must be visible: counted from the driver's ``/proc/driver/nvidia/gpus``
   (or ``/dev/nvidia<N>`` device nodes in a container), limited by
   ``CUDA_VISIBLE_DEVICES``. No CUDA call, no ``nvidia-smi`` process.

Importing a module loads libraries but initialises no CUDA; the first CUDA
call happens when the engine is constructed, in the worker process.

:func:`load_engine` keeps each engine it made (keyed by model path, kind and
options) for the life of the process, so a worker loads a model once and
runs every study on the warm engine. The cache belongs to the process that
filled it: after a fork, the child starts empty (a parent's CUDA context is
unusable in a child).
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .base import Engine
from .errors import EngineError, EngineUnavailable

log = logging.getLogger(__name__)

KINDS = ("auto", "tensorrt", "onnxruntime")
PROC_GPUS = "/proc/driver/nvidia/gpus"
DEV_DIR = "/dev"


def visible_gpus(proc_dir: str | Path = PROC_GPUS, dev_dir: str | Path = DEV_DIR) -> tuple[int, str]:
    """``(number of NVIDIA GPUs this process may use, how that was found)``,
    without any CUDA call."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1", "none", "NoDevFiles"):
        return 0, f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU"
    try:
        count = sum(1 for _ in Path(proc_dir).iterdir())
        where = str(proc_dir)
    except OSError:
        count = 0
    if count == 0:
        count = len([p for p in Path(dev_dir).glob("nvidia[0-9]*") if p.name[6:].isdigit()])
        where = f"{dev_dir}/nvidia<N>"
    if count == 0:
        return 0, f"no NVIDIA driver or device: {proc_dir} and {dev_dir}/nvidia<N> are absent"
    if cvd:
        count = min(count, len([d for d in cvd.split(",") if d.strip()]))
        where += f", CUDA_VISIBLE_DEVICES={cvd}"
    return count, f"{count} NVIDIA GPU{'s' if count != 1 else ''} in {where}"


def tensorrt_problem() -> tuple[str, str] | None:
    """``None`` when TensorRT can run here, else ``(reason for auto, error
    message for a request of tensorrt)``."""
    from . import tensorrt_engine as te

    for name, probe in (("TensorRT", te.import_tensorrt), ("pycuda", te.import_pycuda)):
        try:
            probe()
        except EngineUnavailable as exc:
            cause = exc.__cause__
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
            return f"{name} is not importable ({detail})", str(exc)
    count, how = visible_gpus()
    if count == 0:
        return f"no NVIDIA GPU is visible ({how})", f"TensorRT is installed but no NVIDIA GPU is visible ({how})"
    return None


def _onnxruntime_device() -> str:
    try:
        import onnxruntime as ort

        return "CUDA" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPU"
    except Exception:  # reported properly when the engine loads
        return "CPU"


def choose_engine_kind(requested: str = "auto") -> tuple[str, str]:
    """``(kind, reason)``: ``tensorrt`` when asked for or, under ``auto``, when
    TensorRT imports and a GPU is visible; ``onnxruntime`` otherwise. Logs
    the choice and its reason. A request for ``tensorrt`` that cannot be met
    raises :class:`EngineUnavailable` naming what is missing."""
    if requested not in KINDS:
        raise EngineError(f"engine: must be auto, tensorrt or onnxruntime, got {requested!r}")
    if requested == "onnxruntime":
        kind, reason = "onnxruntime", f"requested (ONNX Runtime on {_onnxruntime_device()})"
    else:
        problem = tensorrt_problem()
        if problem is None:
            from . import tensorrt_engine as te

            kind = "tensorrt"
            reason = f"{'requested' if requested == 'tensorrt' else 'auto'}: TensorRT {te.import_tensorrt().__version__} " \
                     f"imports and {visible_gpus()[1]}"
        elif requested == "tensorrt":
            raise EngineUnavailable(problem[1])
        else:
            kind, reason = "onnxruntime", f"auto: {problem[0]}; using ONNX Runtime on {_onnxruntime_device()}"
    log.info("engine: %s (%s)", kind, reason)
    return kind, reason


# -- one warm engine per model per process ---------------------------------------------
_lock = threading.Lock()
_engines: dict[tuple[Any, ...], Engine] = {}
_owner_pid = os.getpid()


def _engine_class(kind: str) -> type:
    if kind == "tensorrt":
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine
    from .onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine


def _accepted(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n not in ("self", "model_path") and p.kind is not p.VAR_KEYWORD}


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, Path):
        return str(value.resolve())
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def load_engine(model_path: str | Path, kind: str = "auto", **options: Any) -> Engine:
    """The engine for ``model_path`` in this process, made on first use and
    kept warm after. ``options`` are the engines' constructor arguments
    (``threads``, ``providers``, ``max_batch``, ``cache_dir``, ``opt_batch``,
    ``precision``, ``device``, ...); those the chosen engine does not take are
    dropped, so one call works for ``auto`` on any machine. An option neither
    engine takes is a ``TypeError``.

    Call it in the worker process, never in a parent before it forks.
    """
    global _owner_pid
    resolved, reason = choose_engine_kind(kind)
    known = _accepted(_engine_class("onnxruntime")) | _accepted(_engine_class("tensorrt"))
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"load_engine: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    cls = _engine_class(resolved)
    accepted = _accepted(cls)
    opts = {k: v for k, v in options.items() if k in accepted}
    path = Path(model_path)
    key = (str(path.resolve()), resolved, tuple(sorted((k, _freeze(v)) for k, v in opts.items())))
    with _lock:
        if os.getpid() != _owner_pid:  # forked: the parent's engines are not ours to use or close
            _engines.clear()
            _owner_pid = os.getpid()
        engine = _engines.get(key)
        if engine is None:
            started = time.monotonic()
            engine = cls(path, **opts)
            _engines[key] = engine
            log.info("engine %s for %s loaded in %.1f s (%s); kept warm in process %d",
                     resolved, path.name, time.monotonic() - started, reason, os.getpid())
    return engine


def loaded_engines() -> list[Engine]:
    """The engines this process holds (for status pages and tests)."""
    with _lock:
        return list(_engines.values()) if os.getpid() == _owner_pid else []


def clear() -> None:
    """Close and forget every engine this process loaded (tests, shutdown)."""
    global _owner_pid
    with _lock:
        engines = list(_engines.values()) if os.getpid() == _owner_pid else []
        _engines.clear()
        _owner_pid = os.getpid()
    for engine in engines:
        try:
            engine.close()
        except Exception as exc:  # closing at exit must not hide the real outcome
            log.warning("closing engine %s: %s", engine.name, exc)


atexit.register(clear)  # GPU buffers freed while CUDA is still up, not in interpreter teardown
