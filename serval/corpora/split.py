"""Speaker-disjoint splits: the seeded rule of `serval data prepare` (docs/data.md, "Split rule")."""

from __future__ import annotations

import random
from collections import defaultdict

from serval.manifest import ManifestRow

# The defaults are the split the bundled default model was trained with (MODEL_CARD.md, "Data"), so
# that a manifest's "test" holds no speaker it was trained on.
SPLIT_SEED = 0
DEV_FRACTION = 0.1
TEST_FRACTION = 0.1
MIN_DEV_SPEAKERS = 4  # a dev score judged on more than one or two voices, where the corpus has them
# A corpus of fewer speakers (units) gets no test split unless a test fraction is given: once dev has
# its 4, one more held out would leave train one or two voices (EmoDB's 6 speakers, TurEV-DB's 5).
MIN_TEST_CORPUS_SPEAKERS = 10


def _match_speakers(requested: list[str], known: set[str], corpus: str) -> set[str]:
    """Speaker ids from the command line; the corpus prefix (`ravdess-`) may be left out."""
    out = set()
    for s in requested:
        for candidate in (s, f"{corpus}-{s}"):
            if candidate in known:
                out.add(candidate)
                break
        else:
            raise ValueError(f"unknown speaker {s!r}; the speakers are: {', '.join(sorted(known))}")
    return out


def _units(rows: list[ManifestRow], group: str | None) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Each speaker's unit (itself, or its `group` value: speakers that move together) and each unit's genders."""
    unit_of: dict[str, str] = {}
    gender_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.speaker is None:
            continue
        unit = str(row.extra.get(group, row.speaker)) if group else row.speaker
        unit_of[row.speaker] = unit
        gender_of[unit].add(str(row.extra.get("gender") or ""))
    return unit_of, gender_of


def _fixed(
    unit_of: dict[str, str], corpus: str, test: list[str] | None, dev: list[str] | None
) -> dict[str, str]:
    """The units the user named for test and dev."""
    fixed: dict[str, str] = {}
    for split, requested in (("test", test), ("dev", dev)):
        for speaker in _match_speakers(requested or [], set(unit_of), corpus):
            unit = unit_of[speaker]
            if fixed.get(unit, split) != split:
                raise ValueError(f"speaker {speaker} is asked for both dev and test")
            fixed[unit] = split
    return fixed


def _draw_order(
    units: list[str], fixed: dict[str, str], gender_of: dict[str, set[str]], seed: int
) -> list[str]:
    """The units not named, shuffled within each gender, then the genders interleaved (dev and test mixed)."""
    rng = random.Random(seed)
    strata: dict[str, list[str]] = defaultdict(list)
    for unit in units:
        if unit not in fixed:
            genders = gender_of[unit]
            strata[next(iter(genders)) if len(genders) == 1 else ""].append(unit)
    for key in sorted(strata):
        rng.shuffle(strata[key])
    order: list[str] = []
    queues = [strata[k] for k in sorted(strata)]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def assign_splits(
    rows: list[ManifestRow],
    *,
    dev_fraction: float = DEV_FRACTION,
    test_fraction: float | None = None,
    seed: int = SPLIT_SEED,
    dev_speakers: list[str] | None = None,
    test_speakers: list[str] | None = None,
    group: str | None = None,
    min_dev_speakers: int = MIN_DEV_SPEAKERS,
) -> None:
    """Set each row's split to train/dev/test by speaker, in place (see docs/data.md for the rule).

    Speakers sharing a value of the extra column `group` (IEMOCAP sessions) move together. Dev
    gets at least `min_dev_speakers` where the corpus can spare them (train keeps one). A
    `test_fraction` of None is `TEST_FRACTION` for a corpus of at least `MIN_TEST_CORPUS_SPEAKERS`
    speakers and 0 for a smaller one.
    """
    given_test = TEST_FRACTION if test_fraction is None else test_fraction
    if not 0 <= dev_fraction < 1 or not 0 <= given_test < 1 or dev_fraction + given_test >= 1:
        raise ValueError("--dev-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
    if min_dev_speakers < 0:
        raise ValueError("--min-dev-speakers must be 0 or more")
    corpus = rows[0].corpus if rows else ""
    unit_of, gender_of = _units(rows, group)
    units = sorted(set(unit_of.values()))
    if test_fraction is None:
        test_fraction = TEST_FRACTION if len(units) >= MIN_TEST_CORPUS_SPEAKERS else 0.0
    fixed = _fixed(unit_of, corpus, test_speakers, dev_speakers)
    order = _draw_order(units, fixed, gender_of, seed)

    def wanted(fraction: float, at_least: int = 0) -> int:
        if len(units) < 3 or fraction <= 0:  # a fraction of 0: no such split, whatever the minimum
            return 0
        return max(at_least, max(1, round(fraction * len(units))))

    split_of = dict(fixed)
    for split, count, explicit in (
        ("test", wanted(test_fraction), test_speakers),
        ("dev", wanted(dev_fraction, min_dev_speakers), dev_speakers),
    ):
        if explicit:
            continue  # an explicit list is the whole of that split
        for _ in range(count - sum(1 for s in split_of.values() if s == split)):
            if len(order) > 1:  # never leave train empty
                split_of[order.pop(0)] = split
    for unit in order:
        split_of[unit] = "train"
    for row in rows:
        row.split = split_of[unit_of[row.speaker]] if row.speaker is not None else "train"
