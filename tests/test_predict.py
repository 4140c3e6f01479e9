"""Batch jobs: manifests and Hugging Face datasets as inputs, the decode thread, streaming JSONL output
and resume, on real clips with a tiny random model."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

import serval
from serval import predict
from serval.audio import AudioError, load_audio
from serval.cli import main
from serval.clip import Clip
from serval.io import decoder, hf_datasets, inputs


@pytest.fixture()
def clips(tmp_path, ravdess_clips, emodb_clips, ased_clips):
    folder = tmp_path / "clips"
    folder.mkdir()
    for clip in ravdess_clips[:4] + emodb_clips[:3] + ased_clips[:3]:
        shutil.copy(clip, folder / clip.name)
    return folder


def _predict(capsys, *args) -> tuple[int, list[dict]]:
    code = main(["predict", *map(str, args), "--format", "json", "--no-progress"])
    return code, json.loads(capsys.readouterr().out)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(records: list[dict], want: list[dict]) -> None:
    assert [(r["file"], r.get("label"), r.get("error")) for r in records] == [
        (r["file"], r.get("label"), r.get("error")) for r in want
    ]
    for r, w in zip(records, want):
        for k in ("probabilities", "scores"):
            assert all(abs(r[k][c] - v) < 1e-5 for c, v in w.get(k, {}).items())


@pytest.mark.slow
def test_manifest_rows_and_spans(model_dir, clips, tmp_path, capsys):
    files = sorted(clips.iterdir())
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,start,end\n{files[0]},,\n{files[1]},0.5,1.5\n")
    code, records = _predict(capsys, manifest, "--model", model_dir)
    assert code == 0 and [r["file"] for r in records] == [str(files[0]), str(files[1])]
    assert "start" not in records[0] and (records[1]["start"], records[1]["end"]) == (0.5, 1.5)
    assert records[1]["duration"] == 1.0
    predictor = serval.load(model_dir)
    probs, _ = predictor.predict_waveforms([load_audio(files[1], 0.5, 1.5)])
    assert records[1] == {**records[1], **predictor.record(probs[0], _[0])}
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": str(files[1]), "start": 0.5, "end": 1.5}) + "\n")
    assert _predict(capsys, jsonl, "--model", model_dir)[1] == records[1:]


def test_datasets_saved_and_parquet_equal_the_files(model_dir, clips, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    files = sorted(str(f) for f in clips.iterdir())
    ds = datasets.Dataset.from_dict({"audio": files, "label": ["angry"] * len(files)})
    ds = ds.cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "saved"))  # embeds the audio bytes
    ds.to_parquet(str(tmp_path / "clips.parquet"))  # keeps the paths
    _, want = _predict(capsys, clips, "--model", model_dir)
    for source in (tmp_path / "saved", tmp_path / "clips.parquet"):
        code, got = _predict(capsys, source, "--model", model_dir)
        assert code == 0 and len(got) == len(files)
        assert all("#" in r["file"] for r in got)
        assert [{k: v for k, v in r.items() if k != "file"} for r in got] == [
            {k: v for k, v in r.items() if k != "file"} for r in want
        ]


def test_dataset_rows_for_eval(model_dir, clips, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = sorted(str(f) for f in clips.iterdir())[:4]
    ds = datasets.Dataset.from_dict(
        {"audio": files, "label": [0, 1, 2, 1], "speaker": ["a", "b", "c", "d"]}
    ).cast_column("audio", datasets.Audio())
    ds = ds.cast_column("label", datasets.ClassLabel(names=["neutral", "anger", "sad"]))
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = hf_datasets.read_rows(tmp_path / "ds")
    assert [r.label for r in rows] == ["neutral", "angry", "sad", "angry"]
    assert [r.speaker for r in rows] == ["a", "b", "c", "d"]
    assert np.array_equal(inputs.load_item(rows[2].path), load_audio(files[2]))
    out = tmp_path / "report"
    code = main(
        ["eval", str(tmp_path / "ds"), "--model", str(model_dir), "-o", str(out)]
        + ["--bootstrap", "0", "--no-progress", "--segments", "utterance"]
    )
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and not report["excluded"]
    overall = report["results"]["utterance"]["7class"]["tiny"]["overall"]
    support = {c: 0 for c in overall["support"]} | {"neutral": 1, "sad": 1, "angry": 2}
    assert overall["n"] == 4 and overall["support"] == support


def test_dataset_rows_of_another_label_set(clips, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = sorted(str(f) for f in clips.iterdir())[:3]
    ds = datasets.Dataset.from_dict({"audio": files, "label": ["Calm", "bored", "tense"]})
    ds.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "ds"))
    rows = hf_datasets.read_rows(tmp_path / "ds", labels=("calm", "bored", "tense"))
    assert [r.label for r in rows] == ["calm", "bored", "tense"]  # as a manifest reads them
    assert [r.label for r in hf_datasets.read_rows(tmp_path / "ds", labels=None)] == [
        "calm",
        "bored",
        "tense",
    ]
    with pytest.raises(hf_datasets.DatasetError, match=r"#0: label 'Calm' is not one of neutral"):
        hf_datasets.read_rows(tmp_path / "ds")  # the 7 classes by default


def test_a_bad_dataset_is_named(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "no-audio.parquet")
    assert main(["predict", str(tmp_path / "no-audio.parquet")]) == 2
    err = capsys.readouterr().err
    assert "no-audio.parquet" in err and "no Audio column" in err and len(err.splitlines()) == 1


def test_decoding_runs_ahead_by_a_bounded_amount(emodb_clips):
    pulled = []

    def items():
        for i in range(40):
            pulled.append(i)
            yield Clip(str(emodb_clips[i % len(emodb_clips)]))

    stream = decoder.decoded(items(), depth=4)
    first = next(stream)
    threading.Event().wait(0.5)  # give the decoder every chance to run ahead
    assert isinstance(first[1], np.ndarray) and len(pulled) <= 1 + 4 + 2
    assert len(list(stream)) == 39 and len(pulled) == 40


def test_decode_errors_are_records_and_bad_manifests_raise(model_dir, clips, tmp_path, capsys):
    (clips / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    code, records = _predict(capsys, clips, "--model", model_dir)
    bad = [r for r in records if "error" in r]
    assert code == 1 and len(bad) == 1 and "corrupt.wav" in bad[0]["error"]
    with pytest.raises(AudioError):
        inputs.load_item(str(clips / "corrupt.wav"))
    manifest = tmp_path / "bad.csv"
    manifest.write_text("path,start\nx.flac,soon\n")
    assert main(["predict", str(manifest)]) == 2
    assert "bad.csv:2" in capsys.readouterr().err


def test_jsonl_streams_and_a_rerun_resumes_losing_nothing(model_dir, clips, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = ["predict", str(clips), "--model", str(model_dir), "-o", str(out), "--batch-size", "2"]
    assert main([*args, "--no-progress"]) == 0
    full = _lines(out)
    assert len(full) == 10 and [r["file"] for r in full] == sorted(str(f) for f in clips.iterdir())
    assert main([*args, "--no-progress"]) == 0  # a rerun adds nothing
    assert _lines(out) == full and "10 of 10" in capsys.readouterr().err

    text = out.read_text()  # killed mid-write: three whole lines and half of the fourth
    cut = len("".join(text.splitlines(keepends=True)[:3]))
    out.write_text(text[: cut + 25])
    assert main([*args, "--no-progress"]) == 0
    assert "3 of 10" in capsys.readouterr().err
    _same(_lines(out), full)  # other batches: equal to float rounding

    out.write_text(out.read_text().splitlines(keepends=True)[0])
    assert main([*args, "--overwrite", "--no-progress"]) == 0  # starts afresh
    assert _lines(out) == full


def test_other_formats_are_never_overwritten_without_overwrite(model_dir, emodb_clips, tmp_path, capsys):
    out = tmp_path / "out.csv"
    out.write_text("keep me")
    args = ["predict", str(emodb_clips[0]), "--model", str(model_dir), "-o", str(out)]
    assert main(args) == 2 and out.read_text() == "keep me"
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert out.read_text().startswith("file,duration,label,")  # the format follows the suffix


def test_windows_give_the_records_of_predict(model_dir, clips):
    predictor = serval.load(model_dir)
    files = sorted(str(f) for f in clips.iterdir())
    windows = list(predict.predict_items(predictor, [Clip(f) for f in files], batch_size=2, window=4))
    assert [len(w) for w in windows] == [4, 4, 2]
    records = [r for w in windows for r in w]
    want = predictor.predict(files, batch_size=2)
    assert [r["duration"] for r in records] == [r["duration"] for r in want]
    _same(records, want)


def test_importing_the_io_modules_changes_nothing_and_predict_limits_the_cache():
    """No side effects at import: oneDNN's cache limit is set by `serval predict`, before its first model call."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    code = (
        "import os, serval.predict, serval.io.inputs, serval.io.decoder, serval.io.ray_pool, serval.evaluate, "
        "serval.pseudolabel; print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    code = "import os, serval.predict as p; p.limit_primitive_cache(); print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "8"


def test_clips_in_memory_give_the_records_of_their_files(model_dir, emodb_clips):
    predictor = serval.load(model_dir)
    files = [str(f) for f in emodb_clips[:2]]
    on_disk = [Clip(files[0]), Clip(files[1], 0.5, 1.5)]
    in_memory = [Clip("a", audio=load_audio(files[0])), Clip("b", 0.5, 1.5, audio=load_audio(files[1]))]
    in_memory.append(Clip("tiny", audio=np.zeros(800, np.float32)))  # 50 ms: too short, named
    want = [r for w in predict.predict_items(predictor, on_disk, batch_size=2) for r in w]
    got = [r for w in predict.predict_items(predictor, in_memory, batch_size=2) for r in w]
    assert [r["file"] for r in got] == ["a", "b", "tiny"] and got[1]["start"] == 0.5
    assert [r["duration"] for r in got[:2]] == [r["duration"] for r in want]
    _same([{**r, "file": w["file"]} for r, w in zip(got, want)], want)
    assert got[2]["error"].startswith("tiny: audio is 0.050 s, shorter than the minimum")
