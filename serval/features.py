"""Whisper's log-mel spectrogram, batched: in torch on any device, or in numpy without torch.

30 s mode reproduces `transformers.WhisperFeatureExtractor` (and openai/whisper's `log_mel_spectrogram`).
Own-length mode gives every clip `len // 160` frames that equal the first frames of its 30 s features,
whatever else is in the batch: each row is built as the 30 s signal would be (reflect pad, the clip,
then zeros), and the dynamic-range clamp uses the clip's own frames only.

The mel filters are computed here (numpy, float64, then float32), equal to transformers'
`mel_filter_bank`, so no inference path imports transformers. Importing this module does not
import torch: `compute_features` (torch) imports it when called, `log_mel` (numpy, for the ONNX
engine) never does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from serval.vocab import SAMPLE_RATE

if TYPE_CHECKING:
    import torch

N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a 30 s window
# The gain-invariant front end moves each clip's log-mel peak here (log10 power): the median peak of
# the training corpora, so a typical clip's features stay where Whisper was trained to read them.
PEAK_LOG10 = 0.8

_PAD = N_FFT // 2  # the centred STFT's reflect padding on each side
_FILTERS: dict[tuple[int, str], torch.Tensor] = {}
_WINDOWS: dict[str, torch.Tensor] = {}


def num_frames(num_samples: int) -> int:
    """Valid feature frames of a clip of `num_samples` samples in own-length mode."""
    return int(num_samples) // HOP_LENGTH


# ---------------------------------------------------------------------------- mel filters


def _hz_to_mel(freq: float) -> float:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (transformers' operation order)."""
    if freq >= 1000.0:
        return 15.0 + np.log(freq / 1000.0) * (27.0 / np.log(6.4))
    return 3.0 * freq / 200.0


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log = mels >= 15.0
    freq[log] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels[log] - 15.0))
    return freq


def mel_filter_bank(n_mels: int) -> np.ndarray:
    """Slaney mel filters `[201, n_mels]` float64 over 0–8 kHz, as transformers' `mel_filter_bank` builds them."""
    filter_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2))
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, 1 + N_FFT // 2)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    triangles = np.maximum(np.zeros(1), np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))
    return triangles * (2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels]))[None, :]


