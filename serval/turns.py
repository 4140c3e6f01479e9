"""Speaker turns: reading them (RTTM, or CSV start,end,speaker) and scoring given spans, each pooled
over its <= 30 s pieces (`serval timeline --segments`, `turns_timeline`)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serval.vocab import SAMPLE_RATE
from serval.windows import MAX_WINDOW, Source, WindowResult, pool, seconds_to_samples, split_span


@dataclass
class Turn:
    """One speaker turn: [start, end) seconds."""

    start: float
    end: float
    speaker: str


class TurnsError(ValueError):
    pass


def read_turns(path: str | os.PathLike) -> list[Turn]:
    """Speaker turns from an RTTM file (SPEAKER lines) or a CSV of start,end,speaker, sorted by start.

    A CSV may have a header naming the columns start, end, speaker (any order); without one the
    first three columns are taken in that order. Errors name the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise TurnsError(f"{path}: cannot read turns ({e.strerror or e})") from e
    lines = [
        (i, line)
        for i, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith(("#", ";;"))
    ]
    if not lines:
        raise TurnsError(f"{path}: no speaker turns in the file")
    turns = (
        _read_rttm(path, lines)
        if lines[0][1].split()[0].isupper() and "," not in lines[0][1]
        else (_read_csv(path, lines))
    )
    if not turns:
        raise TurnsError(f"{path}: no speaker turns in the file")
    return sorted(turns, key=lambda t: (t.start, t.end, t.speaker))


def _read_rttm(path: Path, lines: list[tuple[int, str]]) -> list[Turn]:
    turns = []
    for i, line in lines:
        f = line.split()
        if f[0] != "SPEAKER":
            continue  # other RTTM record types (SPKR-INFO, LEXEME, …) carry no turns
        if len(f) < 8:
            raise TurnsError(f"{path}:{i}: RTTM SPEAKER line needs at least 8 fields, got {len(f)}")
        start, dur = _number(path, i, f[3], "onset"), _number(path, i, f[4], "duration")
        turns.append(_turn(path, i, start, start + dur, f[7]))
    return turns


def _read_csv(path: Path, lines: list[tuple[int, str]]) -> list[Turn]:
    rows = list(csv.reader(io.StringIO("\n".join(line for _, line in lines))))
    header = [c.strip().lower() for c in rows[0]]
    cols = (0, 1, 2)
    if {"start", "end", "speaker"} <= set(header):
        cols = (header.index("start"), header.index("end"), header.index("speaker"))
        rows, lines = rows[1:], lines[1:]
    turns = []
    for (i, _), row in zip(lines, rows):
        if len(row) <= max(cols):
            raise TurnsError(f"{path}:{i}: expected start,end,speaker, got {row}")
        start, end = _number(path, i, row[cols[0]], "start"), _number(path, i, row[cols[1]], "end")
        turns.append(_turn(path, i, start, end, row[cols[2]].strip()))
    return turns


def _number(path: Path, line: int, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TurnsError(f"{path}:{line}: {what} {text!r} is not a number") from None
    if not np.isfinite(value) or value < 0:
        raise TurnsError(f"{path}:{line}: {what} {text!r} must be a finite number >= 0")
    return value


def _turn(path: Path, line: int, start: float, end: float, speaker: str) -> Turn:
    if end <= start:
        raise TurnsError(f"{path}:{line}: turn end {end:g} s is not after start {start:g} s")
    return Turn(start, end, speaker or "unknown")


# ---------------------------------------------------------------------------- scoring spans


def score_spans(
    source: Source,
    spans: Iterable[tuple[float, float]],
    predictor,
    max_window: float = MAX_WINDOW,
    batch_size: int = 16,
) -> Iterator[WindowResult]:
    """One pooled result per (start, end) span, in order: spans longer than `max_window` are cut
    into equal pieces whose outputs are averaged, weighted by duration.

    Each piece is read on its own, so a long span never sits in memory whole. A span that cannot
    be read (too short, past the end of the file, …) gives a result with `error` set.
    """
    queue: list[tuple[WindowResult, list[WindowResult]]] = []
    waiting: list[tuple[WindowResult, np.ndarray]] = []
    for a, b in spans:
        result = WindowResult(round(float(a), 3), round(float(b), 3))
        pieces = _read_pieces(source, a, b, max_window, result)
        waiting += pieces
        result.pieces = len(pieces)
        queue.append((result, [piece for piece, _ in pieces]))
        if len(waiting) >= batch_size:
            _score(predictor, waiting, batch_size)
            yield from _finished(queue)
    _score(predictor, waiting, batch_size)
    yield from _finished(queue)


def _read_pieces(
    source: Source, a: float, b: float, max_window: float, result: WindowResult
) -> list[tuple[WindowResult, np.ndarray]]:
    """The span's <= `max_window` pieces with their audio; none, and `result.error` set, when a piece
    cannot be read (the span is then reported, not scored)."""
    from serval.audio import AudioError

    if b <= a:
        result.error = f"span {a:g}-{b:g} s is empty"
        return []
    try:
        return [
            (WindowResult(pa, pb), _span_audio(source, pa, pb)) for pa, pb in split_span(a, b, max_window)
        ]
    except (AudioError, ValueError) as e:
        result.error = str(e)
        return []


def _span_audio(source: Source, a: float, b: float) -> np.ndarray:
    """The 16 kHz samples of [a, b) seconds of a file or an array (an AudioError when under 0.1 s)."""
    from serval.audio import AudioError, load_audio

    if not isinstance(source, np.ndarray):
        return load_audio(source, a, b)
    x = np.asarray(source, np.float32).reshape(-1)[seconds_to_samples(a) : seconds_to_samples(b)]
    if len(x) < seconds_to_samples(0.1):
        raise AudioError(
            "<array>",
            f"span {a:.3f}-{b:.3f} s has {len(x) / SAMPLE_RATE:.3f} s of audio (shorter than 0.1 s)",
        )
    return x


def _score(predictor, waiting: list[tuple[WindowResult, np.ndarray]], batch_size: int) -> None:
    """The waiting pieces scored in one call, their results set; the list emptied."""
    if waiting:
        probs, scores = predictor.predict_waveforms([x for _, x in waiting], batch_size=batch_size)
        for (piece, _), p, s in zip(waiting, probs, scores):
            piece.probs, piece.scores = np.asarray(p, np.float32), np.asarray(s, np.float32)
        waiting.clear()


def _finished(queue: list[tuple[WindowResult, list[WindowResult]]]) -> Iterator[WindowResult]:
    """The spans at the head of `queue` whose pieces are all scored, pooled, in order."""
    while queue and all(p.scored for p in queue[0][1]):
        result, pieces = queue.pop(0)
        if pieces:
            result.probs, result.scores = pool(pieces)
        yield result
