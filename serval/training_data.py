"""What a model was trained on: the corpora and speakers of its training and dev clips, recorded under
"training_data" in its config.json, and how much of an eval manifest overlaps them (torch-free).

The record is `{"train": {corpus: [speaker, ...]}, "dev": {corpus: [speaker, ...]}}`; its train
corpora are the corpora the model was trained on (a corpus whose rows name no speaker has an empty
list). Speakers are compared as (corpus, speaker) pairs, written as the manifest writes them
(`serval data prepare` writes corpus-prefixed ids such as `ravdess-16`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

KEY = "training_data"  # the config.json key
SPLITS = ("train", "dev")  # dev speakers chose the checkpoints; they were not trained on
NO_CORPUS = "(none)"  # the corpus of rows without one, as in the eval report


def _pairs(rows: Iterable) -> list[tuple[str, str | None]]:
    return [(getattr(r, "corpus", None) or NO_CORPUS, getattr(r, "speaker", None) or None) for r in rows]


def _by_corpus(pairs: Iterable[tuple[str, str | None]]) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for corpus, speaker in pairs:
        out.setdefault(corpus, set())
        if speaker:
            out[corpus].add(speaker)
    return {c: sorted(out[c]) for c in sorted(out)}


def make_record(train: Iterable, dev: Iterable = ()) -> dict:
    """The record of training rows and dev rows (anything with `corpus` and `speaker` attributes)."""
    return {"train": _by_corpus(_pairs(train)), "dev": _by_corpus(_pairs(dev))}


def merge_records(*records: dict | None) -> dict | None:
    """One record holding every corpus and speaker of `records` (None: no record at all)."""
    given = [r for r in records if r]
    if not given:
        return None
    return {
        split: _by_corpus((c, s) for r in given for c, ss in r.get(split, {}).items() for s in ss or [None])
        for split in SPLITS
    }


def read_record(folder: str | os.PathLike) -> dict | None:
    """The record in a model folder's config.json (an ensemble's members merged), or None when it has none."""
    folder = Path(folder)
    ensemble = folder / "ensemble.json"
    if ensemble.is_file():
        members = json.loads(ensemble.read_text()).get("members", [])
        return merge_records(*(read_record(folder / m) for m in members))
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        record = json.loads(config.read_text()).get(KEY)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def record_of_spec(spec: str | os.PathLike | None) -> dict | None:
    """The record of a model spec naming a local serval folder ("default", a folder, an ensemble folder);
    None for anything else (a Hub id, meralion:, emotion2vec:, llm:), which records none."""
    from serval.locations import DEFAULT_MODEL

    text = "default" if spec is None else os.fspath(spec)
    folder = DEFAULT_MODEL if text == "default" else Path(text).expanduser()
    return read_record(folder) if folder.is_dir() else None


def overlap(rows: Iterable, record: dict | None) -> dict | None:
    """The manifest's speakers the model was trained on (and was selected on, dev), with their row counts.

    `{"train": {corpus: {speaker: rows}}, "dev": {...}, "rows": rows of training speakers}`; None
    when the model records no training data.
    """
    if record is None:
        return None
    out: dict = {"train": {}, "dev": {}}
    for corpus, speaker in _pairs(rows):
        if speaker is None:
            continue
        for split in SPLITS:
            if speaker in record.get(split, {}).get(corpus, ()):
                counts = out[split].setdefault(corpus, {})
                counts[speaker] = counts.get(speaker, 0) + 1
    out["rows"] = sum(n for counts in out["train"].values() for n in counts.values())
    return out


def overlap_warning(name: str, found: dict | None) -> str | None:
    """One line naming the training speakers and corpora that the eval manifest holds, or None."""
    if not found or not found["train"]:
        return None
    speakers = [s for corpus in found["train"].values() for s in corpus]
    shown = ", ".join(speakers[:12]) + (f" and {len(speakers) - 12} more" if len(speakers) > 12 else "")
    return (
        f"{name} was trained on {len(speakers)} speaker(s) of this manifest ({found['rows']} rows, "
        f"corpora {', '.join(found['train'])}): {shown}; its scores on them are not speaker-independent"
    )
