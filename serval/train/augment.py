"""Waveform augmentation (speed perturbation, pitch shift, additive noise, a lossy codec), cropping and
masking of cached encoder outputs, and MixUp of collated batches.

Every draw comes from a `numpy` generator the caller seeds, so an augmented clip is reproducible.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from serval.train.config import AugmentConfig
from serval.vocab import AUDIO_EXTENSIONS, SAMPLE_RATE

log = logging.getLogger("serval.train")


def seeded_rng(*key: int) -> np.random.Generator:
    """The generator of one draw site, keyed e.g. by (seed, epoch, clip): same key, same draws."""
    return np.random.default_rng([int(k) for k in key])


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
        from serval.audio import load_audio

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
    from serval.audio import resample

    return resample(wave, round(SAMPLE_RATE * factor), SAMPLE_RATE)


def as_long_as(wave: np.ndarray, n: int) -> np.ndarray:
    """`wave` cut or zero-padded at its end to exactly `n` samples."""
    return wave[:n] if len(wave) >= n else np.pad(wave, (0, n - len(wave)))


def time_stretch(wave: np.ndarray, rate: float, frame: int = 512, tolerance: int = 128) -> np.ndarray:
    """`wave` played `rate` times faster at the same pitch (about len / rate samples long): WSOLA.

    Each output frame (Hann, 50 % overlap) is read near its nominal input place, moved by up to
    `tolerance` samples to where it best continues the frame before it, so periods stay whole and
    the pitch does not move (Verhelst and Roelands, 1993).
    """
    hop = frame // 2
    window = np.hanning(frame + 1)[:frame]  # periodic: overlapping by half, the windows sum to 1
    out_len = max(1, int(round(len(wave) / rate)))
    n_frames = out_len // hop + 2
    last_start = int(round((n_frames + 1) * hop * rate))
    x = np.pad(wave.astype(np.float64), (hop + tolerance, last_start + frame + tolerance - len(wave) + 1))
    out, norm = np.zeros(n_frames * hop + frame), np.zeros(n_frames * hop + frame)
    shift = 0
    for k in range(n_frames):
        start = int(round(k * hop * rate)) + tolerance + shift
        out[k * hop : k * hop + frame] += x[start : start + frame] * window
        norm[k * hop : k * hop + frame] += window
        natural = x[start + hop : start + hop + frame]  # how the frame just taken goes on
        nominal = int(round((k + 1) * hop * rate)) + tolerance
        region = x[nominal - tolerance : nominal + frame + tolerance]
        shift = int(np.argmax(np.correlate(region, natural, mode="valid"))) - tolerance
    out = out[hop : hop + out_len] / np.maximum(norm[hop : hop + out_len], 1e-3)
    return out.astype(np.float32)


def shift_pitch(wave: np.ndarray, semitones: float) -> np.ndarray:
    """`wave` `semitones` higher (lower when negative) and exactly as long: resampled, then stretched back."""
    if semitones == 0:
        return wave
    factor = 2.0 ** (semitones / 12.0)
    out = time_stretch(change_speed(wave, factor), 1.0 / factor)
    return as_long_as(out, len(wave))


CODECS = {"opus": ("OGG", "OPUS"), "mp3": ("MP3", "MPEG_LAYER_III")}  # libsndfile's names


def codec_round_trip(wave: np.ndarray, codec: str, compression: float) -> np.ndarray:
    """`wave` encoded with `codec` (opus | mp3) at libsndfile's `compression` level and decoded, as long
    as `wave`. At 16 kHz, level 0 is near-lossless (Opus about 260 kbps, MP3 50 kbps), level 1 the
    lowest bitrate (Opus about 7 kbps, MP3 19 kbps)."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    fmt, subtype = CODECS[codec]
    level = min(compression, 0.99) if codec == "mp3" else compression  # libsndfile's MP3 refuses 1.0
    sf.write(buf, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format=fmt, subtype=subtype, compression_level=level)
    buf.seek(0)
    out, _ = sf.read(buf, dtype="float32")
    # the decoders' priming and padding make the output a few ms longer or shorter
    return as_long_as(out, len(wave))


def augment_wave(
    wave: np.ndarray, aug: AugmentConfig, noise: NoiseBank | None, rng: np.random.Generator
) -> np.ndarray:
    """Speed perturbation, then a pitch shift, additive noise and a lossy codec, each drawn from `rng`."""
    factor = float(aug.speed_factors[int(rng.integers(len(aug.speed_factors)))])
    wave = change_speed(wave, factor)
    if aug.pitch_semitones:  # drawn only when on, so that configs without it keep their draws
        wave = shift_pitch(wave, float(aug.pitch_semitones[int(rng.integers(len(aug.pitch_semitones)))]))
    if noise is not None and rng.random() < aug.noise_prob:
        wave = add_noise(wave, noise.sample(len(wave), rng), float(rng.uniform(*aug.snr_db)))
    if aug.codecs and rng.random() < aug.codec_prob:
        codec = aug.codecs[int(rng.integers(len(aug.codecs)))]
        wave = codec_round_trip(wave, codec, float(rng.uniform(*aug.codec_compression)))
    return wave


ENCODER_FRAMES_PER_SECOND = 50  # Whisper: 10 ms mel hop, halved by the stride-2 convolution


def augment_features(hidden: Tensor, aug: AugmentConfig, rng: np.random.Generator) -> Tensor:
    """A cached encoder output `[(L+1,) T, d]` cropped to `crop_seconds` at a random place, with
    `time_masks` stretches of frames and `channel_masks` bands of channels zeroed (every layer alike).

    Zero stays zero through the network's parameter-free layer norm, so a masked frame carries nothing.
    """
    t, d = hidden.shape[-2], hidden.shape[-1]
    keep = int(aug.crop_seconds * ENCODER_FRAMES_PER_SECOND)
    if keep and t > keep:
        start = int(rng.integers(t - keep + 1))
        hidden, t = hidden[..., start : start + keep, :], keep
    if not (aug.time_masks or aug.channel_masks):
        return hidden
    hidden = hidden.clone()
    for _ in range(aug.time_masks):
        width = int(rng.integers(aug.time_mask_frames + 1))
        if 0 < width < t:  # never the whole clip
            start = int(rng.integers(t - width + 1))
            hidden[..., start : start + width, :] = 0.0
    for _ in range(aug.channel_masks):
        width = int(rng.integers(min(aug.channel_mask_width, d - 1) + 1))
        if width:
            start = int(rng.integers(d - width + 1))
            hidden[..., start : start + width] = 0.0
    return hidden


def mixup(batch: dict, lam: float, perm: Tensor) -> dict:
    """MixUp of inputs, one-hot targets and dimensional targets with partner `perm` and weight `lam`.

    Inputs are mixed as padded tensors, so a mixed clip is as long as the longer of its pair; its
    dimensional target counts only when both partners have one (per dimension: the mask is `[B, D]`).
    """
    out = dict(batch)
    out["input"] = lam * batch["input"] + (1.0 - lam) * batch["input"][perm]
    out["lengths"] = torch.maximum(batch["lengths"], batch["lengths"][perm])
    out["targets"] = lam * batch["targets"] + (1.0 - lam) * batch["targets"][perm]
    out["dims"] = lam * batch["dims"] + (1.0 - lam) * batch["dims"][perm]
    out["dims_mask"] = batch["dims_mask"] & batch["dims_mask"][perm]
    return out
