"""The MERaLiON-SER network: Whisper encoder -> ECAPA-TDNN variant -> hybrid pooling -> two heads.

Parameter names and shapes follow the published MERaLiON-SER-v1 checkpoint exactly
(`whisper.encoder.*`, `downstream_model.*`, `dim_layer.*`, `emotion_layer.*`,
`emotion_classification_layer.*`). Unlike the published code, the encoder runs at the
input's own length and every pooling and normalisation honours a padding mask, so a clip's
outputs do not depend on the other clips in its batch.

Read top to bottom: the outputs, the Whisper encoder, the every-layer statistics, `SERModel`, the LoRA
merge. Beside it: `serval.model_config` (`SERConfig` and its rules), `serval.ecapa` (the downstream
network) and `serval.masks` (the masked operations both share).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from serval.ecapa import ECAPADownstream
from serval.masks import lengths_to_mask, zero_padding
from serval.model_config import SERConfig
from serval.vocab import DIMENSIONS, EMOTIONS  # noqa: F401  (re-exported for older imports)


@dataclass
class SEROutput:
    logits: Tensor  # [B, n_classes]
    scores: Tensor  # [B, 3], in [0, 1]
    embedding: Tensor  # [B, embed_dim]
    extra: dict = field(default_factory=dict)


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` written out as torch's own reference computes it (fp32), so that opset 17 exports it."""

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        eps = torch.finfo(torch.float32).eps if self.eps is None else self.eps
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (h * self.weight).type_as(x)


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


# ---------------------------------------------------------------------------- statistics of every layer


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
        if linear is not None:
            logits = self._mix(logits, linear)
        return SEROutput(logits=logits, scores=self.dim_layer(embedding), embedding=embedding)

    def _mix(self, network: Tensor, linear: Tensor) -> Tensor:
        """The log of the two heads' weighted mean probability (softmax gives that mean back)."""
        w = self.config.linear_weight
        if w == 1:
            return linear.log_softmax(-1).to(network.dtype)
        both = torch.stack(
            [network.float().log_softmax(-1) + math.log(1 - w), linear.log_softmax(-1) + math.log(w)]
        )
        return torch.logsumexp(both, dim=0).to(network.dtype)

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
