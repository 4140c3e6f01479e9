"""The calls every serval predictor shares, built on its `predict_waveforms` (torch or ONNX alike).

- `predict(x)`: one record for one input (a path, an array, or a datasets-style dict), a list of
  records for a list; a bad file gives an error record and the rest still run.
- `predictor(x, top_k=None)`: `[{"label", "score"}]` best first, the shape of transformers'
  audio-classification pipeline (a list of such lists for a list).

Sample rates: a file is read at its own rate (from its header) and resampled to 16 kHz. An array
carries no rate: pass `sampling_rate=` (or a dict with "sampling_rate") and it is resampled; an
array given without one is taken to be 16 kHz, the only case where a rate is assumed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from serval.audio import AudioError, EmptyAudioError, check_finite
from serval.longform import (
    CALL_BUDGET,
    WINDOW_BATCHES,
    LongAudio,
    at_rate,
    count_pieces,
    note_once,
    pooled_predict,
    pooling_note,
    read_audio,
)
from serval.progress import progress_bar
from serval.vocab import SAMPLE_RATE, class_subset, label_body

# a path, a mono array (numpy or torch), or {"array" or "raw": samples, "sampling_rate": Hz, "path": name}
Audio = str | os.PathLike | np.ndarray | dict


def is_single(inputs: Any) -> bool:
    """True for one input (a path, a 1-D array, a dict), False for a list or batch of them."""
    return isinstance(inputs, str | os.PathLike | dict) or getattr(inputs, "ndim", None) == 1


def check_array(array: Any, name: str = "<array>") -> np.ndarray:
    """Samples as float32 [N]; EmptyAudioError or NonFiniteAudioError naming `name`."""
    wave = np.asarray(array, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        raise EmptyAudioError(name, "no samples")
    check_finite(wave, name)
    return wave


def at_model_rate(wave: np.ndarray, sampling_rate: int | None) -> np.ndarray | LongAudio:
    """`wave` resampled from `sampling_rate` to 16 kHz (None: it is 16 kHz already); beyond one 30 s
    piece, a LongAudio resampled piece by piece as it is scored, so only a piece is added to memory."""
    if sampling_rate is None or int(sampling_rate) == SAMPLE_RATE:
        return wave
    if not 1000 <= int(sampling_rate) <= 384_000:
        raise ValueError(f"sampling_rate must be between 1000 and 384000 Hz, got {sampling_rate}")
    return at_rate(wave, int(sampling_rate))


def input_name(item: Audio) -> str | None:
    """The name a record gives an input: its path as given, a dict's "path", None for an array."""
    if isinstance(item, str | os.PathLike):
        return str(item)
    return item.get("path") if isinstance(item, dict) else None


def read_input(item: Audio, sampling_rate: int | None = None) -> tuple[str | None, np.ndarray | LongAudio]:
    """(name, 16 kHz mono samples) of one input; AudioError naming it when it cannot be used.

    A file longer than one 30 s piece is a LongAudio: read piece by piece when it is scored.

    `sampling_rate` is the rate of an array; a file's own rate, or a dict's "sampling_rate", wins.
    """
    if isinstance(item, str | os.PathLike):
        return str(item), read_audio(item)
    name, rate = None, sampling_rate
    if isinstance(item, dict):
        name, rate = item.get("path"), item.get("sampling_rate", sampling_rate)
        item = item["array"] if "array" in item else item.get("raw")
        if item is None:
            if name is None:
                raise ValueError("an input dict needs 'array' (or 'raw') and 'sampling_rate', or 'path'")
            return str(name), read_audio(name)
    if hasattr(item, "detach"):  # a torch tensor, without importing torch here
        item = item.detach().cpu().numpy()
    return name, at_model_rate(check_array(item, name or "<array>"), rate)


