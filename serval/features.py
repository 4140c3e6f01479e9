"""Whisper's log-mel spectrogram in torch, batched on any device, padded to 30 s or at each clip's length.

30 s mode reproduces `transformers.WhisperFeatureExtractor` (and openai/whisper's `log_mel_spectrogram`).
Own-length mode gives every clip `len // 160` frames that equal the first frames of its 30 s features,
whatever else is in the batch: each row is built as the 30 s signal would be (reflect pad, the clip,
then zeros), and the dynamic-range clamp uses the clip's own frames only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a 30 s window

_PAD = N_FFT // 2  # the centred STFT's reflect padding on each side
_FILTERS: dict[tuple[int, str], torch.Tensor] = {}
_WINDOWS: dict[str, torch.Tensor] = {}


def num_frames(num_samples: int) -> int:
    """Valid feature frames of a clip of `num_samples` samples in own-length mode."""
    return int(num_samples) // HOP_LENGTH


def mel_filters(n_mels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Slaney mel filter bank `[n_mels, 201]` as WhisperFeatureExtractor builds it (cached per device)."""
    device = torch.device(device)
    key = (n_mels, str(device))
    if key not in _FILTERS:
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(
            num_frequency_bins=1 + N_FFT // 2,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=8000.0,
            sampling_rate=SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
        _FILTERS[key] = torch.from_numpy(np.ascontiguousarray(fb.T)).to(device, torch.float32)
    return _FILTERS[key]


def _window(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _WINDOWS:
        _WINDOWS[key] = torch.hann_window(N_FFT, device=device)
    return _WINDOWS[key]


def compute_features(
    waves: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
    n_mels: int = 80,
    pad_to_30s: bool = False,
    device: torch.device | str | None = None,
    *,
    max_frames: int = N_FRAMES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features `[B, n_mels, F]` float32 and valid frame counts `[B]` of 16 kHz clips.

    `pad_to_30s`: every clip cut/padded to 30 s (F = 3000). Otherwise F = each clip's `len // 160`
    (at most `max_frames`), the batch is as wide as the longest clip rounded up to an even number of
    frames, and frames past a clip's own length are 0.0.
    """
    clips = _as_tensors(waves, device)
    device = clips[0].device
    lengths = [len(c) for c in clips]
    if pad_to_30s:
        rows = torch.stack([F.pad(c[:N_SAMPLES], (0, N_SAMPLES - min(len(c), N_SAMPLES))) for c in clips])
        rows = F.pad(rows[:, None], (_PAD, _PAD), mode="reflect")[:, 0]
        frame_lengths = torch.full((len(clips),), N_FRAMES, dtype=torch.long, device=device)
        width = N_FRAMES
    else:
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
        width = max(frames) + max(frames) % 2  # the encoder's second conv has stride 2
        rows = torch.stack([_own_length_row(c, width) for c in clips])
        frame_lengths = torch.tensor(frames, dtype=torch.long, device=device)

    # rows are already padded, so a plain (non-centred) STFT gives the centred STFT's frames
    stft = torch.stft(rows, N_FFT, HOP_LENGTH, window=_window(device), center=False, return_complex=True)
    power = stft[..., :width].abs() ** 2
    mel = mel_filters(n_mels, device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()

    valid = torch.arange(width, device=device)[None, None, :] < frame_lengths[:, None, None]
    peak = log_spec.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    feats = ((log_spec + 4.0) / 4.0).masked_fill(~valid, 0.0)
    return feats, frame_lengths


def _as_tensors(
    waves: Sequence[np.ndarray | torch.Tensor] | torch.Tensor, device: torch.device | str | None
) -> list[torch.Tensor]:
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
        if t.ndim != 1:
            raise ValueError(f"clip {i} must be 1-D (mono samples), got shape {tuple(t.shape)}")
        if len(t) == 0:
            raise ValueError(f"clip {i} is empty")
        clips.append(t)
    if not bool(torch.isfinite(torch.cat(clips)).all()):
        bad = [i for i, c in enumerate(clips) if not bool(torch.isfinite(c).all())]
        raise ValueError(f"clips {bad} contain NaN or infinite samples")
    return clips


def _own_length_row(clip: torch.Tensor, width: int) -> torch.Tensor:
    """The padded samples that the first `width` frames of `clip`'s 30 s STFT read.

    That is the centred STFT's input: [reflect of the clip's start][clip][zeros up to 30 s], and,
    for clips within 200 samples of 30 s (or longer), the reflect pad of the 30 s signal's end.
    """
    n = len(clip)
    size = (width - 1) * HOP_LENGTH + N_FFT
    zeros = max(0, N_SAMPLES - n)  # zeros between the clip and the 30 s signal's end
    end_pad = zeros < _PAD  # the 30 s signal's end reflect pad is within reach of the clip's frames
    row = clip.new_zeros(max(size, 2 * _PAD + n + (zeros if end_pad else 0)))
    head = F.pad(clip[: _PAD + 1], (0, max(0, _PAD + 1 - n)))  # the 30 s signal's first 201 samples
    row[:_PAD] = head[1:].flip(0)
    row[_PAD : _PAD + n] = clip
    if end_pad:
        tail = F.pad(clip[-(_PAD + 1 - zeros) :], (0, zeros))  # the 30 s signal's last 201 samples
        row[_PAD + n + zeros : 2 * _PAD + n + zeros] = tail[:-1].flip(0)
    return row[:size]
