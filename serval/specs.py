"""Model specs as users write them (`--model`, `serval.load(model)`): what one means, and why one is bad.

`describe` is the one place that decides what a spec means (its kind, the folders it names, whether it
is the bundled default, an ensemble's members); both engines (`serval.inference.load`,
`serval.onnx_engine`) build from its `ModelSpec`. `spec_problem` says, torch-free and reading only JSON files
and the headers of weight files, why one cannot name a model, so that the CLI says so in one line
before it loads, exports or warns about anything else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from serval.locations import DEFAULT_MODEL

SCHEMES = ("meralion:", "emotion2vec:", "llm:")  # the prefixed specs serval.inference.load resolves
# what a spec can name: a model folder (serval's or a foreign checkpoint's), an ensemble.json folder, an
# .onnx graph, a Hub id (fetched, then described again), a scheme's system, or nothing ("missing")
KINDS = ("folder", "ensemble", "graph", "hub", "meralion", "emotion2vec", "llm", "missing")


@dataclass(frozen=True)
class ModelSpec:
    """What a model spec names (`describe`): the engines build a predictor from this, not from the text."""

    spec: str  # as written; "default" for None
    kind: str  # one of KINDS
    target: str  # what the spec points at: the text after a scheme, else the spec itself
    path: Path | None = None  # the local file or folder (None: nothing local, e.g. a Hub id not fetched)
    folders: tuple[Path, ...] = ()  # the model folders to load: one, or an ensemble's members in order
    default: bool = False  # the bundled default model (kind "missing" when it is not installed)


def describe(spec: str | os.PathLike | None) -> ModelSpec:
    """What `spec` names, from the file system alone (nothing is loaded or fetched; an ensemble.json is read)."""
    spec = "default" if spec is None else os.fspath(spec)
    scheme, _, rest = spec.partition(":")
    if spec.startswith(SCHEMES):
        local = Path(rest).expanduser()
        if scheme != "meralion" or not local.exists():
            return ModelSpec(spec, scheme, rest)  # a meralion: Hub id is fetched by the loader
        return ModelSpec(spec, scheme, rest, local, (local,) if local.is_dir() else ())
    if spec == "default":
        if not (DEFAULT_MODEL / "config.json").is_file():
            return ModelSpec(spec, "missing", spec, default=True)
        return _local_spec(spec, DEFAULT_MODEL, default=True)
    path = Path(spec).expanduser()
    if path.exists():
        return _local_spec(spec, path)
    return ModelSpec(spec, "hub" if is_hub_id(spec) else "missing", spec)


def _local_spec(spec: str, path: Path, default: bool = False) -> ModelSpec:
    if path.is_file() and path.suffix == ".onnx":
        return ModelSpec(spec, "graph", spec, path)
    # an ensemble: member folders (relative to it) whose outputs are averaged
    ensemble = path / "ensemble.json"
    if ensemble.is_file():
        members = json.loads(ensemble.read_text())["members"]
        return ModelSpec(spec, "ensemble", spec, path, tuple(path / m for m in members), default)
    return ModelSpec(spec, "folder", spec, path, (path,), default)


def is_hub_id(text: str) -> bool:
    """Whether a spec that is no local path reads as a Hub repository id (`owner/name`)."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def spec_problem(spec: str | None) -> str | None:
    """Why `spec` names no model, as `"<spec>: <cause>"`; None when it may (a Hub id is not fetched here)."""
    spec = "default" if spec is None else str(spec)
    cause = _scheme_problem(spec) if spec.startswith(SCHEMES) else _path_problem(spec)
    return None if cause is None else f"{spec}: {cause}"


def _path_problem(spec: str) -> str | None:
    if spec == "default":
        if (DEFAULT_MODEL / "config.json").is_file():
            return _folder_problem(DEFAULT_MODEL)
        return "no default model is installed; pass a model directory (--model DIR)"
    path = Path(spec).expanduser()
    if path.is_dir():
        return _ensemble_problem(path) if (path / "ensemble.json").is_file() else _folder_problem(path)
    if path.is_file():
        return None if path.suffix == ".onnx" else "a file, not a model directory or an .onnx graph"
    scheme, colon, _ = spec.partition(":")
    if colon and scheme.replace("-", "").isalnum():
        return f"unknown scheme {scheme}: (known: {', '.join(SCHEMES)})"
    if is_hub_id(spec):
        return None
    schemes = ", ".join(s + "…" for s in SCHEMES)
    return f"no such file or directory, and not a Hub id (owner/name) or {schemes}"


def _folder_problem(path: Path) -> str | None:
    """Why a folder is no model folder (serval's or a MERaLiON-SER checkpoint's)."""
    config = path / "config.json"
    if not config.is_file():
        return "no config.json in this folder (not a model directory)"
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            return "config.json does not hold a JSON object"
    except (OSError, ValueError) as e:  # JSON and UTF-8 errors are ValueErrors
        return f"config.json is unreadable ({e})"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no model.safetensors beside config.json"
    return next((c for c in map(_safetensors_problem, weights) if c is not None), None)


def _safetensors_problem(path: Path) -> str | None:
    """Why a file is no whole safetensors file, from its header alone (8-byte length, JSON, data offsets)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"{path.name} is not a safetensors file (or is truncated)"
            header = json.loads(f.read(n))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        end = 8 + n + max(ends, default=0)
    except (OSError, ValueError, LookupError, AttributeError, TypeError):  # JSON and its shape included
        return f"{path.name} is not a safetensors file (unreadable header)"
    return None if end <= size else f"{path.name} is truncated ({size} bytes; its header describes {end})"


def _ensemble_problem(path: Path) -> str | None:
    """Why a folder with ensemble.json is no ensemble: a bad file, or a member that is no model folder."""
    try:
        members = json.loads((path / "ensemble.json").read_text()).get("members")
    except (OSError, ValueError, AttributeError) as e:  # AttributeError: JSON, but not an object
        return f"ensemble.json is unreadable ({e})"
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        return 'ensemble.json needs "members": a list of model folders (relative to it)'
    for member in members:
        cause = _folder_problem(path / member) if (path / member).is_dir() else "no such folder"
        if cause is not None:
            return f"ensemble member {member}: {cause}"
    return None


def _scheme_problem(spec: str) -> str | None:
    scheme, rest = spec.split(":", 1)
    if scheme == "meralion":
        if not rest:
            return "no checkpoint named: meralion:DIR, meralion:FILE or meralion:OWNER/NAME"
        if Path(rest).expanduser().exists() or is_hub_id(rest):
            return None
        return f"no such MERaLiON-SER checkpoint {rest} (file, directory or Hub id)"
    if scheme == "emotion2vec":
        from serval.baselines import EMOTION2VEC_MODELS

        if rest in EMOTION2VEC_MODELS or (rest and Path(rest).expanduser().is_dir()):
            return None
        return f"choose emotion2vec:{'|'.join(EMOTION2VEC_MODELS)} or a local FunASR model directory"
    model, at, url = rest.rpartition("@")
    if at and model and url:
        return None
    return "an LLM spec is llm:MODEL@BASE_URL, e.g. llm:gpt-4o-audio-preview@https://api.openai.com/v1"