class AudioClassifier:
    """`predict_waveforms`, `predict` and `__call__` for an engine with `classes`, `dimensions` and
    `_forward(waves, check_finite) -> (probabilities, scores)` over one batch of 16 kHz waves.

    `trained_dimensions`: the dimensions whose outputs were trained; the others are null in records.
    """

    classes: tuple[str, ...]
    dimensions: tuple[str, ...]
    trained_dimensions: tuple[str, ...] = ()
    # the most work one model call holds (serval.longform.work); None: `batch_size` alone bounds a call
    call_budget: float | None = CALL_BUDGET

    def predict_waveforms(
        self,
        waves: Sequence[np.ndarray | LongAudio],
        batch_size: int = 16,
        progress: bool = False,
        *,
        check_finite: bool = True,
        sampling_rate: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mono waveforms -> (probabilities [N, classes], scores [N, dims]), in input order.

        `sampling_rate`: the waves' rate, resampled to 16 kHz (None: they are 16 kHz). Waveforms
        longer than 30 s are cut into equal pieces of at most 30 s whose outputs are averaged,
        weighted by duration (`serval.longform`). `check_finite=False`: the waves were checked when read.
        """
        return pooled_predict(
            lambda batch: self._forward(batch, check_finite),
            [
                w
                if isinstance(w, LongAudio)
                else at_model_rate(np.asarray(w, np.float32).reshape(-1), sampling_rate)
                for w in waves
            ],
            (len(self.classes), len(self.dimensions)),
            batch_size,
            progress,
            self.call_budget,
        )

    def predict(
        self,
        inputs: Audio | Iterable[Audio],
        batch_size: int = 16,
        classes: Sequence[str] | None = None,
        progress: bool = False,
        *,
        sampling_rate: int | None = None,
    ) -> dict | list[dict]:
        """One input -> its record; a list -> one record each (a bad file: an error record, the rest run).

        A record: {"file", "duration", "pieces", "label", "probabilities", "scores"}, or {"file", "error"};
        `pieces` is how many <= 30 s pieces it pools (1 within the window); a score is None for a
        dimension this model was not trained on.
        `sampling_rate`: the rate of array inputs (see the module's note on rates).
        """
        if is_single(inputs):
            return self.predict([inputs], batch_size, classes, progress, sampling_rate=sampling_rate)[0]
        keep = class_subset(classes, self.classes)
        records: list[dict] = []
        window: list[tuple[int, np.ndarray | LongAudio]] = []  # (record, samples), scored a window at a time
        bar = progress_bar(enabled=progress, unit=" input", desc="predict")
        for item in inputs:
            try:
                name, wave = read_input(item, sampling_rate)
            except AudioError as e:
                records.append({"file": input_name(item), "error": str(e)})
                continue
            pieces = count_pieces(len(wave))
            records.append({"file": name, "duration": round(len(wave) / SAMPLE_RATE, 3), "pieces": pieces})
            if pieces > 1:
                note_once(pooling_note(name, len(wave) / SAMPLE_RATE, pieces))
            window.append((len(records) - 1, wave))
            if len(window) >= batch_size * WINDOW_BATCHES:  # memory does not grow with the number of inputs
                self._score_window(records, window, keep, batch_size, bar)
                window = []
        self._score_window(records, window, keep, batch_size, bar)
        if bar is not None:
            bar.close()
        return records

    def _score_window(self, records: list[dict], window: list, keep, batch_size: int, bar) -> None:
        # clips are batched together; a long file is read and scored on its own, piece by piece
        jobs = [[(k, w) for k, w in window if not isinstance(w, LongAudio)]]
        jobs += [[(k, w)] for k, w in window if isinstance(w, LongAudio)]
        for job in filter(None, jobs):
            try:  # every wave was checked finite as it was read, naming its file: not again
                probs, scores = self.predict_waveforms(
                    [w for _, w in job], batch_size=batch_size, check_finite=False
                )
            except AudioError as e:  # a long file read piece by piece can break part-way through
                records[job[0][0]] = {"file": records[job[0][0]]["file"], "error": str(e)}
                continue
            for (k, _), p, s in zip(job, probs, scores):
                records[k].update(self.record(p, s, keep))
            if bar is not None:
                bar.update(len(job))

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

        A list of inputs gives a list of such lists. An input that cannot be read raises its AudioError.
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

    def record(self, probs: np.ndarray, scores: np.ndarray, keep: Sequence[int] | None = None) -> dict:
        """A label, its probabilities and the dimensional scores (null where untrained), JSON-ready."""
        return label_body(probs, scores, self.classes, self.dimensions, keep, trained=self.trained_dimensions)
