"""`serval eval`'s predictions: every system on every distinct span, through a cache on disk.

Predictions are cached per model and span (keyed by the model's fingerprint and the file's size and
mtime), so a re-run only computes what changed. The cache is a `serval.io.jsonl.JsonlLog` per model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serval.audio import AudioError
from serval.fingerprint import fingerprint
from serval.io.inputs import item_file, load_item
from serval.io.jsonl import JsonlLog
from serval.progress import progress_bar
from serval.report import slug
from serval.vocab import DIMENSIONS, EMOTIONS, trained_dimensions

CHUNK = 64  # spans decoded (and held in memory) at a time

Span = tuple[str, float | None, float | None]


class PredictionCache:
    """One JSONL log per model: a line per (model fingerprint, file, size, mtime, start, end)."""

    def __init__(self, directory: str | os.PathLike, name: str, model_id: str):
        self.model_id = model_id
        self.path = Path(directory) / f"{slug(name)}-{model_id[:16]}.jsonl"
        self.log = JsonlLog(self.path)
        # a line cut short by an interrupted run is cut off: that span is simply redone
        self.records = {r["key"]: r for _, r in self.log if isinstance(r, dict) and "key" in r}
        self.pending: list[dict] = []

    def key(self, span: Span, file_id: tuple[int, int] | None) -> str | None:
        """The span's key, or None when its file could not be read (never cached)."""
        if file_id is None:
            return None
        path, start, end = span
        return fingerprint(
            [f"{self.model_id}\n{Path(path).resolve()}\n{file_id[0]}\n{file_id[1]}\n{start}\n{end}"]
        )

    def add(self, key: str | None, record: dict, persist: bool) -> None:
        """Keep a record; with `persist`, write it with the others at the next `flush`."""
        if key is None:
            return
        record = {"key": key, **record}
        self.records[key] = record
        if persist:
            self.pending.append(record)

    def flush(self) -> None:
        """Append the records to persist (on disk before this returns)."""
        self.log.append(self.pending)
        self.pending = []


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(item_file(path))  # a dataset row: its data file
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _to_serval_order(
    values: Sequence, names: Sequence[str], target: Sequence[str], fill: float
) -> np.ndarray:
    """Values named by a system's own order -> `target` order; a name the system lacks gets `fill`."""
    out = np.full(len(target), fill, np.float64)
    for v, n in zip(values, names):
        if n in target:
            out[list(target).index(n)] = np.nan if v is None else v
    return out


def system_fingerprint(system) -> str:
    """The system's cache identity: its `fingerprint`, or for an in-memory Predictor a hash of its weights."""
    if getattr(system, "fingerprint", None):
        return system.fingerprint
    models = getattr(system, "models", None)
    if not models:
        raise ValueError(
            f"{getattr(system, 'name', system)!r} has no fingerprint to key its cached predictions"
        )
    from serval.inference import weights_fingerprint  # in-memory models: torch is loaded already

    system.fingerprint = weights_fingerprint(models)
    return system.fingerprint


def unique_names(systems: Sequence) -> list[str]:
    """Display names: each system's name, disambiguated by its position when two are alike."""
    names = [str(getattr(s, "name", "") or f"model{i + 1}") for i, s in enumerate(systems)]
    return [f"{n} #{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def predict_all(
    units: Sequence,
    systems: Sequence,
    names: Sequence[str],
    cache_dir: str | os.PathLike,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[dict], dict[Span, str]]:
    """Predictions of every system for every distinct span (cached), and the spans that failed to decode.

    Returns ([{span: record}] per system, {span: error}). A record holds "probs" (`class_order`
    of the systems), "scores" (DIMENSIONS order; NaN where the system gave none or its output for the
    dimension was not trained) and the system's "detail", if any.
    """
    spans = list(dict.fromkeys(u.key for u in units))
    file_ids = {p: _file_id(p) for p in dict.fromkeys(s[0] for s in spans)}
    # the cache file is named by the system, not its display name, which depends on the other models
    caches = [
        PredictionCache(cache_dir, str(getattr(s, "name", n)), system_fingerprint(s))
        for s, n in zip(systems, names)
    ]
    keys = [{s: c.key(s, file_ids[s[0]]) for s in spans} for c in caches]
    todo = [s for s in spans if any(k[s] is None or k[s] not in c.records for c, k in zip(caches, keys))]
    failures = _predict_missing(todo, systems, caches, keys, batch_size, progress)
    order = class_order(systems)
    predictions = [_table(s, c, k, spans, failures, order) for s, c, k in zip(systems, caches, keys)]
    for s in spans:  # a file we could not stat is never cached and fails to load above
        if s not in failures and any(s not in t for t in predictions):
            failures[s] = f"{s[0]}: no prediction (file could not be read)"
    return predictions, failures


def _predict_missing(todo: list[Span], systems, caches, keys, batch_size: int, progress: bool) -> dict:
    """Run each system on the spans its cache lacks, CHUNK spans decoded at a time; the spans that failed."""
    failures: dict[Span, str] = {}
    bar = progress_bar(total=len(todo), enabled=progress and bool(todo), unit=" clip", desc="eval")
    for at in range(0, len(todo), CHUNK):
        chunk = todo[at : at + CHUNK]
        waves = {}
        for span in chunk:
            try:
                waves[span] = load_item(*span)
            except AudioError as e:
                failures[span] = str(e)
        for system, cache, key in zip(systems, caches, keys):
            need = [s for s in chunk if s in waves and (key[s] is None or key[s] not in cache.records)]
            if need:
                _predict_into(system, cache, key, [(s, waves[s]) for s in need], batch_size)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return failures


def _predict_into(system, cache: PredictionCache, key: dict, jobs: list, batch_size: int) -> None:
    probs, scores = system.predict_waveforms([w for _, w in jobs], batch_size=batch_size)
    details = getattr(system, "details", None) or [None] * len(jobs)
    for (s, _), p, q, d in zip(jobs, probs, scores, details):
        record = {
            "file": s[0],
            "start": s[1],
            "end": s[2],
            "classes": list(system.classes),
            "probs": [round(float(v), 7) for v in p],
            "dimensions": list(system.dimensions),
            "scores": [None if not np.isfinite(v) else round(float(v), 7) for v in q],
            "detail": d,
        }
        # a transient failure (e.g. an HTTP error) is scored now but asked again next run
        cache.add(key[s], record, persist=not (isinstance(d, dict) and "error" in d))
    cache.flush()


def class_order(systems: Sequence) -> tuple[str, ...]:
    """The order of every prediction's probabilities: the 7 classes, then any other class a system has."""
    return tuple(dict.fromkeys([*EMOTIONS, *(c for s in systems for c in s.classes)]))


def _table(system, cache: PredictionCache, key: dict, spans: list[Span], failures: dict, order) -> dict:
    """{span: {"probs", "scores", "detail"}} of one system, in `order` of classes and serval's of dimensions."""
    trained = trained_dimensions(system)
    table = {}
    for s in spans:
        if s in failures or key[s] is None or key[s] not in cache.records:
            continue
        r = cache.records[key[s]]
        table[s] = {
            "probs": _to_serval_order(r["probs"], r["classes"], order, 0.0),
            # an untrained output is no prediction: NaN, so it is never scored (its CCC is n/a)
            "scores": _to_serval_order(
                [v if d in trained else None for d, v in zip(r["dimensions"], r["scores"])],
                r["dimensions"],
                DIMENSIONS,
                math.nan,
            ),
            "detail": r.get("detail"),
        }
    return table
