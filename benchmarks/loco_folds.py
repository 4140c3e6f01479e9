"""Train a recipe once per leave-one-corpus-out fold: `<out>/<corpus>/best` never heard `<corpus>`.

Writes `<out>/folds/<corpus>.csv` (every row of the manifest but that corpus's) and runs
`serval train CONFIG --set data.train=<that file> --set out_dir=<out>/<corpus> [--set ...]` for each
corpus in turn, without a dev or test set (the shipped recipe's fixed step count). A fold already
finished is skipped and an interrupted one resumes (`resume: auto`), so the script can be stopped
and run again; `--corpus` splits the folds between processes. The encoder cache is shared by every
fold, so only the downstream network trains. benchmarks/model_card.py `--protocol loco
--fold-model NAME=<out>/{corpus}/best` scores each fold's model on its held-out corpus.

    python benchmarks/loco_folds.py configs/default-model-cpu.yaml -o runs/loco/frozen \\
        --set model.lora_r=0 --set model.lora_layers=0

A recipe that picks checkpoints on dev speakers gets the fold's own (`--set data.dev={fold}`), and one
that never had a corpus leaves it out (`--drop nemo`): the previous default recipe, as the model card
scores it,

    git show 8721789:configs/default-model-cpu.yaml > runs/previous-recipe.yaml
    python benchmarks/loco_folds.py runs/previous-recipe.yaml -o runs/loco/previous --drop nemo \\
        --set data.dev={fold} --set data.test=
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

from serval.manifest import read_manifest, write_manifest


def fold_manifests(
    manifest: str, out: Path, corpora: list[str] | None, drop: Collection[str] = ()
) -> dict[str, Path]:
    """{corpus: the manifest of every other corpus's rows}, written under `out/folds` (kept if there);
    the corpora in `drop` are in no fold (a recipe that never had them)."""
    rows = [r for r in read_manifest(manifest) if r.corpus not in drop]
    folds = {}
    for corpus in sorted({r.corpus for r in rows}):
        if corpora and corpus not in corpora:
            continue
        path = out / "folds" / f"{corpus}.csv"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_manifest([r for r in rows if r.corpus != corpus], path)
        folds[corpus] = path
    return folds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("-o", "--output", required=True, help="folder of the fold runs")
    ap.add_argument("--manifest", default="runs/default/all.csv")
    ap.add_argument("--corpus", action="append", help="only these folds (default: every corpus)")
    ap.add_argument("--drop", action="append", default=[], help="a corpus no fold trains on")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to serval train; {fold} is the fold's manifest",
    )
    args = ap.parse_args()

    out = Path(args.output)
    for corpus, train in fold_manifests(args.manifest, out, args.corpus, args.drop).items():
        if (out / corpus / "best" / "config.json").exists():
            print(f"loco fold {corpus}: done already", file=sys.stderr)
            continue
        sets = [f"data.train={train}", f"out_dir={out / corpus}", "progress=false"]
        sets += [s.replace("{fold}", str(train)) for s in args.set]
        command = [sys.executable, "-m", "serval", "train", args.config]
        command += [a for s in sets for a in ("--set", s)]
        print(f"loco fold {corpus}: {' '.join(command)}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
