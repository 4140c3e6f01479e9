"""Sliding-window inference over audio of any length: the one piece that timelines, pseudo-labels
and WebSocket streaming share.

The grid. Windows of `window` seconds start every `hop` seconds from the start of the audio
(`hop <= window`, so they cover it). The audio the regular grid leaves uncovered at the end
gets one more window, aligned to end exactly at the end of the audio, when that remainder is
at least `min_length` long; a shorter remainder is left out (it is already mostly inside the
previous window when hop < window). Audio shorter than one window is a single window of its
own length when it is at least `min_length` long, and no window otherwise. All windows of a
long recording therefore have the same length, which keeps the model's inputs comparable.

The grid and what is done with its windows are one `WindowSpec` (window, hop, minimum length,
VAD settings, longest merged segment), passed whole to every function here and to the timeline.
The grid is computed incrementally by `StreamingWindower` (push samples, get the windows they
complete; flush at the end for the end-aligned window), and `iter_windows`/`sliding_windows`
feed it a file chunk by chunk, so memory stays bounded whatever the file's length.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from serval.progress import progress_bar
from serval.vocab import SAMPLE_RATE

MAX_WINDOW = 30.0  # the longest input the model takes in one pass
MIN_HOP = 0.01  # seconds (160 samples): a finer grid is no finer for a model of 20 ms frames
MAX_WINDOWS = 100_000  # windows per recording (or stream) unless a WindowSpec asks for fewer
# a file path, bytes or binary file object (anything serval.audio decodes), or 16 kHz samples
Source = str | os.PathLike | bytes | BinaryIO | np.ndarray


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except TypeError:  # not a number at all
        return False


@dataclass(frozen=True)
class WindowSpec:
    """The window grid (seconds), the VAD that leaves silent windows unscored, and the merge.

    Checked when made: a grid the model or the grid rule cannot handle raises ValueError naming
    the bad value. The VAD settings apply only with `vad=True`; `max_segment` only when windows
    are merged into segments.
    """

    window: float = 4.0
    hop: float = 2.0
    min_length: float = 0.5  # shortest end remainder (or whole clip) that still gets a window
    vad: bool = False
    # chosen by benchmarks/vad_defaults.py (tables in docs/long-audio.md): on 12 recordings of clips
    # in real noise these score >= 95 % of the windows holding >= 1 s of speech in every one, and no
    # window of noise alone
    vad_threshold: float = 0.25  # Silero speech probability at which a frame turns to speech
    min_speech: float = 0.1  # fraction of a window's frames that must be speech for it to be scored
    max_segment: float = 15.0  # longest merged segment
    max_windows: int = MAX_WINDOWS  # most windows one recording or stream may have (bounds memory)

    def __post_init__(self) -> None:
        window, hop, min_length = self.window, self.hop, self.min_length
        for name in ("window", "hop", "min_length", "vad_threshold", "min_speech", "max_segment"):
            value = getattr(self, name)
            if not _finite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be between 0.1 and {MAX_WINDOW:g} s, got {window:g}")
        # checked in samples too: a hop that rounds to no samples would never move the grid on
        if not MIN_HOP <= hop <= window or seconds_to_samples(hop) < 1:
            raise ValueError(f"hop must be between {MIN_HOP:g} s and the window ({window:g} s), got {hop:g}")
        if not 0.1 <= min_length <= window:
            raise ValueError(
                f"min_length must be between 0.1 s and the window ({window:g} s), got {min_length:g}"
            )
        if not self.max_segment > 0:
            raise ValueError(f"max_segment must be > 0 s, got {self.max_segment:g}")
        if not (0 <= self.vad_threshold <= 1 and 0 <= self.min_speech <= 1):
            raise ValueError(
                f"vad_threshold and min_speech must be in [0, 1], got {self.vad_threshold:g}, {self.min_speech:g}"
            )
        if not isinstance(self.max_windows, int) or self.max_windows < 1:
            raise ValueError(f"max_windows must be a whole number >= 1, got {self.max_windows!r}")

    def keeps(self, speech_fraction: float) -> bool:
        """Whether a window with this VAD speech fraction is scored (always, without VAD)."""
        return not self.vad or round(speech_fraction, 3) >= self.min_speech

    def count(self, duration: float) -> int:
        """How many windows the grid puts over `duration` seconds of audio (without making them)."""
        n, w, h, least = (
            seconds_to_samples(duration),
            seconds_to_samples(self.window),
            seconds_to_samples(self.hop),
            seconds_to_samples(self.min_length),
        )
        if n < w:
            return int(n >= least)
        regular = (n - w) // h + 1
        return regular + int(n - ((regular - 1) * h + w) >= least)

    def check_count(self, duration: float) -> int:
        """The window count over `duration` seconds; ValueError when it passes `max_windows`."""
        n = self.count(duration)
        if n > self.max_windows:
            raise ValueError(
                f"a {self.window:g} s window every {self.hop:g} s over {duration:.1f} s of audio makes "
                f"{n} windows; at most {self.max_windows} are allowed: use a larger hop"
            )
        return n


@dataclass
class Window:
    """A window of audio cut from a stream: times in seconds from the stream's start (plus offset)."""

    start: float
    end: float
    samples: np.ndarray
    first_sample: int  # index of samples[0] in the stream (without offset)


