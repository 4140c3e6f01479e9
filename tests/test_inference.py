"""Predictor and `serval predict` on real clips with a tiny random model."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from conftest import NULL_SCORES

import serval
from serval import specs
from serval.audio import load_audio
from serval.cli import main
from serval.inference import load
from serval.io.formats import format_records
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
    columns = ["file", "duration", "label", *EMOTIONS, *DIMENSIONS, "speech_fraction", "no_speech", "error"]
    assert list(rows[0]) == columns
    for row, r in zip(rows, records, strict=True):  # every value, read back, is the JSON record's
        assert row["file"] == r["file"] and row["error"] == r.get("error", "")
        if "error" in r:
            assert all(row[c] == "" for c in columns[1:-1])
            continue
        assert float(row["duration"]) == r["duration"] and row["label"] == r["label"]
        assert {c: float(row[c]) for c in EMOTIONS} == r["probabilities"]
        assert {d: float(row[d]) for d in DIMENSIONS} == r["scores"]
        assert float(row["speech_fraction"]) == r["speech_fraction"] and row["no_speech"] == "false"

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
        values = [r["duration"], *r["probabilities"].values(), *r["scores"].values(), r["speech_fraction"]]
        assert cells[1:2] + cells[3:-2] == [f"{v:.3f}" for v in values] and cells[2] == r["label"]
        assert cells[-2] == "false"


def test_every_format_says_no_speech(model_dir, tmp_path, ravdess_clips, capsys):
    """A silent file and a tone: label null (empty cell, "-"), no_speech true; --label-no-speech labels."""
    import soundfile as sf

    t = np.arange(48000) / 16000
    sf.write(tmp_path / "a-silence.wav", np.zeros(48000, np.float32), 16000)
    sf.write(tmp_path / "b-tone.flac", 0.5 * np.sin(2 * np.pi * 440 * t), 16000)
    shutil.copy(ravdess_clips[0], tmp_path / "c-speech.flac")
    args = ["predict", str(tmp_path), "--model", str(model_dir), "--format"]
    assert main([*args, "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["label"] is None, r["no_speech"]) for r in records] == [
        (True, True),
        (True, True),
        (False, False),
    ]
    assert records[0]["speech_fraction"] == 0.0 and records[2]["speech_fraction"] > 0.3
    assert all(sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-4) for r in records)
    main([*args, "jsonl"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["file"], r["label"], r["no_speech"]) for r in lines] == [
        (r["file"], r["label"], r["no_speech"]) for r in records
    ]
    main([*args, "csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["label"], r["no_speech"]) for r in rows] == [
        ("", "true"),
        ("", "true"),
        (records[2]["label"], "false"),
    ]
    main([*args, "table"])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[2] for line in lines] == ["-", "-", records[2]["label"]]
    assert [line.split()[-1] for line in lines] == ["true", "true", "false"]
    main([*args, "json", "--label-no-speech"])
    labelled = json.loads(capsys.readouterr().out)
    for r, plain in zip(labelled, records):
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert (r["file"], r["no_speech"]) == (plain["file"], plain["no_speech"])
        assert r["speech_fraction"] == pytest.approx(plain["speech_fraction"], abs=1e-3)
        assert r["probabilities"] == pytest.approx(plain["probabilities"], abs=1e-4)


def test_output_file_is_never_overwritten(model_dir, emodb_clips, tmp_path, capsys):
    out = tmp_path / "out.json"
    out.write_text("keep me")
    code = main(["predict", str(emodb_clips[0]), "--model", str(model_dir), "-o", str(out)])
    assert code == 2 and out.read_text() == "keep me"
    assert "exists" in capsys.readouterr().err


def test_without_a_model_says_so_in_one_line(monkeypatch, tmp_path, emodb_clips, capsys):
    # serval.specs decides what "default" means, for both engines and the CLI's check
    monkeypatch.setattr(specs, "DEFAULT_MODEL", tmp_path / "none")
    code = main(["predict", str(emodb_clips[0])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--model" in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_one_resolver_for_the_default_an_ensemble_and_a_bad_path(
    model_dir, tmp_path, monkeypatch, emodb_clips
):
    monkeypatch.setattr(specs, "DEFAULT_MODEL", model_dir)  # the one place a spec is resolved
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


def test_predict_records_say_only_what_was_trained(trained_dims_models, ravdess_clips, tmp_path, monkeypatch):
    clip = str(ravdess_clips[0])
    none, arousal = (
        load(trained_dims_models[()], device="cpu"),
        load(trained_dims_models[("arousal",)], device="cpu"),
    )
    assert none.trained_dimensions == () and arousal.trained_dimensions == ("arousal",)
    a, b = none.predict(clip), arousal.predict(clip)
    assert a["probabilities"] == b["probabilities"] and a["label"] == b["label"]  # same weights
    assert a["scores"] == NULL_SCORES
    raw = arousal.predict_waveforms([load_audio(clip)])[1][0]
    assert b["scores"] == {"arousal": round(float(raw[0]), 6), "valence": None, "dominance": None}
    # strict JSON carries the nulls
    assert json.loads(json.dumps(b, allow_nan=False))["scores"]["valence"] is None
    # an ensemble: trained only where every member is
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / "ensemble.json").write_text(
        json.dumps(
            {"members": [str(trained_dims_models[DIMENSIONS]), str(trained_dims_models[("arousal",)])]}
        )
    )
    assert load(ens, device="cpu").trained_dimensions == ("arousal",)
    # csv: an empty cell; table: "-"
    rows = format_records([b], "csv").splitlines()
    header, row = rows[0].split(","), rows[1].split(",")
    assert row[header.index("arousal")] == str(b["scores"]["arousal"])
    assert row[header.index("valence")] == "" and row[header.index("dominance")] == ""
    table = format_records([b], "table").splitlines()
    cells, names = table[1].split(), table[0].split()
    assert cells[names.index("valence")] == "-" and cells[names.index("dominance")] == "-"
