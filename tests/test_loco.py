"""Leave-one-corpus-out (benchmarks/loco.py, loco_folds.py): folds that never see their corpus, the scores."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loco  # noqa: E402
from conftest import DATA  # noqa: E402
from loco import (  # noqa: E402
    AUGMENTED,
    COLUMNS,
    LAYERS,
    LOUDNESS_DBFS,
    PITCH_SHIFTED,
    WIDTH,
    ClipStats,
    Head,
    copies_config,
    corpus_scores,
    loudness_normalised,
    mixtures,
    run_folds,
    split_key,
    without_speaker_subspace,
)
from loco_folds import fold_manifests  # noqa: E402

from serval.audio import load_audio  # noqa: E402
from serval.clip import Clip  # noqa: E402
from serval.manifest import read_manifest, write_manifest  # noqa: E402


def synthetic(n_per: int = 30, seed: int = 0) -> tuple[list[Clip], np.ndarray]:
    """Three corpora of two speakers; the class shows in every corpus's stats, the corpus as an offset."""
    rng = np.random.default_rng(seed)
    rows, stats = [], []
    classes = {"a": ["happy", "sad", "angry"], "b": ["happy", "sad"], "c": ["sad", "angry", "neutral"]}
    for k, (corpus, labels) in enumerate(classes.items()):
        for i in range(n_per):
            label = labels[i % len(labels)]
            vec = rng.normal(size=3 * LAYERS * WIDTH).astype(np.float32) + 0.05 * k
            vec[::7] += 3 * ["happy", "sad", "angry", "neutral"].index(label)
            stats.append(vec)
            rows.append(
                Clip(path=f"{corpus}{i}.flac", label=label, corpus=corpus, speaker=f"{corpus}-{i % 2}")
            )
    return rows, np.stack(stats)


def test_a_fold_never_trains_on_its_corpus(monkeypatch):
    rows, stats = synthetic()
    fitted = []
    real_fit = loco.fit_classes

    def spy(head, x, labels, corpora):
        fitted.append(set(corpora))
        return real_fit(head, x, labels, corpora)

    monkeypatch.setattr(loco, "fit_classes", spy)
    heads = (Head("probe", columns="raw"), Head("balanced", corpus_balance=0.5))
    folds = run_folds(rows, {"whisper": stats}, heads, bootstrap=50, log=lambda _: None)
    assert (
        list(folds) == ["a", "b", "c"] and fitted == [{"b", "c"}, {"a", "c"}, {"a", "b"}] * 2
    )  # per head, every fold
    for corpus, cell in folds.items():
        own = sorted({r.label for r in rows if r.corpus == corpus})
        for s in cell.values():
            assert sorted(s["recall"]) == own and s["n"] == 30  # scored over the corpus's own classes
            assert 0.0 <= s["ci"][0] <= s["uar"] <= s["ci"][1] <= 1.0
    assert folds["b"]["probe"]["uar"] > 0.9  # happy and sad are learnt from corpora a and c


def test_a_language_balanced_head_evens_out_languages_not_corpora(monkeypatch):
    rows, stats = synthetic()
    for r in rows:
        r.language = "de" if r.corpus == "c" else "en"
    seen = []
    real_fit = loco.fit_classes
    monkeypatch.setattr(loco, "fit_classes", lambda h, x, y, g: seen.append(list(g)) or real_fit(h, x, y, g))
    run_folds(rows, {"whisper": stats}, [Head("lang", corpus_balance=1.0, balance_by="language")], 0, print)
    assert seen[0] == ["en"] * 30 + ["de"] * 30  # the fold of corpus a: b (English) and c (German)


