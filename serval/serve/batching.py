"""Micro-batching: the waveforms of concurrent requests gathered into shared model calls.

One worker thread owns the model. Every request (an upload, the windows of a timeline, the
windows of a live stream) hands its waveforms to the `MicroBatcher`, which gathers what arrives
within `max_wait` into one model call of at most `max_batch` waveforms, so throughput grows with
load instead of requests queueing one by one. Requests come in two lanes: "short" (clips, stream
windows) fill a call first, "long" (the windows of a timeline) take what room is left: at most
`max_long_batch` waveforms, and no more audio than recent calls say the model gets through in
`long_call` seconds (one waveform, before any call has shown the model's speed). So a short clip arriving while long work runs waits for at most one short
model call, on a slow CPU as on a fast GPU.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serval import vocab


class QueueFullError(RuntimeError):
    """The batcher has `max_queue` requests waiting."""


class ClientGoneError(RuntimeError):
    """The client of a request went away, so its remaining work was dropped."""


@dataclass(eq=False)
class _Job:
    waves: list[np.ndarray]
    future: asyncio.Future
    lane: str = "short"
    taken: int = 0  # waves handed to the model so far
    done: int = 0  # waves with results
    probs: np.ndarray | None = None
    scores: np.ndarray | None = None


class MicroBatcher:
    """Gathers the waveforms of concurrent requests into model calls of at most `max_batch`.

    After the first waiting request, up to `max_wait` seconds pass for others to join, but only
    while `expecting()` says more requests are on their way (being uploaded or decoded), so a lone
    request is never kept waiting for company that is not coming. A request
    with more waveforms than fit (a timeline) is served a batch at a time, round-robin with the
    others, so one long request cannot hold short ones back. `max_queue` bounds the requests
    waiting; beyond it `submit` raises `QueueFullError`. Short-lane requests are taken before
    long-lane ones (see the module doc).
    """

    def __init__(
        self,
        predict: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
        max_batch: int = 16,
        max_wait: float = 0.010,
        max_queue: int = 64,
        max_long_batch: int | None = None,
        long_call: float | None = None,
        on_batch: Callable[[int, int, float], None] | None = None,
        expecting: Callable[[], int] | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait >= 0")
        self.predict, self.max_batch, self.max_wait, self.max_queue = predict, max_batch, max_wait, max_queue
        self.max_long_batch = min(max_long_batch or max_batch, max_batch)
        self.long_call = long_call  # seconds a call with long work should take (None: no bound)
        self._per_sample: float | None = None  # model seconds per audio sample, from recent calls
        self.on_batch = on_batch  # (waveforms, requests, seconds) of every model call
        self.expecting = expecting or (lambda: 1)  # requests that may still join; unknown: assume some
        self._queue: deque[_Job] = deque()  # both lanes, each in arrival (round-robin) order
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # one thread owns the model: torch parallelises inside a call, calls never overlap
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="serval-model")

    @property
    def depth(self) -> int:
        """Requests waiting (or partly served)."""
        return len(self._queue)

    def lane_depth(self, lane: str) -> int:
        """Requests of one lane waiting (or partly served)."""
        return sum(1 for j in self._queue if j.lane == lane)

    def full(self) -> bool:
        return len(self._queue) >= self.max_queue

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="serval-batcher")

    async def stop(self) -> None:
        """Stop after the current model call; waiting requests fail with a shutdown error."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    async def submit(self, waves: Sequence[np.ndarray], lane: str = "short") -> tuple[np.ndarray, np.ndarray]:
        """The model's (probabilities [N, classes], scores [N, dims]) for `waves`, in order.

        Cancelling the caller drops the request's waveforms not yet handed to the model.
        """
        if not self.running:
            raise RuntimeError("the batcher is not running")
        if not waves:
            raise ValueError("no waveforms to score")
        if self.full():
            raise QueueFullError(f"{len(self._queue)} requests are waiting for the model")
        job = _Job(list(waves), asyncio.get_running_loop().create_future(), lane)
        self._queue.append(job)
        self._wakeup.set()
        return await job.future

    def _waiting_waves(self) -> int:
        return sum(len(j.waves) - j.taken for j in self._queue)

    def _long_room(self, job: _Job, n: int, n_long: int, samples: float) -> int:
        # long waveforms of `job` that fit beside the `n` taken: within max_long_batch, and
        # within the long_call budget of audio (always at least one, so long work moves on)
        room = min(self.max_batch - n, self.max_long_batch - n_long)
        if self.long_call is None:
            return room
        if self._per_sample is None:  # the model's speed is not known yet: one waveform measures it,
            # so a long recording's first call is no larger than a short one's (not max_long_batch)
            return min(room, 1 - n_long)
        budget, k = self.long_call / self._per_sample, 0
        while k < room and job.taken + k < len(job.waves):
            samples += len(job.waves[job.taken + k])
            if samples > budget and n_long + k > 0:
                break
            k += 1
        return k

    def _take(self) -> list[tuple[_Job, int, int]]:
        taken, n, n_long, samples = [], 0, 0, 0
        for job in [j for j in self._queue if j.lane == "short"] + [
            j for j in self._queue if j.lane != "short"
        ]:
            short = job.lane == "short"
            room = self.max_batch - n if short else self._long_room(job, n, n_long, samples)
            if room <= 0:
                continue
            self._queue.remove(job)
            if job.future.done():  # its client went away (the caller was cancelled)
                continue
            k = min(len(job.waves) - job.taken, room)
            samples += sum(len(w) for w in job.waves[job.taken : job.taken + k])
            taken.append((job, job.taken, job.taken + k))
            job.taken += k
            n += k
            n_long += k if job.lane != "short" else 0
            if job.taken < len(job.waves):
                self._queue.append(job)  # the rest waits its turn behind the others
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + self.max_wait
            while (
                self._waiting_waves() < self.max_batch
                and self.expecting() > 0
                and (left := deadline - loop.time()) > 0
            ):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._serve(loop, batch)

    async def _serve(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[_Job, int, int]]) -> None:
        waves = [w for job, a, b in batch for w in job.waves[a:b]]
        t0 = time.perf_counter()
        try:
            probs, scores = await loop.run_in_executor(self._executor, self.predict, waves)
        except Exception as e:
            if len(batch) > 1:  # do not let one request's failure take the others down: retry each alone
                for part in batch:
                    await self._serve(loop, [part])
                return
            job = batch[0][0]
            if job in self._queue:
                self._queue.remove(job)
            if not job.future.done():
                job.future.set_exception(e)
            return
        took = time.perf_counter() - t0
        per_sample = took / max(1, sum(len(w) for w in waves))
        self._per_sample = (
            per_sample if self._per_sample is None else 0.7 * self._per_sample + 0.3 * per_sample
        )
        if self.on_batch is not None:
            self.on_batch(len(waves), len({id(j) for j, _, _ in batch}), took)
        row = 0
        for job, a, b in batch:
            p, s = probs[row : row + b - a], scores[row : row + b - a]
            row += b - a
            if job.future.done():
                continue
            if job.probs is None:
                job.probs = np.zeros((len(job.waves), p.shape[1]), np.float32)
                job.scores = np.zeros((len(job.waves), s.shape[1]), np.float32)
            job.probs[a:b], job.scores[a:b] = p, s
            job.done += b - a
            if job.done == len(job.waves):
                job.future.set_result((job.probs, job.scores))


