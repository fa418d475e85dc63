"""TensorRT engine: built from the same ONNX file as ONNX Runtime, cached on
disk, run through pycuda with pinned host buffers, device buffers and one
stream (DESIGN.md section 8).

Nothing here imports ``tensorrt`` or ``pycuda`` at module import: both are the
optional ``gpu`` extra, and CUDA must be initialised in the process that uses
it. ``cuInit`` runs in :class:`CudaDevice`, i.e. in the constructor of
:class:`TensorRTEngine` or in :func:`build_engine`, so a Celery parent that
forks workers never touches CUDA (FIELD-NOTES.md "GPU, TensorRT, pycuda").

Written for TensorRT 11, where networks are always strongly typed: the
precision of every layer comes from the ONNX file (convert it to FP16 with
ModelOpt AutoCast before building; ``BuilderFlag.FP16/INT8`` and the
calibrators are gone). TensorRT 10 is supported too; what differs there is in
:func:`network_plan`: its networks are weakly typed unless created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, and ``BuilderFlag.FP16``
still exists (``precision="fp16"``). Both versions use the tensor-name API:
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``,
``build_serialized_network`` and memory pool limits (binding indices,
``execute_async_v2``, ``max_batch_size`` and ``max_workspace_size`` are gone
since 10).

Engine cache: ``<cache_dir>/<key>.engine`` (plus a ``.json`` a person can
read), where the key (:func:`engine_cache_key`) covers the ONNX file's SHA-256,
the TensorRT version, the GPU's name, the precision and the batch profile:
an engine is only valid for the exact TensorRT build and GPU model that made
it. One timing cache per TensorRT version and GPU name sits beside the
engines, loaded before and saved after every build, so rebuilding a model (or
building a similar one) skips most kernel timing.

Pure functions (:func:`engine_cache_key`, :func:`buffer_nbytes`,
:func:`profile_shapes`, :func:`network_plan`, :func:`numpy_dtype`,
:func:`format_parser_errors`) carry the logic that can be checked without a
GPU, and are tested on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from .base import DYNAMIC, check_batch, format_shape, normalize_shape, run_in_chunks
from .errors import EngineBuildCancelled, EngineError, EngineInputError, EngineUnavailable

log = logging.getLogger(__name__)
trt_log = logging.getLogger("inference.engines.tensorrt.trt")

INSTALL_HINT = "pip install 'pacs-ai[gpu]' on a machine with an NVIDIA GPU and CUDA"
TENSORRT_MISSING = f"TensorRT is not installed ({INSTALL_HINT})"
PYCUDA_MISSING = f"pycuda is not installed ({INSTALL_HINT})"
PRECISIONS = ("onnx", "fp16")
"""``onnx``: as typed in the ONNX file (strongly typed; the only choice on
TensorRT 11). ``fp16``: TensorRT 10's weakly typed FP16 builder flag."""
DEFAULT_MAX_BATCH = 16
DEFAULT_WORKSPACE_BYTES = 4 << 30
ENGINE_SUFFIXES = (".engine", ".plan")


# -- lazy imports ----------------------------------------------------------------
def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`EngineUnavailable` naming what is
    missing (the original ImportError is its ``__cause__``)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 (optional, never at module import)
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt":
            raise EngineUnavailable(TENSORRT_MISSING) from exc
        raise EngineUnavailable(f"TensorRT does not import ({exc}); {INSTALL_HINT}") from exc
    except Exception as exc:  # its libraries missing: ImportError/OSError from the loader
        raise EngineUnavailable(f"TensorRT does not import ({type(exc).__name__}: {exc})") from exc
    if not hasattr(trt, "Builder"):
        raise EngineUnavailable(f"the installed 'tensorrt' module cannot build engines (a stub or lean runtime); {INSTALL_HINT}")
    major = trt_major(trt.__version__)
    if major < 10:
        raise EngineUnavailable(f"TensorRT {trt.__version__} is too old: pacs-ai needs TensorRT 10 or later")
    return trt


