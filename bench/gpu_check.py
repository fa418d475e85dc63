"""GPU check for the TensorRT engine's CUDA code path (no pytest needed).

Run from the repository root on a machine with an NVIDIA GPU:

    python bench/gpu_check.py [--max-batch 8] [--keep DIR]

What it checks, each step printed as OK, FAIL or SKIP (with the reason):

1. environment: which of pycuda, tensorrt, CuPy, torch, onnxruntime and onnx
   import, the GPUs the driver lists (no CUDA call), and what
   ``choose_engine_kind("auto")`` picks and why;
2. pycuda: ``cuInit`` and the device's primary context through the engine's
   own :class:`CudaDevice`;
3. buffers: pinned host and device buffers from the engine's own
   ``allocate_buffers`` for tensors with a dynamic batch, sized by
   ``buffer_nbytes`` at the profile's max; the host pointer is checked to be
   page-locked (CuPy's ``pointerGetAttributes``), and a pinned async copy is
   timed against a pageable one in the same run;
4. stream round trip: host -> device (async, on the engine's kind of
   stream), a kernel from CuPy or torch on that same stream reading and
   writing the pycuda device buffers, device -> host (async), compared with
   numpy;
5. the engine's ``infer``: ``TensorRTEngine.from_execution_context`` with a
   stand-in execution context whose ``execute_async_v3`` runs CuPy (or
   torch) on the engine's stream at the addresses it was given; batches of
   1, 3, max and 2*max+1 (split), compared with numpy;
6. TensorRT (only if it imports): build an engine from a tiny ONNX model
   (needs the ``onnx`` package) with the progress monitor, load it, compare
   with ONNX Runtime to 1e-3, and check the engine cache is reused.

Exit status 0 when nothing failed (skips are fine), 1 otherwise. It never
crashes on a missing module: that step is skipped and says why.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from inference.engines import select as sel  # noqa: E402
from inference.engines import tensorrt_engine as te  # noqa: E402
from inference.engines.errors import EngineUnavailable  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []


class Skip(Exception):
    """A step that cannot run here; the message says why."""


def step(name: str, fn: Callable[[], str | None]) -> Any:
    print(f"\n== {name}", flush=True)
    try:
        detail = fn() or ""
    except Skip as exc:
        RESULTS.append((name, "SKIP", str(exc)))
        print(f"   SKIP: {exc}", flush=True)
        return
    except Exception as exc:  # noqa: BLE001 - a failed step is reported, the others still run
        RESULTS.append((name, "FAIL", f"{type(exc).__name__}: {exc}"))
        print("   FAIL:", flush=True)
        traceback.print_exc(file=sys.stdout)
        return
    RESULTS.append((name, "OK", detail))
    print(f"   OK{': ' + detail if detail else ''}", flush=True)


def try_import(name: str) -> tuple[Any, str]:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # ImportError, OSError (missing libcuda), anything a broken build raises
        return None, f"{type(exc).__name__}: {exc}"
    return module, str(getattr(module, "__version__", getattr(module, "VERSION", "?")))


# -- GPU array libraries: CuPy first, torch second --------------------------------------------
class _Cai:
    """A raw device pointer as ``__cuda_array_interface__`` (version 2: no
    stream, the caller orders the work), which CuPy and torch both take."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": np.dtype(dtype).str, "data": (int(ptr), False), "version": 2,
        }


