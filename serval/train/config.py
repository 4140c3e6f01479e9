"""The training config: one `TrainConfig` dataclass of sections, read from YAML with `--set` overrides.

Every setting is type-checked on load; an unknown name or a wrong type is an error naming the setting.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from serval.model import SERConfig


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
    balance: str = "none"  # none | corpus | language: draw training clips evenly over these groups
    balance_power: float = 0.5  # a clip of a group of n clips is drawn with probability ~ n^-power (1: equal)


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
    # On cached encoder outputs (frozen_cached training clips only), drawn per (seed, epoch, clip):
    crop_seconds: float = 0.0  # a random window of at most this many seconds of encoder frames; 0: whole clip
    time_masks: int = 0  # stretches of frames set to zero (SpecAugment-style, after the encoder)
    time_mask_frames: int = 10  # each at most this many 20 ms frames long
    channel_masks: int = 0  # bands of encoder channels set to zero, the same in every layer
    channel_mask_width: int = 32  # each at most this many channels wide


@dataclass
class SelectConfig:
    metric: str = "ce"  # ce (dev categorical loss, the paper) | uar (minus dev UAR): what ranks checkpoints
    patience: int = 3  # epochs without a better dev figure before stopping
    keep_best: int = 4
    average: str = "auto"  # predictions | weights | auto (whichever scores the higher dev UAR)
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: at epoch ends only)
    # then fit a linear classifier on the training clips' layer statistics and average its class
    # probabilities with the network's (model.linear_head; serval.train.linear_head)
    linear_head: bool = False


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
            (
                not self.select.linear_head or self.model.layer_weighting == "weighted",
                "select.linear_head needs model.layer_weighting 'weighted' (it reads every layer)",
            ),
            (self.select.metric in ("ce", "uar"), "select.metric must be ce or uar"),
            (self.augment.snr_db[0] <= self.augment.snr_db[1], "augment.snr_db must be (low, high)"),
            (
                all(f > 0 for f in self.augment.speed_factors) and self.augment.speed_factors,
                "augment.speed_factors must be positive numbers",
            ),
            (self.augment.mixup_alpha > 0, "augment.mixup_alpha must be positive"),
            (self.augment.crop_seconds >= 0, "augment.crop_seconds must be 0 (off) or positive"),
            (
                min(self.augment.time_masks, self.augment.channel_masks) >= 0
                and min(self.augment.time_mask_frames, self.augment.channel_mask_width) >= 1,
                "augment.time_masks and channel_masks must be >= 0, their widths >= 1",
            ),
            (
                self.data.balance in ("none", "corpus", "language") and self.data.balance_power >= 0,
                "data.balance must be none, corpus or language, data.balance_power >= 0",
            ),
            (0.0 < self.data.max_seconds <= 30.0, "data.max_seconds must be in (0, 30]: one encoder pass"),
            (
                not (self.mode == "frozen_cached" and self.model.lora_r > 0 and not self.model.lora_layers),
                "mode frozen_cached caches the encoder's outputs: LoRA there needs model.lora_layers "
                "(the top layers it re-runs), or set model.lora_r to 0",
            ),
            (
                not (self.mode == "frozen_cached" and self.model.lora_layers and self.model.lora_r > 0)
                or self.model.layer_weighting == "weighted",
                "model.lora_layers on cached outputs needs model.layer_weighting 'weighted' (every layer cached)",
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
        classes = self.labels or self.model.classes
        if self.labels is not None and (not self.labels or len(set(self.labels)) != len(self.labels)):
            raise ValueError(f"labels must be distinct class names, not {self.labels!r}")
        if self.labels is not None:
            self.labels = [str(c).strip().lower() for c in self.labels]  # as manifests compare them
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
