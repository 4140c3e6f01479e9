"""The served model as every handler sees it (`app.state.service`): the predictor behind its
micro-batcher, the server's limits and metrics, and admission (load shedding) of new requests.

Admission is decided before a request's body is read (`refusal`, called by the `shed` middleware
before routing), so a 503 costs no upload, no decoding and no thread. What is counted:

- `receiving`: uploads whose body is still arriving. They hold no place in the model's queue (a
  stalled upload must not keep others out) but are bounded by `max_receiving`, and each one is
  answered 408 once it stalls (`uploads.read_limited`).
- `waiting`: clips (`/v1/emotion`) whose body has arrived, being decoded or queued for the model
  (short-lane requests in the batcher, stream windows included); bounded by `max_queue`.
- `timelines`: timelines (and clips longer than one 30 s piece) being worked on; bounded by
  `max_timelines`. An admitted request is never refused later for lack of room.
- with a memory budget, `max_requests` bounds the three together (`ServerConfig.budgeted`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from serval.audio import AudioError
from serval.longform import CALL_BUDGET, LongAudio, count_pieces, pooled_predict, read_audio
from serval.serve.batching import BatchedPredictor, MicroBatcher, QueueFullError
from serval.serve.config import ServerConfig
from serval.serve.errors import ApiError, audio_error, busy
from serval.serve.metrics import Metrics
from serval.serve.schemas import SafeJSONResponse
from serval.serve.uploads import check_audio, decode
from serval.vocab import SAMPLE_RATE


def lower_thread_priority(increment: int) -> None:
    """Make the calling thread `increment` nicer (Linux schedules threads on their own; elsewhere a no-op).

    A timeline decodes and runs VAD over minutes of audio in its thread; at a lower priority that
    work yields the cores to the model thread and to clips, which keeps short requests fast."""
    if increment <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError:  # not permitted or not supported: the thread keeps its priority
        pass


class Service:
    """One model served under one `ServerConfig`; `start` and `stop` run on the event loop."""

    def __init__(self, predictor, config: ServerConfig, metrics: Metrics):
        self.predictor, self.config, self.metrics = predictor, config, metrics
        self.receiving = 0  # bodies being received
        self.decoding = 0  # received, not yet handed to the batcher: worth waiting for in a batch
        self.timelines = 0  # timelines being worked on
        self.batcher: MicroBatcher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # timelines run in their own threads (their model calls go through the batcher), so the
        # default executor stays free for decoding clips
        self.timeline_pool = ThreadPoolExecutor(
            config.max_timelines,
            thread_name_prefix="serval-timeline",
            initializer=lower_thread_priority,
            initargs=(config.timeline_nice,),
        )

    def start(self) -> None:
        cfg = self.config
        self.batcher = MicroBatcher(
            lambda waves: self.predictor.predict_waveforms(waves, batch_size=cfg.max_batch),
            max_batch=cfg.max_batch,
            max_wait=cfg.max_wait_ms / 1000,
            # a safety net only: every request in the queue was admitted within the limits below
            max_queue=cfg.max_queue + cfg.max_timelines + cfg.max_streams,
            max_long_batch=cfg.max_long_batch,
            long_call=cfg.long_call_ms / 1000 if cfg.long_call_ms > 0 else None,
            on_batch=self.metrics.batch,
            expecting=lambda: self.decoding,
        )
        self.batcher.start()
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.timeline_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self.batcher is not None and self.batcher.running

    @property
    def depth(self) -> int:
        """Requests waiting for the model."""
        return self.batcher.depth if self.batcher is not None else 0

    def threaded(self, cancel: threading.Event | None = None) -> BatchedPredictor:
        """The predictor for code in a worker thread (a timeline): long lane, stopped by `cancel`."""
        return BatchedPredictor(self.predictor, self.batcher, self.loop, "long", cancel)

    @property
    def waiting(self) -> int:
        """Short requests decoded or being decoded and not yet taken by the model."""
        queued = self.batcher.lane_depth("short") if self.batcher is not None else 0
        return self.decoding + queued

    def busy(self) -> ApiError:
        return busy(self.config.max_queue, self.config.retry_after)

    def refusal(self, path: str) -> ApiError | None:
        """The 503 for a new request to `path` when there is no room for it, else None."""
        cfg = self.config
        if path == "/v1/emotion":
            full = self.waiting >= cfg.max_queue
        elif path == "/v1/timeline":
            full = self.timelines >= cfg.max_timelines
        else:
            return None
        holding = self.receiving + self.waiting + self.timelines
        full = full or (cfg.max_requests is not None and holding >= cfg.max_requests)
        return self.busy() if full or self.receiving >= cfg.max_receiving else None

    def short_queue_full(self) -> bool:
        return self.waiting >= self.config.max_queue

    @contextmanager
    def _counting(self, name: str) -> Iterator[None]:
        setattr(self, name, getattr(self, name) + 1)
        try:
            yield
        finally:
            setattr(self, name, getattr(self, name) - 1)

    def receiving_body(self):
        """Count a body being received (`receiving`)."""
        return self._counting("receiving")

    def timeline(self):
        """Count a timeline until its answer is known (`timelines`)."""
        return self._counting("timelines")

    def decoding_body(self):
        """Count a body being decoded before its waveforms go to the batcher (`decoding`, `waiting`)."""
        return self._counting("decoding")

    async def score(self, waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, scores) of `waves` from a shared model call (short lane)."""
        try:
            return await self.batcher.submit(waves)
        except QueueFullError:
            raise self.busy() from None

    async def clip(self, data: bytes | str, name: str) -> np.ndarray | LongAudio:
        """An upload for /v1/emotion (its bytes or spooled file, `Upload.source`), checked from its header
        (413 beyond `max_clip_seconds`): its samples, or, beyond one 30 s piece, a LongAudio over it,
        decoded piece by piece as it is scored."""
        limit = self.config.max_clip_seconds
        duration = await check_audio(data, name, limit, note=self.config.limit_note)
        if count_pieces(round(duration * SAMPLE_RATE)) == 1:
            return await decode(data, name, limit)
        try:
            return await asyncio.to_thread(read_audio, data, name=name)
        except AudioError as e:
            raise audio_error(e) from None

    def score_long(self, audio: LongAudio, gone: threading.Event) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [1, C], scores [1, D]) of a long clip, run in a worker thread: its pieces go
        to the model a bounded batch at a time on the long lane, so clips are served in between."""
        widths = (len(self.predictor.classes), len(self.predictor.dimensions))
        forward = self.threaded(gone).predict_waveforms
        return pooled_predict(forward, [audio], widths, self.config.max_long_batch, budget=CALL_BUDGET)


class ShedLoad:
    """ASGI middleware: an upload the service has no room for is answered 503 before routing,
    before its body is read and before any thread is used, so a refusal costs microseconds."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            refusal = self.service.refusal(scope["path"])
            if refusal is not None:
                self.service.metrics.error(scope["path"], refusal.type)
                body = {"error": {"type": refusal.type, "message": refusal.message}}
                response = SafeJSONResponse(body, status_code=refusal.status, headers=refusal.headers)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
