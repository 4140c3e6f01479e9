"""What a corpus rule says and the one loop that applies it.

A rule (`Rule`, one per corpus in `recipes.RULES`) either names its files by a pattern (`name`) and
reads each match with a small `parse` function, or reads a metadata table (`records`). Either way it
yields records: a label code, a speaker, and whatever else the corpus tells (gender, ratings, extra
columns). `Collector.add` then does for every corpus what the 14 recipes once each did: map the code
to a class (or keep the corpus's own name), leave a clip out with the reason, build the manifest row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Required, TypedDict

from serval.corpora.files import audio_files
from serval.corpora.labels import map_label, own_name
from serval.manifest import ManifestRow
from serval.vocab import DIMENSIONS, EMOTIONS

Record = dict[str, Any]  # code, speaker; optional original, gender, language, split, dimensions, extras
# Record keys that are manifest fields rather than extra columns; keys starting with "_" are the rule's own.
FIELDS = ("code", "original", "speaker", "gender", "language", "split", *DIMENSIONS)


@dataclass(frozen=True)
class Dropped:
    """A file (or annotated span) a recipe left out, and why."""

    path: str
    reason: str
    original_label: str = ""


class Skip(NamedTuple):
    """A file (or annotated utterance) to leave out: why, and the corpus's label for it if known."""

    reason: str
    original: str = ""


class Rule(TypedDict, total=False):
    """One corpus: where its clips and labels come from, and how to read them."""

    language: Required[str | None]  # ISO 639-1; a record's own `language` wins (ESD has two)
    labels: Required[Mapping[str, str | None]]  # label code -> class, None, or "option:NAME"
    words: Mapping[str, str]  # code -> the corpus's word for it (original_label); default the code
    own: Mapping[str, str]  # code -> its own name under --keep-labels, where not the class's
    options: tuple[str, ...]  # label options (labels.OPTIONS) that apply
    # files named by a pattern: `parse(groups, path, context)` reads one match
    name: re.Pattern[str]
    form: str  # the pattern in words, for the drop reason
    parse: Callable[[dict[str, str], Path, Any], Record | Skip]
    context: Callable[[Path], Any]  # read once from the corpus folder (a ratings table), given to parse
    # a file left out by its folder, before its name is read: a class outside the 7 (not with --keep-labels)
    skip: Callable[[Path], Skip | None]
    # or clips listed in a metadata table
    records: Callable[[Path], Iterator[tuple[Path | str, Record | Skip]]]
    after: Callable[[Record, Path], Skip | None]  # a check once the code is known to be a label
    unknown: str  # the reason for an unknown code, formatted with it
    missing: str  # the reason for an empty code (no label given)
    # keep a clip without a class: if it has a rating / with --keep-dimensional and an arousal rating
    unlabelled: Literal["rated", "dimensional"]
    official_split: bool  # the corpus ships a split; used unless --split speaker
    dimensional: bool  # has arousal/valence/dominance ratings
    group: str  # extra column whose value groups speakers that share dialogues


def rule_labels(rule: Rule, keep_labels: bool = False) -> tuple[str, ...]:
    """The label set a rule's manifest uses: the 7 classes, or its own names with keep_labels."""
    if not keep_labels:
        return EMOTIONS
    names = (
        own_name(c, rule["labels"], rule.get("own", {})) for c in [*rule["labels"], *rule.get("own", {})]
    )
    return tuple(dict.fromkeys(n for n in names if n is not None))


def file_records(rule: Rule, root: Path, keep_labels: bool) -> Iterator[tuple[Path, Record | Skip]]:
    """A record (or a Skip) for every audio file under root, read from its name."""
    context = rule["context"](root) if "context" in rule else None
    for path in audio_files(root):
        skipped = None if keep_labels or "skip" not in rule else rule["skip"](path)
        if skipped:
            yield path, skipped
            continue
        m = rule["name"].match(path.stem)
        yield (
            path,
            rule["parse"](m.groupdict(), path, context) if m else Skip(f"file name is not {rule['form']}"),
        )


@dataclass
class Collector:
    """The kept rows and dropped clips of one corpus, as its rule and the user's options decide."""

    corpus: str
    rule: Rule
    options: Mapping[str, str]
    keep_labels: bool = False
    keep_dimensional: bool = False

    def __post_init__(self):
        self.rows: list[ManifestRow] = []
        self.dropped: list[Dropped] = []

    def collect(self, root: Path) -> None:
        """Every record of the corpus under root, kept or dropped."""
        if "records" in self.rule:
            source = self.rule["records"](root)
        else:
            source = file_records(self.rule, root, self.keep_labels)
        for path, record in source:
            if isinstance(record, Skip):
                self.drop(path, *record)
            else:
                self.add(path, record)

    def drop(self, path: Path | str, reason: str, original: str = "") -> None:
        """List a clip as left out, with the reason and the corpus's label for it."""
        self.dropped.append(Dropped(str(path), reason, original))

    def add(self, path: Path, record: Record) -> None:
        """Keep a record as a row, or drop it with the reason."""
        rule, code = self.rule, record["code"]
        original = record.get("original") or rule.get("words", {}).get(code, code)
        if not code and "missing" in rule:
            label, why = None, rule["missing"]
        elif code not in rule["labels"] and code not in rule.get("own", {}):
            return self.drop(path, rule.get("unknown", "unknown label code {!r}").format(code), original)
        else:
            label, why = self._label(code, original)
        if "after" in rule and (skipped := rule["after"](record, path)):
            return self.drop(path, *skipped)
        if why and not self._keeps_unlabelled(record):
            if rule.get("unlabelled") == "rated":
                why += " and the clip has no ratings"
            return self.drop(path, why, original)
        self.rows.append(self._row(path, label, original, record))

    def _label(self, code: str, original: str) -> tuple[str | None, str | None]:
        if not self.keep_labels:
            return map_label(self.rule["labels"], code, self.options, original)
        name = own_name(code, self.rule["labels"], self.rule.get("own", {}))
        return (name, None) if name else (None, f"'{original}' is not an emotion label")

    def _keeps_unlabelled(self, record: Record) -> bool:
        """Whether a clip without a class stays, for its ratings."""
        policy = self.rule.get("unlabelled")
        if policy == "rated":
            return any(record.get(d) is not None for d in DIMENSIONS)
        return policy == "dimensional" and self.keep_dimensional and record.get("arousal") is not None

    def _row(self, path: Path, label: str | None, original: str, record: Record) -> ManifestRow:
        extra = {"gender": record.get("gender"), "original_label": original}
        extra.update((k, v) for k, v in record.items() if k not in FIELDS and not k.startswith("_"))
        return ManifestRow(
            path=str(path),
            label=label,
            **{d: record.get(d) for d in DIMENSIONS},
            language=record.get("language") or self.rule["language"],
            speaker=record["speaker"],
            corpus=self.corpus,
            split=record.get("split"),
            extra={k: v for k, v in extra.items() if v is not None},
        )
