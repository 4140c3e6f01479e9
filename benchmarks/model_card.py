"""The numbers in MODEL_CARD.md, re-computable by anyone.

Scores the default model beside two reference floors on the same speaker-disjoint split:
a majority-class predictor, and a frozen-encoder baseline (whisper-base last-layer features,
mean-pooled over the clip, standardised, logistic regression fitted on the training split).
Also measures CPU latency per clip. Writes `report.json`/`report.md`/confusion PNGs per split
and `latency.json` into the output folder.

    python benchmarks/model_card.py --manifest runs/default/all.csv --model serval/assets/default -o runs/model-card \
        --cache-dir runs/cache/whisper-base --extra-model last-layer=runs/default/cpu-last/best
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from serval.audio import load_audio
from serval.cache import EncoderCache, encoder_settings
from serval.evaluate import evaluate, write_report
from serval.features import compute_features
from serval.inference import load
from serval.manifest import read_manifest
from serval.model import DIMENSIONS, EMOTIONS, SERConfig, SERModel


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
        self.encoder = SERModel.from_backbone(SERConfig.for_whisper("base", backbone=backbone)).eval()
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
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced"))
        self.clf.fit(self.embed(waves), labels)
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


def load_named(spec: str):
    """`NAME=PATH` or `PATH`: a predictor, renamed to NAME when given."""
    name, sep, path = spec.partition("=")
    predictor = load(path if sep else spec, device="cpu")
    if sep:
        predictor.name = name
    return predictor


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
        "--cache-dir", help="a training run's encoder cache, reused by the frozen-encoder baseline"
    )
    args = ap.parse_args()

    out = Path(args.output)
    rows = read_manifest(args.manifest)
    train = [r for r in rows if r.split == "train" and r.label]
    model = load(args.model, device="cpu")
    systems = [model, *[load_named(m) for m in args.extra_model]]
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


if __name__ == "__main__":
    main()
