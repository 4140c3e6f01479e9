"""The ONNX Runtime engine: serval's predictor without torch, and `load_engine`, the choice of engine.

`OnnxPredictor` has the interface of `serval.inference.Predictor` (`predict`, `predict_waveforms`,
`record`, `classes`, `dimensions`, `name`, `fingerprint`) and gives the same records, but its
inference path imports neither torch nor transformers: numpy computes the log-mel
(`serval.features.log_mel`) and ONNX Runtime runs the graph that `serval.export` writes.

A model is exported once: the graph is cached as `<cache>/onnx/<key>.onnx` (`serval.locations.cache_dir`,
`$SERVAL_CACHE` overrides it), where the key hashes the model's weights and config (and a local
backbone's files), the serval version and the opset. Only building a missing graph imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serval.api import AudioClassifier
from serval.features import log_mel
from serval.locations import NoDefaultModelError, cache_dir
from serval.specs import ModelSpec, describe
from serval.version import __version__

ENGINES = ("auto", "torch", "onnx")
OPSET = 17  # serval.export.OPSET, repeated so that the cache key needs no torch import (a test checks)
_KEY_VERSION = "2"  # bump when the exported graph changes for the same weights (2: trained_dimensions)


class OnnxPredictor(AudioClassifier):
    """A graph written by `serval.export` (one model or an ensemble), run by ONNX Runtime on the CPU."""

    def __init__(
        self,
        graph: str | os.PathLike,
        name: str | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # every batch width is a new shape: a memory plan kept per shape makes RSS grow with the clips
        options.enable_mem_pattern = False
        if threads:
            options.intra_op_num_threads = threads
        self.graph = Path(graph)
        self.session = ort.InferenceSession(
            str(self.graph), options, providers=list(providers or ["CPUExecutionProvider"])
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        if "classes" not in meta:
            raise ValueError(
                f"{graph}: not a graph written by serval export (no class names in its metadata)"
            )
        self.classes: tuple[str, ...] = tuple(json.loads(meta["classes"]))
        self.dimensions: tuple[str, ...] = tuple(json.loads(meta["dimensions"]))
        # a graph exported before serval recorded it says nothing: none trained
        self.trained_dimensions: tuple[str, ...] = tuple(json.loads(meta.get("trained_dimensions", "[]")))
        self.n_mels = int(meta["n_mels"])
        self.pad_to_30s = bool(json.loads(meta["pad_to_30s"]))
        self.name = name or meta.get("name", self.graph.stem)
        self.fingerprint = f"onnx:{self.graph.stem}"
        self._inputs = {i.name for i in self.session.get_inputs()}

    def _forward(self, waves: list[np.ndarray], check_finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
        feats, lengths = log_mel(waves, self.n_mels, self.pad_to_30s, check_finite=check_finite)
        feeds = {"features": feats, "frame_lengths": lengths}
        probs, scores = self.session.run(
            ["probabilities", "scores"], {k: v for k, v in feeds.items() if k in self._inputs}
        )
        return probs, scores


# ---------------------------------------------------------------------------- the cached graph


def model_folders(model: str | os.PathLike | None) -> list[Path] | None:
    """The model folders a spec names (one, or an ensemble's members), or None when it is not local.

    What the spec means is `serval.specs.describe`'s; a single folder must hold a config.json.
    """
    return _local_folders(describe(model))


def _local_folders(spec: ModelSpec) -> list[Path] | None:
    if spec.kind == "ensemble":
        return list(spec.folders)
    local = spec.path is not None and (spec.path / "config.json").is_file()
    return list(spec.folders) if spec.kind in ("folder", "meralion") and local else None


def graph_key(folders: Sequence[Path], spec: str = "") -> str:
    """The cache key of a model's graph: a sha256 of its files' contents, the serval version and the opset.

    A folder's config and weight files are hashed whole; a backbone named by a local path in the
    config is hashed too (a `pypi:` backbone is pinned by its own sha256, so its name is enough).
    """
    h = hashlib.sha256(f"serval-onnx {_KEY_VERSION} {__version__} opset {OPSET} {spec}\n".encode())
    for folder in folders:
        files = _weight_files(folder)
        config = folder / "config.json"
        if config.is_file():
            backbone = json.loads(config.read_text()).get("backbone") or ""
            local = Path(backbone).expanduser()
            if backbone and local.exists():
                files += _weight_files(local) if local.is_dir() else [local]
        for f in files:
            h.update(f"{f.name}\n".encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    suffixes = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt")
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in suffixes)


def cached_graph(model: str | os.PathLike | None = None) -> Path:
    """The cached ONNX graph of a local model spec, exported (with torch) the first time only."""
    folders = model_folders(model)
    if folders is None:
        raise ValueError(f"{model}: the ONNX engine needs a local serval model or ensemble directory")
    described = describe(model)
    spec = described.spec if described.kind == "meralion" else ""
    path = cache_dir() / "onnx" / f"{graph_key(folders, spec)}.onnx"
    if not path.is_file():
        from serval.export import export_onnx
        from serval.inference import load
        from serval.progress import once_notice

        what = "the default model" if described.default else described.spec
        with once_notice(f"preparing {what} for ONNX Runtime, once (cached in {path.parent})"):
            system = load(described.spec, device="cpu")
            export_onnx(system.models, path, name=system.name)
    return path


def load_engine(
    model: str | os.PathLike | None = None,
    engine: str = "auto",
    device: str | None = None,
    threads: int | None = None,
    **options,
):
    """A predictor for `model` on `engine`: "torch" (`serval.inference.load`), "onnx", or "auto".

    "auto" is ONNX Runtime on a CPU (a `.onnx` file, or a local serval model or ensemble, exported once
    into the cache), and torch on a GPU or for anything else (emotion2vec:, llm:, Hub ids; a one-line
    warning says so). The check for a GPU is torch-free (the NVIDIA driver's files), so "auto" on a
    CPU never imports torch. `options` go to `serval.inference.load` (an LLM's settings).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if model is not None and not isinstance(model, str | os.PathLike):  # a SERModel in memory
        if engine == "onnx":
            raise ValueError("the onnx engine runs a model folder or a .onnx file, not a model object")
        from serval.inference import load

        return load(model, device=device, **options)
    described = describe(model)
    spec = None if model is None else described.spec
    is_graph = described.kind == "graph"
    wants_gpu = device not in (None, "auto", "cpu") or (device in (None, "auto") and _has_nvidia_gpu())
    if described.default and described.kind == "missing":
        raise NoDefaultModelError("no default model is installed; pass a model directory (--model DIR)")
    if engine == "auto":
        local = is_graph or _local_folders(described) is not None
        engine = "onnx" if local and not wants_gpu else "torch"
        if not local and not wants_gpu:
            print(
                f"serval: {spec or model}: not a local serval model, so it runs on torch, not ONNX Runtime",
                file=sys.stderr,
            )
    if engine == "torch":
        if is_graph:
            raise ValueError(f"{spec}: an ONNX graph runs on the onnx engine only")
        from serval.inference import load

        return load(model, device=device, **options)
    if device not in (None, "auto", "cpu"):
        raise ValueError(f"the onnx engine runs on the CPU; device {device!r} needs --engine torch")
    return OnnxPredictor(described.path if is_graph else cached_graph(spec), threads=threads)


def add_engine_arguments(p) -> None:
    """--device and --engine auto|torch|onnx, the same on every command that runs a model."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="auto (default): ONNX Runtime on a CPU for local serval models (exported once, cached), "
        "torch otherwise; torch; onnx",
    )


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
