"""The typed errors of audio input: each names the file and the cause (`str(e)` is "<path>: <cause>").

Importable from `serval.audio` too, where they are raised.
"""

from __future__ import annotations

import os


class AudioError(ValueError):
    """An input that cannot be used as audio; `str(e)` is "<path>: <cause>"."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")

    def __reduce__(self):  # keeps the (path, cause) signature picklable across worker processes
        return (type(self), (self.path, self.cause))


class AudioNotFoundError(AudioError):
    """The path does not exist (or is not a file)."""


class EmptyAudioError(AudioError):
    """The file has 0 bytes."""


class UnsupportedAudioError(AudioError):
    """Not audio, or a format libsndfile cannot decode."""


class TruncatedAudioError(AudioError):
    """The file ends (or breaks) before the samples its header announces."""


class ZeroLengthAudioError(AudioError):
    """A valid header with no samples."""


class NonFiniteAudioError(AudioError):
    """NaN or infinite samples (float files)."""


class AudioTooShortError(AudioError):
    """Shorter than the minimum duration."""


class AudioSpanError(AudioError):
    """A start/end span that does not fit the audio."""
