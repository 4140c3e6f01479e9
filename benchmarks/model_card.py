"""The numbers in MODEL_CARD.md, re-computable by anyone.

Scores the default model beside two reference floors on the same speaker-disjoint split:
a majority-class predictor, and a frozen-encoder baseline (whisper-base last-layer features,
mean-pooled over the clip, standardised, logistic regression fitted on the training split).
Also measures CPU latency per clip. Writes `report.json`/`report.md`/confusion PNGs per split
and `latency.json` into the output folder.

Then scores the model(s) beside the linear probes of benchmarks/probes.py (all 7 whisper-base
layers mean-pooled, standardised; logistic regression for classes, ridge per dimension),
per corpus, per language and per dimension, on the dev and test speakers: `probes.md`, also
printed. `--probes-only` writes the probe tables alone (no model needed); pooled features are
cached in `--probe-cache` (default runs/probe-cache), so reruns only pay for the model.

    python benchmarks/model_card.py --manifest runs/default/all.csv --model serval/assets/default -o runs/model-card \
        --cache-dir runs/cache/whisper-base --extra-model last-layer=runs/default/cpu-last/best
    python benchmarks/model_card.py --manifest runs/default/all.csv -o runs/model-card --probes-only

`--protocol loco` writes the leave-one-corpus-out tables instead (benchmarks/loco.py; MODEL_CARD.md's
first table): every head fitted on the other corpora, and each `--extra-model` scored per corpus.

    python benchmarks/model_card.py --protocol loco --manifest runs/default/all.csv -o runs/loco \
        --cache-dir runs/cache/whisper-base --extra-model previous-default=runs/s/old-default
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from serval.audio import load_audio
from serval.checkpoint import model_from_backbone
from serval.evaluate import evaluate
from serval.features import compute_features
from serval.inference import DEFAULT_MODEL, load
from serval.manifest import read_manifest
from serval.model import SERConfig
from serval.report import write_report
from serval.train.cache import EncoderCache, encoder_settings
from serval.train.linear_head import fit_logistic
from serval.vocab import DIMENSIONS, EMOTIONS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loco import (  # noqa: E402
    AROUSAL_HEADS,
    GAIN_INVARIANT_HEAD,
    HEADS,
    PROBE,
    SESSION_HEADS,
    SESSIONS,
    SHIPPED_HEAD,
    ClipStats,
    Head,
    arousal_table,
    calibration_table,
    contender_table,
    copies_config,
    head_folds,
    model_folds,
    recall_table,
    session_folds,
    split_key,
    summary_table,
)
from probes import LinearProbe, PooledFeatures, class_scores, dim_scores, markdown  # noqa: E402
from variants import CachedHead  # noqa: E402


class MajorityClass:
    """Always the most frequent training label."""

    dimensions = DIMENSIONS

    def __init__(self, train_labels: list[str]):
        self.classes = EMOTIONS
        self.label = Counter(train_labels).most_common(1)[0][0]
        self.name = f"majority ({self.label})"
        self.fingerprint = hashlib.sha1(f"majority-{self.label}".encode()).hexdigest()

    def predict_waveforms(self, waves, batch_size: int = 16, progress: bool = False):
        probs = np.zeros((len(waves), len(self.classes)), np.float32)
        probs[:, self.classes.index(self.label)] = 1.0
        return probs, np.full((len(waves), len(self.dimensions)), np.nan, np.float32)


class FrozenEncoderLogReg:
    """Mean-pooled frozen whisper-base features + logistic regression.

    With `cache_dir` (the training run's encoder cache), clips already encoded there are read
    from it (float16) instead of being encoded again.
    """

    dimensions = DIMENSIONS

    def __init__(self, backbone: str = "pypi:whisper-base", cache_dir: str | None = None):
        self.classes = EMOTIONS
        self.name = "whisper-base mean-pool + logreg"
        self.encoder = model_from_backbone(SERConfig.for_whisper("base", backbone=backbone)).eval()
        self.cache = EncoderCache(cache_dir, encoder_settings(self.encoder, "float16")) if cache_dir else None
        self.clf = None

    @torch.inference_mode()
    def embed(self, waves: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
        pooled: list[np.ndarray | None] = [None] * len(waves)
        for i, w in enumerate(waves):
            key = self.cache.key(w) if self.cache else None
            if key and self.cache.readable(key):
                pooled[i] = self.cache.get(key)[0].float().mean(0).numpy()
        todo = [i for i, p in enumerate(pooled) if p is None]
        for k in range(0, len(todo), batch_size):
            idx = todo[k : k + batch_size]
            feats, lengths = compute_features([waves[i] for i in idx])
            hidden, token_lengths = self.encoder.encode(feats, lengths)
            for row, i in enumerate(idx):
                pooled[i] = hidden[row, : token_lengths[row]].mean(0).numpy()
        return np.stack(pooled)

    def fit(self, waves: list[np.ndarray], labels: list[str]) -> None:
        self.clf = fit_logistic(self.embed(waves), labels)
        coef = self.clf[-1].coef_
        self.fingerprint = hashlib.sha1(coef.tobytes()).hexdigest()

    def predict_waveforms(self, waves, batch_size: int = 16, progress: bool = False):
        proba = self.clf.predict_proba(self.embed(list(waves), batch_size))
        probs = np.zeros((len(waves), len(self.classes)), np.float32)
        for j, c in enumerate(self.clf.classes_):
            probs[:, self.classes.index(c)] = proba[:, j]
        return probs, np.full((len(waves), len(self.dimensions)), np.nan, np.float32)


def cpu_latency(predictor, paths: list[str], repeats: int = 1) -> dict:
    """Per-clip wall time of `predictor.predict([path])` (decoding included), one clip at a time."""
    predictor.predict(paths[:1])  # warm-up
    times, durations = [], []
    for _ in range(repeats):
        for p in paths:
            start = time.perf_counter()
            rec = predictor.predict([p])[0]
            times.append(1000 * (time.perf_counter() - start))
            durations.append(rec["duration"])
    return {
        "clips": len(times),
        "median_ms": round(statistics.median(times), 1),
        "mean_ms": round(statistics.fmean(times), 1),
        "mean_clip_seconds": round(statistics.fmean(durations), 2),
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }


def load_named(spec: str, cached_head: str | None = None):
    """`NAME=PATH` or `PATH`: a predictor, renamed to NAME when given; with `cached_head` (an
    encoder cache folder) a serval model folder is scored by its head on that cache."""
    name, sep, path = spec.partition("=")
    if cached_head:
        return CachedHead(path if sep else spec, cached_head, name if sep else None)
    predictor = load(path if sep else spec, device="cpu")
    if sep:
        predictor.name = name
    return predictor


def probe_section(rows, models: list, out: Path, args: argparse.Namespace) -> str:
    """The model(s) beside the linear and ridge probes per corpus, language and dimension, as Markdown."""
    train = [r for r in rows if r.split == "train"]
    probe = LinearProbe(PooledFeatures(args.probe_cache, reuse_dir=args.cache_dir)).fit(train, progress=True)
    systems = [*models, probe]
    n_dims = {d: sum(getattr(r, d) is not None for r in train) for d in DIMENSIONS}
    parts = [
        "## Against linear probes, per corpus",
        "",
        f"Probe: frozen whisper-base, all 7 encoder outputs mean-pooled and concatenated, standardised; "
        f"logistic regression (balanced) on the {sum(1 for r in train if r.label)} labelled train clips, "
        "ridge per dimension on the train clips rated on it ("
        + ", ".join(f"{d} {n}" for d, n in n_dims.items())
        + "). Fitted on train speakers only; scored on speakers neither it nor the model saw.",
        "",
    ]
    for split in args.probe_splits.split(","):
        part = [r for r in rows if r.split == split]
        if not part:
            continue
        labelled = [r for r in part if r.label]
        classes = class_scores(labelled, systems, out / "cache", args.bootstrap)
        common = [r for r in labelled if str(r.extra.get("common_sentence")) == "1"]
        common_scores = class_scores(common, systems, out / "cache", args.bootstrap) if common else None
        dims = dim_scores(part, systems, out / "cache", args.bootstrap)
        parts.append(markdown(split, part, classes, common_scores, dims, probe.alphas()))
    text = "\n".join(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probes.md").write_text(text + "\n")
    return text


def chosen_heads(names: Sequence[str]) -> tuple[Head, ...]:
    """The HEADS named (all of them when none is), with the ones the tables need (probe, shipped model's)."""
    known = {h.name: h for h in HEADS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"model_card: no LOCO head named {unknown[0]!r}; the heads: {', '.join(known)}")
    needed = {PROBE.name, GAIN_INVARIANT_HEAD.name, SHIPPED_HEAD.name, *names}
    return tuple(h for h in HEADS if not names or h.name in needed)


def loco_section(rows, out: Path, args: argparse.Namespace) -> str:
    """The LOCO tables (Markdown, also written to `out/loco.md`, the numbers to `out/loco.json`)."""
    stats, kept = {}, rows
    heads = chosen_heads(args.head)
    for key in dict.fromkeys(k for head in (*heads, *AROUSAL_HEADS, *SESSION_HEADS) for k in head.stats):
        front_end, suffix = split_key(key)
        reuse = args.cache_dir if front_end == "gain-invariant" and not suffix else None
        augment = copies_config(suffix, args.noise_dir) if suffix else None
        stats[key], kept = ClipStats(args.loco_cache, front_end, reuse, augment).rows(rows)
    folds, arousal = head_folds(kept, stats, args.bootstrap, Path(args.loco_cache), heads)
    for corpus, cell in session_folds(kept, stats, args.bootstrap, Path(args.loco_cache)).items():
        folds[corpus].update({n: s for n, s in cell.items() if n not in folds[corpus]})
    names, arousal_names = [h.name for h in heads], [h.name for h in AROUSAL_HEADS]
    names += [h.name + suffix for h in SESSION_HEADS for suffix in SESSIONS]
    for spec in [*args.fold_model, *args.extra_model]:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).name
        classes, rated = model_folds(kept, path, name, args.bootstrap, Path(args.loco_cache))
        for table, new in ((folds, classes), (arousal, rated)):
            for corpus, cell in new.items():
                table.setdefault(corpus, {}).update(cell)
        names += sorted({n for cell in classes.values() for n in cell}, key=lambda n: (n != name, n))
        arousal_names += [name] if rated else []
    md = []
    if args.fold_model:  # the first fold model against the probe, the floor
        first = args.fold_model[0].rpartition("=")[0]
        others = [n for n in names[len(heads) :] if not n.startswith(first) and "(" not in n]
        md += ["## The recipe against the probe, leave one corpus out: UAR [95 % CI]", ""]
        md += [*summary_table(folds, first, PROBE.name, [GAIN_INVARIANT_HEAD.name, *others]), ""]
    md += ["## Leave one corpus out, every contender: UAR [95 % CI]", ""]
    md += [*contender_table(folds, names, PROBE.name), ""]
    md += ["## Calibration, leave one corpus out: expected calibration error (%) per corpus", ""]
    md += [*calibration_table(folds, [PROBE.name, SHIPPED_HEAD.name]), ""]
    recalls = (PROBE.name, GAIN_INVARIANT_HEAD.name, SHIPPED_HEAD.name)
    for name in (*recalls, *(n for n in names[len(heads) :] if "(" not in n)):
        md += [f"### Per-class recall: {name}", "", *recall_table(folds, name), ""]
    md += ["## Leave one corpus out: arousal CCC [95 % CI]", "", *arousal_table(arousal, arousal_names)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "loco.json").write_text(json.dumps({"classes": folds, "arousal": arousal}, indent=1) + "\n")
    (out / "loco.md").write_text("\n".join(md) + "\n")
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True, help="manifest with train/dev/test splits")
    ap.add_argument("--model", default=None, help="model to describe (default: the bundled default model)")
    ap.add_argument(
        "--extra-model",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="more models scored side by side (NAME tells apart models whose configs share a name)",
    )
    ap.add_argument("--splits", default="dev,test")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument(
        "--cache-dir",
        help="a training run's encoder cache, reused by the frozen-encoder baseline and the probes",
    )
    ap.add_argument("--probes-only", action="store_true", help="only the probe tables, no model")
    ap.add_argument(
        "--probe-cache", default="runs/probe-cache", help="pooled probe features (default %(default)s)"
    )
    ap.add_argument("--probe-splits", default="dev,test", help="splits the probe tables cover")
    ap.add_argument(
        "--cached-head",
        action="store_true",
        help="score the serval models by their head on --cache-dir's encoder outputs (benchmarks/variants.py)",
    )
    ap.add_argument("--protocol", choices=("splits", "loco"), default="splits", help="speaker splits or LOCO")
    ap.add_argument(
        "--fold-model",
        action="append",
        default=[],
        metavar="NAME=PATTERN",
        help="LOCO fold models, e.g. runs/loco/frozen/{corpus}/best (benchmarks/loco_folds.py)",
    )
    ap.add_argument("--loco-cache", default="runs/loco-cache", help="pooled LOCO stats (default %(default)s)")
    ap.add_argument(
        "--head",
        action="append",
        default=[],
        metavar="NAME",
        help="fit only these LOCO heads (benchmarks/loco.py HEADS; the probe and the shipped model's always)",
    )
    ap.add_argument(
        "--noise-dir",
        default="../shared/data/noise",
        help="noise for LOCO's waveform-augmented copies (default %(default)s, as the training configs)",
    )
    args = ap.parse_args()

    out = Path(args.output)
    rows = read_manifest(args.manifest)
    if args.protocol == "loco":
        print(loco_section(rows, out, args))
        return
    if args.probes_only:
        print(probe_section(rows, [], out, args))
        return
    train = [r for r in rows if r.split == "train" and r.label]
    model = load(args.model, device="cpu")
    head = args.cache_dir if args.cached_head else None
    scored = load_named(str(args.model or DEFAULT_MODEL), head) if head else model
    systems = [scored, *[load_named(m, head) for m in args.extra_model]]
    if not args.no_baselines:
        systems.append(MajorityClass([r.label for r in train]))
        frozen = FrozenEncoderLogReg(cache_dir=args.cache_dir)
        frozen.fit([load_audio(r.path, r.start, r.end) for r in train], [r.label for r in train])
        systems.append(frozen)
    for split in args.splits.split(","):
        part = [r for r in rows if r.split == split]
        subsets = {split: part}
        common = [r for r in part if r.extra.get("common_sentence") == "1"]
        if common:  # ASED: sentences 01-02 measure emotion from the voice, not the words
            subsets[f"{split}-ased-common-sentences"] = common
        for name, subset in subsets.items():
            report = evaluate(
                subset,
                systems,
                out / "cache",
                segmentations=("utterance",),
                bootstrap=args.bootstrap,
                progress=True,
            )
            write_report(report, out / name, overwrite=True, title=f"serval model card: {name} split")
            print(f"{name}: {len(subset)} clips -> {out / name / 'report.md'}")
    test_paths = [r.path for r in rows if r.split == args.splits.split(",")[-1]][:40]
    latency = cpu_latency(model, test_paths)
    (out / "latency.json").write_text(json.dumps(latency, indent=2) + "\n")
    print("CPU latency per clip:", latency)
    print(probe_section(rows, systems[: 1 + len(args.extra_model)], out, args))


if __name__ == "__main__":
    main()
