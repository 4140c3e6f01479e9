"""Audio input: any file (or bytes) to 16 kHz mono float32, with typed errors that name the file.

Decoding is libsndfile's (via soundfile: wav, flac, ogg/vorbis/opus, mp3 and more), resampling is
soxr HQ, channels are averaged. Spans are read by seeking, and long files can be streamed in chunks
(`iter_chunks`) with bounded memory; both give the same samples as slicing a full decode.
"""

from __future__ import annotations

import errno
import io
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from serval.audio_errors import (  # defined apart, used and re-exported here
    AudioError,
    AudioNotFoundError,
    AudioSpanError,
    AudioTooShortError,
    EmptyAudioError,
    NonFiniteAudioError,
    TruncatedAudioError,
    UnsupportedAudioError,
    ZeroLengthAudioError,
)
from serval.vocab import SAMPLE_RATE  # re-exported: `from serval.audio import SAMPLE_RATE` keeps working

MIN_DURATION = 0.1  # seconds; shorter clips raise AudioTooShortError
SPAN_TOLERANCE = 0.01  # seconds an `end` may overshoot the duration (rounded manifests); it is clipped

# Non-16 kHz spans are resampled with this much extra input on each side, then trimmed, so that a
# span (or a streamed chunk) equals the same samples of a whole-file decode, not a filter edge.
_RESAMPLE_CONTEXT = 0.05  # seconds
_STREAM_BLOCK = 10.0  # seconds of input decoded per read in iter_chunks

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


