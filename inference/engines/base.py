"""The :class:`Engine` protocol every inference engine implements, and the
checks they share.

Conventions (the same for every engine):

- One input tensor, float32, batch first: NCHW for the 2D models (slices with
  channels). ``input_shape`` is the model's shape with ``-1`` for each dynamic
  dimension (normally only the batch).
- ``infer(batch)`` returns ``{output name: array}`` in the order of
  ``output_names``: a dict rather than a bare array because models have more
  than one output (a mask and a score), and a name is harder to mix up than
  a position. Every output is batch first, one row per input row.
- ``infer`` never casts: a batch of the wrong dtype or shape raises
  :class:`EngineInputError` naming the model's input, so a preprocessing bug is
  found where it happens rather than as a silent precision loss.
- ``close()`` frees what the engine holds (sessions, GPU buffers, the CUDA
  context's reference); an engine is also a context manager.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import EngineInputError

INPUT_DTYPE = np.dtype(np.float32)
DYNAMIC = -1
"""How a dynamic dimension appears in ``input_shape`` / ``output_shapes``."""


@runtime_checkable
class Engine(Protocol):
    """What the pipeline needs from an engine (DESIGN.md section 8)."""

    name: str
    """``"onnxruntime"`` or ``"tensorrt"``."""
    input_name: str
    input_shape: tuple[int, ...]
    """The model's input shape, ``-1`` where dynamic (the batch)."""
    output_names: tuple[str, ...]
    output_shapes: dict[str, tuple[int, ...]]
    max_batch: int | None
    """The largest batch one run takes (``None``: no limit). ``infer`` splits
    larger batches itself, so callers need not know it."""

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on ``batch`` (float32, shape ``(N, *input_shape[1:])``)."""
        ...

    def close(self) -> None:
        """Free the engine's resources; it cannot run afterwards."""
        ...


def normalize_shape(shape: Iterable[object]) -> tuple[int, ...]:
    """A shape as the engines report it: ints, ``-1`` for every dynamic
    dimension (ONNX Runtime gives a name such as ``"N"`` or ``None``,
    TensorRT ``-1``)."""
    out = []
    for dim in shape:
        out.append(dim if isinstance(dim, (int, np.integer)) and dim >= 0 else DYNAMIC)
    return tuple(int(d) for d in out)


def format_shape(shape: Sequence[int]) -> str:
    """``(N, 1, 64, 64)``: dynamic dimensions shown as ``N`` (batch) or ``?``."""
    parts = [("N" if i == 0 else "?") if d == DYNAMIC else str(d) for i, d in enumerate(shape)]
    return "(" + ", ".join(parts) + ")"


def check_batch(batch: object, input_name: str, input_shape: Sequence[int]) -> np.ndarray:
    """Return ``batch`` as a C-contiguous float32 array if it fits the model's
    input, else raise :class:`EngineInputError` saying what was expected."""
    expected = format_shape(input_shape)
    if not isinstance(batch, np.ndarray):
        raise EngineInputError(
            f"input {input_name!r}: expected a numpy array of shape {expected}, got {type(batch).__name__}"
        )
    if batch.dtype != INPUT_DTYPE:
        raise EngineInputError(
            f"input {input_name!r}: expected float32, got {batch.dtype} (convert with batch.astype(np.float32))"
        )
    if batch.ndim != len(input_shape):
        raise EngineInputError(
            f"input {input_name!r}: expected {len(input_shape)} dimensions {expected}, "
            f"got {batch.ndim} with shape {tuple(batch.shape)}"
        )
    bad = [i for i, (got, want) in enumerate(zip(batch.shape, input_shape)) if want != DYNAMIC and got != want]
    if bad:
        raise EngineInputError(
            f"input {input_name!r}: expected shape {expected}, got {tuple(batch.shape)} (dimension {bad[0]} differs)"
        )
    if batch.shape[0] == 0:
        raise EngineInputError(f"input {input_name!r}: the batch is empty")
    return np.ascontiguousarray(batch)


def run_in_chunks(
    batch: np.ndarray, max_batch: int | None, run: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``run`` over slices of at most ``max_batch`` rows, outputs concatenated
    along the batch axis (each output must be batch first)."""
    n = batch.shape[0]
    if max_batch is None or n <= max_batch:
        return run(batch)
    parts = [run(batch[start : start + max_batch]) for start in range(0, n, max_batch)]
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}