def test_session_folds_centre_each_corpus_and_each_speaker_and_are_kept(tmp_path, monkeypatch):
    from serval.session import centre

    rows, stats = synthetic()
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=6)
    mine = rows[:6]  # corpus a, speakers a-0 and a-1 alternating
    parts = loco.sessions(probs, mine)
    assert np.allclose(parts[" (session: each corpus)"], centre(probs))
    for i in (0, 1):
        assert np.allclose(parts[" (session: each speaker)"][i::2], centre(probs[i::2]))
    folds = loco.session_folds(rows, {"whisper": stats, "gain-invariant": stats}, 0, tmp_path)
    assert set(folds["a"]) == {h.name + k for h in loco.SESSION_HEADS for k in ("", *loco.SESSIONS)}
    monkeypatch.setattr(loco, "run_folds", lambda *a, **k: pytest.fail("the session folds were fitted again"))
    assert loco.session_folds(rows, {"whisper": stats, "gain-invariant": stats}, 0, tmp_path) == folds


def test_corpus_scores_take_the_argmax_over_the_corpus_classes():
    probs = np.array([[0.1, 0.5, 0.4], [0.6, 0.1, 0.3], [0.2, 0.3, 0.5]])  # columns: angry, happy, sad
    s = corpus_scores(["sad", "sad", "happy"], probs, ["angry", "happy", "sad"], bootstrap=0)
    # angry is not among the gold labels, so row 1 is called sad (0.3 > 0.1), not angry (0.6)
    assert s["classes"] == ["happy", "sad"] and s["recall"] == {"happy": 0.0, "sad": 0.5}
    assert s["uar"] == pytest.approx(0.25) and s["top"] == ["sad", 2 / 3] and s["ci"] is None


def test_head_features_pick_layers_and_standardise_per_speaker():
    rows, stats = synthetic(n_per=6)
    speakers = [r.speaker for r in rows]
    top = Head("top", layers=(6,)).features(stats, speakers)
    normed = stats[:, COLUMNS["normed"]].reshape(len(stats), 2, LAYERS, WIDTH)
    assert np.array_equal(top, normed[:, :, 6].reshape(len(stats), -1))
    both = Head("all", columns="all").features(stats, speakers)
    means = Head("normed means", columns="normed means").features(stats, speakers)
    assert np.array_equal(both, stats) and np.array_equal(means, normed[:, 0].reshape(len(stats), -1))
    utt = Head("per utterance", per_utterance=True).features(stats, speakers).reshape(len(stats), -1, WIDTH)
    assert utt.shape[1] == 2 * LAYERS and np.allclose(utt.mean(-1), 0, atol=1e-4)  # single-clip: no speaker
    assert np.allclose(utt.std(-1), 1, atol=1e-3)
    per = Head("per speaker", per_speaker=True).features(stats, speakers)
    for s in set(speakers):
        mine = per[[i for i, v in enumerate(speakers) if v == s]]
        assert np.allclose(mine.mean(0), 0, atol=1e-4) and np.allclose(mine.std(0), 1, atol=1e-2)


def test_speaker_subspace_removes_voices_not_emotions():
    rng = np.random.default_rng(0)
    voice, emotion = np.eye(6)[0], np.eye(6)[1]
    speakers = np.repeat([f"s{i}" for i in range(8)], 20)
    # half the speakers mostly sad, half mostly angry: unweighted, their means would differ by emotion too
    mostly = np.array(["sad"] * 16 + ["angry"] * 4)
    labels = np.concatenate(
        [mostly if i % 2 else np.where(mostly == "sad", "angry", "sad") for i in range(8)]
    )
    offsets = 5 * rng.normal(size=8).repeat(20)
    x = (
        offsets[:, None] * voice
        + 2 * (labels == "angry")[:, None] * emotion
        + 0.1 * rng.normal(size=(160, 6))
    )
    held = np.array([2 * emotion, 9 * voice])  # an angry clip; a new voice far out along `voice`
    fitted, tested = without_speaker_subspace(x, held, labels, speakers, dims=2)
    assert abs(np.corrcoef(fitted[:, 0], offsets)[0, 1]) < 0.1  # the voice axis is gone
    angry = fitted[labels == "angry"].mean(0) - fitted[labels == "sad"].mean(0)
    assert angry[1] > 1.5  # the emotion axis stays (standardised, it is 2): each class weighs alike
    assert abs(tested[1, 0]) < 0.2 and tested[0, 1] > 0.8  # and so for clips it never saw (angry: 1)


