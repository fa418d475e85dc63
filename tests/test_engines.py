"""Inference engines (inference/engines, DESIGN.md section 8).

On the CPU, for real: ONNX Runtime on a tiny ONNX model built here (Conv ->
Relu -> GlobalAveragePool -> Flatten -> Sigmoid, dynamic batch "N") checked
against numpy; engine selection and its reasons; the per-process engine
cache; and every part of the TensorRT engine that needs no GPU: cache keys,
buffer sizes from profile shapes, the network plan per TensorRT version,
parser error messages, the progress relay, and the whole buffer/stream
``infer`` path driven through a numpy stand-in for ``pycuda.driver`` and a
TensorRT execution context.

Tests marked ``gpu`` need an NVIDIA GPU (and TensorRT or pycuda) and are
skipped, with the reason, everywhere else.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from inference.engines import (
    Engine,
    EngineBuildCancelled,
    EngineError,
    EngineInputError,
    EngineUnavailable,
    OnnxRuntimeEngine,
    choose_engine_kind,
    clear,
    load_engine,
)
from inference.engines import select as sel
from inference.engines import tensorrt_engine as te
from inference.engines.base import check_batch, format_shape, normalize_shape

H = W = 8
SEED = 7


# -- the tiny model ------------------------------------------------------------------------
def tiny_weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return rng.normal(0, 0.5, (2, 1, 3, 3)).astype(np.float32), np.array([0.1, -0.2], np.float32)


def write_tiny_onnx(path: Path) -> Path:
    """x[N,1,8,8] -> Conv(2, 3x3, pad 1) -> Relu = "feat"[N,2,8,8]
    -> GlobalAveragePool -> Flatten -> Sigmoid = "prob"[N,2]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, b = tiny_weights()
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["feat"]),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Sigmoid", ["flat"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, H, W])],
        [
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 2, H, W]),
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2]),
        ],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """The tiny model in numpy."""
    w, b = tiny_weights()
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N,1,H,W,3,3
    conv = np.einsum("ncijkl,ockl->noij", windows, w.astype(np.float64)) + b[None, :, None, None]
    feat = np.maximum(conv, 0)
    prob = 1 / (1 + np.exp(-feat.mean(axis=(2, 3))))
    return {"feat": feat, "prob": prob}


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 1, H, W)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_onnx(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture(scope="module")
def ort_engine(tiny_onnx: Path):
    engine = OnnxRuntimeEngine(tiny_onnx, threads=1)
    yield engine
    engine.close()


@pytest.fixture
def fresh_cache():
    clear()
    yield
    clear()


# -- ONNX Runtime ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5])
def test_onnxruntime_matches_numpy(ort_engine: OnnxRuntimeEngine, n: int) -> None:
    x = batch(n, seed=n)
    out = ort_engine.infer(x)
    assert list(out) == ["feat", "prob"]
    want = reference(x)
    for name in out:
        assert out[name].dtype == np.float32
        assert out[name].shape == want[name].shape
        np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-5)


def test_onnxruntime_describes_the_model(ort_engine: OnnxRuntimeEngine) -> None:
    assert isinstance(ort_engine, Engine)
    assert ort_engine.name == "onnxruntime"
    assert ort_engine.input_name == "x"
    assert ort_engine.input_shape == (-1, 1, H, W)
    assert ort_engine.output_names == ("feat", "prob")
    assert ort_engine.output_shapes == {"feat": (-1, 2, H, W), "prob": (-1, 2)}
    assert ort_engine.providers == ["CPUExecutionProvider"] and ort_engine.device == "cpu"


def test_onnxruntime_session_options_are_honoured(tiny_onnx: Path) -> None:
    import onnxruntime as ort

    with OnnxRuntimeEngine(tiny_onnx, threads=2) as engine:
        options = engine.session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.inter_op_num_threads == 1
        assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with OnnxRuntimeEngine(tiny_onnx, threads=1) as engine:
        assert engine.session.get_session_options().intra_op_num_threads == 1


