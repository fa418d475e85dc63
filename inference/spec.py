"""Model specs: ``inference/models/<name>/model.toml`` beside ``model.onnx``.

A spec says which series a model runs on (selector), how a volume becomes the
network's input (input), how its output becomes findings or a study-level result
(output), and which coded concepts the report uses for them (report). Adding a model
is adding a folder; nothing here is specific to one model.

Example (abridged)::

    name = "lung-nodule-ct"
    version = "1.0.0"
    task = "segmentation"            # or "classification"

    [selector]
    modality = "CT"
    body_part = ["CHEST", "LUNG", "THORAX"]   # a missing Body Part Examined is accepted
    min_slices = 40
    orientation = "axial"
    series_description = ""          # regular expression, searched case-insensitively

    [input]
    name = "ct"                      # the ONNX input
    spacing_mm = [2.0, 1.0, 1.0]     # (slice, row, column); 0 keeps the series' own
    size = []                        # [rows, columns]: resize each slice to this instead
    context_slices = 5               # 2.5D: neighbouring slices as channels
    crop = "lungs"                   # "lungs", "body" or "none"
    hu_window = [-1000.0, 400.0]     # mapped to [0, 1] and clipped
    multiple_of = 16                 # pad rows/columns up to a multiple of this

    [output]
    name = "logits"
    activation = "sigmoid"           # or "none" when the model outputs probabilities
    threshold = 0.5
    region_threshold = 0.0           # segmentation: regions are cut here (0: half the threshold)
    ...

    [rescore]                        # optional, segmentation: a candidate classifier
    features = ["logit", "log_z_extent"]
    weights = [0.4, 1.2]             # probability = sigmoid(bias + sum(weight * feature))
    bias = -3.0
"""
from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
TASKS = ("segmentation", "classification")
CROPS = ("lungs", "body", "none")
AGGREGATES = ("max", "mean-top3")
RESCORE_FEATURES = (
    "logit",             # log-odds of the region's peak probability
    "mean_probability",  # mean probability inside the region
    "log_volume",        # ln mm3
    "log_z_extent",      # ln mm along the slice normal (slices spanned x slice spacing)
    "log_long_axis",     # ln mm, the in-plane long axis on the model grid
    "log_elongation",    # ln sqrt(largest / smallest eigenvalue of the region's covariance in mm)
    "log_elongation_2",  # ln sqrt(largest / middle eigenvalue)
    "mean_hu",           # inside the region, on the model grid
    "std_hu",
    "fill",              # volume / the ellipsoid of long axis, short axis and z extent
    "single_slice",      # 1 when the region lies on one slice of the model grid
    # the HU image's curvature at the region's centre (scale-normalised Hessian, eigenvalues
    # l1 <= l2 <= l3), at a scale fitted to the region (long axis / 3.4, at least 1 mm),
    # at 1.5 mm and at 3 mm: a bright ball curves down in all three directions, a vessel in two
    "blob_fitted",       # max(-l3, 0) / |l1|: 1 for a ball, 0 for a tube or a wall
    "curvature_fitted",  # ln(1 + max(-l1, 0)), how bright and sharp the peak is
    "blob_1_5mm",
    "curvature_1_5mm",
    "blob_3mm",
    "curvature_3mm",
)
"""Candidate features a ``[rescore]`` table may weigh (computed by
:func:`inference.postprocess.region_features` and
:func:`inference.postprocess.hessian_features`)."""


