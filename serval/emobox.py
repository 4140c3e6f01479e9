"""`serval benchmark emobox`: EmoBox's intra-corpus protocol (Ma et al., Interspeech 2024) on local audio.

EmoBox fixes speaker-independent folds per corpus (`<corpus>/fold_<k>/<corpus>_{train,test}_fold_<k>.jsonl`,
one JSON object a line with `key`, `wav`, `emo`). For each fold this finds every clip by its file
stem under the audio folder, trains on the fold's train file (its clips found here split 80/20 at
random with seed 12 into train and validation, as EmoBox's recipe does), tests on its test file and reports UAR, WA (accuracy) and
macro-F1 per fold and their mean over folds. Labels are the corpus's own (EmoBox's label map), so
the classes are whatever the corpus uses. Clips that are not found are counted and listed, never
dropped silently.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from serval.atomic import atomic_write_text
from serval.vocab import AUDIO_EXTENSIONS, class_name

SEED = 12  # EmoBox's seed for the 80/20 train/validation split of a fold's train file
VALID_FRACTION = 0.2
METRICS = ("uar", "wa", "macro_f1")
REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune-cpu.yaml"


@dataclass
class FoldLine:
    """One line of a fold file: EmoBox's key, its path under EmoBox's downloads/, its label."""

    key: str
    wav: str
    label: str


@dataclass
class Fold:
    """One fold: its clips found locally (path, label, split) and the keys of those not found."""

    number: int
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (audio path, label, train|dev|test)
    missing: dict[str, list[str]] = field(default_factory=dict)  # train|test -> EmoBox keys
    totals: dict[str, int] = field(default_factory=dict)  # train|test -> clips in the fold file

    def found(self, part: str) -> int:
        """Clips of the fold file `part` (train or test) found under the audio folder."""
        return self.totals.get(part, 0) - len(self.missing.get(part, []))


def label_map(folds_dir: Path, corpus: str) -> dict[str, str]:
    """EmoBox's corpus label -> class name in serval's words where it has them ("Fear" -> "fearful", so
    that `--init default` keeps its rows; "boredom" stays), empty where EmoBox has no map (EMOVO)."""
    path = folds_dir / corpus / "label_map.json"
    if not path.is_file():
        return {}
    return {str(k): class_name(v) for k, v in json.loads(path.read_text()).items()}


def read_clips(path: Path, labels: dict[str, str]) -> list[FoldLine]:
    """The clips of one fold file; a bad line is an error naming the file and the line."""
    clips = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            emo = str(item["emo"])
            clips.append(FoldLine(str(item["key"]), str(item["wav"]), labels.get(emo, class_name(emo))))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not an EmoBox fold line ({e})") from None
    return clips


def fold_numbers(folds_dir: Path, corpus: str) -> list[int]:
    """The fold numbers of `corpus` under `folds_dir` (an error naming the folder when there are none)."""
    root = folds_dir / corpus
    numbers = sorted(
        int(p.name.split("_", 1)[1]) for p in root.glob("fold_*") if p.name.split("_", 1)[1].isdigit()
    )
    if not numbers:
        raise FileNotFoundError(f"{root}: no EmoBox folds (fold_<k>/{corpus}_train_fold_<k>.jsonl)")
    return numbers


class AudioIndex:
    """The audio files under a folder, found by file stem; where a stem repeats (CASIA's numbers), by
    as many trailing folder names as make the clip unique, compared case-insensitively."""

    def __init__(self, root: Path):
        self.by_stem: dict[str, list[Path]] = {}
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path.suffix.lower() in AUDIO_EXTENSIONS:
                    self.by_stem.setdefault(path.stem.lower(), []).append(path)

    def find(self, wav: str) -> Path | None:
        """The one local file for EmoBox's `wav` path, or None (not there, or not unique)."""
        wanted = PurePosixPath(wav.replace("\\", "/"))
        candidates = self.by_stem.get(wanted.stem.lower(), [])
        parents = [p.lower() for p in reversed(wanted.parent.parts)]
        depth = 0
        while len(candidates) > 1 and depth < len(parents):
            candidates = [c for c in candidates if _parent(c, depth) == parents[depth]]
            depth += 1
        return candidates[0] if len(candidates) == 1 else None


def _parent(path: Path, depth: int) -> str:
    parts = path.parent.parts
    return parts[-1 - depth].lower() if depth < len(parts) else ""


def read_fold(folds_dir: Path, corpus: str, number: int, index: AudioIndex, labels: dict[str, str]) -> Fold:
    """Fold `number`: its train clips split 80/20 (seed 12) into train and dev, its test clips."""
    fold = Fold(number)
    base = folds_dir / corpus / f"fold_{number}"
    for part in ("train", "test"):
        clips = read_clips(base / f"{corpus}_{part}_fold_{number}.jsonl", labels)
        fold.totals[part] = len(clips)
        found = [(c, index.find(c.wav)) for c in clips]
        fold.missing[part] = [c.key for c, path in found if path is None]
        found = [(c, path) for c, path in found if path is not None]
        splits = validation_split(len(found)) if part == "train" else ["test"] * len(found)
        fold.rows += [(str(path), c.label, split) for (c, path), split in zip(found, splits)]
    return fold


def validation_split(n: int) -> list[str]:
    """ "train" or "dev" for each of `n` clips in file order, as EmoBox's recipe splits the clips it
    has (examples/sb/dataset_prepare.py): random.seed(12), shuffle the indices, the first 80 % train."""
    order = list(range(n))
    random.Random(SEED).shuffle(order)
    dev = set(order[int(n * (1 - VALID_FRACTION)) :])
    return ["dev" if i in dev else "train" for i in range(n)]


def corpus_classes(folds: Sequence[Fold], labels: dict[str, str]) -> list[str]:
    """The corpus's classes: the label map's order where there is one, else sorted; only those present."""
    present = {label for fold in folds for _, label, _ in fold.rows}
    order = list(dict.fromkeys(labels.values())) + sorted(present)
    return [c for c in dict.fromkeys(order) if c in present]


def train_fold(
    fold: Fold, classes: list[str], out: Path, config: str | None, init: str, overrides: list[str]
):
    """Train on the fold's train and dev rows; returns the model folder (the run's best/)."""
    from serval.clip import Clip
    from serval.manifest import write_manifest
    from serval.train.config import load_config
    from serval.train.loop import train

    manifest = out / f"fold_{fold.number}" / "manifest.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    rows = [Clip(path, label=label, split=split) for path, label, split in fold.rows]
    write_manifest(rows, manifest, overwrite=True, labels=classes)
    sets = [
        f"labels={json.dumps(classes)}",
        f"init_from={'null' if init == 'none' else json.dumps(init)}",
        f"out_dir={json.dumps(str(manifest.parent / 'run'))}",
        f"cache.dir={json.dumps(str(out / 'cache'))}",
        f"data.train={json.dumps(str(manifest))}",
        "data.train_split=train",
        f"data.dev={json.dumps(str(manifest))}",
        "data.dev_split=dev",
        "data.test=null",
    ]
    cfg = load_config(config, [*sets, *overrides])
    return train(cfg)


def score_fold(fold: Fold, model_dir: Path, classes: list[str], batch_size: int = 8) -> dict:
    """UAR, WA and macro-F1 of the model on the fold's test clips (EmoBox's figures): the top class
    of every clip, whatever its speech measure; a clip that cannot be read counts as no answer."""
    import numpy as np

    from serval.audio import AudioError, load_audio
    from serval.inference import load
    from serval.metrics import classification_scores

    test = [(p, label) for p, label, split in fold.rows if split == "test"]
    predictor = load(model_dir)
    pred: list[str | None] = []
    errors = []
    for start in range(0, len(test), batch_size):
        waves, ok = [], []
        for path, _ in test[start : start + batch_size]:
            try:
                waves.append(load_audio(path))
                ok.append(True)
            except AudioError as e:
                errors.append(str(e))
                ok.append(False)
        probs = iter(predictor.predict_waveforms(waves)[0]) if waves else iter(())
        pred += [predictor.classes[int(np.argmax(next(probs)))] if good else None for good in ok]
    scores = classification_scores([label for _, label in test], pred, classes)
    return {"uar": scores["uar"], "wa": scores["accuracy"], "macro_f1": scores["macro_f1"], "n": scores["n"],
            "recall": scores["recall"], "errors": errors}  # fmt: skip


def run_benchmark(
    corpus: str,
    folds_dir: Path,
    audio_dir: Path,
    out: Path,
    init: str = "default",
    config: str | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[int] | None = None,
    log=print,
) -> dict:
    """Every fold of `corpus` (or those in `only`): train, test, score; the report as a dict.

    A fold whose result is already in `out` is not trained again (a long run can be resumed)."""
    labels = label_map(folds_dir, corpus)
    index = AudioIndex(audio_dir)
    numbers = [n for n in fold_numbers(folds_dir, corpus) if only is None or n in only]
    folds = [read_fold(folds_dir, corpus, n, index, labels) for n in numbers]
    classes = corpus_classes(folds, labels)
    results = []
    for fold in folds:
        result = fold_summary(fold)
        done = out / f"fold_{fold.number}" / "result.json"
        if done.is_file():
            result = json.loads(done.read_text())
        elif result["found"]["test"] == 0 or result["found"]["train"] == 0:
            result["skipped"] = "no clips of this fold's train or test file were found"
        else:
            log(f"emobox {corpus} fold {fold.number}: training on {result['found']['train']} clips")
            model_dir = train_fold(fold, classes, out, config, init, list(overrides))
            result.update(score_fold(fold, model_dir, classes))
            atomic_write_text(done, json.dumps(result, indent=1))
        results.append(result)
    report = summarise(corpus, init, classes, results)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1), overwrite=True)
    atomic_write_text(out / "report.md", report_markdown(report), overwrite=True)
    return report


