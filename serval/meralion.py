"""The MERaLiON-SER-v1 checkpoint importer: the published weights as a `SERModel`.

A checkpoint is a directory with `config.json` and `model.safetensors` (or sharded safetensors),
the safetensors file itself, or a Hub id. Names may carry a prefix (`model.`); the unused Whisper
decoder is never read; unmerged peft LoRA factors are merged on the way in. Tensors are read one at
a time into a model built on the meta device, so peak memory is one model plus one tensor.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from serval.backbones import BackboneError, fetch_from_hub, is_hub_id, weight_files
from serval.model import SERConfig, SERModel, merge_lora

# The published checkpoint's head reads its three scores in this order; the paper lists
# arousal first, but two independent integrations of the released weights read the outputs
# as valence, arousal, dominance. Kept in the config, never in code.
MERALION_DIMENSIONS = ("valence", "arousal", "dominance")
NAME = "MERaLiON-SER-v1"


def _find_key(config: dict, key: str):
    """`key` anywhere in a nested config (remote-code configs nest the Whisper config)."""
    if key in config:
        return config[key]
    for value in config.values():
        if isinstance(value, dict) and (found := _find_key(value, key)) is not None:
            return found
    return None


def meralion_config(
    shapes: dict[str, tuple[int, ...]], hf_config: dict | None = None, **overrides
) -> SERConfig:
    """The `SERConfig` that a checkpoint with these (prefix-free, merged) tensor shapes needs."""
    hf_config = hf_config or {}
    # A size whose tensor is absent falls back to the published one, so that the caller's
    # name-by-name comparison reports the absent tensor instead of this function failing.
    published = SERConfig.for_whisper("medium")

    def size(name: str, axis: int, default: int) -> int:
        return shapes[name][axis] if name in shapes else default

    def count(prefix: str, default: int) -> int:
        found = {k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)}
        return len(found) or default

    d = size("whisper.encoder.conv1.weight", 0, published.d_model)
    n_kernels = count(
        "downstream_model.pooling.multiscale.resolution_convs.", len(published.multiscale_kernels)
    )
    found = dict(
        n_mels=size("whisper.encoder.conv1.weight", 1, published.n_mels),
        d_model=d,
        encoder_layers=count("whisper.encoder.layers.", published.encoder_layers),
        # Whisper's heads are 64 wide at every size; a config that names the count wins.
        encoder_attention_heads=int(_find_key(hf_config, "encoder_attention_heads") or d // 64),
        encoder_ffn_dim=size("whisper.encoder.layers.0.fc1.weight", 0, published.encoder_ffn_dim),
        max_source_positions=size(
            "whisper.encoder.embed_positions.weight", 0, published.max_source_positions
        ),
        layer_weighting="weighted" if "layer_weights" in shapes else "last",
        channels=size("downstream_model.proj_in.0.weight", 0, published.channels),
        embed_dim=size("downstream_model.embed.4.weight", 0, published.embed_dim),
        res2_scale=count("downstream_model.blocks.0.res2.convs.", published.res2_scale - 1) + 1,
        dilations=tuple(range(1, count("downstream_model.blocks.", len(published.dilations)) + 1)),
        multiscale_kernels=tuple(
            size(f"downstream_model.pooling.multiscale.resolution_convs.{i}.weight", 2, k)
            for i, k in enumerate((published.multiscale_kernels * n_kernels)[:n_kernels])
        ),
        hierarchy_levels=count(
            "downstream_model.pooling.segment.level_attentions.", published.hierarchy_levels
        ),
    )
    _check_outputs(shapes, len(published.classes))
    settings = dict(
        found,
        backbone=None,
        pad_to_30s=True,
        lora_r=0,
        dimensions=MERALION_DIMENSIONS,
        trained_dimensions=MERALION_DIMENSIONS,  # the published model was trained on all three
        name=NAME,
    )
    return SERConfig(**{**settings, **overrides})


def _check_outputs(shapes: dict[str, tuple[int, ...]], n_published: int) -> None:
    """ValueError unless the heads give the published model's classes and dimensional scores."""
    n_classes = shapes.get("emotion_classification_layer.2.weight", (n_published,))[0]
    if n_classes != n_published:
        raise ValueError(f"checkpoint has {n_classes} classes; the published model has {n_published}")
    n_dims = shapes.get("dim_layer.3.weight", (len(MERALION_DIMENSIONS),))[0]
    if n_dims != len(MERALION_DIMENSIONS):
        raise ValueError(f"checkpoint has {n_dims} dimensional scores, expected {len(MERALION_DIMENSIONS)}")


