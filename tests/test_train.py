"""The training recipe: losses, config, sampler, augmentation, and short real runs on RAVDESS clips."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import DATA, RAVDESS_CODES, REPO, blas_threads, clips
from safetensors.torch import load_file

from serval.checkpoint import save_model
from serval.clip import Clip
from serval.model import SERConfig, SERModel
from serval.train import (
    BucketBatchSampler,
    Example,
    NoiseBank,
    RunState,
    SelectConfig,
    add_noise,
    augment_wave,
    average_models,
    balance_weights,
    ccc_loss,
    change_speed,
    check_rows,
    choose_combination,
    class_weights_from_labels,
    collate,
    cosine_with_warmup,
    load_config,
    mixup,
    select_after_epoch,
    soft_cross_entropy,
    total_loss,
    train,
)
from serval.train.augment import codec_round_trip, shift_pitch, time_stretch
from serval.train.loop import trained_dimensions
from serval.vocab import SAMPLE_RATE

TINY = [
    "model.d_model=64", "model.encoder_layers=2", "model.encoder_attention_heads=2", "model.encoder_ffn_dim=128",
    "model.channels=32", "model.embed_dim=32", "progress=false", "tensorboard=false", "log_every=1",
]  # fmt: skip
NO_DROPOUT = ["model.proj_dropout=0.0", "model.embed_dropouts=[0.0, 0.0]", "model.lora_dropout=0.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


# Rough arousal/valence/dominance per emotion, so that runs exercise the CCC head too.
AVD = {
    "neutral": (0.3, 0.5, 0.5),
    "happy": (0.7, 0.9, 0.6),
    "sad": (0.2, 0.1, 0.2),
    "angry": (0.9, 0.1, 0.9),
    "fearful": (0.8, 0.2, 0.1),
    "disgusted": (0.6, 0.1, 0.6),
    "surprised": (0.8, 0.7, 0.4),
}


def ravdess_manifest(
    path: Path, n_train: int, n_dev: int = 0, dims: bool = False, span=("", ""), actors=("01", "02")
) -> Path:
    """A manifest of real RAVDESS clips (calm dropped), split by actor: train from actor 1, dev from actor 2."""
    rows = []
    for actor, n, split in ((actors[0], n_train, "train"), (actors[1], n_dev, "dev")):
        found = [
            f for f in clips("ravdess", f"Actor_{actor}/*.flac") if f.stem.split("-")[2] in RAVDESS_CODES
        ]
        step = max(1, len(found) // max(n, 1))
        for f in found[::step][:n]:
            label = RAVDESS_CODES[f.stem.split("-")[2]]
            avd = AVD[label] if dims else ("", "", "")
            rows.append([str(f), *span, label, split, *avd, f"ravdess-{actor}", "ravdess"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["path", "start", "end", "label", "split", "arousal", "valence", "dominance", "speaker", "corpus"]
        )
        w.writerows(rows)
    return path


def tiny_init(folder: Path) -> Path:
    """A tiny random model to start from. Its position embeddings are scaled down as in a trained
    Whisper: at N(0, 1) they swamp the audio and every clip looks alike to the downstream network."""
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = SERModel(SERConfig.tiny(proj_dropout=0.0, embed_dropouts=(0.0, 0.0)))
        with torch.no_grad():
            model.whisper.encoder.embed_positions.weight.mul_(0.02)
        save_model(model, folder)
    return folder


def tiny_config(tmp_path: Path, manifest: Path, *overrides: str, dev: bool = False, init: bool = True):
    sets = [
        *TINY,
        f"out_dir={tmp_path / 'run'}",
        f"data.train={manifest}",
        "data.train_split=train",
        "data.max_seconds=2.0",
    ]
    if init:
        sets.append(f"init_from={tiny_init(tmp_path.parent / 'tiny-init')}")
    if dev:
        sets += [f"data.dev={manifest}", "data.dev_split=dev"]
    return load_config(None, [*sets, *overrides])


# ---------------------------------------------------------------------------- losses


def numpy_ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's concordance correlation coefficient, written out directly."""
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    return 2 * cov / (x.var() + y.var() + (mx - my) ** 2)


def test_ccc_loss_matches_numpy_and_skips_unlabelled_samples():
    rng = np.random.default_rng(0)
    pred, target = rng.uniform(size=(12, 3)), rng.uniform(size=(12, 3))
    target[:, 1] = 0.3 * pred[:, 1] + 0.1  # one dimension well correlated, so the value is not trivial
    mask = np.ones(12, dtype=bool)
    mask[[2, 7]] = False
    target[~mask] = 99.0  # garbage where there is no label: must not matter
    expected = 1 - np.mean([numpy_ccc(pred[mask, j], target[mask, j]) for j in range(3)])
    got = ccc_loss(torch.tensor(pred), torch.tensor(target), torch.tensor(mask))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert ccc_loss(torch.tensor(pred), torch.tensor(pred)).item() == pytest.approx(0.0, abs=1e-6)
    one = torch.zeros(12, dtype=torch.bool)
    one[0] = True
    assert ccc_loss(torch.tensor(pred), torch.tensor(target), one).item() == 0.0  # < 2 labelled: skipped


def test_ccc_loss_per_dimension_mask_uses_each_dimension_where_present():
    rng = np.random.default_rng(1)
    pred, target = rng.uniform(size=(10, 3)), rng.uniform(size=(10, 3))
    mask = np.ones((10, 3), dtype=bool)
    mask[5:, 1:] = False  # rows 5-9 carry arousal only (BAVED-like)
    mask[:, 2] = False
    mask[0, 2] = True  # dominance on one row only: fewer than two, that dimension adds nothing
    target[~mask] = 99.0
    expected = np.mean([1 - numpy_ccc(pred[mask[:, j], j], target[mask[:, j], j]) for j in (0, 1)])
    got = ccc_loss(torch.tensor(pred), torch.tensor(target), torch.tensor(mask))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    none = torch.zeros((10, 3), dtype=torch.bool)
    assert ccc_loss(torch.tensor(pred), torch.tensor(target), none).item() == 0.0


