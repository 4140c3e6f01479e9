"""Inference: a `Predictor` turns audio into emotion records (`serval predict` is in `serval.predict`).

The model (`serval.model`) knows nothing of files, batching or devices; this module does.
Clips are grouped by length so that a batch carries little padding, the encoder runs at
each batch's own length, and the model runs in bf16 on a GPU and fp32 on a CPU.
"""

from __future__ import annotations

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
from serval.fingerprint import fingerprint
from serval.locations import DEFAULT_MODEL, NoDefaultModelError  # noqa: F401 (DEFAULT_MODEL: re-exported)
from serval.meralion import NAME as MERALION_NAME
from serval.meralion import import_meralion_checkpoint
from serval.model import SERModel, shared_trained_dimensions
from serval.specs import ModelSpec, describe


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
        self._fingerprint: str | None = None  # `load` sets it from the model's files
        if self.device.type != "cpu":  # a GPU's own memory holds full batches of 30 s pieces
            self.call_budget = None
        if buckets or compile:
            self.set_static(compile=compile)

    @property
    def fingerprint(self) -> str:
        """The model's identity (keys eval's cache): its files' hash when loaded from them, else its weights'."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.models)
        return self._fingerprint

    @fingerprint.setter
    def fingerprint(self, value: str) -> None:
        self._fingerprint = value

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
            gain_invariant=self.config.gain_invariant,
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
    """The torch engine's resolver: a model spec (`serval.specs.describe`) into a `serval.predictor.Predictor`.

    `model`: a `SERModel`; None or "default" (the bundled model); a serval model directory; a directory
    with `ensemble.json`; a MERaLiON-SER checkpoint directory; a Hub id; `meralion:PATH`;
    `emotion2vec:large|base|seed|DIR`; `llm:MODEL@BASE_URL` (`options` go to `AudioLLM`). Every system
    loaded from files has a `fingerprint` that changes when they do (it keys the evaluation cache).
    """
    if isinstance(model, SERModel):
        return Predictor(model, device)
    spec = describe(model)
    if spec.kind == "hub":
        spec = describe(fetch_from_hub(spec.spec))
    if spec.kind == "emotion2vec":
        return Emotion2Vec(spec.target, device=device)
    if spec.kind == "llm":
        return _audio_llm(spec.spec, options)
    if spec.kind == "meralion":
        return _meralion(spec, device)
    if spec.kind == "missing":
        if spec.default:
            raise NoDefaultModelError("no default model is installed; pass a model directory (--model DIR)")
        raise FileNotFoundError(
            f"{spec.spec}: not a model directory, and not meralion:PATH, emotion2vec:VARIANT or llm:MODEL@URL"
        )
    if spec.kind == "graph":
        raise ValueError(f"{spec.spec}: an ONNX graph runs on the onnx engine only")
    predictor = Predictor([_network(f) for f in spec.folders], device)
    predictor.fingerprint = files_fingerprint("serval", spec.path)
    return predictor


def _network(path: Path) -> SERModel:
    """The model in a folder: a serval model directory, or a MERaLiON-SER checkpoint (its config.json is foreign)."""
    if (path / "config.json").is_file() and not is_serval_dir(path):
        return import_meralion_checkpoint(path)
    return load_model(path, fold_lora=True)  # the published layout: no adapters at inference


def _meralion(spec: ModelSpec, device: str | None) -> Predictor:
    local = spec.path
    if local is None:
        if not is_hub_id(spec.target):
            raise FileNotFoundError(f"{spec.target}: no such MERaLiON-SER checkpoint (file or directory)")
        local = fetch_from_hub(spec.target)
    predictor = Predictor(import_meralion_checkpoint(local), device, name=MERALION_NAME)
    predictor.fingerprint = files_fingerprint(spec.spec, local)
    return predictor


def _audio_llm(spec: str, options: dict) -> AudioLLM:
    model, sep, base_url = spec[len("llm:") :].rpartition("@")
    if not sep or not model or not base_url:
        raise ValueError(
            f"{spec!r}: an LLM spec is llm:MODEL@BASE_URL, e.g. llm:gpt-4o-audio-preview@https://api.openai.com/v1"
        )
    return AudioLLM(model, base_url, **options)


def weights_fingerprint(models: Sequence[SERModel]) -> str:
    """A hash of models built in memory: their configs and every tensor (the same one `serval.evaluate` used)."""

    def parts():
        yield "serval-in-memory"
        for m in models:
            yield json.dumps(m.config.to_dict(), sort_keys=True)
            for name, t in m.state_dict().items():
                yield name
                yield t.detach().float().cpu().numpy().tobytes()

    return fingerprint(parts())


def files_fingerprint(kind: str, path: str | os.PathLike) -> str:
    """A hash of a model's files (name, size, mtime; config files by content): changes when the model does."""
    path = Path(path)
    parts: list[str | Path] = [f"{kind}\n{path.resolve()}\n"]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        parts.append(f"{f.relative_to(path) if path.is_dir() else f.name}\t{st.st_size}\t{st.st_mtime_ns}\n")
        if f.suffix in (".json", ".yaml", ".yml") and st.st_size < 1_000_000:
            parts.append(f)
    return fingerprint(parts)
