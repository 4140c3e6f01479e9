"""Inference: a `Predictor` turns audio into emotion records; `serval predict` is its command.

The model (`serval.model`) knows nothing of files, batching or devices; this module does.
Clips are grouped by length so that a batch carries little padding, the encoder runs at
each batch's own length, and the model runs in bf16 on a GPU and fp32 on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from serval.audio import SAMPLE_RATE, AudioError, EmptyAudioError, check_finite, load_audio
from serval.features import compute_features
from serval.model import SERModel
from serval.windows import MAX_WINDOW, split_span

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


class NoDefaultModelError(RuntimeError):
    pass


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
        out = m.head(features, frame_lengths) if cached else m(features, frame_lengths)
        probs = probs + out.logits.float().softmax(-1)
        scores = scores + out.scores.float()
    return probs / len(models), scores / len(models)


class Predictor:
    """One model (or an ensemble whose probabilities are averaged) ready for inference."""

    def __init__(
        self,
        model: SERModel | Sequence[SERModel],
        device: str | torch.device | None = None,
        name: str | None = None,
    ):
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

    @property
    def model(self) -> SERModel:
        return self.models[0]

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def _forward(self, waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        feats, lengths = compute_features(
            waves, n_mels=self.config.n_mels, pad_to_30s=self.config.pad_to_30s, device=self.device
        )
        with self._autocast():
            probs, scores = ensemble_forward(self.models, feats, lengths.to(self.device))
        return probs.cpu().numpy(), scores.cpu().numpy()

    def predict_waveforms(
        self, waves: Sequence[np.ndarray], batch_size: int = 16, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """16 kHz mono waveforms -> (probabilities [N, classes], scores [N, dims]), in input order.

        Waveforms longer than 30 s are cut into equal pieces of at most 30 s whose outputs
        are averaged, weighted by duration.
        """
        pieces: list[tuple[int, np.ndarray]] = []  # (input index, piece)
        for i, w in enumerate(waves):
            w = np.asarray(w, dtype=np.float32).reshape(-1)
            spans = split_span(0.0, len(w) / SAMPLE_RATE, MAX_WINDOW)
            pieces.extend((i, w[round(a * SAMPLE_RATE) : round(b * SAMPLE_RATE)]) for a, b in spans)
        order = sorted(range(len(pieces)), key=lambda j: len(pieces[j][1]))
        batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
        probs = np.zeros((len(waves), len(self.classes)), np.float64)
        scores = np.zeros((len(waves), len(self.dimensions)), np.float64)
        weight = np.zeros(len(waves), np.float64)
        for batch in _progress(batches, progress, "clips"):
            p, s = self._forward([pieces[j][1] for j in batch])
            for row, j in enumerate(batch):
                i, w = pieces[j][0], len(pieces[j][1])
                probs[i] += w * p[row]
                scores[i] += w * s[row]
                weight[i] += w
        weight = np.maximum(weight, 1)[:, None]
        return (probs / weight).astype(np.float32), (scores / weight).astype(np.float32)

    def predict(
        self,
        inputs: Iterable[str | os.PathLike | np.ndarray],
        batch_size: int = 16,
        classes: Sequence[str] | None = None,
        progress: bool = False,
    ) -> list[dict]:
        """Paths or 16 kHz arrays -> one record each; a bad file gives an error record, the rest still run."""
        keep = self._class_subset(classes)
        records: list[dict] = []
        waves, slots = [], []
        for item in inputs:
            is_path = isinstance(item, str | os.PathLike)
            name = str(item) if is_path else None
            try:
                wave = load_audio(item) if is_path else _check_array(item)
            except AudioError as e:
                records.append({"file": name, "error": str(e)})
                continue
            records.append({"file": name, "duration": round(len(wave) / SAMPLE_RATE, 3)})
            waves.append(wave)
            slots.append(len(records) - 1)
        if waves:
            probs, scores = self.predict_waveforms(waves, batch_size=batch_size, progress=progress)
            for slot, p, s in zip(slots, probs, scores):
                records[slot].update(self.record(p, s, keep))
        return records

    def record(self, probs: np.ndarray, scores: np.ndarray, keep: Sequence[int] | None = None) -> dict:
        """A label, its probabilities and the dimensional scores, as plain JSON-ready values."""
        keep = list(range(len(self.classes))) if keep is None else list(keep)
        p = np.asarray(probs, np.float64)[keep]
        p = p / max(p.sum(), 1e-12)  # renormalise over the kept classes
        return {
            "label": self.classes[keep[int(np.argmax(p))]],
            "probabilities": {self.classes[k]: round(float(v), 6) for k, v in zip(keep, p)},
            "scores": {d: round(float(v), 6) for d, v in zip(self.dimensions, scores)},
        }

    def _class_subset(self, classes: Sequence[str] | None) -> list[int] | None:
        if not classes:
            return None
        unknown = [c for c in classes if c not in self.classes]
        if unknown:
            raise ValueError(f"unknown classes {unknown}; this model knows {list(self.classes)}")
        return [self.classes.index(c) for c in classes]


def _check_array(array) -> np.ndarray:
    wave = np.asarray(array, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        raise EmptyAudioError("<array>", "no samples")
    check_finite(wave, "<array>")
    return wave


def _progress(items, enabled: bool, unit: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, unit=f" {unit} batch", file=sys.stderr)


def load(model: str | os.PathLike | SERModel | None = None, device: str | None = None) -> Predictor:
    """A Predictor for a model directory, an ensemble directory, a hub id, `meralion:PATH`, or the default model."""
    if isinstance(model, SERModel):
        return Predictor(model, device)
    if model is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise NoDefaultModelError("no default model is installed; pass a model directory (--model DIR)")
        model = DEFAULT_MODEL
    spec = str(model)
    if spec.startswith("meralion:"):
        from serval.backbones import import_meralion_checkpoint

        return Predictor(import_meralion_checkpoint(spec.split(":", 1)[1]), device, name="MERaLiON-SER-v1")
    path = Path(spec)
    ensemble = path / "ensemble.json"
    if ensemble.is_file():
        members = json.loads(ensemble.read_text())["members"]
        models = [SERModel.from_pretrained(path / m) for m in members]
        return Predictor(models, device, name=models[0].config.name)
    return Predictor(SERModel.from_pretrained(spec), device)


def expand_inputs(items: Iterable[str]) -> list[str]:
    """Files stay as given; directories become their audio files, sorted, recursively."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(str(f) for f in sorted(p.rglob("*")) if f.suffix.lower() in AUDIO_EXTENSIONS)
        else:
            out.append(item)
    return out


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="audio files or directories of them")
    p.add_argument("--model", help="model directory, hub id or meralion:PATH (default: the bundled model)")
    p.add_argument("--format", choices=["json", "jsonl", "csv", "table"], default="json")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--classes", help="comma-separated subset, e.g. neutral,angry,sad,happy (renormalised)")
    p.add_argument("-o", "--output", help="write here instead of standard output (never overwrites)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    files = expand_inputs(args.inputs)
    if not files:
        print("serval predict: no audio files found in the given paths", file=sys.stderr)
        return 2
    try:
        predictor = load(args.model, device=args.device)
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        records = predictor.predict(
            files,
            batch_size=args.batch_size,
            classes=classes,
            progress=not args.no_progress and len(files) > args.batch_size,
        )
    except (NoDefaultModelError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"serval predict: {e}", file=sys.stderr)
        return 2
    text = format_records(records, args.format)
    if args.output:
        out = Path(args.output)
        if out.exists():
            print(f"serval predict: {out} exists; not overwriting", file=sys.stderr)
            return 2
        out.write_text(text)
    else:
        sys.stdout.write(text)
    failed = [r for r in records if "error" in r]
    for r in failed:
        print(f"serval predict: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def format_records(records: list[dict], fmt: str) -> str:
    """Records as json (an array), jsonl, csv or an aligned table."""
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records)
    ok = next((r for r in records if "error" not in r), None)
    classes = list(ok["probabilities"]) if ok else []
    dims = list(ok["scores"]) if ok else []
    header = ["file", "duration", "label", *classes, *dims, "error"]
    rows = []
    for r in records:
        rows.append(
            [
                r.get("file") or "",
                r.get("duration", ""),
                r.get("label", ""),
                *[r.get("probabilities", {}).get(c, "") for c in classes],
                *[r.get("scores", {}).get(d, "") for d in dims],
                r.get("error", ""),
            ]
        )
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        return buf.getvalue()
    cells = [header] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n" for row in cells)
