"""What a predictor is: the `Predictor` Protocol that every system `serval.load` returns satisfies.

The torch engine (`serval.inference.Predictor`), the ONNX Runtime engine (`serval.onnx_engine.OnnxPredictor`,
one model or an ensemble), MERaLiON-SER-v1 (`meralion:`) and the baselines (`serval.baselines`: emotion2vec,
audio LLMs) all have these members, so windows, eval, the server and the MCP tools take any of them.
Torch-free and import-free: checking `isinstance(x, Predictor)` loads nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np


@runtime_checkable
class Predictor(Protocol):
    """A system that turns 16 kHz audio into class probabilities and dimensional scores.

    `isinstance(x, Predictor)` checks that the members exist (a `runtime_checkable` Protocol), not
    their signatures; the signatures below are the contract.
    """

    @property
    def name(self) -> str:
        """The system's display name (a model's config name, "MERaLiON-SER-v1", "emotion2vec-large", …)."""
        ...

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, in the column order of `predict_waveforms`'s probabilities."""
        ...

    @property
    def dimensions(self) -> tuple[str, ...]:
        """The dimension names, in the column order of `predict_waveforms`'s scores."""
        ...

    @property
    def fingerprint(self) -> str:
        """An identity that changes when the system does (its files, weights or settings); keys eval's cache."""
        ...

    def predict_waveforms(
        self, waves: Sequence[np.ndarray], batch_size: int = 16, progress: bool = False, **options: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """16 kHz mono waves -> (probabilities [N, classes], scores [N, dimensions]), in input order."""
        ...

    def predict(
        self,
        inputs: Any | Iterable[Any],
        batch_size: int = 16,
        classes: Sequence[str] | None = None,
        progress: bool = False,
        **options: Any,
    ) -> dict | list[dict]:
        """One input (path, array, dict) -> its record; a list -> one record each (a bad file: an error record)."""
        ...
