"""The ECAPA-TDNN variant after the encoder: SE-Res2Net blocks, multi-layer aggregation and hybrid
(multi-resolution + hierarchical) attention pooling, every part honouring the padding mask.

Parameter names follow MERaLiON-SER-v1's `downstream_model.*`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serval.masks import attention_pool, group_norm, halve_time, masked_mean, zero_padding
from serval.model_config import SERConfig


class Res2NetBlock(nn.Module):
    def __init__(self, channels: int, scale: int, dilation: int):
        super().__init__()
        width = channels // scale
        self.convs = nn.ModuleList(
            nn.Conv1d(width, width, 3, dilation=dilation, padding=dilation) for _ in range(scale - 1)
        )
        self.norm = group_norm(channels)
        self.scale = scale

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        splits = x.chunk(self.scale, dim=1)
        out, prev = [splits[0]], None
        for i, conv in enumerate(self.convs, start=1):
            prev = zero_padding(conv(splits[i] if prev is None else splits[i] + prev), mask)
            out.append(prev)
        return F.relu(self.norm(torch.cat(out, dim=1), mask))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Conv1d(channels, bottleneck, 1, bias=False),
            nn.ReLU(),
            nn.Conv1d(bottleneck, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return x * self.fc(masked_mean(x, mask)[:, :, None])


class SERes2Block(nn.Module):
    def __init__(self, channels: int, scale: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 1)
        self.norm1 = group_norm(channels)
        self.res2 = Res2NetBlock(channels, scale, dilation)
        self.se = SqueezeExcitation(channels, channels // 8)
        self.conv2 = nn.Conv1d(channels, channels, 1)
        self.norm2 = group_norm(channels)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x), mask))
        h = self.se(self.res2(h, mask), mask)
        h = self.norm2(self.conv2(h), mask)
        return zero_padding(F.relu(h + x), mask)


class MultiResolutionPooling(nn.Module):
    """Attention pooling after depthwise-grouped convs of several widths, gated by the clip's mean."""

    def __init__(self, channels: int, kernels: tuple[int, ...]):
        super().__init__()
        self.resolution_convs = nn.ModuleList(
            nn.Conv1d(channels, channels, k, padding=k // 2, groups=channels // 8) for k in kernels
        )
        self.resolution_attentions = nn.ModuleList(nn.Linear(channels, 1) for _ in kernels)
        self.resolution_weight_net = nn.Sequential(
            nn.Linear(channels, channels // 2),
            nn.ReLU(),
            nn.Linear(channels // 2, len(kernels)),
            nn.Softmax(-1),
        )
        self.final_proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        gate = self.resolution_weight_net(masked_mean(x, mask))  # [B, K]
        pooled = []
        for conv, scorer in zip(self.resolution_convs, self.resolution_attentions):
            y = conv(x)
            if mask is not None:  # an even kernel makes one extra frame; align with the mask
                y = y[..., : x.shape[-1]]
            pooled.append(attention_pool(y, scorer, mask))
        return self.final_proj((gate[:, :, None] * torch.stack(pooled, dim=1)).sum(1))


class HierarchicalPooling(nn.Module):
    """Attention pooling at several time resolutions, each level half the previous."""

    def __init__(self, channels: int, levels: int):
        super().__init__()
        self.level_attentions = nn.ModuleList(nn.Linear(channels, 1) for _ in range(levels))
        self.combiner = nn.Linear(channels * levels, channels)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        pooled = []
        for i, scorer in enumerate(self.level_attentions):
            pooled.append(attention_pool(x, scorer, mask))
            if i < len(self.level_attentions) - 1:
                x, mask = halve_time(x, mask)
        return self.combiner(torch.cat(pooled, dim=-1))


class HybridPooling(nn.Module):
    def __init__(self, channels: int, kernels: tuple[int, ...], levels: int):
        super().__init__()
        self.multiscale = MultiResolutionPooling(channels, kernels)
        self.segment = HierarchicalPooling(channels, levels)
        self.combiner = nn.Linear(2 * channels, channels)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.combiner(torch.cat([self.multiscale(x, mask), self.segment(x, mask)], dim=-1))


class ECAPADownstream(nn.Module):
    """Encoder frames [B, T, d] -> a clip embedding [B, embed_dim]."""

    def __init__(self, cfg: SERConfig):
        super().__init__()
        c = cfg.channels
        self.proj_in = nn.Sequential(
            nn.Linear(cfg.d_model, c), nn.LayerNorm(c), nn.GELU(), nn.Dropout(cfg.proj_dropout)
        )
        self.blocks = nn.ModuleList(SERes2Block(c, cfg.res2_scale, d) for d in cfg.dilations)
        self.mfa = nn.Sequential(nn.Conv1d(c * (len(cfg.dilations) + 1), c, 1), group_norm(c), nn.GELU())
        self.pooling = HybridPooling(c, cfg.multiscale_kernels, cfg.hierarchy_levels)
        e = cfg.embed_dim
        self.embed = nn.Sequential(
            nn.Linear(c, c),
            nn.LayerNorm(c),
            nn.GELU(),
            nn.Dropout(cfg.embed_dropouts[0]),
            nn.Linear(c, e),
            nn.LayerNorm(e),
            nn.GELU(),
            nn.Dropout(cfg.embed_dropouts[1]),
        )

    def forward(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        x = zero_padding(self.proj_in(hidden).transpose(1, 2), mask)
        outs = [x]
        for block in self.blocks:
            x = block(x, mask)
            outs.append(x)
        conv, norm, act = self.mfa
        x = zero_padding(act(norm(conv(torch.cat(outs, dim=1)), mask)), mask)
        return self.embed(self.pooling(x, mask))
