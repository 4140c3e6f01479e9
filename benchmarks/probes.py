"""Linear probes on frozen whisper-base: the floor a trained model has to clear, corpus by corpus.

Features: whisper-base's 7 encoder outputs (the input embedding and the 6 layers, the last after
its layer norm), each mean-pooled over the clip's own tokens, concatenated (7 x 512 = 3,584),
then standardised. Classes: logistic regression (balanced class weights) fitted on the train
rows that have a class. Dimensions: one ridge regression per dimension, fitted on the train
rows that have that dimension, its alpha chosen by leave-one-out on train alone. Dev and test
speakers are never seen by a probe.

Pooled features are cached on disk, one small file per clip, keyed by the clip's samples and
the encoder's weights and settings, so a rerun (or a new model) only pays for the model. A
training run's all-layer encoder cache (`reuse_dir`) is pooled instead of encoding again; it
holds float16 outputs, so those clips' features differ from freshly encoded ones in rounding only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from serval.atomic import atomic_write, atomic_write_text
from serval.audio import AudioError, load_audio
from serval.checkpoint import model_from_backbone
from serval.features import compute_features
from serval.metrics import ccc
from serval.model import SERConfig
from serval.train.cache import EncoderCache, encoder_settings
from serval.train.linear_head import fit_logistic
from serval.vocab import DIMENSIONS, EMOTIONS

POOLING_VERSION = 1  # bump when the pooled layout changes
RIDGE_ALPHAS = np.logspace(-2, 6, 17)


class PooledFeatures:
    """Per-layer mean-pooled whisper-base encoder outputs of clips, cached under `cache_dir`."""

    def __init__(
        self,
        cache_dir: str | Path,
        backbone: str = "pypi:whisper-base",
        batch_size: int = 8,
        reuse_dir: str | Path | None = None,
    ):
        config = SERConfig.for_whisper("base", backbone=backbone, layer_weighting="weighted")
        self.encoder = model_from_backbone(config).eval()
        self.batch_size = batch_size
        # a training run's all-layer encoder cache (float16) holds the same outputs: pooled, not re-encoded
        self.reuse = EncoderCache(reuse_dir, encoder_settings(self.encoder, "float16")) if reuse_dir else None
        settings = {**encoder_settings(self.encoder, "float32"), "pooling": "mean per layer"}
        settings["pooling_version"] = POOLING_VERSION
        self._prefix = json.dumps(settings, sort_keys=True).encode()
        self.root = Path(cache_dir) / hashlib.sha256(self._prefix).hexdigest()[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.root / "settings.json"
        if not info.exists():  # says what the folder holds; the key already covers it
            atomic_write_text(info, json.dumps(settings, indent=2, sort_keys=True) + "\n")

    def key(self, wave: np.ndarray) -> str:
        samples = np.ascontiguousarray(wave, dtype=np.float32)
        h = hashlib.sha256(self._prefix)
        h.update(str(samples.shape).encode())
        h.update(samples.tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def _read(self, key: str) -> np.ndarray | None:
        try:
            return np.load(self._path(key))
        except (OSError, ValueError):  # missing or damaged: encoded again
            return None

    def _write(self, key: str, vec: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: np.save(tmp, vec))

    @torch.inference_mode()
    def _encode(self, waves: list[np.ndarray]) -> np.ndarray:
        feats, lengths = compute_features(waves, n_mels=self.encoder.config.n_mels)
        hidden, token_lengths = self.encoder.encode(feats, lengths)  # [B, 7, T, d]
        out = [hidden[b, :, : token_lengths[b]].mean(1).reshape(-1) for b in range(len(waves))]
        return torch.stack(out).numpy().astype(np.float32)

    def __call__(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """[N, 7 * 512] float32 features of `waves` (16 kHz); only uncached clips are encoded."""
        keys = [self.key(w) for w in waves]
        pooled = [self._read(k) for k in keys]
        for i, w in enumerate(waves):
            if pooled[i] is None and self.reuse is not None and self.reuse.readable(k := self.reuse.key(w)):
                pooled[i] = self.reuse.get(k)[0].mean(1).reshape(-1).numpy().astype(np.float32)
                self._write(keys[i], pooled[i])
        todo = sorted((i for i, p in enumerate(pooled) if p is None), key=lambda i: len(waves[i]))
        for s in range(0, len(todo), self.batch_size):
            idx = todo[s : s + self.batch_size]
            for i, vec in zip(idx, self._encode([waves[i] for i in idx])):
                pooled[i] = vec
                self._write(keys[i], vec)
        return np.stack(pooled) if pooled else np.zeros((0, 7 * 512), np.float32)

    def rows(self, rows: Sequence, chunk: int = 64, progress: bool = False) -> tuple[np.ndarray, list[int]]:
        """Features of manifest rows, read a chunk at a time; (features, indices of the rows that decoded)."""
        out, kept = [], []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows), unit=" clip", desc="probe features", file=sys.stderr)
        for s in range(0, len(rows), chunk):
            waves, idx = [], []
            for i in range(s, min(s + chunk, len(rows))):
                try:
                    waves.append(load_audio(rows[i].path, rows[i].start, rows[i].end))
                    idx.append(i)
                except AudioError as e:
                    print(f"probe: skipped {e}", file=sys.stderr)
            if waves:
                out.append(self(waves))
                kept.extend(idx)
            if bar is not None:
                bar.update(min(chunk, len(rows) - s))
        if bar is not None:
            bar.close()
        return (np.concatenate(out) if out else np.zeros((0, 7 * 512), np.float32)), kept


def _dims(row) -> np.ndarray:
    return np.array([np.nan if getattr(row, d) is None else getattr(row, d) for d in DIMENSIONS])


class LinearProbe:
    """The probe as a system `serval.evaluate` can score: logistic-regression classes, ridge dimensions."""

    dimensions = DIMENSIONS

    def __init__(self, features: PooledFeatures, name: str = "probe (whisper-base, 7 layers: logreg, ridge)"):
        self.features, self.name, self.classes = features, name, EMOTIONS
        self.clf, self.ridges = None, {}

    def fit(self, rows: Sequence, progress: bool = False) -> LinearProbe:
        """Fit on manifest rows (the train split): classes where labelled, each dimension where present."""
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, kept = self.features.rows(rows, progress=progress)
        rows = [rows[i] for i in kept]
        labelled = [i for i, r in enumerate(rows) if r.label]
        self.clf = fit_logistic(x[labelled], [rows[i].label for i in labelled])
        h = hashlib.sha1(self.clf[-1].coef_.tobytes())
        gold = np.stack([_dims(r) for r in rows]) if rows else np.zeros((0, len(DIMENSIONS)))
        for k, dim in enumerate(DIMENSIONS):
            have = np.isfinite(gold[:, k])
            if have.sum() < 10:  # too few rated clips to fit anything
                continue
            ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
            self.ridges[dim] = ridge.fit(x[have], gold[have, k])
            h.update(ridge[-1].coef_.tobytes())
        self.fingerprint = h.hexdigest()
        self.trained_dimensions = tuple(self.ridges)  # serval.evaluate scores only trained outputs
        return self

    def predict_waveforms(self, waves, batch_size: int = 16, progress: bool = False):
        x = self.features(list(waves))
        proba = self.clf.predict_proba(x)
        probs = np.zeros((len(x), len(self.classes)), np.float32)
        for j, c in enumerate(self.clf.classes_):
            probs[:, self.classes.index(c)] = proba[:, j]
        scores = np.full((len(x), len(self.dimensions)), np.nan, np.float32)
        for k, dim in enumerate(self.dimensions):
            if dim in self.ridges:
                scores[:, k] = np.clip(self.ridges[dim].predict(x), 0.0, 1.0)
        return probs, scores

    def alphas(self) -> dict[str, float]:
        """The ridge alpha leave-one-out chose per dimension (reported beside the scores)."""
        return {d: float(r[-1].alpha_) for d, r in self.ridges.items()}


def ccc_ci(
    gold: np.ndarray, pred: np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of CCC, resampling clips with replacement (seeded)."""
    gold, pred = np.asarray(gold, np.float64), np.asarray(pred, np.float64)
    if len(gold) < 2 or n_resamples < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for b in range(n_resamples):
        i = rng.integers(0, len(gold), len(gold))
        stats[b] = ccc(gold[i], pred[i])
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------
# Scoring and the Markdown tables