def _lora_scaling(directory: Path | None, hf_config: dict, r: int, given: float | None) -> float | None:
    """alpha / r for unmerged LoRA factors: the argument, else adapter_config.json, else config.json."""
    if given is not None:
        return float(given)
    sources = []
    if directory is not None and (directory / "adapter_config.json").is_file():
        sources.append(json.loads((directory / "adapter_config.json").read_text()))
    sources.append(hf_config)
    for cfg in sources:
        alpha = _find_key(cfg, "lora_alpha")
        if alpha is not None:
            rank = cfg.get("r") or _find_key(cfg, "lora_r") or _find_key(cfg, "lora_rank") or r
            return alpha / math.sqrt(rank) if _find_key(cfg, "use_rslora") else alpha / rank
    return None


@dataclass
class _Checkpoint:
    """A checkpoint's tensors, located but not read: model name -> stored name and its open file."""

    path: Path
    directory: Path | None  # where config.json and adapter_config.json are looked for
    hf_config: dict
    where: dict = field(default_factory=dict)  # stored name -> open safetensors handle
    renamed: dict = field(default_factory=dict)  # model name (LoRA base merged away) -> stored name
    lora: dict = field(default_factory=dict)  # module -> {"A": stored name, "B": stored name}
    unmatched: list = field(default_factory=list)  # stored names outside the model's prefix

    def shape(self, stored: str) -> tuple[int, ...]:
        return tuple(self.where[stored].get_slice(stored).get_shape())

    def tensor(self, stored: str) -> torch.Tensor:
        return self.where[stored].get_tensor(stored)


def import_meralion_checkpoint(
    path: str | os.PathLike, lora_scaling: float | None = None, **overrides
) -> SERModel:
    """A MERaLiON-SER-v1 checkpoint (dir with config.json + model.safetensors, the file, or a Hub id) as a model.

    `overrides` set config fields, e.g. `pad_to_30s=False` for own-length inference (default: published 30 s).
    """
    ckpt = _open_checkpoint(Path(path).expanduser())
    shapes = {k: ckpt.shape(v) for k, v in ckpt.renamed.items()}
    scaling = _checked_lora_scaling(ckpt, lora_scaling)
    try:
        config = meralion_config(shapes, ckpt.hf_config, **overrides)
    except ValueError as e:
        raise BackboneError(ckpt.path, str(e)) from None
    _check_layout(ckpt, shapes, config)
    return _load_weights(ckpt, config, scaling)


def _open_checkpoint(path: Path) -> _Checkpoint:
    """Find the weight files (fetching a Hub id), open them, and sort their names (decoder dropped)."""
    if not path.exists():
        if not is_hub_id(os.fspath(path)):
            raise BackboneError(path, "no such file or directory")
        path = fetch_from_hub(os.fspath(path))
    if path.is_dir():
        files = [f for f in weight_files(path) if f.suffix == ".safetensors"]
        if not files:
            raise BackboneError(path, "no model.safetensors (or sharded safetensors index)")
    elif path.suffix == ".safetensors":
        files = [path]
    else:
        raise BackboneError(path, "expected a checkpoint directory or a .safetensors file")
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    hf_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    ckpt = _Checkpoint(path, directory, hf_config)
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:
            raise BackboneError(file, f"cannot open safetensors ({e})") from e
        ckpt.where |= dict.fromkeys(handle.keys(), handle)
    _sort_names(ckpt, files[0])
    return ckpt