class BatchedPredictor:
    """The predictor as code running in a worker thread sees it: `predict_waveforms` goes through
    the server's micro-batcher (so timelines share model calls with everything else)."""

    def __init__(
        self,
        predictor,
        batcher: MicroBatcher,
        loop: asyncio.AbstractEventLoop,
        lane: str = "long",
        cancel: threading.Event | None = None,
    ):
        self.predictor, self.batcher, self.loop, self.lane = predictor, batcher, loop, lane
        self.cancel = cancel or threading.Event()  # set when the client has gone: stop scoring
        self.classes, self.dimensions, self.name = predictor.classes, predictor.dimensions, predictor.name
        self.trained_dimensions = vocab.trained_dimensions(predictor)

    def predict_waveforms(
        self, waves: Sequence[np.ndarray], batch_size: int = 16, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores through the batcher; ClientGoneError as soon as `cancel` is set."""
        if self.cancel.is_set():
            raise ClientGoneError("the client went away")
        future = asyncio.run_coroutine_threadsafe(self.batcher.submit(list(waves), self.lane), self.loop)
        while True:
            try:
                return future.result(timeout=0.05)
            except TimeoutError:
                if self.cancel.is_set():
                    future.cancel()  # the batcher drops the waveforms not yet scored
                    raise ClientGoneError("the client went away") from None
