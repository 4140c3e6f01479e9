"""Voice-activity detection with Silero VAD, streamed in 32 ms frames.

The model ships inside the `silero-vad` wheel (`pip install serval[vad]`) and is loaded from
there, offline. We load its TorchScript file directly instead of importing the `silero_vad`
package, because importing that package calls `torch.set_num_threads(1)` for the whole process.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

from serval.vocab import SAMPLE_RATE

FRAME = 512  # samples per Silero frame at 16 kHz (32 ms)


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
        self.neg_threshold = max(threshold - 0.15, 0.01) if neg_threshold is None else neg_threshold
        self.model = load_silero_model()
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next sample pushed is frame 0 again."""
        self.model.reset_states()
        self._pending = np.zeros(0, np.float32)
        self._speaking = False
        self.frames = 0  # frames emitted so far

    @torch.inference_mode()
    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        """Speech probability of every frame completed by `samples` (the remainder waits for more)."""
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
        flags = np.empty(len(probs), bool)
        for i, p in enumerate(probs):
            if p >= self.threshold:
                self._speaking = True
            elif p < self.neg_threshold:
                self._speaking = False
            flags[i] = self._speaking
        return flags