def test_soft_cross_entropy_equals_torch_for_hard_labels_and_ignores_unlabelled():
    torch.manual_seed(0)
    logits, y = torch.randn(10, 7), torch.randint(0, 7, (10,))
    w = class_weights_from_labels(y.tolist(), 7)
    expected = F.cross_entropy(logits, y, weight=w, label_smoothing=0.1)
    got = soft_cross_entropy(logits, F.one_hot(y, 7).float(), w, 0.1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # a row without a categorical label (all-zero target) changes nothing
    padded = soft_cross_entropy(
        torch.cat([logits, torch.randn(1, 7)]),
        torch.cat([F.one_hot(y, 7).float(), torch.zeros(1, 7)]),
        w,
        0.1,
    )
    assert padded.item() == pytest.approx(got.item(), rel=1e-5)  # fp32 sums of 10 and 11 terms: ~11 u


def test_class_weights_are_inverse_frequency_over_present_classes():
    w = class_weights_from_labels([0, 0, 0, 1, -1], 3)  # class 2 absent, -1 unlabelled
    assert w.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1), 0.0])


def test_cosine_schedule_warms_up_then_decays():
    f = cosine_with_warmup(100, 0.08)
    values = [f(s) for s in range(100)]
    assert values[0] < values[7] <= 1.0 and values[8] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[8:], values[9:])) and values[-1] < 0.01


# ---------------------------------------------------------------------------- config


def test_config_yaml_with_overrides_and_clear_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"mode": "lora", "data": {"train": "m.csv"}, "optim": {"epochs": 2}, "model": {"lora_r": 8}}
        )
    )
    cfg = load_config(
        path,
        [
            "optim.lr_head=1e-3",
            "augment.speed_factors=[1.0]",
            "model.classes=[a, b]",
            "loss.class_weights=[1, 2]",
        ],
    )
    assert cfg.optim.epochs == 2 and cfg.optim.lr_head == 1e-3 and cfg.model.lora_r == 8
    assert cfg.augment.speed_factors == (1.0,) and cfg.model.classes == ("a", "b")
    assert cfg.loss.class_weights == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown setting optim.learning_rate"):
        load_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="optim.epochs: expected an integer"):
        load_config(path, ["optim.epochs=many"])
    path.write_text("optim: {batchsize: 4}\ndata: {train: m.csv}\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown setting optim.batchsize"):
        load_config(path)
    with pytest.raises(ValueError, match="set model.lora_r to 0"):
        load_config(None, ["data.train=m.csv", "mode=frozen_cached", "model.lora_r=8"])


def test_shipped_configs_load():
    for name in (
        "quickstart-cpu",
        "meralion-medium",
        "whisper-base-cpu",
        "whisper-base-lora",
        "default-model",
        "default-model-cpu",
    ):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.model.backbone
    medium = load_config(REPO / "configs" / "meralion-medium.yaml")
    assert (medium.optim.lr_lora, medium.optim.wd_lora, medium.optim.lr_head, medium.optim.wd_head) == (
        5e-5,
        4e-5,
        6e-4,
        8e-5,
    )
    assert (medium.optim.epochs, medium.optim.batch_size, medium.optim.warmup_ratio) == (15, 32, 0.08)
    assert medium.model.lora_r > 0 and medium.mode == "lora"
    assert load_config(REPO / "configs" / "whisper-base-cpu.yaml").mode == "frozen_cached"


# ---------------------------------------------------------------------------- data


def test_sampler_buckets_by_length_shards_and_is_seeded():
    rng = np.random.default_rng(1)
    lengths = rng.uniform(1, 20, size=203)
    sampler = BucketBatchSampler(lengths, batch_size=8, seed=5, bucket_batches=5)
    a, b = sampler.batches(0), sampler.batches(0)
    assert a == b and a != sampler.batches(1)
    assert len(a) == len(sampler) == 25 and all(len(x) == 8 for x in a)
    flat = [i for x in a for i in x]
    assert len(set(flat)) == len(flat) == 200  # each clip once; the last partial batch dropped
    # bucketing: a batch spans much less of the length range than a random batch would
    spread = np.mean([np.ptp(lengths[x]) for x in a])
    assert spread < 0.5 * np.ptp(lengths)
    shards = [BucketBatchSampler.shard(a[0], r, 2, 2) for r in range(2)]
    assert sorted(i for s in shards for mb in s for i in mb) == sorted(a[0])
    assert [len(mb) for s in shards for mb in s] == [2, 2, 2, 2]


def test_bad_clips_are_skipped_with_the_file_and_cause(tmp_path, caplog):
    from serval.manifest import ManifestRow

    good = clips("ravdess", n=2)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    rows = [
        ManifestRow(str(good[0]), label="happy"),
        ManifestRow(str(tmp_path / "gone.flac"), label="sad"),
        ManifestRow(str(empty), label="sad"),
        ManifestRow(str(good[1]), label="bored"),
        ManifestRow(str(good[1]), start=100.0, label="sad"),
        ManifestRow(str(good[1])),
    ]
    with caplog.at_level("WARNING", logger="serval.train"):
        kept = check_rows(rows, ("neutral", "happy", "sad"), ("arousal", "valence", "dominance"), "m.csv")
    assert [(k.clip.path, k.label) for k in kept] == [(str(good[0]), 1)]
    text = caplog.text
    assert "skipping 5 of 6" in text and "gone.flac" in text and "empty.wav" in text and "'bored'" in text
    assert "after the end" in text and "no categorical label" in text


