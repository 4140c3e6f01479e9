"""One 4 s clip at a time through the default model on ONNX Runtime: the `serval predict` path.

    farm-bench -n 5 --timeout 600 -- python benchmarks/onnx_single_clip.py \\
        --vs 'python benchmarks/onnx_single_clip.py --blas-threads-free'

`--blas-threads-free` leaves numpy's BLAS its own thread count for the log-mel product (what serval did
before `serval.features.one_blas_thread`): the threads it wakes spin on the cores ONNX Runtime needs next.
Prints the mean milliseconds per clip; farm-bench's pair-by-pair ratio is the figure to quote.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

import serval
import serval.features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--blas-threads-free", action="store_true")
    args = ap.parse_args()
    if args.blas_threads_free:
        serval.features.one_blas_thread = contextlib.nullcontext
    model = serval.load(engine="onnx")
    wave = np.random.default_rng(0).normal(0, 0.1, 4 * 16000).astype(np.float32)
    model.predict_waveforms([wave])  # the first run builds ORT's plan
    start = time.perf_counter()
    for _ in range(args.clips):
        model.predict_waveforms([wave])
    print(f"{1000 * (time.perf_counter() - start) / args.clips:.1f} ms per clip")


if __name__ == "__main__":
    main()