def import_pycuda() -> Any:
    """``pycuda.driver`` (imported, not initialised: ``pycuda.autoinit`` is
    never used), or :class:`EngineUnavailable`."""
    try:
        import pycuda.driver as cuda  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        if exc.name in ("pycuda", "pycuda.driver"):
            raise EngineUnavailable(PYCUDA_MISSING) from exc
        raise EngineUnavailable(f"pycuda does not import ({exc})") from exc
    except Exception as exc:  # e.g. "ImportError: libcuda.so.1": no NVIDIA driver
        raise EngineUnavailable(f"pycuda does not import ({type(exc).__name__}: {exc}); is the NVIDIA driver installed?") from exc
    return cuda


def trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


# -- pure functions (tested on the CPU) ------------------------------------------
def _slug(text: str, limit: int = 40) -> str:
    """``text`` reduced to ``[A-Za-z0-9.+-]`` (runs of anything else become ``-``)."""
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-.")
    return (slug[:limit].rstrip("-.")) or "x"


def engine_cache_key(
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    precision: str,
    batch: tuple[int, int, int] | None = None,
) -> str:
    """A file name stem (no suffix) naming one engine: readable parts, then a
    digest of the exact values, so two GPU names that reduce to the same slug
    still get different keys.

    ``batch`` is the optimisation profile (min, opt, max): an engine built for
    a max batch of 8 cannot run 16, so it is part of the key too.

    >>> engine_cache_key("ab" * 32, "11.0.0", "NVIDIA H200", "onnx", (1, 16, 16))
    'abababababababab_trt11.0.0_NVIDIA-H200_onnx_b1-16-16_...'  # doctest: +SKIP
    """
    for label, value in (("onnx_sha256", onnx_sha256), ("trt_version", trt_version),
                         ("gpu_name", gpu_name), ("precision", precision)):
        if not isinstance(value, str) or not value.strip():
            raise EngineError(f"engine cache key: {label} must be a non-empty string, got {value!r}")
    parts = [_slug(onnx_sha256, 16), "trt" + _slug(trt_version), _slug(gpu_name), _slug(precision)]
    if batch is not None:
        parts.append("b" + "-".join(str(int(b)) for b in batch))
    exact = "\0".join([onnx_sha256, trt_version, gpu_name, precision, repr(tuple(batch) if batch else None)])
    digest = hashlib.sha256(exact.encode("utf-8")).hexdigest()[:12]
    return "_".join(parts + [digest])


def timing_cache_name(trt_version: str, gpu_name: str) -> str:
    """One timing cache per TensorRT version and GPU model, shared by models."""
    return f"timing_trt{_slug(trt_version)}_{_slug(gpu_name)}.cache"


def onnx_sha256(path: str | Path) -> str:
    """SHA-256 of the ONNX file. (Weights kept in external data files are not
    covered: export models with their weights inside, as ours are.)"""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_dynamic(dim: object) -> bool:
    return dim is None or not isinstance(dim, (int, np.integer)) or dim < 0


def buffer_nbytes(shape: Sequence[int | None], dtype: Any, profile_max: Sequence[int] | None = None) -> int:
    """Bytes of a buffer holding a tensor of ``shape`` and ``dtype``.

    Dynamic dimensions (``-1`` or ``None``) take their value from
    ``profile_max``, the optimisation profile's max shape, so one allocation
    serves every batch the engine accepts. Static dimensions must agree with
    it. A dynamic shape without ``profile_max`` is an error: the size would be
    a guess.
    """
    shape = tuple(shape)
    itemsize = np.dtype(dtype).itemsize
    if any(_is_dynamic(d) for d in shape):
        if profile_max is None:
            raise EngineError(f"shape {shape} has dynamic dimensions: the buffer size needs the profile's max shape")
        profile_max = tuple(profile_max)
        if len(profile_max) != len(shape) or any(_is_dynamic(d) for d in profile_max):
            raise EngineError(f"profile max shape {profile_max} does not fit shape {shape}")
        for i, (d, m) in enumerate(zip(shape, profile_max)):
            if not _is_dynamic(d) and d != m:
                raise EngineError(f"profile max shape {profile_max} differs from shape {shape} in dimension {i}")
        shape = profile_max
    return math.prod(int(d) for d in shape) * itemsize


