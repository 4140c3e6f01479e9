"""Voice-activity detection with Silero VAD, streamed in 32 ms frames, without torch.

Silero's own ONNX model (v6, 16 kHz, MIT; `serval/assets/silero_vad/`, copied from the
`silero-vad` wheel, which requires torch) runs on ONNX Runtime with numpy. Each 512-sample frame
goes in with the 64 samples before it and the recurrent state of the frame before, as Silero's
wrapper feeds it, so the probabilities are its TorchScript model's (to ~1e-5; tests/test_vad.py).

`speech_fraction(wave)` (the `speech_fraction` and `no_speech` of every clip record) runs Silero's
whole-sequence ONNX graph (also vendored there), a whole clip in one call, with no state shared between threads; `streamed_speech_fraction` gives the
same figure for a recording read in blocks (long audio), carrying Silero's state between them.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soxr

from serval.audio import resample
from serval.vocab import SAMPLE_RATE

if TYPE_CHECKING:
    import onnxruntime

FRAME = 512  # samples per Silero frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the frame before that Silero (v5 on) prepends to each frame at 16 kHz
STATE_SHAPE = (2, 1, 128)  # the recurrent state of one stream
SILERO_ONNX = Path(__file__).parent / "assets" / "silero_vad" / "silero_vad_16k_op15.onnx"
SILERO_SEQUENCE_ONNX = SILERO_ONNX.with_name("silero_vad_16k_sequence.onnx")  # frames in, one call
_RATE = np.array(SAMPLE_RATE, np.int64)
SPEECH_PROBABILITY = 0.5  # Silero's own threshold: a frame turns to speech at this probability
# A clip has no speech when less than this fraction of its frames is speech (`speech_fraction`).
# Measured with benchmarks/no_speech.py: silence, dither, white, pink and brown noise, tones,
# square waves, chords and the 6 recorded noises of ../shared/data give 0.000-0.001; 80 synthetic
# melodies (harmonic notes, 1-5 s) at most 0.095 (a 1 s one; 0.063 from 2 s on). 9,673 of the
# 9,700 speech clips of the 8 corpora are above it (p1 0.10-0.77 by corpus); the 27 below are
# screamed or sobbed acted clips (ASED sad/fearful 20, RAVDESS actor 06 strong 3, BAVED 3,
# TurEV 1) that Silero does not hear as speech at either pitch.
NO_SPEECH_FRACTION = 0.1
# What a record's speech fields and its null label mean (the schemas and tool descriptions say it so).
SPEECH_FRACTION_TEXT = (
    "fraction of the clip's 32 ms frames that Silero VAD calls speech, 3 decimals (a clip it hears as "
    "no speech is heard again an octave lower, where screamed and sobbed speech is heard)"
)
NO_SPEECH_TEXT = f"true when speech_fraction is below {NO_SPEECH_FRACTION}: the clip holds no speech"
LABEL_TEXT = (
    "the most probable emotion; null when no_speech (the probabilities and scores are still given), "
    "unless the server or call asks for a label anyway (label_no_speech)"
)


class VADUnavailableError(RuntimeError):
    pass


def silero_model_path() -> Path:
    """The Silero VAD ONNX model shipped inside serval."""
    if not SILERO_ONNX.is_file():
        raise VADUnavailableError(f"{SILERO_ONNX}: Silero VAD model file missing (reinstall serval)")
    return SILERO_ONNX


_MODEL = None


def load_silero_model() -> onnxruntime.InferenceSession:
    """The Silero VAD model as an ONNX Runtime session, loaded once per process (its `run` is thread-safe)."""
    global _MODEL
    if _MODEL is None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # one 32 ms frame is far too small to split across threads: more only add per-call overhead
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        _MODEL = ort.InferenceSession(str(silero_model_path()), options, providers=["CPUExecutionProvider"])
    return _MODEL


class SileroVAD:
    """Streaming speech detector: `push` samples in any sizes, get one speech flag per 32 ms frame.

    A frame turns to speech when its probability reaches `threshold` and back to silence only
    below `threshold - 0.15` (Silero's own hysteresis), so flags do not flicker inside words.
    """

    def __init__(self, threshold: float = 0.5, neg_threshold: float | None = None):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"VAD threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.neg_threshold = release_threshold(threshold) if neg_threshold is None else neg_threshold
        self.model = load_silero_model()
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next sample pushed is frame 0 again."""
        self._state = np.zeros(STATE_SHAPE, np.float32)
        self._context = np.zeros((1, CONTEXT), np.float32)
        self._pending = np.zeros(0, np.float32)
        self._speaking = False
        self.frames = 0  # frames emitted so far

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        """Speech probability of every frame completed by `samples` (the remainder waits for more)."""
        x = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        n = len(x) // FRAME
        self._pending = x[n * FRAME :]
        out = np.empty(n, np.float32)
        for i in range(n):
            out[i] = self._step(x[i * FRAME : (i + 1) * FRAME])
        self.frames += n
        return out

    def _step(self, frame: np.ndarray) -> float:
        """One frame's speech probability; carries the state and the context to the next frame."""
        window = np.concatenate([self._context, frame[None, :]], axis=1)
        prob, self._state = self.model.run(
            ["output", "stateN"], {"input": window, "state": self._state, "sr": _RATE}
        )
        self._context = window[:, -CONTEXT:]
        return float(prob[0, 0])

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Speech flags (bool) of every frame completed by `samples`."""
        return self._flags(self.probabilities(samples))

    def flush(self) -> np.ndarray:
        """Flags for the last partial frame (zero-padded), then reset."""
        rest = self._pending
        flags = (
            self._flags(self.probabilities(np.zeros(FRAME - len(rest), np.float32)))
            if len(rest)
            else (np.zeros(0, bool))
        )
        self.reset()
        return flags

    def _flags(self, probs: np.ndarray) -> np.ndarray:
        flags = speech_flags(probs, self.threshold, self.neg_threshold, self._speaking)
        self._speaking = bool(flags[-1]) if len(flags) else self._speaking
        return flags


def release_threshold(threshold: float) -> float:
    """Silero's hysteresis: the probability below which a speech frame turns back to silence."""
    return max(threshold - 0.15, 0.01)


def speech_flags(
    probs: np.ndarray, threshold: float, neg_threshold: float, speaking: bool = False
) -> np.ndarray:
    """Speech flags of frame probabilities with Silero's hysteresis: speech from `threshold` on, until
    a frame falls below `neg_threshold`; `speaking`: the state before the first frame."""
    flags = np.empty(len(probs), bool)
    for i, p in enumerate(probs):
        if p >= threshold:
            speaking = True
        elif p < neg_threshold:
            speaking = False
        flags[i] = speaking
    return flags


# ---------------------------------------------------------------------------- a clip's speech measure

_SEQUENCE_FRAMES = 1024  # frames per ONNX call (33 s), so that a long clip's input stays small
_SESSION = None
_SESSION_LOCK = threading.Lock()


def _sequence_session():
    """Silero's whole-sequence ONNX graph (frames with their context in, one probability each out),
    loaded once per process; ONNX Runtime's `run` may be called from any number of threads at once."""
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            import onnxruntime as ort

            path = SILERO_SEQUENCE_ONNX
            if not path.is_file():
                raise VADUnavailableError(f"{path}: Silero VAD model file missing (reinstall serval)")
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1  # a recurrent net: serial
            _SESSION = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _SESSION


class FrameStream:
    """`frame_probabilities` of a clip given in blocks of any size: Silero's state, the frame context
    and the partial frame are carried from block to block, so a long recording is never held whole."""

    def __init__(self):
        self._h = self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros((1, CONTEXT), np.float32)
        self._pending = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        """Probabilities of the frames `samples` completes; `last`: the clip ends here (zero-padded)."""
        x = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        n = -(-len(x) // FRAME) if last else len(x) // FRAME
        frames = np.zeros((n, FRAME), np.float32)
        frames.reshape(-1)[: min(len(x), n * FRAME)] = x[: n * FRAME]
        self._pending = x[n * FRAME :]
        if n == 0:
            return np.zeros(0, np.float32)
        context = np.concatenate([self._context, frames[:-1, -CONTEXT:]])
        self._context = frames[-1:, -CONTEXT:].copy()
        inputs = np.ascontiguousarray(np.concatenate([context, frames], axis=1))
        session = _sequence_session()
        out = []
        for at in range(0, n, _SEQUENCE_FRAMES):
            probs, self._h, self._c = session.run(
                None, {"input": inputs[at : at + _SEQUENCE_FRAMES], "h": self._h, "c": self._c}
            )
            out.append(probs.reshape(-1))
        return np.concatenate(out)


def frame_probabilities(wave: np.ndarray) -> np.ndarray:
    """Silero's speech probability of every 32 ms frame of a 16 kHz clip (the last one zero-padded):
    the numbers `SileroVAD.push` then `flush` give, without torch and without shared state."""
    return FrameStream().push(wave, last=True)


def speech_fraction(wave: np.ndarray) -> float:
    """The fraction of a 16 kHz clip's 32 ms frames that Silero VAD calls speech (threshold 0.5, with
    its hysteresis), in [0, 1]; below `NO_SPEECH_FRACTION` the clip has no speech.

    Silero misses much screamed and sobbed speech, pitched far above a talking voice: a clip it hears
    as no speech is heard again an octave lower (its samples at half speed), and the larger counts.
    """
    fraction = _fraction(frame_probabilities(wave))
    if fraction < NO_SPEECH_FRACTION:
        lower = resample(np.asarray(wave, np.float32).reshape(-1), SAMPLE_RATE // 2)  # 2x the samples
        fraction = max(fraction, _fraction(frame_probabilities(lower)))
    return fraction


def _fraction(probs: np.ndarray) -> float:
    if not len(probs):
        return 0.0
    return float(speech_flags(probs, SPEECH_PROBABILITY, release_threshold(SPEECH_PROBABILITY)).mean())


def streamed_speech_fraction(blocks: Callable[[], Iterable[np.ndarray]]) -> float:
    """`speech_fraction` of a clip given as blocks of 16 kHz samples, in memory of one block: `blocks()`
    yields them in order, and is called again for the octave-lower hearing of a clip without speech."""
    fraction = _streamed_fraction(blocks())
    if fraction < NO_SPEECH_FRACTION:
        fraction = max(fraction, _streamed_fraction(_half_speed(blocks())))
    return fraction


def _streamed_fraction(blocks: Iterable[np.ndarray]) -> float:
    stream, speaking, frames, speech = FrameStream(), False, 0, 0
    threshold = SPEECH_PROBABILITY
    ends = (stream.push(np.zeros(0, np.float32), last=True) for _ in range(1))  # after every block
    for probs in itertools.chain((stream.push(b) for b in blocks), ends):
        flags = speech_flags(probs, threshold, release_threshold(threshold), speaking)
        speaking = bool(flags[-1]) if len(flags) else speaking
        frames, speech = frames + len(flags), speech + int(flags.sum())
    return speech / frames if frames else 0.0


def _half_speed(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    # the samples of `resample(wave, SAMPLE_RATE // 2)`, resampled as they come
    stream = soxr.ResampleStream(SAMPLE_RATE // 2, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    for block in blocks:
        yield stream.resample_chunk(np.asarray(block, np.float32).reshape(-1))
    yield stream.resample_chunk(np.zeros(0, np.float32), last=True)


def speech_fields(fraction: float) -> dict:
    """A record's `speech_fraction` (3 decimals) and `no_speech` (that rounded value below
    `NO_SPEECH_FRACTION`): the one rule of every clip record."""
    rounded = round(float(fraction), 3)
    return {"speech_fraction": rounded, "no_speech": rounded < NO_SPEECH_FRACTION}
