"""Masked operations on padded batches [B, C, T]: each clip's result is what it would be alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[B] lengths -> [B, max_len] bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over time of [B, C, T]; `mask` is [B, T] bool or None (all valid)."""
    if mask is None:
        return x.mean(-1)
    m = mask[:, None, :].to(x.dtype)
    return (x * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def attention_pool(x: Tensor, scorer: nn.Linear, mask: Tensor | None) -> Tensor:
    """Attention pooling of [B, C, T]: a score per frame, softmax over valid time, weighted sum."""
    scores = scorer(x.transpose(1, 2)).squeeze(-1).float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1).to(x.dtype)
    return (x * weights[:, None, :]).sum(-1)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover valid frames only, and whose padded output is zero."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            return super().forward(x)
        b, c, t = x.shape
        m = mask[:, None, None, :].to(x.dtype)
        xg = x.reshape(b, self.num_groups, c // self.num_groups, t)
        n = (m.sum(-1, keepdim=True) * xg.shape[2]).sum(2, keepdim=True).clamp_min(1.0)
        mean = (xg * m).sum((2, 3), keepdim=True) / n
        var = (((xg - mean) ** 2) * m).sum((2, 3), keepdim=True) / n
        y = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape(b, c, t)
        y = y * self.weight[None, :, None] + self.bias[None, :, None]
        return y * mask[:, None, :].to(y.dtype)


def group_norm(channels: int) -> MaskedGroupNorm:
    return MaskedGroupNorm(min(32, channels), channels)


def zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded frames of [B, C, T] so convolutions see what they would see alone."""
    return x if mask is None else x * mask[:, None, :].to(x.dtype)


def halve_time(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Average-pool time by 2; with a mask, average valid frames only and max-pool the mask."""
    if mask is None:
        return F.avg_pool1d(x, 2), None
    # One padded frame, whatever the parity: an even length's last window ignores it and an odd
    # length's last window gets its partner, so no branch depends on the shape (export-clean).
    x, mask = F.pad(x, (0, 1)), F.pad(mask, (0, 1))
    m = mask[:, None, :].to(x.dtype)
    summed = F.avg_pool1d(x * m, 2)
    count = F.avg_pool1d(m, 2)
    return summed / count.clamp_min(0.5) * (count > 0), count[:, 0] > 0
