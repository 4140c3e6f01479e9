"""serval.onnx_engine: the torch-free ONNX Runtime predictor against the torch one, and its graph cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import clips
from safetensors.numpy import load_file, save_file

from serval import onnx_engine
from serval.audio import load_audio
from serval.export import OPSET
from serval.inference import load
from serval.locations import DEFAULT_MODEL
from serval.onnx_engine import OnnxPredictor, graph_key, load_engine, model_folders

TOL = 1e-4
EXAMPLES = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.flac"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache for graphs only (the backbone conversion keeps using the real one)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_engine, "cache_dir", lambda: folder)
        yield folder


@pytest.fixture(scope="module")
def engine(cache) -> OnnxPredictor:
    return load_engine(None, "onnx")  # exports the default model into the cache


@pytest.fixture(scope="module")
def reference():
    return load()  # torch, fp32 on the CPU


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    """Real speech cut to 12 lengths from 0.1 to 30 s, and one of 45 s (two pooled 22.5 s pieces)."""
    paths = clips("ravdess", n=6) + clips("emodb", n=6) + clips("ased", n=6)
    speech = np.concatenate([load_audio(p) for p in paths])
    seconds = (0.1, 0.33, 0.9, 1.5, 2.0, 3.01, 4.0, 5.5, 8.0, 12.0, 20.0, 30.0, 45.0)
    assert len(speech) > 46 * 16000
    return [speech[i * 11_000 : i * 11_000 + round(s * 16000)] for i, s in enumerate(seconds)]


def test_graph_cached_once_per_model(cache, engine):
    graphs = list((cache / "onnx").glob("*.onnx"))
    assert graphs == [engine.graph] and graphs[0].stem == graph_key(model_folders(None))
    stamp = graphs[0].stat().st_mtime_ns
    again = load_engine(None, "auto", device="cpu")  # auto on a CPU: ONNX Runtime, from the cache
    assert isinstance(again, OnnxPredictor) and again.graph == engine.graph
    assert graphs[0].stat().st_mtime_ns == stamp and len(list((cache / "onnx").iterdir())) == 1
    assert onnx_engine.OPSET == OPSET


def test_key_follows_weights_not_place(tmp_path):
    copy = Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "copy"))
    key = graph_key(model_folders(None))
    assert graph_key(model_folders(copy)) == key  # content-addressed
    state = load_file(str(copy / "model.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name] + np.float32(1e-3)
    save_file(state, str(copy / "model.safetensors"))
    changed = graph_key(model_folders(copy))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "name": "renamed"}))
    assert len({key, changed, graph_key(model_folders(copy))}) == 3


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.slow
def test_matches_torch_at_every_length(engine, reference, waves, batch_size):
    probs, scores = engine.predict_waveforms(waves, batch_size=batch_size)
    want_probs, want_scores = reference.predict_waveforms(waves, batch_size=batch_size)
    assert probs.shape == want_probs.shape == (len(waves), 7) and scores.shape == (len(waves), 3)
    assert np.abs(probs - want_probs).max() <= TOL and np.abs(scores - want_scores).max() <= TOL
    assert (probs.argmax(1) == want_probs.argmax(1)).all()


@pytest.mark.slow
def test_records_as_torch_gives_them(engine, reference, tmp_path):
    missing = str(tmp_path / "missing.wav")
    inputs = [*EXAMPLES, missing]
    for classes in (None, ["neutral", "angry", "sad", "happy"]):
        got, want = engine.predict(inputs, classes=classes), reference.predict(inputs, classes=classes)
        assert got[-1] == want[-1] and "error" in got[-1]
        for g, w in zip(got[:-1], want[:-1]):
            assert (g["file"], g["duration"], g["label"]) == (w["file"], w["duration"], w["label"])
            assert list(g["probabilities"]) == list(w["probabilities"]) and list(g["scores"]) == list(
                w["scores"]
            )
            for k in g["probabilities"]:
                assert abs(g["probabilities"][k] - w["probabilities"][k]) <= TOL
            for k in g["scores"]:  # null (untrained) on both, or the same number
                assert g["scores"][k] is w["scores"][k] is None or abs(g["scores"][k] - w["scores"][k]) <= TOL
    assert (engine.classes, engine.dimensions, engine.name, engine.trained_dimensions) == (
        reference.classes,
        reference.dimensions,
        reference.name,
        reference.trained_dimensions,
    )


@pytest.mark.slow
def test_run_path_imports_neither_torch_nor_transformers(cache, engine, reference):
    code = (
        "import json, sys\n"
        "from serval.onnx_engine import load_engine\n"
        "p = load_engine(None, 'auto', device='cpu')\n"
        f"r = p.predict({EXAMPLES[:2]!r})\n"
        "print(json.dumps([type(p).__name__, [x['label'] for x in r], 'torch' in sys.modules, "
        "'transformers' in sys.modules]))\n"
    )
    env = {**os.environ, "SERVAL_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    labels = [r["label"] for r in reference.predict(EXAMPLES[:2])]
    assert json.loads(done.stdout) == ["OnnxPredictor", labels, False, False]


def test_onnx_file_and_errors(engine, tmp_path):
    direct = load_engine(str(engine.graph))
    assert isinstance(direct, OnnxPredictor) and direct.name == engine.name
    wave = load_audio(EXAMPLES[0])
    # exact: one graph file, one runtime, one process, the same input give the same numbers
    np.testing.assert_array_equal(direct.predict_waveforms([wave])[0], engine.predict_waveforms([wave])[0])
    with pytest.raises(ValueError, match="engine must be one of"):
        load_engine(None, "gpu")
    with pytest.raises(ValueError, match="local serval model"):
        load_engine("emotion2vec:base", "onnx")
    with pytest.raises(ValueError, match="CPU"):
        load_engine(None, "onnx", device="cuda")
    with pytest.raises(ValueError, match="onnx engine only"):
        load_engine(str(engine.graph), "torch")
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "g", [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])]
    )
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(ValueError, match="not a graph written by serval export"):
        OnnxPredictor(foreign)
    with pytest.raises(ValueError, match="NaN"):
        engine.predict_waveforms([np.full(1600, np.nan, np.float32)])


@pytest.mark.slow
def test_cli_default_engine_agrees_with_torch_on_the_examples(cache, engine):
    """`serval predict examples/`: ORT (the CPU default) gives torch's labels, probabilities to 1e-4."""
    env = {**os.environ, "SERVAL_CACHE": str(cache)}

    def predict(*extra: str) -> list[dict]:
        cmd = [sys.executable, "-m", "serval", "predict", *EXAMPLES, "--format", "json", *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    auto, torch_records = predict(), predict("--engine", "torch")
    assert len(auto) == len(torch_records) == len(EXAMPLES)
    for a, t in zip(auto, torch_records):
        assert (a["file"], a["duration"], a["label"]) == (t["file"], t["duration"], t["label"])
        assert max(abs(a["probabilities"][k] - t["probabilities"][k]) for k in t["probabilities"]) <= TOL
        trained = [k for k, v in t["scores"].items() if v is not None]
        assert [k for k, v in a["scores"].items() if v is not None] == trained
        assert max((abs(a["scores"][k] - t["scores"][k]) for k in trained), default=0) <= TOL
    assert auto != torch_records  # two engines really ran: they differ in the last digits


def test_auto_falls_back_to_torch_with_one_line(engine, capsys):
    import serval
    from serval.baselines import AudioLLM
    from serval.inference import Predictor

    llm = load_engine("llm:some-model@http://127.0.0.1:9", "auto", device="cpu", api_key="x")
    assert isinstance(llm, AudioLLM)
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "llm:some-model@http://127.0.0.1:9" in warning and "torch" in warning
    assert isinstance(serval.load(engine="torch", device="cpu"), Predictor)
    assert isinstance(serval.load(), OnnxPredictor) and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="model object"):
        load_engine(serval.load(engine="torch").model, "onnx")


@pytest.mark.parametrize("command", ["predict", "timeline", "eval", "serve", "mcp"])
def test_every_model_command_takes_engine(command):
    from serval.cli import build_parser

    parser = build_parser(command)
    extra = {"predict": ["x.flac"], "timeline": ["x.flac"], "eval": ["m.csv", "-o", "out"]}.get(command, [])
    assert parser.parse_args([command, *extra]).engine == "auto"
    assert parser.parse_args([command, *extra, "--engine", "torch"]).engine == "torch"
    with pytest.raises(SystemExit):
        parser.parse_args([command, *extra, "--engine", "tensorrt"])


def test_cli_predict_imports_no_heavy_package(cache, engine):
    """`serval predict one.flac` on the default engine: no torch, transformers or server stack imported."""
    env = {**os.environ, "SERVAL_CACHE": str(cache)}
    cmd = [sys.executable, "-X", "importtime", "-m", "serval", "predict", EXAMPLES[0], "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    imported = {
        line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
    }
    assert "onnxruntime" in imported and json.loads(done.stdout)[0]["label"]
    assert not imported & {"torch", "transformers", "fastapi", "uvicorn", "pydantic", "matplotlib", "sklearn"}
