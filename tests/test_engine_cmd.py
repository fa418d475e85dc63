"""``pacs-ai build-engine MODEL`` (study_queue/engine_cmd.py).

Run in-process through the real ``study_queue.cli.main`` (its one-line error
handling included). Without TensorRT (every CPU machine) the command exits 1
with one line saying what to install; a bad MODEL is one line and exit 2. The
success path runs with TensorRT's build replaced by a stand-in that drives
the progress bar the way TensorRT's progress monitor does.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from inference.engines import EngineError
from inference.engines import tensorrt_engine as te
from study_queue import cli, engine_cmd

from inference.engines import select as sel

from .test_engines import _tensorrt_importable, stand_in_trt, write_tiny_onnx  # noqa: F401 (fixture)


def run(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """``pacs-ai ARGV`` in-process: (exit status, stdout, stderr). Registers
    ``build-engine`` if cli.py does not yet."""
    build = cli.build_parser

    def build_parser() -> argparse.ArgumentParser:
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "build-engine" not in sub.choices:
            engine_cmd.register(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(status: int, err: str, want_status: int, *words: str) -> str:
    assert "Traceback" not in err, err
    assert status == want_status, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pacs-ai: error: "), err
    for word in words:
        assert word in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    (root / "tiny").mkdir()
    write_tiny_onnx(root / "tiny" / "model.onnx")
    (root / "empty").mkdir()
    return root


@pytest.fixture
def models(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(engine_cmd, "MODELS_DIR", model_dir)
    return model_dir


def test_without_tensorrt_exit_1_and_one_line(models: Path, capsys, monkeypatch) -> None:
    if _tensorrt_importable():
        pytest.skip("TensorRT is installed here")
    status, out, err = run(["build-engine", "tiny"], capsys, monkeypatch)
    line = one_line_error(status, err, 1)
    assert line == ("pacs-ai: error: TensorRT is not installed "
                    "(pip install 'pacs-ai[gpu]' on a machine with an NVIDIA GPU and CUDA)")
    assert out == ""


@pytest.mark.parametrize(
    "model, words",
    [
        ("no-such-model", ["MODEL", "'no-such-model'", "known models: tiny"]),
        ("missing.onnx", ["MODEL", "missing.onnx", "no such ONNX file"]),
        ("{models}/empty", ["MODEL", "no model.onnx"]),
        ("empty", ["MODEL", "empty", "has no model.onnx"]),
        ("../tiny", ["MODEL", "'../tiny'"]),
    ],
)
def test_bad_model_is_one_line_exit_2(model: str, words: list[str], models: Path, capsys, monkeypatch) -> None:
    status, out, err = run(["build-engine", model.format(models=models)], capsys, monkeypatch)
    one_line_error(status, err, 2, *words)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--max-batch", "0"], ["--max-batch", "'0'", "at least 1"]),
        (["--max-batch", "many"], ["--max-batch", "'many'"]),
        (["--max-batch", "4", "--opt-batch", "8"], ["--opt-batch", "larger than --max-batch 4"]),
        (["--precision", "int8"], ["--precision", "int8"]),
    ],
)
def test_bad_flags_are_one_line_exit_2(args: list[str], words: list[str], models: Path, capsys, monkeypatch) -> None:
    status, _, err = run(["build-engine", "tiny", *args], capsys, monkeypatch)
    one_line_error(status, err, 2, *words)


def test_model_resolution(models: Path, tmp_path: Path) -> None:
    onnx = models / "tiny" / "model.onnx"
    assert engine_cmd.resolve_model("tiny") == onnx
    assert engine_cmd.resolve_model(str(models / "tiny")) == onnx
    assert engine_cmd.resolve_model(str(onnx)) == onnx
    assert engine_cmd.known_models() == ["tiny"]
    assert engine_cmd.known_models(tmp_path / "nowhere") == []


class FakeBuild:
    """TensorRT's build as its progress monitor reports it: nested phases."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.calls: list[dict] = []

    def cache_path(self, onnx_path, cache_dir, max_batch, opt_batch, *, precision, device) -> Path:
        return Path(cache_dir) / "tiny.engine"

    def build(self, onnx_path, cache_dir, max_batch, opt_batch, progress, *, precision, device, rebuild) -> Path:
        self.calls.append(dict(onnx=onnx_path, max_batch=max_batch, opt_batch=opt_batch, precision=precision,
                               device=device, rebuild=rebuild))
        progress.phase_start("Building engine", None, 3)
        for step in range(3):
            progress.phase_start("Timing graph nodes", "Building engine", 2)
            progress.step_complete("Timing graph nodes", 0)
            progress.step_complete("Timing graph nodes", 1)
            progress.phase_finish("Timing graph nodes")
            assert progress.step_complete("Building engine", step) is not False
        progress.phase_finish("Building engine")
        if self.fail is not None:
            raise self.fail
        path = Path(cache_dir) / "tiny.engine"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"plan")
        return path


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> FakeBuild:
    import inference.engines as engines

    fake = FakeBuild()
    monkeypatch.setattr(engines, "choose_engine_kind", lambda requested: ("tensorrt", "test"))
    monkeypatch.setattr(te, "engine_cache_path", fake.cache_path)
    monkeypatch.setattr(te, "build_engine", fake.build)
    return fake


