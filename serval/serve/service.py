"""The served model as every handler sees it (`app.state.service`): the predictor behind its
micro-batcher, the server's limits and metrics, and admission (load shedding) of new requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from serval.serve.batching import BatchedPredictor, MicroBatcher, QueueFullError
from serval.serve.config import ServerConfig
from serval.serve.errors import ApiError, busy
from serval.serve.metrics import Metrics


class Service:
    """One model served under one `ServerConfig`; `start` and `stop` run on the event loop."""

    def __init__(self, predictor, config: ServerConfig, metrics: Metrics):
        self.predictor, self.config, self.metrics = predictor, config, metrics
        # requests admitted that have not yet handed their audio to the batcher; while there are
        # some, the batcher's bounded wait for company is worth it
        self.arriving = 0
        self.batcher: MicroBatcher | None = None
        self.threaded: BatchedPredictor | None = None  # for code in worker threads (timelines)

    def start(self) -> None:
        cfg = self.config
        self.batcher = MicroBatcher(
            lambda waves: self.predictor.predict_waveforms(waves, batch_size=cfg.max_batch),
            max_batch=cfg.max_batch,
            max_wait=cfg.max_wait_ms / 1000,
            max_queue=cfg.max_queue,
            on_batch=self.metrics.batch,
            expecting=lambda: self.arriving,
        )
        self.batcher.start()
        self.threaded = BatchedPredictor(self.predictor, self.batcher, asyncio.get_running_loop())

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    @property
    def running(self) -> bool:
        return self.batcher is not None and self.batcher.running

    @property
    def depth(self) -> int:
        """Requests waiting for the model."""
        return self.batcher.depth if self.batcher is not None else 0

    def busy(self) -> ApiError:
        return busy(self.config.max_queue, self.config.retry_after)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place in the queue while a request is received and decoded; 503 when there is none.

        Load is shed before a body the model has no room for is read. Requests still being
        received count towards the queue too, which bounds the memory uploads can hold at once.
        """
        if self.depth + self.arriving >= self.config.max_queue:
            raise self.busy()
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def score(self, waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, scores) of `waves` from a shared model call; 503 when the queue is full."""
        try:
            return await self.batcher.submit(waves)
        except QueueFullError:
            raise self.busy() from None
