"""The calls every serval predictor shares, built on its `predict_waveforms` (torch or ONNX alike).

- `predict(x)`: one record for one input (a path, an array, or a datasets-style dict), a list of
  records for a list; in a list a bad input gives an error record and the rest still run, while
  one input that cannot be read raises its `AudioError`, as `predictor(x)` does.
- `predictor(x, top_k=None)`: `[{"label", "score"}]` best first, the shape of transformers'
  audio-classification pipeline (a list of such lists for a list).

Arrays are taken as users hold them (`serval.audio.load_array`): float or integer PCM (int16,
int32, uint8, scaled by their dtype), mono `(n,)` or `(n, channels)` / `(channels, n)` with up
to 8 channels, averaged as a file's are. A 2-D array is one clip; several clips are a list.

Sample rates: a file is read at its own rate (from its header) and resampled to 16 kHz. An array
carries no rate: pass `sampling_rate=` (or a dict with "sampling_rate") and it is resampled; an
array given without one is taken to be 16 kHz, the only case where a rate is assumed.

Speech: a record carries `speech_fraction` and `no_speech` (`serval.vad`); a clip without speech
gets `label: null` (its probabilities and scores are still there) unless `label_no_speech=True`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from serval.audio import AudioError, array_to_mono, at_model_rate, load_array, load_audio
from serval.progress import progress_bar
from serval.vad import speech_fields, speech_fraction
from serval.vocab import SAMPLE_RATE, class_subset, label_body
from serval.windows import MAX_WINDOW, split_span

# a path, an array (numpy or torch), or {"array" or "raw": samples, "sampling_rate": Hz, "path": name}
Audio = str | os.PathLike | np.ndarray | dict


def is_single(inputs: Any) -> bool:
    """True for one input (a path, an array of any shape, a dict), False for a list or other iterable."""
    return isinstance(inputs, str | os.PathLike | dict) or hasattr(inputs, "ndim")


def input_name(item: Audio) -> str | None:
    """The name a record gives an input: its path as given, a dict's "path", None for an array."""
    if isinstance(item, str | os.PathLike):
        return str(item)
    return item.get("path") if isinstance(item, dict) else None


def read_input(item: Audio, sampling_rate: int | None = None) -> tuple[str | None, np.ndarray]:
    """(name, 16 kHz mono samples) of one input; AudioError naming it when it cannot be used.

    `sampling_rate` is the rate of an array; a file's own rate, or a dict's "sampling_rate", wins.
    """
    if isinstance(item, str | os.PathLike):
        return str(item), load_audio(item)
    name, rate = None, sampling_rate
    if isinstance(item, dict):
        name, rate = item.get("path"), item.get("sampling_rate", sampling_rate)
        item = item["array"] if "array" in item else item.get("raw")
        if item is None:
            if name is None:
                raise ValueError("an input dict needs 'array' (or 'raw') and 'sampling_rate', or 'path'")
            return str(name), load_audio(name)
    return name, load_array(item, rate, name=name or "<array>")