def test_build_prints_the_engine_path(models: Path, tmp_path: Path, fake_tensorrt: FakeBuild, capsys, monkeypatch) -> None:
    cache = tmp_path / "engines"
    status, out, err = run(["build-engine", "tiny", "--cache-dir", str(cache), "--max-batch", "8", "--opt-batch", "4"],
                           capsys, monkeypatch)
    assert status == 0, err
    assert out == f"{cache / 'tiny.engine'}\n"
    assert "engine built in" in err and "Traceback" not in err
    assert fake_tensorrt.calls == [dict(onnx=models / "tiny" / "model.onnx", max_batch=8, opt_batch=4,
                                        precision="onnx", device=0, rebuild=False)]
    status, out, err = run(["build-engine", "tiny", "--cache-dir", str(cache)], capsys, monkeypatch)
    assert status == 0 and "already in the cache" in err


def test_build_failure_is_one_line_exit_1(models: Path, tmp_path: Path, fake_tensorrt: FakeBuild, capsys, monkeypatch) -> None:
    fake_tensorrt.fail = EngineError("model.onnx: TensorRT's ONNX parser failed: node 'foo' (Foo): unsupported")
    status, out, err = run(["build-engine", "tiny", "--cache-dir", str(tmp_path)], capsys, monkeypatch)
    one_line_error(status, err, 1, "ONNX parser failed", "node 'foo'")
    assert out == ""


def test_ctrl_c_during_the_build_exits_130(models: Path, tmp_path: Path, fake_tensorrt: FakeBuild, capsys, monkeypatch) -> None:
    fake_tensorrt.fail = KeyboardInterrupt()
    status, _, err = run(["build-engine", "tiny", "--cache-dir", str(tmp_path)], capsys, monkeypatch)
    assert status == 130 and "Traceback" not in err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_follows_the_outer_phase_and_names_the_inner_one() -> None:
    stream = Terminal()
    with engine_cmd.BuildProgressBar(label="building tiny", stream=stream, min_interval=0) as bar:
        bar.phase_start("Building engine", None, 4)
        bar.phase_start("Timing graph nodes", "Building engine", 10)
        assert bar.step_complete("Timing graph nodes", 4) is True
        bar.step_complete("Building engine", 1)
        bar.phase_finish("Timing graph nodes")
        frames = stream.getvalue().split("\r")
        assert "building tiny [" in frames[-1] and "2/4" in frames[-1]
        assert "Timing graph nodes" in frames[-2] and "Building engine" in frames[-1]
        bar.phase_finish("Building engine")
        assert "4/4" in stream.getvalue().split("\r")[-1]
    assert stream.getvalue().endswith("\n")


def test_progress_bar_is_silent_off_a_terminal() -> None:
    stream = io.StringIO()
    with engine_cmd.BuildProgressBar(stream=stream) as bar:
        bar.phase_start("Building engine", None, 2)
        bar.step_complete("Building engine", 0)
        bar.phase_finish("Building engine")
    assert stream.getvalue() == "" and bar.phases_seen == 1


def test_build_with_the_stand_in_tensorrt(models: Path, tmp_path: Path, stand_in_trt, capsys, monkeypatch) -> None:
    """The real engine_cache_path/build_engine flow under the CLI, on the
    stand-in tensorrt and pycuda modules of test_engines."""
    monkeypatch.setattr(sel, "visible_gpus", lambda: (1, "1 NVIDIA GPU in /proc/driver/nvidia/gpus"))
    status, out, err = run(["build-engine", str(models / "tiny"), "--cache-dir", str(tmp_path), "--max-batch", "4"],
                           capsys, monkeypatch)
    assert status == 0, err
    path = Path(out.strip())
    assert path.parent == tmp_path and path.suffix == ".engine" and path.is_file() and "b1-4-4" in path.name
    status, out2, err = run(["build-engine", "tiny", "--cache-dir", str(tmp_path), "--max-batch", "4"], capsys, monkeypatch)
    assert status == 0 and out2 == out and "already in the cache" in err and stand_in_trt.builds == 1
    status, _, err = run(["build-engine", "tiny", "--cache-dir", str(tmp_path), "--precision", "fp16"], capsys, monkeypatch)
    one_line_error(status, err, 1, "TensorRT 11", "AutoCast")