class SpecError(ValueError):
    """A model spec that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Code:
    """A coded concept as DICOM writes it: (value, scheme designator, meaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Selector:
    modality: str = "CT"
    body_part: tuple[str, ...] = ()
    min_slices: int = 1
    orientation: str = "axial"
    series_description: str = ""


@dataclass(frozen=True)
class InputSpec:
    name: str = "input"
    spacing_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    size: tuple[int, ...] = ()
    context_slices: int = 1
    crop: str = "none"
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    multiple_of: int = 1


@dataclass(frozen=True)
class OutputSpec:
    name: str = "output"
    activation: str = "sigmoid"
    threshold: float = 0.5
    # segmentation
    region_threshold: float = 0.0  # regions are cut here; 0: half the reporting threshold
    min_component_mm3: float = 0.0
    solid_hu: float = -300.0
    solid_fraction: float = 0.5
    part_solid_fraction: float = 0.03
    max_findings: int = 20
    within: str = "anywhere"  # "lungs": findings must lie in the lungs (or on the pleura)
    # classification
    aggregate: str = "max"
    label: str = ""


@dataclass(frozen=True)
class RescoreSpec:
    """A segmentation model's second stage: a logistic regression on each candidate
    region's features (:data:`RESCORE_FEATURES`) that replaces the
    region's peak probability as its score. The network sees 2D slabs; the rescorer sees the
    region in 3D (how many slices it spans, how elongated it is), which is what tells a
    nodule from a vessel crossing one slice. Fitted by ``python -m inference.training`` on
    phantoms neither the network nor any evaluation saw; empty: the peak probability."""

    features: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    bias: float = 0.0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    task: str
    path: Path  # the folder
    selector: Selector
    input: InputSpec
    output: OutputSpec
    codes: dict[str, Code] = field(default_factory=dict)
    description: str = ""
    rescore: RescoreSpec = RescoreSpec()

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    def onnx_sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.onnx_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


_SECTIONS = {
    "selector": Selector,
    "input": InputSpec,
    "output": OutputSpec,
    "rescore": RescoreSpec,
}


def _section(cls, table: dict, where: str):
    known = {f for f in cls.__dataclass_fields__}
    for key in table:
        if key not in known:
            raise SpecError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in table.items():
        default = getattr(cls(), key)
        try:
            if isinstance(default, tuple):
                if not isinstance(value, list):
                    value = [value] if isinstance(value, str) else None
                    if value is None:
                        raise TypeError
                elem = type(default[0]) if default else None
                value = tuple(elem(v) if elem else v for v in value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError
            elif isinstance(default, (int, float)):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError
                if isinstance(default, int) and not isinstance(default, bool) and value != int(value):
                    raise TypeError
                value = type(default)(value)
            elif isinstance(default, str) and not isinstance(value, str):
                raise TypeError
        except (TypeError, ValueError):
            raise SpecError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}") from None
        kwargs[key] = value
    return cls(**kwargs)


def load_spec(folder: str | Path) -> ModelSpec:
    """Read and check ``folder/model.toml``; every problem is a one-line :class:`SpecError`."""
    folder = Path(folder)
    path = folder / "model.toml"
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    where = str(path)
    for key in ("name", "version", "task"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise SpecError(f"{where}: {key} must be a non-empty string")
    allowed = {"name", "version", "task", "description", "selector", "input", "output", "codes", "rescore"}
    for key in raw:
        if key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r}")
    if raw["task"] not in TASKS:
        raise SpecError(f"{where}: task must be one of {', '.join(TASKS)}, got {raw['task']!r}")
    parts = {name: _section(cls, raw.get(name, {}), f"{where} [{name}]") for name, cls in _SECTIONS.items()}
    sel, inp, out, rescore = parts["selector"], parts["input"], parts["output"], parts["rescore"]
    if sel.series_description:
        try:
            re.compile(sel.series_description)
        except re.error as exc:
            raise SpecError(f"{where} [selector].series_description: not a regular expression: {exc}") from None
    if sel.orientation not in ("axial", "any"):
        raise SpecError(f"{where} [selector].orientation: must be 'axial' or 'any'")
    if len(inp.spacing_mm) != 3 or any(s < 0 for s in inp.spacing_mm):
        raise SpecError(f"{where} [input].spacing_mm: three non-negative numbers (slice, row, column)")
    if inp.size and (len(inp.size) != 2 or min(inp.size) < 8):
        raise SpecError(f"{where} [input].size: [rows, columns], each at least 8")
    if inp.context_slices < 1 or inp.context_slices % 2 == 0:
        raise SpecError(f"{where} [input].context_slices: an odd number >= 1")
    if inp.crop not in CROPS:
        raise SpecError(f"{where} [input].crop: one of {', '.join(CROPS)}")
    if len(inp.hu_window) != 2 or inp.hu_window[0] >= inp.hu_window[1]:
        raise SpecError(f"{where} [input].hu_window: [low, high] with low < high")
    if inp.multiple_of < 1:
        raise SpecError(f"{where} [input].multiple_of: at least 1")
    if out.activation not in ("sigmoid", "none"):
        raise SpecError(f"{where} [output].activation: 'sigmoid' or 'none'")
    if not 0.0 < out.threshold < 1.0:
        raise SpecError(f"{where} [output].threshold: between 0 and 1")
    if rescore.features or rescore.weights:
        rescore = _check_rescore(rescore, raw["task"], out, where)
    elif not 0.0 <= out.region_threshold <= out.threshold:
        raise SpecError(f"{where} [output].region_threshold: between 0 and the threshold ({out.threshold})")
    if out.within not in ("anywhere", "lungs"):
        raise SpecError(f"{where} [output].within: 'anywhere' or 'lungs'")
    if out.aggregate not in AGGREGATES:
        raise SpecError(f"{where} [output].aggregate: one of {', '.join(AGGREGATES)}")
    codes = {}
    for key, entry in (raw.get("codes") or {}).items():
        if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(e, str) and e for e in entry)):
            raise SpecError(f"{where} [codes].{key}: [value, scheme designator, meaning]")
        codes[key] = Code(*entry)
    return ModelSpec(
        name=raw["name"],
        version=raw["version"],
        task=raw["task"],
        path=folder.resolve(),
        selector=sel,
        input=inp,
        output=out,
        codes=codes,
        description=str(raw.get("description", "")),
        rescore=rescore,
    )


