"""What a checkpoint holds: the trained tensors, the trainer state (optimizer, scheduler, run
position, RNG states) to resume from, and the weight average of several checkpoints."""

from __future__ import annotations

import dataclasses
import random
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

from serval import checkpoint as model_dir
from serval.model import SERModel

TRAINER_STATE = "trainer_state.pt"


def save_model(model: SERModel, directory: Path) -> None:
    """The model's files in `directory`; without a backbone source the encoder travels with the weights."""
    model_dir.save_model(model, directory, include_backbone=not model.config.backbone)


def load_checkpoint(model: SERModel, directory: Path) -> SERModel:
    """A copy of `model` with the trained tensors of checkpoint `directory` (the backbone is shared, not reloaded)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / "model.safetensors"))
    copy = deepcopy(model)
    own = copy.state_dict()
    wrong = sorted(k for k in state if k not in own)
    if wrong:
        raise KeyError(f"{directory}: tensors that do not fit the model: {wrong[:5]}")
    copy.load_state_dict(state, strict=False)
    return copy.eval()


def average_models(models: list[SERModel]) -> SERModel:
    """One model whose tensors are the means of `models`' (LoRA merged first, so the mean is exact)."""
    states = [m.merged_state_dict() for m in models]
    mean = {}
    for k, first in states[0].items():
        same = all(torch.equal(first, s[k]) for s in states[1:])  # frozen tensors stay bit-exact
        mean[k] = first if same else (sum(s[k].float() for s in states) / len(states)).to(first.dtype)
    lora = models[0].config.lora_r > 0
    config = dataclasses.replace(models[0].config, lora_r=0)
    if lora:  # the merged encoder differs from the backbone, so it is saved whole
        config.backbone = None
    model = SERModel(config).to(next(iter(mean.values())).device)
    model.load_state_dict(mean)
    return model.eval()


def save_trainer_state(trainer_state: dict, directory: Path) -> None:
    """Write the trainer state of a checkpoint into `directory`."""
    torch.save(trainer_state, Path(directory) / TRAINER_STATE)


def load_trainer_state(directory: Path) -> dict:
    """The trainer state `save_trainer_state` wrote into `directory`."""
    return torch.load(Path(directory) / TRAINER_STATE, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    """This process's Python, numpy, torch (and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
