"""RAVDESS on a CPU: whisper-base frozen and cached, downstream network trained, 7-class UAR.

Actors 1–14 train, 15–16 are the dev set (early stopping, checkpoint selection), 17–20 the test
set. 'calm' is dropped: it is not one of the 7 classes, and calling it neutral would blur that
class. The manifest is built from the RAVDESS file names; then `configs/whisper-base-cpu.yaml`
trains through the encoder cache and the final model is scored on the test actors.

    python benchmarks/ravdess_cpu.py                       # the full benchmark (minutes on 2 cores)
    python benchmarks/ravdess_cpu.py --limit 4 --out runs/ravdess-smoke --set optim.epochs=2
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serval.train import load_config, train  # noqa: E402

EMOTIONS = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry", "06": "fearful", "07": "disgusted",
            "08": "surprised"}  # fmt: skip  # 02 calm: dropped


def split_of(actor: int) -> str:
    return "train" if actor <= 14 else "dev" if actor <= 16 else "test"


def build_manifest(data: Path, path: Path, limit: int | None) -> dict[str, int]:
    """Write the manifest of the RAVDESS clips under `data` (at most `limit` per actor); counts per split."""
    rows, counts = [], {"train": 0, "dev": 0, "test": 0}
    for actor_dir in sorted(data.glob("Actor_*")):
        actor = int(actor_dir.name.split("_")[1])
        files = [f for f in sorted(actor_dir.glob("*.flac")) if f.stem.split("-")[2] in EMOTIONS]
        if limit:
            files = files[:: max(1, len(files) // limit)][:limit]
        for f in files:
            split = split_of(actor)
            rows.append([str(f.resolve()), EMOTIONS[f.stem.split("-")[2]], f"ravdess-{actor:02d}", "ravdess", "en",
                         split])  # fmt: skip
            counts[split] += 1
    if not rows:
        raise SystemExit(f"{data}: no RAVDESS clips (Actor_XX/*.flac)")
    text_rows = [["path", "label", "speaker", "corpus", "language", "split"], *rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(text_rows)
    if path.exists() and path.read_text() != tmp.read_text():
        tmp.unlink()
        raise SystemExit(f"{path}: exists with other clips; remove it or pass another --manifest")
    tmp.replace(path)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ravdess")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "whisper-base-cpu.yaml")
    p.add_argument("--out", help="output folder (default: the config's out_dir)")
    p.add_argument(
        "--manifest", type=Path, help="where to write the manifest (default: beside the output folder)"
    )
    p.add_argument("--limit", type=int, help="at most this many clips per actor (a quick smoke run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    cfg = load_config(args.config, [f"out_dir={args.out}"] if args.out else [])
    manifest = args.manifest or Path(f"{cfg.out_dir.rstrip('/')}-manifest.csv")
    counts = build_manifest(args.data, manifest, args.limit)
    sets = [f"data.{s}={manifest}" for s in ("train", "dev", "test")]
    sets += [f"data.{s}_split={s}" for s in ("train", "dev", "test")]
    cfg = load_config(args.config, [*sets, *([f"out_dir={args.out}"] if args.out else []), *args.overrides])
    print(f"RAVDESS: {counts['train']} train (actors 1-14), {counts['dev']} dev (15-16), "
          f"{counts['test']} test (17-20) clips", file=sys.stderr)  # fmt: skip

    started = time.time()
    best = train(cfg)
    minutes = (time.time() - started) / 60
    report = json.loads((Path(cfg.out_dir) / "final.json").read_text())
    test = report["test"]
    print(f"model: {best} ({report['chosen']} of {len(report['members'])} checkpoints)")
    print(f"test actors 17-20: 7-class UAR {test['uar']:.4f}, accuracy {test['accuracy']:.4f}, "
          f"{test['n']} clips; {minutes:.1f} min on this machine")  # fmt: skip
    for name, recall in test["recall"].items():
        print(f"  recall {name:10s} {recall:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