def mel_filters(n_mels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The mel filter bank `[n_mels, 201]` float32 as a torch tensor (cached per device)."""
    import torch

    device = torch.device(device)
    key = (n_mels, str(device))
    if key not in _FILTERS:
        _FILTERS[key] = torch.from_numpy(_mel_matrix(n_mels)).to(device)
    return _FILTERS[key]


def _mel_matrix(n_mels: int) -> np.ndarray:
    return np.ascontiguousarray(mel_filter_bank(n_mels).T).astype(np.float32)


# ---------------------------------------------------------------------------- the padded rows


def _plan(lengths: Sequence[int], pad_to_30s: bool, max_frames: int) -> tuple[list[int], int]:
    """(valid frames of each clip, batch width in frames); raises ValueError for a clip out of range."""
    if pad_to_30s:
        return [N_FRAMES] * len(lengths), N_FRAMES
    frames = [num_frames(n) for n in lengths]
    for i, (n, f) in enumerate(zip(lengths, frames)):
        if f < 1:
            raise ValueError(f"clip {i} has {n} samples, fewer than one feature frame ({HOP_LENGTH})")
        if f > max_frames:
            raise ValueError(
                f"clip {i} is {n / SAMPLE_RATE:.1f} s ({f} frames), longer than max_frames={max_frames} "
                f"({max_frames * HOP_LENGTH / SAMPLE_RATE:.0f} s): use the timeline / sliding-window "
                "inference (serval.windows) for long audio"
            )
    return frames, max(frames) + max(frames) % 2  # the encoder's second conv has stride 2


def _row_index(n: int, width: int) -> np.ndarray:
    """Where each sample that the first `width` frames of a clip's 30 s STFT read comes from.

    An index into the clip, or -1 for a zero. That input is the 30 s signal (the clip, then zeros
    up to 30 s; a longer clip alone), reflect-padded by 200 samples at each end, as a centred STFT
    pads it. In 30 s mode the clip is first cut to 30 s.
    """
    size = (width - 1) * HOP_LENGTH + N_FFT
    signal = max(n, N_SAMPLES)
    q = np.abs(np.arange(size) - _PAD)  # the reflection of the signal's start
    q = np.where(q >= signal, 2 * (signal - 1) - q, q)  # ... and of its end
    return np.where(q < n, q, -1)


def _floor(gain_invariant: bool) -> float:
    """The power below which the log-mel is clamped: Whisper's 1e-10, or for the gain-invariant front end
    one low enough that only the relative floor (the peak - 8) acts, whatever the level (a quiet clip's
    peak can be below -2, where Whisper's absolute floor would cut it)."""
    return 1e-30 if gain_invariant else 1e-10


# ---------------------------------------------------------------------------- torch


def compute_features(
    waves: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
    n_mels: int = 80,
    pad_to_30s: bool = False,
    device: torch.device | str | None = None,
    *,
    max_frames: int = N_FRAMES,
    check_finite: bool = True,
    gain_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features `[B, n_mels, F]` float32 and valid frame counts `[B]` of 16 kHz clips.

    `pad_to_30s`: every clip cut/padded to 30 s (F = 3000). Otherwise F = each clip's `len // 160`
    (at most `max_frames`), the batch is as wide as the longest clip rounded up to an even number of
    frames, and frames past a clip's own length are 0.0. `check_finite=False` skips the NaN/inf check
    (for clips already checked when they were read). `gain_invariant`: each clip's log-mel is shifted
    so its peak is `PEAK_LOG10`, which makes the features the same whatever the recording level.
    """
    import torch

    clips = _as_tensors(waves, device, check_finite)
    device = clips[0].device
    if pad_to_30s:
        clips = [c[:N_SAMPLES] for c in clips]
    frames, width = _plan([len(c) for c in clips], pad_to_30s, max_frames)
    rows = torch.stack([_gather(c, _row_index(len(c), width)) for c in clips])
    frame_lengths = torch.tensor(frames, dtype=torch.long, device=device)

    # rows are already padded, so a plain (non-centred) STFT gives the centred STFT's frames
    stft = torch.stft(rows, N_FFT, HOP_LENGTH, window=_window(device), center=False, return_complex=True)
    power = stft[..., :width].abs() ** 2
    mel = mel_filters(n_mels, device) @ power
    log_spec = torch.clamp(mel, min=_floor(gain_invariant)).log10()

    valid = torch.arange(width, device=device)[None, None, :] < frame_lengths[:, None, None]
    peak = log_spec.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    if gain_invariant:  # a gain g adds 2 log10 g to every value: taking the peak off removes it
        log_spec = log_spec - peak + PEAK_LOG10
    feats = ((log_spec + 4.0) / 4.0).masked_fill(~valid, 0.0)
    return feats, frame_lengths


def _gather(clip: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    import torch

    padded = torch.cat([clip, clip.new_zeros(1)])  # index -1 reads this zero
    return padded[torch.from_numpy(index).to(clip.device)]


def _window(device: torch.device) -> torch.Tensor:
    import torch

    key = str(device)
    if key not in _WINDOWS:
        _WINDOWS[key] = torch.hann_window(N_FFT, device=device)
    return _WINDOWS[key]


def _as_tensors(
    waves: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
    device: torch.device | str | None,
    check_finite: bool = True,
) -> list[torch.Tensor]:
    import torch

    if isinstance(waves, torch.Tensor | np.ndarray) and waves.ndim == 1:
        raise ValueError("waves must be a list of 1-D clips (or a 2-D batch), got a single 1-D array")
    if len(waves) == 0:
        raise ValueError("waves is empty")
    if device is None:
        first = waves[0]
        device = first.device if isinstance(first, torch.Tensor) else "cpu"
    clips = []
    for i, w in enumerate(waves):
        t = torch.as_tensor(np.asarray(w, dtype=np.float32) if not isinstance(w, torch.Tensor) else w)
        t = t.to(device=device, dtype=torch.float32)
        _check_clip(i, tuple(t.shape))
        clips.append(t)
    if check_finite and not bool(torch.isfinite(torch.cat(clips)).all()):
        _non_finite([bool(torch.isfinite(c).all()) for c in clips])
    return clips


# ---------------------------------------------------------------------------- numpy


@functools.cache
def _blas_pools():
    """numpy's BLAS thread pools (threadpoolctl), found once."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_blas_thread():
    """A context in which numpy's BLAS uses one thread (threadpoolctl), the count given back after it."""
    return _blas_pools().limit(limits=1, user_api="blas")


def log_mel(
    waves: Sequence[np.ndarray] | np.ndarray,
    n_mels: int = 80,
    pad_to_30s: bool = False,
    *,
    max_frames: int = N_FRAMES,
    check_finite: bool = True,
    gain_invariant: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """`compute_features` in numpy (no torch): features `[B, n_mels, F]` float32, frame counts `[B]` int64.

    Equal to `compute_features` on the CPU to float32 rounding (~1e-6).
    """
    clips = _as_arrays(waves, check_finite)
    if pad_to_30s:
        clips = [c[:N_SAMPLES] for c in clips]
    frames, width = _plan([len(c) for c in clips], pad_to_30s, max_frames)
    rows = np.stack([np.append(c, np.float32(0))[_row_index(len(c), width)] for c in clips])
    windows = np.lib.stride_tricks.sliding_window_view(rows, N_FFT, axis=-1)[:, ::HOP_LENGTH]
    power = np.abs(np.fft.rfft(windows * _hann(), axis=-1)) ** 2  # [B, F, 201]
    # the product is small, and BLAS threads woken for it spin on the cores for a while after: ONNX
    # Runtime's own threads, started next, then share them (one 4 s clip on 2 cores took twice as long)
    with one_blas_thread():
        mel = _mel_matrix(n_mels) @ power.astype(np.float32).transpose(0, 2, 1)
    log_spec = np.log10(np.maximum(mel, np.float32(_floor(gain_invariant))))

    frame_lengths = np.asarray(frames, dtype=np.int64)
    valid = np.arange(width)[None, None, :] < frame_lengths[:, None, None]
    peak = np.where(valid, log_spec, -np.inf).max(axis=(1, 2), keepdims=True)
    log_spec = np.maximum(log_spec, peak - np.float32(8.0))
    if gain_invariant:
        log_spec = log_spec - peak + np.float32(PEAK_LOG10)
    feats = np.where(valid, (log_spec + np.float32(4.0)) / np.float32(4.0), np.float32(0.0))
    return feats.astype(np.float32), frame_lengths


def _hann() -> np.ndarray:
    """torch.hann_window(400) (periodic), computed in float32 as torch computes it (to an ulp)."""
    phase = np.arange(N_FFT, dtype=np.float32) * np.float32(2 * np.pi / N_FFT)
    return np.float32(0.5) - np.float32(0.5) * np.cos(phase)


def _as_arrays(waves: Sequence[np.ndarray] | np.ndarray, check_finite: bool = True) -> list[np.ndarray]:
    if isinstance(waves, np.ndarray) and waves.ndim == 1:
        raise ValueError("waves must be a list of 1-D clips (or a 2-D batch), got a single 1-D array")
    if len(waves) == 0:
        raise ValueError("waves is empty")
    clips = []
    for i, w in enumerate(waves):
        a = np.asarray(w, dtype=np.float32)
        _check_clip(i, a.shape)
        clips.append(a)
    if check_finite and not all(finite := [bool(np.isfinite(c).all()) for c in clips]):
        _non_finite(finite)
    return clips


def _check_clip(i: int, shape: tuple[int, ...]) -> None:
    if len(shape) != 1:
        raise ValueError(f"clip {i} must be 1-D (mono samples), got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"clip {i} is empty")


def _non_finite(finite: list[bool]) -> None:
    bad = [i for i, ok in enumerate(finite) if not ok]
    raise ValueError(f"clips {bad} contain NaN or infinite samples")
