"""How session mode (serval.session) fares with the groups users have: their size, their skew, and SHRINK.

Leave one corpus out (benchmarks/loco.py): the best single-clip linear head (gain-invariant front end,
C = 0.1) is fitted on 7 corpora, and the held-out corpus's clips are cut into session groups:
- each speaker's clips, or the whole corpus as one group (a folder, no speaker labels);
- random groups of n clips of one speaker (n = 2, 5, 10, 20);
- skewed groups of one speaker: 20 clips of which 12 share an emotion, 10 of which 8 do;
- groups of 10 clips of one speaker and one emotion (the case session mode is not for).
Each group is centred with `centre(probs, shrink)` for several shrinks; the UAR over the clips that
the groups cover is set beside the single-clip UAR of the same clips. A clip's answer is the argmax
over its corpus's own classes (as benchmarks/loco.py scores), and, for the shipped shrink, over all 7
classes too: what a user gets who does not say which classes the data holds (`--classes`). Centring
assumes every class it is given occurs in the group, so classes a group lacks gain ground there.
BAVED (one class) is left out.

    python benchmarks/session_groups.py --manifest runs/default/all.csv -o runs/session-groups.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loco import SHIPPED_HEAD, ClipStats, corpus_scores, fit_classes  # noqa: E402

from serval.manifest import read_manifest  # noqa: E402
from serval.metrics import classification_scores  # noqa: E402
from serval.session import SHRINK, centre  # noqa: E402
from serval.vocab import EMOTIONS  # noqa: E402

HEAD = SHIPPED_HEAD  # the shipped model's classes: linear head, gain-invariant, C = 0.1
SHRINKS = (0.0, SHRINK, 5.0, 10.0)


def chunks(idx: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`idx` shuffled and cut into groups of `size` (the last one shorter)."""
    idx = rng.permutation(idx)
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def skewed(idx: np.ndarray, labels: np.ndarray, size: int, major: int, rng) -> list[np.ndarray]:
    """Groups of `size` clips, `major` of them of one emotion (each emotion in turn), each clip used once."""
    pool = {e: list(rng.permutation(idx[labels[idx] == e])) for e in sorted(set(labels[idx]))}
    groups = []
    for turn in range(len(idx)):
        e = sorted(pool)[turn % len(pool)]
        others = [x for o in pool if o != e for x in pool[o]]
        if len(pool[e]) < major or len(others) < size - major:
            break
        rest = set(rng.choice(others, size - major, replace=False).tolist())
        groups.append(np.array([pool[e].pop() for _ in range(major)] + sorted(rest)))
        pool = {o: [x for x in xs if x not in rest] for o, xs in pool.items()}
    return groups


def scenarios(labels: np.ndarray, speakers: np.ndarray, rng) -> dict[str, Callable]:
    """{name: held-out clip indices -> groups}."""

    def per_speaker(make):
        return lambda idx: [g for s in sorted(set(speakers[idx])) for g in make(idx[speakers[idx] == s])]

    out = {"each speaker": per_speaker(lambda i: [i]), "the corpus as one group": lambda idx: [idx]}
    for n in (2, 5, 10, 20):
        out[f"{n} clips of a speaker"] = per_speaker(lambda i, n=n: chunks(i, n, rng))
    out["20 clips of a speaker, 12 of one emotion"] = per_speaker(lambda i: skewed(i, labels, 20, 12, rng))
    out["10 clips of a speaker, 8 of one emotion"] = per_speaker(lambda i: skewed(i, labels, 10, 8, rng))
    out["10 clips of a speaker, all of one emotion"] = per_speaker(
        lambda i: [g for e in sorted(set(labels[i])) for g in chunks(i[labels[i] == e], 10, rng)]
    )
    return out


def held_out_probs(rows, stats: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{corpus: (its labelled clips' indices, their probabilities over EMOTIONS)} from its LOCO fold."""
    labels = np.array([r.label or "" for r in rows])
    corpus = np.array([r.corpus for r in rows])
    x = HEAD.features(stats, [])
    out = {}
    for c in sorted(set(corpus)):
        test, train = (corpus == c) & (labels != ""), (corpus != c) & (labels != "")
        if len(set(labels[test])) < 2:
            continue
        clf = fit_classes(HEAD, x[train], labels[train], corpus[train])
        probs = np.zeros((test.sum(), len(EMOTIONS)))
        probs[:, [EMOTIONS.index(k) for k in clf.classes_]] = clf.predict_proba(x[test])
        out[c] = (np.where(test)[0], probs)
        print(f"session_groups: {c} fitted", file=sys.stderr, flush=True)
    return out


def uar_of_all(gold: list[str], probs: np.ndarray) -> float:
    """UAR with the argmax over all 7 classes (a class the corpus lacks counts as wrong)."""
    pred = [EMOTIONS[k] for k in probs.argmax(1)]
    return classification_scores(gold, pred, sorted(set(gold)))["uar"]


def table(rows, folds: dict, seed: int) -> list[str]:
    labels = np.array([r.label or "" for r in rows])
    speakers = np.array([f"{r.corpus}/{r.speaker}" for r in rows])
    corpora = list(folds)
    head = "| groups | clips | " + " | ".join(corpora) + " | mean |"
    lines = [head, "| --- |" + " --- |" * (len(corpora) + 2)]
    for name, make in scenarios(labels, speakers, np.random.default_rng(seed)).items():
        every = (
            f"single clip, all {len(EMOTIONS)} classes",
            f"shrink {SHRINK:g}, all {len(EMOTIONS)} classes",
        )
        cells = {k: [] for k in ("single clip", *(f"shrink {s:g}" for s in SHRINKS), *every)}
        for c in corpora:
            idx, probs = folds[c]
            where = {v: i for i, v in enumerate(idx)}
            groups = [g for g in make(idx) if len(g)]
            covered = np.concatenate(groups) if groups else np.array([], dtype=int)
            gold = list(labels[covered])
            if len(set(gold)) < 2:  # no such groups in this corpus, or one class only
                for k in cells:
                    cells[k].append(None)
                continue
            single = probs[[where[i] for i in covered]]
            cells["single clip"].append(corpus_scores(gold, single, EMOTIONS, 0)["uar"])
            for s in SHRINKS:
                centred = np.concatenate([centre(probs[[where[i] for i in g]], s) for g in groups])
                cells[f"shrink {s:g}"].append(corpus_scores(gold, centred, EMOTIONS, 0)["uar"])
                if s == SHRINK:
                    cells[every[0]].append(uar_of_all(gold, single))
                    cells[every[1]].append(uar_of_all(gold, centred))
        for k, values in cells.items():
            have = [v for v in values if v is not None]
            row = " | ".join("–" if v is None else f"{100 * v:.1f}" for v in values)
            lines.append(f"| {name} | {k} | {row} | **{100 * np.mean(have):.1f}** ({len(have)}) |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True, help="every labelled clip, with corpus and speaker")
    ap.add_argument("--loco-cache", default="runs/loco-cache", help="pooled LOCO stats (default %(default)s)")
    ap.add_argument("--cache-dir", default="runs/cache/whisper-base", help="the training run's encoder cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    stats, rows = ClipStats(args.loco_cache, HEAD.front_end, args.cache_dir).rows(
        read_manifest(args.manifest)
    )
    lines = [
        f"UAR of the held-out corpus (LOCO), {HEAD.name}; session groups centred by serval.session.centre "
        f"(shipped shrink {SHRINK:g}). A corpus without two classes among the clips its groups cover: –.",
        "",
        *table(rows, held_out_probs(rows, stats), args.seed),
    ]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