def _fmt(value: float | None, ci, scale: float = 100.0, digits: int = 1) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    lo, hi = ci if ci is not None else (np.nan, np.nan)
    if lo is None or not np.isfinite(lo):
        return f"{scale * value:.{digits}f}"
    return f"{scale * value:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def class_scores(rows: Sequence, systems: Sequence, cache_dir: Path, bootstrap: int) -> dict:
    """UAR with its CI per system: overall, by corpus, by language (serval.evaluate's 7-class protocol)."""
    from serval.evaluate import evaluate

    report = evaluate(
        rows, systems, cache_dir, segmentations=("utterance",), protocols=("7class",), bootstrap=bootstrap
    )
    return report["results"]["utterance"]["7class"]


def dim_scores(rows: Sequence, systems: Sequence, cache_dir: Path, bootstrap: int) -> dict:
    """{(corpus, dimension): {system name: (ccc, ci, n)}} on the rows that have the dimension."""
    from serval.eval_predictions import predict_all, unique_names
    from serval.eval_segments import make_units

    units = [u for u in make_units(rows, "utterance") if np.isfinite(np.array(u.dims, float)).any()]
    names = unique_names(systems)
    if not units:
        return {}
    tables, failures = predict_all(units, systems, names, cache_dir)
    units = [u for u in units if u.key not in failures]
    out: dict = {}
    for corpus in sorted({u.corpus for u in units}, key=str):
        mine = [u for u in units if u.corpus == corpus]
        for k, dim in enumerate(DIMENSIONS):
            rated = [u for u in mine if u.dims[k] is not None]
            if len(rated) < 2:
                continue
            gold = np.array([u.dims[k] for u in rated])
            for name, table in zip(names, tables):
                pred = np.array([table[u.key]["scores"][k] for u in rated])
                if not np.isfinite(pred).all():
                    out.setdefault((corpus, dim), {})[name] = (None, None, len(rated))
                    continue
                out.setdefault((corpus, dim), {})[name] = (
                    ccc(gold, pred),
                    ccc_ci(gold, pred, bootstrap),
                    len(rated),
                )
    return out


