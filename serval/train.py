"""The MERaLiON-SER training recipe: `serval train CONFIG.yaml [--set key=value ...]`.

One `TrainConfig` holds every knob. The loop: length-bucketed, seeded, resumable batches ->
waveform augmentation (speed, noise) -> MixUp -> log-mel -> model -> 1.0 * weighted CE (label
smoothing 0.1) + 0.5 * CCC -> AdamW (LoRA and downstream groups) with cosine warm-up.
Each epoch ends with a dev evaluation; the 4 best checkpoints by dev categorical loss are kept
and combined into the final model (averaged predictions or averaged weights).

Two modes:
- `lora`: Whisper frozen, LoRA adapters on q/k/v trained with the downstream network (the paper).
- `frozen_cached`: the whole encoder frozen; its outputs are computed once per clip, stored by
  `serval.cache`, and only the downstream network trains (the CPU path).

Runs on one device, or on many through `torchrun` (DDP). Every random draw is seeded by
(seed, epoch, clip) or (seed, step, rank), so a run resumed after a crash continues exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import types
import typing
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from serval.atomic import atomic_write_text, replace_dir
from serval.model import SERConfig, SERModel

log = logging.getLogger("serval.train")

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".sph")

# ---------------------------------------------------------------------------- configuration


@dataclass
class DataConfig:
    train: str = ""  # manifest (CSV or JSONL); relative paths are relative to the working directory
    dev: str | None = None  # dev manifest (may be the same file with another split)
    test: str | None = None  # scored once with the final model
    train_split: str | None = None  # keep only rows whose `split` equals this (None: all rows)
    dev_split: str | None = None
    test_split: str | None = None
    max_seconds: float = 30.0  # training clips are cropped to this (random crop), eval clips to their start
    num_workers: int = 0  # DataLoader workers for audio decoding and augmentation


@dataclass
class LossConfig:
    ce_weight: float = 1.0
    ccc_weight: float = 0.5
    label_smoothing: float = 0.1
    class_weights: str | list[float] | None = "auto"  # "auto" (inverse training frequency), a list, or None


@dataclass
class OptimConfig:
    epochs: int = 15
    batch_size: int = 32  # global: all devices and accumulation steps together
    grad_accum: int = 1
    lr_lora: float = 5e-5
    wd_lora: float = 4e-5
    lr_head: float = 6e-4  # downstream network and heads
    wd_head: float = 8e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.08
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere), bf16, fp32


@dataclass
class AugmentConfig:
    mixup_prob: float = 0.5  # per batch
    mixup_alpha: float = 0.3  # lambda ~ Beta(alpha, alpha)
    noise_dir: str | None = None  # a MUSAN-style folder, or any folder of audio; None: no noise
    noise_prob: float = 0.5  # per clip
    snr_db: tuple[float, float] = (5.0, 20.0)
    speed_factors: tuple[float, ...] = (0.9, 1.0, 1.1)  # one drawn per clip; (1.0,): off


@dataclass
class SelectConfig:
    patience: int = 3  # epochs without a better dev categorical loss before stopping
    keep_best: int = 4
    average: str = "auto"  # predictions | weights | auto (whichever scores the higher dev UAR)
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: at epoch ends only)


@dataclass
class CacheConfig:
    dir: str | None = None  # default: <out_dir>/cache; share one between runs to encode once
    dtype: str = "float16"
    augmented_copies: int = 0  # N seeded speed/noise variants cached per training clip
    batch_size: int = 8


@dataclass
class TrainConfig:
    out_dir: str = "runs/serval"
    mode: str = "lora"  # lora | frozen_cached
    seed: int = 1337
    resume: str = "auto"  # auto (same config only) | force (config may differ) | never
    init_from: str | None = None  # a serval model dir to start from instead of `model` + its backbone
    zero_init_residual: bool = True  # new downstream blocks start as identity maps (not with init_from)
    device: str | None = None  # default: cuda:LOCAL_RANK when available, else cpu
    threads: int | None = None  # CPU threads for torch (None: torch's default); 1 on a busy shared machine
    progress: bool = True
    log_every: int = 10
    tensorboard: bool = True  # when the tensorboard package is installed
    model: SERConfig = field(default_factory=SERConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def validate(self) -> TrainConfig:
        """Raise ValueError for settings that cannot work together."""
        checks = [
            (
                self.mode in ("lora", "frozen_cached"),
                f"mode must be 'lora' or 'frozen_cached', not {self.mode!r}",
            ),
            (
                self.resume in ("auto", "force", "never"),
                f"resume must be auto, force or never, not {self.resume!r}",
            ),
            (bool(self.data.train), "data.train: no training manifest given"),
            (
                self.optim.epochs > 0 and self.optim.batch_size > 0 and self.optim.grad_accum > 0,
                "optim.epochs, optim.batch_size and optim.grad_accum must be positive",
            ),
            (0.0 <= self.optim.warmup_ratio < 1.0, "optim.warmup_ratio must be in [0, 1)"),
            (self.optim.precision in ("auto", "bf16", "fp32"), "optim.precision must be auto, bf16 or fp32"),
            (
                self.select.average in ("auto", "predictions", "weights"),
                "select.average must be auto, predictions or weights",
            ),
            (self.select.keep_best >= 1, "select.keep_best must be at least 1"),
            (self.augment.snr_db[0] <= self.augment.snr_db[1], "augment.snr_db must be (low, high)"),
            (
                all(f > 0 for f in self.augment.speed_factors) and self.augment.speed_factors,
                "augment.speed_factors must be positive numbers",
            ),
            (self.augment.mixup_alpha > 0, "augment.mixup_alpha must be positive"),
            (0.0 < self.data.max_seconds <= 30.0, "data.max_seconds must be in (0, 30]: one encoder pass"),
            (
                not (self.mode == "frozen_cached" and self.model.lora_r > 0),
                "mode frozen_cached freezes the whole encoder: set model.lora_r to 0",
            ),
            (
                isinstance(self.loss.class_weights, list)
                or self.loss.class_weights in (None, "auto", "none"),
                "loss.class_weights must be 'auto', 'none' or a list of numbers",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if isinstance(self.loss.class_weights, list) and len(self.loss.class_weights) != len(
            self.model.classes
        ):
            raise ValueError(
                f"loss.class_weights has {len(self.loss.class_weights)} numbers for "
                f"{len(self.model.classes)} classes"
            )
        return self

    def to_dict(self) -> dict:
        return _plain(asdict(self))


def _plain(x):
    """Tuples -> lists, recursively, so the config dumps as plain YAML."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _coerce(value, hint, name: str):
    """`value` checked (and converted: list -> tuple, int -> float) against the type `hint`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        if value is None and type(None) in arms:
            return None
        errors = []
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{name}: {value!r} is none of {hint}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping of settings, got {value!r}")
        return from_dict(hint, value, name)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{name}: expected {len(args)} values, got {len(value)}")
            items = [_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            arg = args[0] if args else typing.Any
            items = [_coerce(v, arg, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is typing.Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    raise ValueError(f"{name}: unsupported setting type {hint}")


def from_dict(cls, values: dict, where: str = ""):
    """A dataclass `cls` built from a (nested) dict; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown setting {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def set_value(cfg: TrainConfig, dotted: str, value) -> None:
    """Set one setting by its dotted name (`optim.lr_head`), type-checked."""
    *parents, leaf = dotted.split(".")
    target, where = cfg, ""
    for part in parents:
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise ValueError(f"unknown setting {dotted}")
        target, where = getattr(target, part), f"{where}.{part}" if where else part
    if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
        raise ValueError(f"unknown setting {dotted}")
    hint = typing.get_type_hints(type(target))[leaf]
    setattr(target, leaf, _coerce(value, hint, dotted))


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """The YAML file `path` (or the defaults) with `key=value` overrides applied (values parsed as YAML)."""
    raw = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ValueError(f"{path}: cannot read the config ({e.strerror or e})") from e
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a mapping of settings")
    try:
        cfg = from_dict(TrainConfig, raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        set_value(cfg, key.strip(), yaml.safe_load(text) if text.strip() else None)
    return cfg.validate()


# ---------------------------------------------------------------------------- losses


def ccc_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """1 - mean over dimensions of the concordance correlation coefficient, over samples where `mask`.

    Samples without dimensional labels (mask False) are skipped; fewer than two labelled samples give 0.
    """
    if mask is not None:
        pred, target = pred[mask.bool()], target[mask.bool()]
    if pred.shape[0] < 2:
        return pred.sum() * 0.0
    p, t = pred.float(), target.float()
    pm, tm = p.mean(0), t.mean(0)
    cov = ((p - pm) * (t - tm)).mean(0)
    denom = p.var(0, unbiased=False) + t.var(0, unbiased=False) + (pm - tm) ** 2
    return 1.0 - (2.0 * cov / (denom + eps)).mean()


def soft_cross_entropy(
    logits: Tensor, targets: Tensor, class_weights: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """Weighted, label-smoothed cross-entropy against (possibly mixed) target distributions `[B, C]`.

    For one-hot targets this equals `F.cross_entropy(logits, y, weight, label_smoothing)`. Rows of
    zeros (no categorical label) add nothing.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    targets = targets.float()
    c = logits.shape[-1]
    w = (
        torch.ones(c, device=logits.device)
        if class_weights is None
        else class_weights.to(logits.device).float()
    )
    mass = targets.sum(-1, keepdim=True)
    smoothed = (1.0 - label_smoothing) * targets + label_smoothing * mass / c
    denom = (targets * w).sum()
    if denom <= 0:
        return logits.sum() * 0.0
    return -(smoothed * w * logp).sum() / denom


def class_weights_from_labels(labels: list[int], n_classes: int) -> Tensor:
    """Inverse-frequency weights N / (K * n_c) over the K classes present; absent classes get 0."""
    counts = np.bincount([y for y in labels if y >= 0], minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def total_loss(logits, scores, batch, cfg: LossConfig, class_weights) -> tuple[Tensor, Tensor, Tensor]:
    """(ce_weight * CE + ccc_weight * CCC, CE, CCC) for one batch."""
    ce = soft_cross_entropy(logits, batch["targets"], class_weights, cfg.label_smoothing)
    ccc = ccc_loss(scores, batch["dims"], batch["dims_mask"]) if cfg.ccc_weight else scores.sum() * 0.0
    return cfg.ce_weight * ce + cfg.ccc_weight * ccc, ce, ccc


# ---------------------------------------------------------------------------- data


@dataclass
class Example:
    """A manifest row that passed the once-only check."""

    path: str
    start: float | None
    end: float | None
    duration: float  # of the span, seconds
    label: int  # class index, -1 when the row has no categorical label
    dims: tuple[float, float, float] | None


def check_rows(rows, classes: tuple[str, ...], dimensions: tuple[str, ...], where: str) -> list[Example]:
    """Keep the rows whose audio opens and whose span and labels are usable; log the rest with the cause."""
    from serval.audio import MIN_DURATION, AudioError, audio_info

    index = {c: i for i, c in enumerate(classes)}
    good, bad = [], []
    for row in rows:
        try:
            info = audio_info(row.path)
            start = row.start or 0.0
            end = min(row.end, info.duration) if row.end is not None else info.duration
            if start >= info.duration:
                raise ValueError(
                    f"span starts at {start:.2f} s, after the end of the audio ({info.duration:.2f} s)"
                )
            if end - start < MIN_DURATION:
                raise ValueError(f"span of {end - start:.3f} s is shorter than {MIN_DURATION} s")
            if row.label is not None and row.label not in index:
                raise ValueError(
                    f"label {row.label!r} is not one of the model's classes {', '.join(classes)}"
                )
            values = [getattr(row, d, None) for d in dimensions]
            dims = tuple(float(v) for v in values) if all(v is not None for v in values) else None
            if row.label is None and dims is None:
                raise ValueError("no categorical label and no dimensional labels")
            good.append(Example(row.path, row.start, row.end, end - start, index.get(row.label, -1), dims))
        except (AudioError, ValueError) as e:
            bad.append(f"{row.path}: {e}" if not isinstance(e, AudioError) else str(e))
    if bad:
        shown = "\n  ".join(bad[:10])
        more = f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else ""
        log.warning("%s: skipping %d of %d clips:\n  %s%s", where, len(bad), len(rows), shown, more)
    if not good:
        raise ValueError(f"{where}: no usable clips")
    return good


def read_split(path: str, split: str | None, model_cfg: SERConfig) -> list[Example]:
    """The checked examples of one manifest, restricted to one split when given."""
    from serval.manifest import read_manifest

    rows = read_manifest(path)
    if split is not None:
        rows = [r for r in rows if r.split == split]
        if not rows:
            raise ValueError(f"{path}: no rows with split {split!r}")
    where = f"{path}" + (f" (split {split})" if split else "")
    return check_rows(rows, tuple(model_cfg.classes), tuple(model_cfg.dimensions), where)


class NoiseBank:
    """The audio files under a folder (MUSAN layout or any), mixed in at a random SNR."""

    def __init__(self, folder: str | os.PathLike):
        from serval.audio import AudioError, audio_info

        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"{folder}: augment.noise_dir is not a folder")
        self.files, self.durations = [], []
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() not in AUDIO_EXTENSIONS or not p.is_file():
                continue
            try:
                d = audio_info(p).duration
            except AudioError as e:
                log.warning("noise: skipping %s", e)
                continue
            if d >= 0.1:
                self.files.append(str(p))
                self.durations.append(d)
        if not self.files:
            raise ValueError(f"{folder}: no readable audio files for augment.noise_dir")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` samples of one randomly chosen noise file at a random offset (tiled when the file is shorter)."""
        from serval.audio import SAMPLE_RATE, load_audio

        i = int(rng.integers(len(self.files)))
        want = n / SAMPLE_RATE
        if self.durations[i] > want + 0.01:
            start = float(rng.uniform(0.0, self.durations[i] - want - 0.01))
            noise = load_audio(self.files[i], start, start + want + 0.005)
        else:
            noise = load_audio(self.files[i])
        reps = -(-n // len(noise))
        return np.tile(noise, reps)[:n]


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`wave` + `noise` scaled so that 10 log10(P_wave / P_noise) = snr_db."""
    p_wave, p_noise = (
        float(np.mean(wave.astype(np.float64) ** 2)),
        float(np.mean(noise.astype(np.float64) ** 2)),
    )
    if p_wave <= 0 or p_noise <= 0:
        return wave
    scale = math.sqrt(p_wave / (p_noise * 10 ** (snr_db / 10)))
    return (wave + scale * noise).astype(np.float32)


def change_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    """Kaldi-style speed perturbation: resampling makes the clip `factor` times faster (pitch moves too)."""
    if factor == 1.0:
        return wave
    from serval.audio import SAMPLE_RATE, resample

    return resample(wave, round(SAMPLE_RATE * factor), SAMPLE_RATE)


def augment_wave(
    wave: np.ndarray, aug: AugmentConfig, noise: NoiseBank | None, rng: np.random.Generator
) -> np.ndarray:
    """Speed perturbation, then additive noise, each drawn from `rng`."""
    factor = float(aug.speed_factors[int(rng.integers(len(aug.speed_factors)))])
    wave = change_speed(wave, factor)
    if noise is not None and rng.random() < aug.noise_prob:
        wave = add_noise(wave, noise.sample(len(wave), rng), float(rng.uniform(*aug.snr_db)))
    return wave


def crop(wave: np.ndarray, max_samples: int, rng: np.random.Generator | None) -> np.ndarray:
    """At most `max_samples`: a random window with `rng`, the start without."""
    if len(wave) <= max_samples:
        return wave
    offset = int(rng.integers(len(wave) - max_samples + 1)) if rng is not None else 0
    return wave[offset : offset + max_samples]


def load_example(ex: Example, max_seconds: float, rng: np.random.Generator | None) -> np.ndarray:
    """The clip's span, reading at most what a `max_seconds` crop (before a 0.9x speed change) needs."""
    from serval.audio import load_audio

    start = ex.start or 0.0
    window = max_seconds / 0.9 + 0.1  # slack so that a slowed-down crop still fills max_seconds
    if ex.duration > window:
        offset = float(rng.uniform(0.0, ex.duration - window)) if rng is not None else 0.0
        return load_audio(ex.path, start + offset, start + offset + window)
    return load_audio(ex.path, ex.start, ex.end)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class ClipDataset(torch.utils.data.Dataset):
    """Waveforms of checked examples; item `(index, epoch)` is augmented with draws seeded by both."""

    def __init__(
        self, examples: list[Example], cfg: TrainConfig, train: bool, noise: NoiseBank | None = None
    ):
        self.examples, self.cfg, self.train, self.noise = examples, cfg, train, noise

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key):
        from serval.audio import SAMPLE_RATE, AudioError

        index, epoch = key if isinstance(key, tuple) else (key, 0)
        ex = self.examples[index]
        rng = _rng(self.cfg.seed, epoch, index) if self.train else None
        try:
            wave = load_example(ex, self.cfg.data.max_seconds, rng)
            if self.train:
                wave = augment_wave(wave, self.cfg.augment, self.noise, rng)
            wave = crop(wave, int(self.cfg.data.max_seconds * SAMPLE_RATE), rng)
        except AudioError as e:  # checked once at build time; a file that broke since is dropped, not fatal
            log.warning("dropping a clip from its batch: %s", e)
            return None
        return {
            "index": index,
            "input": torch.from_numpy(np.ascontiguousarray(wave)),
            **_targets(ex, self.cfg.model),
        }


class CachedDataset(torch.utils.data.Dataset):
    """Cached encoder outputs; item `(index, epoch)` picks the clean clip or one of its augmented copies."""

    def __init__(self, examples: list[Example], keys: list[list[str]], cache, cfg: TrainConfig, train: bool):
        self.examples, self.keys, self.cache, self.cfg, self.train = examples, keys, cache, cfg, train

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        variants = self.keys[index]
        v = int(_rng(self.cfg.seed, epoch, index, 1).integers(len(variants))) if self.train else 0
        try:
            hidden, _ = self.cache.get(variants[v])
        except KeyError as e:
            log.warning("dropping a clip from its batch: %s", e)
            return None
        return {"index": index, "input": hidden, **_targets(self.examples[index], self.cfg.model)}


def _targets(ex: Example, model_cfg: SERConfig) -> dict:
    target = torch.zeros(len(model_cfg.classes))
    if ex.label >= 0:
        target[ex.label] = 1.0
    dims = torch.tensor(
        ex.dims if ex.dims is not None else [0.0] * len(model_cfg.dimensions), dtype=torch.float32
    )
    return {"target": target, "dims": dims, "dims_mask": ex.dims is not None}


def collate(items: list[dict | None]) -> dict | None:
    """Pad inputs along time (waveforms `[B, S]`, encoder outputs `[B, (L+1,) T, d]`) and stack targets."""
    items = [x for x in items if x is not None]
    if not items:
        return None
    inputs = [x["input"] for x in items]
    time_dim = 0 if inputs[0].dim() == 1 else -2
    lengths = torch.tensor([x.shape[time_dim] for x in inputs], dtype=torch.long)
    shape = list(inputs[0].shape)
    shape[time_dim] = int(lengths.max())
    padded = inputs[0].new_zeros((len(inputs), *shape))
    for i, x in enumerate(inputs):
        if time_dim == 0:
            padded[i, : len(x)] = x
        else:
            padded[i, ..., : x.shape[-2], :] = x
    return {
        "index": torch.tensor([x["index"] for x in items]),
        "input": padded,
        "lengths": lengths,
        "targets": torch.stack([x["target"] for x in items]),
        "dims": torch.stack([x["dims"] for x in items]),
        "dims_mask": torch.tensor([x["dims_mask"] for x in items], dtype=torch.bool),
    }


def mixup(batch: dict, lam: float, perm: Tensor) -> dict:
    """MixUp of inputs, one-hot targets and dimensional targets with partner `perm` and weight `lam`.

    Inputs are mixed as padded tensors, so a mixed clip is as long as the longer of its pair; its
    dimensional target counts only when both partners have one.
    """
    out = dict(batch)
    out["input"] = lam * batch["input"] + (1.0 - lam) * batch["input"][perm]
    out["lengths"] = torch.maximum(batch["lengths"], batch["lengths"][perm])
    out["targets"] = lam * batch["targets"] + (1.0 - lam) * batch["targets"][perm]
    out["dims"] = lam * batch["dims"] + (1.0 - lam) * batch["dims"][perm]
    out["dims_mask"] = batch["dims_mask"] & batch["dims_mask"][perm]
    return out


class BucketBatchSampler:
    """Seeded, length-bucketed global batches, sharded over ranks and accumulation steps.

    Per epoch: shuffle, sort by length within buckets of `bucket_batches` batches, cut into global
    batches, shuffle the batches. The state to resume is (epoch, batches done), nothing more.
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        bucket_batches: int = 50,
    ):
        self.lengths = np.asarray(lengths, dtype=np.float64)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.bucket = batch_size * bucket_batches

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        rng = _rng(self.seed, epoch, 2)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        ordered = []
        for s in range(0, n, self.bucket):
            chunk = order[s : s + self.bucket]
            ordered.extend(chunk[np.argsort(self.lengths[chunk], kind="stable")].tolist())
        out = [ordered[s : s + self.batch_size] for s in range(0, n, self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def __len__(self) -> int:
        n = (
            len(self.lengths) // self.batch_size
            if self.drop_last
            else -(-len(self.lengths) // self.batch_size)
        )
        return n

    @staticmethod
    def shard(batch: list[int], rank: int, world: int, accum: int) -> list[list[int]]:
        """This rank's micro-batches of a global batch: contiguous pieces, piece a*world + rank."""
        pieces = np.array_split(np.asarray(batch), world * accum)
        return [pieces[a * world + rank].tolist() for a in range(accum)]


# ---------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (RANK/WORLD_SIZE env), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device is None:
        device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # "cuda": this process's GPU
            dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist, dev


def _all_gather_tensor(x: Tensor, dist: Dist) -> Tensor:
    """Concatenate `x` over ranks, with gradients flowing back to every rank's own piece."""
    if dist.world == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with (
        warnings.catch_warnings()
    ):  # deprecated, but still the differentiable all-gather that works with gloo
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


def _all_gather_plain(x: Tensor, dist: Dist) -> Tensor:
    """Concatenate `x` over ranks, without gradients (targets)."""
    if dist.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _pad_rows(x: Tensor, n: int) -> Tensor:
    """`x` with zero rows appended up to `n` rows."""
    return torch.cat([x, x.new_zeros((n - len(x), *x.shape[1:]))]) if len(x) < n else x


def _gather_objects(obj, dist: Dist) -> list:
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


# ---------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig) -> SERModel:
    """The model to train: from `init_from`, from `model.backbone`, or random (tests only)."""
    model_cfg = dataclasses.replace(cfg.model)
    if cfg.init_from:
        start = SERModel.from_pretrained(cfg.init_from)
        # Training choices come from this config; the architecture comes from the checkpoint.
        keep = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "gradient_checkpointing", "proj_dropout",
                "embed_dropouts")  # fmt: skip
        model_cfg = dataclasses.replace(start.config, **{k: getattr(cfg.model, k) for k in keep})
        model = SERModel(model_cfg)
        merged = start.merged_state_dict()
        prefix = "whisper.encoder."
        model.load_backbone_state({k[len(prefix) :]: v for k, v in merged.items() if k.startswith(prefix)})
        rest = {k: v for k, v in merged.items() if not k.startswith("whisper.")}
        missing, unexpected = model.load_state_dict(rest, strict=False)
        if unexpected or any(not k.startswith("whisper.") for k in missing):
            raise KeyError(f"{cfg.init_from}: does not fit the model (unexpected {unexpected[:5]})")
    else:
        if model_cfg.backbone:
            model = SERModel.from_backbone(model_cfg)
        else:
            log.warning("model.backbone is empty: the Whisper encoder is random (only useful for tests)")
            model = SERModel(model_cfg)
        if cfg.zero_init_residual:
            zero_init_residual(model)
    model.freeze_backbone()
    for p in model.lora_parameters():
        p.requires_grad_(True)
    return model


def zero_init_residual(model: SERModel) -> None:
    """Zero the scale of the last GroupNorm of every SE-Res2 block, so each block starts as the identity.

    From scratch, the downstream network otherwise sits on a long loss plateau (on frozen whisper-base
    outputs of 64 RAVDESS clips: CE 1.59 after 60 full-batch steps, against 0.20 with this; Goyal et
    al. 2017 do the same for ResNets). Only the initial values change, not the architecture.
    """
    with torch.no_grad():
        for block in model.downstream_model.blocks:
            block.norm2.weight.zero_()


class _Forward(nn.Module):
    """What DDP wraps: the full model on log-mel in `lora` mode, the head on cached outputs otherwise."""

    def __init__(self, model: SERModel, cached: bool):
        super().__init__()
        self.model, self.cached = model, cached

    def forward(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        out = self.model.head(x, lengths) if self.cached else self.model(x, lengths)
        return out.logits, out.scores


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over the first warmup_ratio of steps, then cosine decay to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _save_model(model: SERModel, directory: Path) -> None:
    # Without a backbone source the encoder must travel with the weights.
    model.save_pretrained(directory, include_backbone=not model.config.backbone)


def load_checkpoint(model: SERModel, directory: Path) -> SERModel:
    """A copy of `model` with the trained tensors of checkpoint `directory` (the backbone is shared, not reloaded)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / "model.safetensors"))
    copy = deepcopy(model)
    own = copy.state_dict()
    wrong = sorted(k for k in state if k not in own)
    if wrong:
        raise KeyError(f"{directory}: tensors that do not fit the model: {wrong[:5]}")
    copy.load_state_dict(state, strict=False)
    return copy.eval()


def average_models(models: list[SERModel]) -> SERModel:
    """One model whose tensors are the means of `models`' (LoRA merged first, so the mean is exact)."""
    states = [m.merged_state_dict() for m in models]
    mean = {}
    for k, first in states[0].items():
        same = all(torch.equal(first, s[k]) for s in states[1:])  # frozen tensors stay bit-exact
        mean[k] = first if same else (sum(s[k].float() for s in states) / len(states)).to(first.dtype)
    lora = models[0].config.lora_r > 0
    config = dataclasses.replace(models[0].config, lora_r=0)
    if lora:  # the merged encoder differs from the backbone, so it is saved whole
        config.backbone = None
    model = SERModel(config).to(next(iter(mean.values())).device)
    model.load_state_dict(mean)
    return model.eval()


# ---------------------------------------------------------------------------- the run


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # global batches of `epoch` already done
    best: list = field(default_factory=list)  # [dev_loss, checkpoint name, epoch], best first
    best_loss: float = math.inf
    bad_epochs: int = 0
    stopped: bool = False


class Run:
    """The output folder: config, metrics, checkpoints, the pointer to the last one, the final model."""

    VOLATILE = ("resume", "progress", "log_every", "tensorboard", "device", "threads", "data.num_workers")

    def __init__(self, cfg: TrainConfig, dist: Dist):
        self.cfg, self.dist, self.out = cfg, dist, Path(cfg.out_dir)
        self.ckpts = self.out / "checkpoints"

    def _comparable(self, d: dict) -> dict:
        d = json.loads(json.dumps(d))
        for key in self.VOLATILE:
            *parents, leaf = key.split(".")
            node = d
            for p in parents:
                node = node.get(p, {})
            node.pop(leaf, None)
        return d

    def last_checkpoint(self) -> Path | None:
        pointer = self.out / "last"
        if not pointer.is_file():
            return None
        path = self.out / pointer.read_text().strip()
        return path if (path / "trainer_state.pt").is_file() else None

    def prepare(self) -> Path | None:
        """Check the folder may be used; returns the checkpoint to resume from, if any."""
        cfg = self.cfg
        saved = self.out / "config.yaml"
        if self.out.exists() and any(self.out.iterdir()):
            if not saved.is_file():
                raise ValueError(
                    f"{self.out}: output folder is not empty and holds no serval run; choose another"
                )
            if cfg.resume == "never":
                raise ValueError(f"{self.out}: holds a run already (resume: never); choose another out_dir")
            old = yaml.safe_load(saved.read_text()) or {}
            if cfg.resume == "auto" and self._comparable(old) != self._comparable(cfg.to_dict()):
                raise ValueError(
                    f"{self.out}: holds a run with a different config; use another out_dir, or resume=force "
                    "to continue it with this config"
                )
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(saved, yaml.safe_dump(cfg.to_dict(), sort_keys=False), overwrite=True)
        return self.last_checkpoint() if saved.is_file() else None

    def save(self, model: SERModel, state: RunState, trainer_state: dict) -> Path:
        """Write checkpoint step-XXXXXX atomically (temp dir, then rename) and point `last` at it."""
        name = f"step-{state.step:06d}"
        final = self.ckpts / name
        self.ckpts.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.ckpts, prefix=f".tmp-{name}-"))
        _save_model(model, tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        replace_dir(tmp, final)  # the same step can be saved again after a resume
        atomic_write_text(self.out / "last", f"checkpoints/{name}\n", overwrite=True)
        keep = {name} | {b[1] for b in state.best}
        for d in self.ckpts.iterdir():
            if d.name not in keep:  # superseded checkpoints and temp dirs of crashed saves
                shutil.rmtree(d, ignore_errors=True)
        return final


class MetricsLog:
    """metrics.csv (one row per log interval and per evaluation) and TensorBoard when installed."""

    COLUMNS = ("step", "epoch", "split", "loss", "ce", "ccc", "uar", "lr_lora", "lr_head", "seconds")

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path, self.enabled, self.tb = out / "metrics.csv", enabled, None
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.is_file():  # drop rows past the checkpoint we resume from
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.COLUMNS)
            w.writeheader()
            w.writerows(rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, **row) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow({k: _fmt(row.get(k)) for k in self.COLUMNS})
        if self.tb is not None:
            for k in ("loss", "ce", "ccc", "uar", "lr_lora", "lr_head"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"{row['split']}/{k}", row[k], row["step"])
            self.tb.flush()


def _fmt(v):
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_cache(
    model: SERModel, datasets: dict[str, list[Example]], cfg: TrainConfig, dist: Dist, device: torch.device
) -> tuple:
    """Encode every clip (and `augmented_copies` seeded variants of training clips) not cached yet.

    Returns (cache, {split: [[key of variant 0, 1, …] per example]}, clips encoded by this rank).
    """
    from serval.audio import SAMPLE_RATE, AudioError
    from serval.cache import EncoderCache, encoder_settings

    cache = EncoderCache(
        cfg.cache.dir or Path(cfg.out_dir) / "cache", encoder_settings(model, cfg.cache.dtype)
    )
    noise = NoiseBank(cfg.augment.noise_dir) if cfg.augment.noise_dir and cfg.cache.augmented_copies else None
    if cfg.cache.augmented_copies and noise is None and tuple(cfg.augment.speed_factors) == (1.0,):
        raise ValueError(
            "cache.augmented_copies needs augmentation: set augment.noise_dir or augment.speed_factors"
        )
    max_samples = int(cfg.data.max_seconds * SAMPLE_RATE)
    model.to(device)
    keys, encoded, chunk = {}, 0, 64
    for split, examples in datasets.items():
        copies = cfg.cache.augmented_copies if split == "train" else 0
        keys[split] = [[] for _ in examples]
        starts = range(0, len(examples), chunk)
        if cfg.progress and dist.main:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"encoder cache ({split})", unit="chunk", leave=False, file=sys.stderr)
        for n, s in enumerate(starts):
            waves, wave_keys, owners = [], [], []
            for i in range(s, min(s + chunk, len(examples))):
                ex = examples[i]
                try:
                    clean = load_example(ex, cfg.data.max_seconds, None)
                except AudioError as e:
                    log.warning("not cached, dropped: %s", e)
                    continue
                for v in range(copies + 1):
                    if v == 0:
                        wave = crop(clean, max_samples, None)
                    else:
                        rng = _rng(cfg.seed, 3, i, v)
                        wave = crop(augment_wave(clean, cfg.augment, noise, rng), max_samples, rng)
                    key = cache.key(wave)
                    keys[split][i].append(key)
                    waves.append(wave)
                    wave_keys.append(key)
                    owners.append(n % dist.world == dist.rank)
            mine = [j for j, own in enumerate(owners) if own]
            encoded += cache.encode_missing(
                model,
                [waves[j] for j in mine],
                [wave_keys[j] for j in mine],
                cfg.cache.batch_size,
                device,
                progress=False,
            )
        dropped = [i for i, k in enumerate(keys[split]) if not k]
        if dropped:
            datasets[split] = [ex for i, ex in enumerate(examples) if keys[split][i]]
            keys[split] = [k for k in keys[split] if k]
    _barrier(dist)
    return cache, keys, encoded


