"""The `Predictor` Protocol: what `serval.load` returns for every spec and engine has its members, and they work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import serval
from serval.audio import load_audio
from serval.baselines import AudioLLM
from serval.inference import Predictor as TorchPredictor
from serval.model import SERConfig, SERModel
from serval.onnx_engine import OnnxPredictor
from serval.predictor import Predictor


def check_predictor(system, clip) -> None:
    """`system` is a Predictor, and each member does what the Protocol says on a real clip."""
    assert isinstance(system, Predictor), type(system)
    assert isinstance(system.name, str) and system.name
    assert isinstance(system.fingerprint, str) and system.fingerprint
    probs, scores = system.predict_waveforms([load_audio(clip)])
    assert probs.shape == (1, len(system.classes)) and scores.shape == (1, len(system.dimensions))
    assert probs.sum() == pytest.approx(1.0, abs=1e-4)
    record = system.predict(str(clip))
    assert record["file"] == str(clip) and record["label"] in system.classes
    assert list(record["probabilities"]) == list(system.classes)
    assert record["probabilities"][record["label"]] == pytest.approx(float(probs.max()), abs=1e-4)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVAL_CACHE", str(tmp_path / "cache"))  # ONNX graphs exported here, not the user's


@pytest.fixture(scope="module")
def meralion_checkpoint(tmp_path_factory):
    """A tiny random checkpoint in MERaLiON-SER-v1's layout (its own config.json, its tensor names)."""
    torch.manual_seed(4)
    ckpt = tmp_path_factory.mktemp("meralion") / "ckpt"
    ckpt.mkdir()
    state = SERModel(SERConfig.tiny()).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"))
    config = {"model_type": "ser_whisper_ecapa", "encoder_attention_heads": 2}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.mark.slow
def test_a_folder_and_an_ensemble_are_predictors_on_both_engines(
    model_dir, tmp_path, private_cache, ravdess_clips
):
    for member in ("a", "b"):
        shutil.copytree(model_dir, tmp_path / "ensemble" / member)
    (tmp_path / "ensemble" / "ensemble.json").write_text(json.dumps({"members": ["a", "b"]}))
    for spec in (model_dir, tmp_path / "ensemble"):
        on_torch, auto = serval.load(spec, engine="torch"), serval.load(spec, device="cpu")
        assert isinstance(on_torch, TorchPredictor) and isinstance(auto, OnnxPredictor)  # auto: ONNX on a CPU
        for system in (on_torch, auto):
            check_predictor(system, ravdess_clips[0])
    one, two = (serval.load(s, engine="torch").fingerprint for s in (model_dir, tmp_path / "ensemble"))
    assert one != two  # the ensemble is not its member


@pytest.mark.slow
def test_the_default_model_is_a_predictor(ravdess_clips):
    check_predictor(serval.load("default", engine="torch", device="cpu"), ravdess_clips[1])


@pytest.mark.slow
def test_meralion_is_a_predictor(meralion_checkpoint, private_cache, ravdess_clips):
    spec = f"meralion:{meralion_checkpoint}"
    for system in (serval.load(spec, engine="torch"), serval.load(spec, device="cpu")):
        assert system.name == "MERaLiON-SER-v1"
        check_predictor(system, ravdess_clips[2])


def test_a_model_in_memory_has_a_fingerprint_of_its_weights(ravdess_clips):
    torch.manual_seed(6)
    model = SERModel(SERConfig.tiny())
    system = serval.load(model)
    check_predictor(system, ravdess_clips[3])
    assert serval.load(model).fingerprint == system.fingerprint  # the same weights: the same identity
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert serval.load(model).fingerprint != system.fingerprint


def test_a_baseline_is_a_predictor_and_its_no_answer_is_null(monkeypatch, ravdess_clips):
    llm = AudioLLM("some-model", "http://127.0.0.1:9/v1")
    replies = iter([{"reply": "Sad.", "label": "sad"}, {"reply": "no idea", "label": None}])
    monkeypatch.setattr(llm, "ask", lambda wave: next(replies))  # scripted replies: no server needed
    assert isinstance(llm, Predictor) and llm.name == "some-model" and llm.fingerprint
    sad, unsure = llm.predict([str(p) for p in ravdess_clips[:2]])
    assert sad["label"] == "sad" and sad["probabilities"]["sad"] == 1.0
    assert unsure["label"] is None and not any(unsure["probabilities"].values())
    assert set(sad["scores"].values()) == {None}  # no dimensional head: null, never NaN


def test_an_object_without_the_members_is_no_predictor():
    class WaveformsOnly:
        classes, dimensions, name = ("a", "b"), ("x",), "partial"

        def predict_waveforms(self, waves, batch_size=16):
            return np.zeros((len(waves), 2)), np.zeros((len(waves), 1))

    assert not isinstance(WaveformsOnly(), Predictor)  # no predict, no fingerprint