class GpuArrays:
    """Wraps device pointers as CuPy arrays (or torch tensors) and runs code
    on a foreign CUDA stream given by its handle."""

    def __init__(self) -> None:
        self.cp, cp_why = try_import("cupy")
        self.torch, torch_why = try_import("torch")
        if self.cp is not None:
            self.name = f"CuPy {self.cp.__version__}"
        elif self.torch is not None and self.torch.cuda.is_available():
            self.name = f"torch {self.torch.__version__}"
        else:
            raise Skip(f"needs CuPy or torch with CUDA (cupy: {cp_why}; torch: {torch_why})")

    def view(self, ptr: int, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        if self.cp is not None:
            return self.cp.asarray(_Cai(ptr, shape, dtype))
        return self.torch.as_tensor(_Cai(ptr, shape, dtype), device="cuda")

    def on_stream(self, handle: int) -> Any:
        if self.cp is not None:
            return self.cp.cuda.ExternalStream(handle)
        return self.torch.cuda.stream(self.torch.cuda.ExternalStream(handle))

    def model(self, x: Any, double_out: Any, mean_out: Any) -> None:
        """The stand-in model: ``double = 2x + 1``, ``mean = mean(x) per row``."""
        n = x.shape[0]
        double_out[...] = x * 2 + 1
        mean_out[...] = x.reshape(n, -1).mean(1).reshape(n, 1)

    def pinned(self, ptr: int) -> str:
        if self.cp is None:
            return "not checked (no CuPy)"
        attrs = self.cp.cuda.runtime.pointerGetAttributes(ptr)
        kind = {0: "unregistered (pageable!)", 1: "host, page-locked", 2: "device", 3: "managed"}.get(attrs.type, attrs.type)
        if attrs.type != 1:
            raise AssertionError(f"host buffer at {ptr:#x} is {kind}, not page-locked")
        return kind


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    n = x.shape[0]
    return {"double": x * 2 + 1, "mean": x.reshape(n, -1).mean(1, dtype=np.float64).reshape(n, 1).astype(np.float32)}


def stand_in_specs(max_batch: int, chw: tuple[int, int, int] = (1, 64, 64)) -> list[te.TensorSpec]:
    f32 = np.dtype(np.float32)
    return [
        te.TensorSpec("x", True, f32, (-1, *chw), (max_batch, *chw)),
        te.TensorSpec("double", False, f32, (-1, *chw), (max_batch, *chw)),
        te.TensorSpec("mean", False, f32, (-1, 1), (max_batch, 1)),
    ]


class StandInContext:
    """TensorRT's execution-context calls, implemented with CuPy/torch on
    the device addresses the engine binds: ``execute_async_v3`` enqueues the
    stand-in model on the engine's own stream."""

    def __init__(self, gpu: GpuArrays, specs: list[te.TensorSpec]) -> None:
        self.gpu = gpu
        self.specs = {s.name: s for s in specs}
        self.n = 0
        self.addresses: dict[str, int] = {}
        self.runs: list[int] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        max_n = self.specs[name].max_shape[0]
        if not 1 <= shape[0] <= max_n:
            return False
        self.n = shape[0]
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.n, *self.specs[name].max_shape[1:])

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        views = {name: self.gpu.view(addr, self.get_tensor_shape(name)) for name, addr in self.addresses.items()}
        with self.gpu.on_stream(stream_handle):
            self.gpu.model(views["x"], views["double"], views["mean"])
        self.runs.append(self.n)
        return True


# -- steps ------------------------------------------------------------------------------------------
def check_environment(state: SimpleNamespace) -> str:
    print(f"   python {sys.version.split()[0]}, numpy {np.__version__}")
    for name in ("pycuda.driver", "tensorrt", "cupy", "torch", "onnxruntime", "onnx"):
        module, detail = try_import(name)
        if name == "pycuda.driver" and module is not None:
            detail = try_import("pycuda")[1]
        print(f"   {name:<14} {'imports, ' + detail if module is not None else 'missing: ' + detail}")
    count, how = sel.visible_gpus()
    print(f"   GPUs (driver, no CUDA call): {how}")
    kind, reason = sel.choose_engine_kind("auto")
    print(f"   auto engine: {kind} ({reason})")
    state.gpus = count
    return f"auto picks {kind}"


def check_pycuda(state: SimpleNamespace) -> str:
    try:
        cuda = te.import_pycuda()
    except EngineUnavailable as exc:
        raise Skip(f"{exc} (on a GPU machine: pip install pycuda, which builds from its sdist against CUDA)") from None
    try:
        device = te.CudaDevice(cuda, 0)
    except EngineUnavailable as exc:
        if state.gpus == 0:
            raise Skip(f"no NVIDIA GPU visible ({exc})") from None
        raise
    with device:
        major, minor = cuda.Device(0).compute_capability()
        free, total = cuda.mem_get_info()
    state.cuda, state.device = cuda, device
    return f"{device.name}, compute capability {major}.{minor}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"


def need_cuda(state: SimpleNamespace) -> Any:
    if getattr(state, "cuda", None) is None:
        raise Skip("pycuda did not initialise (see above)")
    return state.cuda


