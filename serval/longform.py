"""Long input in constant memory: audio longer than the model's 30 s window, read in blocks, encoded a
bounded batch of pieces at a time, and pooled as it goes.

What a record of long audio is (serval's one pooling rule, unchanged): the audio is cut into the
fewest equal pieces of at most 30 s (`serval.windows.split_span`), each piece is one model pass, and
the record's probabilities and scores are the mean of the pieces' probabilities and scores, weighted
by each piece's length in samples. Pieces' logits are not averaged, nor their statistics pooled.

How memory stays flat, whatever the length:
- a file (or bytes) longer than one piece is a `LongAudio`: its header gives its length, and its
  samples are decoded `BLOCK_SECONDS` at a time (soundfile, resampled by soxr's stream) and cut into
  pieces as they come; an array at another rate is resampled the same way, so only a piece is added;
- a model call holds at most `CALL_BUDGET` of work (one 30 s piece; see `work`), so 30 s pieces go
  one at a time on a CPU, and sixteen 4 s clips still share one call;
- what is kept per input is its running weighted sum.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from serval.audio import (
    AudioSource,
    array_to_mono,
    at_model_rate,
    check_finite,
    iter_chunks,
    load_audio,
    span_samples,
)
from serval.progress import progress_bar
from serval.vad import speech_fraction, streamed_speech_fraction
from serval.vocab import SAMPLE_RATE
from serval.windows import MAX_WINDOW, split_span

WINDOW_BATCHES = 4  # inputs read ahead of the model, in batches: so many are sorted by length and batched
BLOCK_SECONDS = 10.0  # 16 kHz audio decoded (or resampled) per step of a LongAudio
# Attention makes a clip's working memory grow faster than its length: on whisper-base with ONNX
# Runtime a 30 s piece holds 330 MB, a 15 s one 100 MB, sixteen 4 s clips 200 MB. A clip of s seconds
# is counted as s * (1 + s / QUADRATIC_SECONDS), which bounds those figures.
QUADRATIC_SECONDS = 9.0

Forward = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]


def work(seconds: float) -> float:
    """The working memory of one clip of `seconds` in a model call, in units of seconds of audio."""
    return seconds * (1.0 + seconds / QUADRATIC_SECONDS)


CALL_BUDGET = work(MAX_WINDOW)  # the most work one model call holds on a CPU: one 30 s piece


def piece_bounds(samples: int) -> list[tuple[int, int]]:
    """Sample bounds of the pieces of `samples` 16 kHz samples: equal pieces of at most 30 s."""
    spans = split_span(0.0, samples / SAMPLE_RATE, MAX_WINDOW)
    return [(round(a * SAMPLE_RATE), round(b * SAMPLE_RATE)) for a, b in spans]


def count_pieces(samples: int) -> int:
    """How many model passes a record of `samples` 16 kHz samples pools (1 within the window)."""
    return len(piece_bounds(samples))


@dataclass(eq=False)
class LongAudio:
    """Audio longer than one piece, read piece by piece and never held whole.

    `len()` is its length in 16 kHz samples, as an array's; `blocks()` yields its 16 kHz samples in order.
    """

    name: str | None
    samples: int
    blocks: Callable[[], Iterator[np.ndarray]]

    def __len__(self) -> int:
        return self.samples

    @property
    def pieces(self) -> int:
        return count_pieces(self.samples)

    def iter_pieces(self) -> Iterator[np.ndarray]:
        """The pieces of the pooling rule, decoded as they are reached."""
        return cut(self.blocks(), piece_bounds(self.samples))


def cut(blocks: Iterable[np.ndarray], bounds: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
    """Re-cut a stream of sample blocks at `bounds` (contiguous, from 0), keeping at most a piece and a block.

    A stream that ends early (an MP3 header's estimate) ends the last piece where its samples end.
    """
    buf, start, k = np.zeros(0, np.float32), 0, 0  # start: stream index of buf[0]
    for block in blocks:
        buf = np.concatenate([buf, block]) if len(buf) else np.asarray(block, np.float32)
        while k < len(bounds) and start + len(buf) >= bounds[k][1]:
            a, b = bounds[k]
            yield buf[a - start : b - start].copy()
            buf, start, k = buf[b - start :], b, k + 1
        if k == len(bounds):
            return
    if k < len(bounds) and len(buf):
        yield buf[bounds[k][0] - start :].copy()


def read_audio(
    source: AudioSource, start: float | None = None, end: float | None = None, *, name: str | None = None
) -> np.ndarray | LongAudio:
    """`load_audio` for audio within one piece; a `LongAudio` (nothing decoded yet) for longer audio."""
    samples = span_samples(source, start, end, name=name)
    if count_pieces(samples) == 1:
        return load_audio(_rewound(source), start, end, name=name)
    label = name if name is not None else str(source) if isinstance(source, str | os.PathLike) else None
    return LongAudio(label, samples, lambda: _file_blocks(source, start, end, name))


def _file_blocks(source, start, end, name) -> Iterator[np.ndarray]:
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)  # each reading starts from the beginning
    chunks = iter_chunks(_rewound(source), BLOCK_SECONDS, start=start or 0.0, end=end, name=name)
    return (x for _, x in chunks)


def _rewound(source):
    if hasattr(source, "seek"):
        source.seek(0)
    return source


def long_array(wave: np.ndarray, rate: int, name: str | None = None) -> LongAudio:
    """An array at `rate` Hz as LongAudio, resampled to 16 kHz a block at a time (the samples of a whole
    resampling)."""
    import soxr

    def blocks() -> Iterator[np.ndarray]:
        stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        step = round(BLOCK_SECONDS * rate)
        for i in range(0, len(wave), step):
            yield stream.resample_chunk(wave[i : i + step], last=i + step >= len(wave))

    return LongAudio(name, round(len(wave) * SAMPLE_RATE / rate), blocks)


def at_rate(wave: np.ndarray, rate: int | None, name: str | None = None) -> np.ndarray | LongAudio:
    """`wave` at 16 kHz (`rate` None: it is): resampled whole within one piece (`audio.at_model_rate`,
    which checks the rate), as LongAudio (resampled as it is read) beyond."""
    if rate is None or int(rate) == SAMPLE_RATE or count_pieces(round(len(wave) * SAMPLE_RATE / rate)) == 1:
        return at_model_rate(wave, rate)
    at_model_rate(wave[:0], rate)  # the rate's range check, on no samples
    return long_array(wave, int(rate), name)


def load_long_array(
    samples, sampling_rate: int | None = None, *, name: str = "<array>"
) -> np.ndarray | LongAudio:
    """`audio.load_array` (its conversions and errors), but an array at another rate longer than one
    piece comes back as LongAudio, so only a piece of its 16 kHz samples is added to memory."""
    wave = array_to_mono(samples, name)
    check_finite(wave, name)
    return at_rate(wave, sampling_rate, name)


def speech_of(wave: np.ndarray | LongAudio) -> float:
    """`vad.speech_fraction` of a record's audio; beyond one piece streamed a block at a time, so a long
    input's speech measure holds one block, not the recording."""
    if isinstance(wave, LongAudio):
        return streamed_speech_fraction(wave.blocks)
    if count_pieces(len(wave)) == 1:
        return speech_fraction(wave)
    step = round(BLOCK_SECONDS * SAMPLE_RATE)
    return streamed_speech_fraction(lambda: (wave[i : i + step] for i in range(0, len(wave), step)))


# ---------------------------------------------------------------------------- batches and pooling


def bounded_batches(
    pieces: Iterable[tuple[int, np.ndarray]], batch_size: int, budget: float | None = CALL_BUDGET
) -> Iterator[list[tuple[int, np.ndarray]]]:
    """(input, piece) pairs in batches of at most `batch_size` whose padded work is within `budget`.

    A batch is padded to its longest piece; `budget` None bounds by `batch_size` alone.
    """
    batch: list[tuple[int, np.ndarray]] = []
    longest = 0
    for pair in pieces:
        n = max(longest, len(pair[1]))
        full = len(batch) >= batch_size or (
            budget is not None and (len(batch) + 1) * work(n / SAMPLE_RATE) > budget
        )
        if batch and full:
            yield batch
            batch, n = [], len(pair[1])
        batch.append(pair)
        longest = n
    if batch:
        yield batch


class Pool:
    """Running length-weighted sums of the outputs of each input's pieces."""

    def __init__(self, n: int, widths: tuple[int, int]):
        self.probs = np.zeros((n, widths[0]), np.float64)
        self.scores = np.zeros((n, widths[1]), np.float64)
        self.weight = np.zeros(n, np.float64)

    def add(self, batch: Sequence[tuple[int, np.ndarray]], probs: np.ndarray, scores: np.ndarray) -> None:
        for row, (i, piece) in enumerate(batch):
            self.probs[i] += len(piece) * probs[row]
            self.scores[i] += len(piece) * scores[row]
            self.weight[i] += len(piece)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        weight = np.maximum(self.weight, 1)[:, None]
        return (self.probs / weight).astype(np.float32), (self.scores / weight).astype(np.float32)


def pooled_predict(
    forward: Forward,
    waves: Sequence[np.ndarray | LongAudio],
    widths: tuple[int, int],
    batch_size: int = 16,
    progress: bool = False,
    budget: float | None = CALL_BUDGET,
) -> tuple[np.ndarray, np.ndarray]:
    """`forward` over bounded batches of <= 30 s pieces; each input's outputs pooled by piece length.

    The one batching rule of every engine's `predict_waveforms`. Arrays (16 kHz) are cut into pieces
    without copying and sorted by length, so batches carry little padding; each LongAudio is read and
    scored piece by piece after them.
    """
    pool = Pool(len(waves), widths)
    pieces: list[tuple[int, np.ndarray]] = []
    for i, w in enumerate(waves):
        if not isinstance(w, LongAudio):
            w = np.asarray(w, dtype=np.float32).reshape(-1)
            pieces.extend((i, w[a:b]) for a, b in piece_bounds(len(w)))
    pieces.sort(key=lambda pair: len(pair[1]))
    streamed = (
        (i, piece) for i, w in enumerate(waves) if isinstance(w, LongAudio) for piece in w.iter_pieces()
    )
    total = len(pieces) + sum(w.pieces for w in waves if isinstance(w, LongAudio))
    bar = progress_bar(total=total, enabled=progress, unit=" piece")
    for source in (pieces, streamed):
        for batch in bounded_batches(source, batch_size, budget):
            pool.add(batch, *forward([piece for _, piece in batch]))
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return pool.result()


def pooling_note(name: str | None, seconds: float, pieces: int) -> str:
    """The one line that says a record pools pieces, and where the course over time is."""
    return (
        f"{name or 'the audio'}: {seconds:.1f} s is longer than the model's {MAX_WINDOW:g} s window, so "
        f"its record pools {pieces} pieces of at most {MAX_WINDOW:g} s ('pieces' in the record); "
        f"`serval timeline {name or 'FILE'}` gives the emotion over time"
    )


_noted = []


def note_once(note: str) -> None:
    """Say `note` on the "serval" logger (a warning, so it is seen), the first time in a process only."""
    if not _noted:
        _noted.append(note)
        logging.getLogger("serval").warning(note)