def test_onnxruntime_splits_batches_above_max_batch(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = OnnxRuntimeEngine(tiny_onnx, threads=1, max_batch=2)
    sizes: list[int] = []
    run = engine.session.run
    monkeypatch.setattr(engine.session, "run", lambda names, feed: sizes.append(len(feed["x"])) or run(names, feed))
    x = batch(5, seed=3)
    out = engine.infer(x)
    assert sizes == [2, 2, 1]
    np.testing.assert_allclose(out["prob"], reference(x)["prob"], rtol=1e-5, atol=1e-5)
    assert out["feat"].shape == (5, 2, H, W)


@pytest.mark.parametrize(
    "bad, words",
    [
        (batch(2).astype(np.float64), ["'x'", "float32", "float64", "astype"]),
        (np.zeros((2, 1, 9, W), np.float32), ["'x'", "(N, 1, 8, 8)", "(2, 1, 9, 8)", "dimension 2"]),
        (np.zeros((1, H, W), np.float32), ["'x'", "4 dimensions", "(1, 8, 8)"]),
        (np.zeros((0, 1, H, W), np.float32), ["'x'", "empty"]),
        ([[0.0]], ["'x'", "numpy array", "list"]),
    ],
    ids=["dtype", "shape", "rank", "empty", "not-an-array"],
)
def test_wrong_input_is_a_clear_error(ort_engine: OnnxRuntimeEngine, bad: object, words: list[str]) -> None:
    with pytest.raises(EngineInputError) as info:
        ort_engine.infer(bad)  # type: ignore[arg-type]
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert isinstance(info.value, ValueError)  # a caller's mistake


def test_onnxruntime_bad_model_files(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="no such ONNX model file"):
        OnnxRuntimeEngine(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(EngineError) as info:
        OnnxRuntimeEngine(junk)
    assert "junk.onnx" in str(info.value) and "cannot load" in str(info.value)
    assert "\n" not in str(info.value)


def test_closed_engine_refuses_to_run(tiny_onnx: Path) -> None:
    engine = OnnxRuntimeEngine(tiny_onnx, threads=1)
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.infer(batch(1))


def test_shape_helpers() -> None:
    assert normalize_shape(["N", 1, None, 8]) == (-1, 1, -1, 8)
    assert format_shape((-1, 1, 8, 8)) == "(N, 1, 8, 8)"
    x = np.asfortranarray(batch(2))
    assert check_batch(x, "x", (-1, 1, H, W)).flags.c_contiguous


# -- engine selection ---------------------------------------------------------------------------
def _tensorrt_importable() -> bool:
    try:
        te.import_tensorrt()
    except EngineUnavailable:
        return False
    return True


def test_auto_picks_onnxruntime_without_tensorrt(caplog: pytest.LogCaptureFixture) -> None:
    if _tensorrt_importable():
        pytest.skip("TensorRT is installed here; the simulated tests cover this case")
    with caplog.at_level(logging.INFO, logger="inference.engines"):
        kind, reason = choose_engine_kind("auto")
    assert kind == "onnxruntime"
    assert "TensorRT is not importable" in reason and "ONNX Runtime" in reason
    assert any("engine: onnxruntime" in r.getMessage() and "TensorRT" in r.getMessage() for r in caplog.records)


def test_requesting_tensorrt_without_it_is_a_clear_error() -> None:
    if _tensorrt_importable():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(EngineUnavailable) as info:
        choose_engine_kind("tensorrt")
    assert str(info.value) == te.TENSORRT_MISSING
    assert "pip install 'pacs-ai[gpu]'" in str(info.value)


def test_requesting_onnxruntime_and_unknown_kinds() -> None:
    assert choose_engine_kind("onnxruntime")[0] == "onnxruntime"
    with pytest.raises(EngineError, match="auto, tensorrt or onnxruntime"):
        choose_engine_kind("cuda")


def _fake_tensorrt(monkeypatch: pytest.MonkeyPatch, gpus: int, pycuda: bool = True) -> None:
    monkeypatch.setattr(te, "import_tensorrt", lambda: SimpleNamespace(__version__="11.1.0", Builder=object))
    if pycuda:
        monkeypatch.setattr(te, "import_pycuda", lambda: SimpleNamespace())
    else:
        def missing():
            try:
                raise ImportError("libcuda.so.1: cannot open shared object file")
            except ImportError as exc:
                raise EngineUnavailable("pycuda does not import (ImportError: libcuda.so.1)") from exc
        monkeypatch.setattr(te, "import_pycuda", missing)
    monkeypatch.setattr(sel, "visible_gpus", lambda: (gpus, f"{gpus} NVIDIA GPUs in /proc/driver/nvidia/gpus"))


def test_auto_picks_tensorrt_when_it_imports_and_a_gpu_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tensorrt(monkeypatch, gpus=1)
    kind, reason = choose_engine_kind("auto")
    assert kind == "tensorrt" and "TensorRT 11.1.0" in reason and "1 NVIDIA GPU" in reason
    assert choose_engine_kind("tensorrt")[0] == "tensorrt"


def test_auto_without_gpu_or_pycuda_falls_back_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tensorrt(monkeypatch, gpus=0)
    kind, reason = choose_engine_kind("auto")
    assert kind == "onnxruntime" and "no NVIDIA GPU is visible" in reason
    with pytest.raises(EngineUnavailable, match="no NVIDIA GPU is visible"):
        choose_engine_kind("tensorrt")
    _fake_tensorrt(monkeypatch, gpus=1, pycuda=False)
    kind, reason = choose_engine_kind("auto")
    assert kind == "onnxruntime" and "pycuda is not importable" in reason and "libcuda.so.1" in reason


def test_visible_gpus_reads_the_driver_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    proc, dev = tmp_path / "gpus", tmp_path / "dev"
    dev.mkdir()
    assert sel.visible_gpus(proc, dev)[0] == 0
    for name in ("nvidiactl", "nvidia-uvm", "nvidia0"):
        (dev / name).touch()
    assert sel.visible_gpus(proc, dev)[0] == 1
    proc.mkdir()
    (proc / "0000:17:00.0").mkdir()
    (proc / "0000:65:00.0").mkdir()
    count, how = sel.visible_gpus(proc, dev)
    assert count == 2 and str(proc) in how
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert sel.visible_gpus(proc, dev)[0] == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    count, how = sel.visible_gpus(proc, dev)
    assert count == 0 and "CUDA_VISIBLE_DEVICES" in how


def test_selection_imports_no_cuda_module() -> None:
    import sys

    choose_engine_kind("auto")
    assert "pycuda.autoinit" not in sys.modules


# -- one warm engine per process ---------------------------------------------------------------
def test_load_engine_keeps_one_engine_per_model_and_options(tiny_onnx: Path, fresh_cache: None) -> None:
    first = load_engine(tiny_onnx, "onnxruntime", threads=1)
    assert load_engine(tiny_onnx, "onnxruntime", threads=1) is first
    assert load_engine(str(tiny_onnx), "onnxruntime", threads=1) is first
    if not _tensorrt_importable():
        # auto resolves to onnxruntime here; TensorRT-only options are dropped
        assert load_engine(tiny_onnx, "auto", threads=1, cache_dir="/nonexistent", opt_batch=4) is first
    other = load_engine(tiny_onnx, "onnxruntime", threads=2)
    assert other is not first
    assert sel.loaded_engines() == [first, other]
    np.testing.assert_allclose(first.infer(batch(2))["prob"], other.infer(batch(2))["prob"], rtol=1e-6)
    clear()
    assert first.session is None and sel.loaded_engines() == []
    assert load_engine(tiny_onnx, "onnxruntime", threads=1) is not first


def test_load_engine_rejects_unknown_options(tiny_onnx: Path, fresh_cache: None) -> None:
    with pytest.raises(TypeError, match="thread_count"):
        load_engine(tiny_onnx, "onnxruntime", thread_count=2)


def test_load_engine_after_fork_starts_empty(tiny_onnx: Path, fresh_cache: None, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_engine(tiny_onnx, "onnxruntime", threads=1)
    monkeypatch.setattr(sel, "_owner_pid", -1)  # as a forked child sees it
    second = load_engine(tiny_onnx, "onnxruntime", threads=1)
    assert second is not first and first.session is not None  # the parent's engine is left alone


# -- TensorRT: pure functions -----------------------------------------------------------------------
SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
KEY_ARGS = ("a3" * 32, "11.1.0.7", "NVIDIA H200", "onnx")


def test_engine_cache_key_is_stable_and_filename_safe() -> None:
    key = te.engine_cache_key(*KEY_ARGS, batch=(1, 16, 16))
    assert key == te.engine_cache_key(*KEY_ARGS, batch=(1, 16, 16))
    assert SAFE.match(key) and len(key) < 200
    assert "NVIDIA-H200" in key and "trt11.1.0.7" in key and "b1-16-16" in key
    for gpu in ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "../../etc/passwd", "GPU: \"x\" <y> | z\\w", " ", "é" * 300):
        if gpu.strip():
            key = te.engine_cache_key(KEY_ARGS[0], KEY_ARGS[1], gpu, "onnx")
            assert SAFE.match(key) and len(key) < 200 and "/" not in key, key


@pytest.mark.parametrize("index, other", [(0, "b4" * 32), (1, "10.13.0.35"), (2, "NVIDIA A100-SXM4-80GB"), (3, "fp16")])
def test_engine_cache_key_changes_with_each_input(index: int, other: str) -> None:
    args = list(KEY_ARGS)
    args[index] = other
    assert te.engine_cache_key(*args) != te.engine_cache_key(*KEY_ARGS)


def test_engine_cache_key_separates_lookalikes_and_profiles() -> None:
    a = te.engine_cache_key(KEY_ARGS[0], KEY_ARGS[1], "GPU A/B", "onnx")
    b = te.engine_cache_key(KEY_ARGS[0], KEY_ARGS[1], "GPU A B", "onnx")
    assert a != b  # same slug, different digest
    assert te.engine_cache_key(*KEY_ARGS, batch=(1, 8, 8)) != te.engine_cache_key(*KEY_ARGS, batch=(1, 8, 16))
    with pytest.raises(EngineError, match="gpu_name"):
        te.engine_cache_key(KEY_ARGS[0], KEY_ARGS[1], "", "onnx")
    assert SAFE.match(te.timing_cache_name("11.1.0", "NVIDIA H200 NVL"))


def test_buffer_nbytes_uses_the_profile_max_for_dynamic_dims() -> None:
    assert te.buffer_nbytes((2, 3), np.float32) == 24
    assert te.buffer_nbytes((-1, 1, 64, 64), np.float32, (8, 1, 64, 64)) == 8 * 64 * 64 * 4
    assert te.buffer_nbytes((None, 2), np.float16, (16, 2)) == 16 * 2 * 2
    assert te.buffer_nbytes((-1, 2), np.int64, (16, 2)) == 16 * 2 * 8
    with pytest.raises(EngineError, match="max shape"):
        te.buffer_nbytes((-1, 1, 64, 64), np.float32)
    with pytest.raises(EngineError, match="dimension 1"):
        te.buffer_nbytes((-1, 1, 64, 64), np.float32, (8, 3, 64, 64))
    with pytest.raises(EngineError):
        te.buffer_nbytes((-1, 1), np.float32, (8, 1, 1))


def test_profile_shapes_span_the_batch_axis_only() -> None:
    assert te.profile_shapes((-1, 1, 8, 8), 16, 4) == ((1, 1, 8, 8), (4, 1, 8, 8), (16, 1, 8, 8))
    assert te.profile_shapes((-1, 1, 8, 8), 16)[1] == (16, 1, 8, 8)
    assert te.profile_shapes((4, 1, 8, 8), 16) == ((4, 1, 8, 8),) * 3
    with pytest.raises(EngineError, match="opt"):
        te.profile_shapes((-1, 1, 8, 8), 4, 8)
    with pytest.raises(EngineError, match="only the batch"):
        te.profile_shapes((-1, 1, -1, -1), 4)


def test_network_plan_per_tensorrt_version() -> None:
    assert te.network_plan(11, "onnx") == (False, False)  # always strongly typed, no flags
    assert te.network_plan(12, "onnx") == (False, False)
    assert te.network_plan(10, "onnx") == (True, False)  # STRONGLY_TYPED creation flag
    assert te.network_plan(10, "fp16") == (False, True)  # weakly typed + BuilderFlag.FP16
    with pytest.raises(EngineError, match="AutoCast"):
        te.network_plan(11, "fp16")
    with pytest.raises(EngineError, match="10 or later"):
        te.network_plan(8, "onnx")
    with pytest.raises(EngineError, match="precision"):
        te.network_plan(11, "int8")


def test_numpy_dtype_by_tensorrt_name() -> None:
    assert te.numpy_dtype(SimpleNamespace(name="FLOAT")) == np.float32
    assert te.numpy_dtype("DataType.HALF") == np.float16
    assert te.numpy_dtype(SimpleNamespace(name="INT64")) == np.int64
    with pytest.raises(EngineError, match="float32"):
        te.numpy_dtype(SimpleNamespace(name="BF16"))


def test_parser_errors_become_one_message() -> None:
    class Err:
        def __init__(self, desc: str, node: int, name: str = "", op: str = "") -> None:
            self._d, self._n, self._name, self._op = desc, node, name, op

        def desc(self) -> str:
            return self._d

        def node(self) -> int:
            return self._n

        def node_name(self) -> str:
            return self._name

        def node_operator(self) -> str:
            return self._op

    errors = [Err("Unsupported operator Foo", 3, "foo_1", "Foo"), Err("Invalid weights", 5)] + [Err("x", 1)] * 6
    parser = SimpleNamespace(num_errors=len(errors), get_error=lambda i: errors[i])
    text = te.format_parser_errors(parser)
    assert "node 'foo_1' (Foo): Unsupported operator Foo" in text
    assert "node #5: Invalid weights" in text and "(and 3 more)" in text and "\n" not in text
    assert "no error" in te.format_parser_errors(SimpleNamespace(num_errors=0))


def test_tensorrt_and_pycuda_are_imported_lazily() -> None:
    import subprocess
    import sys

    code = ("import sys, inference.engines, inference.engines.tensorrt_engine, inference.engines.select;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'pycuda', 'onnxruntime',"
            " 'pydicom', 'dicom_node', 'study_queue')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_without_tensorrt_the_engine_says_what_is_missing(tiny_onnx: Path) -> None:
    if _tensorrt_importable():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(EngineUnavailable, match="TensorRT is not installed"):
        te.TensorRTEngine(tiny_onnx)
    with pytest.raises(EngineUnavailable, match="TensorRT is not installed"):
        te.build_engine(tiny_onnx, None)


# -- TensorRT: the progress relay ---------------------------------------------------------------------
def test_progress_relay_forwards_and_cancels() -> None:
    seen: list[tuple] = []

    class Target:
        def phase_start(self, name, parent, steps):
            seen.append(("start", name, parent, steps))

        def step_complete(self, name, step):
            seen.append(("step", name, step))
            return step < 2

        def phase_finish(self, name):
            raise RuntimeError("display broke")

    relay = te.ProgressRelay(Target())
    relay.phase_start("Building", "", 3)
    assert relay.step_complete("Building", 0) is True
    assert relay.step_complete("Building", 2) is False and relay.cancelled
    assert relay.step_complete("Building", 3) is False  # stays cancelled
    relay.phase_finish("Building")  # its exception stays out of TensorRT
    assert isinstance(relay.error, RuntimeError)
    assert seen[0] == ("start", "Building", None, 3)


def test_progress_relay_turns_ctrl_c_into_a_cancel() -> None:
    class Target:
        def step_complete(self, name, step):
            raise KeyboardInterrupt

    relay = te.ProgressRelay(Target())
    relay.phase_start("x", None, 1)  # a target without phase_start is fine
    assert relay.step_complete("x", 0) is False
    assert relay.interrupted and relay.cancelled


# -- TensorRT: buffers and stream, through numpy stand-ins ------------------------------------------------
class FakeDriver:
    """The part of ``pycuda.driver`` the engine uses, backed by numpy: device
    memory is a dict of byte arrays keyed by address. It checks what the real
    driver would not forgive: a current context for every call, copies from
    and to pinned buffers only, and one stream."""

    class Error(Exception):
        """Like ``pycuda.driver.Error``: not Python's RuntimeError."""

    def __init__(self) -> None:
        self.mem: dict[int, np.ndarray] = {}
        self.freed: list[int] = []
        self.pinned: list[np.ndarray] = []
        self.stack: list[object] = []
        self.streams: list[object] = []
        self.fail_next_copy = False
        self._next = 0x7000_0000
        drv = self

        class Context:
            detached = False

            def push(self) -> None:
                drv.stack.append(self)

            def detach(self) -> None:
                self.detached = True

            @staticmethod
            def pop() -> None:
                drv.stack.pop()

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            @staticmethod
            def count() -> int:
                return 1

            def name(self) -> str:
                return "Fake GPU"

            def retain_primary_context(self):
                drv.context = Context()
                return drv.context

        class Allocation:
            def __init__(self, addr: int) -> None:
                self.addr = addr

            def __int__(self) -> int:
                return self.addr

            def free(self) -> None:
                drv.freed.append(self.addr)

        class Stream:
            def __init__(self) -> None:
                self.handle = 0x5000 + len(drv.streams)
                self.syncs = 0
                drv.streams.append(self)

            def synchronize(self) -> None:
                self.syncs += 1

        self.Context, self.Device, self.Allocation, self.Stream = Context, Device, Allocation, Stream

    def init(self) -> None:
        pass

    def _check(self) -> None:
        assert self.stack, "CUDA call without a current context"

    def pagelocked_empty(self, shape, dtype) -> np.ndarray:
        self._check()
        a = np.zeros(shape, dtype)
        self.pinned.append(a)
        return a

    def mem_alloc(self, nbytes: int):
        self._check()
        addr = self._next
        self._next += nbytes + 4096
        self.mem[addr] = np.zeros(nbytes, np.uint8)
        return self.Allocation(addr)

    def _is_pinned(self, a: np.ndarray) -> bool:
        return any(np.shares_memory(a, p) for p in self.pinned)

    def memcpy_htod_async(self, dest, src: np.ndarray, stream) -> None:
        self._check()
        assert stream in self.streams and self._is_pinned(src), "async copy from pageable memory"
        if self.fail_next_copy:
            self.fail_next_copy = False
            raise self.Error("cuMemcpyHtoDAsync failed: an illegal memory access was encountered")
        raw = src.reshape(-1).view(np.uint8)
        self.mem[int(dest)][: raw.size] = raw

    def memcpy_dtoh_async(self, dest: np.ndarray, src, stream) -> None:
        self._check()
        assert stream in self.streams and self._is_pinned(dest), "async copy into pageable memory"
        raw = dest.reshape(-1).view(np.uint8)
        raw[:] = self.mem[int(src)][: raw.size]


class FakeContext:
    """A TensorRT execution context for the tiny model, computed with numpy
    on the fake device memory: it reads and writes only through the
    addresses and shapes the engine gave it."""

    def __init__(self, drv: FakeDriver, max_batch: int) -> None:
        self.drv = drv
        self.max_batch = max_batch
        self.shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}
        self.shape_calls: list[tuple[int, ...]] = []
        self.runs: list[int] = []

    def set_input_shape(self, name: str, shape) -> bool:
        if name != "x" or not 1 <= shape[0] <= self.max_batch:
            return False
        self.shape = tuple(shape)
        self.shape_calls.append(self.shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        n = self.shape[0] if self.shape else -1
        return {"x": (n, 1, H, W), "feat": (n, 2, H, W), "prob": (n, 2)}[name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def _tensor(self, name: str) -> np.ndarray:
        shape = self.get_tensor_shape(name)
        count = int(np.prod(shape))
        return self.drv.mem[self.addresses[name]][: count * 4].view(np.float32).reshape(shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert stream_handle in [s.handle for s in self.drv.streams]
        out = reference(self._tensor("x").copy())
        self._tensor("feat")[...] = out["feat"]
        self._tensor("prob")[...] = out["prob"]
        self.runs.append(self.shape[0])
        return True


def tiny_specs(max_batch: int) -> list[te.TensorSpec]:
    f32 = np.dtype(np.float32)
    return [
        te.TensorSpec("x", True, f32, (-1, 1, H, W), (max_batch, 1, H, W)),
        te.TensorSpec("feat", False, f32, (-1, 2, H, W), (max_batch, 2, H, W)),
        te.TensorSpec("prob", False, f32, (-1, 2), (max_batch, 2)),
    ]


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch):
    drv = FakeDriver()
    monkeypatch.setattr(te, "import_pycuda", lambda: drv)
    context = FakeContext(drv, max_batch=4)
    engine = te.TensorRTEngine.from_execution_context(context, tiny_specs(4), label="tiny.engine")
    return drv, context, engine


def test_engine_tensor_specs_size_buffers_from_the_profile_max() -> None:
    trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"))
    shapes = {"x": (-1, 1, H, W), "feat": (-1, 2, H, W), "prob": (-1, 2)}
    engine = SimpleNamespace(
        num_io_tensors=3,
        get_tensor_name=lambda i: ["x", "feat", "prob"][i],
        get_tensor_mode=lambda n: "in" if n == "x" else "out",
        get_tensor_shape=lambda n: shapes[n],
        get_tensor_dtype=lambda n: SimpleNamespace(name="FLOAT"),
        get_tensor_profile_shape=lambda n, p: [(1, 1, H, W), (8, 1, H, W), (16, 1, H, W)],
    )
    context = FakeContext(FakeDriver(), max_batch=16)
    specs = te.engine_tensor_specs(trt, engine, context)
    assert [(s.name, s.is_input, s.max_shape) for s in specs] == [
        ("x", True, (16, 1, H, W)), ("feat", False, (16, 2, H, W)), ("prob", False, (16, 2))]
    assert [s.nbytes for s in specs] == [16 * H * W * 4, 16 * 2 * H * W * 4, 16 * 2 * 4]


def test_tensorrt_infer_path_with_fake_driver(fake_trt) -> None:
    drv, context, engine = fake_trt
    assert isinstance(engine, Engine) and engine.name == "tensorrt"
    assert engine.input_shape == (-1, 1, H, W) and engine.max_batch == 4
    assert engine.output_names == ("feat", "prob")
    # one buffer per tensor at the profile max, addresses bound once at load
    assert sorted(drv.mem[a].size for a in context.addresses.values()) == sorted(s.nbytes for s in tiny_specs(4))
    assert [p.size for p in drv.pinned] == [4 * H * W, 4 * 2 * H * W, 4 * 2]
    for n in (1, 3, 4, 9):
        x = batch(n, seed=n)
        out = engine.infer(x)
        want = reference(x)
        for name in ("feat", "prob"):
            assert out[name].shape == want[name].shape
            np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-6)
            assert not drv._is_pinned(out[name])  # a copy: the pinned buffers are reused
    assert context.runs == [1, 3, 4, 4, 4, 1]  # 9 rows split at max_batch 4
    assert drv.stack == []  # the context is popped after each use
    assert drv.streams[0].syncs == len(context.runs)


def test_tensorrt_infer_validates_and_translates_cuda_errors(fake_trt) -> None:
    drv, context, engine = fake_trt
    with pytest.raises(EngineInputError, match=r"\(N, 1, 8, 8\)"):
        engine.infer(np.zeros((2, 1, H + 1, W), np.float32))
    assert context.runs == []
    drv.fail_next_copy = True
    with pytest.raises(EngineError, match="CUDA error during inference: .*illegal memory access") as info:
        engine.infer(batch(2))
    assert isinstance(info.value.__cause__, FakeDriver.Error)
    assert drv.stack == []
    np.testing.assert_allclose(engine.infer(batch(2))["prob"], reference(batch(2))["prob"], rtol=1e-5)


def test_tensorrt_close_frees_buffers_and_the_context(fake_trt) -> None:
    drv, context, engine = fake_trt
    engine.close()
    assert sorted(drv.freed) == sorted(drv.mem)
    assert drv.context.detached and drv.stack == []
    with pytest.raises(EngineError, match="closed"):
        engine.infer(batch(1))
    engine.close()  # twice is fine


def test_tensorrt_engine_is_safe_from_several_threads(fake_trt) -> None:
    drv, context, engine = fake_trt
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for _ in range(5):
                x = batch(3, seed=seed)
                np.testing.assert_allclose(engine.infer(x)["prob"], reference(x)["prob"], rtol=1e-5)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- TensorRT: the build and load flow, through a stand-in tensorrt module ---------------------------------
class FakeTensorRT:
    """The part of TensorRT's Python API that build_engine and TensorRTEngine
    call (10.x/11.x names), enough to run their flow on the CPU: the ONNX
    "parser" reads the input with the onnx package, the "plan" is JSON, and
    the execution context is :class:`FakeContext`. It proves the flow
    (cache, timing cache, errors, cancellation), not TensorRT itself."""

    def __init__(self, drv: FakeDriver, version: str = "11.1.0") -> None:
        self.__version__ = version
        self.builds = 0
        self.timing_loaded: list[bytes] = []
        self.flags: list[int] = []
        self.builder_flags: list[str] = []
        self.cancel_at_step: int | None = None
        fake = self

        class ILogger:
            def __init__(self) -> None:
                pass

        class IProgressMonitor:
            def __init__(self) -> None:
                pass

        class TimingCache:
            def __init__(self, blob: bytes) -> None:
                self.blob = bytes(blob)

            def serialize(self) -> bytes:
                return self.blob + b"t"

        class Config:
            progress_monitor = None

            def __init__(self) -> None:
                self.profiles: list = []
                self.timing = None

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                self.workspace = size

            def set_flag(self, flag: str) -> None:
                fake.builder_flags.append(flag)

            def add_optimization_profile(self, profile) -> int:
                self.profiles.append(profile)
                return 0

            def create_timing_cache(self, blob: bytes) -> TimingCache:
                fake.timing_loaded.append(bytes(blob))
                return TimingCache(blob)

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                self.timing = cache
                return True

            def get_timing_cache(self) -> TimingCache:
                return self.timing

        class Profile:
            def set_shape(self, name: str, low, opt, high) -> None:
                self.shapes = (name, tuple(low), tuple(opt), tuple(high))

        class Network:
            def __init__(self) -> None:
                self.inputs: list = []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int):
                return self.inputs[i]

        class Builder:
            def __init__(self, logger) -> None:
                assert drv.stack, "TensorRT builder used without a current CUDA context"

            def create_network(self, flags: int) -> Network:
                fake.flags.append(flags)
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config):
                monitor = config.progress_monitor
                if monitor is not None:
                    monitor.phase_start("Building engine", None, 3)
                    for step in range(3):
                        if not monitor.step_complete("Building engine", step) or step == fake.cancel_at_step:
                            monitor.phase_finish("Building engine")
                            return None
                    monitor.phase_finish("Building engine")
                fake.builds += 1
                name, low, opt, high = config.profiles[0].shapes
                return json.dumps({"plan": "fake", "input": name, "max": high}).encode()

        class Parser:
            def __init__(self, network: Network, logger) -> None:
                self.network, self.num_errors, self.errors = network, 0, []

            def parse_from_file(self, path: str) -> bool:
                import onnx

                try:
                    graph = onnx.load(path).graph
                except Exception as exc:
                    message = f"cannot read: {type(exc).__name__}"
                    self.errors = [SimpleNamespace(desc=lambda: message, node=lambda: -1)]
                    self.num_errors = 1
                    return False
                (inp,) = graph.input
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim)
                self.network.inputs.append(SimpleNamespace(name=inp.name, shape=dims))
                return True

            def get_error(self, i: int):
                return self.errors[i]

        class Engine:
            def __init__(self, plan: dict) -> None:
                self.max_batch = plan["max"][0]
                self.names = ["x", "feat", "prob"]
                self.num_io_tensors = 3

            def get_tensor_name(self, i: int) -> str:
                return self.names[i]

            def get_tensor_mode(self, name: str) -> str:
                return "in" if name == "x" else "out"

            def get_tensor_shape(self, name: str):
                return {"x": (-1, 1, H, W), "feat": (-1, 2, H, W), "prob": (-1, 2)}[name]

            def get_tensor_dtype(self, name: str):
                return SimpleNamespace(name="FLOAT")

            def get_tensor_profile_shape(self, name: str, profile: int):
                return [(1, 1, H, W), (self.max_batch, 1, H, W), (self.max_batch, 1, H, W)]

            def create_execution_context(self) -> FakeContext:
                return FakeContext(drv, self.max_batch)

        class Runtime:
            def __init__(self, logger) -> None:
                self.logger = logger

            def deserialize_cuda_engine(self, data: bytes):
                try:
                    return Engine(json.loads(data))
                except ValueError:
                    self.logger.log(SimpleNamespace(name="ERROR"), "Serialization assertion failed: magic tag")
                    return None

        self.ILogger, self.IProgressMonitor, self.Builder, self.OnnxParser, self.Runtime = (
            ILogger, IProgressMonitor, Builder, Parser, Runtime)
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = SimpleNamespace(FP16="fp16")
        self.TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")


