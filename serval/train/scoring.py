"""Dev and test figures during training: the (ensemble) outputs over a dataset, and their scores.

The dev categorical loss these give is the checkpoint-selection criterion.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from serval.inference import ensemble_forward
from serval.metrics import uar
from serval.model import SERModel
from serval.train.config import TrainConfig
from serval.train.data import CachedDataset, Example, collate
from serval.train.ddp import Dist, gather_objects
from serval.train.losses import ccc_loss, soft_cross_entropy
from serval.train.network import autocast, model_inputs


@torch.no_grad()
def split_outputs(
    models: list[SERModel], dataset, cfg: TrainConfig, device: torch.device, dist: Dist, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean class probabilities, mean scores, example indices) of `models` over `dataset`, sharded over ranks."""
    cached = isinstance(dataset, CachedDataset)
    lengths = [ex.duration for ex in dataset.examples]
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])[dist.rank :: dist.world]
    probs, scores, indices = [], [], []
    for m in models:
        m.eval()
    for s in range(0, len(order), batch_size):
        batch = collate([dataset[i] for i in order[s : s + batch_size]])
        if batch is None:
            continue
        x, n = model_inputs(batch, models[0], cached, device)
        with autocast(cfg, device):
            p, d = ensemble_forward(models, x, n, cached=cached)
        probs.append(p.cpu().numpy())
        scores.append(d.cpu().numpy())
        indices.append(batch["index"].numpy())
    parts = gather_objects((probs, scores, indices), dist)
    flat = [
        np.concatenate(sum((list(part[j]) for part in parts), []))
        if any(part[j] for part in parts)
        else np.zeros((0,))
        for j in range(3)
    ]
    order = np.argsort(flat[2], kind="stable")
    return flat[0][order], flat[1][order], flat[2][order]


def score_outputs(
    probs: np.ndarray,
    dims: np.ndarray,
    indices: np.ndarray,
    examples: list[Example],
    cfg: TrainConfig,
    class_weights: Tensor | None,
) -> dict:
    """Figures of the predicted `examples[indices]`: categorical loss (the selection criterion),
    UAR, accuracy, recall per class, CCC per dimension."""
    examples = [examples[int(i)] for i in indices]  # a clip that failed to load has no prediction
    labels = np.array([ex.label for ex in examples])
    has = labels >= 0
    out = {"n": len(examples)}
    if has.any():
        y, p = labels[has], probs[has]
        targets = F.one_hot(torch.from_numpy(y), p.shape[1]).float()
        logp = torch.from_numpy(np.log(np.clip(p, 1e-12, 1.0)))
        out["ce"] = float(soft_cross_entropy(logp, targets, class_weights, cfg.loss.label_smoothing))
        pred = p.argmax(1)
        classes = list(cfg.model.classes)
        gold, guess = [classes[c] for c in y], [classes[c] for c in pred]
        out["uar"] = uar(gold, guess, classes)
        out["accuracy"] = float((pred == y).mean())
        out["recall"] = {classes[c]: float((pred[y == c] == c).mean()) for c in np.unique(y)}
    for j, name in enumerate(cfg.model.dimensions):  # each dimension over the clips that carry it
        rated = [k for k, ex in enumerate(examples) if ex.dims is not None and ex.dims[j] is not None]
        if len(rated) >= 2:
            t = torch.tensor([[examples[k].dims[j]] for k in rated])
            out.setdefault("ccc", {})[name] = float(1 - ccc_loss(torch.from_numpy(dims[rated, j : j + 1]), t))
    return out


def evaluate_split(
    models: list[SERModel],
    dataset,
    cfg: TrainConfig,
    device: torch.device,
    dist: Dist,
    batch_size: int,
    class_weights: Tensor | None,
) -> dict:
    """`score_outputs` of `models` (averaged as an ensemble) on one dev or test dataset."""
    probs, scores, indices = split_outputs(models, dataset, cfg, device, dist, batch_size)
    return score_outputs(probs, scores, indices, dataset.examples, cfg, class_weights)
