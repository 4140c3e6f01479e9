"""Does the recording level decide the answer? The share of labels unchanged when a clip is made louder or quieter.

Dev clips of every corpus of a manifest (a corpus without a dev split: its clips of any split), at most
`--per-corpus` of them drawn with a fixed seed, are scaled by -12, -6, +6 and +12 dB (samples beyond
full scale clipped, as a hot microphone clips) and predicted again. A label is unchanged when the
argmax over the model's classes is the same as on the clip as recorded. Issue 24's goal: >= 95 %.

    python benchmarks/level_invariance.py --manifest runs/default/all.csv \\
        --model serval/assets/default --model previous=runs/s/old-default -o runs/level.md
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np

import serval
from serval.audio import load_audio
from serval.manifest import read_manifest

GAINS_DB = (-12.0, -6.0, 6.0, 12.0)


def sample_clips(rows, per_corpus: int, seed: int) -> list:
    """Up to `per_corpus` dev rows of each corpus (all its rows where it has no dev split), seeded."""
    by_corpus = defaultdict(list)
    for r in rows:
        by_corpus[r.corpus].append(r)
    picked = []
    for corpus in sorted(by_corpus):
        mine = by_corpus[corpus]
        dev = [r for r in mine if r.split == "dev"] or mine
        picked += random.Random(f"{seed}-{corpus}").sample(dev, min(per_corpus, len(dev)))
    return picked


def scaled(wave: np.ndarray, gain_db: float) -> np.ndarray:
    """The clip `gain_db` louder (or quieter), clipped to [-1, 1]."""
    return np.clip(wave * np.float32(10 ** (gain_db / 20)), -1.0, 1.0).astype(np.float32)


def labels(model, waves: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """The argmax class index of each clip."""
    out = [
        model.predict_waveforms(waves[i : i + batch_size])[0].argmax(1)
        for i in range(0, len(waves), batch_size)
    ]
    return np.concatenate(out)


def unchanged(model, rows) -> dict:
    """{corpus: {gain or "mean": share of labels unchanged}}, with "all" for every clip together."""
    waves = [load_audio(r.path, r.start, r.end) for r in rows]
    corpora = np.array([r.corpus for r in rows])
    base = labels(model, waves)
    out: dict = defaultdict(dict)
    for gain in GAINS_DB:
        same = labels(model, [scaled(w, gain) for w in waves]) == base
        out["all"][gain] = float(same.mean())
        for corpus in sorted(set(corpora)):
            out[corpus][gain] = float(same[corpora == corpus].mean())
    for corpus in out:
        out[corpus]["mean"] = float(np.mean([out[corpus][g] for g in GAINS_DB]))
    return dict(out)


def markdown(results: dict, counts: dict) -> str:
    heads = [f"{g:+.0f} dB" for g in GAINS_DB] + ["mean"]
    lines = []
    for name, table in results.items():
        lines += [
            f"### {name}",
            "",
            "| corpus (clips) | " + " | ".join(heads) + " |",
            "| --- |" + " --- |" * len(heads),
        ]
        for corpus, row in table.items():
            cells = [f"{100 * row[g]:.1f}" for g in (*GAINS_DB, "mean")]
            label = f"**all** ({sum(counts.values())})" if corpus == "all" else f"{corpus} ({counts[corpus]})"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument(
        "--model", action="append", default=[], metavar="[NAME=]SPEC", help="(default: the default model)"
    )
    ap.add_argument("--per-corpus", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="auto", help="auto, onnx or torch (serval.load)")
    ap.add_argument("-o", "--output", help="Markdown file (a .json beside it holds the numbers)")
    args = ap.parse_args()

    rows = sample_clips(read_manifest(args.manifest), args.per_corpus, args.seed)
    counts = {c: sum(r.corpus == c for r in rows) for c in sorted({r.corpus for r in rows})}
    results = {}
    for spec in args.model or ["default"]:
        name, _, path = spec.rpartition("=")
        model = serval.load(path, engine=args.engine)
        results[name or path] = unchanged(model, rows)
    md = markdown(results, counts)
    print(md)
    if args.output:
        Path(args.output).write_text(md + "\n")
        Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
