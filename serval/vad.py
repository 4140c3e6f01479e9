"""Voice-activity detection with Silero VAD, streamed in 32 ms frames, without torch.

Silero's own ONNX model (v6, 16 kHz, MIT; `serval/assets/silero_vad/`, copied from the
`silero-vad` wheel, which requires torch) runs on ONNX Runtime with numpy. Each 512-sample frame
goes in with the 64 samples before it and the recurrent state of the frame before, as Silero's
wrapper feeds it, so the probabilities are its TorchScript model's (to ~1e-5; tests/test_vad.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serval.vocab import SAMPLE_RATE

if TYPE_CHECKING:
    import onnxruntime

FRAME = 512  # samples per Silero frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the frame before that Silero (v5 on) prepends to each frame at 16 kHz
STATE_SHAPE = (2, 1, 128)  # the recurrent state of one stream
SILERO_ONNX = Path(__file__).parent / "assets" / "silero_vad" / "silero_vad_16k_op15.onnx"
_RATE = np.array(SAMPLE_RATE, np.int64)


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
        self.neg_threshold = max(threshold - 0.15, 0.01) if neg_threshold is None else neg_threshold
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
        flags = np.empty(len(probs), bool)
        for i, p in enumerate(probs):
            if p >= self.threshold:
                self._speaking = True
            elif p < self.neg_threshold:
                self._speaking = False
            flags[i] = self._speaking
        return flags
