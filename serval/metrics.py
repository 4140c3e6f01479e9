"""Scores for emotion recognition: UAR, accuracy, macro-F1, confusion, calibration, CCC, bootstrap intervals.

Labels are class names. A prediction may also be `None` (the system gave no usable answer,
e.g. an unparseable LLM reply) or a name outside `classes` (e.g. "fearful" under the
4-class protocol): both count as wrong for the gold class and fall into the confusion
matrix's extra "no answer" column, so a system is never scored on fewer items than another.

UAR (unweighted average recall) is the mean recall over the classes that occur in the gold
labels, which is exactly scikit-learn's `balanced_accuracy_score`; a class that occurs only
in the predictions has no recall and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def encode(
    gold: Sequence[str], pred: Sequence[str | None], classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Class names -> indices into `classes`; a prediction outside them becomes len(classes) ("no answer")."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({g for g in gold if g not in index}, key=str)
    if unknown:
        raise ValueError(f"gold labels {unknown} are not among the classes {list(classes)}")
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    y = np.array([index[g] for g in gold], dtype=np.int64)
    p = np.array(
        [index.get(q, len(classes)) if q is not None else len(classes) for q in pred], dtype=np.int64
    )
    return y, p


def confusion_counts(y: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C + 1] counts: rows gold, columns predicted, the last column "no answer"."""
    cells = np.bincount(y * (n_classes + 1) + p, minlength=n_classes * (n_classes + 1))
    return cells.reshape(n_classes, n_classes + 1)


def _uar_from_counts(cm: np.ndarray) -> float:
    support = cm.sum(1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(cm[:, :-1])[present] / support[present]))


def uar(gold: Sequence[str], pred: Sequence[str | None], classes: Sequence[str]) -> float:
    """Unweighted average recall over the classes present in `gold` (= balanced accuracy)."""
    y, p = encode(gold, pred, classes)
    return _uar_from_counts(confusion_counts(y, p, len(classes)))


