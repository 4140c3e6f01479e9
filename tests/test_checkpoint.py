"""Serval model directories: save and load, with or without the backbone, and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from serval.checkpoint import load_model, save_model
from serval.model import SERConfig, SERModel


def tiny_model(seed: int = 0, **overrides) -> SERModel:
    torch.manual_seed(seed)
    return SERModel(SERConfig.tiny(**overrides)).eval()


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(
        seed=3, classes=("neutral", "angry", "sad", "happy"), dimensions=("valence", "arousal", "dominance")
    )
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md",  # the model card, and the feature-extractor config for transformers (serval.hf)
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    feats = torch.randn(2, 80, 160)
    with torch.no_grad():
        assert torch.equal(model(feats).logits, loaded(feats).logits)
    assert loaded.config.dimensions == ("valence", "arousal", "dominance")


def test_save_without_backbone_keeps_only_trained_tensors(tmp_path):
    model = tiny_model(lora_r=2, backbone="pypi:whisper-base")
    save_model(model, tmp_path, include_backbone=False)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not [k for k in saved if k.startswith("whisper.") and "lora_" not in k]
    assert any("lora_A" in k for k in saved) and "emotion_layer.weight" in saved


def test_unknown_config_key_and_missing_dir_are_clear_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"format": "serval", "bogus": 1}))
    with pytest.raises(ValueError, match=r"bad/config.json: unknown setting bogus"):
        load_model(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(tmp_path / "no-such-model")


def test_a_foreign_checkpoint_is_not_taken_for_a_serval_one(tmp_path):
    model = tiny_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "ser_whisper_ecapa"}))
    with pytest.raises(ValueError, match=f"not a serval model directory.*meralion:{tmp_path}"):
        load_model(tmp_path)
