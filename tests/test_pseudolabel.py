"""The teacher-agreement pseudo-labelling pipeline on real clips with a known ground-truth timeline."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REPO, clips

from serval.audio import SAMPLE_RATE, load_audio
from serval.checkpoint import load_model, save_model
from serval.cli import main
from serval.clip import Clip
from serval.inference import Predictor
from serval.manifest import read_manifest
from serval.model import DIMENSIONS, EMOTIONS, SERConfig, SERModel
from serval.pseudolabel import (
    Progress,
    PseudoLabelConfig,
    agree,
    class_name,
    decide,
    label_source,
    output_paths,
    plan_utterances,
    pseudolabel,
)


class LoudnessTeacher:
    """A deterministic rule-based teacher: loud speech -> `loud`, quiet speech -> `quiet`, silence -> neutral."""

    classes, dimensions = EMOTIONS, DIMENSIONS

    def __init__(self, name: str, loud: str = "angry", quiet: str = "sad", statistic=None):
        self.name, self.loud, self.quiet = name, loud, quiet
        self.statistic = statistic or (lambda w: float(np.sqrt(np.mean(w**2))))

    def predict_waveforms(self, waves, batch_size=16):
        probs = np.full((len(waves), 7), 0.2 / 6, np.float32)
        for i, w in enumerate(waves):
            level = self.statistic(np.asarray(w, np.float64))
            label = self.loud if level >= 0.04 else self.quiet if level >= 0.003 else "neutral"
            probs[i, EMOTIONS.index(label)] = 0.8
        return probs, np.full((len(waves), 3), 0.5, np.float32)


def speech_part(path, rms: float) -> np.ndarray:
    """A clip without its leading/trailing pause (cut by energy), scaled to a given RMS level."""
    x = load_audio(path)
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    on = np.flatnonzero(np.sqrt((frames**2).mean(1)) > np.sqrt((frames**2).mean(1)).max() / 20)
    x = x[on[0] * 320 : (on[-1] + 1) * 320]
    return (x * rms / np.sqrt(np.mean(x**2))).astype(np.float32)


def silence(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1e-4, int(seconds * SAMPLE_RATE)).astype(np.float32)


@pytest.fixture(scope="module")
def timeline_file(tmp_path_factory):
    """3 s silence, >= 8 s of loud angry speech, 2 s silence, >= 8 s of quiet sad speech: (path, regions)."""
    angry = [speech_part(p, 0.15) for p in clips("ravdess", "Actor_0[1-4]/03-01-05-02-*.flac", n=6)]
    sad = [speech_part(p, 0.015) for p in clips("ravdess", "Actor_0[1-4]/03-01-04-02-*.flac", n=6)]
    loud = np.concatenate(angry)[: 8 * SAMPLE_RATE]
    quiet = np.concatenate(sad)[: 8 * SAMPLE_RATE]
    assert len(loud) == len(quiet) == 8 * SAMPLE_RATE
    wave = np.concatenate([silence(3), loud, silence(2, 1), quiet])
    path = tmp_path_factory.mktemp("pl") / "known.wav"
    sf.write(path, wave, SAMPLE_RATE, subtype="FLOAT")
    return path, {"angry": (3.0, 11.0), "sad": (13.0, 21.0)}


@pytest.fixture(scope="module")
def teachers_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_model(SERModel(SERConfig.tiny()), root / f"t{seed}")
    return root


def recordings(folder, n: int, seconds: float = 12.0):
    """n recordings of real RAVDESS speech, `seconds` long each, as FLAC files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = [load_audio(p) for p in clips("ravdess", "Actor_05/*.flac", n=2 * n + 2)]
    for i in range(n):
        x = np.concatenate(pool[i:] + pool[:i])[: int(seconds * SAMPLE_RATE)]
        sf.write(folder / f"rec{i:02d}.flac", x, SAMPLE_RATE)
    return sorted(folder.glob("*.flac"))


def test_agreement_rule():
    assert agree(["angry", "angry"]) == "angry"
    assert agree(["angry", "sad"]) == "neutral"
    assert agree(["neutral", "neutral"]) == "neutral"
    assert agree(["happy", "happy", "fearful"]) == "neutral"
    assert agree(["surprised", None]) == "neutral"  # a teacher without an answer never agrees
    assert agree(["other", "other"]) == "neutral"
    assert class_name("生气/angry") == "angry" and class_name("Disgust") == "disgusted"


def test_plan_utterances():
    assert plan_utterances(0, 8) == []
    assert plan_utterances(2, 27) == [(2, 27)]
    assert plan_utterances(0, 70) == [(0, 23.333), (23.333, 46.667), (46.667, 70)]
    assert all(10 <= b - a <= 30 for a, b in plan_utterances(0, 61))
    # equal pieces would be too short: 30 s pieces, the short rest dropped
    assert plan_utterances(0, 31, min_len=20, max_len=30) == [(0, 30)]


