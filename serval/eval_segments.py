"""`serval eval`'s segmentations: manifest rows -> the items that are scored (section 6 of the paper).

- "utterance": each row as it is;
- "2s": each row cut into fixed 2 s segments carrying the row's gold label;
- "merged": adjacent rows of one file with the same gold label and touching spans merged, up to 15 s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from serval.audio import AudioError
from serval.clip import Clip
from serval.io.inputs import item_info

SEGMENTATIONS = ("utterance", "2s", "merged")
SEGMENT_SECONDS = 2.0
MIN_TAIL_SECONDS = 1.0  # a row's last piece shorter than this is not scored under "2s"
MERGE_MAX_SECONDS = 15.0
TOUCH_TOLERANCE = 0.01  # seconds between spans that still count as adjacent


def segment(row, rows: tuple[int, ...], start=None, end=None, dims=None) -> Clip:
    """A scored item: a span of a row's file with its gold label and dims, and in `extra["rows"]` the
    indices of the manifest rows it covers (a failed one excludes them all)."""
    a, v, d = dims if dims is not None else (row.arousal, row.valence, row.dominance)
    return Clip(
        str(row.path),
        start,
        end,
        row.label,
        a,
        v,
        d,
        language=row.language,
        speaker=row.speaker,
        corpus=row.corpus,
        extra={"rows": rows},
    )


def _unit(row, i: int, start=None, end=None, whole: bool = True) -> Clip:
    start, end = (row.start, row.end) if whole else (round(start, 6), round(end, 6))
    return segment(row, (i,), start, end)


def _file_duration(path: str) -> float | None:
    try:
        return item_info(path).duration
    except AudioError:
        return None  # the load of the whole row will then fail and report why


def make_units(
    rows: Sequence, segmentation: str, duration: Callable[[str], float | None] = _file_duration
) -> list[Clip]:
    """Manifest rows -> the items scored under `segmentation` ("utterance", "2s" or "merged")."""
    if segmentation == "utterance":
        return [_unit(r, i) for i, r in enumerate(rows)]
    if segmentation == "2s":
        return _two_second_units(rows, duration)
    if segmentation == "merged":
        return _merged_units(rows)
    raise ValueError(f"unknown segmentation {segmentation!r}; choose from {', '.join(SEGMENTATIONS)}")


def _two_second_units(rows: Sequence, duration: Callable[[str], float | None]) -> list[Clip]:
    units = []
    for i, row in enumerate(rows):
        start = row.start or 0.0
        end = row.end if row.end is not None else duration(str(row.path))
        if end is None or end - start <= SEGMENT_SECONDS + TOUCH_TOLERANCE:
            units.append(_unit(row, i))  # already a 2 s segment (or shorter): scored as it is
            continue
        n_full = int(math.floor((end - start) / SEGMENT_SECONDS + 1e-6))
        for k in range(n_full):
            a = start + k * SEGMENT_SECONDS
            units.append(_unit(row, i, a, a + SEGMENT_SECONDS, whole=False))
        tail = end - (start + n_full * SEGMENT_SECONDS)
        if tail >= MIN_TAIL_SECONDS - 1e-6:
            units.append(_unit(row, i, start + n_full * SEGMENT_SECONDS, end, whole=False))
    return units


def _merged_units(rows: Sequence) -> list[Clip]:
    by_file: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_file.setdefault(str(row.path), []).append(i)
    groups: list[list[int]] = []
    for indices in by_file.values():
        indices.sort(key=lambda i: (rows[i].start or 0.0, i))
        current: list[int] = []
        for i in indices:
            row = rows[i]
            if current and _can_merge(rows[current[0]], rows[current[-1]], row):
                current.append(i)
            else:
                if current:
                    groups.append(current)
                current = [i]
        groups.append(current)
    groups.sort(key=lambda g: g[0])
    units = []
    for g in groups:
        first, last = rows[g[0]], rows[g[-1]]
        if len(g) == 1:
            units.append(_unit(first, g[0]))
            continue
        lengths = np.array([rows[i].end - rows[i].start for i in g])
        dims = np.array([rows[i].dims for i in g], dtype=float)  # NaN where not annotated
        # duration-weighted mean; None as soon as one merged row lacks the dimension
        merged = [float(v) for v in (lengths[:, None] * dims).sum(0) / lengths.sum()]
        units.append(
            segment(first, tuple(g), first.start, last.end, [v if np.isfinite(v) else None for v in merged])
        )
    return units


def _can_merge(first, last, row) -> bool:
    return (
        row.label is not None
        and row.label == last.label
        and last.end is not None
        and row.start is not None
        and row.end is not None
        and first.start is not None
        and abs(row.start - last.end) <= TOUCH_TOLERANCE
        and row.end - first.start <= MERGE_MAX_SECONDS + TOUCH_TOLERANCE
        and (row.language, row.corpus) == (last.language, last.corpus)
    )


def same_segmentations(valid: dict[str, list[Clip]]) -> dict[str, str]:
    """{segmentation: an earlier one with exactly its items}, whose scores it therefore repeats: merged =
    utterance when no two rows of a file merge, 2s = utterance when no row is longer than 2 s."""
    same: dict[str, str] = {}
    order = list(valid)
    for i, seg in enumerate(order):
        twin = next((e for e in order[:i] if e not in same and valid[e] == valid[seg]), None)
        if twin is not None:
            same[seg] = twin
    return same


def scorable(u: Clip) -> bool:
    """A unit with a label or a dimension: one that can be scored (and so is run)."""
    return u.label is not None or any(v is not None for v in u.dims)