@dataclass
class WindowResult:
    """One window (or pooled span) and what the model said about it.

    `probs`/`scores` are None when the window was not scored: VAD found too little speech in it
    (`no_speech`) or, for a span, it failed (`error`).
    """

    start: float
    end: float
    probs: np.ndarray | None = None
    scores: np.ndarray | None = None
    speech_fraction: float | None = None  # fraction of the window's 32 ms frames VAD called speech
    no_speech: bool | None = None  # left unscored for lack of speech; None without VAD
    pieces: int = 1  # model passes pooled into this result (spans longer than 30 s)
    error: str | None = None

    @property
    def scored(self) -> bool:
        return self.probs is not None

    @property
    def duration(self) -> float:
        return self.end - self.start

    def label(self, classes: Sequence[str]) -> str | None:
        return None if self.probs is None else classes[int(np.argmax(self.probs))]


def seconds_to_samples(seconds: float) -> int:
    """Seconds as a whole number of 16 kHz samples (rounded)."""
    return int(round(seconds * SAMPLE_RATE))


def window_grid(duration: float, spec: WindowSpec = WindowSpec()) -> list[tuple[float, float]]:
    """(start, end) seconds of every window over `duration` seconds of audio (see the module doc)."""
    w = StreamingWindower(spec)
    n = seconds_to_samples(duration)
    spans = [(a, b) for a, b in w._grid_until(n)]
    spans += w._final(n, spans[-1][1] if spans else None)
    return [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in spans]