def _sort_names(ckpt: _Checkpoint, first_file: Path) -> None:
    """Strip the checkpoint's prefix, skip the decoder, and set peft LoRA factors apart."""
    anchor = next((n for n in ckpt.where if n.endswith("whisper.encoder.conv1.weight")), None)
    if anchor is None:
        raise BackboneError(first_file, "no whisper.encoder.conv1.weight: not a MERaLiON-SER checkpoint")
    prefix = anchor[: -len("whisper.encoder.conv1.weight")]
    stored = {}  # model name -> stored name
    for name in ckpt.where:
        if "whisper.decoder." in name:  # the unused Whisper decoder: never read
            continue
        if not name.startswith(prefix):
            ckpt.unmatched.append(name)
            continue
        stored[name[len(prefix) :]] = name
    # peft naming: x.base_layer.weight / x.lora_A.<adapter>.weight / x.lora_B.<adapter>.weight
    for short in list(stored):
        if ".lora_A." in short or ".lora_B." in short:
            module, kind = short.split(".lora_")[0], short.split(".lora_")[1][0]
            ckpt.lora.setdefault(module, {})[kind] = stored.pop(short)
    ckpt.renamed = {short.replace(".base_layer.", "."): name for short, name in stored.items()}


def _checked_lora_scaling(ckpt: _Checkpoint, given: float | None) -> float | None:
    """alpha / r for the checkpoint's unmerged LoRA factors (None without any); complete factors only."""
    if not ckpt.lora:
        return None
    incomplete = sorted(
        m for m, f in ckpt.lora.items() if set(f) != {"A", "B"} or f"{m}.weight" not in ckpt.renamed
    )
    if incomplete:
        raise BackboneError(ckpt.path, f"incomplete LoRA factors for: {', '.join(incomplete)}")
    r = ckpt.shape(next(iter(ckpt.lora.values()))["A"])[0]
    scaling = _lora_scaling(ckpt.directory, ckpt.hf_config, r, given)
    if scaling is None:
        raise BackboneError(
            ckpt.path,
            f"{len(ckpt.lora)} unmerged LoRA modules but no lora_alpha in adapter_config.json "
            "or config.json; pass lora_scaling=alpha/r",
        )
    return scaling


def _check_layout(ckpt: _Checkpoint, shapes: dict[str, tuple[int, ...]], config: SERConfig) -> None:
    """Every name and shape against the model `config` builds; all differences in one error."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SERModel(config).state_dict().items()}
    renamed = ckpt.renamed
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(ckpt.unmatched + [renamed[k] for k in set(renamed) - set(expected)])
    wrong = sorted(
        f"{k} {shapes[k]} != {expected[k]}" for k in set(renamed) & set(expected) if shapes[k] != expected[k]
    )
    if missing or unexpected or wrong:
        raise BackboneError(
            ckpt.path,
            "tensors do not match the MERaLiON-SER layout; "
            f"unexpected: {unexpected}; missing: {missing}; wrong shapes: {wrong}",
        )


def _load_weights(ckpt: _Checkpoint, config: SERConfig, scaling: float | None) -> SERModel:
    """The model with every tensor copied in, one in memory at a time, LoRA merged."""
    with torch.device("meta"):  # every tensor is overwritten below: skip the random init
        model = SERModel(config)
    model = model.to_empty(device="cpu")
    own = model.state_dict()
    with torch.no_grad():
        for short, name in ckpt.renamed.items():
            tensor = ckpt.tensor(name)
            module = short.rsplit(".", 1)[0]
            if short.endswith(".weight") and module in ckpt.lora:
                factors = ckpt.lora[module]
                tensor = merge_lora(
                    tensor.float(), ckpt.tensor(factors["A"]), ckpt.tensor(factors["B"]), scaling
                )
            own[short].copy_(tensor)
    return model.eval()
