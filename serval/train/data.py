"""Manifest rows checked once, the datasets of waveforms or cached encoder outputs, and collation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from serval.clip import Clip
from serval.model import SERConfig, SERModel
from serval.progress import progress_bar
from serval.train.augment import NoiseBank, augment_features, augment_wave, seeded_rng
from serval.train.config import TrainConfig
from serval.train.ddp import Dist, barrier
from serval.vocab import SAMPLE_RATE

log = logging.getLogger("serval.train")


@dataclass
class Example:
    """A manifest clip that passed the once-only check, with the targets training reads off it."""

    clip: (
        Clip  # where the audio is and who and what it is (corpus, language, speaker for balance and records)
    )
    duration: float  # of the span, seconds
    label: int  # index into the model's classes, -1 when the clip has no categorical label
    dims: (
        tuple[float | None, ...] | None
    )  # in the model's dimension order, None where unrated; None: none at all


def check_rows(
    rows: list[Clip], classes: tuple[str, ...], dimensions: tuple[str, ...], where: str
) -> list[Example]:
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
            # Each dimension on its own: BAVED rates arousal only, and a row keeps what it has.
            dims = tuple(None if v is None else float(v) for v in values)
            dims = dims if any(v is not None for v in dims) else None
            if row.label is None and dims is None:
                raise ValueError("no categorical label and no dimensional labels")
            label = index.get(row.label, -1)
            good.append(Example(row, end - start, label, dims))
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
    """The checked examples of one manifest, restricted to one split (or "train,dev": several) when given."""
    from serval.manifest import read_manifest

    # a label outside the model's classes stops the run, naming the row and the set (a typo, or a
    # corpus label the config's `labels:` does not list), rather than training on less than asked
    rows = read_manifest(path, labels=model_cfg.classes)
    if split is not None:
        wanted = {s.strip() for s in split.split(",")}
        rows = [r for r in rows if r.split in wanted]
        if not rows:
            raise ValueError(f"{path}: no rows with split {split!r}")
    where = f"{path}" + (f" (split {split})" if split else "")
    return check_rows(rows, tuple(model_cfg.classes), tuple(model_cfg.dimensions), where)


def balance_weights(examples: list[Example], by: str, power: float) -> np.ndarray | None:
    """Per-clip draw probabilities ~ n_group^-power over `by` (corpus or language); None for "none".

    ASED alone is a quarter of the clips: power 0.5 (square-root balancing) evens the groups out
    without repeating a small corpus's few clips as often as full balancing (power 1) would.
    """
    if by == "none":
        return None
    groups = [getattr(ex.clip, by) or "" for ex in examples]
    counts = {g: groups.count(g) for g in set(groups)}
    w = np.array([counts[g] ** -power for g in groups], dtype=np.float64)
    return w / w.sum()


def crop(wave: np.ndarray, max_samples: int, rng: np.random.Generator | None) -> np.ndarray:
    """At most `max_samples`: a random window with `rng`, the start without."""
    if len(wave) <= max_samples:
        return wave
    offset = int(rng.integers(len(wave) - max_samples + 1)) if rng is not None else 0
    return wave[offset : offset + max_samples]


def load_example(ex: Example, max_seconds: float, rng: np.random.Generator | None) -> np.ndarray:
    """The clip's span, reading at most what a `max_seconds` crop (before a 0.9x speed change) needs."""
    from serval.audio import load_audio

    clip = ex.clip
    start = clip.start or 0.0
    window = max_seconds / 0.9 + 0.1  # slack so that a slowed-down crop still fills max_seconds
    if ex.duration > window:
        offset = float(rng.uniform(0.0, ex.duration - window)) if rng is not None else 0.0
        return load_audio(clip.path, start + offset, start + offset + window)
    return load_audio(clip.path, clip.start, clip.end)


class ClipDataset(torch.utils.data.Dataset):
    """Waveforms of checked examples; item `(index, epoch)` is augmented with draws seeded by both."""

    def __init__(
        self, examples: list[Example], cfg: TrainConfig, train: bool, noise: NoiseBank | None = None
    ):
        self.examples, self.cfg, self.train, self.noise = examples, cfg, train, noise

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key):
        from serval.audio import AudioError

        index, epoch = key if isinstance(key, tuple) else (key, 0)
        ex = self.examples[index]
        rng = seeded_rng(self.cfg.seed, epoch, index) if self.train else None
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
        v = int(seeded_rng(self.cfg.seed, epoch, index, 1).integers(len(variants))) if self.train else 0
        try:
            hidden, _ = self.cache.get(variants[v])
        except KeyError as e:
            log.warning("dropping a clip from its batch: %s", e)
            return None
        if self.train:
            hidden = augment_features(hidden, self.cfg.augment, seeded_rng(self.cfg.seed, epoch, index, 5))
        return {"index": index, "input": hidden, **_targets(self.examples[index], self.cfg.model)}


