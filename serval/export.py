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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from serval.atomic import atomic_write
from serval.inference import ensemble_forward
from serval.model import SERModel, shared_trained_dimensions
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
        if (m.config.classes, m.config.dimensions, m.config.n_mels, m.config.pad_to_30s) != (
            cfg.classes,
            cfg.dimensions,
            cfg.n_mels,
            cfg.pad_to_30s,
        ):
            raise ValueError("ensemble members must share classes, dimensions, n_mels and pad_to_30s")
    return {
        "serval_version": __version__,
        "name": name or cfg.name,
        "classes": json.dumps(list(cfg.classes)),
        "dimensions": json.dumps(list(cfg.dimensions)),
        # a graph without this key: none trained
        "trained_dimensions": json.dumps(list(shared_trained_dimensions(models))),
        "n_mels": str(cfg.n_mels),
        "pad_to_30s": json.dumps(bool(cfg.pad_to_30s)),
        "members": str(len(models)),
    }


def export_onnx(
    models: SERModel | Sequence[SERModel],
    path: str | os.PathLike,
    *,
    name: str | None = None,
    opset: int = OPSET,
) -> Path:
    """Write `models` (one, or an ensemble averaged in the graph) as an ONNX graph at `path`, atomically."""
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
