"""The on-disk encoder-output cache of the CPU training path.

With the whole Whisper encoder frozen, its output for a clip never changes, so it is computed
once and stored as one safetensors file per clip. A file's name is the sha256 of everything
that determines the output: the exact samples the encoder sees, the backbone's identity and
weights, the feature settings and the layer weighting. A changed clip, span, augmentation,
backbone or setting therefore gets a new key and never reuses a stale entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from serval.atomic import atomic_write
from serval.fingerprint import fingerprint
from serval.model import merge_lora_state_dict
from serval.progress import progress_bar

CACHE_VERSION = 1  # bump when the stored layout changes
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def backbone_fingerprint(model) -> str:
    """sha256 over the encoder's tensors (names, shapes, bytes): two encoders share it only if identical.

    LoRA on every layer is folded in first. LoRA on the top `lora_layers` is left out: `cached_forward`
    re-runs those layers itself, so the cache holds the frozen encoder's outputs.
    """
    cfg, state = model.config, model.whisper.encoder.state_dict()
    if cfg.lora_r and not cfg.lora_layers:
        state = merge_lora_state_dict(state, cfg.lora_alpha / cfg.lora_r)
    state = {n.replace(".base_layer.", "."): t for n, t in state.items() if "lora_" not in n}

    def parts():
        for name, tensor in sorted(state.items()):
            t = tensor.detach().cpu().contiguous()
            yield f"{name}:{tuple(t.shape)}:{t.dtype}"
            yield t.view(torch.uint8).numpy().tobytes() if t.numel() else b""

    return fingerprint(parts())


def encoder_settings(model, dtype: str) -> dict:
    """Everything besides the audio that decides what `model.encode` stores for a clip."""
    cfg = model.config
    return {
        "cache_version": CACHE_VERSION,
        "backbone": cfg.backbone,
        "weights": backbone_fingerprint(model),
        "n_mels": cfg.n_mels,
        "pad_to_30s": cfg.pad_to_30s,
        "layer_weighting": cfg.layer_weighting,
        "dtype": dtype,
    } | ({"gain_invariant": True} if cfg.gain_invariant else {})  # earlier caches keep their keys


class EncoderCache:
    """A folder of `<sha256>.safetensors` files, each one clip's encoder output `[T, d]` or `[L+1, T, d]`."""

    def __init__(self, root: str | os.PathLike, settings: dict):
        if settings.get("dtype", "float16") not in DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(DTYPES)}, not {settings['dtype']!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = dict(settings)
        self.dtype = DTYPES[self.settings.get("dtype", "float16")]
        self._prefix = json.dumps(self.settings, sort_keys=True).encode()

    def key(self, audio: np.ndarray) -> str:
        """The cache key of one clip: its float32 samples plus the encoder settings."""
        samples = np.ascontiguousarray(audio, dtype=np.float32)
        return fingerprint([self._prefix, str(samples.shape), samples.tobytes()])

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def readable(self, key: str) -> bool:
        """True when the entry exists and its header parses (a damaged file counts as missing)."""
        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                return "hidden" in f.keys()
        except Exception:
            return False

    def put(self, key: str, hidden: Tensor, token_length: int | None) -> None:
        """Store one clip's unpadded encoder output; written atomically so a crash leaves no half file."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"hidden": hidden.detach().to("cpu", self.dtype).contiguous()}
        meta = {"token_length": "" if token_length is None else str(int(token_length))}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    def get(self, key: str) -> tuple[Tensor, int | None]:
        """One clip's encoder output as float32 and its token length (None in 30 s padded mode)."""
        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                hidden = f.get_tensor("hidden").float()
                length = (f.metadata() or {}).get("token_length", "")
        except FileNotFoundError:
            raise KeyError(f"{path}: not in the encoder cache") from None
        except Exception as e:  # a damaged file is a miss the caller re-encodes, not a crash
            raise KeyError(f"{path}: unreadable cache entry ({e})") from e
        return hidden, int(length) if length else None

    def encode_missing(
        self,
        model,
        waves: list[np.ndarray],
        keys: list[str],
        batch_size: int = 8,
        device=None,
        progress: bool = False,
    ) -> int:
        """Encode and store the clips whose key is not cached yet; returns how many were encoded."""
        from serval.features import compute_features

        todo, seen = [], set()
        for i, k in enumerate(keys):
            if k not in seen and not self.readable(k):
                todo.append(i)
            seen.add(k)
        if not todo:
            return 0
        device = torch.device(device or "cpu")
        # Sorting by length keeps padding (and wasted encoder work) small.
        todo.sort(key=lambda i: len(waves[i]))
        bar = progress_bar(enabled=progress, total=len(todo), desc="caching encoder outputs", unit="clip")
        model.eval()
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            feats, frame_lengths = compute_features(
                [waves[i] for i in chunk],
                n_mels=model.config.n_mels,
                pad_to_30s=model.config.pad_to_30s,
                device=device,
                gain_invariant=model.config.gain_invariant,
            )
            with torch.inference_mode():
                hidden, token_lengths = model.encode(feats.to(device), frame_lengths.to(device))
            for j, i in enumerate(chunk):
                if token_lengths is None:
                    self.put(keys[i], hidden[j], None)
                else:
                    n = int(token_lengths[j])
                    self.put(keys[i], hidden[j][..., :n, :], n)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return len(todo)
