"""The model being trained: built from a backbone or a checkpoint, fed, and run under autocast."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from torch import Tensor, nn

from serval.checkpoint import model_from_backbone
from serval.model import SERModel
from serval.train.config import TrainConfig
from serval.train.ddp import Dist

log = logging.getLogger("serval.train")


def build_model(cfg: TrainConfig) -> SERModel:
    """The model to train: from `init_from`, from `model.backbone`, or random (tests only)."""
    model_cfg = own_names(cfg, dataclasses.replace(cfg.model))
    if cfg.init_from:
        model = start_from(cfg)
    else:
        if model_cfg.backbone:
            model = model_from_backbone(model_cfg)
        else:
            log.warning("model.backbone is empty: the Whisper encoder is random (only useful for tests)")
            model = SERModel(model_cfg)
        if cfg.zero_init_residual:
            zero_init_residual(model)
    model.freeze_backbone()
    for p in model.lora_parameters():
        p.requires_grad_(True)
    return model


def own_names(cfg: TrainConfig, model_cfg):
    """`model_cfg` with the config's `labels` and `dimensions` where it gives them; the trained
    dimensions are kept only where the model still has them."""
    if cfg.labels:
        model_cfg.classes = tuple(cfg.labels)
    if cfg.dimensions is not None:
        model_cfg.dimensions = tuple(cfg.dimensions)
        model_cfg.trained_dimensions = tuple(d for d in model_cfg.trained_dimensions if d in cfg.dimensions)
    return model_cfg


# The output layers whose rows are classes (dimensions): rows are matched by name, not by position.
HEAD_ROWS = {"emotion_classification_layer.2.": "classes", "dim_layer.3.": "dimensions"}


def start_from(cfg: TrainConfig) -> SERModel:
    """A model built from `init_from` (any model spec: serval dir, "default", MERaLiON checkpoint, Hub id):
    its encoder (adapters merged) and network; `labels` that it shares by name keep their classifier rows."""
    from serval.inference import load

    start = load(cfg.init_from, device="cpu").model
    # Training choices come from this config; the architecture comes from the checkpoint.
    keep = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_layers", "gradient_checkpointing", "proj_dropout",
            "layer_stats_dropout", "ecapa_drop",
            "embed_dropouts", "linear_weight")  # fmt: skip
    model_cfg = own_names(cfg, dataclasses.replace(start.config, **{k: getattr(cfg.model, k) for k in keep}))
    # a fitted linear head is not trained on; select.linear_head fits a new one at the end, and its
    # share (linear_weight, kept above) is this run's choice: the default model's 1 suits its 8 corpora
    model_cfg.linear_head = False
    model = SERModel(model_cfg)
    merged = {k: v for k, v in start.merged_state_dict().items() if not k.startswith("linear_head.")}
    prefix = "whisper.encoder."
    model.load_backbone_state({k[len(prefix) :]: v for k, v in merged.items() if k.startswith(prefix)})
    rest = {k: v for k, v in merged.items() if not k.startswith("whisper.")}
    rest = match_rows(rest, model, start.config)
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected or any(not k.startswith("whisper.") for k in missing):
        raise KeyError(f"{cfg.init_from}: does not fit the model (unexpected {unexpected[:5]})")
    shared = [c for c in model_cfg.classes if c in start.config.classes]
    new = [c for c in model_cfg.classes if c not in start.config.classes]
    log.info(
        "init from %s: classifier rows kept for %s; new, initialised fresh: %s",
        cfg.init_from, ", ".join(shared) or "none", ", ".join(new) or "none",
    )  # fmt: skip
    return model


def match_rows(state: dict[str, Tensor], model: SERModel, start_cfg) -> dict[str, Tensor]:
    """`state` with each output layer's rows moved to the new model's order of names; a name the
    start model lacks keeps the new model's fresh initialisation."""
    own = model.state_dict()
    out = dict(state)
    for prefix, field in HEAD_ROWS.items():
        before, after = list(getattr(start_cfg, field)), list(getattr(model.config, field))
        if before == after:
            continue
        for part in ("weight", "bias"):
            key = prefix + part
            rows = own[key].clone()
            for i, name in enumerate(after):
                if name in before:
                    rows[i] = state[key][before.index(name)]
            out[key] = rows
    return out


def build(cfg: TrainConfig) -> tuple[TrainConfig, SERModel]:
    """The model to train, and `cfg` with the model settings it was built with: the encoder's sizes come
    from the backbone (or the `init_from` model), never from the defaults (what `--print-config` shows)."""
    model = build_model(cfg)
    return dataclasses.replace(cfg, model=model.config), model


def zero_init_residual(model: SERModel) -> None:
    """Zero the scale of the last GroupNorm of every SE-Res2 block, so each block starts as the identity.

    From scratch, the downstream network otherwise sits on a long loss plateau (on frozen whisper-base
    outputs of 64 RAVDESS clips: CE 1.59 after 60 full-batch steps, against 0.20 with this; Goyal et
    al. 2017 do the same for ResNets). Only the initial values change, not the architecture.
    """
    with torch.no_grad():
        for block in model.downstream_model.blocks:
            block.norm2.weight.zero_()


class Forward(nn.Module):
    """What DDP wraps: the full model on log-mel in `lora` mode, the head on cached outputs otherwise."""

    def __init__(self, model: SERModel, cached: bool):
        super().__init__()
        self.model, self.cached = model, cached

    def forward(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        out = self.model.cached_forward(x, lengths) if self.cached else self.model(x, lengths)
        return out.logits, out.scores


def wrap_forward(model: SERModel, cached: bool, dist: Dist, device: torch.device) -> nn.Module:
    """`Forward`, inside DistributedDataParallel when there are several ranks."""
    forward = Forward(model, cached)
    if dist.world > 1:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    return forward


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when `optim.precision` asks for it (auto: on CUDA), else nothing."""
    bf16 = cfg.optim.precision == "bf16" or (cfg.optim.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def model_inputs(batch: dict, model: SERModel, cached: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """(input, lengths) for `Forward`: log-mel from waveforms, or the cached encoder outputs as they are."""
    if cached:
        return batch["input"].to(device), batch["lengths"].to(device)
    from serval.features import compute_features

    waves = [w[:n] for w, n in zip(batch["input"], batch["lengths"].tolist())]
    cfg = model.config
    feats, frames = compute_features(
        waves, n_mels=cfg.n_mels, pad_to_30s=cfg.pad_to_30s, device=device, gain_invariant=cfg.gain_invariant
    )
    return feats, frames.to(device)