def pooled_predict(
    forward: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
    waves: Sequence[np.ndarray],
    widths: tuple[int, int],
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """`forward` over length-sorted batches of <= 30 s pieces; each input's outputs pooled by duration.

    The one batching rule of every engine's `predict_waveforms`: waveforms (16 kHz) longer than 30 s
    are cut into equal pieces of at most 30 s whose outputs are averaged, weighted by their length.
    """
    pieces: list[tuple[int, np.ndarray]] = []  # (input index, piece)
    for i, w in enumerate(waves):
        w = np.asarray(w, dtype=np.float32).reshape(-1)
        spans = split_span(0.0, len(w) / SAMPLE_RATE, MAX_WINDOW)
        pieces.extend((i, w[round(a * SAMPLE_RATE) : round(b * SAMPLE_RATE)]) for a, b in spans)
    order = sorted(range(len(pieces)), key=lambda j: len(pieces[j][1]))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    probs = np.zeros((len(waves), widths[0]), np.float64)
    scores = np.zeros((len(waves), widths[1]), np.float64)
    weight = np.zeros(len(waves), np.float64)
    for batch in progress_bar(batches, progress, unit=" clips batch"):
        p, s = forward([pieces[j][1] for j in batch])
        for row, j in enumerate(batch):
            i, w = pieces[j][0], len(pieces[j][1])
            probs[i] += w * p[row]
            scores[i] += w * s[row]
            weight[i] += w
    weight = np.maximum(weight, 1)[:, None]
    return (probs / weight).astype(np.float32), (scores / weight).astype(np.float32)


class AudioClassifier:
    """`predict_waveforms`, `predict` and `__call__` for an engine with `classes`, `dimensions` and
    `_forward(waves, check_finite) -> (probabilities, scores)` over one batch of 16 kHz waves.

    `trained_dimensions`: the dimensions whose outputs were trained; the others are null in records.
    """

    classes: tuple[str, ...]
    dimensions: tuple[str, ...]
    trained_dimensions: tuple[str, ...] = ()

    def predict_waveforms(
        self,
        waves: Sequence[np.ndarray],
        batch_size: int = 16,
        progress: bool = False,
        *,
        check_finite: bool = True,
        sampling_rate: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Waveforms -> (probabilities [N, classes], scores [N, dims]), in input order.

        Each wave is an array as `predict` takes it (mono or up to 8 channels, float or integer PCM);
        `sampling_rate`: their rate, resampled to 16 kHz (None: they are 16 kHz). Waveforms longer
        than 30 s are cut into equal pieces of at most 30 s whose outputs are averaged, weighted by
        duration. `check_finite=False`: the waves were checked when read.
        """
        return pooled_predict(
            lambda batch: self._forward(batch, check_finite),
            [at_model_rate(array_to_mono(w, f"<wave {i}>"), sampling_rate) for i, w in enumerate(waves)],
            (len(self.classes), len(self.dimensions)),
            batch_size,
            progress,
        )

    def predict(
        self,
        inputs: Audio | Iterable[Audio],
        batch_size: int = 16,
        classes: Sequence[str] | None = None,
        progress: bool = False,
        *,
        sampling_rate: int | None = None,
        label_no_speech: bool = False,
    ) -> dict | list[dict]:
        """One input -> its record (an input that cannot be read raises its AudioError, as `__call__`
        does); a list -> one record each, a bad input giving {"file", "error"} while the rest run.

        A record: {"file", "duration", "label", "probabilities", "scores", "speech_fraction",
        "no_speech"}; a score is None for a dimension this model was not trained on, and the label is
        None for a clip without speech unless `label_no_speech`. `sampling_rate`: the rate of array
        inputs (see the module's note on rates).
        """
        single = is_single(inputs)
        keep = class_subset(classes, self.classes)
        records: list[dict] = []
        waves, slots = [], []
        for item in [inputs] if single else inputs:
            try:
                name, wave = read_input(item, sampling_rate)
            except AudioError as e:
                if single:
                    raise
                records.append({"file": input_name(item), "error": str(e)})
                continue
            records.append({"file": name, "duration": round(len(wave) / SAMPLE_RATE, 3)})
            waves.append(wave)
            slots.append(len(records) - 1)
        if waves:
            # every wave was checked finite as it was read, naming its file: not again
            probs, scores = self.predict_waveforms(
                waves, batch_size=batch_size, progress=progress, check_finite=False
            )
            for slot, wave, p, s in zip(slots, waves, probs, scores):
                speech = speech_fields(speech_fraction(wave))
                records[slot].update(self.record(p, s, keep, speech=speech, label_no_speech=label_no_speech))
        return records[0] if single else records

    def __call__(
        self,
        inputs: Audio | Iterable[Audio],
        top_k: int | None = None,
        *,
        sampling_rate: int | None = None,
        classes: Sequence[str] | None = None,
        batch_size: int = 16,
    ) -> list[dict] | list[list[dict]]:
        """[{"label", "score"}] best first (`top_k` of them; None: every class), as transformers' pipeline.

        A list of inputs gives a list of such lists. An input that cannot be read raises its AudioError
        (for one input as `predict` does). The classes are ranked whether or not the clip holds speech;
        `predict` says that (`no_speech`).
        """
        single = is_single(inputs)
        waves = [read_input(x, sampling_rate)[1] for x in ([inputs] if single else inputs)]
        keep = class_subset(classes, self.classes)
        out = []
        if waves:
            probs, scores = self.predict_waveforms(waves, batch_size=batch_size, check_finite=False)
            for p, s in zip(probs, scores):
                body = self.record(p, s, keep)
                ranked = body["probabilities"]
                # the label first (it is the argmax of the unrounded values), then by probability
                order = sorted(ranked, key=lambda c: (c != body["label"], -ranked[c]))
                out.append([{"label": c, "score": ranked[c]} for c in order[:top_k]])
        return out[0] if single else out

    def record(
        self,
        probs: np.ndarray,
        scores: np.ndarray,
        keep: Sequence[int] | None = None,
        *,
        speech: dict | None = None,
        label_no_speech: bool = False,
    ) -> dict:
        """A label, its probabilities and the dimensional scores (null where untrained), JSON-ready;
        with `speech` (`serval.vad.speech_fields`) its fields too, and no label without speech."""
        return label_body(
            probs,
            scores,
            self.classes,
            self.dimensions,
            keep,
            trained=self.trained_dimensions,
            speech=speech,
            label_no_speech=label_no_speech,
        )
