"""The linear head (`SERConfig.linear_head`), fitted once after the network is trained.

A logistic regression on each training clip's layer statistics (`SERModel.clip_statistics`: every
layer, layer-normed, its mean and std over the whole clip), as benchmarks/probes.py fits its probe:
standardised features, balanced class weights, L2 with C = `select.linear_head_c`, its logits divided
by `select.linear_head_temperature` (benchmarks/loco.py chooses it on held-out corpora). The model carries
the scaler and the weights (`model.LinearHead`), and its class probabilities become the weighted mean
of the network's and this head's (`model.linear_weight`). The network's training is not changed by it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch

from serval.features import one_blas_thread
from serval.model import LinearHead, SERModel
from serval.train.config import TrainConfig
from serval.train.data import CachedDataset, ClipDataset, collate
from serval.train.network import model_inputs

log = logging.getLogger("serval.train")
ABSENT_BIAS = -1e4  # a class no training clip has: the linear head gives it no probability


def clean(dataset) -> CachedDataset | ClipDataset:
    """The same clips whole, unaugmented: what the head is fitted on and what inference sees."""
    if isinstance(dataset, CachedDataset):
        return CachedDataset(dataset.examples, dataset.keys, dataset.cache, dataset.cfg, train=False)
    return ClipDataset(dataset.examples, dataset.cfg, train=False)


@torch.no_grad()
def statistics(
    model: SERModel, dataset, device: torch.device, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(layer statistics [N, n], class index [N]) of the labelled clips of `dataset` that load, in its order."""
    cached = isinstance(dataset, CachedDataset)
    labelled = [i for i, ex in enumerate(dataset.examples) if ex.label >= 0]
    model.eval()
    out, labels = [], []
    for s in range(0, len(labelled), batch_size):
        batch = collate([dataset[i] for i in labelled[s : s + batch_size]])
        if batch is None:  # every clip of the batch failed to load (named in the log)
            continue
        x, n = model_inputs(batch, model, cached, device)
        layers, lengths = (model.refresh_top(x, n), n) if cached else model.encode(x, n)
        out.append(model.clip_statistics(layers, lengths).cpu().numpy())
        labels += [dataset.examples[int(i)].label for i in batch["index"]]  # the clips that loaded
    return (np.concatenate(out) if out else np.zeros((0, 0), np.float32)), np.array(labels)


def fit_logistic(x: np.ndarray, y: Sequence, c: float = 1.0, sample_weight: np.ndarray | None = None):
    """A standardised, class-balanced L2 logistic regression of `y` on `x` (a scikit-learn pipeline):
    the linear head's, and every probe's in benchmarks/. Fitted on one BLAS thread, because lbfgs stops
    on a flat optimum at a point that the order of its sums moves, and the thread count changes that
    order (1 or 2 threads moved one LOCO fold's probe by 1.2 UAR points): so the same clips give the
    same head on any number of cores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced"))
    with one_blas_thread():
        return clf.fit(x, y, logisticregression__sample_weight=sample_weight)


def fit_linear_head(
    model: SERModel, dataset, cfg: TrainConfig, device: torch.device, batch_size: int
) -> SERModel:
    """`model` with a fitted linear head beside its network (in place), from the clips of `dataset`."""
    dataclasses.replace(model.config, linear_head=True).check()  # the model it makes must be a valid one
    x, y = statistics(model, clean(dataset), device, batch_size)
    if len(set(y.tolist())) < 2:
        raise ValueError(
            f"select.linear_head: the training clips have {len(set(y.tolist()))} class(es), need 2"
        )
    fitted = fit_logistic(x, y, cfg.select.linear_head_c)
    scaler, clf = fitted[0], fitted[-1]
    coef = clf.coef_ if len(clf.classes_) > 2 else np.concatenate([-clf.coef_, clf.coef_]) / 2
    bias = clf.intercept_ if len(clf.classes_) > 2 else np.concatenate([-clf.intercept_, clf.intercept_]) / 2
    weight = np.zeros((len(model.config.classes), x.shape[1]))
    full_bias = np.full(len(model.config.classes), ABSENT_BIAS)
    t = cfg.select.linear_head_temperature  # folded into the weights: the model computes logits / t
    weight[clf.classes_], full_bias[clf.classes_] = coef / t, bias / t
    model.config = dataclasses.replace(model.config, linear_head=True)
    head = model.linear_head = LinearHead(model.config).to(device)
    for name, value in (
        ("center", scaler.mean_),
        ("inv_scale", 1 / scaler.scale_),
        ("weight", weight),
        ("bias", full_bias),
    ):
        getattr(head, name).copy_(torch.from_numpy(np.asarray(value)))
    log.info(
        "linear head fitted on %d training clips (%d classes, train accuracy %.3f)",
        len(y), len(clf.classes_), fitted.score(x, y),
    )  # fmt: skip
    return model.eval()
