"""The one resumable JSONL log: `serval predict`'s output, pseudolabel's progress, eval's prediction cache.

Records are appended, flushed and fsynced, so that a record on disk counts as done; a run killed
mid-write leaves a last line cut short, which the next open cuts off (with anything after it) before
it appends. A record's byte offset reads it back alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from serval.atomic import atomic_write_text


def iter_records(path: str | os.PathLike, repair: bool = False) -> Iterator[tuple[int, dict]]:
    """(byte offset, record) of each whole line; at the first torn line (no newline, or not JSON) it stops
    and, with `repair`, cuts the file there, else raises ValueError naming the file and the byte."""
    good = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn")
                record = json.loads(line)
            except ValueError:
                break
            yield good, record
            good += len(line)
    if good < Path(path).stat().st_size:
        if not repair:
            raise ValueError(f"{path}: line after byte {good} is not a JSON record")
        with open(path, "r+b") as f:
            f.truncate(good)


class JsonlLog:
    """An append-only JSONL file that a rerun resumes; created empty when missing, or with `overwrite`."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        if overwrite or not self.path.exists():
            self.start([])

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        """(offset, record) of every whole record; a torn last line is cut off once all are read."""
        return iter_records(self.path, repair=True)

    def start(self, records: Sequence[dict]) -> None:
        """Replace the log with these records, atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records), overwrite=True)

    def append(self, records: Sequence[dict]) -> list[int]:
        """Append records (on disk before this returns); their byte offsets."""
        if not records:
            return []
        lines = [(json.dumps(r) + "\n").encode("utf-8") for r in records]
        with open(self.path, "ab") as f:
            offset = f.tell()
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        offsets = []
        for line in lines:
            offsets.append(offset)
            offset += len(line)
        return offsets

    def read_at(self, offset: int) -> dict:
        """The record that starts at byte `offset`."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())