def _check_rescore(rescore: RescoreSpec, task: str, out: OutputSpec, where: str) -> RescoreSpec:
    if task != "segmentation":
        raise SpecError(f"{where} [rescore]: only for segmentation models")
    unknown = [f for f in rescore.features if f not in RESCORE_FEATURES]
    if unknown:
        raise SpecError(f"{where} [rescore].features: unknown {unknown[0]!r} (known: {', '.join(RESCORE_FEATURES)})")
    if len(set(rescore.features)) != len(rescore.features):
        raise SpecError(f"{where} [rescore].features: a feature is named twice")
    if len(rescore.weights) != len(rescore.features):
        raise SpecError(f"{where} [rescore].weights: one per feature ({len(rescore.features)}), got {len(rescore.weights)}")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or w != w for w in rescore.weights):
        raise SpecError(f"{where} [rescore].weights: numbers")
    # the network's map is cut where the spec says; the threshold applies to the rescored
    # probability, a different scale, so the two are not compared
    if not 0.0 < out.region_threshold < 1.0:
        raise SpecError(f"{where} [output].region_threshold: a model with [rescore] cuts its regions there (between 0 and 1)")
    return RescoreSpec(tuple(rescore.features), tuple(float(w) for w in rescore.weights), rescore.bias)


def find_model(name: str, search: list[str | Path] | None = None) -> ModelSpec:
    """The spec of a model given by name (a folder under ``inference/models`` or under one
    of ``search``) or by a path to its folder or its ``model.toml``."""
    candidate = Path(name)
    if candidate.name == "model.toml":
        candidate = candidate.parent
    if candidate.is_dir() and (candidate / "model.toml").is_file():
        return load_spec(candidate)
    if "/" in name or name.startswith("."):
        raise SpecError(f"model {name!r}: no model.toml there")
    roots = [Path(p) for p in (search or [])] + [MODELS_DIR]
    for root in roots:
        folder = root / name
        if (folder / "model.toml").is_file():
            return load_spec(folder)
    known = sorted({p.parent.name for root in roots if root.is_dir() for p in root.glob("*/model.toml")})
    raise SpecError(f"unknown model {name!r} (known: {', '.join(known) or 'none'})")


def available_models(search: list[str | Path] | None = None) -> list[str]:
    roots = [Path(p) for p in (search or [])] + [MODELS_DIR]
    return sorted({p.parent.name for root in roots if root.is_dir() for p in root.glob("*/model.toml")})
