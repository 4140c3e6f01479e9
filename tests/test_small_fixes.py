"""Issue 14's smaller points, each on real behaviour: timeline outputs and its progress bar, data prepare's
folder walking and empty-split warning, the mode of best/, pseudolabel after a teacher fails to load, the
typed /v1/timeline and /healthz answers, and the typed output of the MCP tool emotion_timeline."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import types

import numpy as np
import pytest
import soundfile as sf
from conftest import clips
from pydantic import TypeAdapter

import serval
from serval import windows
from serval.audio import load_audio
from serval.cli import main
from serval.model import SERConfig, SERModel
from serval.vocab import DIMENSIONS, EMOTIONS, SAMPLE_RATE


@pytest.fixture(scope="module")
def default_model():
    return serval.load("default", device="cpu")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ---------------------------------------------------------------------------- timeline


@pytest.mark.slow
def test_timeline_writes_its_default_formats(tmp_path, capsys):
    clip = clips("ravdess", n=1)[0]
    prefix = tmp_path / "out" / "talk"
    assert main(["timeline", str(clip), "-o", str(prefix), "--no-progress"]) == 0
    err = capsys.readouterr().err
    for suffix in (".json", ".csv", ".segments.csv", ".png"):
        assert f"wrote {prefix}{suffix}" in err
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert result["windows"] and result["segments"][0]["label"] in EMOTIONS
    assert prefix.with_name("talk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run refuses to replace them, naming them, unless --overwrite
    assert main(["timeline", str(clip), "-o", str(prefix), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


class ConstantPredictor:
    classes, dimensions, name = EMOTIONS, DIMENSIONS, "constant"

    def predict_waveforms(self, waves, batch_size=16):
        return np.full((len(waves), 7), 1 / 7, np.float32), np.full((len(waves), 3), 0.5, np.float32)


@pytest.mark.parametrize("seconds", [3.24, 61.04])  # totals that rounding to 0.1 s put below the audio
def test_timeline_progress_bar_ends_at_its_total(tmp_path, monkeypatch, seconds):
    bars = []
    real = windows.progress_bar
    monkeypatch.setattr(windows, "progress_bar", lambda *a, **k: bars.append(real(*a, **k)) or bars[-1])
    wave = load_audio(clips("ravdess", n=1)[0])
    wave = np.tile(wave, int(seconds * SAMPLE_RATE) // len(wave) + 1)[: round(seconds * SAMPLE_RATE)]
    path = tmp_path / "long.wav"
    sf.write(path, wave, SAMPLE_RATE)
    for source in (wave, str(path)):
        list(windows.sliding_windows(source, ConstantPredictor(), progress=True))
        bar = bars.pop()
        assert bar.n <= bar.total, (bar.n, bar.total)
        assert bar.n == pytest.approx(seconds, abs=1e-3) and bar.total == pytest.approx(seconds, abs=1e-3)


# ---------------------------------------------------------------------------- data prepare


def test_data_prepare_follows_symlinked_folders(tmp_path, data_dir):
    from serval.corpora import prepare_corpus

    root = tmp_path / "ravdess"
    root.mkdir()
    (root / "Actor_01").symlink_to(data_dir / "ravdess" / "Actor_01", target_is_directory=True)
    (root / "more").mkdir()
    (root / "more" / "Actor_02").symlink_to(data_dir / "ravdess" / "Actor_02", target_is_directory=True)
    (root / "more" / "loop").symlink_to(root, target_is_directory=True)  # a cycle is walked once
    rows, dropped = prepare_corpus("ravdess", root)
    assert len(rows) + len(dropped) == 120  # 60 clips of each actor, none twice
    assert len({r.path for r in rows}) == len(rows)
    assert {r.speaker for r in rows} == {"ravdess-01", "ravdess-02"}
    assert all("/Actor_01/" in r.path or "/more/Actor_02/" in r.path for r in rows)


def test_data_prepare_warns_when_dev_and_test_are_empty(tmp_path, data_dir, capsys):
    root = tmp_path / "ravdess"
    root.mkdir()
    (root / "Actor_01").symlink_to(data_dir / "ravdess" / "Actor_01", target_is_directory=True)
    out = tmp_path / "one.csv"
    assert main(["data", "prepare", "ravdess", str(root), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: the dev and test splits are empty" in err and "1 speakers" in err, err

    from serval.corpora import prepare_corpus, split_warnings

    rows, _ = prepare_corpus("ravdess", data_dir / "ravdess")  # 20 speakers: both splits get some
    assert {r.split for r in rows} == {"train", "dev", "test"} and split_warnings(rows) == []
    for r in rows:
        r.split = "train" if r.split == "test" else r.split
    warnings = split_warnings(rows)
    assert len(warnings) == 1 and "the test split is empty" in warnings[0], warnings


# ---------------------------------------------------------------------------- best/ folders


def test_best_and_checkpoint_folders_follow_the_umask(tmp_path, umask_022):
    from serval.train.config import TrainConfig
    from serval.train.folder import temp_dir
    from serval.train.select import _write_best

    made = temp_dir(tmp_path, ".tmp-x-")
    assert stat.S_IMODE(made.stat().st_mode) == 0o755 and made.name.startswith(".tmp-x-")
    assert temp_dir(tmp_path, ".tmp-x-") != made
    run = types.SimpleNamespace(out=tmp_path / "run")
    run.out.mkdir()
    best = _write_best(run, TrainConfig(), "single", [], [SERModel(SERConfig.tiny())])
    assert best == run.out / "best" and (best / "model.safetensors").is_file()
    assert stat.S_IMODE(best.stat().st_mode) == 0o755


# ---------------------------------------------------------------------------- pseudolabel


@pytest.mark.slow
def test_pseudolabel_after_a_teacher_failed_to_load(tmp_path, capsys):
    from serval.pseudolabel import PseudoLabelConfig, output_paths, pseudolabel

    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", load_audio(clips("ravdess", n=1)[0]), SAMPLE_RATE)
    out = tmp_path / "labels.csv"
    cfg = PseudoLabelConfig(min_utterance=1.0, max_utterance=5.0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pseudolabel([str(audio)], [str(tmp_path / "nowhere")], out, cfg, device="cpu")
    assert not output_paths(out)["progress"].exists()
    # the corrected run is not refused: it labels the file and finishes
    counts = pseudolabel([str(audio)], ["default"], out, cfg, device="cpu", log=lambda m: None)
    assert counts["sources"] == 1 and counts["failed"] == 0 and out.is_file()
    assert not output_paths(out)["progress"].exists()


def test_a_progress_log_that_finished_nothing_gives_way(tmp_path):
    from serval.pseudolabel import Progress

    log = tmp_path / "x.progress.jsonl"
    Progress(log, {"teachers": ["old"]})
    state = Progress(log, {"teachers": ["new"]})
    assert json.loads(log.read_text().splitlines()[0]) == {"settings": {"teachers": ["new"]}}
    state.add({"key": "k", "path": "p", "error": "boom"})
    with pytest.raises(ValueError, match="other settings"):  # a log with work in it is still kept
        Progress(log, {"teachers": ["newer"]})


# ---------------------------------------------------------------------------- schemas


def test_timeline_and_health_answers_are_typed(default_model):
    from fastapi.testclient import TestClient

    from serval.serve.app import create_app
    from serval.serve.records import Timeline
    from serval.serve.schemas import Health

    with TestClient(create_app(default_model)) as client:
        doc = client.get("/openapi.json").json()
        health = client.get("/healthz")
        clip = clips("ravdess", n=1)[0]
        answer = client.post(
            "/v1/timeline?vad=true", files={"file": (clip.name, clip.read_bytes(), "audio/flac")}
        )
    schemas = doc["components"]["schemas"]

    def schema_of(path, method, code):
        ref = doc["paths"][path][method]["responses"][code]["content"]["application/json"]["schema"]["$ref"]
        return schemas[ref.rsplit("/", 1)[1]]

    assert set(schema_of("/healthz", "get", "200")["properties"]) == {"status", "queue"}
    assert schema_of("/healthz", "get", "503") == schema_of("/healthz", "get", "200")
    timeline = schema_of("/v1/timeline", "post", "200")
    assert {"windows", "segments", "grid", "duration", "classes"} <= set(timeline["properties"])
    assert health.status_code == 200 and Health.model_validate(health.json()).status == "ok"
    body = answer.json()
    assert answer.status_code == 200 and body["windows"] and "speech" in body["windows"][0]
    # the real answer fits the published type with nothing left over
    adapter = TypeAdapter(Timeline)
    assert adapter.dump_python(adapter.validate_python(body), mode="json") == body


def test_mcp_timeline_output_schema_is_typed():
    from serval.serve.mcp import build_server

    tools = {t.name: t for t in asyncio.run(build_server(ConstantPredictor()).list_tools())}
    out = tools["emotion_timeline"].output_schema
    assert set(out["required"]) >= {"segments", "grid", "classes", "file"}
    assert "windows" in out["properties"] and "windows" not in out["required"]  # include_windows=false
    segment = out["$defs"]["TimelineSegment"]["properties"]
    assert segment["label"]["type"] == "string" and segment["probabilities"]["type"] == "object"