def _autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.optim.precision == "bf16" or (cfg.optim.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _model_inputs(batch: dict, model: SERModel, cached: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """(input, lengths) for `_Forward`: log-mel from waveforms, or the cached encoder outputs as they are."""
    if cached:
        return batch["input"].to(device), batch["lengths"].to(device)
    from serval.features import compute_features

    waves = [w[:n] for w, n in zip(batch["input"], batch["lengths"].tolist())]
    feats, frames = compute_features(
        waves, n_mels=model.config.n_mels, pad_to_30s=model.config.pad_to_30s, device=device
    )
    return feats, frames.to(device)


@torch.no_grad()
def predict(
    models: list[SERModel], dataset, cfg: TrainConfig, device: torch.device, dist: Dist, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean class probabilities, mean scores, example indices) of `models` over `dataset`, sharded over ranks."""
    cached = isinstance(dataset, CachedDataset)
    lengths = [ex.duration for ex in dataset.examples]
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])[dist.rank :: dist.world]
    probs, scores, indices = [], [], []
    for m in models:
        m.eval()
    for s in range(0, len(order), batch_size):
        batch = collate([dataset[i] for i in order[s : s + batch_size]])
        if batch is None:
            continue
        x, n = _model_inputs(batch, models[0], cached, device)
        p = torch.zeros(len(batch["index"]), len(models[0].config.classes), device=device)
        d = torch.zeros(len(batch["index"]), len(models[0].config.dimensions), device=device)
        with _autocast(cfg, device):
            for m in models:
                out = m.head(x, n) if cached else m(x, n)
                p += out.logits.float().softmax(-1) / len(models)
                d += out.scores.float() / len(models)
        probs.append(p.cpu().numpy())
        scores.append(d.cpu().numpy())
        indices.append(batch["index"].numpy())
    parts = _gather_objects((probs, scores, indices), dist)
    flat = [
        np.concatenate(sum((list(part[j]) for part in parts), []))
        if any(part[j] for part in parts)
        else np.zeros((0,))
        for j in range(3)
    ]
    order = np.argsort(flat[2], kind="stable")
    return flat[0][order], flat[1][order], flat[2][order]


def score(
    probs: np.ndarray,
    dims: np.ndarray,
    indices: np.ndarray,
    examples: list[Example],
    cfg: TrainConfig,
    class_weights: Tensor | None,
) -> dict:
    """Dev/test figures of the predicted `examples[indices]`: categorical loss (the selection criterion),
    UAR, accuracy, CCC per dimension."""
    examples = [examples[int(i)] for i in indices]  # a clip that failed to load has no prediction
    labels = np.array([ex.label for ex in examples])
    has = labels >= 0
    out = {"n": len(examples)}
    if has.any():
        y, p = labels[has], probs[has]
        targets = F.one_hot(torch.from_numpy(y), p.shape[1]).float()
        logp = torch.from_numpy(np.log(np.clip(p, 1e-12, 1.0)))
        out["ce"] = float(soft_cross_entropy(logp, targets, class_weights, cfg.loss.label_smoothing))
        pred = p.argmax(1)
        recalls = {cfg.model.classes[c]: float((pred[y == c] == c).mean()) for c in np.unique(y)}
        out["uar"] = float(np.mean(list(recalls.values())))
        out["accuracy"] = float((pred == y).mean())
        out["recall"] = recalls
    with_dims = np.array([ex.dims is not None for ex in examples])
    if with_dims.sum() >= 2:
        t = torch.tensor([ex.dims for ex in examples if ex.dims is not None])
        s = torch.from_numpy(dims[with_dims])
        out["ccc"] = {
            name: float(1 - ccc_loss(s[:, j : j + 1], t[:, j : j + 1]))
            for j, name in enumerate(cfg.model.dimensions)
        }
    return out


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) the training `cfg` describes; returns the final model folder `<out_dir>/best`."""

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist, device = setup_distributed(cfg.device)
    cached = cfg.mode == "frozen_cached"
    # Identical initial weights on every rank: the same seed before the model is built.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    cfg = dataclasses.replace(cfg, model=model.config)  # resolved: dims from the backbone or init_from
    run = Run(cfg, dist)
    # Rank 0 alone checks the folder (no race with its own writes) and tells the others.
    decision: tuple = (None, None)
    if dist.main:
        try:
            decision = (run.prepare(), None)
        except ValueError as e:
            decision = (None, str(e))
    resume_from, error = _gather_objects(decision, dist)[0]
    if error:
        raise ValueError(error)
    splits = {"train": read_split(cfg.data.train, cfg.data.train_split, model.config)}
    if cfg.data.dev:
        splits["dev"] = read_split(cfg.data.dev, cfg.data.dev_split, model.config)
    if cfg.data.test:
        splits["test"] = read_split(cfg.data.test, cfg.data.test_split, model.config)
    if isinstance(cfg.loss.class_weights, list):
        class_weights = torch.tensor(cfg.loss.class_weights, dtype=torch.float32)
    elif cfg.loss.class_weights == "auto":
        class_weights = class_weights_from_labels(
            [ex.label for ex in splits["train"]], len(model.config.classes)
        )
    else:
        class_weights = None

    if cached:
        cache, keys, encoded = prepare_cache(model, splits, cfg, dist, device)
        if dist.main:
            total = len({k for split in keys.values() for ks in split for k in ks})
            log.info(
                "encoder cache %s: %d encoded now, %d reused (clips and augmented copies)",
                cache.root,
                encoded,
                total - encoded,
            )
        datasets = {s: CachedDataset(ex, keys[s], cache, cfg, train=s == "train") for s, ex in splits.items()}
    else:
        noise = NoiseBank(cfg.augment.noise_dir) if cfg.augment.noise_dir else None
        datasets = {s: ClipDataset(ex, cfg, train=s == "train", noise=noise) for s, ex in splits.items()}
    train_set = datasets["train"]

    world, accum = dist.world, cfg.optim.grad_accum
    if cfg.optim.batch_size % (world * accum):
        raise ValueError(
            f"optim.batch_size {cfg.optim.batch_size} is not divisible by "
            f"{world} devices x {accum} accumulation steps"
        )
    micro = cfg.optim.batch_size // (world * accum)
    seconds = [min(ex.duration, cfg.data.max_seconds) for ex in train_set.examples]
    sampler = BucketBatchSampler(seconds, cfg.optim.batch_size, cfg.seed)
    steps_per_epoch = len(sampler)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.data.train}: {len(seconds)} clips are fewer than one batch of {cfg.optim.batch_size}"
        )
    total_steps = cfg.optim.epochs * steps_per_epoch

    model.to(device)
    lora, head = model.lora_parameters(), model.downstream_parameters()
    groups = [{"params": head, "lr": cfg.optim.lr_head, "weight_decay": cfg.optim.wd_head, "name": "head"}]
    if lora:
        groups.insert(
            0, {"params": lora, "lr": cfg.optim.lr_lora, "weight_decay": cfg.optim.wd_lora, "name": "lora"}
        )
    optimizer = torch.optim.AdamW(groups, betas=cfg.optim.betas, eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, cfg.optim.warmup_ratio)
    )
    forward = _Forward(model, cached)
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    trainable = [p for p in model.parameters() if p.requires_grad]

    state = RunState()
    if resume_from is not None:
        saved = torch.load(resume_from / "trainer_state.pt", map_location="cpu", weights_only=False)
        from safetensors.torch import load_file

        weights = load_file(str(resume_from / "model.safetensors"))
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = RunState(**saved["run"])
        _set_rng_state(saved["rng"][min(dist.rank, len(saved["rng"]) - 1)])
        if dist.main:
            log.info(
                "resuming from %s (step %d, epoch %d, batch %d)",
                resume_from,
                state.step,
                state.epoch,
                state.position,
            )
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank
    metrics = MetricsLog(run.out, dist.main, cfg.tensorboard, state.step if resume_from else None)

    def checkpoint() -> None:
        rngs = _gather_objects(_rng_state(), dist)
        if dist.main:
            trainer_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "run": asdict(state),
                "rng": rngs,
                "steps_per_epoch": steps_per_epoch,
            }
            path = run.save(model, state, trainer_state)
            log.info("checkpoint %s saved", path.name)
        _barrier(dist)

    started = time.time()
    while state.epoch < cfg.optim.epochs and not state.stopped:
        batches = sampler.batches(state.epoch)
        work = [
            [(i, state.epoch) for i in mb]
            for b in batches[state.position :]
            for mb in BucketBatchSampler.shard(b, dist.rank, world, accum)
        ]
        # An own generator: a DataLoader would otherwise draw from the global RNG, and a resumed run
        # (new loader mid-epoch) would then see other dropout masks than an uninterrupted one.
        loader = torch.utils.data.DataLoader(
            train_set,
            batch_sampler=work,
            collate_fn=collate,
            num_workers=cfg.data.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed + state.epoch),
        )
        bar = None
        if cfg.progress and dist.main:
            from tqdm import tqdm

            bar = tqdm(
                total=steps_per_epoch,
                initial=state.position,
                desc=f"epoch {state.epoch + 1}/{cfg.optim.epochs}",
                unit="step",
                leave=False,
                file=sys.stderr,
            )
        forward.train()
        sums, count = np.zeros(3), 0
        loader_iter = iter(loader)
        for _ in range(len(batches) - state.position):
            optimizer.zero_grad(set_to_none=True)
            for a in range(accum):
                batch = next(loader_iter)
                if batch is None:
                    raise RuntimeError(
                        f"every clip of a batch failed to load at step {state.step}; see the warnings"
                    )
                if cfg.augment.mixup_prob > 0:
                    rng = _rng(cfg.seed, 4, state.step, dist.rank, a)
                    if rng.random() < cfg.augment.mixup_prob:
                        lam = float(rng.beta(cfg.augment.mixup_alpha, cfg.augment.mixup_alpha))
                        batch = mixup(batch, lam, torch.from_numpy(rng.permutation(len(batch["index"]))))
                x, n = _model_inputs(batch, model, cached, device)
                sync = a == accum - 1 or world == 1
                with contextlib.nullcontext() if sync else forward.no_sync(), _autocast(cfg, device):
                    logits, scores = forward(x, n)
                    local = {k: batch[k].to(device) for k in ("targets", "dims", "dims_mask")}
                    if (
                        world > 1 and len(logits) < micro
                    ):  # a clip failed to load: equal pieces for the gather
                        logits, scores = _pad_rows(logits.float(), micro), _pad_rows(scores.float(), micro)
                        local = {
                            k: _pad_rows(v, micro) for k, v in local.items()
                        }  # zero rows count for nothing
                    # The loss of the whole (all-rank) micro-batch: CCC is a batch statistic, so the
                    # pieces are gathered; DDP's gradient mean over ranks then equals one device's gradient.
                    loss, ce, ccc = total_loss(
                        _all_gather_tensor(logits.float(), dist),
                        _all_gather_tensor(scores.float(), dist),
                        {k: _all_gather_plain(v, dist) for k, v in local.items()},
                        cfg.loss,
                        class_weights,
                    )
                    (loss / accum).backward()
                sums += np.array([loss.item(), ce.item(), ccc.item()]) / accum
            if cfg.optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.position += 1
            count += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums[0] / count:.3f}")
            if state.step % cfg.log_every == 0 or state.position == len(batches):
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
                metrics.write(
                    step=state.step,
                    epoch=state.epoch + 1,
                    split="train",
                    loss=sums[0] / count,
                    ce=sums[1] / count,
                    ccc=sums[2] / count,
                    lr_lora=lrs.get("lora"),
                    lr_head=lrs["head"],
                    seconds=round(time.time() - started, 1),
                )
                sums, count = np.zeros(3), 0
            if (
                cfg.select.checkpoint_every
                and state.step % cfg.select.checkpoint_every == 0
                and state.position < len(batches)
            ):
                checkpoint()
        if bar is not None:
            bar.close()

        # epoch end: evaluate, rank checkpoints by dev categorical loss, maybe stop early
        state.epoch += 1
        state.position = 0
        name = f"step-{state.step:06d}"
        if "dev" in datasets:
            result = predict([model], datasets["dev"], cfg, device, dist, micro)
            dev = score(*result, datasets["dev"].examples, cfg, class_weights)
            dev_loss = dev.get("ce", math.inf)
            metrics.write(
                step=state.step,
                epoch=state.epoch,
                split="dev",
                ce=dev.get("ce"),
                uar=dev.get("uar"),
                seconds=round(time.time() - started, 1),
            )
            if dist.main:
                log.info(
                    "epoch %d: dev categorical loss %.4f, UAR %.4f",
                    state.epoch,
                    dev_loss,
                    dev.get("uar", math.nan),
                )
            state.best = sorted(state.best + [[dev_loss, name, state.epoch]])[: cfg.select.keep_best]
            if dev_loss < state.best_loss:
                state.best_loss, state.bad_epochs = dev_loss, 0
            else:
                state.bad_epochs += 1
                if state.bad_epochs >= cfg.select.patience:
                    state.stopped = True
                    if dist.main:
                        log.info("early stop: no better dev loss for %d epochs", state.bad_epochs)
        else:
            state.best = [[0.0, name, state.epoch]]  # no dev set: the final model is the last one
        checkpoint()

    if dist.main:
        finish(run, state, model, datasets, cfg, device, class_weights, micro)
    _barrier(dist)
    metrics_close = getattr(metrics.tb, "close", None)
    if metrics_close:
        metrics_close()
    return run.out / "best"