def check_buffers(state: SimpleNamespace, max_batch: int) -> str:
    cuda = need_cuda(state)
    specs = stand_in_specs(max_batch)
    with state.device:
        buffers = te.allocate_buffers(cuda, specs)
        for spec in specs:
            buf = buffers[spec.name]
            want = te.buffer_nbytes(spec.shape, spec.dtype, spec.max_shape)
            assert buf.host.nbytes == want, f"{spec.name}: host buffer {buf.host.nbytes} B, expected {want}"
            assert int(buf.device) != 0
        state.gpu = None
        try:
            state.gpu = GpuArrays()
            pinned = state.gpu.pinned(buffers["x"].host.ctypes.data)
        except Skip as exc:
            pinned = f"not checked ({exc})"
        print(f"   sizes at max batch {max_batch}: " + ", ".join(f"{s.name} {s.nbytes} B" for s in specs))
        print(f"   host buffer: {pinned}")
        # pinned async vs pageable sync copies, 64 MiB x 5, same run
        n = 16 << 20
        pinned_host = cuda.pagelocked_empty(n, np.float32)
        pageable = np.ones(n, np.float32)
        pinned_host[:] = 1
        dev = cuda.mem_alloc(pinned_host.nbytes)
        stream = cuda.Stream()
        timings = {}
        for label, copy in (
            ("pinned", lambda: cuda.memcpy_htod_async(dev, pinned_host, stream)),
            ("pageable", lambda: cuda.memcpy_htod(dev, pageable)),
        ):
            copy()
            stream.synchronize()
            started = time.perf_counter()
            for _ in range(5):
                copy()
            stream.synchronize()
            cuda.Context.synchronize()
            timings[label] = 5 * pinned_host.nbytes / (time.perf_counter() - started) / 1e9
        dev.free()
        for buf in buffers.values():
            buf.device.free()
    ratio = timings["pinned"] / timings["pageable"]
    return (f"pinned host->device {timings['pinned']:.1f} GB/s, pageable {timings['pageable']:.1f} GB/s "
            f"(ratio {ratio:.2f}x)")


def check_round_trip(state: SimpleNamespace, max_batch: int) -> str:
    cuda = need_cuda(state)
    if getattr(state, "gpu", None) is None:
        state.gpu = GpuArrays()  # raises Skip with the reason
    gpu = state.gpu
    specs = stand_in_specs(max_batch)
    x = np.random.default_rng(1).normal(0, 1, (3, 1, 64, 64)).astype(np.float32)
    with state.device:
        buffers = te.allocate_buffers(cuda, specs)
        stream = cuda.Stream()
        host_in = buffers["x"].host_view(x.shape)
        np.copyto(host_in, x)
        cuda.memcpy_htod_async(buffers["x"].device, host_in, stream)
        views = {
            "x": gpu.view(int(buffers["x"].device), x.shape),
            "double": gpu.view(int(buffers["double"].device), x.shape),
            "mean": gpu.view(int(buffers["mean"].device), (3, 1)),
        }
        with gpu.on_stream(stream.handle):
            gpu.model(views["x"], views["double"], views["mean"])
        outs = {}
        for name, shape in (("double", x.shape), ("mean", (3, 1))):
            outs[name] = buffers[name].host_view(shape)
            cuda.memcpy_dtoh_async(outs[name], buffers[name].device, stream)
        stream.synchronize()
        want = reference(x)
        for name in outs:
            np.testing.assert_allclose(outs[name], want[name], rtol=1e-5, atol=1e-5)
        for buf in buffers.values():
            buf.device.free()
    return f"host -> device -> {gpu.name} kernel -> host on one pycuda stream matches numpy"


def check_engine_path(state: SimpleNamespace, max_batch: int) -> str:
    need_cuda(state)
    if getattr(state, "gpu", None) is None:
        state.gpu = GpuArrays()
    specs = stand_in_specs(max_batch)
    context = StandInContext(state.gpu, specs)
    sizes = [1, 3, max_batch, 2 * max_batch + 1]
    with te.TensorRTEngine.from_execution_context(context, specs, label="stand-in") as engine:
        for n in sizes:
            x = np.random.default_rng(n).normal(0, 1, (n, 1, 64, 64)).astype(np.float32)
            out = engine.infer(x)
            want = reference(x)
            for name in ("double", "mean"):
                assert out[name].shape == want[name].shape, (name, out[name].shape)
                np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-5)
        runs = list(context.runs)
        x = np.zeros((max_batch, 1, 64, 64), np.float32)
        engine.infer(x)
        started = time.perf_counter()
        for _ in range(20):
            engine.infer(x)
        per_batch = (time.perf_counter() - started) / 20
    return (f"infer on batches {sizes} matches numpy (runs {runs}); "
            f"{per_batch * 1000:.2f} ms per batch of {max_batch} (copies + stand-in kernel)")


