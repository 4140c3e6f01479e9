"""The training loop: `train(cfg)` sets a run up, restores it when there is a checkpoint, runs its
epochs (each one optimizer step at a time, then a dev evaluation and a checkpoint) and finishes it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from serval.model import SERConfig, SERModel
from serval.progress import progress_bar
from serval.train.augment import NoiseBank, mixup, seeded_rng
from serval.train.checkpoint import load_trainer_state, set_rng_state
from serval.train.config import TrainConfig
from serval.train.data import (
    CachedDataset,
    ClipDataset,
    Example,
    balance_weights,
    collate,
    prepare_cache,
    read_split,
)
from serval.train.ddp import (
    Dist,
    barrier,
    gather_objects,
    gather_tensor,
    gather_with_grad,
    pad_rows,
    setup_distributed,
)
from serval.train.folder import MetricsLog, Run, RunState
from serval.train.losses import class_weights_for, total_loss
from serval.train.network import autocast, build, model_inputs, wrap_forward
from serval.train.optim import make_optimizer
from serval.train.sampler import BucketBatchSampler
from serval.train.scoring import evaluate_split
from serval.train.select import finish, select_after_epoch
from serval.training_data import make_record, merge_records, record_of_spec

log = logging.getLogger("serval.train")


@dataclass
class Training:
    """What a run holds while it trains: built once by `train`, read and advanced by each step."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    model: SERModel
    run: Run
    datasets: dict
    class_weights: Tensor | None
    sampler: BucketBatchSampler
    micro: int  # clips per rank and accumulation step
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    forward: nn.Module
    trainable: list  # the parameters the optimizer moves, for gradient clipping
    state: RunState
    metrics: MetricsLog
    started: float

    @property
    def cached(self) -> bool:
        return self.cfg.mode == "frozen_cached"

    def checkpoint(self) -> None:
        self.run.checkpoint(self.model, self.optimizer, self.scheduler, self.state, len(self.sampler))


def setup(cfg: TrainConfig) -> tuple[TrainConfig, Dist, torch.device, SERModel]:
    """Join the ranks and build the model: (cfg resolved by the model, dist, device, model)."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist, device = setup_distributed(cfg.device)
    # Identical initial weights on every rank: the same seed before the model is built.
    torch.manual_seed(cfg.seed)
    cfg, model = build(cfg)  # resolved: dims from the backbone or init_from
    return cfg, dist, device, model


def claim_folder(cfg: TrainConfig, dist: Dist, overwrite: bool = False) -> tuple[Run, Path | None]:
    """The run's output folder, checked (or cleared, with `overwrite`), and the checkpoint to resume from."""
    run = Run(cfg, dist)
    # Rank 0 alone checks the folder (no race with its own writes) and tells the others.
    decision: tuple = (None, None)
    if dist.main:
        try:
            decision = (run.prepare(overwrite), None)
        except ValueError as e:
            decision = (None, str(e))
    resume_from, error = gather_objects(decision, dist)[0]
    if error:
        raise ValueError(error)
    return run, resume_from


def load_splits(cfg: TrainConfig, model_cfg: SERConfig) -> dict[str, list[Example]]:
    """The checked examples of train, and of dev and test when the config names them."""
    splits = {"train": read_split(cfg.data.train, cfg.data.train_split, model_cfg)}
    if cfg.data.dev:
        splits["dev"] = read_split(cfg.data.dev, cfg.data.dev_split, model_cfg)
    if cfg.data.test:
        splits["test"] = read_split(cfg.data.test, cfg.data.test_split, model_cfg)
    return splits


def trained_dimensions(cfg: TrainConfig, train: list[Example]) -> tuple[str, ...]:
    """The dimensions this run trains: those with a value in any training clip (and a CCC term), plus
    those the starting model (`init_from`) was trained on."""
    names = cfg.model.dimensions
    have = {n for ex in train if ex.dims is not None for n, v in zip(names, ex.dims) if v is not None}
    if not cfg.loss.ccc_weight:
        have = set()
    before = set(cfg.model.trained_dimensions) if cfg.init_from else set()
    return tuple(n for n in names if n in have | before)


def make_datasets(
    cfg: TrainConfig, splits: dict[str, list[Example]], model: SERModel, dist: Dist, device: torch.device
) -> dict:
    """One dataset per split: cached encoder outputs (encoded now if missing) or waveforms."""
    if cfg.mode == "frozen_cached":
        cache, keys, encoded = prepare_cache(model, splits, cfg, dist, device)
        if dist.main:
            total = len({k for split in keys.values() for ks in split for k in ks})
            log.info(
                "encoder cache %s: %d encoded now, %d reused (clips and augmented copies)",
                cache.root,
                encoded,
                total - encoded,
            )
        return {s: CachedDataset(ex, keys[s], cache, cfg, train=s == "train") for s, ex in splits.items()}
    noise = NoiseBank(cfg.augment.noise_dir) if cfg.augment.noise_dir else None
    return {s: ClipDataset(ex, cfg, train=s == "train", noise=noise) for s, ex in splits.items()}