def _targets(ex: Example, model_cfg: SERConfig) -> dict:
    target = torch.zeros(len(model_cfg.classes))
    if ex.label >= 0:
        target[ex.label] = 1.0
    values = ex.dims if ex.dims is not None else (None,) * len(model_cfg.dimensions)
    dims = torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float32)
    mask = torch.tensor([v is not None for v in values], dtype=torch.bool)
    return {"target": target, "dims": dims, "dims_mask": mask}


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
        "dims_mask": torch.stack([x["dims_mask"] for x in items]),  # [B, D]: per dimension
    }


def prepare_cache(
    model: SERModel, datasets: dict[str, list[Example]], cfg: TrainConfig, dist: Dist, device: torch.device
) -> tuple:
    """Encode every clip (and `augmented_copies` seeded variants of training clips) not cached yet.

    Returns (cache, {split: [[key of variant 0, 1, …] per example]}, clips encoded by this rank).
    Clips that no longer load are dropped from `datasets`.
    """
    from serval.train.cache import EncoderCache, encoder_settings

    cache = EncoderCache(
        cfg.cache.dir or Path(cfg.out_dir) / "cache", encoder_settings(model, cfg.cache.dtype)
    )
    noise = NoiseBank(cfg.augment.noise_dir) if cfg.augment.noise_dir and cfg.cache.augmented_copies else None
    a = cfg.augment
    unchanged = (
        noise is None and tuple(a.speed_factors) == (1.0,) and not a.codecs and not any(a.pitch_semitones)
    )
    if cfg.cache.augmented_copies and unchanged:
        raise ValueError(
            "cache.augmented_copies needs augmentation: set augment.noise_dir, augment.speed_factors, "
            "augment.pitch_semitones or augment.codecs"
        )
    model.to(device)
    keys, encoded, chunk = {}, 0, 64
    for split, examples in datasets.items():
        copies = cfg.cache.augmented_copies if split == "train" else 0
        keys[split] = [[] for _ in examples]
        starts = progress_bar(
            range(0, len(examples), chunk),
            cfg.progress and dist.main,
            desc=f"encoder cache ({split})",
            unit="chunk",
            leave=False,
        )
        for n, s in enumerate(starts):
            indices = range(s, min(s + chunk, len(examples)))
            waves, wave_keys = _cache_variants(examples, indices, copies, cfg, noise, cache, keys[split])
            if n % dist.world == dist.rank:  # chunks are shared out over the ranks
                encoded += cache.encode_missing(
                    model, waves, wave_keys, cfg.cache.batch_size, device, progress=False
                )
        if any(not k for k in keys[split]):
            datasets[split] = [ex for i, ex in enumerate(examples) if keys[split][i]]
            keys[split] = [k for k in keys[split] if k]
    barrier(dist)
    return cache, keys, encoded


def _cache_variants(examples, indices, copies: int, cfg: TrainConfig, noise, cache, keys: list[list[str]]):
    """The waveforms (clean, then `copies` seeded augmentations) of `examples[indices]` and their
    cache keys; each clip's keys are appended to `keys[i]`."""
    from serval.audio import AudioError

    max_samples = int(cfg.data.max_seconds * SAMPLE_RATE)
    waves, wave_keys = [], []
    for i in indices:
        try:
            clean = load_example(examples[i], cfg.data.max_seconds, None)
        except AudioError as e:
            log.warning("not cached, dropped: %s", e)
            continue
        for v in range(copies + 1):
            if v == 0:
                wave = crop(clean, max_samples, None)
            else:
                rng = seeded_rng(cfg.seed, 3, i, v)
                wave = crop(augment_wave(clean, cfg.augment, noise, rng), max_samples, rng)
            key = cache.key(wave)
            keys[i].append(key)
            waves.append(wave)
            wave_keys.append(key)
    return waves, wave_keys