def accuracy(gold: Sequence[str], pred: Sequence[str | None]) -> float:
    """Fraction of exact matches; NaN for no items."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not len(gold):
        return float("nan")
    return float(np.mean([g == q for g, q in zip(gold, pred)]))


def classification_scores(gold: Sequence[str], pred: Sequence[str | None], classes: Sequence[str]) -> dict:
    """UAR, accuracy, macro-F1, per-class recall/precision/F1, support and the confusion matrix.

    Macro-F1 averages over the classes that occur in gold or (valid) predictions, as
    scikit-learn's `f1_score(average="macro")` does; an undefined precision or recall is 0.
    Per-class recall is None for a class absent from gold.
    """
    classes = list(classes)
    y, p = encode(gold, pred, classes)
    cm = confusion_counts(y, p, len(classes))
    support = cm.sum(1)
    predicted = cm[:, :-1].sum(0)
    tp = np.diag(cm[:, :-1]).astype(np.float64)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0
    )
    seen = (support > 0) | (predicted > 0)
    n = int(len(y))
    return {
        "n": n,
        "uar": _uar_from_counts(cm),
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "macro_f1": float(f1[seen].mean()) if seen.any() else float("nan"),
        "no_answer": int(cm[:, -1].sum()),
        "classes": classes,
        "support": {c: int(s) for c, s in zip(classes, support)},
        "recall": {c: (float(r) if s > 0 else None) for c, r, s in zip(classes, recall, support)},
        "precision": {c: (float(v) if k > 0 else None) for c, v, k in zip(classes, precision, predicted)},
        "f1": {c: float(v) for c, v in zip(classes, f1)},
        # rows gold, columns predicted; no_answer per gold class is kept apart so the matrix stays square
        "confusion": cm[:, :-1].tolist(),
        "confusion_no_answer": cm[:, -1].tolist(),
    }


def bootstrap_ci(
    gold: Sequence[str],
    pred: Sequence[str | None],
    classes: Sequence[str],
    groups: Sequence | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of UAR, resampling utterances with replacement (seeded).

    With `groups` (e.g. the source utterance of each 2 s segment) whole groups are resampled,
    so segments of one utterance, which are not independent, move together.
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    y, p = encode(gold, pred, classes)
    if not len(y):
        return float("nan"), float("nan")
    c = len(classes)
    cells = y * (c + 1) + p
    if groups is None:
        group_cells = [np.array([x]) for x in cells]
    else:
        if len(groups) != len(y):
            raise ValueError(f"{len(y)} items but {len(groups)} group ids")
        first_seen: dict = {}
        inverse = np.array([first_seen.setdefault(g, len(first_seen)) for g in groups], dtype=np.int64)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        group_cells = np.split(cells[order], bounds)
    # per-group cell counts, so one resample is a weighted sum of group rows
    per_group = np.stack([np.bincount(g, minlength=c * (c + 1)) for g in group_cells])
    rng = np.random.default_rng(seed)
    n_groups = len(per_group)
    stats = np.empty(n_resamples)
    for b in range(n_resamples):
        weights = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        stats[b] = _uar_from_counts((weights @ per_group).reshape(c, c + 1))
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def calibration(gold_index: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict:
    """How far probabilities [N, C] are from the truth (`gold_index`: each row's right column):
    expected calibration error (top probability against accuracy, `bins` equal-width bins, weighted by
    clips), negative log-likelihood of the right class, mean top probability, accuracy."""
    probs = np.asarray(probs, dtype=np.float64)
    top, right = probs.max(1), probs.argmax(1) == gold_index
    which = np.minimum((top * bins).astype(np.int64), bins - 1)
    ece = sum(
        abs(top[which == b].mean() - right[which == b].mean()) * (which == b).mean()
        for b in range(bins)
        if (which == b).any()
    )
    nll = -np.log(np.clip(probs[np.arange(len(probs)), gold_index], 1e-12, None)).mean()
    return {
        "ece": float(ece),
        "nll": float(nll),
        "confidence": float(top.mean()),
        "accuracy": float(right.mean()),
    }


def ccc(gold: Sequence[float], pred: Sequence[float]) -> float:
    """Concordance correlation coefficient (population moments, as in the paper's CCC loss)."""
    y, x = np.asarray(gold, np.float64), np.asarray(pred, np.float64)
    if len(y) < 2:
        return float("nan")
    cov = np.mean((y - y.mean()) * (x - x.mean()))
    denom = y.var() + x.var() + (y.mean() - x.mean()) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")


def pearson(gold: Sequence[float], pred: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than 2 items."""
    y, x = np.asarray(gold, np.float64), np.asarray(pred, np.float64)
    if len(y) < 2 or y.std() == 0 or x.std() == 0:
        return float("nan")
    return float(np.mean((y - y.mean()) * (x - x.mean())) / (y.std() * x.std()))


def mae(gold: Sequence[float], pred: Sequence[float]) -> float:
    """Mean absolute error; NaN for no items."""
    y, x = np.asarray(gold, np.float64), np.asarray(pred, np.float64)
    return float(np.mean(np.abs(y - x))) if len(y) else float("nan")


def regression_scores(gold: np.ndarray, pred: np.ndarray, dimensions: Sequence[str]) -> dict:
    """CCC, Pearson r and MAE per dimension; gold NaNs (unannotated) and pred NaNs are skipped per dimension."""
    gold, pred = np.asarray(gold, np.float64), np.asarray(pred, np.float64)
    if gold.shape != pred.shape or gold.ndim != 2 or gold.shape[1] != len(dimensions):
        raise ValueError(f"gold {gold.shape} and pred {pred.shape} must both be [N, {len(dimensions)}]")
    out = {}
    for k, dim in enumerate(dimensions):
        ok = np.isfinite(gold[:, k]) & np.isfinite(pred[:, k])
        g, q = gold[ok, k], pred[ok, k]
        out[dim] = {"n": int(ok.sum()), "ccc": ccc(g, q), "pearson": pearson(g, q), "mae": mae(g, q)}
    return out
