"""AdamW over the LoRA and downstream parameter groups, with a cosine schedule after a linear warm-up."""

from __future__ import annotations

import math

import torch

from serval.model import SERModel
from serval.train.config import OptimConfig


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over the first warmup_ratio of steps, then cosine decay to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(
    model: SERModel, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a "lora" group (when the model has adapters) before the "head" group, and its schedule."""
    lora, head = model.lora_parameters(), model.downstream_parameters()
    groups = [{"params": head, "lr": cfg.lr_head, "weight_decay": cfg.wd_head, "name": "head"}]
    if lora:
        groups.insert(0, {"params": lora, "lr": cfg.lr_lora, "weight_decay": cfg.wd_lora, "name": "lora"})
    optimizer = torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, cfg.warmup_ratio)
    )
    return optimizer, scheduler
