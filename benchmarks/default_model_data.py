"""The corpora and speakers the bundled default model was trained on, derived with the split code.

The default model was trained on every row of `bash benchmarks/prepare_all.sh`'s manifest: all the
speakers of the 8 labelled corpora of ../shared/data, whatever their split (no dev set chose it).
This script recomputes the record (`serval.training_data`) from the corpora with the same code:

    python benchmarks/default_model_data.py            # checks serval/assets/default/config.json
    python benchmarks/default_model_data.py --write    # records it there (the "training_data" key only)
    python benchmarks/default_model_data.py --markdown # the speakers paragraph of MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serval.corpora import prepare_corpus  # noqa: E402
from serval.locations import DEFAULT_MODEL  # noqa: E402
from serval.training_data import KEY, make_record  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
# prepare_all.sh's corpora and label options (the label options do not move speakers)
CORPORA = {
    "ravdess": {"calm": "neutral"},
    "emodb": {},
    "ased": {},
    "tess": {},
    "turev": {},
    "tava": {},
    "baved": {},
    "nemo": {},
}


def splits(data: Path = DATA) -> dict[str, list]:
    """{split: rows} of the 8 corpora under `data`, split by `serval data prepare`'s default rule."""
    out: dict[str, list] = {"train": [], "dev": [], "test": []}
    for corpus, options in CORPORA.items():
        rows, _ = prepare_corpus(corpus, data / corpus, **options)
        for r in rows:
            out[r.split].append(r)
    return out


def markdown(parts: dict[str, list]) -> str:
    """The held-out speakers per corpus, as a Markdown table (train holds every other speaker)."""
    lines = [
        "| corpus | dev speakers (chose the checkpoints) | test speakers | train |",
        "| --- | --- | --- | --- |",
    ]
    for corpus in CORPORA:
        ids = {
            s: sorted({r.speaker.split("-", 1)[1] for r in parts[s] if r.corpus == corpus}, key=_natural)
            for s in parts
        }
        cells = [", ".join(ids[s]) or "–" for s in ("dev", "test")]
        train = ", ".join(ids["train"]) if len(ids["train"]) <= 4 else f"the other {len(ids['train'])}"
        lines.append(f"| {corpus} | {cells[0]} | {cells[1]} | {train} |")
    return "\n".join(lines)


def _natural(speaker: str) -> tuple:
    return (0, int(speaker), "") if speaker.isdigit() else (1, 0, speaker)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="record it in the default model's config.json")
    ap.add_argument(
        "--markdown", action="store_true", help="print MODEL_CARD.md's table of held-out speakers"
    )
    args = ap.parse_args()
    parts = splits()
    record = make_record(parts["train"] + parts["dev"] + parts["test"])  # every speaker, no dev set
    if args.markdown:
        print(markdown(parts))
        return 0
    path = DEFAULT_MODEL / "config.json"
    config = json.loads(path.read_text())
    if args.write:
        config[KEY] = record
        path.write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {KEY} ({sum(map(len, record['train'].values()))} training speakers) into {path}")
        return 0
    same = config.get(KEY) == record
    print("the recorded training data is the split's" if same else f"{path}: {KEY} differs from the split's")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
