"""`prepare_corpus`: a corpus folder to manifest rows (its rule, then the speaker split), and what is printed."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from serval.atomic import atomic_write_text
from serval.corpora.files import CorpusError
from serval.corpora.labels import OPTIONS
from serval.corpora.recipes import RULES
from serval.corpora.rules import Collector, Dropped, Rule, rule_labels
from serval.corpora.split import (
    DEV_FRACTION,
    MIN_DEV_SPEAKERS,
    SPLIT_SEED,
    assign_splits,
)
from serval.manifest import ManifestRow
from serval.vocab import EMOTIONS


def corpus_labels(corpus: str, keep_labels: bool = False) -> tuple[str, ...]:
    """The labels a corpus's manifest can hold: the 7 classes, or with keep_labels its own (RAVDESS: + calm)."""
    if corpus not in RULES:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(RULES)}")
    return rule_labels(RULES[corpus], keep_labels)


def _check_options(corpus: str, rule: Rule, options: dict[str, str], keep_labels: bool) -> None:
    """Label options that exist, apply to this corpus, have a valid value, and mean something here."""
    for name, value in options.items():
        if name not in OPTIONS:
            raise ValueError(f"unknown label option {name!r}")
        if name not in rule.get("options", ()):
            raise ValueError(f"--{name} does not apply to {corpus} (it has no '{name}' label)")
        if value not in OPTIONS[name][0]:
            raise ValueError(f"--{name} must be one of {', '.join(OPTIONS[name][0])}, not {value!r}")
        if keep_labels:
            raise ValueError(f"--{name} maps '{name}' onto the 7 classes; --keep-labels keeps it as '{name}'")


def _use_official(corpus: str, rule: Rule, split: str, named_speakers: bool) -> bool:
    """Whether the corpus's own split is used, after checking `split` makes sense for it."""
    if split not in ("auto", "speaker", "official"):
        raise ValueError(f"split must be auto, speaker or official, not {split!r}")
    official = rule.get("official_split", False)
    if split == "official" and not official:
        raise ValueError(f"{corpus} has no official split; use --split speaker")
    use_official = official and split != "speaker"
    if use_official and named_speakers:
        raise ValueError(
            f"--dev-speakers/--test-speakers need --split speaker ({corpus} uses its official split)"
        )
    return use_official


def prepare_corpus(
    corpus: str,
    root: str | os.PathLike,
    *,
    split: str = "auto",
    dev_speakers: list[str] | None = None,
    test_speakers: list[str] | None = None,
    dev_fraction: float = DEV_FRACTION,
    test_fraction: float | None = None,
    seed: int = SPLIT_SEED,
    min_dev_speakers: int = MIN_DEV_SPEAKERS,
    keep_dimensional: bool = False,
    keep_labels: bool = False,
    **label_options: str | None,
) -> tuple[list[ManifestRow], list[Dropped]]:
    """Rows (sorted by path) and dropped files of one corpus; `label_options` are e.g. calm='neutral'.

    keep_labels: the corpus's own label names (`corpus_labels(corpus, True)`) instead of the 7 classes.
    """
    if corpus not in RULES:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(RULES)}")
    rule = RULES[corpus]
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(f"{root}: corpus folder not found")
    root = root.resolve()
    options = {k: v for k, v in label_options.items() if v is not None}
    _check_options(corpus, rule, options, keep_labels)
    if keep_dimensional and not rule.get("dimensional"):
        raise ValueError(f"--keep-dimensional does not apply to {corpus} (it has no dimensional ratings)")
    use_official = _use_official(corpus, rule, split, bool(dev_speakers or test_speakers))

    result = Collector(corpus, rule, options, keep_labels=keep_labels, keep_dimensional=keep_dimensional)
    result.collect(root)
    if not result.rows and not result.dropped:
        raise CorpusError(f"{root}: no {corpus} audio files found under this folder")
    rows = sorted(result.rows, key=lambda r: (r.path, r.start or 0.0))
    if not use_official:
        assign_splits(
            rows,
            dev_fraction=dev_fraction,
            test_fraction=test_fraction,
            seed=seed,
            dev_speakers=dev_speakers,
            test_speakers=test_speakers,
            group=rule.get("group"),
            min_dev_speakers=min_dev_speakers,
        )
    return rows, sorted(result.dropped, key=lambda d: d.path)


def split_warnings(rows: list[ManifestRow]) -> list[str]:
    """A line for each of dev and test that came out empty (too few speakers, or none named)."""
    speakers = len({r.speaker for r in rows if r.speaker is not None})
    empty = [s for s in ("dev", "test") if not any(r.split == s for r in rows)]
    if not empty or not rows:
        return []
    return [
        f"warning: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
        f"({len(rows)} clips, {speakers} speakers): pass --dev-speakers/--test-speakers, larger "
        "--dev-fraction/--test-fraction, or score on another corpus"
    ]


def dropped_path(manifest: str | os.PathLike) -> Path:
    """Where the list of dropped files goes: `<manifest without extension>.dropped.csv`."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.stem + ".dropped.csv")


def write_dropped(dropped: list[Dropped], path: str | os.PathLike, overwrite: bool = False) -> None:
    """The dropped files as CSV (path, reason, original_label), atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "reason", "original_label"])
    for d in dropped:
        writer.writerow([d.path, d.reason, d.original_label])
    atomic_write_text(path, out.getvalue(), overwrite=overwrite)


def summary(rows: list[ManifestRow], dropped: list[Dropped], labels: Sequence[str] = EMOTIONS) -> str:
    """A few lines: clips and speakers per split, labels (in the order of `labels`), drop reasons."""
    lines = []
    by_split: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        by_split[row.split or "-"].append(row)
    others = sorted({r.label for r in rows if r.label is not None} - set(labels))
    for split in sorted(by_split, key=lambda s: ({"train": 0, "dev": 1, "test": 2}.get(s, 3), s)):
        part = by_split[split]
        speakers = {r.speaker for r in part if r.speaker}
        counted = Counter(r.label or "(none)" for r in part)
        counts = ", ".join(f"{k} {counted[k]}" for k in [*labels, *others, "(none)"] if counted[k])
        lines.append(f"  {split}: {len(part)} clips, {len(speakers)} speakers ({counts})")
    reasons = Counter(d.reason for d in dropped)
    for reason, n in reasons.most_common():
        lines.append(f"  dropped {n}: {reason}")
    return "\n".join(lines)