def test_speed_and_noise_augmentation_on_real_audio():
    from serval.audio import load_audio

    wave = load_audio(clips("ravdess", n=1)[0])
    assert len(change_speed(wave, 1.1)) == pytest.approx(len(wave) / 1.1, rel=1e-3)
    assert len(change_speed(wave, 0.9)) == pytest.approx(len(wave) / 0.9, rel=1e-3)
    bank = NoiseBank(DATA / "noise")
    assert len(bank.files) == 6
    n1 = bank.sample(len(wave), np.random.default_rng(3))
    n2 = bank.sample(len(wave), np.random.default_rng(3))
    assert np.array_equal(n1, n2) and len(n1) == len(wave)
    noisy = add_noise(wave, n1, 10.0)
    residual = noisy - wave
    snr = 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean(residual.astype(np.float64) ** 2))
    assert snr == pytest.approx(10.0, abs=0.05)


def test_codec_augmentation_round_trips_real_audio_at_the_drawn_bitrate():
    from serval.audio import load_audio

    wave = load_audio(clips("ravdess", n=1)[0])
    errors = {}
    for codec in ("opus", "mp3"):
        for level in (0.0, 1.0):
            out = codec_round_trip(wave, codec, level)
            assert out.dtype == np.float32 and len(out) == len(wave)
            errors[codec, level] = float(np.mean((out - wave) ** 2) / np.mean(wave**2))
        # a lossy copy of the same speech: changed, more so at the lower bitrate, still close at the higher
        assert 0 < errors[codec, 0.0] < errors[codec, 1.0] < 1.0
    on = [
        "data.train=m.csv",
        "augment.codecs=[opus, mp3]",
        "augment.codec_prob=1.0",
        "augment.speed_factors=[1.0]",
    ]
    cfg = load_config(None, on)
    a = augment_wave(wave, cfg.augment, None, np.random.default_rng(5))
    b = augment_wave(wave, cfg.augment, None, np.random.default_rng(5))
    assert np.array_equal(a, b) and not np.array_equal(a, wave)  # seeded: the same copy every time
    off = load_config(
        None, ["data.train=m.csv", "augment.speed_factors=[1.0]"]
    ).augment  # codecs: () by default
    assert np.array_equal(augment_wave(wave, off, None, np.random.default_rng(5)), wave)
    for bad in ("augment.codecs=[aac]", "augment.codec_compression=[0.5, 1.5]"):
        with pytest.raises(ValueError, match="augment.codecs must be opus and/or mp3"):
            load_config(None, ["data.train=m.csv", bad])


