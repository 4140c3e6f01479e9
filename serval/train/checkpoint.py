"""What a checkpoint holds: the trained tensors, the trainer state (optimizer, scheduler, run
position, RNG states) to resume from, and the weight average of several checkpoints.

The trainer state is stored without pickle, so that resuming from a folder someone else wrote
cannot run code: its tensors (optimizer moments, RNG states as bytes) go into a safetensors
file, everything else (numbers, strings, the history) into JSON beside it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

from serval import checkpoint as model_dir
from serval.model import SERModel

TRAINER_STATE = "trainer_state.json"  # the JSON half; its tensors are in TRAINER_TENSORS
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_FILES = (TRAINER_STATE, TRAINER_TENSORS)
OLD_TRAINER_STATE = "trainer_state.pt"  # pickled, by earlier serval versions: refused
FORMAT = "serval-trainer-state"


def save_model(model: SERModel, directory: Path, training_data: dict | None = None) -> None:
    """The model's files in `directory`; without a backbone source the encoder travels with the weights.
    `training_data`: the corpora and speakers of the run (`serval.training_data`), kept in config.json."""
    model_dir.save_model(
        model, directory, include_backbone=not model.config.backbone, training_data=training_data
    )


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
    """One model whose tensors are the means of `models'` (one run's checkpoints, so one layout).

    LoRA adapters are not averaged factor by factor (the mean of products is not the product of
    means): the k adapters of a weight become one of rank k*r, A stacked and B stacked and divided
    by k, whose product is exactly the mean of the k updates. The backbone stays referenced.
    """
    k, cfg = len(models), models[0].config
    states = [m.state_dict() for m in models]
    mean = {}
    for name, first in states[0].items():
        if ".lora_A." in name:
            mean[name] = torch.cat([s[name] for s in states], dim=0)
        elif ".lora_B." in name:
            mean[name] = torch.cat([s[name] for s in states], dim=1) / k
        elif all(torch.equal(first, s[name]) for s in states[1:]):  # frozen tensors stay bit-exact
            mean[name] = first
        else:
            mean[name] = (sum(s[name].float() for s in states) / k).to(first.dtype)
    config = (
        dataclasses.replace(cfg, lora_r=cfg.lora_r * k, lora_alpha=cfg.lora_alpha * k) if cfg.lora_r else cfg
    )
    model = SERModel(config).to(next(iter(mean.values())).device)
    model.load_state_dict(mean)
    return model.eval()


def save_trainer_state(trainer_state: dict, directory: Path) -> None:
    """Write the trainer state of a checkpoint into `directory` as JSON plus safetensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(trainer_state, tensors)
    save_file(tensors, str(Path(directory) / TRAINER_TENSORS))
    text = json.dumps({"format": FORMAT, "version": 1, "state": tree}, indent=1)
    (Path(directory) / TRAINER_STATE).write_text(text + "\n")


def load_trainer_state(directory: Path) -> dict:
    """The trainer state `save_trainer_state` wrote into `directory`; ValueError names a file that
    is missing, damaged or of another format (nothing in it is ever executed)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta, data = directory / TRAINER_STATE, directory / TRAINER_TENSORS
    if not meta.is_file() and (directory / OLD_TRAINER_STATE).is_file():
        raise ValueError(old_format_message(directory))
    try:
        head = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta}: not a readable trainer state ({e})") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT or head.get("version") != 1:
        raise ValueError(f"{meta}: not a serval trainer state (format {FORMAT}, version 1)")
    try:
        tensors = load_file(str(data))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{data}: not a readable safetensors file ({e})") from None
    try:
        return _decode(head["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta}: damaged trainer state ({e})") from None


def old_format_message(directory: Path) -> str:
    """Why the pickled trainer state of `directory` is not read."""
    return (
        f"{Path(directory) / OLD_TRAINER_STATE}: a pickled trainer state of an older serval, which is no "
        "longer read because unpickling can run code; start the run again in a new out_dir"
    )


def _encode(x, tensors: dict):
    """`x` as JSON-able values; tensors and arrays are moved into `tensors` and named in their place."""
    if isinstance(x, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = x.detach().cpu().contiguous().clone()
        return {"$tensor": key}
    if isinstance(x, np.ndarray):  # numpy's RNG key: kept as its bytes, dtype and shape
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(np.uint8).copy())
        return {"$ndarray": key, "dtype": x.dtype.str, "shape": list(x.shape)}
    if isinstance(x, tuple):
        return {"$tuple": [_encode(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_encode(v, tensors) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _encode(v, tensors) for k, v in x.items()}
        return {"$items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in x.items()]}  # int keys
    if x is None or isinstance(x, bool | int | float | str):
        return x
    raise TypeError(f"a trainer state cannot hold {type(x).__name__}")


def _decode(x, tensors: dict):
    """The inverse of `_encode`: only plain values, tuples, dicts, tensors and arrays come out."""
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"unexpected {type(x).__name__}")
    if "$tensor" in x:
        return tensors[x["$tensor"]]
    if "$ndarray" in x:
        raw = tensors[x["$ndarray"]].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(x["dtype"])).reshape(x["shape"]).copy()
    if "$tuple" in x:
        return tuple(_decode(v, tensors) for v in x["$tuple"])
    if "$items" in x:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in x["$items"]}
    return {k: _decode(v, tensors) for k, v in x.items()}


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
