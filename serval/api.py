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
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from serval.audio import AudioError, array_to_mono
from serval.longform import (
    CALL_BUDGET,
    WINDOW_BATCHES,
    LongAudio,
    at_rate,
    count_pieces,
    load_long_array,
    note_once,
    pooled_predict,
    pooling_note,
    read_audio,
    speech_of,
)
from serval.progress import progress_bar
from serval.session import calibrate
from serval.vad import speech_fields
from serval.vocab import SAMPLE_RATE, class_subset, label_body

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
    # `load_array`'s conversions; a long array at another rate is resampled as it is scored
    return name, load_long_array(item, rate, name=name or "<array>")


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
        """Waveforms -> (probabilities [N, classes], scores [N, dims]), in input order.

        Each wave is an array as `predict` takes it (mono or up to 8 channels, float or integer PCM)
        or a `LongAudio`; `sampling_rate`: the arrays' rate, resampled to 16 kHz (None: they are
        16 kHz). Waveforms longer than 30 s are cut into equal pieces of at most 30 s whose outputs
        are averaged, weighted by duration (`serval.longform`). `check_finite=False`: the waves were
        checked when read.
        """
        return pooled_predict(
            lambda batch: self._forward(batch, check_finite),
            [
                w if isinstance(w, LongAudio) else at_rate(array_to_mono(w, f"<wave {i}>"), sampling_rate)
                for i, w in enumerate(waves)
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
        label_no_speech: bool = False,
        session: bool | Sequence[Hashable] = False,
    ) -> dict | list[dict]:
        """One input -> its record (an input that cannot be read raises its AudioError, as `__call__`
        does); a list -> one record each, a bad input giving {"file", "error"} while the rest run.

        A record: {"file", "duration", "pieces", "label", "probabilities", "scores", "speech_fraction",
        "no_speech"}; `pieces` is how many <= 30 s pieces it pools (1 within the window); a score is
        None for a dimension this model was not trained on, and the label is None for a clip without
        speech unless `label_no_speech`. `sampling_rate`: the rate of array inputs (see the module's
        note on rates). `session`: calibrate a list's results against each other (`serval.session`):
        True, the whole list as one group, or each input's group name (e.g. its speaker).
        """
        single = is_single(inputs)
        if single and session is not False:
            raise ValueError("session calibrates a list of inputs against each other; give a list")
        keep = class_subset(classes, self.classes)
        records: list[dict] = []
        window: list[tuple[int, np.ndarray | LongAudio]] = []  # (record, samples), scored a window at a time
        bar = progress_bar(enabled=progress, unit=" input", desc="predict")
        score = dict(
            keep=keep, batch_size=batch_size, bar=bar, label_no_speech=label_no_speech, single=single
        )
        for item in [inputs] if single else inputs:
            try:
                name, wave = read_input(item, sampling_rate)
            except AudioError as e:
                if single:
                    raise
                records.append({"file": input_name(item), "error": str(e)})
                continue
            pieces = count_pieces(len(wave))
            records.append({"file": name, "duration": round(len(wave) / SAMPLE_RATE, 3), "pieces": pieces})
            if pieces > 1:
                note_once(pooling_note(name, len(wave) / SAMPLE_RATE, pieces))
            window.append((len(records) - 1, wave))
            if len(window) >= batch_size * WINDOW_BATCHES:  # memory does not grow with the number of inputs
                self._score_window(records, window, **score)
                window = []
        self._score_window(records, window, **score)
        if bar is not None:
            bar.close()
        if session is not False:
            records = calibrate(records, ["all"] * len(records) if session is True else list(session))
        return records[0] if single else records

    def _score_window(
        self,
        records: list[dict],
        window: list,
        *,
        keep,
        batch_size: int,
        bar,
        label_no_speech: bool,
        single: bool,
    ) -> None:
        # clips are batched together; a long file is read and scored on its own, piece by piece
        jobs = [[(k, w) for k, w in window if not isinstance(w, LongAudio)]]
        jobs += [[(k, w)] for k, w in window if isinstance(w, LongAudio)]
        for job in filter(None, jobs):
            try:  # every wave was checked finite as it was read, naming its file: not again
                probs, scores = self.predict_waveforms(
                    [w for _, w in job], batch_size=batch_size, check_finite=False
                )
                speech = [speech_fields(speech_of(w)) for _, w in job]
            except AudioError as e:  # a long file read piece by piece can break part-way through
                if single:
                    raise
                records[job[0][0]] = {"file": records[job[0][0]]["file"], "error": str(e)}
                continue
            for (k, _), p, s, fields in zip(job, probs, scores, speech):
                records[k].update(self.record(p, s, keep, speech=fields, label_no_speech=label_no_speech))
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