def f0_track(wave: np.ndarray, frame: int = 640) -> np.ndarray:
    """Per 40 ms frame (half overlapping): the autocorrelation pitch in 60-400 Hz where voiced, else nan."""
    lo, hi, f0 = SAMPLE_RATE // 400, SAMPLE_RATE // 60, []
    for s in range(0, len(wave) - frame, frame // 2):
        x = wave[s : s + frame] - wave[s : s + frame].mean()
        ac = np.correlate(x, x, "full")[frame - 1 :]
        lag = lo + int(np.argmax(ac[lo:hi]))
        f0.append(SAMPLE_RATE / lag if ac[0] > 0 and ac[lag] / ac[0] > 0.7 else np.nan)
    return np.array(f0)


def test_pitch_shift_moves_the_pitch_of_real_speech_and_keeps_its_length_and_level():
    from serval.audio import load_audio

    wave = np.concatenate([load_audio(p) for p in clips("ravdess", "Actor_03/03-01-0[35]-02-*.flac", n=4)])
    before = f0_track(wave)
    for semitones in (-2.0, 3.0):
        out = shift_pitch(wave, semitones)
        assert out.dtype == np.float32 and len(out) == len(wave)
        after = f0_track(out)
        voiced = ~np.isnan(before) & ~np.isnan(after)
        assert voiced.sum() > 100  # frame by frame: the shift keeps the timing
        ratio = float(np.median(after[voiced] / before[voiced]))
        assert ratio == pytest.approx(2 ** (semitones / 12), rel=0.02)
        level = np.sqrt(np.mean(out**2) / np.mean(wave**2))
        assert 0.9 < level < 1.1
    # WSOLA alone: a tone stretched keeps its frequency, and the length follows the rate
    tone = np.sin(2 * np.pi * 200 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    for rate in (0.8, 1.25):
        out = time_stretch(tone, rate)
        assert len(out) == round(SAMPLE_RATE / rate)
        spectrum = np.abs(np.fft.rfft(out[1000:-1000] * np.hanning(len(out) - 2000)))
        assert np.argmax(spectrum) * SAMPLE_RATE / (len(out) - 2000) == pytest.approx(200, abs=2)
    on = ["data.train=m.csv", "augment.pitch_semitones=[-2, 2]", "augment.speed_factors=[1.0]"]
    cfg = load_config(None, on)
    a = augment_wave(wave, cfg.augment, None, np.random.default_rng(5))
    assert np.array_equal(a, augment_wave(wave, cfg.augment, None, np.random.default_rng(5)))
    assert not np.array_equal(a, wave)
    with pytest.raises(ValueError, match="augment.pitch_semitones must be shifts within"):
        load_config(None, ["data.train=m.csv", "augment.pitch_semitones=[13]"])


def test_noise_bank_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="no readable audio files"):
        NoiseBank(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        NoiseBank(tmp_path / "missing")


def test_mixup_mixes_inputs_targets_and_dims():
    items = [
        {
            "index": i,
            "input": torch.full((n,), float(i + 1)),
            "target": F.one_hot(torch.tensor(i), 3).float(),
            "dims": torch.full((3,), 0.1 * (i + 1)),
            "dims_mask": torch.tensor([i != 2, i == 0, i != 2]),  # per dimension
        }
        for i, n in enumerate((5, 3, 4))
    ]
    batch = collate(items)
    assert batch["input"].shape == (3, 5) and batch["lengths"].tolist() == [5, 3, 4]
    perm = torch.tensor([1, 2, 0])
    out = mixup(batch, 0.25, perm)
    assert out["input"][0, 0].item() == pytest.approx(0.25 * 1 + 0.75 * 2)
    assert out["targets"][0].tolist() == pytest.approx([0.25, 0.75, 0.0])
    assert out["dims"][0, 0].item() == pytest.approx(0.25 * 0.1 + 0.75 * 0.2)
    assert out["lengths"].tolist() == [5, 4, 5]
    # a mixed clip keeps a dimension only where both partners have it
    assert out["dims_mask"].tolist() == [[True, False, True], [False, False, False], [False, False, False]]
    assert torch.allclose(out["targets"].sum(1), torch.ones(3))


def test_average_models_averages_lora_updates_exactly_in_one_adapter_of_rank_k_r():
    from serval.model import SERConfig, SERModel

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = SERModel(SERConfig.tiny(lora_r=2))
        for p in m.lora_parameters():  # peft starts B at zero; make the adapters matter
            torch.nn.init.normal_(p, std=0.1)
        models.append(m.eval())
    models[1].load_state_dict(
        {k: v for k, v in models[0].state_dict().items() if "lora_" not in k and "whisper." in k},
        strict=False,
    )
    avg = average_models(models)
    assert (avg.config.lora_r, avg.config.lora_alpha) == (4, 32) and avg.config.backbone == models[
        0
    ].config.backbone
    merged = [m.merged_state_dict() for m in models]
    for k, v in avg.merged_state_dict().items():
        assert torch.allclose(v, (merged[0][k] + merged[1][k]) / 2, atol=1e-6), k


# ---------------------------------------------------------------------------- selection


def test_select_after_epoch_keeps_the_best_and_stops_after_patience():
    select = SelectConfig(patience=2, keep_best=2)
    state, seen = RunState(), []
    for step, loss in zip((10, 20, 30, 40, 50), (0.9, 0.7, 0.8, 0.75, 0.6)):
        state.step, state.epoch = step, step // 10  # what the loop has counted when it asks
        before = (list(state.best), state.best_loss, state.bad_epochs)
        after = select_after_epoch(state, loss, select)
        assert (state.best, state.best_loss, state.bad_epochs) == before  # pure: the input is untouched
        seen.append((after.best, after.best_loss, after.bad_epochs, after.stopped))
        state = after
        if state.stopped:
            break
    assert seen == [
        ([[0.9, "step-000010", 1]], 0.9, 0, False),
        ([[0.7, "step-000020", 2], [0.9, "step-000010", 1]], 0.7, 0, False),
        ([[0.7, "step-000020", 2], [0.8, "step-000030", 3]], 0.7, 1, False),
        ([[0.7, "step-000020", 2], [0.75, "step-000040", 4]], 0.7, 2, True),  # 2 epochs without a better loss
    ]
    # without a dev set the last checkpoint is the one kept, and nothing stops the run
    alone = select_after_epoch(RunState(step=7, epoch=1, best=[[0.0, "step-000003", 0]]), None, select)
    assert (alone.best, alone.bad_epochs, alone.stopped) == ([[0.0, "step-000007", 1]], 0, False)


def test_choose_combination_follows_the_setting_and_dev_uar():
    assert choose_combination("auto", 1, {"predictions": 0.9, "weights": 0.1}) == "single"
    assert choose_combination("auto", 4, {"predictions": 0.6, "weights": 0.7}) == "weights"
    assert choose_combination("auto", 4, {"predictions": 0.7, "weights": 0.6}) == "predictions"
    assert choose_combination("auto", 4, {"predictions": 0.7, "weights": 0.7}) == "weights"
    assert choose_combination("auto", 4, {}) == "predictions"  # no dev set to decide on
    assert choose_combination("predictions", 4, {"predictions": 0.1, "weights": 0.9}) == "predictions"


# ---------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_training_loss_falls_on_real_clips_and_final_model_loads(tmp_path):
    # 1.5 s spans of real clips: spans are read from the manifest, and no random crop blurs the signal
    manifest = ravdess_manifest(tmp_path / "m.csv", n_train=8, n_dev=2, span=(0.5, 2.0))
    cfg = tiny_config(
        tmp_path,
        manifest,
        *NO_DROPOUT,
        "model.lora_r=4",
        "optim.batch_size=8",
        "optim.epochs=12",
        "optim.lr_head=5e-3",
        "optim.lr_lora=1e-3",
        "optim.warmup_ratio=0.0",
        "augment.mixup_prob=0.0",
        "augment.speed_factors=[1.0]",
        "select.average=predictions",
        "select.patience=100",
        dev=True,
    )
    torch.manual_seed(cfg.seed)
    from serval.train import build_model

    initial = build_model(cfg)
    best = train(cfg)
    out = Path(cfg.out_dir)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows if r["split"] == "train"]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]) and losses[-1] < losses[0] - 0.3, losses
    assert sum(r["split"] == "dev" for r in rows) == 12

    # frozen Whisper weights stayed frozen; the LoRA adapters and the downstream network moved
    ckpt = out / (out / "last").read_text().strip()
    trained = load_file(str(ckpt / "model.safetensors"))
    start = initial.state_dict()
    frozen = [k for k in start if k.startswith("whisper.") and "lora_" not in k]
    assert frozen and all(torch.equal(trained[k], start[k]) for k in frozen)
    assert any(not torch.equal(trained[k], start[k]) for k in start if "lora_B" in k)
    assert yaml.safe_load((ckpt / "train_config.yaml").read_text())["optim"]["epochs"] == 12
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["lora_r"] == 4
    assert json.loads((ckpt / "config.json").read_text())["trained_dimensions"] == []  # no dims in the data

    # the 4 best checkpoints by dev loss form the ensemble; serval.load reads it
    report = json.loads((out / "final.json").read_text())
    assert report["chosen"] == "predictions" and len(report["members"]) == 4
    assert report["dev_loss"] == sorted(report["dev_loss"])
    ensemble = json.loads((best / "ensemble.json").read_text())
    assert ensemble["members"] == [f"member-{i}" for i in range(4)]
    assert not list(best.rglob("trainer_state*"))  # the final model carries no trainer state
    assert {p.name for p in (out / "checkpoints").iterdir()} == set(report["members"])
    import serval

    predictor = serval.load(best)
    records = predictor.predict([str(p) for p in clips("ravdess", "Actor_02/*.flac", n=2)])
    assert all("label" in r for r in records), records