@pytest.fixture
def stand_in_trt(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    drv = FakeDriver()
    trt = FakeTensorRT(drv)
    monkeypatch.setattr(te, "import_pycuda", lambda: drv)
    monkeypatch.setattr(te, "import_tensorrt", lambda: trt)
    trt.drv = drv
    return trt


def test_build_engine_flow_caches_engine_and_timing(tiny_onnx: Path, tmp_path: Path, stand_in_trt: FakeTensorRT) -> None:
    seen: list[str] = []
    progress = SimpleNamespace(phase_start=lambda name, parent, steps: seen.append(name))
    plan = te.build_engine(tiny_onnx, tmp_path, max_batch=4, opt_batch=2, progress=progress)
    assert plan.parent == tmp_path and SAFE.match(plan.name) and "Fake-GPU" in plan.name and "b1-2-4" in plan.name
    assert plan == te.engine_cache_path(tiny_onnx, tmp_path, 4, 2)
    meta = json.loads(plan.with_suffix(".json").read_text())
    assert meta["profile"] == [[1, 1, H, W], [2, 1, H, W], [4, 1, H, W]] and meta["gpu"] == "Fake GPU"
    assert meta["onnx_sha256"] == te.onnx_sha256(tiny_onnx) and seen == ["Building engine"]
    assert stand_in_trt.flags == [0] and stand_in_trt.builder_flags == []  # TensorRT 11: no typing flags
    timing = tmp_path / te.timing_cache_name("11.1.0", "Fake GPU")
    assert timing.read_bytes() == b"t" and stand_in_trt.timing_loaded == [b""]
    # the cache is reused; --rebuild loads the saved timing cache
    assert te.build_engine(tiny_onnx, tmp_path, max_batch=4, opt_batch=2) == plan and stand_in_trt.builds == 1
    te.build_engine(tiny_onnx, tmp_path, max_batch=4, opt_batch=2, rebuild=True)
    assert stand_in_trt.builds == 2 and stand_in_trt.timing_loaded[-1] == b"t"
    # another profile is another engine
    assert te.build_engine(tiny_onnx, tmp_path, max_batch=8) != plan
    assert stand_in_trt.drv.stack == [] and not list(tmp_path.glob(".*.tmp"))


def test_tensorrt_engine_loads_from_the_cache_and_runs(tiny_onnx: Path, tmp_path: Path, stand_in_trt: FakeTensorRT) -> None:
    with te.TensorRTEngine(tiny_onnx, cache_dir=tmp_path, max_batch=4) as engine:
        assert engine.max_batch == 4 and engine.device_name == "Fake GPU"
        for n in (1, 6):
            x = batch(n, seed=n)
            np.testing.assert_allclose(engine.infer(x)["prob"], reference(x)["prob"], rtol=1e-5, atol=1e-6)
    plan = te.engine_cache_path(tiny_onnx, tmp_path, 4)
    with te.TensorRTEngine(plan) as engine:  # a serialized engine directly
        assert engine.infer(batch(2))["feat"].shape == (2, 2, H, W)
    assert stand_in_trt.builds == 1


def test_tensorrt_engine_on_tensorrt_10_flags(tiny_onnx: Path, tmp_path: Path, stand_in_trt: FakeTensorRT) -> None:
    stand_in_trt.__version__ = "10.13.0"
    te.build_engine(tiny_onnx, tmp_path, max_batch=4)
    te.build_engine(tiny_onnx, tmp_path, max_batch=4, precision="fp16")
    # 1 << STRONGLY_TYPED (1 in TensorRT 10), then weakly typed with BuilderFlag.FP16
    assert stand_in_trt.flags == [2, 0] and stand_in_trt.builder_flags == ["fp16"]


def test_build_errors_are_clear(tiny_onnx: Path, tmp_path: Path, stand_in_trt: FakeTensorRT) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(EngineError, match="junk.onnx: TensorRT's ONNX parser failed: cannot read"):
        te.build_engine(junk, tmp_path)
    with pytest.raises(EngineError, match="no such ONNX model file"):
        te.build_engine(tmp_path / "missing.onnx", tmp_path)
    with pytest.raises(EngineError, match="AutoCast"):
        te.build_engine(tiny_onnx, tmp_path, precision="fp16")
    with pytest.raises(EngineBuildCancelled, match="cancelled"):
        te.build_engine(tiny_onnx, tmp_path, progress=SimpleNamespace(step_complete=lambda name, step: step < 1))
    stand_in_trt.cancel_at_step = 1  # TensorRT gives up by itself
    with pytest.raises(EngineError, match="could not build an engine"):
        te.build_engine(tiny_onnx, tmp_path, progress=SimpleNamespace())
    interrupted = SimpleNamespace(step_complete=lambda name, step: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        te.build_engine(tiny_onnx, tmp_path, progress=interrupted)
    stand_in_trt.cancel_at_step = None
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(EngineError, match=r"bad.engine: TensorRT cannot load this engine \(Serialization .*--rebuild"):
        te.TensorRTEngine(bad)
    assert stand_in_trt.drv.stack == [] and stand_in_trt.builds == 0 and not list(tmp_path.glob("*.engine.json"))


# -- on a GPU -----------------------------------------------------------------------------------------
def _require(what: str) -> None:
    """Skip unless this machine has what the test needs: ``pycuda`` (and a
    GPU) or ``tensorrt`` (TensorRT, pycuda and a GPU)."""
    if what == "tensorrt":
        problem = sel.tensorrt_problem()
        if problem is not None:
            pytest.skip(f"needs TensorRT on an NVIDIA GPU: {problem[0]}")
        return
    try:
        te.import_pycuda()
    except EngineUnavailable as exc:
        pytest.skip(f"needs pycuda on an NVIDIA GPU: {exc}")
    count, how = sel.visible_gpus()
    if count == 0:
        pytest.skip(f"needs an NVIDIA GPU: {how}")


class DeviceContext(FakeContext):
    """The tiny model's stand-in context on real device memory: numpy does
    the arithmetic, pycuda's synchronous copies move the tensors."""

    def __init__(self, cuda, max_batch: int) -> None:
        super().__init__(FakeDriver(), max_batch)
        self.cuda = cuda

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.cuda.Context.synchronize()  # the engine's host->device copy is on its stream
        x = np.empty(self.get_tensor_shape("x"), np.float32)
        self.cuda.memcpy_dtoh(x, self.addresses["x"])
        out = reference(x)
        for name in ("feat", "prob"):
            self.cuda.memcpy_htod(self.addresses[name], np.ascontiguousarray(out[name], np.float32))
        self.runs.append(len(x))
        return True


@pytest.mark.gpu
def test_pycuda_buffers_and_stream_on_a_gpu() -> None:
    _require("pycuda")
    cuda = te.import_pycuda()
    context = DeviceContext(cuda, max_batch=4)
    with te.TensorRTEngine.from_execution_context(context, tiny_specs(4), label="tiny") as engine:
        for n in (1, 4, 9):
            x = batch(n, seed=n)
            out = engine.infer(x)
            np.testing.assert_allclose(out["prob"], reference(x)["prob"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out["feat"], reference(x)["feat"], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(tiny_onnx: Path, tmp_path: Path) -> None:
    _require("tensorrt")
    progress = SimpleNamespace(phases=[])
    progress.phase_start = lambda name, parent, steps: progress.phases.append(name)
    plan = te.build_engine(tiny_onnx, tmp_path, max_batch=8, opt_batch=4, progress=progress)
    assert plan.is_file() and plan.with_suffix(".json").is_file() and progress.phases
    assert list(tmp_path.glob("timing_*.cache"))
    mtime = plan.stat().st_mtime_ns
    assert te.build_engine(tiny_onnx, tmp_path, max_batch=8, opt_batch=4) == plan  # from the cache
    assert plan.stat().st_mtime_ns == mtime
    ort_engine = OnnxRuntimeEngine(tiny_onnx, threads=1, providers=["CPUExecutionProvider"])
    with te.TensorRTEngine(tiny_onnx, cache_dir=tmp_path, max_batch=8, opt_batch=4) as engine:
        assert engine.max_batch == 8 and engine.input_shape == (-1, 1, H, W)
        for n in (1, 5, 8, 19):
            x = batch(n, seed=n)
            got, want = engine.infer(x), ort_engine.infer(x)
            for name in ("feat", "prob"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_auto_loads_tensorrt_on_a_gpu(tiny_onnx: Path, tmp_path: Path, fresh_cache: None) -> None:
    _require("tensorrt")
    assert choose_engine_kind("auto")[0] == "tensorrt"
    engine = load_engine(tiny_onnx, "auto", cache_dir=tmp_path, max_batch=4, threads=1)
    assert engine.name == "tensorrt" and load_engine(tiny_onnx, "auto", cache_dir=tmp_path, max_batch=4, threads=1) is engine
