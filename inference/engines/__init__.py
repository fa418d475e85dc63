"""Inference engines behind one :class:`Engine` protocol (DESIGN.md section 8).

- :class:`OnnxRuntimeEngine` (``onnxruntime_engine``): CPU by default, CUDA
  when ``onnxruntime-gpu`` is installed.
- :class:`TensorRTEngine` (``tensorrt_engine``): the optional ``gpu`` extra
  (tensorrt, pycuda); engines built from the same ONNX and cached on disk.
- :func:`choose_engine_kind` / :func:`load_engine` (``select``): ``auto``
  picks TensorRT when it imports and a GPU is visible; one warm engine per
  model per process.

Importing this package imports neither onnxruntime nor tensorrt nor pycuda;
the engine classes are loaded on first access.
"""

from __future__ import annotations

from typing import Any

from .base import Engine
from .errors import EngineBuildCancelled, EngineError, EngineInputError, EngineUnavailable
from .select import choose_engine_kind, clear, load_engine

__all__ = [
    "Engine",
    "EngineBuildCancelled",
    "EngineError",
    "EngineInputError",
    "EngineUnavailable",
    "OnnxRuntimeEngine",
    "TensorRTEngine",
    "choose_engine_kind",
    "clear",
    "load_engine",
]


def __getattr__(name: str) -> Any:
    if name == "OnnxRuntimeEngine":
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine
    if name == "TensorRTEngine":
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