def _speakers(rows: Sequence, attr: str) -> dict[str, tuple[int, int]]:
    groups: dict[str, list] = {}
    for r in rows:
        if r.label:
            groups.setdefault(str(getattr(r, attr)), []).append(r)
    return {k: (len(v), len({r.speaker for r in v})) for k, v in groups.items()}


def _class_table(title: str, attr: str, rows, results: dict, names: list[str], extra: dict) -> list[str]:
    counts = _speakers(rows, attr)
    probe, delta = names[-1], len(names) > 1
    lines = [f"**{title}** (UAR %, 95 % bootstrap CI; each {attr} scored over its own classes)", ""]
    head = f"| {attr} | clips | speakers | classes | " + " | ".join(names)
    lines += [head + (f" | {names[0]} − probe |" if delta else " |")]
    lines += ["|" + " --- |" * (len(names) + 4 + delta)]
    groups = results[probe].get(f"by_{attr}", {})
    for key in [*sorted(groups), *sorted(extra)]:
        per = {n: (extra[key][n] if key in extra else results[n][f"by_{attr}"][key]) for n in names}
        n_classes = sum(1 for v in per[probe]["support"].values() if v)
        if n_classes < 2:  # one class: every restricted argmax is right, nothing is measured
            cells = ["one class: not scored"] * len(names) + [""] * delta
        else:
            cells = [_fmt(per[n]["uar"], per[n]["uar_ci95"]) for n in names]
            if delta:
                cells.append(f"{100 * (per[names[0]]['uar'] - per[probe]['uar']):+.1f}")
        clips, speakers = (
            counts.get(key, (per[probe]["n"], "")) if key not in extra else (per[probe]["n"], "")
        )
        lines.append(f"| {key} | {clips} | {speakers} | {n_classes} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(split: str, rows, classes: dict, common: dict | None, dims: dict, alphas: dict) -> str:
    """One split's tables: classes by corpus and by language, then CCC by corpus and dimension."""
    names = list(classes)
    extra = {"ased (sentences 01-02)": {n: common[n]["overall"] for n in names}} if common else {}
    lines = [f"### {split} speakers", ""]
    lines += _class_table("Classes by corpus", "corpus", rows, classes, names, extra)
    lines += _class_table("Classes by language", "language", rows, classes, names, {})
    overall = " | ".join(
        f"{n}: {_fmt(classes[n]['overall']['uar'], classes[n]['overall']['uar_ci95'])}" for n in names
    )
    lines += [f"Pooled over every labelled {split} clip: {overall}.", ""]
    if dims:
        dim_names = list(next(iter(dims.values())))
        lines += ["**Dimensions** (CCC, 95 % bootstrap CI over clips)", ""]
        lines += [
            "| corpus | dimension | clips | " + " | ".join(dim_names) + " |",
            "|" + " --- |" * (len(dim_names) + 3),
        ]
        for (corpus, dim), per in dims.items():
            n = next(iter(per.values()))[2]
            cells = [_fmt(c, ci, scale=1.0, digits=3) for c, ci, _ in per.values()]
            lines.append(f"| {corpus} | {dim} | {n} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Ridge alpha (leave-one-out on train): " + ", ".join(f"{d} {a:g}" for d, a in alphas.items()),
            "",
        ]
    return "\n".join(lines)
