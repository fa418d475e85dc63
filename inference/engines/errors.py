"""The engines' errors: one hierarchy, so a caller catches :class:`EngineError`
and gets a message fit to show a person (it names the model, tensor or module
at fault). Library exceptions (ONNX Runtime's, ``pycuda.driver.Error``,
TensorRT's ``None`` returns) are translated here with ``raise ... from``.
"""

from __future__ import annotations


class EngineError(Exception):
    """An engine cannot be built, loaded or run."""


class EngineUnavailable(EngineError):
    """The requested engine kind cannot run in this process: a module is not
    installed or no GPU is visible. The message names what is missing."""


class EngineInputError(EngineError, ValueError):
    """A batch does not fit the model's input (shape, dtype, rank): a caller's
    mistake, never retried."""


class EngineBuildCancelled(EngineError):
    """A TensorRT build stopped because its progress monitor asked it to
    (Ctrl-C during ``pacs-ai build-engine``)."""
