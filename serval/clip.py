"""The one clip type: an audio clip and what is known about it, from manifests and inputs through batching,
eval, pseudo-labelling and training.

A clip is a file (`path`), a span of one (`start`, `end` in seconds), a dataset row (`DATAFILE#ROW`), or
samples in memory (`audio`, 16 kHz mono; `path` then names it in records and errors). A missing value is
None, never NaN. Its manifest columns are `COLUMNS`; any others stay in `extra`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serval.vocab import DIMENSIONS

COLUMNS = ("path", "start", "end", "label", *DIMENSIONS, "language", "speaker", "corpus", "split")


@dataclass
class Clip:
    """One clip: a whole file, the span [start, end) seconds of it, or samples in `audio`."""

    path: str | None
    start: float | None = None
    end: float | None = None
    label: str | None = None
    arousal: float | None = None
    valence: float | None = None
    dominance: float | None = None
    language: str | None = None
    speaker: str | None = None
    corpus: str | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    audio: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> tuple:
        """(path, start, end): what a resumed run skips, and what a record of the clip answers."""
        return (self.path, self.start, self.end)

    @property
    def dims(self) -> tuple[float | None, ...]:
        """The dimensions in DIMENSIONS order, None where not annotated (`np.array(dims, float)`: NaN)."""
        return tuple(getattr(self, d) for d in DIMENSIONS)

    def to_dict(self) -> dict[str, Any]:
        """Flat record: the standard columns, then the extra ones."""
        record = {name: getattr(self, name) for name in COLUMNS}
        record["path"] = (
            None if self.path is None else os.fspath(self.path)
        )  # a pathlib.Path is written as text
        record.update(self.extra)
        return record
