"""The GPU path's static shapes: length buckets, padded small batches, CUDA graphs via torch.compile.

A log-mel batch `[B, n_mels, F]` is padded on the right to the next bucket width (`BUCKET_SECONDS`)
and, when small, to the next batch size of `BATCH_SIZES`, so that the forward sees a few shapes
only: one oneDNN/cuDNN plan each, and with `compile=True` one CUDA graph each
(`torch.compile(mode="reduce-overhead")`; on a CPU inductor's C++ kernels, no graphs). Padding frames
are masked by `frame_lengths` and padding rows are dropped, so the outputs are the unpadded batch's
(tested to 1e-4). Compiling is paid once, in `warmup` (`serval serve --compile` runs it before it
listens), never on a user's first call; inductor keeps its compiled kernels in its on-disk cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from serval.model import SERModel

FRAMES_PER_SECOND = 100
BUCKET_SECONDS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30)
BATCH_SIZES = (1, 2, 4, 8)  # batches up to 8 are padded and compiled; larger ones run bucketed, eager


def next_size(n: int, sizes: Sequence[int]) -> int:
    """The smallest of `sizes` that holds `n` (`n` itself beyond the largest)."""
    return next((s for s in sorted(sizes) if s >= n), n)


class StaticShapes:
    """`forward(models, features, frame_lengths)` (`ensemble_forward`) on bucketed shapes, compiled (CUDA graphs on a GPU) for small batches if asked."""

    def __init__(
        self,
        models: Sequence[SERModel],
        forward: Callable,
        autocast: Callable,
        compile: bool = False,
        widths: Sequence[int] | None = None,
        batch_sizes: Sequence[int] = BATCH_SIZES,
        backend: str = "inductor",
    ):
        cfg = models[0].config
        self.models, self.forward, self.autocast = list(models), forward, autocast
        self.widths = (
            (3000,) if cfg.pad_to_30s else tuple(widths or [s * FRAMES_PER_SECOND for s in BUCKET_SECONDS])
        )
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.compiled = None
        if compile:
            # one compile per model, then a CUDA graph per (batch, width) shape: allow that many entries
            torch._dynamo.config.cache_size_limit = max(
                torch._dynamo.config.cache_size_limit, len(self.widths) * len(self.batch_sizes) + 8
            )
            self.compiled = (
                torch.compile(self._eager, mode="reduce-overhead")
                if backend == "inductor"
                else torch.compile(self._eager, backend=backend)  # tests: no C++ build
            )

    def _eager(self, features: Tensor, frame_lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(self.models, features, frame_lengths)

    def __call__(self, features: Tensor, frame_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(probabilities, scores) of a log-mel batch, computed at its bucketed shape."""
        b, n_mels, f = features.shape
        width = next_size(f, self.widths)
        small = b <= self.batch_sizes[-1]
        rows = next_size(b, self.batch_sizes) if small else b
        padded = features.new_zeros(rows, n_mels, width)
        padded[:b, :, :f] = features
        lengths = torch.full((rows,), width, dtype=frame_lengths.dtype, device=frame_lengths.device)
        lengths[:b] = frame_lengths
        forward = self.compiled if self.compiled is not None and small else self._eager
        with self.autocast():
            probs, scores = forward(padded, lengths)
        # a CUDA graph's outputs are overwritten by its next replay: keep copies
        return probs[:b].clone(), scores[:b].clone()

    @torch.inference_mode()
    def warmup(self, batch_sizes: Sequence[int] | None = None, widths: Sequence[int] | None = None) -> int:
        """Run (and so compile and capture) every shape once; the number of shapes run."""
        device = next(self.models[0].parameters()).device
        n_mels = self.models[0].config.n_mels
        shapes = [(b, w) for w in (widths or self.widths) for b in (batch_sizes or self.batch_sizes)]
        for b, w in shapes:
            lengths = torch.full((b,), w, dtype=torch.long, device=device)
            self(torch.zeros(b, n_mels, w, device=device), lengths)
        return len(shapes)


def compile_predictor(predictor, batch_sizes: Sequence[int] = BATCH_SIZES) -> int:
    """Switch a torch `Predictor` to compiled static shapes and warm every shape up; the shapes run.

    `serval serve --compile` calls this before it listens, so no request pays for a compile.
    """
    if not hasattr(predictor, "set_static"):
        raise ValueError(f"{type(predictor).__name__}: only serval's torch models compile (--engine torch)")
    predictor.set_static(compile=True, batch_sizes=batch_sizes)
    return predictor.warmup()
