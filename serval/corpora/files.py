"""Finding a corpus's files and reading its metadata tables: what every recipe shares."""

from __future__ import annotations

import csv
import fnmatch
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

from serval.vocab import AUDIO_EXTENSIONS


class CorpusError(ValueError):
    """A corpus folder a recipe cannot use (wrong folder, missing metadata)."""


def walk(root: Path, pattern: str = "*") -> list[Path]:
    """Files under root whose name matches `pattern`, following symlinked folders (each real folder once).

    `Path.rglob` does not descend into symlinked folders, and corpora are often assembled from links.
    """
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or a second link to the same folder
            subfolders.clear()
            continue
        seen.add(real)
        found.extend(Path(folder) / f for f in fnmatch.filter(files, pattern))
    return found


def audio_files(root: Path) -> list[Path]:
    """Every audio file under root, sorted, hidden files skipped."""
    found = [
        p
        for p in walk(root)
        if p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(found)


def missing_reason(path: Path) -> str | None:
    """Why a listed audio file cannot be used, from the file system alone (no decoding)."""
    if not path.exists():
        return "audio file not found"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return None


def find_one(root: Path, name: str) -> Path:
    """The single file called `name` under root (the corpus may sit one folder deeper)."""
    hits = sorted(walk(root, name))
    if not hits:
        raise CorpusError(f"{root}: no {name} found under this folder")
    return hits[0]


def table(f: IO[str], path: Path, required: tuple[str, ...], **dialect: Any) -> csv.DictReader:
    """A CSV reader over an open metadata table, after checking it has the columns a recipe needs."""
    reader = csv.DictReader(f, **dialect)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise CorpusError(f"{path}: missing column(s) {', '.join(missing)} (found {reader.fieldnames})")
    return reader


def index_by_stem(files: list[Path]) -> dict[str, list[Path]]:
    """Files grouped by their name without extension."""
    index: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        index[f.stem].append(f)
    return index


def prefer_audio(paths: list[Path]) -> Path:
    """Of several files with one stem, a decoded audio file rather than a video container."""
    order = {".flac": 0, ".wav": 1, ".ogg": 2, ".mp3": 3, ".m4a": 4, ".mp4": 5}
    return min(paths, key=lambda p: (order.get(p.suffix.lower(), 9), str(p)))


def scale(value: str | None, low: float, high: float) -> float | None:
    """A rating on [low, high] mapped to [0, 1]; None when empty, not a number or NaN."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):  # a table's "NaN" is a missing rating, not 0
        return None
    return min(1.0, max(0.0, (v - low) / (high - low)))
