"""Checkpoint selection: the decision after each epoch (best checkpoints, early stop), and the final
model made of the best checkpoints (their averaged predictions or their averaged weights)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import torch
import yaml

from serval.atomic import atomic_write_text, replace_dir
from serval.model import SERModel
from serval.train.checkpoint import (
    OLD_TRAINER_STATE,
    TRAINER_FILES,
    average_models,
    load_checkpoint,
    save_model,
)
from serval.train.config import SelectConfig, TrainConfig
from serval.train.ddp import Dist
from serval.train.folder import Run, RunState, temp_dir
from serval.train.linear_head import fit_linear_head
from serval.train.scoring import evaluate_split

log = logging.getLogger("serval.train")


def select_after_epoch(state: RunState, dev_loss: float | None, select: SelectConfig) -> RunState:
    """The run state after the epoch that `state` has just counted, given that epoch's dev loss.

    Keeps the `keep_best` checkpoints with the lowest dev loss and stops after `patience` epochs
    without a better one. Without a dev set (`dev_loss` None) the last checkpoint is the best. Pure.
    """
    name = f"step-{state.step:06d}"
    if dev_loss is None:
        return dataclasses.replace(state, best=[[0.0, name, state.epoch]])
    best = sorted(state.best + [[dev_loss, name, state.epoch]])[: select.keep_best]
    if dev_loss < state.best_loss:
        return dataclasses.replace(state, best=best, best_loss=dev_loss, bad_epochs=0)
    bad = state.bad_epochs + 1
    return dataclasses.replace(
        state, best=best, bad_epochs=bad, stopped=state.stopped or bad >= select.patience
    )


def choose_combination(average: str, n_members: int, dev_uar: dict[str, float]) -> str:
    """single | predictions | weights: `select.average`, where auto takes the higher dev UAR (ties: weights)."""
    if n_members == 1:
        return "single"
    if average != "auto":
        return average
    if not dev_uar:
        return "predictions"
    return "weights" if dev_uar["weights"] >= dev_uar["predictions"] else "predictions"


def finish(
    run: Run,
    state: RunState,
    model: SERModel,
    datasets: dict,
    cfg: TrainConfig,
    device: torch.device,
    class_weights,
    batch_size: int,
) -> Path:
    """Combine the best checkpoints into `<out>/best` (ensemble or weight average), score dev and test."""
    single = Dist()
    members = [run.ckpts / name for _, name, _ in sorted(state.best)]
    report = {"members": [m.name for m in members], "dev_loss": [b[0] for b in sorted(state.best)]}
    ensemble = [load_checkpoint(model, m) for m in members]
    averaged = average_models(ensemble) if len(members) > 1 else None
    candidates = {}
    if "dev" in datasets and len(members) > 1:
        for kind, models in (("predictions", ensemble), ("weights", [averaged])):
            candidates[kind] = evaluate_split(
                models, datasets["dev"], cfg, device, single, batch_size, class_weights
            )
            report[f"dev_{kind}"] = candidates[kind]
    uars = {k: v.get("uar", -1.0) for k, v in candidates.items()}
    choice = report["chosen"] = choose_combination(cfg.select.average, len(members), uars)

    if choice == "predictions":
        final_models = ensemble
    else:
        final_models = [averaged if choice == "weights" else ensemble[0]]
    if cfg.select.linear_head:
        final_models = [fit_linear_head(m, datasets["train"], cfg, device, batch_size) for m in final_models]
    best = _write_best(run, cfg, choice, members, final_models)

    if "test" in datasets:
        report["test"] = evaluate_split(
            final_models, datasets["test"], cfg, device, single, batch_size, class_weights
        )
        log.info(
            "test UAR %.4f (%s, %d clips)", report["test"].get("uar", math.nan), choice, report["test"]["n"]
        )
    atomic_write_text(run.out / "final.json", json.dumps(report, indent=2) + "\n", overwrite=True)
    log.info("final model (%s of %d checkpoints) in %s", choice, len(members), best)
    return best


def _write_best(run: Run, cfg: TrainConfig, choice: str, members: list[Path], final_models: list) -> Path:
    """`<out>/best`, swapped in whole: the member checkpoints and an ensemble.json, or one model."""
    tmp = temp_dir(run.out, ".tmp-best-")
    if choice == "predictions":
        names = []
        for i, (m, model) in enumerate(zip(members, final_models)):
            if cfg.select.linear_head:  # the checkpoints lack the head fitted since
                save_model(model, tmp / f"member-{i}", run.training_data)
            else:
                ignore = shutil.ignore_patterns(*TRAINER_FILES, OLD_TRAINER_STATE)
                shutil.copytree(m, tmp / f"member-{i}", ignore=ignore)
            names.append(f"member-{i}")
        ensemble = {
            "format": "serval-ensemble",
            "combine": "mean",
            "members": names,
            "checkpoints": [m.name for m in members],
        }
        (tmp / "ensemble.json").write_text(json.dumps(ensemble, indent=2) + "\n")
    else:
        save_model(final_models[0], tmp, run.training_data)
    (tmp / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return replace_dir(tmp, run.out / "best")