def finish(
    run: Run,
    state: RunState,
    model: SERModel,
    datasets: dict,
    cfg: TrainConfig,
    device: torch.device,
    class_weights,
    batch_size: int,
) -> Path:
    """Combine the best checkpoints into `<out>/best` (ensemble or weight average), score dev and test."""
    single = Dist()
    members = [run.ckpts / name for _, name, _ in sorted(state.best)]
    report = {"members": [m.name for m in members], "dev_loss": [b[0] for b in sorted(state.best)]}
    candidates = {}
    ensemble = [load_checkpoint(model, m) for m in members]
    averaged = average_models(ensemble) if len(members) > 1 else None
    if "dev" in datasets and len(members) > 1:
        for kind, models in (("predictions", ensemble), ("weights", [averaged])):
            result = predict(models, datasets["dev"], cfg, device, single, batch_size)
            candidates[kind] = score(*result, datasets["dev"].examples, cfg, class_weights)
            report[f"dev_{kind}"] = candidates[kind]
    choice = cfg.select.average
    if len(members) == 1:
        choice = "single"
    elif choice == "auto":
        if candidates:
            uar = {k: v.get("uar", -1.0) for k, v in candidates.items()}
            choice = "weights" if uar["weights"] >= uar["predictions"] else "predictions"
        else:
            choice = "predictions"
    report["chosen"] = choice

    tmp = Path(tempfile.mkdtemp(dir=run.out, prefix=".tmp-best-"))
    if choice == "predictions":
        names = []
        for i, m in enumerate(members):
            shutil.copytree(m, tmp / f"member-{i}", ignore=shutil.ignore_patterns("trainer_state.pt"))
            names.append(f"member-{i}")
        (tmp / "ensemble.json").write_text(
            json.dumps(
                {
                    "format": "serval-ensemble",
                    "combine": "mean",
                    "members": names,
                    "checkpoints": report["members"],
                },
                indent=2,
            )
            + "\n"
        )
        final_models = ensemble
    else:
        final = averaged if choice == "weights" else ensemble[0]
        _save_model(final, tmp)
        final_models = [final]
    (tmp / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    best = replace_dir(tmp, run.out / "best")

    if "test" in datasets:
        result = predict(final_models, datasets["test"], cfg, device, single, batch_size)
        report["test"] = score(*result, datasets["test"].examples, cfg, class_weights)
        log.info(
            "test UAR %.4f (%s, %d clips)", report["test"].get("uar", math.nan), choice, report["test"]["n"]
        )
    atomic_write_text(run.out / "final.json", json.dumps(report, indent=2) + "\n", overwrite=True)
    log.info("final model (%s of %d checkpoints) in %s", choice, len(members), best)
    return best


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config (YAML), e.g. configs/whisper-base-cpu.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, dotted for nested ones (optim.lr_head=3e-4); repeatable",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"serval train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        best = train(cfg)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"serval train: {e}", file=sys.stderr)
        return 1
    if rank == 0:
        print(best)
    return 0
