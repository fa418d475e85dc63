"""ONNX Runtime engine: the CPU default, and CUDA when ``onnxruntime-gpu`` is
installed.

Session settings, and why:

- ``intra_op_num_threads = threads`` (default 2): a worker shares the machine
  with the node; on 2 cores ONNX Runtime with 2 threads ran 2.3-7x faster than
  torch eager on the same CNNs (FIELD-NOTES.md "Models on the CPU").
- ``inter_op_num_threads = 1`` and sequential execution: the models are
  chains, parallel branches buy nothing and extra threads only compete.
- graph optimisation level ALL (constant folding, fusions, layout changes).

``CUDAExecutionProvider`` is asked for when ONNX Runtime lists it, with the
CPU as fallback; ONNX Runtime may still fall back (no driver, wrong CUDA), so
the providers the session really got are read back, logged and kept in
``providers``. Creating a CUDA session initialises CUDA: do it in the worker
process, never in a parent that forks afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import check_batch, format_shape, normalize_shape, run_in_chunks
from .errors import EngineError

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def default_providers() -> list[str]:
    """CUDA then CPU when this ONNX Runtime build has CUDA, else the CPU alone."""
    import onnxruntime as ort

    return [CUDA_PROVIDER, CPU_PROVIDER] if CUDA_PROVIDER in ort.get_available_providers() else [CPU_PROVIDER]


class OnnxRuntimeEngine:
    """An :class:`~inference.engines.base.Engine` on an ONNX Runtime session.

    ``max_batch`` (optional) caps the rows per ``session.run``: larger
    batches are split and the outputs concatenated, which bounds memory on a
    small GPU. ``None`` runs any batch in one call.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        threads: int = 2,
        providers: Sequence[str] | None = None,
        max_batch: int | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if threads < 1:
            raise EngineError(f"threads: must be at least 1, got {threads}")
        if max_batch is not None and max_batch < 1:
            raise EngineError(f"max_batch: must be at least 1, got {max_batch}")
        if not path.is_file():
            raise EngineError(f"{path}: no such ONNX model file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings repeat in every worker
        wanted = list(providers) if providers is not None else default_providers()
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime's pybind errors share no useful base class
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"{path}: ONNX Runtime cannot load the model: {first}") from exc
        self.model_path = path
        self.threads = threads
        self.max_batch = max_batch
        self.providers: list[str] = list(self.session.get_providers())
        self.device = "cuda" if CUDA_PROVIDER in self.providers else "cpu"
        if CUDA_PROVIDER in wanted and self.device != "cuda":
            log.warning("%s: CUDAExecutionProvider is installed but did not load; running on the CPU", path.name)

        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise EngineError(f"{path}: engines take models with one input, this one has {len(inputs)}")
        if inputs[0].type != "tensor(float)":
            raise EngineError(f"{path}: input {inputs[0].name!r} is {inputs[0].type}, engines feed float32")
        self.input_name: str = inputs[0].name
        self.input_shape: tuple[int, ...] = normalize_shape(inputs[0].shape)
        outputs = self.session.get_outputs()
        self.output_names: tuple[str, ...] = tuple(o.name for o in outputs)
        self.output_shapes: dict[str, tuple[int, ...]] = {o.name: normalize_shape(o.shape) for o in outputs}
        log.info(
            "onnxruntime: loaded %s on %s (%s, %d threads), input %r %s",
            path.name, self.device, ", ".join(self.providers), threads, self.input_name,
            format_shape(self.input_shape),
        )

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for ``batch`` (float32, batch first; see base.py)."""
        if self.session is None:
            raise EngineError(f"{self.model_path.name}: the engine is closed")
        batch = check_batch(batch, self.input_name, self.input_shape)
        return run_in_chunks(batch, self.max_batch, self._run)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(list(self.output_names), {self.input_name: batch})
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"{self.model_path.name}: ONNX Runtime failed on a batch of {len(batch)}: {first}") from exc
        return dict(zip(self.output_names, values))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]

    def __enter__(self) -> "OnnxRuntimeEngine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OnnxRuntimeEngine({str(self.model_path)!r}, device={self.device!r}, threads={self.threads})"