def test_selection_rule():
    cfg = PseudoLabelConfig(min_emotional=2)
    kept = decide(["neutral", "sad", "angry", "sad"], [0, 0.6, 0.9, 0.5], cfg)
    assert kept["kept"] and kept["label"] == "sad" and kept["emotional"] == 3
    assert "kept: 3 emotional" in kept["reason"]
    tie = decide(["sad", "angry", "angry", "sad"], [0.5, 0.9, 0.8, 0.5], cfg)
    assert tie["label"] == "angry"  # tie broken by the teachers' confidence
    few = decide(["neutral", "happy", "neutral"], [0, 0.7, 0], cfg)
    assert not few["kept"] and few["reason"] == "dropped: 1 emotional window(s) (happy 1) < 2"
    calm = decide(["neutral"] * 5, [0] * 5, cfg)
    assert calm["kept"] and calm["label"] == "neutral"
    assert not decide(["neutral"] * 5, [0] * 5, PseudoLabelConfig(keep_neutral=False))["kept"]


def test_rule_teachers_on_known_timeline(timeline_file):
    path, regions = timeline_file
    cfg = PseudoLabelConfig(min_emotional=2)
    a = LoudnessTeacher("rms")
    b = LoudnessTeacher("mean-abs", statistic=lambda w: float(np.mean(np.abs(w)) * 1.4))
    out = label_source(Clip(str(path)), {"A": a, "B": b}, cfg)
    (utt,) = out["utterances"]  # 21 s: one utterance
    assert (utt["start"], utt["end"]) == (0.0, 21.0)
    windows = utt["windows"]
    # the 4 s / 2 s grid, and a last window aligned to end at 21 s
    assert [(w["start"], w["end"]) for w in windows] == [(2.0 * i, 2.0 * i + 4) for i in range(9)] + [
        (17.0, 21.0)
    ]
    inside = lambda w, r: r[0] <= w["start"] and w["end"] <= r[1]  # noqa: E731
    for w in windows:
        for emotion, region in regions.items():
            if inside(w, region):
                assert w["label"] == emotion and w["teachers"] == {"A": emotion, "B": emotion}
    assert sum(inside(w, regions["angry"]) for w in windows) == 2
    assert sum(inside(w, regions["sad"]) for w in windows) == 3
    assert utt["kept"] and utt["label"] in ("angry", "sad") and utt["emotional"] >= 5
    # a teacher hearing loud speech as happy: those windows lose their emotion, the sad ones keep theirs
    c = LoudnessTeacher("contrarian", loud="happy")
    mixed = label_source(Clip(str(path)), {"A": a, "C": c}, cfg)["utterances"][0]
    for w in mixed["windows"]:
        if inside(w, regions["angry"]):
            assert w["teachers"] == {"A": "angry", "C": "happy"} and w["label"] == "neutral"
        if inside(w, regions["sad"]):
            assert w["label"] == "sad"
    assert mixed["label"] == "sad" and "majority sad" in mixed["reason"]


@pytest.mark.slow
def test_seeded_models_agree_as_their_own_predictions_say(timeline_file, teachers_dir):
    path, _ = timeline_file
    models = {f"t{s}": Predictor(load_model(teachers_dir / f"t{s}"), "cpu") for s in (1, 2)}
    out = label_source(Clip(str(path)), models, PseudoLabelConfig(min_utterance=10))
    windows = out["utterances"][0]["windows"]
    wave = load_audio(path)
    spans = [wave[int(w["start"] * SAMPLE_RATE) : int(w["end"] * SAMPLE_RATE)] for w in windows]
    own = {k: [EMOTIONS[i] for i in m.predict_waveforms(spans)[0].argmax(1)] for k, m in models.items()}
    for i, w in enumerate(windows):
        assert w["teachers"] == {"t1": own["t1"][i], "t2": own["t2"][i]}
        expected = own["t1"][i] if own["t1"][i] == own["t2"][i] and own["t1"][i] != "neutral" else "neutral"
        assert w["label"] == expected


