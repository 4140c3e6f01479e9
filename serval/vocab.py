"""serval's shared vocabulary: class and dimension names, the sample rate, audio extensions, records.

Torch-free and import-free (numpy only), so that every module, the server and the MCP tool can
use it without pulling in the model. Each of these words is defined here and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# The 7 classes, in the order of the published MERaLiON-SER-v1 checkpoint.
EMOTIONS = ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised")
# The paper's 4-class protocol.
PRIMARY4 = ("neutral", "angry", "sad", "happy")
# The dimensional scores, in serval's output order, each in [0, 1].
DIMENSIONS = ("arousal", "valence", "dominance")
# Every model input is 16 kHz mono.
SAMPLE_RATE = 16000
# File suffixes treated as audio when a folder is expanded (lower case).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".m4a", ".mp4", ".sph")
# Decimal places of every probability and score in a record.
DIGITS = 6
# What a record's null score means (record schemas and docs say it in these words).
UNTRAINED = "null: this model's output for the dimension was not trained"


# Other systems' and datasets' names for the classes.
_ALIASES = {
    "anger": "angry",
    "happiness": "happy",
    "sadness": "sad",
    "fear": "fearful",
    "disgust": "disgusted",
    "surprise": "surprised",
}


def class_name(name: str) -> str:
    """A teacher's or dataset's class name in serval's vocabulary ("生气/angry" -> "angry", "anger" -> "angry")."""
    name = str(name).rsplit("/", 1)[-1].strip().lower()
    return _ALIASES.get(name, name)


class UnknownClassesError(ValueError):
    """A class subset names classes the model does not know."""


def class_subset(classes: Sequence[str] | None, known: Sequence[str]) -> list[int] | None:
    """Indices of `classes` in `known`, or None for all; raises `UnknownClassesError` for unknown names."""
    if not classes:
        return None
    known = list(known)
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise UnknownClassesError(f"unknown classes {unknown}; this model knows {known}")
    return [known.index(c) for c in classes]


def probabilities(probs, classes: Sequence[str], keep: Sequence[int] | None = None) -> dict[str, float]:
    """{class: p} over `keep` (all when None), renormalised over the kept classes and rounded."""
    keep = list(range(len(classes))) if keep is None else list(keep)
    p = np.asarray(probs, np.float64)[keep]
    p = p / max(p.sum(), 1e-12)
    return {classes[k]: round(float(v), DIGITS) for k, v in zip(keep, p)}


def trained_dimensions(system) -> tuple[str, ...]:
    """The dimensions whose outputs `system` was trained on; a system that does not say has none."""
    return tuple(getattr(system, "trained_dimensions", ()))


def scores(values, dimensions: Sequence[str], trained: Sequence[str]) -> dict[str, float | None]:
    """{dimension: score}, rounded; None (JSON null) for a dimension not in `trained` or a non-finite value.

    Every dimension keeps its key, so a record has the same shape whatever the model was trained on.
    """
    out: dict[str, float | None] = {}
    for d, v in zip(dimensions, values):
        v = float(v)
        out[d] = round(v, DIGITS) if d in trained and math.isfinite(v) else None
    return out


def label_body(
    probs,
    values,
    classes: Sequence[str],
    dimensions: Sequence[str],
    keep: Sequence[int] | None = None,
    *,
    trained: Sequence[str],
    speech: dict | None = None,
    label_no_speech: bool = False,
) -> dict:
    """The body every result shares: the top label, its probabilities and the dimensional scores
    (null for a dimension not in `trained`).

    `speech`: a clip record's {"speech_fraction", "no_speech"} (`serval.vad.speech_fields`), added
    after the scores; the label of a clip without speech is None unless `label_no_speech`.
    """
    keep = list(range(len(classes))) if keep is None else list(keep)
    # The label comes from the unrounded values, so rounding can never create a tie.
    top = keep[int(np.argmax(np.asarray(probs, np.float64)[keep]))]
    silent = bool(speech and speech["no_speech"]) and not label_no_speech
    return {
        "label": None if silent else classes[top],
        "probabilities": probabilities(probs, classes, keep),
        "scores": scores(values, dimensions, trained),
        **(speech or {}),
    }
