"""The training config: one `TrainConfig` dataclass of sections, read from YAML with `--set` overrides.

Every setting is type-checked on load; an unknown name or a wrong type is an error naming the setting.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from serval.model import SERConfig
from serval.settings import STRICT, parse_yaml, read


@dataclass
class DataConfig:
    __pydantic_config__ = STRICT

    train: str = ""  # manifest (CSV or JSONL); relative paths are relative to the working directory
    dev: str | None = None  # dev manifest (may be the same file with another split)
    test: str | None = None  # scored once with the final model
    train_split: str | None = None  # keep only rows whose `split` equals this (None: all rows)
    dev_split: str | None = None
    test_split: str | None = None
    max_seconds: float = 30.0  # training clips are cropped to this (random crop), eval clips to their start
    num_workers: int = 0  # DataLoader workers for audio decoding and augmentation
    balance: str = "none"  # none | corpus | language: draw training clips evenly over these groups
    balance_power: float = 0.5  # a clip of a group of n clips is drawn with probability ~ n^-power (1: equal)


@dataclass
class LossConfig:
    __pydantic_config__ = STRICT

    ce_weight: float = 1.0
    ccc_weight: float = 0.5
    label_smoothing: float = 0.1
    class_weights: str | list[float] | None = "auto"  # "auto" (inverse training frequency), a list, or None


@dataclass
class OptimConfig:
    __pydantic_config__ = STRICT

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
    __pydantic_config__ = STRICT

    mixup_prob: float = 0.5  # per batch
    mixup_alpha: float = 0.3  # lambda ~ Beta(alpha, alpha)
    noise_dir: str | None = None  # a MUSAN-style folder, or any folder of audio; None: no noise
    noise_prob: float = 0.5  # per clip
    snr_db: tuple[float, float] = (5.0, 20.0)
    speed_factors: tuple[float, ...] = (0.9, 1.0, 1.1)  # one drawn per clip; (1.0,): off
    pitch_semitones: tuple[float, ...] = ()  # one shift drawn per clip, tempo kept (WSOLA); (): off
    codecs: tuple[str, ...] = ()  # opus and/or mp3: a clip encoded and decoded by one of them; (): off
    codec_prob: float = 0.5  # per clip
    codec_compression: tuple[float, float] = (0.6, 1.0)  # libsndfile's level, 1: the lowest bitrate
    # On cached encoder outputs (frozen_cached training clips only), drawn per (seed, epoch, clip):
    crop_seconds: float = 0.0  # a random window of at most this many seconds of encoder frames; 0: whole clip
    time_masks: int = 0  # stretches of frames set to zero (SpecAugment-style, after the encoder)
    time_mask_frames: int = 10  # each at most this many 20 ms frames long
    channel_masks: int = 0  # bands of encoder channels set to zero, the same in every layer
    channel_mask_width: int = 32  # each at most this many channels wide


@dataclass
class SelectConfig:
    __pydantic_config__ = STRICT

    metric: str = "ce"  # ce (dev categorical loss, the paper) | uar (minus dev UAR): what ranks checkpoints
    patience: int = 3  # epochs without a better dev figure before stopping
    keep_best: int = 4
    average: str = "auto"  # predictions | weights | auto (whichever scores the higher dev UAR)
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: at epoch ends only)
    # then fit a linear classifier on the training clips' layer statistics and average its class
    # probabilities with the network's (model.linear_head, model.linear_weight; serval.train.linear_head)
    linear_head: bool = False
    linear_head_c: float = 1.0  # its inverse L2 strength (scikit-learn's C): smaller, more regularised
    # its logits divided by this before the softmax: the class it picks stays, its probabilities soften
    # (a regression that fits its training clips perfectly is too sure of itself on new voices)
    linear_head_temperature: float = 1.0


@dataclass
class CacheConfig:
    __pydantic_config__ = STRICT

    dir: str | None = None  # default: <out_dir>/cache; share one between runs to encode once
    dtype: str = "float16"
    augmented_copies: int = 0  # N seeded speed/pitch/noise/codec variants cached per training clip
    batch_size: int = 8


@dataclass
class TrainConfig:
    __pydantic_config__ = STRICT

    out_dir: str = "runs/serval"
    mode: str = "lora"  # lora | frozen_cached
    seed: int = 1337
    resume: str = "auto"  # auto (same config only) | force (config may differ: --resume) | never
    init_from: str | None = None  # a serval model dir to start from instead of `model` + its backbone
    # the class names the model learns, in output order (None: model.classes, default the 7; with init_from,
    # the starting model's); classes it shares by name with init_from keep their classifier rows
    labels: list[str] | None = None
    # the dimensional scores the model outputs (None: model.dimensions, or init_from's); [] for none,
    # or a subset such as [arousal]; those shared by name with init_from keep their rows
    dimensions: list[str] | None = None
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
        """Raise ValueError naming the first setting out of range, or settings that cannot work together."""
        if self.labels is not None:
            self.labels = [str(c).strip().lower() for c in self.labels]  # as manifests compare them
        problem = next((message for ok, message in _rules(self) if not ok), None)
        if problem:
            raise ValueError(problem)
        self.model.check(cached=self.mode == "frozen_cached", prefix="model.")
        if self.select.linear_head:  # the model it fits must be one the model's rules allow
            try:
                dataclasses.replace(self.model, linear_head=True).check(prefix="model.")
            except ValueError as e:
                raise ValueError(f"select.linear_head: {e}") from None
        classes = self.labels or self.model.classes
        if isinstance(self.loss.class_weights, list) and len(self.loss.class_weights) != len(classes):
            raise ValueError(
                f"loss.class_weights has {len(self.loss.class_weights)} numbers for {len(classes)} classes"
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


def _rules(c: TrainConfig) -> list[tuple[bool, str]]:
    """The training settings' ranges and choices, each with the message naming it (the model's own
    rules are `SERConfig.check`'s)."""
    a, o = c.augment, c.optim
    return [
        (c.mode in ("lora", "frozen_cached"), f"mode must be 'lora' or 'frozen_cached', not {c.mode!r}"),
        (c.resume in ("auto", "force", "never"), f"resume must be auto, force or never, not {c.resume!r}"),
        (bool(c.data.train), "data.train: no training manifest given"),
        (
            o.epochs > 0 and o.batch_size > 0 and o.grad_accum > 0,
            "optim.epochs, optim.batch_size and optim.grad_accum must be positive",
        ),
        (0.0 <= o.warmup_ratio < 1.0, "optim.warmup_ratio must be in [0, 1)"),
        (o.precision in ("auto", "bf16", "fp32"), "optim.precision must be auto, bf16 or fp32"),
        (
            c.select.average in ("auto", "predictions", "weights"),
            "select.average must be auto, predictions or weights",
        ),
        (c.select.keep_best >= 1, "select.keep_best must be at least 1"),
        (c.select.metric in ("ce", "uar"), "select.metric must be ce or uar"),
        (c.select.linear_head_c > 0, f"select.linear_head_c must be positive, got {c.select.linear_head_c}"),
        (
            c.select.linear_head_temperature > 0,
            f"select.linear_head_temperature must be positive, got {c.select.linear_head_temperature}",
        ),
        (a.snr_db[0] <= a.snr_db[1], "augment.snr_db must be (low, high)"),
        (
            all(f > 0 for f in a.speed_factors) and bool(a.speed_factors),
            "augment.speed_factors must be positive numbers",
        ),
        (
            all(-12 <= p <= 12 for p in a.pitch_semitones),
            "augment.pitch_semitones must be shifts within [-12, 12] semitones",
        ),
        (
            set(a.codecs) <= {"opus", "mp3"} and 0 <= a.codec_compression[0] <= a.codec_compression[1] <= 1,
            "augment.codecs must be opus and/or mp3, augment.codec_compression (low, high) within [0, 1]",
        ),
        (a.mixup_alpha > 0, "augment.mixup_alpha must be positive"),
        (a.crop_seconds >= 0, "augment.crop_seconds must be 0 (off) or positive"),
        (
            min(a.time_masks, a.channel_masks) >= 0 and min(a.time_mask_frames, a.channel_mask_width) >= 1,
            "augment.time_masks and channel_masks must be >= 0, their widths >= 1",
        ),
        (
            c.data.balance in ("none", "corpus", "language") and c.data.balance_power >= 0,
            "data.balance must be none, corpus or language, data.balance_power >= 0",
        ),
        (0.0 < c.data.max_seconds <= 30.0, "data.max_seconds must be in (0, 30]: one encoder pass"),
        (
            c.labels is None or (all(c.labels) and len(set(c.labels)) == len(c.labels) > 0),
            f"labels must be one or more distinct class names, not {c.labels!r}",
        ),
        (
            isinstance(c.loss.class_weights, list) or c.loss.class_weights in (None, "auto", "none"),
            "loss.class_weights must be 'auto', 'none' or a list of numbers",
        ),
    ]


