"""Voice-activity detection with Silero VAD, streamed in 32 ms frames, and the speech measure of a clip.

The model ships inside the `silero-vad` wheel (`pip install serval[vad]`) and is loaded from
there, offline. We load its TorchScript file directly instead of importing the `silero_vad`
package, because importing that package calls `torch.set_num_threads(1)` for the whole process.

`speech_fraction(wave)` (the `speech_fraction` and `no_speech` of every clip record) runs the same
network through ONNX Runtime, a whole clip in one call: no torch, no state shared between threads.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serval.audio import resample
from serval.vocab import SAMPLE_RATE

if TYPE_CHECKING:
    import torch

FRAME = 512  # samples per Silero frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame Silero sees before each frame (at 16 kHz)
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
    """The TorchScript model bundled in the installed `silero-vad` wheel."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VADUnavailableError(
            "voice-activity detection needs the silero-vad package: pip install 'serval[vad]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
    if not path.is_file():
        raise VADUnavailableError(f"{path}: Silero VAD model file missing from the silero-vad package")
    return path


_MODEL: torch.jit.ScriptModule | None = None


def load_silero_model() -> torch.jit.ScriptModule:
    """The bundled Silero VAD model (loaded once per process)."""
    import torch

    global _MODEL
    if _MODEL is None:
        with warnings.catch_warnings():  # torch 2.9+ flags TorchScript as deprecated; it is what Silero ships
            warnings.simplefilter("ignore", DeprecationWarning)
            _MODEL = torch.jit.load(str(silero_model_path()), map_location="cpu").eval()
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
        self.model.reset_states()
        self._pending = np.zeros(0, np.float32)
        self._speaking = False
        self.frames = 0  # frames emitted so far

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        """Speech probability of every frame completed by `samples` (the remainder waits for more)."""
        import torch

        x = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        n = len(x) // FRAME
        self._pending = x[n * FRAME :]
        out = np.empty(n, np.float32)
        if n:
            frames = torch.from_numpy(np.ascontiguousarray(x[: n * FRAME])).view(n, FRAME)
            # One 32 ms frame is far too small to split across threads: with several, the per-call
            # overhead makes the VAD ~4x slower, so it runs single-threaded and restores the setting.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.inference_mode():
                    for i in range(n):
                        out[i] = float(self.model(frames[i : i + 1], SAMPLE_RATE))
            finally:
                torch.set_num_threads(threads)
        self.frames += n
        return out

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

            path = silero_model_path().parent / "silero_vad_16k_sequence.onnx"
            if not path.is_file():
                raise VADUnavailableError(
                    f"{path}: Silero VAD model file missing from the silero-vad package"
                )
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1  # a recurrent net: serial
            _SESSION = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _SESSION


def frame_probabilities(wave: np.ndarray) -> np.ndarray:
    """Silero's speech probability of every 32 ms frame of a 16 kHz clip (the last one zero-padded):
    the numbers `SileroVAD.push` then `flush` give, without torch and without shared state."""
    x = np.asarray(wave, np.float32).reshape(-1)
    n = -(-len(x) // FRAME)
    if n == 0:
        return np.zeros(0, np.float32)
    frames = np.zeros((n, FRAME), np.float32)
    frames.reshape(-1)[: len(x)] = x
    context = np.concatenate([np.zeros((1, CONTEXT), np.float32), frames[:-1, -CONTEXT:]])
    inputs = np.ascontiguousarray(np.concatenate([context, frames], axis=1))
    session = _sequence_session()
    h = c = np.zeros((1, 1, 128), np.float32)
    out = []
    for at in range(0, n, _SEQUENCE_FRAMES):
        probs, h, c = session.run(None, {"input": inputs[at : at + _SEQUENCE_FRAMES], "h": h, "c": c})
        out.append(probs.reshape(-1))
    return np.concatenate(out)


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


def speech_fields(fraction: float) -> dict:
    """A record's `speech_fraction` (3 decimals) and `no_speech` (that rounded value below
    `NO_SPEECH_FRACTION`): the one rule of every clip record."""
    rounded = round(float(fraction), 3)
    return {"speech_fraction": rounded, "no_speech": rounded < NO_SPEECH_FRACTION}