def test_out_dir_of_another_run_or_user_files_is_refused(tmp_path):
    manifest = ravdess_manifest(tmp_path / "m.csv", n_train=4)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    cfg = tiny_config(tmp_path, manifest, "optim.batch_size=4", "optim.epochs=1")
    with pytest.raises(ValueError, match="not empty and holds no serval run"):
        train(cfg)
    with pytest.raises(ValueError, match="not empty and holds no serval run"):
        train(cfg, overwrite=True)  # --overwrite deletes only a serval run
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    (tmp_path / "run" / "notes.txt").unlink()
    train(cfg)
    other = tiny_config(tmp_path, manifest, "optim.batch_size=4", "optim.epochs=2")
    with pytest.raises(ValueError, match="different config"):
        train(other)
    never = tiny_config(tmp_path, manifest, "optim.batch_size=4", "optim.epochs=1", "resume=never")
    with pytest.raises(ValueError, match=r"run: holds a run already .*pass --overwrite"):
        train(never)


def _metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_failed_run_is_resumed_or_restarted_and_the_error_says_which(tmp_path, capsys):
    from serval import cli

    manifest = ravdess_manifest(tmp_path / "m.csv", n_train=8)
    sets = ["optim.batch_size=4", "mode=frozen_cached", "model.lora_r=0"]  # encoder cache in <out_dir>/cache
    missing = tiny_config(tmp_path, manifest, *sets, f"data.train={tmp_path / 'nowhere.csv'}")
    with pytest.raises(ValueError, match="nowhere.csv"):
        train(missing)
    assert not Path(missing.out_dir).exists()  # bad data stops the run before its folder is claimed

    def config(name: str, *more: str) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config(tmp_path, manifest, *sets, *more).to_dict()))
        return str(path)

    one, two = config("one", "optim.epochs=1"), config("two", "optim.epochs=2")
    assert cli.main(["train", one]) == 0
    out = Path(missing.out_dir)
    cached = sorted(p.relative_to(out) for p in (out / "cache").rglob("*") if p.is_file())
    assert cached and [r["step"] for r in _metrics(out)] == ["1", "2"]  # 8 clips, batch 4; no dev rows
    capsys.readouterr()
    assert cli.main(["train", two]) == 1
    err = capsys.readouterr().err
    assert (
        f"{out}: holds a run with a different config (last checkpoint step-000002; differs in optim.epochs)"
        in err
    )
    assert "pass --resume (resume: force) to continue it with this config, or --overwrite to delete it" in err

    assert cli.main(["train", two, "--resume"]) == 0  # continues from step 2 to the end of epoch 2
    steps = [int(r["step"]) for r in _metrics(out) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["epochs"] == 2

    lower = config("lower", "optim.epochs=1", "optim.lr_head=1e-4")
    assert cli.main(["train", lower, "--overwrite"]) == 0  # deleted, then run again from step 0
    assert [int(r["step"]) for r in _metrics(out) if r["split"] == "train"] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr_head"] == 1e-4
    assert sorted(p.relative_to(out) for p in (out / "cache").rglob("*") if p.is_file()) == cached  # kept
    with pytest.raises(SystemExit):
        cli.main(["train", lower, "--resume", "--overwrite"])  # one or the other
    assert "--overwrite: not allowed with argument --resume" in capsys.readouterr().err


def test_print_config_shows_the_model_that_the_backbone_or_init_from_builds(tmp_path, capsys):
    from serval import cli

    assert cli.main(["train", str(REPO / "configs" / "quickstart-cpu.yaml"), "--print-config"]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    # whisper-base's sizes, not SERConfig's defaults (whisper-medium: d_model 1024, 24 layers)
    dims = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim")
    assert [model[k] for k in dims] == [512, 6, 8, 2048] and model["channels"] == 128
    config = tmp_path / "c.yaml"
    start = tiny_init(tmp_path / "tiny-init")
    saved = json.loads((start / "config.json").read_text())
    heavy = tmp_path / "head-alone"  # a start whose linear head decides alone, as the default model's
    shutil.copytree(start, heavy)
    (heavy / "config.json").write_text(json.dumps({**saved, "linear_weight": 1.0}))
    config.write_text(
        yaml.safe_dump({"data": {"train": "m.csv"}, "init_from": str(heavy), "model": {"lora_r": 2}})
    )
    assert cli.main(["train", str(config), "--print-config"]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert [model[k] for k in dims] == [64, 2, 2, 128] and model["channels"] == 32  # the checkpoint's
    assert model["lora_r"] == 2 and model["linear_weight"] == 0.5  # training choices, from the config


def test_the_model_records_the_speakers_and_corpora_it_was_trained_on(tmp_path):
    from serval.checkpoint import load_model
    from serval.training_data import read_record

    first = ravdess_manifest(tmp_path / "a.csv", n_train=4, n_dev=2)
    cfg = tiny_config(tmp_path / "a", first, "optim.batch_size=4", "optim.epochs=1", dev=True)
    best = train(cfg)
    expected = {"train": {"ravdess": ["ravdess-01"]}, "dev": {"ravdess": ["ravdess-02"]}}
    assert read_record(best) == expected
    last = Path(cfg.out_dir) / (Path(cfg.out_dir) / "last").read_text().strip()
    assert read_record(last) == expected  # every checkpoint carries it
    assert load_model(best).config.name == "tiny"  # the record is not a model setting
    # fine-tuned from that model on other speakers: both runs' speakers
    second = ravdess_manifest(tmp_path / "b.csv", n_train=4, n_dev=2, actors=("03", "04"))
    more = tiny_config(tmp_path / "b", second, "optim.batch_size=4", "optim.epochs=1", dev=True, init=False)
    more.init_from = str(best)
    assert read_record(train(more)) == {
        "train": {"ravdess": ["ravdess-01", "ravdess-03"]},
        "dev": {"ravdess": ["ravdess-02", "ravdess-04"]},
    }


class _Poison:
    """Unpickled, it writes `marker`: what a poisoned run folder could do to a pickle-reading resume."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_poisoned_trainer_state_is_refused_and_never_run(tmp_path):
    manifest = ravdess_manifest(tmp_path / "m.csv", n_train=4)
    cfg = tiny_config(tmp_path, manifest, "optim.batch_size=4", "optim.epochs=1")
    train(cfg)
    out = Path(cfg.out_dir)
    ckpt = out / (out / "last").read_text().strip()
    assert sorted(p.name for p in ckpt.glob("trainer_state*")) == [
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Poison(probe)))  # the poison is real
    assert probe.read_text() == "pwned"
    marker = tmp_path / "marker"
    poison = pickle.dumps(_Poison(marker))
    for name, cause in (
        ("trainer_state.json", "not a readable trainer state"),
        ("trainer_state.safetensors", "not a readable safetensors file"),
    ):
        original = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(poison)
        with pytest.raises(ValueError, match=rf"{name}: {cause}"):
            train(cfg)  # resume: auto, from the poisoned checkpoint
        assert not marker.exists()
        (ckpt / name).write_bytes(original)
    # a folder of the old format holds only a pickled trainer_state.pt: refused, by name
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (ckpt / name).unlink()
    (ckpt / "trainer_state.pt").write_bytes(poison)
    with pytest.raises(ValueError, match=r"step-000001/trainer_state\.pt: a pickled trainer state"):
        train(cfg)
    assert not marker.exists()


def _lines_until(proc: subprocess.Popen, needle: str, seen: list[str]) -> bool:
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return True
    return False


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path):
    manifest = ravdess_manifest(tmp_path / "m.csv", n_train=24, n_dev=4)
    sets = [
        "optim.batch_size=4",
        "optim.epochs=2",
        "model.lora_r=2",
        "select.checkpoint_every=2",
        f"augment.noise_dir={DATA / 'noise'}",
        "augment.noise_prob=0.5",
        "augment.mixup_prob=0.5",
    ]
    reference = tiny_config(tmp_path / "a", manifest, *sets, dev=True)
    train(reference)

    crashed = tiny_config(tmp_path / "b", manifest, *sets, dev=True)
    config = tmp_path / "b.yaml"
    config.write_text(yaml.safe_dump(crashed.to_dict()))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serval", "train", str(config)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    seen: list[str] = []
    try:
        assert _lines_until(proc, "checkpoint step-000002 saved", seen), "".join(seen)
        proc.send_signal(signal.SIGKILL)  # mid-epoch 1 of 2
    finally:
        proc.kill()
        proc.wait()
    out = Path(crashed.out_dir)
    assert not (out / "best").exists(), "the run finished before it was killed"
    assert (out / "last").read_text().startswith("checkpoints/step-0000")

    train(crashed)  # resume: auto
    a = load_file(str(Path(reference.out_dir) / "best" / "model.safetensors"))
    b = load_file(str(out / "best" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact: resuming replays the same fp32 ops on one machine
    assert (
        json.loads((out / "final.json").read_text())["members"]
        == json.loads((Path(reference.out_dir) / "final.json").read_text())["members"]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from serval.train import TrainConfig, from_dict

    train(from_dict(TrainConfig, cfg_dict))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(tmp_path):
    # equal 1.5 s spans: no clip is padded, so the 2-GPU pieces compute exactly what the whole batch does
    manifest = ravdess_manifest(tmp_path / "m.csv", n_train=8, dims=True, span=(0.5, 2.0))
    sets = [
        *NO_DROPOUT,
        "optim.batch_size=4",
        "optim.epochs=2",
        "model.lora_r=2",
        "augment.mixup_prob=0.0",
        f"augment.noise_dir={DATA / 'noise'}",
        "loss.ccc_weight=0.5",
        # Biases followed by a GroupNorm and attention-score biases get a gradient that is zero up to
        # rounding (~1e-8); Adam with eps 1e-8 turns that noise into full-size steps. eps 1e-3 keeps
        # the comparison about the gradients that exist (see the tolerance below).
        "optim.eps=1e-3",
    ]
    single = tiny_config(tmp_path / "one", manifest, *sets)
    train(single)  # one thread, like each of the two workers
    double = tiny_config(tmp_path / "two", manifest, *sets)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), double.to_dict()), nprocs=2, join=True)
    a = load_file(str(Path(single.out_dir) / "best" / "model.safetensors"))
    b = load_file(str(Path(double.out_dir) / "best" / "model.safetensors"))
    moved = [k for k in a if "lora_B" in k or k.startswith("downstream_model.")]
    assert moved and a.keys() == b.keys()
    # The tolerance is the sum order's. Each weight's gradient is a sum over the step's 4 clips x 75
    # encoder frames: one fp32 reduction in one process, two partial sums added by gloo in two. Two
    # orders of n fp32 terms differ by at most 2 n u sum|terms| (u = 2^-24, Higham), and each term may
    # itself be rounded differently (kernels are chosen by batch size) over its widest dot product
    # (k = 128, the FFN): (2n + k) u sum|terms|, with sum|terms| <= ~1 (measured <= 1.06; gradients
    # are clipped to norm 1). Adam's step lr g / (|g| + eps) moves by at most lr / eps per unit of
    # gradient error, so over the run's steps (lr <= lr_head) the weights differ, to first order, by
    # at most steps lr (2n + k) u / eps: ~1e-4, against ~1.5e-3 that the weights move.
    steps, n, k, u = 2 * 8 // 4, 4 * 75, 128, 2.0**-24
    atol = steps * single.optim.lr_head * (2 * n + k) * u * 1.0 / single.optim.eps
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (key, (a[key] - b[key]).abs().max())
    init = load_file(str(tmp_path / "tiny-init" / "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in moved if k in init) > 10 * atol  # a real test


# ---------------------------------------------------------------------------- dimensional-only rows


def test_rows_with_only_dimensions_train_the_dimensional_head_and_not_the_classifier(tmp_path):
    """Rows without a class but with (some) dimensions are kept; the categorical loss skips them,
    the CCC loss uses each dimension where present: no gradient reaches the classifier layers."""
    from serval.train.data import ClipDataset, read_split
    from serval.train.network import Forward, build_model, model_inputs

    found = [f for f in clips("ravdess", "Actor_01/*.flac")][:8]
    path = tmp_path / "dims.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "end", "label", "split", "arousal", "valence", "dominance"])
        for i, clip in enumerate(found):  # half TAVA-like (all three), half BAVED-like (arousal only)
            a = 0.1 + 0.1 * i
            w.writerow([clip, 1.0, "", "train", a, *((1 - a, 0.5 * a) if i < 4 else ("", ""))])
    cfg = load_config(None, [*TINY, *NO_DROPOUT, f"data.train={path}", f"out_dir={tmp_path / 'run'}"])
    examples = read_split(str(path), "train", cfg.model)
    assert len(examples) == 8 and all(ex.label == -1 for ex in examples)
    assert examples[5].dims[0] == pytest.approx(0.6) and examples[5].dims[1:] == (None, None)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = collate([ClipDataset(examples, cfg, train=False)[i] for i in range(8)])
    assert batch["dims_mask"].tolist() == [[True] * 3] * 4 + [[True, False, False]] * 4
    x, n = model_inputs(batch, model, cached=False, device=torch.device("cpu"))
    logits, scores = Forward(model, cached=False)(x, n)
    loss, ce, ccc = total_loss(logits, scores, batch, cfg.loss, None)
    assert ce.item() == 0.0 and ccc.item() > 0.0
    loss.backward()
    classifier = [*model.emotion_layer.parameters(), *model.emotion_classification_layer.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in classifier)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dim_layer.parameters())
    assert trained_dimensions(cfg, examples) == ("arousal", "valence", "dominance")
    assert trained_dimensions(cfg, examples[4:]) == ("arousal",)
    no_ccc = load_config(None, [*TINY, f"data.train={path}", "loss.ccc_weight=0"])
    assert trained_dimensions(no_ccc, examples) == ()


def test_feature_augmentation_crops_and_masks_cached_outputs():
    from serval.train.augment import augment_features, seeded_rng

    cfg = load_config(None, ["augment.crop_seconds=1.0", "augment.time_masks=2", "augment.channel_masks=1",
                             "augment.time_mask_frames=5", "augment.channel_mask_width=8", "data.train=x.csv"])  # fmt: skip
    hidden = torch.randn(3, 120, 64) + 5.0  # [L+1, T, d], no exact zeros
    out = augment_features(hidden, cfg.augment, seeded_rng(0, 1, 2))
    assert out.shape == (3, 50, 64)  # 1 s of 20 ms frames
    zero_frames = (out == 0).all(-1).all(0)
    zero_channels = (out == 0).all(-2).all(0)
    assert 0 < zero_frames.sum() <= 10 and 0 < zero_channels.sum() <= 8
    again = augment_features(hidden, cfg.augment, seeded_rng(0, 1, 2))
    assert torch.equal(out, again) and hidden.min() > 0  # seeded, and the input is untouched
    kept = out[:, ~zero_frames][:, :, ~zero_channels]
    assert (kept != 0).all()  # only the masked stretches are zero


def test_balanced_sampling_evens_out_corpora_and_class_weights_follow():
    exs = [Example(Clip("a", corpus="big", language="am"), 1.0, 0, None) for _ in range(90)]
    exs += [Example(Clip("b", corpus="small", language="en"), 1.0, 1, None) for _ in range(10)]
    w = balance_weights(exs, "corpus", 1.0)
    assert w[:90].sum() == pytest.approx(0.5) and w[90:].sum() == pytest.approx(0.5)
    root = balance_weights(exs, "language", 0.5)
    assert root[:90].sum() == pytest.approx(3 / 4)  # sqrt(90) : sqrt(10) = 3 : 1
    assert balance_weights(exs, "none", 0.5) is None
    sampler = BucketBatchSampler([1.0] * 100, 10, seed=0, weights=w)
    drawn = [i for b in sampler.batches(0) for i in b]
    assert len(drawn) == 100 and 30 < sum(i >= 90 for i in drawn) < 70
    assert sampler.batches(3) == sampler.batches(3)
    labels = [ex.label for ex in exs]
    assert class_weights_from_labels(labels, 2, w).tolist() == pytest.approx([1.0, 1.0])
    assert class_weights_from_labels(labels, 2).tolist()[1] == pytest.approx(5.0)


def test_trained_dimensions_are_saved_and_a_legacy_config_means_none(tmp_path):
    from serval.checkpoint import load_model

    save_model(SERModel(SERConfig.tiny(trained_dimensions=("arousal",))), tmp_path / "m")
    assert load_model(tmp_path / "m").config.trained_dimensions == ("arousal",)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["trained_dimensions"]  # a model saved before the field existed
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert load_model(tmp_path / "m").config.trained_dimensions == ()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_best_and_checkpoint_folders_follow_the_umask(tmp_path, umask_022):
    from serval.train.config import TrainConfig
    from serval.train.folder import temp_dir
    from serval.train.select import _write_best

    made = temp_dir(tmp_path, ".tmp-x-")
    assert stat.S_IMODE(made.stat().st_mode) == 0o755 and made.name.startswith(".tmp-x-")
    assert temp_dir(tmp_path, ".tmp-x-") != made
    run = types.SimpleNamespace(out=tmp_path / "run", training_data=None)
    run.out.mkdir()
    best = _write_best(run, TrainConfig(), "single", [], [SERModel(SERConfig.tiny())])
    assert best == run.out / "best" and (best / "model.safetensors").is_file()
    assert stat.S_IMODE(best.stat().st_mode) == 0o755


def test_logistic_regressions_are_fitted_on_one_blas_thread(monkeypatch):
    """lbfgs stops where the order of its sums leads it, and the BLAS thread count changes that order:
    the linear head and every probe are fitted on one thread, so that any core count gives one head."""
    from sklearn.linear_model import LogisticRegression

    from serval.train.linear_head import fit_logistic

    seen, real = [], LogisticRegression.fit
    monkeypatch.setattr(
        LogisticRegression,
        "fit",
        lambda self, *a, **k: seen.append(set(blas_threads())) or real(self, *a, **k),
    )
    rng = np.random.default_rng(0)
    scale = np.array([1, 1, 1, 1, 100])  # standardised first: the fifth column's scale is no weight
    x = rng.normal(size=(80, 5)) * scale
    y = np.where(x[:, 0] + 0.3 * rng.normal(size=80) > 0, "angry", "sad")
    before = blas_threads()
    clf = fit_logistic(x, y, c=0.5, sample_weight=np.ones(80))
    assert len(seen) == 1 and seen[0] <= {1} and blas_threads() == before  # one thread, then given back
    assert clf[-1].C == 0.5 and clf.score(x, y) > 0.85 and abs(clf[-1].coef_[0, 0]) > abs(clf[-1].coef_[0, 4])


def test_the_linear_heads_regularisation_is_the_configs(tmp_path):
    """select.linear_head_c is the logistic regression's C: a smaller C, smaller weights on the same clips;
    select.linear_head_temperature divides its logits."""
    from serval.train.data import ClipDataset, read_split
    from serval.train.linear_head import fit_linear_head
    from serval.train.network import build_model

    found = [f for f in clips("ravdess", "Actor_01/*.flac") if f.stem.split("-")[2] in ("01", "05")][:8]
    path = tmp_path / "two.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "end", "label", "split"])
        w.writerows([clip, 1.5, RAVDESS_CODES[clip.stem.split("-")[2]], "train"] for clip in found)
    heads = {}
    for c, t in ((1.0, 1.0), (0.01, 1.0), (1.0, 4.0)):
        sets = [*TINY, f"data.train={path}", f"out_dir={tmp_path / 'run'}", "model.layer_weighting=weighted"]
        cfg = load_config(
            None,
            [
                *sets,
                "select.linear_head=true",
                f"select.linear_head_c={c}",
                f"select.linear_head_temperature={t}",
            ],
        )
        torch.manual_seed(0)
        model = build_model(cfg)
        dataset = ClipDataset(read_split(str(path), "train", cfg.model), cfg, train=True)
        heads[c, t] = fit_linear_head(model, dataset, cfg, torch.device("cpu"), batch_size=4).linear_head
    assert 0 < heads[0.01, 1.0].weight.norm() < heads[1.0, 1.0].weight.norm() / 2
    # a temperature divides the logits (here weights and bias): the same class, softer probabilities
    sure, soft = heads[1.0, 1.0], heads[1.0, 4.0]
    assert torch.allclose(soft.weight * 4, sure.weight, rtol=1e-5, atol=1e-7)
    fitted = sure.bias > -1e3  # the classes the clips have (the rest are kept out by a large negative bias)
    assert torch.allclose(soft.bias[fitted] * 4, sure.bias[fitted], rtol=1e-5, atol=1e-6)
    for bad in ("select.linear_head_c=0", "select.linear_head_temperature=0"):
        with pytest.raises(ValueError, match=f"{bad.split('=')[0]} must be positive"):
            load_config(None, [*TINY, f"data.train={path}", bad])