def fold_summary(fold: Fold) -> dict:
    """What was found of one fold, before it is trained."""
    return {
        "fold": fold.number,
        "total": dict(fold.totals),
        "found": {part: fold.found(part) for part in ("train", "test")},
        "missing": {part: list(keys) for part, keys in fold.missing.items()},
    }


def summarise(corpus: str, init: str, classes: list[str], results: list[dict]) -> dict:
    """The report: per-fold figures and their mean over the folds that were scored."""
    scored = [r for r in results if "uar" in r]
    mean = {m: (sum(r[m] for r in scored) / len(scored) if scored else math.nan) for m in METRICS}
    return {"corpus": corpus, "init": init, "classes": classes, "folds": results, "mean": mean}


def report_markdown(report: dict) -> str:
    """The report as Markdown: one row per fold and the mean, then the clips not found."""
    lines = [
        f"# EmoBox {report['corpus']} (init {report['init']}; classes: {', '.join(report['classes'])})",
        "",
        "| fold | train found | test found | UAR | WA | macro-F1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["folds"]:
        figures = [_pct(r.get(m)) for m in METRICS] if "uar" in r else ["n/a (no clips)"] * 3
        found = [f"{r['found'][p]} of {r['total'][p]}" for p in ("train", "test")]
        lines.append(f"| {r['fold']} | {' | '.join(found)} | {' | '.join(figures)} |")
    lines.append(f"| mean | | | {' | '.join(_pct(report['mean'][m]) for m in METRICS)} |")
    lines += ["", "## Clips not found", ""]
    for r in report["folds"]:
        for part in ("train", "test"):
            keys = r["missing"].get(part, [])
            lines.append(f"- fold {r['fold']} {part}: {len(keys)}" + (f": {', '.join(keys)}" if keys else ""))
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `serval benchmark`."""
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    e = sub.add_parser("emobox", help="EmoBox's intra-corpus folds: train and test per fold, UAR/WA/macro-F1")
    e.add_argument("corpus", help="EmoBox's corpus name, e.g. emodb, ravdess, casia")
    e.add_argument("--folds", required=True, help="EmoBox's data/ folder (holding <corpus>/fold_<k>/)")
    e.add_argument("--audio", required=True, help="the corpus's audio folder (clips found by file stem)")
    e.add_argument("--init", default="default", help="start from this model (default, a model dir) or none")
    e.add_argument("--config", default=str(REPO_CONFIG), help="the training config each fold starts from")
    e.add_argument("-o", "--out", help="output folder (default: runs/emobox/<corpus>-<init>)")
    e.add_argument("--fold", type=int, action="append", help="run only this fold (repeatable)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting (as serval train --set)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run `serval benchmark emobox`; returns the exit status."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    init_name = "none" if args.init == "none" else Path(args.init).name or args.init
    out = Path(args.out or f"runs/emobox/{args.corpus}-{init_name}")
    config = args.config
    if not Path(config).is_file():  # the repository's recipe is not part of an installed package
        print(f"serval benchmark: {config}: no such training config (pass --config FILE)", file=sys.stderr)
        return 2
    try:
        report = run_benchmark(
            args.corpus, Path(args.folds), Path(args.audio), out, args.init, config, args.overrides,
            args.fold, log=lambda m: print(m, file=sys.stderr),
        )  # fmt: skip
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"serval benchmark: {e}", file=sys.stderr)
        return 1
    print(report_markdown(report), end="")
    print(f"written: {out / 'report.md'}, {out / 'report.json'}", file=sys.stderr)
    return 0