def write_tiny_onnx(path: Path) -> Path:
    onnx, why = try_import("onnx")
    if onnx is None:
        raise Skip(f"the onnx package is missing ({why}); pip install onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.5, (2, 1, 3, 3)).astype(np.float32)
    b = np.array([0.1, -0.2], np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["feat"]),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Sigmoid", ["flat"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 2, 32, 32]),
         helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class PrintProgress:
    """TensorRT's progress monitor as plain lines (top-level phases only)."""

    def __init__(self) -> None:
        self.phases = 0

    def phase_start(self, name: str, parent: str | None, num_steps: int) -> None:
        self.phases += 1
        if parent is None:
            print(f"   build phase: {name} ({num_steps} steps)", flush=True)

    def step_complete(self, name: str, step: int) -> bool:
        return True

    def phase_finish(self, name: str) -> None:
        pass


def check_tensorrt(state: SimpleNamespace, max_batch: int, keep: Path | None) -> str:
    problem = sel.tensorrt_problem()
    if problem is not None:
        raise Skip(problem[0])
    from inference.engines.onnxruntime_engine import OnnxRuntimeEngine

    work = keep or Path(tempfile.mkdtemp(prefix="pacs-ai-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = write_tiny_onnx(work / "tiny.onnx")
    cache = work / "engines"
    progress = PrintProgress()
    started = time.perf_counter()
    plan = te.build_engine(onnx_path, cache, max_batch=max_batch, opt_batch=max(1, max_batch // 2), progress=progress)
    built = time.perf_counter() - started
    mtime = plan.stat().st_mtime_ns
    assert te.build_engine(onnx_path, cache, max_batch=max_batch, opt_batch=max(1, max_batch // 2)) == plan
    assert plan.stat().st_mtime_ns == mtime, "the cached engine was rebuilt"
    timing = list(cache.glob("timing_*.cache"))
    assert timing, "no timing cache saved"
    reference_engine = OnnxRuntimeEngine(onnx_path, threads=2, providers=["CPUExecutionProvider"])
    worst = 0.0
    with te.TensorRTEngine(plan) as engine:
        for n in (1, 3, max_batch, 2 * max_batch + 1):
            x = np.random.default_rng(n).normal(0, 1, (n, 1, 32, 32)).astype(np.float32)
            got, want = engine.infer(x), reference_engine.infer(x)
            for name in ("feat", "prob"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3)
                worst = max(worst, float(np.abs(got[name] - want[name]).max()))
    return (f"built {plan.name} in {built:.1f} s ({progress.phases} progress phases), cache reused, "
            f"timing cache {timing[0].name}; max |TensorRT - ONNX Runtime| = {worst:.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="build the TensorRT engine here and keep it")
    parser.add_argument("-v", "--verbose", action="store_true", help="engine logs at DEBUG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="   log %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    state = SimpleNamespace(gpus=0, cuda=None, device=None, gpu=None)
    step("1. environment", lambda: check_environment(state))
    step("2. pycuda: cuInit and the primary context (CudaDevice)", lambda: check_pycuda(state))
    step("3. pinned host + device buffers (allocate_buffers, buffer_nbytes)", lambda: check_buffers(state, args.max_batch))
    step("4. stream round trip through a CuPy/torch kernel", lambda: check_round_trip(state, args.max_batch))
    step("5. TensorRTEngine.infer with a stand-in execution context", lambda: check_engine_path(state, args.max_batch))
    step("6. TensorRT: build, cache, run, compare with ONNX Runtime", lambda: check_tensorrt(state, args.max_batch, args.keep))
    if state.device is not None:
        state.device.release()

    print("\n== summary")
    for name, outcome, detail in RESULTS:
        print(f"   {outcome:<4} {name}{': ' + detail if detail else ''}")
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    ran = [r for r in RESULTS if r[1] == "OK"]
    print(f"\n{len(ran)} ran, {len([r for r in RESULTS if r[1] == 'SKIP'])} skipped, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
