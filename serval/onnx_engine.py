"""The ONNX Runtime engine: serval's predictor without torch, and `load_engine`, the choice of engine.

`OnnxPredictor` has the interface of `serval.inference.Predictor` (`predict`, `predict_waveforms`,
`record`, `classes`, `dimensions`, `name`, `fingerprint`) and gives the same records, but its
inference path imports neither torch nor transformers: numpy computes the log-mel
(`serval.features.log_mel`) and ONNX Runtime runs the graph that `serval.export` writes.

The default model's graph ships inside serval without its weights; the first run fills them in with
numpy, offline and without torch (`serval.onnx_default`). Any other model is exported once, with torch:
its graph is cached as `<cache>/onnx/<key>.onnx` (`serval.locations.cache_dir`, `$SERVAL_CACHE`
overrides it), where the key hashes the model's weights and config (and a local backbone's files), the
serval version and the opset. Beside a cached graph, `<key>.ort-<version>/` keeps ONNX Runtime's
optimised form of it, so that later starts skip most of the graph optimisation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serval.api import AudioClassifier
from serval.features import log_mel
from serval.fingerprint import fingerprint
from serval.locations import NoDefaultModelError, cache_dir
from serval.onnx_default import filled_graph, shipped_manifest
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
        keep_optimised: bool = False,
    ):
        """`keep_optimised`: the graph is in serval's cache, so ORT's optimised form may be kept beside it."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # every batch width is a new shape: a memory plan kept per shape makes RSS grow with the clips
        options.enable_mem_pattern = False
        if threads:
            options.intra_op_num_threads = threads
        self.graph = Path(graph)
        providers = list(providers or ["CPUExecutionProvider"])
        run = self.graph
        if keep_optimised and providers == ["CPUExecutionProvider"]:
            try:
                run = optimised_graph(self.graph)
            except OSError:  # a read-only cache: the graph still runs, optimised at each start
                pass
        self.session = ort.InferenceSession(str(run), options, providers=providers)
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
        self.gain_invariant = bool(json.loads(meta.get("gain_invariant", "false")))
        self.name = name or meta.get("name", self.graph.stem)
        self.fingerprint = f"onnx:{self.graph.stem}"
        self._inputs = {i.name for i in self.session.get_inputs()}

    def _forward(self, waves: list[np.ndarray], check_finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
        feats, lengths = log_mel(
            waves, self.n_mels, self.pad_to_30s, check_finite=check_finite, gain_invariant=self.gain_invariant
        )
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
    parts: list[str | Path] = [f"serval-onnx {_KEY_VERSION} {__version__} opset {OPSET} {spec}\n"]
    for folder in folders:
        files = _weight_files(folder)
        config = folder / "config.json"
        if config.is_file():
            backbone = json.loads(config.read_text()).get("backbone") or ""
            local = Path(backbone).expanduser()
            if backbone and local.exists():
                files += _weight_files(local) if local.is_dir() else [local]
        for f in files:
            parts += [f"{f.name}\n", f]
    return fingerprint(parts)


def _weight_files(folder: Path) -> list[Path]:
    suffixes = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt")
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in suffixes)


def cached_graph(model: str | os.PathLike | None = None) -> Path:
    """The cached ONNX graph of a local model spec: the default model's shipped graph with its weights
    filled in (torch-free), or any other model exported (with torch), the first time only."""
    folders = model_folders(model)
    if folders is None:
        raise ValueError(f"{model}: the ONNX engine needs a local serval model or ensemble directory")
    described = describe(model)
    spec = described.spec if described.kind == "meralion" else ""
    manifest = shipped_manifest(folders[0]) if len(folders) == 1 and not spec else None
    if manifest is not None:
        return filled_graph(folders[0], manifest, cache_dir() / "onnx")
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
    warning says so). On a GPU without torch installed, "auto" stays on ONNX Runtime and says so in one
    line. The checks for a GPU and for torch are torch-free (the NVIDIA driver's files; an import spec),
    so "auto" on a CPU never imports torch. `options` go to `serval.inference.load` (an LLM's settings).
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
        wants_gpu = wants_gpu and _torch_for_gpu(device)
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
    return OnnxPredictor(
        described.path if is_graph else cached_graph(spec), threads=threads, keep_optimised=not is_graph
    )


def optimised_graph(graph: Path) -> Path:
    """ORT's optimised form of a cached `graph`, written beside it the first time (`<stem>.ort-<version>/`).

    Saved at the extended level, whose fusions hold on any CPU; the machine-specific layouts of the
    full level are made at each load, in a fraction of the time the whole optimisation takes.
    """
    import onnxruntime as ort

    folder = graph.with_name(f"{graph.stem}.ort-{ort.__version__}")
    target = folder / graph.name
    if target.is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=graph.parent, prefix=f".{folder.name}."))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp / graph.name)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "weights.bin"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        for f in tmp.iterdir():  # on disk before the rename, or a power cut could leave a broken graph
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the cache's other folders are as readable
        os.rename(tmp, folder)
    except OSError:
        if not target.is_file():  # another process renamed its copy first: that one serves
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def add_model_arguments(p) -> None:
    """--model (default: the bundled model) and `add_engine_arguments`: the model options of the servers."""
    p.add_argument("--model", help="model directory, hub id or meralion:PATH (default: the bundled model)")
    add_engine_arguments(p)


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


def _torch_for_gpu(device: str | None) -> bool:
    """Whether torch is installed to run on the GPU; without it, "auto" says so and stays on the CPU."""
    if importlib.util.find_spec("torch") is not None:
        return True
    if device not in (None, "auto"):
        raise ValueError(
            f"device {device!r} needs torch, which is not installed: pip install 'serval[train]'"
        )
    print(
        "serval: a GPU is present but torch is not installed (pip install 'serval[train]' to use it), "
        "so the model runs on ONNX Runtime on the CPU",
        file=sys.stderr,
    )
    return False


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
