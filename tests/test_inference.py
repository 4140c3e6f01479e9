"""Predictor and `serval predict` on real clips with a tiny random model."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest

import serval
from serval import inference, onnx_engine
from serval.audio import load_audio
from serval.cli import main
from serval.model import SERConfig
from serval.vocab import DIMENSIONS, EMOTIONS
from serval.windows import split_span


@pytest.fixture()
def clip_dir(tmp_path, ravdess_clips, emodb_clips):
    for clip in ravdess_clips[:3] + emodb_clips[:2]:
        shutil.copy(clip, tmp_path / clip.name)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    return tmp_path


@pytest.mark.slow
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
    args = ["predict", str(clip_dir), "--model", str(model_dir), "--format"]
    main([*args, "json"])
    records = json.loads(capsys.readouterr().out)
    main([*args, "csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 6 and rows[0]["label"] in SERConfig().classes
    columns = ["file", "duration", "label", *EMOTIONS, *DIMENSIONS, "error"]
    assert list(rows[0]) == columns
    for row, r in zip(rows, records, strict=True):  # every value, read back, is the JSON record's
        assert row["file"] == r["file"] and row["error"] == r.get("error", "")
        if "error" in r:
            assert all(row[c] == "" for c in columns[1:-1])
            continue
        assert float(row["duration"]) == r["duration"] and row["label"] == r["label"]
        assert {c: float(row[c]) for c in EMOTIONS} == r["probabilities"]
        assert {d: float(row[d]) for d in DIMENSIONS} == r["scores"]

    main([*args, "table"])
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == columns and len(lines) == 6
    starts = [header.index(f"{c} ") if c != "error" else header.rindex(c) for c in columns]
    for line, r in zip(lines, records, strict=True):
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        assert cells[0] == r["file"] and cells[-1] == r.get("error", "")
        if "error" in r:
            assert cells[1:-1] == [""] * (len(columns) - 2)
            continue
        values = [r["duration"], *r["probabilities"].values(), *r["scores"].values()]
        assert cells[1:2] + cells[3:-1] == [f"{v:.3f}" for v in values] and cells[2] == r["label"]


def test_output_file_is_never_overwritten(model_dir, emodb_clips, tmp_path, capsys):
    out = tmp_path / "out.json"
    out.write_text("keep me")
    code = main(["predict", str(emodb_clips[0]), "--model", str(model_dir), "-o", str(out)])
    assert code == 2 and out.read_text() == "keep me"
    assert "exists" in capsys.readouterr().err


def test_without_a_model_says_so_in_one_line(monkeypatch, tmp_path, emodb_clips, capsys):
    monkeypatch.setattr(inference, "DEFAULT_MODEL", tmp_path / "none")
    monkeypatch.setattr(onnx_engine, "DEFAULT_MODEL", tmp_path / "none")  # the default engine's view too
    code = main(["predict", str(emodb_clips[0])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--model" in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_one_resolver_for_the_default_an_ensemble_and_a_bad_path(
    model_dir, tmp_path, monkeypatch, emodb_clips
):
    monkeypatch.setattr(inference, "DEFAULT_MODEL", model_dir)
    waves = [load_audio(emodb_clips[0])]
    direct = serval.load(model_dir, engine="torch")  # the torch resolver (the ONNX engine: test_onnx_engine)
    probs, scores = direct.predict_waveforms(waves)
    for spec in (None, "default"):  # both mean the bundled model
        bundled = serval.load(spec, engine="torch")
        assert bundled.fingerprint == direct.fingerprint
        p, s = bundled.predict_waveforms(waves)
        assert np.array_equal(p, probs) and np.array_equal(s, scores)  # exact: the same weights, same process
    for member in ("a", "b"):
        shutil.copytree(model_dir, tmp_path / "ensemble" / member)
    (tmp_path / "ensemble" / "ensemble.json").write_text(json.dumps({"members": ["a", "b"]}))
    ensemble = serval.load(tmp_path / "ensemble", engine="torch")
    assert len(ensemble.models) == 2 and ensemble.name == direct.name
    p, s = ensemble.predict_waveforms(waves)  # two copies of one model average to that model
    assert np.allclose(p, probs, atol=1e-6) and np.allclose(s, scores, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        serval.load(tmp_path / "nothing")