def from_dict(cls, values: dict, source: str = ""):
    """A dataclass `cls` built from a (nested) dict by pydantic; an unknown name or a wrong type is a
    ValueError naming the setting (and `source`, the file, when given)."""
    return read(cls, values, source)


def set_value(cfg: TrainConfig, dotted: str, value) -> None:
    """Set one setting by its dotted name (`optim.lr_head`), type-checked."""
    values = cfg.to_dict()
    _set(values, dotted, value)
    checked = read(TrainConfig, values, f"--set {dotted}")
    for f in dataclasses.fields(TrainConfig):
        setattr(cfg, f.name, getattr(checked, f.name))


def _set(values: dict, dotted: str, value) -> None:
    """`values` (a config as plain values) with the setting `dotted` set; an unknown section is left to
    pydantic, which names it."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        values = values.setdefault(part, {})
        if not isinstance(values, dict):
            raise ValueError(f"unknown setting {dotted}")
    values[leaf] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """The YAML file `path` (or the defaults) with `key=value` overrides applied (values parsed as YAML);
    ValueError naming the setting and the file (or the --set) it came from."""
    raw = {}
    if path is not None:
        try:
            raw = parse_yaml(Path(path).read_text()) or {}
        except OSError as e:
            raise ValueError(f"{path}: cannot read the config ({e.strerror or e})") from e
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a mapping of settings")
    cfg = read(TrainConfig, raw, str(path) if path is not None else "")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        set_value(cfg, key.strip(), parse_yaml(text) if text.strip() else None)
    try:
        return cfg.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path is not None else str(e)) from None
