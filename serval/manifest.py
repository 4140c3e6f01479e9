"""Data manifests: one row per clip (or span of a file), as CSV with a header or as JSONL.

Columns: path, start, end, label, arousal, valence, dominance, language, speaker, corpus,
split, then any extra columns, which are kept. The format is chosen by the extension
(`.csv` or `.jsonl`). A label is one of a set of names: the 7 classes unless the caller gives
another set (`labels=`), or None for any name. See docs/data.md for the full description.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serval.atomic import atomic_write_text
from serval.audio import MIN_DURATION, SPAN_TOLERANCE, AudioError, AudioNotFoundError, audio_info
from serval.clip import COLUMNS, Clip
from serval.vocab import DIMENSIONS, EMOTIONS

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}

_FLOAT_COLUMNS = ("start", "end", *DIMENSIONS)
_TEXT_COLUMNS = ("language", "speaker", "corpus", "split")


ManifestRow = Clip  # a manifest's row is a clip (serval.clip); the name users import


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: its line (1-based; 0 = the whole file) and column."""

    line: int
    column: str | None
    message: str

    def format(self, manifest: str | os.PathLike) -> str:
        return f"{manifest}:{self.line}: {self.message}"


class ManifestError(ValueError):
    """A manifest that cannot be read; `str(e)` is `"<file>:<line>: <message>"`."""

    def __init__(self, path: str | os.PathLike, line: int, message: str):
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{path}:{line}: {message}")


