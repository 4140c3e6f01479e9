"""Inference: a `Predictor` turns audio into emotion records (`serval predict` is in `serval.batch`).

The model (`serval.model`) knows nothing of files, batching or devices; this module does.
Clips are grouped by length so that a batch carries little padding, the encoder runs at
each batch's own length, and the model runs in bf16 on a GPU and fp32 on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from serval.api import AudioClassifier
from serval.backbones import fetch_from_hub, is_hub_id
from serval.baselines import AudioLLM, Emotion2Vec
from serval.checkpoint import is_serval_dir, load_model
from serval.features import compute_features
from serval.locations import DEFAULT_MODEL, NoDefaultModelError
from serval.meralion import NAME as MERALION_NAME
from serval.meralion import import_meralion_checkpoint
from serval.model import SERModel, shared_trained_dimensions


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto" -> cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def ensemble_forward(
    models: Sequence[SERModel],
    features: torch.Tensor,
    frame_lengths: torch.Tensor | None,
    cached: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities, scores) of a batch, each the mean over `models` (one model: its own).

    `cached`: `features` are encoder outputs, so only each model's head runs (the CPU training path).
    """
    probs, scores = 0.0, 0.0
    for m in models:
        out = m.cached_forward(features, frame_lengths) if cached else m(features, frame_lengths)
        probs = probs + out.logits.float().softmax(-1)
        scores = scores + out.scores.float()
    return probs / len(models), scores / len(models)