def test_clip_stats_are_pooled_once_per_clip(ravdess_clips, tmp_path, one_thread):
    stats = ClipStats(tmp_path / "loco-cache", "gain-invariant")
    rows = [Clip(path=str(p)) for p in ravdess_clips[:2]] + [Clip(path=str(tmp_path / "missing.flac"))]
    x, kept = stats.rows(rows, progress=False)
    assert x.shape == (2, 3 * LAYERS * WIDTH) and kept == rows[:2] and np.isfinite(x).all()
    assert np.allclose(x[:, COLUMNS["normed"]].reshape(2, 2, LAYERS, WIDTH)[:, 0].mean(-1), 0, atol=1e-4)
    stats._encode = lambda wave: pytest.fail("a pooled clip was encoded again")
    assert np.array_equal(stats.rows(rows[:2], progress=False)[0], x)
    louder = ClipStats(tmp_path / "loco-cache", "gain-invariant")
    wave = load_audio(ravdess_clips[0])
    assert np.abs(louder._encode(wave * 3) - x[0]).max() < 1e-3  # the gain-invariant front end


def test_an_augmented_head_trains_on_each_clip_and_its_copy_and_scores_the_clean_clips(monkeypatch):
    rows, stats = synthetic()
    copies = stats + np.random.default_rng(1).normal(scale=0.1, size=stats.shape).astype(np.float32)
    fitted = []
    real_fit = loco.fit_classes

    def spy(head, x, labels, corpora):
        fitted.append((len(x), list(labels), list(corpora)))
        return real_fit(head, x, labels, corpora)

    monkeypatch.setattr(loco, "fit_classes", spy)
    head = Head("augmented", columns="raw", copies=AUGMENTED)
    assert head.stats == ("whisper", "whisper" + AUGMENTED)
    folds = run_folds(rows, {"whisper": stats, "whisper augmented": copies}, [head], 0, lambda _: None)
    for (n, labels, corpora), corpus in zip(fitted, ["a", "b", "c"]):
        train = [r for r in rows if r.corpus != corpus]
        assert n == 2 * len(train) and labels == [r.label for r in train] * 2 and corpus not in corpora
    assert all(cell["augmented"]["n"] == 30 for cell in folds.values())  # the held-out clips, once each


def test_the_loudness_normalised_and_augmented_stats(ravdess_clips, tmp_path, one_thread):
    wave = load_audio(ravdess_clips[0])
    rms_db = 10 * np.log10(np.mean(loudness_normalised(wave * 0.1).astype(np.float64) ** 2))
    assert rms_db == pytest.approx(LOUDNESS_DBFS, abs=0.01)
    loud = ClipStats(tmp_path / "loco-cache", "loudness-normalised")
    plain = ClipStats(tmp_path / "loco-cache", "whisper")
    assert loud.root != plain.root  # a front end of its own, cached apart
    x = loud(wave)
    assert np.abs(loud._encode(wave * 4) - x).max() < 1e-3  # a level-free input for Whisper's own log-mel
    assert np.abs(plain(wave) - x).max() > 0.1  # this RAVDESS clip is far from -23 dBFS
    copies = ClipStats(
        tmp_path / "loco-cache", "gain-invariant", augment=copies_config(AUGMENTED, str(DATA / "noise"))
    )
    first = copies(wave)
    copies.root = tmp_path / "elsewhere"  # pooled again, not read back: the draw is the clip's own
    assert np.array_equal(copies(wave), first)
    plain_gi = ClipStats(tmp_path / "loco-cache", "gain-invariant")
    clean = plain_gi(wave)
    assert np.abs(first - clean).max() > 0.1
    pitch = copies_config(PITCH_SHIFTED, str(DATA / "noise"))
    assert pitch.noise_dir is None and pitch.pitch_semitones  # a shift, and no noise on top
    shifted = ClipStats(tmp_path / "loco-cache", "gain-invariant", augment=pitch)
    assert len({shifted.root, plain_gi.root, tmp_path / "loco-cache" / copies.root.name}) == 3  # apart
    assert np.abs(shifted(wave) - clean).max() > 0.1 and np.abs(shifted(wave) - first).max() > 0.1
    assert split_key("gain-invariant" + PITCH_SHIFTED) == ("gain-invariant", PITCH_SHIFTED)
    assert split_key("whisper") == ("whisper", "")
    with pytest.raises(ValueError, match="front end must be one of"):
        ClipStats(tmp_path / "loco-cache", "pcen")


