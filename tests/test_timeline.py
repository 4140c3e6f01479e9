"""`serval timeline` on real clips joined with silence: outputs, speaker turns, refusal to overwrite."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import clips

from serval.audio import SAMPLE_RATE, load_audio
from serval.checkpoint import load_model, save_model
from serval.cli import main
from serval.inference import Predictor
from serval.model import SERConfig, SERModel
from serval.timeline import Turn, TurnsError, grid_timeline, read_turns, turns_timeline
from serval.windows import WindowSpec, split_span


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_model(SERModel(SERConfig.tiny()), path)
    return path


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor(load_model(model_dir), "cpu")


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """3 s silence, ~13 s of RAVDESS speech (two speakers' clips), 5 s silence, more speech; as FLAC."""
    a = [load_audio(p) for p in clips("ravdess", "Actor_01/03-01-0[35]-02-*.flac", n=4)]
    b = [load_audio(p) for p in clips("ravdess", "Actor_02/03-01-0[46]-02-*.flac", n=4)]
    rng = np.random.default_rng(0)
    silence = lambda s: rng.normal(0, 1e-4, int(s * SAMPLE_RATE)).astype(np.float32)  # noqa: E731
    wave = np.concatenate([silence(3), *a, silence(5), *b])
    path = tmp_path_factory.mktemp("audio") / "meeting.flac"
    sf.write(path, wave, SAMPLE_RATE)
    t_a = 3 + sum(len(x) for x in a) / SAMPLE_RATE
    return path, len(wave) / SAMPLE_RATE, t_a


def test_read_turns_rttm_and_csv(tmp_path):
    rttm = tmp_path / "turns.rttm"
    rttm.write_text(
        ";; pyannote output\n"
        "SPEAKER meeting 1 5.250 3.000 <NA> <NA> SPEAKER_01 <NA> <NA>\n"
        "SPKR-INFO meeting 1 <NA> <NA> <NA> unknown SPEAKER_01 <NA> <NA>\n"
        "SPEAKER meeting 1 0.500 4.000 <NA> <NA> SPEAKER_00 <NA> <NA>\n"
    )
    assert read_turns(rttm) == [Turn(0.5, 4.5, "SPEAKER_00"), Turn(5.25, 8.25, "SPEAKER_01")]
    with_header = tmp_path / "h.csv"
    with_header.write_text("speaker,start,end\nalice,1.0,2.5\nbob,3,4\n")
    assert read_turns(with_header) == [Turn(1.0, 2.5, "alice"), Turn(3.0, 4.0, "bob")]
    plain = tmp_path / "p.csv"
    plain.write_text("0,2,A\n2,3.5,B\n")
    assert [t.speaker for t in read_turns(plain)] == ["A", "B"]
    bad = tmp_path / "bad.csv"
    bad.write_text("start,end,speaker\n1.0,oops,A\n")
    with pytest.raises(TurnsError, match=r"bad\.csv:2: end 'oops' is not a number"):
        read_turns(bad)
    backwards = tmp_path / "back.csv"
    backwards.write_text("4,2,A\n")
    with pytest.raises(TurnsError, match=r"back\.csv:1: turn end 2 s is not after start 4 s"):
        read_turns(backwards)


def test_grid_timeline_with_vad(recording, predictor):
    path, duration, t_a = recording
    result = grid_timeline(path, predictor, WindowSpec(window=2.0, hop=2.0, vad=True))
    windows = result["windows"]
    # the regular 2 s grid, then the 0.7 s remainder gets a window aligned to end at the end
    assert [w["start"] for w in windows[:-1]] == [2.0 * i for i in range(len(windows) - 1)]
    assert duration % 2 > 0.5 and windows[-2]["end"] == 2.0 * (len(windows) - 1)
    assert windows[-1]["start"] == pytest.approx(duration - 2, abs=1e-3)
    assert windows[-1]["end"] == pytest.approx(duration, abs=1e-3)
    # the leading silence (0-3 s) and the gap (t_a .. t_a + 5) are left unscored
    assert windows[0]["label"] is None and "probabilities" not in windows[0]
    gap = [w for w in windows if t_a <= w["start"] and w["end"] <= t_a + 5]
    assert gap and all(w["label"] is None for w in gap)
    scored = [w for w in windows if w["label"]]
    assert len(scored) >= 5
    assert all(abs(sum(w["probabilities"].values()) - 1) < 1e-4 for w in scored)
    assert all(s["end"] - s["start"] <= 15 for s in result["segments"])
    assert sum(s["windows"] for s in result["segments"]) == len(scored)


@pytest.mark.slow
def test_turns_split_pool_and_summarise(recording, predictor):
    path, duration, t_a = recording
    long_turn = Turn(0.0, duration, "A")  # > 30 s: cut into two pieces and pooled
    assert duration > 30
    turns = [
        long_turn,
        Turn(3.0, t_a, "B"),
        Turn(t_a + 5, duration + 0.5, "B"),
        Turn(duration + 2, duration + 3, "C"),
    ]
    result = turns_timeline(path, predictor, turns, duration=duration)
    recs = result["turns"]
    assert [r["pieces"] for r in recs] == [2, 1, 1, 0]
    pieces = split_span(0.0, duration)
    probs, _ = predictor.predict_waveforms([load_audio(path, a, b) for a, b in pieces])
    expected = (probs * np.array([b - a for a, b in pieces])[:, None]).sum(0) / duration
    np.testing.assert_allclose(list(recs[0]["probabilities"].values()), expected, atol=1e-5)
    assert recs[2]["end"] == pytest.approx(duration, abs=1e-3) and recs[2]["clipped_from"] == duration + 0.5
    assert "after the end of the audio" in recs[3]["error"] and recs[3]["label"] is None
    speakers = result["speakers"]
    assert speakers["C"] == {"turns": 0, "failed_turns": 1, "duration": 0}
    b = speakers["B"]
    assert b["turns"] == 2 and b["duration"] == pytest.approx(
        recs[1]["end"] - recs[1]["start"] + recs[2]["end"] - recs[2]["start"], abs=1e-3
    )
    w = np.array([recs[1]["end"] - recs[1]["start"], recs[2]["end"] - recs[2]["start"]])
    mean = (np.array([list(recs[i]["probabilities"].values()) for i in (1, 2)]) * w[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(list(b["probabilities"].values()), mean, atol=1e-5)
    assert b["label"] == result["classes"][int(np.argmax(mean))]
    assert sum(b["label_seconds"].values()) == pytest.approx(b["duration"], abs=1e-3)


@pytest.mark.slow
def test_cli_writes_outputs_and_never_overwrites(recording, model_dir, tmp_path, capsys):
    path, duration, _ = recording
    prefix = tmp_path / "out" / "meeting"
    args = [
        "timeline",
        str(path),
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "-o",
        str(prefix),
        "--no-progress",
    ]
    assert main(args) == 0
    data = json.loads((tmp_path / "out" / "meeting.json").read_text())
    assert data["grid"] == {"window": 4.0, "hop": 2.0, "min_length": 0.5} and data[
        "duration"
    ] == pytest.approx(duration, abs=1e-3)
    rows = list(csv.DictReader(open(tmp_path / "out" / "meeting.csv")))
    assert len(rows) == len(data["windows"]) and set(data["classes"]) <= set(rows[0])
    assert float(rows[3]["start"]) == 6.0 and float(rows[3]["end"]) == 10.0
    segs = list(csv.DictReader(open(tmp_path / "out" / "meeting.segments.csv")))
    assert len(segs) == len(data["segments"]) >= 1
    png = (tmp_path / "out" / "meeting.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    before = (tmp_path / "out" / "meeting.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "--window", "2"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert (tmp_path / "out" / "meeting.json").read_bytes() == before
    assert main([*args, "--window", "2", "--hop", "2", "--formats", "json", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "meeting.json").read_text())["grid"]["window"] == 2.0


def test_cli_turns_and_errors(recording, model_dir, tmp_path, capsys):
    path, duration, t_a = recording
    turns = tmp_path / "turns.csv"
    turns.write_text(f"start,end,speaker\n3.0,{t_a:.3f},A\n{t_a + 5:.3f},{duration:.3f},B\n")
    prefix = tmp_path / "turns_out"
    assert (
        main(
            [
                "timeline",
                str(path),
                "--model",
                str(model_dir),
                "--device",
                "cpu",
                "--segments",
                str(turns),
                "-o",
                str(prefix),
                "--formats",
                "json,csv",
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "turns_out.json").read_text())
    assert [t["speaker"] for t in data["turns"]] == ["A", "B"] and set(data["speakers"]) == {"A", "B"}
    assert len(list(csv.DictReader(open(tmp_path / "turns_out.speakers.csv")))) == 2
    capsys.readouterr()
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00")
    assert main(["timeline", str(broken), "--model", str(model_dir)]) == 2
    assert str(broken) in capsys.readouterr().err
    assert (
        main(["timeline", str(path), "--model", str(model_dir), "--segments", str(tmp_path / "none.rttm")])
        == 2
    )
    assert "none.rttm" in capsys.readouterr().err