class Predictor(AudioClassifier):
    """One model (or an ensemble whose probabilities are averaged) ready for inference.

    `predict` (records) and `__call__` (transformers' pipeline shape) come from `AudioClassifier`.
    """

    def __init__(
        self,
        model: SERModel | Sequence[SERModel],
        device: str | torch.device | None = None,
        name: str | None = None,
        *,
        buckets: bool = False,
        compile: bool = False,
    ):
        """`buckets`: run at length-bucketed static shapes; `compile`: and small batches compiled
        (CUDA graphs on a GPU), paid for in `warmup()` (see `serval.compiled`)."""
        models = [model] if isinstance(model, SERModel) else list(model)
        if not models:
            raise ValueError("a Predictor needs at least one model")
        self.device = resolve_device(device)
        self.models = [m.eval().to(self.device) for m in models]
        self.config = self.models[0].config
        for m in self.models[1:]:
            if (m.config.classes, m.config.dimensions, m.config.n_mels) != (
                self.config.classes,
                self.config.dimensions,
                self.config.n_mels,
            ):
                raise ValueError("ensemble members must share classes, dimensions and n_mels")
        self.name = name or self.config.name
        self.classes: tuple[str, ...] = tuple(self.config.classes)
        self.dimensions: tuple[str, ...] = tuple(self.config.dimensions)
        self.trained_dimensions: tuple[str, ...] = shared_trained_dimensions(self.models)
        self.static = None
        if self.device.type != "cpu":  # a GPU's own memory holds full batches of 30 s pieces
            self.call_budget = None
        if buckets or compile:
            self.set_static(compile=compile)

    def set_static(self, compile: bool = False, **options) -> None:
        """Run at bucketed static shapes from now on; `compile`: small batches compiled (`serval.compiled`)."""
        from serval.compiled import StaticShapes

        self.static = StaticShapes(self.models, ensemble_forward, self._autocast, compile=compile, **options)

    def warmup(self, **shapes) -> int:
        """Compile and capture every bucketed shape now (not on a user's first call); shapes run."""
        return 0 if self.static is None else self.static.warmup(**shapes)

    @property
    def model(self) -> SERModel:
        return self.models[0]

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def _forward(self, waves: list[np.ndarray], check_finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
        feats, lengths = compute_features(
            waves,
            n_mels=self.config.n_mels,
            pad_to_30s=self.config.pad_to_30s,
            device=self.device,
            check_finite=check_finite,
        )
        if self.static is not None:
            probs, scores = self.static(feats, lengths.to(self.device))
        else:
            with self._autocast():
                probs, scores = ensemble_forward(self.models, feats, lengths.to(self.device))
        return probs.cpu().numpy(), scores.cpu().numpy()


def load(
    model: str | os.PathLike | SERModel | None = None, device: str | None = None, **options
) -> Predictor | Emotion2Vec | AudioLLM:
    """The one resolver of a model spec into a system (`predict_waveforms`, `classes`, `dimensions`, `name`).

    `model`: a `SERModel`; None or "default" (the bundled model); a serval model directory; a directory
    with `ensemble.json`; a MERaLiON-SER checkpoint directory; a Hub id; `meralion:PATH`;
    `emotion2vec:large|base|seed|DIR`; `llm:MODEL@BASE_URL` (`options` go to `AudioLLM`). Every system
    loaded from files has a `fingerprint` that changes when they do (it keys the evaluation cache).
    """
    if isinstance(model, SERModel):
        return Predictor(model, device)
    spec = "default" if model is None else os.fspath(model)
    if spec.startswith("emotion2vec:"):
        return Emotion2Vec(spec.split(":", 1)[1], device=device)
    if spec.startswith("llm:"):
        return _audio_llm(spec, options)
    if spec.startswith("meralion:"):
        return _meralion(spec, device)
    path = _model_dir(spec)
    ensemble = path / "ensemble.json"  # an ensemble: member folders whose outputs are averaged
    folders = (
        [path / m for m in json.loads(ensemble.read_text())["members"]] if ensemble.is_file() else [path]
    )
    predictor = Predictor([_network(f) for f in folders], device)
    predictor.fingerprint = files_fingerprint("serval", path)
    return predictor


def _model_dir(spec: str) -> Path:
    """The local folder of a spec: the bundled default, an existing path, or a Hub repository fetched."""
    if spec == "default":
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise NoDefaultModelError("no default model is installed; pass a model directory (--model DIR)")
        return DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if is_hub_id(spec):
        return fetch_from_hub(spec)
    raise FileNotFoundError(
        f"{spec}: not a model directory, and not meralion:PATH, emotion2vec:VARIANT or llm:MODEL@URL"
    )


def _network(path: Path) -> SERModel:
    """The model in a folder: a serval model directory, or a MERaLiON-SER checkpoint (its config.json is foreign)."""
    if (path / "config.json").is_file() and not is_serval_dir(path):
        return import_meralion_checkpoint(path)
    return load_model(path, fold_lora=True)  # the published layout: no adapters at inference


def _meralion(spec: str, device: str | None) -> Predictor:
    path = spec.split(":", 1)[1]
    local = Path(path).expanduser()
    if not local.exists():
        if not is_hub_id(path):
            raise FileNotFoundError(f"{path}: no such MERaLiON-SER checkpoint (file or directory)")
        local = fetch_from_hub(path)
    predictor = Predictor(import_meralion_checkpoint(local), device, name=MERALION_NAME)
    predictor.fingerprint = files_fingerprint(spec, local)
    return predictor


def _audio_llm(spec: str, options: dict) -> AudioLLM:
    model, sep, base_url = spec[len("llm:") :].rpartition("@")
    if not sep or not model or not base_url:
        raise ValueError(
            f"{spec!r}: an LLM spec is llm:MODEL@BASE_URL, e.g. llm:gpt-4o-audio-preview@https://api.openai.com/v1"
        )
    return AudioLLM(model, base_url, **options)


def files_fingerprint(kind: str, path: str | os.PathLike) -> str:
    """A hash of a model's files (name, size, mtime; config files by content): changes when the model does."""
    path = Path(path)
    h = hashlib.sha1(f"{kind}\n{path.resolve()}\n".encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(
            f"{f.relative_to(path) if path.is_dir() else f.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode()
        )
        if f.suffix in (".json", ".yaml", ".yml") and st.st_size < 1_000_000:
            h.update(f.read_bytes())
    return h.hexdigest()
