"""transformers: after `import serval`, `pipeline("audio-classification", model=<serval dir>)` agrees with
serval (no trust_remote_code), importing serval does not import transformers, and a saved model folder
carries a Hugging Face model card and feature-extractor config."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, clips

import serval
from serval.audio import load_audio
from serval.checkpoint import load_model, save_model
from serval.hub import CARD_MARK
from serval.inference import DEFAULT_MODEL
from serval.model import SERConfig, SERModel


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_the_pipeline_agrees_with_serval_on_the_bundled_model():
    paths = [str(p) for p in clips("ravdess", "Actor_04/*.flac", n=3)] + [str(clips("emodb", n=1)[0])]
    # serval first, transformers later: the import hook registers serval when transformers arrives
    code = f"""
import json, sys
import serval
from serval.audio import load_audio
predictor = serval.load({str(DEFAULT_MODEL)!r}, device="cpu")
records = predictor.predict({paths!r})
assert "transformers" not in sys.modules, "serval's inference path imported transformers"
assert "peft" not in sys.modules, "serval's inference path imported peft (adapters are folded at load)"
import transformers
pipe = transformers.pipeline("audio-classification", model={str(DEFAULT_MODEL)!r}, device="cpu")
waves = [load_audio(p) for p in {paths!r}]
out = [pipe(w, top_k=7) for w in waves]
out.append(pipe({{"array": waves[0], "sampling_rate": 16000}}, top_k=2))
print(json.dumps({{"serval": records, "pipeline": out, "model": type(pipe.model).__name__}}))
"""
    got = json.loads(run_python(code).strip().splitlines()[-1])
    assert got["model"] == "ServalForAudioClassification"
    for record, ranked in zip(got["serval"], got["pipeline"]):
        assert ranked[0]["label"] == record["label"]
        assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
        for r in ranked:
            assert r["score"] == pytest.approx(record["probabilities"][r["label"]], abs=1e-5)
    assert got["pipeline"][-1] == got["pipeline"][0][:2]


@pytest.mark.slow
def test_transformers_imported_first_also_finds_serval(tmp_path):
    torch.manual_seed(0)
    save_model(SERModel(SERConfig.tiny(classes=("neutral", "angry", "sad", "happy"))), tmp_path / "tiny")
    clip = str(clips("ravdess", n=1)[0])
    code = f"""
import json
import transformers
import serval
from serval.audio import load_audio
model = transformers.AutoModelForAudioClassification.from_pretrained({str(tmp_path / "tiny")!r})
extractor = transformers.AutoFeatureExtractor.from_pretrained({str(tmp_path / "tiny")!r})
config = transformers.AutoConfig.from_pretrained({str(tmp_path / "tiny")!r})
pipe = transformers.pipeline("audio-classification", model={str(tmp_path / "tiny")!r})
wave = load_audio({clip!r})
print(json.dumps({{"labels": config.id2label, "types": [type(model).__name__, type(extractor).__name__],
    "pipeline": pipe(wave, top_k=1), "serval": serval.load({str(tmp_path / "tiny")!r}).predict(wave)}}))
"""
    got = json.loads(run_python(code).strip().splitlines()[-1])
    assert got["labels"] == {"0": "neutral", "1": "angry", "2": "sad", "3": "happy"}
    assert got["types"] == ["ServalForAudioClassification", "ServalFeatureExtractor"]
    assert got["pipeline"][0]["label"] == got["serval"]["label"]


@pytest.mark.slow
def test_importing_serval_imports_no_transformers():
    out = run_python(
        "import sys, serval, serval.hf, serval.hub, serval.checkpoint; print('transformers' in sys.modules)"
    )
    assert out.strip() == "False"


def test_a_saved_folder_has_a_model_card(tmp_path):
    torch.manual_seed(1)
    model = SERModel(SERConfig.tiny())
    folder = save_model(model, tmp_path / "m")
    card = (folder / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: serval\n" in front and "pipeline_tag: audio-classification\n" in front
    assert "license: other\n" in front and "- speech-emotion-recognition\n" in front
    assert all(c in card for c in model.config.classes)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "serval" and config["architectures"] == ["ServalForAudioClassification"]
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["feature_extractor_type"] == "ServalFeatureExtractor" and pre["sampling_rate"] == 16000
    assert load_model(folder).config == model.config  # the Hugging Face keys do not get in serval's way

    # saved again: a card serval wrote keeps its licence; a card of the user's own is left alone
    card_path = folder / "README.md"
    card_path.write_text(card.replace("license: other", "license: mit"))
    save_model(model, folder)
    assert "license: mit\n" in card_path.read_text() and CARD_MARK in card_path.read_text()
    card_path.write_text("# my own card\n")
    save_model(model, folder)
    assert card_path.read_text() == "# my own card\n"


def test_the_bundled_model_folder_is_ready_for_the_hub():
    card = (DEFAULT_MODEL / "README.md").read_text()
    assert (
        "library_name: serval" in card and "license: other" in card
    )  # NC-SA, NC-ND and AGPL data: MODEL_CARD.md
    assert (DEFAULT_MODEL / "preprocessor_config.json").is_file()  # what push_to_hub sends: test_hub.py


@pytest.mark.slow
def test_the_pipeline_in_process(tmp_path):
    transformers = pytest.importorskip("transformers")
    serval.hf.register()
    torch.manual_seed(2)
    save_model(SERModel(SERConfig.tiny()), tmp_path / "m")
    pipe = transformers.pipeline("audio-classification", model=str(tmp_path / "m"))
    wave = load_audio(clips("ravdess", n=1)[0])
    ranked = pipe(wave, top_k=3)
    record = serval.load(tmp_path / "m").predict(wave)
    assert ranked[0]["label"] == record["label"] and len(ranked) == 3
    np.testing.assert_allclose(ranked[0]["score"], record["probabilities"][record["label"]], atol=1e-5)