def make_sampler(cfg: TrainConfig, train_set, dist: Dist) -> tuple[BucketBatchSampler, int]:
    """The global-batch sampler of the training set and the micro-batch size of one rank and step."""
    world, accum = dist.world, cfg.optim.grad_accum
    if cfg.optim.batch_size % (world * accum):
        raise ValueError(
            f"optim.batch_size {cfg.optim.batch_size} is not divisible by "
            f"{world} devices x {accum} accumulation steps"
        )
    seconds = [min(ex.duration, cfg.data.max_seconds) for ex in train_set.examples]
    if cfg.mode == "frozen_cached" and cfg.augment.crop_seconds:
        seconds = [min(s, cfg.augment.crop_seconds) for s in seconds]
    weights = balance_weights(train_set.examples, cfg.data.balance, cfg.data.balance_power)
    sampler = BucketBatchSampler(seconds, cfg.optim.batch_size, cfg.seed, weights=weights)
    if len(sampler) == 0:
        raise ValueError(
            f"{cfg.data.train}: {len(seconds)} clips are fewer than one batch of {cfg.optim.batch_size}"
        )
    return sampler, cfg.optim.batch_size // (world * accum)


def restore(
    resume_from: Path | None, model: SERModel, optimizer, scheduler, dist: Dist, seed: int
) -> RunState:
    """The run state of checkpoint `resume_from`, its weights, optimizer, scheduler and this rank's RNG
    states loaded; without one, a fresh state and the dropout seed of this rank."""
    if resume_from is None:
        torch.manual_seed(seed + dist.rank)  # dropout differs per rank
        return RunState()
    try:
        saved = load_trainer_state(resume_from)
    except ValueError as e:
        raise ValueError(f"{e}; pass --overwrite to start the run again") from None
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(resume_from / "model.safetensors")), strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = RunState(**saved["run"])
    set_rng_state(saved["rng"][min(dist.rank, len(saved["rng"]) - 1)])
    if dist.main:
        log.info(
            "resuming from %s (step %d, epoch %d, batch %d)",
            resume_from,
            state.step,
            state.epoch,
            state.position,
        )
    return state


def train_step(t: Training, batches) -> np.ndarray:
    """One optimizer step over `grad_accum` micro-batches drawn from `batches`; returns each
    micro-batch's (loss, CE, CCC) / grad_accum, `[grad_accum, 3]`."""
    cfg, dist, accum = t.cfg, t.dist, t.cfg.optim.grad_accum
    parts = np.zeros((accum, 3))
    t.optimizer.zero_grad(set_to_none=True)
    for a in range(accum):
        batch = next(batches)
        if batch is None:
            raise RuntimeError(
                f"every clip of a batch failed to load at step {t.state.step}; see the warnings"
            )
        if cfg.augment.mixup_prob > 0:
            rng = seeded_rng(cfg.seed, 4, t.state.step, dist.rank, a)
            if rng.random() < cfg.augment.mixup_prob:
                lam = float(rng.beta(cfg.augment.mixup_alpha, cfg.augment.mixup_alpha))
                batch = mixup(batch, lam, torch.from_numpy(rng.permutation(len(batch["index"]))))
        x, n = model_inputs(batch, t.model, t.cached, t.device)
        sync = a == accum - 1 or dist.world == 1
        with contextlib.nullcontext() if sync else t.forward.no_sync(), autocast(cfg, t.device):
            logits, scores = t.forward(x, n)
            local = {k: batch[k].to(t.device) for k in ("targets", "dims", "dims_mask")}
            if dist.world > 1 and len(logits) < t.micro:  # a clip failed to load: equal pieces for the gather
                logits, scores = pad_rows(logits.float(), t.micro), pad_rows(scores.float(), t.micro)
                local = {k: pad_rows(v, t.micro) for k, v in local.items()}  # zero rows count for nothing
            # The loss of the whole (all-rank) micro-batch: CCC is a batch statistic, so the pieces
            # are gathered; DDP's gradient mean over ranks then equals one device's gradient.
            loss, ce, ccc = total_loss(
                gather_with_grad(logits.float(), dist),
                gather_with_grad(scores.float(), dist),
                {k: gather_tensor(v, dist) for k, v in local.items()},
                cfg.loss,
                t.class_weights,
            )
            (loss / accum).backward()
        parts[a] = np.array([loss.item(), ce.item(), ccc.item()]) / accum
    if cfg.optim.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(t.trainable, cfg.optim.max_grad_norm)
    t.optimizer.step()
    t.scheduler.step()
    return parts