@pytest.mark.slow
def test_cli_run_reasons_failures_and_second_pass(tmp_path, teachers_dir, capsys):
    files = recordings(tmp_path / "audio", 3)
    sf.write(tmp_path / "audio" / "short.flac", load_audio(files[0])[: 4 * SAMPLE_RATE], SAMPLE_RATE)
    (tmp_path / "audio" / "broken.flac").write_bytes(b"fLaC\x00\x00\x00")
    out = tmp_path / "pl" / "labels.csv"
    t1, t2 = str(teachers_dir / "t1"), str(teachers_dir / "t2")
    args = [
        "pseudolabel",
        str(tmp_path / "audio"),
        "--teacher",
        t1,
        "--teacher",
        t2,
        "-o",
        str(out),
        "--min-emotional",
        "1",
        "--no-progress",
    ]
    assert main(args) == 1  # one file failed, the others were labelled
    err = capsys.readouterr().err
    assert "broken.flac" in err and "of 3 utterances kept from 5 recordings (1 failed)" in err
    paths = output_paths(out)
    assert not paths["progress"].exists()
    decisions = [json.loads(line) for line in paths["decisions"].read_text().splitlines()]
    by_file = {os.path.basename(d["path"]): d for d in decisions}
    assert (
        by_file["broken.flac"]["reason"].startswith("error: ")
        and "broken.flac" in by_file["broken.flac"]["reason"]
    )
    assert by_file["short.flac"]["reason"] == "dropped: 4.00 s is shorter than 10 s"
    assert all(by_file[f.name]["reason"].startswith(("kept", "dropped")) for f in files)
    rows = read_manifest(out)
    assert {os.path.basename(r.path) for r in rows} <= {f.name for f in files}
    assert all(r.label in EMOTIONS and (r.start, r.end) == (0.0, 12.0) for r in rows)
    windows = [json.loads(line) for line in paths["windows"].read_text().splitlines()]
    assert len(windows) == 5 * 3 and set(windows[0]["teachers"]) == {t1, t2}
    # a second run never replaces what the first wrote
    before = out.read_bytes()
    assert main(args) == 2
    assert "already exist" in capsys.readouterr().err and out.read_bytes() == before
    # the second pass alone, over the first pass's manifest
    second = tmp_path / "pl" / "second.jsonl"
    assert main(["pseudolabel", str(out), "--relabel", t1, "-o", str(second), "--no-progress"]) == 0
    relabelled = read_manifest(second)
    assert len(relabelled) == len(rows)
    model = Predictor(load_model(t1), "cpu")
    probs, scores = model.predict_waveforms([load_audio(r.path, r.start, r.end) for r in rows])
    for r, p, s in zip(relabelled, probs, scores):
        assert r.label == EMOTIONS[int(np.argmax(p))] and np.isfinite(s[0])
        # the tiny teacher never trained its dimensions: its scores become no dimensional labels
        assert model.trained_dimensions == () and (r.arousal, r.valence, r.dominance) == (None, None, None)
        assert r.extra["relabel_model"] == t1 and r.extra["first_pass_label"] in EMOTIONS


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_output(tmp_path, teachers_dir):
    audio = tmp_path / "audio"
    recordings(audio, 6, seconds=10.0)
    t1, t2 = str(teachers_dir / "t1"), str(teachers_dir / "t2")

    def command(out):
        return [
            sys.executable,
            "-m",
            "serval",
            "pseudolabel",
            str(audio),
            "--teacher",
            t1,
            "--teacher",
            t2,
            "-o",
            str(out),
            "--min-emotional",
            "1",
            "--device",
            "cpu",
            "--no-progress",
        ]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "run" / "labels.jsonl"
    progress = output_paths(out)["progress"]
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and progress.read_text().count("\n") >= 2:  # settings + one recording
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()
    finished = progress.read_text().count("\n") - 1
    assert 1 <= finished < 6

    rerun = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {finished} of 6 recordings already labelled" in rerun.stderr
    assert not progress.exists()
    # an uninterrupted run, in a process of its own like the others
    reference = tmp_path / "ref" / "labels.jsonl"
    subprocess.run(command(reference), env=env, capture_output=True, timeout=300, check=True)
    for kind in ("manifest", "windows", "decisions"):
        assert output_paths(out)[kind].read_bytes() == output_paths(reference)[kind].read_bytes(), kind
    assert len(read_manifest(out)) == 6


@pytest.mark.slow
def test_torn_progress_line_is_dropped_and_settings_must_match(tmp_path, teachers_dir):
    files = recordings(tmp_path / "audio", 2, seconds=10.0)
    t1, t2 = str(teachers_dir / "t1"), str(teachers_dir / "t2")
    cfg = PseudoLabelConfig(min_emotional=1)
    reference = tmp_path / "ref.csv"
    pseudolabel([str(tmp_path / "audio")], [t1, t2], reference, cfg, device="cpu", log=lambda m: None)
    # an interrupted run: the first recording done, the second cut off in the middle of its line
    out = tmp_path / "run.csv"
    progress = output_paths(out)["progress"]
    settings = {"teachers": [t1, t2], "relabel": None, "config": dataclasses.asdict(cfg)}
    models = {t: Predictor(load_model(t), "cpu") for t in (t1, t2)}
    Progress(progress, settings).add(label_source(Clip(str(files[0])), models, cfg))
    with open(progress, "a") as f:
        f.write('{"key": "' + str(files[1]) + '||", "utterances": [{"sta')
    with pytest.raises(ValueError, match="other settings"):
        pseudolabel([str(tmp_path / "audio")], [t2, t1], out, cfg, device="cpu")
    messages = []
    pseudolabel([str(tmp_path / "audio")], [t1, t2], out, cfg, device="cpu", log=messages.append)
    assert messages == ["resuming: 1 of 2 recordings already labelled"]
    for kind in ("manifest", "windows", "decisions"):
        assert output_paths(out)[kind].read_bytes() == output_paths(reference)[kind].read_bytes(), kind


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