def test_fold_manifests_leave_one_corpus_out(tmp_path):
    rows, _ = synthetic(n_per=4)
    for r in rows:
        r.path = str(tmp_path / r.path)
    write_manifest(rows, tmp_path / "all.csv")
    folds = fold_manifests(str(tmp_path / "all.csv"), tmp_path / "out", None)
    assert list(folds) == ["a", "b", "c"]
    for corpus, path in folds.items():
        assert {r.corpus for r in read_manifest(path)} == {"a", "b", "c"} - {corpus}
    assert list(fold_manifests(str(tmp_path / "all.csv"), tmp_path / "out", ["b"])) == ["b"]


def test_mixtures_recover_each_heads_probabilities():
    network = np.array([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    linear = np.array([[0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    parts = mixtures((network + linear) / 2, network)  # what a model with a linear head gives
    assert np.allclose(parts[" (linear head alone)"], linear) and np.array_equal(
        parts[" (network alone)"], network
    )
    assert np.allclose(parts[" (linear weight 0.25)"], 0.75 * network + 0.25 * linear)
    assert np.array_equal(parts[""], (network + linear) / 2)
    assert list(mixtures(linear, None)) == [""]  # a model without a linear head: only itself
    heavy = mixtures(0.25 * network + 0.75 * linear, network, weight=0.75)  # model.linear_weight 0.75
    assert np.allclose(heavy[" (linear head alone)"], linear)
    assert np.allclose(heavy[" (linear weight 0.25)"], 0.75 * network + 0.25 * linear)


def test_fold_models_score_their_own_corpus_once(tmp_path, ravdess_clips, emodb_clips, monkeypatch):
    import torch

    from serval.checkpoint import save_model
    from serval.model import SERConfig, SERModel

    torch.manual_seed(0)
    for corpus in ("ravdess", "emodb"):  # each fold's model: a tiny random one with a linear head
        save_model(
            SERModel(SERConfig.tiny(layer_weighting="weighted", linear_head=True)).eval(), tmp_path / corpus
        )
    labels = ["angry", "sad", "happy"]
    rows = [Clip(path=str(p), label=labels[i % 3], corpus="ravdess") for i, p in enumerate(ravdess_clips[:6])]
    rows += [Clip(path=str(p), label=labels[i % 2], corpus="emodb") for i, p in enumerate(emodb_clips[:4])]
    rows += [Clip(path=str(ravdess_clips[7]), corpus="other")]  # no class, no rating: not scored
    classes, arousal = loco.model_folds(rows, str(tmp_path / "{corpus}"), "tiny", 20, tmp_path / "cache")
    assert sorted(classes) == ["emodb", "ravdess"] and not arousal  # a tiny model trains no dimension
    assert set(classes["ravdess"]) == {
        "tiny",
        *(f"tiny ({k})" for k in loco.LINEAR_WEIGHTS),
        *(f"tiny{suffix}" for suffix in loco.SESSIONS),
    }
    assert classes["emodb"]["tiny"]["n"] == 4 and sorted(classes["emodb"]["tiny"]["recall"]) == [
        "angry",
        "sad",
    ]
    monkeypatch.setattr(loco, "score_model", lambda *a, **k: pytest.fail("a cached fold was scored again"))
    assert loco.model_folds(rows, str(tmp_path / "{corpus}"), "tiny", 20, tmp_path / "cache") == (
        classes,
        arousal,
    )


def test_the_summary_and_contender_tables_count_the_corpora_ahead():
    def cell(uar):
        return {"uar": uar, "ci": [uar - 0.05, uar + 0.05]}

    folds = {
        "a": {"m": cell(0.6), "p": cell(0.5)},
        "b": {"m": cell(0.4), "p": cell(0.45)},
        "c": {"p": cell(0.9)},
    }
    lines = loco.summary_table(folds, "m", "p", ["x"])
    assert lines[2].startswith("| a | 60.0 [55.0, 65.0] | 50.0 [45.0, 55.0] | +10.0 | –")
    assert lines[3].split(" | ")[3] == "-5.0" and len(lines) == 5  # c lacks the model: left out
    assert (
        "ahead on 1" in lines[4]
        and "**50.0**" in lines[4]
        and "**47.5**" in lines[4]
        and "**+2.5**" in lines[4]
    )
    rows = loco.contender_table(folds, ["p", "m", "x"], "p")
    assert (
        rows[0] == "| system | a | b | c | mean | against p |" and len(rows) == 4
    )  # x has no corpus: no row
    assert rows[2].startswith(
        "| p | 50.0 [45.0, 55.0] | 45.0 [40.0, 50.0] | 90.0 [85.0, 95.0] | **61.7** (3) | –"
    )
    assert (
        rows[3] == "| m | 60.0 [55.0, 65.0] | 40.0 [35.0, 45.0] | – | **50.0** (2) | ahead on 1 of 2, +2.5 |"
    )


def test_model_card_fits_the_heads_it_is_given_and_those_its_tables_need():
    from model_card import chosen_heads

    assert chosen_heads([]) == loco.HEADS
    extra = loco.HEADS[-1].name
    names = [h.name for h in chosen_heads([extra])]
    wanted = {loco.PROBE.name, loco.GAIN_INVARIANT_HEAD.name, loco.SHIPPED_HEAD.name, extra}
    assert set(names) == wanted and len(names) == 4
    with pytest.raises(SystemExit, match="no LOCO head named 'nonsense'"):
        chosen_heads(["nonsense"])


def test_temperatures_keep_the_argmax_and_the_card_picks_the_least_loss():
    rows, stats = synthetic()
    folds = run_folds(rows, {"whisper": stats}, [Head("probe", columns="raw")], 0, lambda _: None)
    cal = folds["b"]["probe"]["calibration"]
    assert list(cal) == [str(t) for t in loco.TEMPERATURES]
    assert len({round(c["accuracy"], 9) for c in cal.values()}) == 1  # the class never moves
    tops = [c["confidence"] for c in cal.values()]
    assert tops == sorted(tops, reverse=True) and tops[-1] < tops[0]  # softer as T grows
    best = loco.chosen_temperature(folds, "probe")
    losses = {
        t: np.mean([folds[c]["probe"]["calibration"][str(t)]["nll"] for c in folds])
        for t in loco.TEMPERATURES
    }
    assert losses[best] == min(losses.values())
    table = loco.calibration_table(folds, ["probe"])
    assert (
        len(table) == 2 + len(loco.TEMPERATURES) and sum(f"| **{best:g}** |" in line for line in table) == 1
    )


def test_a_corpus_class_no_fold_trained_on_gets_no_probability():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])  # columns: angry, sad; the corpus also has happy
    cal = loco.corpus_calibration(["angry", "happy"], logits, ["angry", "sad"])
    assert cal["1.0"]["accuracy"] == 0.5 and cal["1.0"]["nll"] > 10  # happy: probability 0, loss capped
