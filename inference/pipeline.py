"""Volume in, findings out: preprocessing per model spec, batched engine calls,
postprocessing, with the time each stage took.

The composition root (``study_queue``) loads the models once per process
(:func:`load_models`) and calls :func:`run_model` for each model on the series its
selector picked; the engines stay warm between studies.

Memory: beside the caller's int16 volume, a model holds its int16 grid (cropped and
resampled, smaller than the volume), one float32 batch and a float16 probability map on
its grid, so the peak stays well under three times the volume's size plus the model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .engines import Engine, load_engine
from .postprocess import classification, segmentation_findings
from .preprocess import batches, prepare
from .spec import ModelSpec, find_model
from .volume import Volume

log = logging.getLogger("pacs_ai.inference")


@dataclass
class LoadedModel:
    spec: ModelSpec
    engine: Engine


def load_models(names, engine: str = "auto", threads: int = 2, search=None, **engine_options) -> list[LoadedModel]:
    """Specs and warm engines for the named models (each loaded once per process)."""
    loaded = []
    for name in names:
        spec = find_model(name, search)
        eng = load_engine(spec.onnx_path, engine, threads=threads, **engine_options)
        loaded.append(LoadedModel(spec, eng))
    return loaded


def _output(engine: Engine, spec: ModelSpec, batch: np.ndarray) -> np.ndarray:
    outputs = engine.infer(batch)
    out = outputs[spec.output.name] if spec.output.name in outputs else next(iter(outputs.values()))
    if spec.output.activation == "sigmoid":
        out = 1.0 / (1.0 + np.exp(-out))
    return out


def run_model(model: LoadedModel, volume: Volume, batch_size: int = 16, min_probability: float | None = None):
    """One model on one volume: (findings or a classification, timings)."""
    spec = model.spec
    timings = {}
    t0 = time.perf_counter()
    grid = prepare(volume, spec.input)
    t1 = time.perf_counter()
    timings[f"preprocess:{spec.name}"] = t1 - t0
    if spec.task == "segmentation":
        nz, ny, nx = grid.valid
        # float32: float16 rounds everything above 0.9995 to 1.0, and tied scores at the
        # top leave the most certain findings in no order
        prob = np.zeros((nz, ny, nx), dtype=np.float32)
        for centres, batch in batches(grid, spec.input, batch_size):
            out = _output(model.engine, spec, batch)
            prob[centres] = out[:, 0, :ny, :nx]
        t2 = time.perf_counter()
        result = segmentation_findings(prob, grid, volume, spec, min_probability)
    else:
        probs = []
        for _, batch in batches(grid, spec.input, batch_size):
            probs.append(_output(model.engine, spec, batch).reshape(len(batch), -1)[:, 0])
        t2 = time.perf_counter()
        result = classification(np.concatenate(probs) if probs else np.zeros(0), spec)
    t3 = time.perf_counter()
    timings[f"infer:{spec.name}"] = t2 - t1
    timings[f"postprocess:{spec.name}"] = t3 - t2
    return result, timings