class StreamingWindower:
    """The window grid over a stream of 16 kHz samples.

    `push(samples)` returns the windows those samples complete; `flush()` the end-aligned last
    window (or the single short window of a stream shorter than one window). Only the samples a
    future window can still need are kept.
    """

    def __init__(self, spec: WindowSpec = WindowSpec(), offset: float = 0.0):
        self.spec, self.offset = spec, offset
        self._w, self._h, self._min = (
            seconds_to_samples(spec.window),
            seconds_to_samples(spec.hop),
            seconds_to_samples(spec.min_length),
        )
        self.reset()

    def reset(self) -> None:
        self._buffer = np.zeros(0, np.float32)
        self._buffer_start = 0  # stream index of _buffer[0]
        self._total = 0  # samples pushed so far
        self._next = 0  # index of the next regular window
        self._last_end: int | None = None  # end sample of the last regular window

    @property
    def buffer_start(self) -> int:
        """Stream index of the oldest sample still kept (earlier ones can no longer be in a window)."""
        return self._buffer_start

    @property
    def total_samples(self) -> int:
        return self._total

    def _grid_until(self, total: int) -> Iterator[tuple[int, int]]:
        # regular windows that fit in `total` samples, from the next one on
        while self._next * self._h + self._w <= total:
            if self._next >= self.spec.max_windows:
                raise ValueError(f"more than {self.spec.max_windows} windows: use a larger hop")
            a = self._next * self._h
            self._next += 1
            self._last_end = a + self._w
            yield a, a + self._w

    def _final(self, total: int, last_end: int | None) -> list[tuple[int, int]]:
        if last_end is None:
            return [(0, total)] if total >= self._min else []
        if total - last_end >= self._min:
            return [(total - self._w, total)]
        return []

    def _cut(self, a: int, b: int) -> Window:
        x = self._buffer[a - self._buffer_start : b - self._buffer_start]
        return Window(self.offset + a / SAMPLE_RATE, self.offset + b / SAMPLE_RATE, x.copy(), a)

    def push(self, samples: np.ndarray) -> list[Window]:
        """Add samples; return the windows now complete, in time order."""
        x = np.asarray(samples, np.float32).reshape(-1)
        self._buffer = np.concatenate([self._buffer, x]) if len(self._buffer) else x
        self._total += len(x)
        out = [self._cut(a, b) for a, b in self._grid_until(self._total)]
        # keep what the next regular window or a final end-aligned window may still need
        keep_from = max(0, min(self._next * self._h, self._total - self._w))
        if keep_from > self._buffer_start:
            self._buffer = self._buffer[keep_from - self._buffer_start :]
            self._buffer_start = keep_from
        return out

    def flush(self) -> list[Window]:
        """The last window of the stream (see the grid rule), then reset for a new stream."""
        out = [self._cut(a, b) for a, b in self._final(self._total, self._last_end)]
        self.reset()
        return out