def profile_shapes(
    input_shape: Sequence[int], max_batch: int, opt_batch: int | None = None, min_batch: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of an optimisation profile over the batch axis.

    Only the batch (axis 0) may be dynamic: the models take fixed-size slices
    and a profile over H/W would cost engine speed for nothing.
    """
    shape = normalize_shape(input_shape)
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EngineError(f"batch profile: need 1 <= min ({min_batch}) <= opt ({opt_batch}) <= max ({max_batch})")
    if not shape:
        raise EngineError("input has no dimensions; engines take batch-first tensors")
    rest = shape[1:]
    if any(d == DYNAMIC for d in rest):
        raise EngineError(
            f"input shape {format_shape(shape)}: only the batch may be dynamic; export the model with fixed "
            "channels, height and width"
        )
    if shape[0] != DYNAMIC:
        fixed = (shape[0], *rest)
        return fixed, fixed, fixed
    return (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest)


def network_plan(trt_major_version: int, precision: str) -> tuple[bool, bool]:
    """``(create the network strongly typed via the flag, set BuilderFlag.FP16)``.

    - TensorRT 11+: networks are always strongly typed; no flag to pass, and
      no precision flags exist: precision comes from the ONNX file.
    - TensorRT 10: strong typing is opt-in (``STRONGLY_TYPED`` creation flag)
      and excludes the weak-typing flags; ``fp16`` builds a weakly typed
      network with ``BuilderFlag.FP16`` (TensorRT then may pick FP16 kernels).
    """
    if precision not in PRECISIONS:
        raise EngineError(f"precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if trt_major_version >= 11:
        if precision == "fp16":
            raise EngineError(
                "precision fp16: TensorRT 11 takes precision from the ONNX file (BuilderFlag.FP16 is gone); "
                "convert the model with ModelOpt AutoCast and build it with precision 'onnx'"
            )
        return False, False
    if trt_major_version == 10:
        return (precision == "onnx"), (precision == "fp16")
    raise EngineError(f"TensorRT {trt_major_version}.x is not supported: need 10 or later")


_NUMPY_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
}


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """numpy dtype of a ``tensorrt.DataType`` (matched by name, so the table
    is tested without TensorRT). BF16/FP8/INT4 have no numpy type: an engine
    must take and return float32 (AutoCast's ``keep_io_types``)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    try:
        return np.dtype(_NUMPY_DTYPES[name.upper()])
    except KeyError:
        raise EngineError(
            f"tensor type {name} has no numpy equivalent; keep the model's inputs and outputs float32"
        ) from None


def format_parser_errors(parser: Any, limit: int = 5) -> str:
    """TensorRT's ONNX parser errors as one readable string: each with its
    node (name and operator when this TensorRT says them) and description."""
    count = int(getattr(parser, "num_errors", 0) or 0)
    items = []
    for i in range(min(count, limit)):
        err = parser.get_error(i)
        desc = str(_call(err, "desc") or err).strip()
        where = []
        node_name = _call(err, "node_name")
        operator = _call(err, "node_operator")
        node = _call(err, "node")
        if node_name:
            where.append(f"node {node_name!r}")
        elif node is not None and node != -1:
            where.append(f"node #{node}")
        if operator:
            where.append(f"({operator})")
        items.append(f"{' '.join(where)}: {desc}" if where else desc)
    if not items:
        return "no error reported by the parser"
    more = f" (and {count - limit} more)" if count > limit else ""
    return "; ".join(items) + more


def _call(obj: Any, method: str) -> Any:
    fn = getattr(obj, method, None)
    if fn is None:
        return None
    try:
        return fn() if callable(fn) else fn
    except Exception:
        return None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pacs-ai/engines`` (``~/.cache/pacs-ai/engines``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pacs-ai" / "engines"


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- build progress ------------------------------------------------------------------
class BuildProgress(Protocol):
    """What :func:`build_engine` reports to (a progress bar). TensorRT calls it
    from its own threads, phases nest (``parent`` names the enclosing one),
    and ``step_complete`` returning ``False`` cancels the build."""

    def phase_start(self, name: str, parent: str | None, num_steps: int) -> None: ...
    def step_complete(self, name: str, step: int) -> bool | None: ...
    def phase_finish(self, name: str) -> None: ...


class ProgressRelay:
    """Stands between TensorRT's ``IProgressMonitor`` and a
    :class:`BuildProgress`: calls it under a lock (TensorRT requires a
    thread-safe monitor), never lets its exceptions into TensorRT, and turns
    a Ctrl-C inside a callback into a clean cancellation of the build."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.cancelled = False
        self.interrupted = False
        self.error: Exception | None = None
        self._lock = threading.Lock()

    def phase_start(self, name: str, parent: str | None, num_steps: int) -> None:
        self._call("phase_start", name, parent or None, int(num_steps))

    def step_complete(self, name: str, step: int) -> bool:
        if not self.cancelled and self._call("step_complete", name, int(step)) is False:
            self.cancelled = True
        return not self.cancelled

    def phase_finish(self, name: str) -> None:
        self._call("phase_finish", name)

    def _call(self, method: str, *args: Any) -> Any:
        fn = getattr(self.target, method, None)
        if fn is None:
            return None
        with self._lock:
            try:
                return fn(*args)
            except KeyboardInterrupt:
                self.interrupted = self.cancelled = True
            except Exception as exc:  # a broken progress bar must not break the build
                if self.error is None:
                    log.warning("build progress display failed: %s", exc)
                self.error = exc
        return None


def _progress_monitor(trt: Any, relay: ProgressRelay) -> Any:
    """A ``trt.IProgressMonitor`` forwarding to ``relay`` (the class is made
    here because ``tensorrt`` is imported lazily)."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            relay.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return relay.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            relay.phase_finish(phase_name)

    return _Monitor()


_SEVERITY_LEVELS = {
    "INTERNAL_ERROR": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.DEBUG,  # TensorRT's INFO is build chatter
}


def _trt_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` into Python logging that keeps the errors, so a build
    or deserialisation that returns ``None`` can say why."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = _SEVERITY_LEVELS.get(getattr(severity, "name", ""), None)
            if level is None:  # VERBOSE: thousands of lines per build
                return
            if level >= logging.ERROR:
                self.errors.append(str(msg).strip())
            trt_log.log(level, "%s", msg)

    return _Logger()


# -- CUDA ------------------------------------------------------------------------------
class CudaDevice:
    """One GPU's primary context, made current around each use.

    ``cuInit`` runs here, in the process that will use the GPU (never at
    import). The primary context is the one the CUDA runtime (TensorRT,
    CuPy, torch) uses too, so they all share one context and its memory.
    It is pushed for the duration of a ``with`` block and popped after,
    instead of being left current on the constructing thread, because a
    worker may call ``infer`` from another thread than the one that loaded
    the engine. Blocks nest (a per-thread depth counter).
    """

    def __init__(self, cuda: Any, index: int = 0) -> None:
        self._cuda = cuda
        self.index = index
        self._local = threading.local()
        try:
            cuda.init()
            count = cuda.Device.count()
            if not 0 <= index < count:
                raise EngineUnavailable(f"CUDA device {index} does not exist ({count} visible)")
            device = cuda.Device(index)
            self.name: str = str(device.name())
            self._context = device.retain_primary_context()
        except cuda.Error as exc:
            raise EngineUnavailable(f"CUDA device {index}: {exc}") from exc

    def __enter__(self) -> "CudaDevice":
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            if self._context is None:
                raise EngineError(f"CUDA device {self.index}: released")
            self._context.push()
        self._local.depth = depth + 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._local.depth -= 1
        if self._local.depth == 0:
            self._cuda.Context.pop()

    def release(self) -> None:
        """Drop this object's reference to the primary context."""
        if self._context is not None:
            try:
                self._context.detach()
            except self._cuda.Error as exc:
                log.warning("CUDA device %d: releasing the context: %s", self.index, exc)
            self._context = None


# -- build -------------------------------------------------------------------------------
def engine_cache_path(
    onnx_path: str | Path,
    cache_dir: str | Path | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    *,
    precision: str = "onnx",
    device: int = 0,
) -> Path:
    """Where :func:`build_engine` puts (or finds) the engine for these
    arguments on this machine. Imports TensorRT and initialises CUDA (for the
    GPU's name)."""
    trt = import_tensorrt()
    gpu = CudaDevice(import_pycuda(), device)
    try:
        return _cache_path(Path(onnx_path), cache_dir, trt.__version__, gpu.name, precision, max_batch, opt_batch)
    finally:
        gpu.release()


def _cache_path(onnx_path: Path, cache_dir: str | Path | None, trt_version: str, gpu_name: str,
                precision: str, max_batch: int, opt_batch: int | None) -> Path:
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: no such ONNX model file")
    opt = max_batch if opt_batch is None else opt_batch
    key = engine_cache_key(onnx_sha256(onnx_path), trt_version, gpu_name, precision, (1, opt, max_batch))
    return Path(cache_dir or default_cache_dir()) / f"{key}.engine"


def build_engine(
    onnx_path: str | Path,
    cache_dir: str | Path | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    progress: BuildProgress | None = None,
    *,
    precision: str = "onnx",
    device: int = 0,
    rebuild: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Path:
    """Build (or find in the cache) the TensorRT engine of ``onnx_path`` and
    return its path.

    The network comes from TensorRT's ONNX parser; the optimisation profile
    spans batches 1..``max_batch`` (tuned for ``opt_batch``, default
    ``max_batch``); the workspace pool is capped at ``workspace_bytes``; the
    timing cache beside the engines is loaded first and saved after.
    ``progress`` receives TensorRT's progress monitor callbacks. Takes
    minutes for a large model: run ``pacs-ai build-engine`` before starting
    workers, not inside ``worker_process_init`` (it has a 4 s limit).
    """
    onnx_path = Path(onnx_path)
    trt = import_tensorrt()
    cuda = import_pycuda()
    strongly_typed_flag, fp16_flag = network_plan(trt_major(trt.__version__), precision)
    profile_shapes((DYNAMIC, 1), max_batch, opt_batch)  # check the numbers before any work
    gpu = CudaDevice(cuda, device)
    try:
        plan_path = _cache_path(onnx_path, cache_dir, trt.__version__, gpu.name, precision, max_batch, opt_batch)
        if plan_path.is_file() and not rebuild:
            log.info("engine cache: reusing %s", plan_path)
            return plan_path
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("building a TensorRT %s engine for %s on %s (batch 1..%d); this can take minutes",
                 trt.__version__, onnx_path.name, gpu.name, max_batch)
        started = time.monotonic()
        try:
            with gpu:
                info = _build(trt, onnx_path, plan_path, gpu.name, max_batch, opt_batch, progress,
                              strongly_typed_flag, fp16_flag, workspace_bytes)
        except cuda.Error as exc:
            raise EngineError(f"{onnx_path}: CUDA error during the TensorRT build: {exc}") from exc
        info.update(
            onnx=str(onnx_path.resolve()), onnx_sha256=onnx_sha256(onnx_path), tensorrt=trt.__version__,
            gpu=gpu.name, precision=precision, build_seconds=round(time.monotonic() - started, 1),
            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        _write_atomic(plan_path.with_suffix(".json"), (json.dumps(info, indent=2) + "\n").encode())
        log.info("engine built in %.0f s: %s", info["build_seconds"], plan_path)
        return plan_path
    finally:
        gpu.release()


def _build(trt: Any, onnx_path: Path, plan_path: Path, gpu_name: str, max_batch: int, opt_batch: int | None,
           progress: BuildProgress | None, strongly_typed_flag: bool, fp16_flag: bool,
           workspace_bytes: int) -> dict[str, Any]:
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    # TensorRT 11: every network is strongly typed, flags 0. TensorRT 10: opt in.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser failed: {format_parser_errors(parser)}")
    if network.num_inputs != 1:
        raise EngineError(f"{onnx_path}: engines take models with one input, this one has {network.num_inputs}")
    tensor = network.get_input(0)
    shape = normalize_shape(tuple(tensor.shape))
    low, opt, high = profile_shapes(shape, max_batch, opt_batch)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16_flag:  # TensorRT 10 only: weak typing; removed in 11 (precision comes from the ONNX)
        config.set_flag(trt.BuilderFlag.FP16)
    if DYNAMIC in shape:
        profile = builder.create_optimization_profile()
        profile.set_shape(tensor.name, low, opt, high)
        config.add_optimization_profile(profile)

    timing_path = plan_path.parent / timing_cache_name(trt.__version__, gpu_name)
    blob = timing_path.read_bytes() if timing_path.is_file() else b""
    timing = config.create_timing_cache(blob)
    if timing is None or not config.set_timing_cache(timing, ignore_mismatch=False):
        log.warning("timing cache %s does not fit this TensorRT/GPU; starting a new one", timing_path)
        timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, ignore_mismatch=False)

    relay = monitor = None
    if progress is not None:
        relay = ProgressRelay(progress)
        monitor = _progress_monitor(trt, relay)
        config.progress_monitor = monitor  # must outlive the build: kept in a local until return

    serialized = builder.build_serialized_network(network, config)
    if relay is not None and relay.interrupted:
        raise KeyboardInterrupt
    if serialized is None:
        if relay is not None and relay.cancelled:
            raise EngineBuildCancelled(f"{onnx_path}: the TensorRT build was cancelled")
        why = logger.errors[-1] if logger.errors else "TensorRT gave no reason (see the log)"
        raise EngineError(f"{onnx_path}: TensorRT could not build an engine: {why}")
    _write_atomic(plan_path, memoryview(serialized))
    try:
        _write_atomic(timing_path, memoryview(config.get_timing_cache().serialize()))
    except OSError as exc:
        log.warning("timing cache %s not saved: %s", timing_path, exc)
    del monitor
    return {"input": tensor.name, "input_shape": list(shape), "profile": [list(low), list(opt), list(high)]}


# -- runtime ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One I/O tensor of an engine: its declared shape (``-1`` dynamic) and
    its shape at the optimisation profile's max, which sizes its buffers."""

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return buffer_nbytes(self.shape, self.dtype, self.max_shape)


@dataclass
class Buffers:
    """A tensor's pinned host buffer (flat, max size) and device buffer."""

    spec: TensorSpec
    host: np.ndarray
    device: Any  # pycuda.driver.DeviceAllocation

    def host_view(self, shape: Sequence[int]) -> np.ndarray:
        """The first ``prod(shape)`` elements of the host buffer as ``shape``
        (contiguous, still pinned memory)."""
        return self.host[: math.prod(shape)].reshape(tuple(shape))


def engine_tensor_specs(trt: Any, engine: Any, context: Any) -> list[TensorSpec]:
    """The engine's I/O tensors with their max shapes. Inputs take the max
    shape of optimisation profile 0; outputs the shape TensorRT infers once
    every input is set to its max (left set on ``context``)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    specs: dict[str, TensorSpec] = {}
    for name in inputs:
        shape = normalize_shape(tuple(engine.get_tensor_shape(name)))
        max_shape = shape
        if DYNAMIC in shape:
            max_shape = tuple(int(d) for d in engine.get_tensor_profile_shape(name, 0)[2])
            if not context.set_input_shape(name, max_shape):
                raise EngineError(f"input {name!r}: TensorRT refuses its own profile max shape {max_shape}")
        specs[name] = TensorSpec(name, True, numpy_dtype(engine.get_tensor_dtype(name)), shape, max_shape)
    for name in names:
        if name in specs:
            continue
        shape = normalize_shape(tuple(engine.get_tensor_shape(name)))
        max_shape = tuple(int(d) for d in context.get_tensor_shape(name))
        if any(d < 0 for d in max_shape):
            raise EngineError(f"output {name!r} has a data-dependent shape {max_shape}; engines need outputs sized by the input")
        specs[name] = TensorSpec(name, False, numpy_dtype(engine.get_tensor_dtype(name)), shape, max_shape)
    return [specs[n] for n in names]


def allocate_buffers(cuda: Any, specs: Iterable[TensorSpec]) -> dict[str, Buffers]:
    """Pinned host memory (``pagelocked_empty``) and device memory
    (``mem_alloc``) for every tensor at its max shape. Pinned host memory is
    what makes the ``memcpy_*_async`` copies asynchronous (and fast); pageable
    memory would make them synchronous staging copies. Call with the CUDA
    context current."""
    out = {}
    for spec in specs:
        count = max(1, math.prod(spec.max_shape))
        host = cuda.pagelocked_empty(count, spec.dtype)
        device = cuda.mem_alloc(max(1, spec.nbytes))
        out[spec.name] = Buffers(spec, host, device)
    return out


class TensorRTEngine:
    """An :class:`~inference.engines.base.Engine` on a TensorRT engine.

    ``model_path`` is an ONNX file (its engine is taken from the cache under
    ``cache_dir``, or built there first: minutes) or a serialized engine
    (``.engine``/``.plan``). Construct it in the process that runs inference
    (the Celery worker child): it initialises CUDA.

    ``infer`` copies the batch into a pinned host buffer, then on one stream:
    host->device copy, ``set_input_shape``, ``execute_async_v3``,
    device->host copies, synchronise. Tensor addresses never change (buffers
    are allocated once, at the profile's max), so ``set_tensor_address`` is
    called once at load. Batches above the profile's max are split.
    One engine serves one thread at a time (a lock guards the shared buffers).
    """

    name = "tensorrt"

    def __init__(
        self,
        model_path: str | Path,
        *,
        cache_dir: str | Path | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        opt_batch: int | None = None,
        precision: str = "onnx",
        device: int = 0,
        rebuild: bool = False,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        progress: BuildProgress | None = None,
    ) -> None:
        trt = import_tensorrt()
        cuda = import_pycuda()
        path = Path(model_path)
        if path.suffix in ENGINE_SUFFIXES:
            if not path.is_file():
                raise EngineError(f"{path}: no such TensorRT engine file")
            plan = path
        else:
            plan = build_engine(path, cache_dir, max_batch, opt_batch, progress, precision=precision,
                                device=device, rebuild=rebuild, workspace_bytes=workspace_bytes)
        gpu = CudaDevice(cuda, device)
        try:
            with gpu:
                logger = _trt_logger(trt)
                runtime = trt.Runtime(logger)
                engine = runtime.deserialize_cuda_engine(plan.read_bytes())
                if engine is None:
                    why = logger.errors[-1] if logger.errors else "made by another TensorRT version or for another GPU?"
                    raise EngineError(f"{plan}: TensorRT cannot load this engine ({why}); delete it or rebuild it "
                                      "with pacs-ai build-engine --rebuild")
                context = engine.create_execution_context()
                if context is None:
                    raise EngineError(f"{plan}: TensorRT cannot create an execution context (out of GPU memory?)")
                specs = engine_tensor_specs(trt, engine, context)
            # The runtime must outlive the engine, the engine its context.
            self._trt_objects: tuple[Any, ...] = (runtime, engine)
            self._setup(cuda, gpu, context, specs, label=plan.name)
        except cuda.Error as exc:
            gpu.release()
            raise EngineError(f"{plan}: CUDA error while loading the engine: {exc}") from exc
        except BaseException:
            gpu.release()
            raise
        log.info("tensorrt: loaded %s on %s, input %r %s, batch up to %d",
                 plan.name, gpu.name, self.input_name, format_shape(self.input_shape), self.max_batch)

    @classmethod
    def from_execution_context(cls, context: Any, specs: Sequence[TensorSpec], *, device: int = 0,
                               label: str = "engine") -> "TensorRTEngine":
        """An engine around any object with TensorRT's execution-context
        methods (``set_input_shape``, ``set_tensor_address``,
        ``get_tensor_shape``, ``execute_async_v3``): the buffer and stream
        code path without TensorRT, for bench/gpu_check.py and the tests."""
        cuda = import_pycuda()
        gpu = CudaDevice(cuda, device)
        self = cls.__new__(cls)
        self._trt_objects = ()
        try:
            self._setup(cuda, gpu, context, list(specs), label=label)
        except cuda.Error as exc:
            gpu.release()
            raise EngineError(f"{label}: CUDA error while allocating buffers: {exc}") from exc
        except BaseException:
            gpu.release()
            raise
        return self

    def _setup(self, cuda: Any, gpu: CudaDevice, context: Any, specs: list[TensorSpec], label: str) -> None:
        inputs = [s for s in specs if s.is_input]
        if len(inputs) != 1:
            raise EngineError(f"{label}: engines take models with one input, this one has {len(inputs)}")
        (inp,) = inputs
        if inp.dtype != np.float32:
            raise EngineError(f"{label}: input {inp.name!r} is {inp.dtype}, engines feed float32")
        self._cuda = cuda
        self._gpu = gpu
        self._context = context
        self._lock = threading.Lock()
        self.label = label
        self.device_name = gpu.name
        self.input_name: str = inp.name
        self.input_shape: tuple[int, ...] = inp.shape
        self.max_batch: int | None = inp.max_shape[0]
        self.output_names: tuple[str, ...] = tuple(s.name for s in specs if not s.is_input)
        self.output_shapes: dict[str, tuple[int, ...]] = {s.name: s.shape for s in specs if not s.is_input}
        with gpu:
            self._buffers = allocate_buffers(cuda, specs)
            self._stream = cuda.Stream()
            for name, buf in self._buffers.items():
                if not context.set_tensor_address(name, int(buf.device)):
                    raise EngineError(f"{label}: TensorRT refuses the address of tensor {name!r}")

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for ``batch`` (float32, batch first; see base.py)."""
        if self._context is None:
            raise EngineError(f"{self.label}: the engine is closed")
        batch = check_batch(batch, self.input_name, self.input_shape)
        try:
            with self._lock, self._gpu:
                return run_in_chunks(batch, self.max_batch, self._run)
        except self._cuda.Error as exc:
            raise EngineError(f"{self.label}: CUDA error during inference: {exc}") from exc

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        cuda, context, stream = self._cuda, self._context, self._stream
        inp = self._buffers[self.input_name]
        host_in = inp.host_view(batch.shape)
        np.copyto(host_in, batch)
        cuda.memcpy_htod_async(inp.device, host_in, stream)
        if not context.set_input_shape(self.input_name, tuple(batch.shape)):
            raise EngineInputError(f"input {self.input_name!r}: shape {tuple(batch.shape)} is outside the engine's "
                                   f"optimisation profile (max {inp.spec.max_shape})")
        if not context.execute_async_v3(stream.handle):
            stream.synchronize()
            raise EngineError(f"{self.label}: TensorRT could not enqueue a batch of {len(batch)}")
        views = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            buf = self._buffers[name]
            views[name] = view = buf.host_view(shape)
            cuda.memcpy_dtoh_async(view, buf.device, stream)
        stream.synchronize()
        # Copies: the pinned buffers are overwritten by the next run.
        return {name: view.copy() for name, view in views.items()}

    def close(self) -> None:
        if self._context is None:
            return
        try:
            with self._lock, self._gpu:
                for buf in self._buffers.values():
                    buf.device.free()
                    base = getattr(buf.host, "base", None)
                    if hasattr(base, "free"):
                        base.free()
                self._buffers = {}
                self._context = None
                self._trt_objects = ()
                self._stream = None
        except self._cuda.Error as exc:
            log.warning("%s: freeing GPU buffers: %s", self.label, exc)
        finally:
            self._context = None
            self._gpu.release()

    def __enter__(self) -> "TensorRTEngine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorRTEngine({self.label!r}, device={getattr(self, 'device_name', '?')!r}, max_batch={self.max_batch})"
