"""`serval timeline` on real clips joined with silence: outputs, speaker turns, refusal to overwrite."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import NULL_SCORES, clips

from serval.audio import SAMPLE_RATE, load_audio
from serval.checkpoint import load_model, save_model
from serval.cli import main
from serval.inference import Predictor, load
from serval.model import SERConfig, SERModel
from serval.timeline import figure, grid_timeline, outputs, plot, turns_timeline
from serval.turns import Turn, TurnsError, read_turns
from serval.vocab import DIMENSIONS, EMOTIONS
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
    # the leading silence (0-3 s) and the gap (t_a .. t_a + 5) are left unscored, and marked so
    assert windows[0]["label"] is None and "probabilities" not in windows[0] and windows[0]["no_speech"]
    gap = [w for w in windows if t_a <= w["start"] and w["end"] <= t_a + 5]
    assert gap and all(w["label"] is None and w["no_speech"] for w in gap)
    assert all(w["no_speech"] == (w["label"] is None) for w in windows)
    assert all(
        0 <= w["speech_fraction"] <= 1 and round(w["speech_fraction"], 3) == w["speech_fraction"]
        for w in windows
    )
    assert (
        max(w["speech_fraction"] for w in gap)
        < 0.05
        < min(w["speech_fraction"] for w in windows if w["label"])
    )
    # the unscored spans: the leading silence (with the first clip's own lead-in) and the gap
    spans = [(u["start"], u["end"]) for u in result["unscored"]]
    assert spans[0][0] == 0.0 and 2.0 <= spans[0][1] <= 4.0
    assert any(t_a - 2 <= a <= gap[0]["start"] and gap[-1]["end"] <= b <= t_a + 7 for a, b in spans)
    for w in windows:  # a window lies in an unscored span exactly when it was not scored
        assert w["no_speech"] == any(a <= w["start"] and w["end"] <= b for a, b in spans)
    scored = [w for w in windows if w["label"]]
    assert len(scored) >= 5
    assert all(abs(sum(w["probabilities"].values()) - 1) < 1e-4 for w in scored)
    assert all(s["end"] - s["start"] <= 15 for s in result["segments"])
    assert sum(s["windows"] for s in result["segments"]) == len(scored)


def test_vad_off_has_no_speech_fields(recording, predictor):
    path, _, _ = recording
    result = grid_timeline(path, predictor, WindowSpec(window=4.0, hop=2.0))
    assert result["vad"] is None and result["unscored"] == []
    assert all("speech_fraction" not in w and "no_speech" not in w and w["label"] for w in result["windows"])


@pytest.mark.slow
def test_cli_marks_unscored_spans(recording, model_dir, tmp_path):
    path, duration, t_a = recording
    prefix = tmp_path / "vad"
    args = ["timeline", str(path), "--model", str(model_dir), "--device", "cpu", "--vad", "-o", str(prefix)]
    assert main([*args, "--window", "2", "--hop", "1", "--no-progress"]) == 0
    data = json.loads((tmp_path / "vad.json").read_text())
    assert data["vad"] == {"threshold": WindowSpec.vad_threshold, "min_speech": WindowSpec.min_speech}
    unscored = [(u["start"], u["end"]) for u in data["unscored"]]
    # windows 0-2 and 1-3 are silent; each stands for the timeline up to the middle of its overlaps
    assert unscored[0][0] == 0.0 and 2.5 <= unscored[0][1] <= 4.5
    assert any(a <= t_a + 1 and t_a + 4 <= b for a, b in unscored)  # the 5 s gap
    rows = list(csv.DictReader(open(tmp_path / "vad.csv")))
    assert list(rows[0])[:5] == ["start", "end", "speech_fraction", "no_speech", "label"]
    assert [r["no_speech"] for r in rows] == ["true" if w["no_speech"] else "false" for w in data["windows"]]
    for r, w in zip(rows, data["windows"]):
        assert (r["label"] == "" and r["happy"] == "") == (r["no_speech"] == "true")
        assert float(r["speech_fraction"]) == pytest.approx(w["speech_fraction"], abs=1e-9)
    assert {r["no_speech"] for r in rows} == {"true", "false"}
    assert (tmp_path / "vad.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the PNG's figure: each unscored span shaded on both axes and labelled "no speech"
    fig = figure(data)
    axes = fig.axes
    for ax in axes:
        shaded = [p for p in ax.patches if p.get_gid() == "no-speech"]
        extents = [(round(p.get_x(), 3), round(p.get_x() + p.get_width(), 3)) for p in shaded]
        assert extents == unscored
    labels = [t for t in axes[0].texts if t.get_gid() == "no-speech-label"]
    assert {t.get_text() for t in labels} == {"no speech"}
    labelled = [t.get_position()[0] for t in labels]
    assert all(any(a < x < b for x in labelled) for a, b in unscored if b - a >= 2)  # the wide ones
    assert "no speech" in [t.get_text() for t in axes[0].get_legend().get_texts()]
    # and in pixels: the middle of the gap is grey where the same figure without the marks is white
    mid = next((a + b) / 2 for a, b in unscored if a <= t_a + 1 and t_a + 4 <= b)
    assert _pixel(fig, mid) < 245 and _pixel(figure({**data, "unscored": []}), mid) > 250


def _pixel(fig, t: float) -> float:
    """Mean brightness of a small box of the top axis at time `t`, a third of the way up (below the curves)."""
    fig.canvas.draw()
    ax = fig.axes[0]
    x, y = ax.transData.transform((t, 0.02))
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    row = image.shape[0] - int(y) - 10
    return float(image[row - 5 : row + 5, int(x) - 5 : int(x) + 5].mean())


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


@pytest.mark.slow
def test_timeline_reports_and_plots_only_trained_outputs(
    trained_dims_models, one_actor_talk, tmp_path, monkeypatch
):
    from matplotlib.figure import Figure

    spec = WindowSpec(window=4.0, hop=2.0)
    none, arousal = (
        load(trained_dims_models[()], device="cpu"),
        load(trained_dims_models[("arousal",)], device="cpu"),
    )
    a, b = grid_timeline(one_actor_talk, none, spec), grid_timeline(one_actor_talk, arousal, spec)
    assert a["trained_dimensions"] == [] and b["trained_dimensions"] == ["arousal"]
    assert a["windows"] and a["segments"]
    for item in a["windows"] + a["segments"]:
        assert item["scores"] == NULL_SCORES
    for item in b["windows"] + b["segments"]:
        assert isinstance(item["scores"]["arousal"], float)
        assert item["scores"]["valence"] is None and item["scores"]["dominance"] is None
    csv_rows = outputs(b, str(tmp_path / "b"), ["csv"])[str(tmp_path / "b.csv")].splitlines()
    header = csv_rows[0].split(",")
    first = csv_rows[1].split(",")
    assert first[header.index("arousal")] != "" and first[header.index("valence")] == ""
    # speaker summaries: the mean of a trained score, null for the others
    turns = [Turn(0.0, 5.0, "A"), Turn(5.0, 10.0, "B"), Turn(10.0, 12.0, "A")]
    t = turns_timeline(one_actor_talk, arousal, turns)
    for summary in t["speakers"].values():
        assert isinstance(summary["scores"]["arousal"], float) and summary["scores"]["valence"] is None
    assert all(
        s["scores"] == NULL_SCORES for s in turns_timeline(one_actor_talk, none, turns)["speakers"].values()
    )

    # the plot: no dimension panel when none is trained, one line per trained dimension otherwise
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kw: figures.append(self))
    plot(a, tmp_path / "a.png")
    plot(b, tmp_path / "b.png")
    plot(
        grid_timeline(one_actor_talk, load(trained_dims_models[DIMENSIONS], device="cpu"), spec),
        tmp_path / "c.png",
    )
    labels = [[[line.get_label() for line in ax.get_lines()] for ax in fig.axes] for fig in figures]
    classes = list(none.classes)
    assert labels == [[classes], [classes, ["arousal"]], [classes, list(DIMENSIONS)]]