def _array_chunks(wave: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    for i in range(0, len(wave), chunk):
        yield wave[i : i + chunk]


def iter_windows(
    source: Source,
    spec: WindowSpec = WindowSpec(),
    start: float = 0.0,
    end: float | None = None,
    chunk_seconds: float = 60.0,
    on_chunk: Callable[[np.ndarray], None] | None = None,
) -> Iterator[Window]:
    """Windows of an audio file (read chunk by chunk with `serval.audio.iter_chunks`) or a 16 kHz array.

    Times are seconds from the start of the file. `on_chunk` sees every chunk before its windows
    are yielded (the VAD uses it). Audio errors are raised as `serval.audio.AudioError`.
    """
    windower = StreamingWindower(spec, offset=start)
    if isinstance(source, np.ndarray):
        wave = np.asarray(source, np.float32).reshape(-1)
        wave = wave[seconds_to_samples(start) : None if end is None else seconds_to_samples(end)]
        chunks: Iterable[np.ndarray] = _array_chunks(wave, seconds_to_samples(chunk_seconds))
    else:
        from serval.audio import iter_chunks

        chunks = (c for _, c in iter_chunks(source, chunk_seconds, 0.0, start, end))
    for chunk in chunks:
        if on_chunk is not None:
            on_chunk(chunk)
        yield from windower.push(chunk)
    yield from windower.flush()


def window_speech(flags: np.ndarray, first_sample: int, n: int, base: int = 0) -> float:
    """Fraction of the 32 ms VAD frames under `n` samples from `first_sample` flagged speech
    (`flags[0]` is frame `base`); frames past the flags count as silence."""
    from serval.vad import FRAME

    a, b = first_sample // FRAME, max(first_sample // FRAME + 1, (first_sample + n) // FRAME)
    sel = flags[max(a - base, 0) : max(b - base, 0)]
    return float(sel.mean()) if len(sel) else 0.0


class _SpeechMask:
    """VAD flags of a stream, trimmed as windows move on; gives each window's speech fraction."""

    def __init__(self, threshold: float):
        from serval.vad import FRAME, SileroVAD

        self.vad = SileroVAD(threshold)
        self.frame = FRAME
        self.flags = np.zeros(0, bool)
        self.base = 0  # frame index of flags[0]

    def push(self, chunk: np.ndarray) -> None:
        self.flags = np.concatenate([self.flags, self.vad.push(chunk)])

    def finish(self) -> None:
        self.flags = np.concatenate([self.flags, self.vad.flush()])

    def fraction(self, first_sample: int, n: int) -> float:
        return window_speech(self.flags, first_sample, n, self.base)

    def trim(self, first_sample: int) -> None:
        drop = first_sample // self.frame - self.base
        if drop > 0:
            self.flags = self.flags[drop:]
            self.base += drop


def sliding_windows(
    source: Source,
    predictor,
    spec: WindowSpec = WindowSpec(),
    batch_size: int = 16,
    start: float = 0.0,
    end: float | None = None,
    chunk_seconds: float = 60.0,
    progress: bool = False,
) -> Iterator[WindowResult]:
    """Score every window of a file or 16 kHz array with `predictor.predict_waveforms`, in time order.

    A generator: results come out batch by batch and the audio is read in chunks, so a
    multi-hour file runs in bounded memory. With `spec.vad` every result carries its
    `speech_fraction`, and a window in which less than `spec.min_speech` of the 32 ms frames are
    speech is yielded unscored (`probs is None`, `no_speech` True) without reaching the model.
    """
    mask = _SpeechMask(spec.vad_threshold) if spec.vad else None
    bar = _audio_bar(source, start, end) if progress else None

    def on_chunk(chunk: np.ndarray) -> None:
        if mask is not None:
            mask.push(chunk)
        if bar is not None:  # never past the total: a header's duration can be shorter than the decode
            bar.update(min(len(chunk) / SAMPLE_RATE, bar.total - bar.n))

    pending: list[tuple[WindowResult, np.ndarray | None]] = []

    def run_batch() -> Iterator[WindowResult]:
        todo = [(r, x) for r, x in pending if x is not None]
        if todo:
            probs, scores = predictor.predict_waveforms([x for _, x in todo], batch_size=batch_size)
            for (r, _), p, s in zip(todo, probs, scores):
                r.probs, r.scores = np.asarray(p, np.float32), np.asarray(s, np.float32)
        yield from (r for r, _ in pending)
        pending.clear()

    windows = iter_windows(source, spec, start, end, chunk_seconds, on_chunk)
    try:
        for w in _with_vad_tail(windows, mask):
            r = WindowResult(round(w.start, 3), round(w.end, 3))
            keep: np.ndarray | None = w.samples
            if mask is not None:
                r.speech_fraction = round(mask.fraction(w.first_sample, len(w.samples)), 3)
                mask.trim(w.first_sample)
                r.no_speech = not spec.keeps(r.speech_fraction)
                keep = None if r.no_speech else keep
            pending.append((r, keep))
            waiting = sum(x is not None for _, x in pending)
            if waiting >= batch_size or waiting == 0:  # unscored windows need not wait for a batch
                yield from run_batch()
        yield from run_batch()
    finally:
        if bar is not None:
            bar.close()


def _with_vad_tail(windows: Iterator[Window], mask: _SpeechMask | None) -> Iterator[Window]:
    # The final (end-aligned) window comes from flush, after the last chunk: flush the VAD's
    # partial frame first so that window's fraction sees the stream's very end.
    prev = None
    for w in windows:
        if prev is not None:
            yield prev
        prev = w
    if prev is not None:
        if mask is not None:
            mask.finish()
        yield prev


def _audio_bar(source, start: float, end: float | None):
    # a bar in seconds of audio read, for a file or an array
    if isinstance(source, np.ndarray):
        total = len(source) / SAMPLE_RATE
    else:
        from serval.audio import audio_info

        total = audio_info(source).duration
    total = (min(total, end) if end is not None else total) - start
    return progress_bar(
        total=max(total, 0.0),
        unit=" s audio",
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]",
    )


