"""Predictor and `serval predict` on real clips with a tiny random model."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch

import serval
from serval import inference
from serval.audio import load_audio
from serval.cli import main
from serval.model import SERConfig, SERModel
from serval.windows import split_span


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    SERModel(SERConfig.tiny()).save_pretrained(path)
    return path


@pytest.fixture()
def clip_dir(tmp_path, ravdess_clips, emodb_clips):
    for clip in ravdess_clips[:3] + emodb_clips[:2]:
        shutil.copy(clip, tmp_path / clip.name)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    return tmp_path


def test_predict_directory_prints_one_valid_record_per_file(model_dir, clip_dir, capsys):
    code = main(["predict", str(clip_dir), "--model", str(model_dir), "--format", "json"])
    records = json.loads(capsys.readouterr().out)
    assert code == 1  # one file failed
    assert len(records) == 6
    bad = [r for r in records if "error" in r]
    assert len(bad) == 1 and bad[0]["file"].endswith("corrupt.wav") and "corrupt.wav" in bad[0]["error"]
    for r in records:
        if "error" in r:
            continue
        probs = r["probabilities"]
        assert list(probs) == list(SERConfig().classes)
        assert abs(sum(probs.values()) - 1) < 1e-4
        assert r["label"] == max(probs, key=probs.get)
        assert set(r["scores"]) == {"arousal", "valence", "dominance"}
        assert all(0 <= v <= 1 for v in r["scores"].values())
        assert 1.5 < r["duration"] < 6


def test_class_subset_renormalises(model_dir, ravdess_clips):
    predictor = serval.load(model_dir)
    full = predictor.predict([ravdess_clips[0]])[0]["probabilities"]
    sub = predictor.predict([ravdess_clips[0]], classes=["neutral", "angry", "sad", "happy"])[0]
    total = sum(full[c] for c in ("neutral", "angry", "sad", "happy"))
    assert list(sub["probabilities"]) == ["neutral", "angry", "sad", "happy"]
    for c, p in sub["probabilities"].items():
        assert p == pytest.approx(full[c] / total, abs=1e-5)
    with pytest.raises(ValueError, match="unknown classes"):
        predictor.predict([ravdess_clips[0]], classes=["bored"])


def test_results_do_not_depend_on_batching(model_dir, ravdess_clips, ased_clips):
    predictor = serval.load(model_dir)
    waves = [load_audio(p) for p in ravdess_clips[:4] + ased_clips[:3]]
    p1, s1 = predictor.predict_waveforms(waves, batch_size=1)
    p7, s7 = predictor.predict_waveforms(waves, batch_size=7)
    assert np.abs(p1 - p7).max() < 1e-4 and np.abs(s1 - s7).max() < 1e-4


def test_long_input_is_pooled_over_pieces(model_dir, ravdess_clips):
    predictor = serval.load(model_dir)
    clip = load_audio(ravdess_clips[0])
    long = np.tile(clip, int(np.ceil(65 * 16000 / len(clip))))[: 65 * 16000]
    probs, scores = predictor.predict_waveforms([long])
    pieces = [long[round(a * 16000) : round(b * 16000)] for a, b in split_span(0.0, 65.0)]
    assert len(pieces) == 3 and max(len(p) for p in pieces) <= 30 * 16000
    p_pieces, _ = predictor.predict_waveforms(pieces)
    weights = np.array([len(p) for p in pieces], float)
    assert np.allclose(probs[0], (p_pieces * weights[:, None]).sum(0) / weights.sum(), atol=1e-5)


def test_arrays_and_bad_arrays(model_dir, emodb_clips):
    predictor = serval.load(model_dir)
    good = load_audio(emodb_clips[0])
    spiked = good.copy()
    spiked[8000] = np.inf
    records = predictor.predict([good, np.array([np.nan] * 4000, np.float32), spiked, np.zeros(0)])
    assert records[0]["file"] is None and "label" in records[0]
    assert "non-finite" in records[1]["error"] and "4000" in records[1]["error"]
    assert "the first at 0.500 s" in records[2]["error"]
    assert "no samples" in records[3]["error"]


def test_csv_and_table_formats(model_dir, clip_dir, capsys):
    main(["predict", str(clip_dir), "--model", str(model_dir), "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 6 and rows[0]["label"] in SERConfig().classes
    main(["predict", str(clip_dir), "--model", str(model_dir), "--format", "table"])
    assert capsys.readouterr().out.splitlines()[0].split()[:3] == ["file", "duration", "label"]


def test_output_file_is_never_overwritten(model_dir, emodb_clips, tmp_path, capsys):
    out = tmp_path / "out.json"
    out.write_text("keep me")
    code = main(["predict", str(emodb_clips[0]), "--model", str(model_dir), "-o", str(out)])
    assert code == 2 and out.read_text() == "keep me"
    assert "exists" in capsys.readouterr().err


def test_without_a_model_says_so_in_one_line(monkeypatch, tmp_path, emodb_clips, capsys):
    monkeypatch.setattr(inference, "DEFAULT_MODEL", tmp_path / "none")
    code = main(["predict", str(emodb_clips[0])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--model" in err and len(err.splitlines()) == 1 and "Traceback" not in err