@dataclass(frozen=True)
class AudioInfo:
    duration: float  # seconds, as the header says
    sample_rate: int
    channels: int
    frames: int


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample `audio` ([n] or [n, channels]) with soxr HQ; float32 out, a no-op at equal rates."""
    audio = np.asarray(audio, dtype=np.float32)
    if int(orig_sr) == int(target_sr):
        return audio
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    return soxr.resample(audio, int(orig_sr), int(target_sr), quality="HQ").astype(np.float32, copy=False)


MAX_CHANNELS = 8  # an array with more rows and columns than this is not one clip
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384_000  # the rates an array may be given at
# Integer PCM as files hold it, scaled as libsndfile reads it: (dtype kind, bytes) -> (offset, full scale)
_PCM_SCALE = {("i", 1): (0, 2.0**7), ("u", 1): (128, 2.0**7), ("i", 2): (0, 2.0**15), ("i", 4): (0, 2.0**31)}


def array_to_mono(samples, name: str = "<array>") -> np.ndarray:
    """Samples as a user holds them -> mono float32 at their own rate, the way a file's are read.

    Integer PCM is scaled by its dtype (int16 / 32768, int32 / 2**31, uint8 offset by 128), floats
    (16, 32, 64 bit) are taken as they are; `(n,)`, `(n, c)` and `(c, n)` with at most 8 channels
    are averaged over the channels. Anything else raises `UnsupportedAudioError` naming `name` and
    the shape or dtype; no samples `EmptyAudioError`. A torch tensor is read through numpy.
    """
    if hasattr(samples, "detach"):  # a torch tensor, without importing torch here
        samples = samples.detach().cpu()
        samples = samples.float() if str(samples.dtype) == "torch.bfloat16" else samples
        samples = samples.numpy()
    x = np.asarray(samples)
    if x.size == 0:
        raise EmptyAudioError(name, f"no samples (shape {x.shape})")
    pcm = _PCM_SCALE.get((x.dtype.kind, x.dtype.itemsize))
    if pcm is not None:
        offset, scale = pcm
        x = ((x.astype(np.float32) - offset) / scale).astype(np.float32)
    elif x.dtype.kind == "f":
        x = x.astype(np.float32, copy=False)
    else:
        raise UnsupportedAudioError(
            name,
            f"samples of dtype {x.dtype} are not audio; give float samples in [-1, 1] or int16, int32 "
            "or uint8 PCM",
        )
    return _downmix(x, name)


def _downmix(x: np.ndarray, name: str) -> np.ndarray:
    # the channel axis is the short one; the mean is a file's (float32), so arrays and files agree
    if x.ndim == 1:
        return x
    if x.ndim == 2 and min(x.shape) <= MAX_CHANNELS and x.shape[0] != x.shape[1]:
        channels = 1 if x.shape[1] < x.shape[0] else 0
        return x.mean(axis=channels, dtype=np.float32)
    raise UnsupportedAudioError(
        name,
        f"an array of shape {x.shape} is not one clip: give (samples,), or (samples, channels) or "
        f"(channels, samples) with at most {MAX_CHANNELS} channels (several clips: a list of arrays)",
    )


def load_array(samples, sampling_rate: int | None = None, *, name: str = "<array>") -> np.ndarray:
    """An array (numpy or torch, any of `array_to_mono`'s dtypes and shapes) -> 16 kHz mono float32.

    `sampling_rate`: the array's rate, resampled from (None: it is 16 kHz). The array twin of
    `load_audio`: AudioError naming `name` for no samples, NaN/inf, or a shape that is not a clip.
    """
    wave = array_to_mono(samples, name)
    check_finite(wave, name)
    return at_model_rate(wave, sampling_rate)


def at_model_rate(wave: np.ndarray, sampling_rate: int | None) -> np.ndarray:
    """`wave` resampled from `sampling_rate` to 16 kHz (None: it is 16 kHz already)."""
    if sampling_rate is None or int(sampling_rate) == SAMPLE_RATE:
        return wave
    if not MIN_SAMPLE_RATE <= int(sampling_rate) <= MAX_SAMPLE_RATE:
        raise ValueError(
            f"sampling_rate must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz, got {sampling_rate}"
        )
    return resample(wave, int(sampling_rate))


def audio_info(source: AudioSource, *, name: str | None = None) -> AudioInfo:
    """Duration, sample rate, channels and frames from the header, without decoding the samples."""
    with _open(source, name) as (f, _label):
        return AudioInfo(f.frames / f.samplerate, f.samplerate, f.channels, f.frames)


def span_samples(
    source: AudioSource, start: float | None = None, end: float | None = None, *, name: str | None = None
) -> int:
    """How many 16 kHz samples `load_audio(source, start, end)` gives, from the header alone."""
    with _open(source, name) as (f, label):
        return _Span.plan(f, label, start, end).out_len


def load_audio(
    source: AudioSource,
    start: float | None = None,
    end: float | None = None,
    *,
    min_duration: float = MIN_DURATION,
    name: str | None = None,
) -> np.ndarray:
    """Decode `source` (path, bytes or binary file object) to 16 kHz mono float32.

    `start`/`end` (seconds) read only that span. `name` labels bytes/file objects in errors.
    """
    with _open(source, name) as (f, label):
        plan = _Span.plan(f, label, start, end)
        _check_duration(label, plan.out_len / SAMPLE_RATE, min_duration, start is not None or end is not None)
        if plan.in_start:
            _seek(f, label, plan.in_start)
        x = _read(f, label, plan.in_stop - plan.in_start, plan.in_start)
        if f.samplerate == SAMPLE_RATE:
            out = x
        else:
            out = resample(x, f.samplerate)[plan.skip : plan.skip + plan.out_len]
    _check_duration(label, len(out) / SAMPLE_RATE, min_duration, False)
    return np.ascontiguousarray(out, dtype=np.float32)


def iter_chunks(
    path: AudioSource,
    chunk_seconds: float,
    overlap_seconds: float = 0.0,
    start: float = 0.0,
    end: float | None = None,
    *,
    name: str | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Stream 16 kHz mono chunks as `(offset_seconds, samples)` without reading the file whole.

    Chunks are `chunk_seconds` long and overlap by `overlap_seconds` (the last one may be shorter);
    without overlap their concatenation equals `load_audio(path, start, end)`.
    """
    if not chunk_seconds > 0:
        raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
    if not 0 <= overlap_seconds < chunk_seconds:
        raise ValueError(f"overlap_seconds must be in [0, chunk_seconds), got {overlap_seconds}")
    chunk = max(1, round(chunk_seconds * SAMPLE_RATE))
    hop = max(1, chunk - round(overlap_seconds * SAMPLE_RATE))
    with _open(path, name) as (f, label):
        sr = f.samplerate
        plan = _Span.plan(f, label, start, end)
        stream = (
            None
            if sr == SAMPLE_RATE
            else soxr.ResampleStream(sr, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        )
        block = max(1, round(_STREAM_BLOCK * sr))
        if plan.in_start:
            _seek(f, label, plan.in_start)
        pos = plan.in_start
        skip = plan.skip  # resampled context samples still to drop before the span begins
        left = plan.out_len  # span samples still to produce
        buf = np.zeros(0, np.float32)
        buf_start = 0  # span index of buf[0]
        emitted = 0  # span samples [0, emitted) are already in a yielded chunk
        while left > 0 and pos < plan.in_stop:
            n = min(block, plan.in_stop - pos)
            x = _read(f, label, n, pos)
            pos += n
            if stream is not None:
                x = stream.resample_chunk(x, last=pos >= plan.in_stop)
            if skip:
                dropped = min(skip, len(x))
                x, skip = x[dropped:], skip - dropped
            x = x[:left]
            left -= len(x)
            buf = np.concatenate([buf, x]) if len(buf) else x
            while len(buf) >= chunk:
                yield plan.offset + buf_start / SAMPLE_RATE, buf[:chunk].copy()
                emitted = buf_start + chunk
                buf, buf_start = buf[hop:], buf_start + hop
        if len(buf) and buf_start + len(buf) > emitted:  # the tail holds samples not yet handed out
            yield plan.offset + buf_start / SAMPLE_RATE, buf.copy()


# --- internals -------------------------------------------------------------------------------


@dataclass
class _Span:
    """Which input frames to decode for a span, and how to cut the 16 kHz output to it."""

    in_start: int  # first input frame to decode
    in_stop: int  # one past the last input frame to decode
    skip: int  # 16 kHz samples of leading context to drop after resampling
    out_len: int  # 16 kHz samples in the span
    offset: float  # the span's start in seconds (on the 16 kHz grid)

    @classmethod
    def plan(cls, f: sf.SoundFile, label: str, start: float | None, end: float | None) -> _Span:
        sr, frames = f.samplerate, f.frames
        duration = frames / sr
        total = frames if sr == SAMPLE_RATE else round(frames * SAMPLE_RATE / sr)
        t0 = 0.0 if start is None else float(start)
        t1 = duration if end is None else float(end)
        if not (math.isfinite(t0) and math.isfinite(t1)):
            raise AudioSpanError(label, f"span start={start} end={end} is not finite")
        if t0 < 0:
            raise AudioSpanError(label, f"span start {t0:.3f} s is negative")
        if t1 <= t0:
            raise AudioSpanError(label, f"span end {t1:.3f} s is not after start {t0:.3f} s")
        if t0 >= duration:
            raise AudioSpanError(
                label, f"span start {t0:.3f} s is at or past the end (duration {duration:.3f} s)"
            )
        if t1 > duration + SPAN_TOLERANCE:
            raise AudioSpanError(label, f"span end {t1:.3f} s is past the end (duration {duration:.3f} s)")
        o0 = min(round(t0 * SAMPLE_RATE), total)
        o1 = min(round(t1 * SAMPLE_RATE), total)
        if sr == SAMPLE_RATE:
            return cls(o0, o1, 0, o1 - o0, o0 / SAMPLE_RATE)
        # q input frames <-> p output samples exactly; starting the decode on a multiple of q keeps the
        # resampled samples on the same grid as a whole-file decode.
        g = math.gcd(sr, SAMPLE_RATE)
        q, p = sr // g, SAMPLE_RATE // g
        ctx = math.ceil(_RESAMPLE_CONTEXT * sr / q)
        in_start = max(0, (o0 // p - ctx) * q)
        in_stop = min(frames, (-(-o1 // p) + ctx) * q)
        return cls(in_start, in_stop, o0 - in_start // q * p, o1 - o0, o0 / SAMPLE_RATE)


_MAGIC = {b"fLaC": "FLAC", b"RIFF": "WAV", b"RF64": "WAV", b"OggS": "OGG", b"ID3": "MP3", b"FORM": "AIFF"}


def sniff_format(head: bytes) -> str | None:
    """The audio format a file's first bytes announce ("WAV", "FLAC", "OGG", "MP3", "AIFF"), or None.

    MP3 without an ID3 tag starts with an MPEG audio frame: 11 sync bits, then a version and a layer
    that are not the reserved values."""
    kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
    if kind is None and len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        if (head[1] >> 3) & 3 != 1 and (head[1] >> 1) & 3 != 0:
            kind = "MP3"
    return kind


def _label(source: AudioSource, name: str | None) -> str:
    if name is not None:
        return str(name)
    if isinstance(source, str | os.PathLike):
        return str(source)
    file_name = getattr(source, "name", None)
    return file_name if isinstance(file_name, str) else "<bytes>"


def _loops(path: Path) -> bool:
    # Path.exists() says False for a symlink loop as for a missing file; stat tells them apart
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


@contextmanager
def _open(source: AudioSource, name: str | None) -> Iterator[tuple[sf.SoundFile, str]]:
    """Open `source` with libsndfile after the checks libsndfile does not make, mapping its errors."""
    label = _label(source, name)
    if isinstance(source, str | os.PathLike):
        target, size, head, short = _inspect_path(Path(source), label)
    else:
        target, size, head, short = _inspect_stream(source, label)
    if size == 0:
        raise EmptyAudioError(label, "empty file (0 bytes)")
    try:
        f = sf.SoundFile(target)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise _undecodable(label, sniff_format(head), size, _sf_message(e)) from None
    with f:
        if short > 0:
            have = f.frames / f.samplerate
            raise TruncatedAudioError(
                label,
                f"truncated: the WAV header announces {short} more bytes of samples than the file holds "
                f"(only {have:.3f} s present)",
            )
        if f.frames <= 0:
            raise ZeroLengthAudioError(label, f"no samples ({f.format} header with 0 frames)")
        if f.samplerate <= 0 or f.channels <= 0:
            raise UnsupportedAudioError(label, f"invalid header ({f.samplerate} Hz, {f.channels} channels)")
        yield f, label


def _inspect_path(path: Path, label: str) -> tuple[str, int, bytes, int]:
    """A file's name for libsndfile, its size, its first bytes and the bytes its WAV header overstates."""
    if not path.exists():
        if _loops(path):
            raise AudioNotFoundError(label, "symlink loop: the link leads back to itself")
        raise AudioNotFoundError(label, "no such file")
    if path.is_dir():
        raise AudioNotFoundError(label, "is a directory, not an audio file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
            short = _wav_shortfall(fh, size) if head[:4] == b"RIFF" else 0
    except OSError as e:
        raise AudioError(label, f"cannot read: {e.strerror or e}") from e
    return str(path), size, head, short


def _inspect_stream(source, label: str) -> tuple[BinaryIO, int, bytes, int]:
    """`_inspect_path` for bytes or a binary file object (read whole when it cannot seek), left at its start."""
    if isinstance(source, bytes | bytearray | memoryview):
        fh = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        fh = source
        if not (getattr(fh, "seekable", lambda: False)()):
            fh = io.BytesIO(fh.read())  # libsndfile needs to seek; an upload stream cannot
    else:
        raise TypeError(f"audio source must be a path, bytes or a binary file object, not {type(source)}")
    begin = fh.tell()
    size = fh.seek(0, io.SEEK_END) - begin
    fh.seek(begin)
    head = fh.read(16)
    if isinstance(head, str):
        raise TypeError(f"{label}: file object is in text mode; open it with 'rb'")
    fh.seek(begin)
    short = _wav_shortfall(fh, size, begin) if head[:4] == b"RIFF" else 0
    fh.seek(begin)
    return fh, size, head, short


def _undecodable(label: str, kind: str | None, size: int, msg: str) -> AudioError:
    """Why libsndfile could not open a file of the format its first bytes announce (`kind`)."""
    if kind == "MP3" and "MP3" not in sf.available_formats():
        return UnsupportedAudioError(
            label,
            f"MP3 needs libsndfile >= 1.1 (this one is {sf.__libsndfile_version__}); convert to FLAC/WAV",
        )
    if kind is not None and size < 4096:  # too small for a header plus audio: cut inside the header
        return TruncatedAudioError(label, f"{kind} header is truncated or corrupt ({msg})")
    if kind is not None:
        return UnsupportedAudioError(label, f"cannot decode this {kind} file ({msg})")
    return UnsupportedAudioError(
        label, f"not a supported audio file ({msg}); use wav, flac, ogg/opus or mp3, or convert with ffmpeg"
    )


def _wav_shortfall(fh: BinaryIO, size: int, begin: int = 0) -> int:
    """Bytes the RIFF `data` chunk announces beyond the end of the file (0 if complete or unknown).

    libsndfile silently shortens a cut WAV to what is there, so this is the only way to notice it.
    """
    fh.seek(begin + 12)
    pos = 12
    while pos + 8 <= size:
        hdr = fh.read(8)
        if len(hdr) < 8:
            return 0
        cid, length = hdr[:4], struct.unpack("<I", hdr[4:])[0]
        if cid == b"data":
            # 0 and 0xFFFFFFFF mean "unknown" (streamed WAVs); trust the file size then.
            if length in (0, 0xFFFFFFFF):
                return 0
            return max(0, length - (size - pos - 8))
        pos += 8 + length + (length & 1)
        fh.seek(begin + pos)
    return 0


def _sf_message(e: Exception) -> str:
    msg = getattr(e, "error_string", None) or str(e)
    return msg.replace("Error : ", "").strip().rstrip(".")


def _seek(f: sf.SoundFile, label: str, frame: int) -> None:
    try:
        f.seek(frame)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise TruncatedAudioError(
            label,
            f"truncated or corrupt: cannot seek to {frame / f.samplerate:.3f} s of "
            f"{f.frames / f.samplerate:.3f} s ({_sf_message(e)})",
        ) from None


def _read(f: sf.SoundFile, label: str, n: int, at: int) -> np.ndarray:
    """Read `n` frames (already positioned at frame `at`) as mono float32, checking what arrived."""
    sr = f.samplerate
    try:
        x = f.read(n, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        stop = _last_good_frame(f, at, n)
        where = (
            f"near {stop / sr:.3f} s"
            if stop is not None
            else f"between {at / sr:.3f} and {(at + n) / sr:.3f} s"
        )
        raise TruncatedAudioError(
            label,
            f"truncated or corrupt: decoding fails {where} of {f.frames / sr:.3f} s ({_sf_message(e)})",
        ) from None
    # MP3 headers only estimate the length; accept a small shortfall there, nowhere else.
    slack = max(2304, n // 100) if f.format == "MP3" else 0
    if len(x) < n - slack:
        raise TruncatedAudioError(
            label,
            f"truncated: the header announces {f.frames / sr:.3f} s but samples stop at "
            f"{(at + len(x)) / sr:.3f} s",
        )
    check_finite(x, label, sr, start=at)
    return x[:, 0].copy() if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)


def check_finite(x: np.ndarray, label: str, sample_rate: int = SAMPLE_RATE, start: int = 0) -> None:
    """Raise NonFiniteAudioError naming `label` and the first bad time if `x` ([N] or [N, C]) holds NaN/inf."""
    finite = np.isfinite(x)
    if finite.all():
        return
    bad = ~(finite.all(axis=1) if finite.ndim == 2 else finite)
    first = (start + int(np.argmax(bad))) / sample_rate
    raise NonFiniteAudioError(
        label, f"{int(bad.sum())} non-finite (NaN/inf) samples, the first at {first:.3f} s"
    )


def _last_good_frame(f: sf.SoundFile, at: int, n: int) -> int | None:
    """Where decoding of frames [at, at + n) breaks, to the nearest 0.1 s (error path only)."""
    step = max(1, f.samplerate // 10)
    pos = at
    try:
        f.seek(at)
        for pos in range(at, at + n, step):
            if len(f.read(min(step, at + n - pos), dtype="float32")) < min(step, at + n - pos):
                return pos
    except (sf.LibsndfileError, RuntimeError):
        return pos
    return None


def _check_duration(label: str, seconds: float, min_duration: float, is_span: bool) -> None:
    if seconds < min_duration:
        what = "span" if is_span else "audio"
        raise AudioTooShortError(
            label, f"{what} is {seconds:.3f} s, shorter than the minimum {min_duration} s"
        )
