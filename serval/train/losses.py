"""The training losses: weighted, label-smoothed soft cross-entropy plus CCC on the dimensional scores."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from serval.train.config import LossConfig


def ccc_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """1 - mean over dimensions of the concordance correlation coefficient, each over its labelled samples.

    `mask` is `[B]` (a row has all dimensions or none) or `[B, D]` (per dimension: BAVED carries
    arousal only). A dimension with fewer than two labelled samples in the batch adds nothing; the
    mean runs over the dimensions that count, and with none the loss is 0 (with no gradient).
    """
    p, t = pred.float(), target.float()
    if mask is None:
        mask = torch.ones_like(p, dtype=torch.bool)
    elif mask.dim() == 1:
        mask = mask.bool()[:, None].expand_as(p)
    terms = []
    for j in range(p.shape[1]):
        m = mask[:, j].bool()
        if int(m.sum()) < 2:
            continue
        pj, tj = p[m, j], t[m, j]
        pm, tm = pj.mean(), tj.mean()
        cov = ((pj - pm) * (tj - tm)).mean()
        denom = pj.var(unbiased=False) + tj.var(unbiased=False) + (pm - tm) ** 2
        terms.append(1.0 - 2.0 * cov / (denom + eps))
    if not terms:
        return pred.sum() * 0.0
    return torch.stack(terms).mean()


def soft_cross_entropy(
    logits: Tensor, targets: Tensor, class_weights: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """Weighted, label-smoothed cross-entropy against (possibly mixed) target distributions `[B, C]`.

    For one-hot targets this equals `F.cross_entropy(logits, y, weight, label_smoothing)`. Rows of
    zeros (no categorical label) add nothing.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    targets = targets.float()
    c = logits.shape[-1]
    w = (
        torch.ones(c, device=logits.device)
        if class_weights is None
        else class_weights.to(logits.device).float()
    )
    mass = targets.sum(-1, keepdim=True)
    smoothed = (1.0 - label_smoothing) * targets + label_smoothing * mass / c
    denom = (targets * w).sum()
    if denom <= 0:
        return logits.sum() * 0.0
    return -(smoothed * w * logp).sum() / denom


def class_weights_from_labels(labels: list[int], n_classes: int, sample_weights=None) -> Tensor:
    """Inverse-frequency weights N / (K * n_c) over the K classes present; absent classes get 0.

    With `sample_weights` (the balanced sampler's per-clip probabilities) the counts are the expected
    counts of what training draws, so balancing corpora and weighting classes do not correct twice.
    """
    w = None if sample_weights is None else np.asarray(sample_weights, dtype=np.float64)
    ys = np.asarray(labels)
    keep = ys >= 0
    counts = np.bincount(ys[keep], weights=None if w is None else w[keep], minlength=n_classes).astype(
        np.float64
    )
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def class_weights_for(
    cfg: LossConfig, labels: list[int], n_classes: int, sample_weights=None
) -> Tensor | None:
    """The class weights `loss.class_weights` asks for: a given list, inverse frequency ("auto"), or none."""
    if isinstance(cfg.class_weights, list):
        return torch.tensor(cfg.class_weights, dtype=torch.float32)
    if cfg.class_weights == "auto":
        return class_weights_from_labels(labels, n_classes, sample_weights)
    return None


def total_loss(logits, scores, batch, cfg: LossConfig, class_weights) -> tuple[Tensor, Tensor, Tensor]:
    """(ce_weight * CE + ccc_weight * CCC, CE, CCC) for one batch."""
    ce = soft_cross_entropy(logits, batch["targets"], class_weights, cfg.label_smoothing)
    ccc = ccc_loss(scores, batch["dims"], batch["dims_mask"]) if cfg.ccc_weight else scores.sum() * 0.0
    return cfg.ce_weight * ce + cfg.ccc_weight * ccc, ce, ccc