def run_epoch(t: Training) -> None:
    """The rest of epoch `t.state.epoch`: its remaining steps, logged, with mid-epoch checkpoints."""
    cfg, state = t.cfg, t.state
    batches = t.sampler.batches(state.epoch)
    work = [
        [(i, state.epoch) for i in mb]
        for b in batches[state.position :]
        for mb in BucketBatchSampler.shard(b, t.dist.rank, t.dist.world, cfg.optim.grad_accum)
    ]
    # An own generator: a DataLoader would otherwise draw from the global RNG, and a resumed run
    # (new loader mid-epoch) would then see other dropout masks than an uninterrupted one.
    loader = torch.utils.data.DataLoader(
        t.datasets["train"],
        batch_sampler=work,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed + state.epoch),
    )
    bar = _epoch_bar(t, len(batches))
    t.forward.train()
    sums, count = np.zeros(3), 0
    loader_iter = iter(loader)
    for _ in range(len(batches) - state.position):
        for part in train_step(t, loader_iter):  # one by one: the sums add up as they always have
            sums += part
        state.step += 1
        state.position += 1
        count += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sums[0] / count:.3f}")
        if state.step % cfg.log_every == 0 or state.position == len(batches):
            _log_train(t, sums / count)
            sums, count = np.zeros(3), 0
        every = cfg.select.checkpoint_every
        if every and state.step % every == 0 and state.position < len(batches):
            t.checkpoint()
    if bar is not None:
        bar.close()


def _epoch_bar(t: Training, total: int):
    return progress_bar(
        enabled=t.cfg.progress and t.dist.main,
        total=total,
        initial=t.state.position,
        desc=f"epoch {t.state.epoch + 1}/{t.cfg.optim.epochs}",
        unit="step",
        leave=False,
    )


def _log_train(t: Training, means: np.ndarray) -> None:
    lrs = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
    t.metrics.write(
        step=t.state.step,
        epoch=t.state.epoch + 1,
        split="train",
        loss=means[0],
        ce=means[1],
        ccc=means[2],
        lr_lora=lrs.get("lora"),
        lr_head=lrs["head"],
        seconds=round(time.time() - t.started, 1),
    )


def end_epoch(t: Training) -> None:
    """Count the epoch, evaluate dev, rank the checkpoint by `select.metric` (dev categorical loss or
    minus dev UAR: lower is better either way), maybe stop; save."""
    t.state.epoch += 1
    t.state.position = 0
    dev_loss = None
    if "dev" in t.datasets:
        dev = evaluate_split([t.model], t.datasets["dev"], t.cfg, t.device, t.dist, t.micro, t.class_weights)
        dev_loss = dev.get("ce", math.inf)
        if t.cfg.select.metric == "uar":
            dev_loss = -dev.get("uar", -math.inf)
        t.metrics.write(
            step=t.state.step,
            epoch=t.state.epoch,
            split="dev",
            ce=dev.get("ce"),
            uar=dev.get("uar"),
            seconds=round(time.time() - t.started, 1),
        )
        if t.dist.main:
            log.info(
                "epoch %d: dev categorical loss %.4f, UAR %.4f",
                t.state.epoch,
                dev.get("ce", math.nan),
                dev.get("uar", math.nan),
            )
    after = select_after_epoch(t.state, dev_loss, t.cfg.select)
    if after.stopped and not t.state.stopped and t.dist.main:
        log.info("early stop: no better dev loss for %d epochs", after.bad_epochs)
    t.state = after
    t.checkpoint()


def train(cfg: TrainConfig, overwrite: bool = False) -> Path:
    """Run (or resume) the training `cfg` describes; returns the final model folder `<out_dir>/best`.

    `overwrite`: delete a run already in `out_dir` and start again (its encoder cache stays).
    """
    cfg, dist, device, model = setup(cfg)
    splits = load_splits(cfg, model.config)  # bad data stops the run before its folder is touched
    run, resume_from = claim_folder(cfg, dist, overwrite)
    run.training_data = merge_records(
        make_record([ex.clip for ex in splits["train"]], [ex.clip for ex in splits.get("dev", ())]),
        record_of_spec(cfg.init_from) if cfg.init_from else None,
    )
    model.config = dataclasses.replace(
        model.config, trained_dimensions=trained_dimensions(cfg, splits["train"])
    )
    balance = balance_weights(splits["train"], cfg.data.balance, cfg.data.balance_power)
    class_weights = class_weights_for(
        cfg.loss, [ex.label for ex in splits["train"]], len(model.config.classes), balance
    )
    datasets = make_datasets(cfg, splits, model, dist, device)
    sampler, micro = make_sampler(cfg, datasets["train"], dist)
    model.to(device)
    optimizer, scheduler = make_optimizer(model, cfg.optim, cfg.optim.epochs * len(sampler))
    forward = wrap_forward(model, cfg.mode == "frozen_cached", dist, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = restore(resume_from, model, optimizer, scheduler, dist, cfg.seed)
    metrics = MetricsLog(run.out, dist.main, cfg.tensorboard, state.step if resume_from else None)
    t = Training(
        cfg, dist, device, model, run, datasets, class_weights, sampler, micro,
        optimizer, scheduler, forward, trainable, state, metrics, started=time.time(),
    )  # fmt: skip
    while t.state.epoch < cfg.optim.epochs and not t.state.stopped:
        run_epoch(t)
        end_epoch(t)
    if dist.main:
        finish(run, t.state, model, datasets, cfg, device, class_weights, micro)
    barrier(dist)
    metrics.close()
    return run.out / "best"