def manifest_format(path: str | os.PathLike) -> str:
    """'csv' or 'jsonl', from the file's extension."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: unknown manifest format {ext!r} (use .csv or .jsonl)")
    return FORMATS[ext]


# ---------------------------------------------------------------------------------------
# Parsing one record. Shared by read_manifest (stops at the first problem) and
# check_manifest (collects them all).


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    number = float(value.strip() if isinstance(value, str) else value)
    if not math.isfinite(number):
        raise ValueError
    return number


def label_set(labels: Iterable[str] | None) -> tuple[str, ...] | None:
    """A label set as manifests compare labels: lower-case, stripped, in order, each once; None is any label."""
    if labels is None:
        return None
    names = tuple(dict.fromkeys(str(name).strip().lower() for name in labels))
    if not names or "" in names:
        raise ValueError(f"a label set needs one or more non-empty names, not {list(labels)!r}")
    return names


def _parse_label(raw: Any, labels: Sequence[str] | None) -> tuple[str | None, str | None]:
    """(label, problem): a label is case-insensitive, and must be one of `labels` unless that is None."""
    if _is_empty(raw):
        return None, None
    label = str(raw).strip().lower()
    if labels is not None and label not in labels:
        return label, f"unknown label {raw!r} (expected one of {', '.join(labels)})"
    return label, None


def _parse_record(
    record: dict[str, Any], base: Path, labels: Sequence[str] | None = EMOTIONS
) -> tuple[ManifestRow | None, list[tuple[str | None, str]]]:
    """A row and the (column, message) problems of one raw record; row is None when unusable."""
    problems: list[tuple[str | None, str]] = []
    values: dict[str, Any] = {}

    raw_path = record.get("path")
    if _is_empty(raw_path) or not isinstance(raw_path, str):
        problems.append(
            ("path", "path is empty" if _is_empty(raw_path) else f"path is not text: {raw_path!r}")
        )
    else:
        p = Path(raw_path.strip()).expanduser()
        values["path"] = str(p if p.is_absolute() else base / p)

    for name in _FLOAT_COLUMNS:
        raw = record.get(name)
        if _is_empty(raw):
            values[name] = None
            continue
        try:
            values[name] = _parse_float(raw)
        except (TypeError, ValueError):
            problems.append((name, f"{name} is not a number: {raw!r}"))
            values[name] = None
            continue
        if name in DIMENSIONS and not 0.0 <= values[name] <= 1.0:
            problems.append((name, f"{name} {values[name]:g} is out of range [0, 1]"))
        if name in ("start", "end") and values[name] < 0:
            problems.append((name, f"{name} {values[name]:g} is negative"))
    start, end = values["start"], values["end"]
    if start is not None and end is not None and start >= end:
        problems.append(("end", f"start {start:g} s is not before end {end:g} s"))

    values["label"], problem = _parse_label(record.get("label"), labels)
    if problem:
        problems.append(("label", problem))

    for name in _TEXT_COLUMNS:
        raw = record.get(name)
        values[name] = None if _is_empty(raw) else str(raw).strip()

    extra = {k: v for k, v in record.items() if k not in COLUMNS and k is not None}
    if "path" not in values:
        return None, problems
    return ManifestRow(**values, extra=extra), problems


# ---------------------------------------------------------------------------------------
# Reading


def _iter_records(path: Path):
    """Yield (line, record-or-None, error-message-or-None) for each data row of the file."""
    fmt = manifest_format(path)
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    yield line_no, None, f"not valid JSON: {e.msg}"
                    continue
                if not isinstance(record, dict):
                    yield line_no, None, "not a JSON object"
                    continue
                yield line_no, record, None
            return
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise ManifestError(path, 1, "empty manifest: no header line")
        if "path" not in header:
            raise ManifestError(path, 1, f"no 'path' column in header {header}")
        seen = set()
        for name in header:
            if name in seen:
                raise ManifestError(path, 1, f"column {name!r} appears twice in the header")
            seen.add(name)
        next_line = 2
        for record in reader:
            line_no, next_line = next_line, reader.line_num + 1
            if None in record:  # more cells than header names
                yield line_no, None, f"{len(header) + len(record[None])} cells for {len(header)} columns"
                continue
            if all(_is_empty(v) for v in record.values()):
                continue
            yield line_no, record, None


def read_manifest(path: str | os.PathLike, labels: Iterable[str] | None = EMOTIONS) -> list[ManifestRow]:
    """All rows of a CSV/JSONL manifest; raises ManifestError at the first bad row.

    Relative audio paths are resolved against the manifest's folder; empty cells are None. A label
    outside `labels` (default the 7 classes; None: any) is a bad row.
    """
    labels = label_set(labels)
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, 0, "manifest not found" if not path.exists() else "not a file")
    base = path.resolve().parent
    rows = []
    for line_no, record, error in _iter_records(path):
        if error:
            raise ManifestError(path, line_no, error)
        row, problems = _parse_record(record, base, labels)
        if problems:
            raise ManifestError(path, line_no, problems[0][1])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# Writing


def _validate_rows(rows: list[ManifestRow], labels: Sequence[str] | None) -> None:
    for i, row in enumerate(rows):
        _, problems = _parse_record(row.to_dict(), Path("."), labels)
        if problems:
            raise ValueError(f"row {i} ({row.path}): {problems[0][1]}")
        clash = set(row.extra) & set(COLUMNS)
        if clash:
            raise ValueError(f"row {i} ({row.path}): extra columns {sorted(clash)} shadow standard ones")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def format_manifest(rows: Iterable[ManifestRow], fmt: str) -> str:
    """The text of a manifest in `fmt` ('csv' or 'jsonl')."""
    rows = list(rows)
    extra_columns: dict[str, None] = {}
    for row in rows:
        extra_columns.update(dict.fromkeys(row.extra))
    columns = [*COLUMNS, *extra_columns]
    out = io.StringIO()
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")
    else:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            record = row.to_dict()
            writer.writerow([_cell(record.get(c)) for c in columns])
    return out.getvalue()


def write_manifest(
    rows: Iterable[ManifestRow],
    path: str | os.PathLike,
    overwrite: bool = False,
    labels: Iterable[str] | None = EMOTIONS,
) -> None:
    """Write rows as CSV or JSONL (by extension), atomically; refuses to replace a file unless overwrite.

    Every row is checked first (a label outside `labels`, default the 7 classes, is an error).
    """
    rows = list(rows)
    fmt = manifest_format(path)
    _validate_rows(rows, label_set(labels))
    atomic_write_text(path, format_manifest(rows, fmt), overwrite=overwrite)


# ---------------------------------------------------------------------------------------
# Checking


def _read_header(path: str) -> tuple[float | None, str | None]:
    """(duration, None) or (None, message) for one audio file, from its header alone."""
    try:
        return audio_info(path).duration, None
    except AudioNotFoundError as e:
        return None, f"audio file not found: {path} ({e.cause})"
    except AudioError as e:
        return None, f"unreadable audio {path}: {e.cause}"


def _duplicates(parsed: list[tuple[int, ManifestRow, bool]]) -> list[Problem]:
    """A problem for every row with the same path, start and end as an earlier one."""
    problems, first_seen = [], {}
    for line_no, row, span_ok in parsed:
        if not span_ok:  # a span that did not parse would pass for "whole file" here
            continue
        key = (os.path.normpath(row.path), row.start, row.end)
        if key in first_seen:
            problems.append(
                Problem(line_no, "path", f"duplicate of line {first_seen[key]} (same path, start, end)")
            )
        else:
            first_seen[key] = line_no
    return problems


def _span_problem(line_no: int, row: ManifestRow, duration: float) -> Problem | None:
    """What is wrong with a row's span given its file's duration, if anything."""
    start = row.start or 0.0
    if row.end is not None and row.end > duration + SPAN_TOLERANCE:
        return Problem(line_no, "end", f"end {row.end:g} s is beyond the file's duration {duration:.3f} s")
    if start >= duration:
        return Problem(line_no, "start", f"start {start:g} s is beyond the file's duration {duration:.3f} s")
    length = min(row.end if row.end is not None else duration, duration) - start
    if length < MIN_DURATION:
        return Problem(line_no, "end", f"span is {length:.3f} s, shorter than the {MIN_DURATION:g} s minimum")
    return None


def _audio_problems(parsed: list[tuple[int, ManifestRow, bool]]) -> list[Problem]:
    """Missing or unreadable audio and spans outside their files; each header is read once."""
    problems: list[Problem] = []
    headers: dict[str, tuple[float | None, str | None]] = {}
    for line_no, row, span_ok in parsed:
        if row.path not in headers:
            headers[row.path] = _read_header(row.path)
        duration, error = headers[row.path]
        if error:
            problems.append(Problem(line_no, "path", error))
        elif span_ok and (problem := _span_problem(line_no, row, duration)):
            problems.append(problem)
    return problems


def check_manifest(
    path: str | os.PathLike, check_audio: bool = True, labels: Iterable[str] | None = EMOTIONS
) -> list[Problem]:
    """Every problem of a manifest, each with its line: bad values, duplicates, missing or bad audio.

    A label outside `labels` (default the 7 classes; None: any) is a problem. Each audio file's
    header is read at most once, and no audio is decoded.
    """
    labels = label_set(labels)
    path = Path(path)
    if not path.is_file():
        return [Problem(0, None, "manifest not found" if not path.exists() else "not a file")]
    try:
        manifest_format(path)
    except ValueError as e:
        return [Problem(0, None, str(e).split(": ", 1)[-1])]
    base = path.resolve().parent
    problems: list[Problem] = []
    parsed: list[tuple[int, ManifestRow, bool]] = []  # (line, row, span parsed cleanly)
    try:
        for line_no, record, error in _iter_records(path):
            if error:
                problems.append(Problem(line_no, None, error))
                continue
            row, row_problems = _parse_record(record, base, labels)
            problems.extend(Problem(line_no, col, msg) for col, msg in row_problems)
            if row is not None:
                span_ok = not any(col in ("start", "end") for col, _ in row_problems)
                parsed.append((line_no, row, span_ok))
    except ManifestError as e:
        return [Problem(e.line, None, e.message)]
    except UnicodeDecodeError as e:
        return [Problem(0, None, f"not UTF-8 text: {e.reason}")]
    problems.extend(_duplicates(parsed))
    if check_audio:
        problems.extend(_audio_problems(parsed))
    problems.sort(key=lambda p: p.line)
    return problems


__all__ = [
    "COLUMNS",
    "ManifestRow",
    "ManifestError",
    "Problem",
    "read_manifest",
    "write_manifest",
    "check_manifest",
    "format_manifest",
    "label_set",
    "manifest_format",
]
