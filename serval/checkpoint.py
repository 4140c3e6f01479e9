"""A serval model directory: `config.json` (the `SERConfig`) beside `model.safetensors`, and the
files that let transformers and the Hub read it (`preprocessor_config.json`, a `README.md` card).

Saving keeps the Whisper backbone or, without it, only the trained tensors (downstream, heads,
LoRA), in which case loading rebuilds the encoder from `config.backbone`. The network
(`serval.model`) knows nothing of files; this module and `serval.backbones` do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from serval.atomic import atomic_write
from serval.backbones import load_whisper_encoder
from serval.hub import ARCHITECTURE, HF_CONFIG_KEYS, MODEL_TYPE, write_hf_files
from serval.model import SERConfig, SERModel, merge_lora_state_dict
from serval.training_data import KEY as TRAINING_DATA
from serval.version import __version__

FORMAT = "serval"  # the "format" key of a serval config.json; a checkpoint without it is foreign


def model_from_backbone(config: SERConfig) -> SERModel:
    """A new model whose encoder weights come from `config.backbone`; the rest random."""
    if not config.backbone:
        raise ValueError("config.backbone is empty: nothing to load the Whisper weights from")
    dims, state = load_whisper_encoder(config.backbone)
    for key, value in dims.items():
        if hasattr(config, key) and getattr(config, key) != value:
            setattr(config, key, value)
    model = SERModel(config)
    model.load_backbone_state(state)
    return model


def save_model(
    model: SERModel,
    directory: str | os.PathLike,
    include_backbone: bool = True,
    training_data: dict | None = None,
) -> Path:
    """Write `config.json` + `model.safetensors` (+ `preprocessor_config.json` and a `README.md` model
    card for Hugging Face, `serval.hub`); without the backbone only trained tensors are kept.
    `training_data`: the corpora and speakers it was trained on (`serval.training_data`), kept in config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if not include_backbone:
        if not model.config.backbone:
            raise ValueError(
                "include_backbone=False needs config.backbone to say where the encoder comes from"
            )
        state = {k: v for k, v in state.items() if not _is_backbone(k)}
    # model_type and architectures let transformers' Auto classes read the folder (serval.hf)
    meta = {
        "format": FORMAT,
        "serval_version": __version__,
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        **model.config.to_dict(),
        **({TRAINING_DATA: training_data} if training_data else {}),
    }
    atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    atomic_write(directory / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_hf_files(directory, model.config.to_dict())  # preprocessor_config.json and the README card
    return directory


def is_serval_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory whose config.json says it was written by `save_model`."""
    config_file = Path(path) / "config.json"
    return config_file.is_file() and json.loads(config_file.read_text()).get("format") == FORMAT


def load_model(directory: str | os.PathLike, fold_lora: bool = False, **overrides) -> SERModel:
    """A model saved by `save_model` (`overrides` set config fields), in eval mode.

    `fold_lora`: LoRA adapters folded into their weights, giving the published layout without peft
    (what inference runs). The encoder then differs from `config.backbone`, so the config names
    none: saved again, the model keeps its encoder whole.
    """
    path = Path(directory)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is this a serval model directory?)")
    meta = json.loads(config_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a serval model directory (for a MERaLiON-SER checkpoint use meralion:{path})"
        )
    meta = {k: v for k, v in meta.items() if k not in (*HF_CONFIG_KEYS, TRAINING_DATA)}
    config = SERConfig.from_dict({**meta, **overrides}, source=str(config_file))
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors")
    state = load_file(str(weights))
    scaling = config.lora_alpha / config.lora_r if config.lora_r else 1.0
    if fold_lora and config.lora_r:
        config = dataclasses.replace(config, lora_r=0, lora_layers=0)
    has_backbone = any(k.startswith("whisper.") and "lora_" not in k for k in state)
    model = SERModel(config) if has_backbone else model_from_backbone(config)
    if fold_lora and any("lora_" in k for k in state):
        state = merge_lora_state_dict(state, scaling, base=model.state_dict())
        model.config.backbone = None
    _check_names(state, model.state_dict(), has_backbone, weights)
    model.load_state_dict(state, strict=False)
    return model.eval()


def _is_backbone(name: str) -> bool:
    return name.startswith("whisper.") and "lora_" not in name


def _check_names(state: dict[str, Tensor], own: dict[str, Tensor], has_backbone: bool, weights: Path) -> None:
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and (has_backbone or not _is_backbone(k)))
    if unexpected or missing:
        raise KeyError(f"{weights}: unexpected tensors {unexpected[:10]}; missing tensors {missing[:10]}")