# ---------------------------------------------------------------------------- merging and pooling


def pool(results: Sequence[WindowResult]) -> tuple[np.ndarray, np.ndarray]:
    """Duration-weighted mean probabilities and scores of scored results."""
    scored = [r for r in results if r.scored]
    if not scored:
        raise ValueError("nothing to pool: no scored windows")
    w = np.array([max(r.duration, 1e-6) for r in scored], np.float64)[:, None]
    probs = (np.stack([r.probs for r in scored]).astype(np.float64) * w).sum(0) / w.sum()
    scores = (np.stack([r.scores for r in scored]).astype(np.float64) * w).sum(0) / w.sum()
    return probs.astype(np.float32), scores.astype(np.float32)


@dataclass
class Segment:
    """Adjacent windows with the same label, joined."""

    start: float
    end: float
    label: str
    probs: np.ndarray
    scores: np.ndarray
    windows: int


def owned_spans(results: Sequence[WindowResult]) -> list[tuple[float, float]]:
    """The part of the timeline each window stands for: overlapping neighbours split their overlap
    at its middle, so the spans tile the audio without overlapping."""
    spans = []
    for i, r in enumerate(results):
        a = r.start if i == 0 else max(r.start, (r.start + min(results[i - 1].end, r.end)) / 2)
        b = (
            r.end
            if i == len(results) - 1
            else min(r.end, (results[i + 1].start + min(r.end, results[i + 1].end)) / 2)
        )
        spans.append((round(a, 3), round(max(a, b), 3)))
    return spans


def no_speech_spans(results: Sequence[WindowResult]) -> list[tuple[float, float]]:
    """The parts of the timeline (`owned_spans`) whose windows VAD left unscored for lack of
    speech, adjacent ones joined, in time order."""
    spans: list[tuple[float, float]] = []
    for r, (a, b) in zip(results, owned_spans(results)):
        if not r.no_speech or b <= a:
            continue
        if spans and spans[-1][1] >= a:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans


def merge_windows(
    results: Sequence[WindowResult], classes: Sequence[str], max_len: float = 15.0
) -> list[Segment]:
    """Join runs of adjacent scored windows with the same label into segments of at most `max_len` s.

    Windows are given in time order; each stands for its `owned_spans` part of the timeline.
    An unscored (non-speech) window ends a run. A run longer than `max_len` is cut greedily: a
    segment takes windows while its span stays within `max_len`. A segment's probabilities and
    scores are the duration-weighted mean of its windows'.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    spans = owned_spans(results)
    segments: list[Segment] = []
    run: list[tuple[WindowResult, tuple[float, float]]] = []

    def close() -> None:
        if run:
            probs, scores = pool([r for r, _ in run])
            label = run[0][0].label(classes)
            segments.append(Segment(run[0][1][0], run[-1][1][1], label, probs, scores, len(run)))
            run.clear()

    for r, span in zip(results, spans):
        if not r.scored:
            close()
            continue
        if run and (r.label(classes) != run[0][0].label(classes) or span[1] - run[0][1][0] > max_len + 1e-6):
            close()
        run.append((r, span))
    close()
    return segments


# ---------------------------------------------------------------------------- spans (speaker turns: serval.turns)


def split_span(start: float, end: float, max_len: float = MAX_WINDOW) -> list[tuple[float, float]]:
    """Cut [start, end] into the fewest equal pieces of at most `max_len` seconds."""
    n = max(1, int(np.ceil((end - start) / max_len - 1e-9)))
    edges = np.linspace(start, end, n + 1)
    return [(float(a), float(b)) for a, b in zip(edges[:-1], edges[1:])]
