"""`serval serve`: the HTTP API, micro-batching and WebSocket streaming.

One model is loaded at startup and owned by one worker thread. Every request (an upload, the
windows of a timeline, the windows of a live stream) hands its waveforms to a `MicroBatcher`,
which gathers what arrives within `max_wait` into one model call of at most `max_batch`
waveforms, so throughput grows with load instead of requests queueing one by one. The event
loop only parses, decodes (in threads) and replies, so it stays responsive while the model runs.

The HTTP API takes audio bytes only, never a path: no request can make the server read a file
from its disk. Errors are JSON `{"error": {"type": ..., "message": ...}}` with the status codes
listed in docs/serving.md (413 too large/long, 415 wrong type, 422 undecodable, 503 busy).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import re
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from serval import __version__
from serval.audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from serval.timeline import grid_timeline, result_record
from serval.windows import StreamingWindower, WindowResult, check_grid, merge_windows, pool

log = logging.getLogger("serval.server")

ACCEPTED_TYPES = ("audio/", "application/octet-stream", "application/ogg", "multipart/form-data")
STREAM_ENCODINGS = {"pcm_s16le": ("<i2", 1 / 32768.0), "f32le": ("<f4", 1.0)}


@dataclass
class ServerConfig:
    """Limits and batching of one server; every field is a `serval serve` option."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 100.0  # whole request body, multipart envelope included
    max_clip_seconds: float = 60.0  # /v1/emotion; longer clips are pooled over <= 30 s pieces
    max_timeline_seconds: float = 4 * 3600.0  # /v1/timeline
    max_stream_seconds: float = 4 * 3600.0  # one WebSocket stream
    max_batch: int = 16  # waveforms per model call (1 = no micro-batching)
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests received or waiting for the model; more get 503 + Retry-After
    retry_after: int = 1  # seconds, in the 503's Retry-After header
    window: float = 4.0  # default timeline/stream window and hop (seconds)
    hop: float = 2.0
    min_length: float = 0.5  # shortest final window of a timeline or stream
    max_segment: float = 15.0  # longest merged segment
    graceful_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class ApiError(Exception):
    """An error answered as `{"error": {"type", "message"}}` with an HTTP status."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


class QueueFullError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- micro-batching


@dataclass(eq=False)
class _Job:
    waves: list[np.ndarray]
    future: asyncio.Future
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
    waiting; beyond it `submit` raises `QueueFullError`.
    """

    def __init__(
        self,
        predict: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
        max_batch: int = 16,
        max_wait: float = 0.010,
        max_queue: int = 64,
        on_batch: Callable[[int, int, float], None] | None = None,
        expecting: Callable[[], int] | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait >= 0")
        self.predict, self.max_batch, self.max_wait, self.max_queue = predict, max_batch, max_wait, max_queue
        self.on_batch = on_batch  # (waveforms, requests, seconds) of every model call
        self.expecting = expecting or (lambda: 1)  # requests that may still join; unknown: assume some
        self._queue: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # one thread owns the model: torch parallelises inside a call, calls never overlap
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="serval-model")

    @property
    def depth(self) -> int:
        """Requests waiting (or partly served)."""
        return len(self._queue)

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

    async def submit(self, waves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The model's (probabilities [N, classes], scores [N, dims]) for `waves`, in order."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        if not waves:
            raise ValueError("no waveforms to score")
        if self.full():
            raise QueueFullError(f"{len(self._queue)} requests are waiting for the model")
        job = _Job(list(waves), asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wakeup.set()
        return await job.future

    def _waiting_waves(self) -> int:
        return sum(len(j.waves) - j.taken for j in self._queue)

    def _take(self) -> list[tuple[_Job, int, int]]:
        taken, n = [], 0
        for job in list(self._queue):
            if n >= self.max_batch:
                break
            self._queue.remove(job)
            if job.future.done():  # its client went away
                continue
            k = min(len(job.waves) - job.taken, self.max_batch - n)
            taken.append((job, job.taken, job.taken + k))
            job.taken += k
            n += k
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
        if self.on_batch is not None:
            self.on_batch(len(waves), len({id(j) for j, _, _ in batch}), time.perf_counter() - t0)
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

    def __init__(self, predictor, batcher: MicroBatcher, loop: asyncio.AbstractEventLoop):
        self.predictor, self.batcher, self.loop = predictor, batcher, loop
        self.classes, self.dimensions, self.name = predictor.classes, predictor.dimensions, predictor.name

    def predict_waveforms(
        self, waves: Sequence[np.ndarray], batch_size: int = 16, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        return asyncio.run_coroutine_threadsafe(self.batcher.submit(list(waves)), self.loop).result()

    def record(self, probs: np.ndarray, scores: np.ndarray, keep: Sequence[int] | None = None) -> dict:
        return self.predictor.record(probs, scores, keep)


# ---------------------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, cumulative = [], 0
        for b, c in zip(self.buckets, self.counts):
            cumulative += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {cumulative}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        tail = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{tail} {self.sum:.6f}", f"{name}_count{tail} {self.count}"]
        return out


@dataclass
class Metrics:
    """Counters for `/metrics`, in the Prometheus text format. Updated on the event loop only."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    errors: dict[tuple[str, str], int] = field(default_factory=dict)
    latency: dict[str, Histogram] = field(default_factory=dict)
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    batch_requests: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    model_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    in_flight: int = 0
    streams: int = 0
    stream_windows: int = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
        self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def error(self, endpoint: str, type_: str) -> None:
        self.errors[endpoint, type_] = self.errors.get((endpoint, type_), 0) + 1

    def batch(self, waves: int, requests: int, seconds: float) -> None:
        self.batch_size.observe(waves)
        self.batch_requests.observe(requests)
        self.model_seconds.observe(seconds)

    def render(self, queue_depth: int) -> str:
        out = [
            "# HELP serval_requests_total HTTP requests and WebSocket streams, by endpoint and status.",
            "# TYPE serval_requests_total counter",
        ]
        out += [
            f'serval_requests_total{{endpoint="{e}",status="{s}"}} {n}'
            for (e, s), n in sorted(self.requests.items())
        ]
        out += [
            "# HELP serval_errors_total Failed requests by endpoint and error type.",
            "# TYPE serval_errors_total counter",
        ]
        out += [
            f'serval_errors_total{{endpoint="{e}",type="{t}"}} {n}'
            for (e, t), n in sorted(self.errors.items())
        ]
        out += [
            "# HELP serval_request_duration_seconds Time from request to response.",
            "# TYPE serval_request_duration_seconds histogram",
        ]
        for e, h in sorted(self.latency.items()):
            out += h.lines("serval_request_duration_seconds", f'endpoint="{e}"')
        for name, h, text in (
            ("serval_batch_size", self.batch_size, "Waveforms per model call."),
            ("serval_batch_requests", self.batch_requests, "Requests sharing one model call."),
            ("serval_model_seconds", self.model_seconds, "Duration of one model call."),
        ):
            out += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *h.lines(name)]
        for name, value, text in (
            ("serval_queue_depth", queue_depth, "Requests waiting for the model."),
            ("serval_in_flight_requests", self.in_flight, "HTTP requests being handled."),
            ("serval_open_streams", self.streams, "Open WebSocket streams."),
        ):
            out += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value}"]
        out += [
            "# HELP serval_stream_windows_total Windows scored for WebSocket streams.",
            "# TYPE serval_stream_windows_total counter",
            f"serval_stream_windows_total {self.stream_windows}",
        ]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- records


def label_record(
    probs: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    dimensions: Sequence[str],
    keep: Sequence[int] | None = None,
) -> dict:
    """Label, probabilities (renormalised over the `keep` subset) and scores, as `serval predict` gives them."""
    keep = list(range(len(classes))) if keep is None else list(keep)
    p = np.asarray(probs, np.float64)[keep]
    p = p / max(p.sum(), 1e-12)
    return {
        "label": classes[keep[int(np.argmax(p))]],
        "probabilities": {classes[k]: round(float(v), 6) for k, v in zip(keep, p)},
        "scores": {d: round(float(v), 6) for d, v in zip(dimensions, scores)},
    }


def stream_summary(
    results: Sequence[WindowResult], classes: Sequence[str], dimensions: Sequence[str], max_segment: float
) -> dict:
    """A finished stream: its windows merged into segments (as `serval timeline` merges them) and the
    duration-weighted emotion of the whole stream."""
    out: dict[str, Any] = {"windows": len(results), "overall": None}
    if any(r.scored for r in results):
        out["overall"] = label_record(*pool(results), classes, dimensions)
    out["segments"] = [
        {
            "start": s.start,
            "end": s.end,
            "label": s.label,
            "windows": s.windows,
            "probabilities": {c: round(float(p), 6) for c, p in zip(classes, s.probs)},
            "scores": {d: round(float(v), 6) for d, v in zip(dimensions, s.scores)},
        }
        for s in merge_windows(results, classes, max_segment)
    ]
    return out


def class_subset(spec: str | Sequence[str] | None, classes: Sequence[str]) -> list[int] | None:
    """`"neutral,angry"` (or a list) -> indices into `classes`; None keeps all. Unknown names are an error."""
    if spec is None:
        return None
    names = [c.strip() for c in spec.split(",")] if isinstance(spec, str) else [str(c).strip() for c in spec]
    names = [c for c in names if c]
    if not names:
        return None
    unknown = [c for c in names if c not in classes]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; this model knows {list(classes)}")
    return [list(classes).index(c) for c in names]


def error_type(e: AudioError) -> str:
    """`TruncatedAudioError` -> "truncated_audio"."""
    if type(e) is AudioError:
        return "invalid_audio"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__.removesuffix("Error")).lower()


# ---------------------------------------------------------------------------- the app


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class EmotionRecord(BaseModel):
    file: str
    duration: float
    label: str
    probabilities: dict[str, float]
    scores: dict[str, float]


class ModelInfo(BaseModel):
    name: str
    classes: list[str]
    dimensions: list[str]
    backbone: str | None
    version: str
    limits: dict[str, float]
    batching: dict[str, int | float]


def create_app(predictor, config: ServerConfig | None = None):
    """The FastAPI app serving `predictor` (a `serval.inference.Predictor`) with `config`'s limits."""
    cfg = config or ServerConfig()
    metrics = Metrics()
    # "arriving": requests admitted that have not yet handed their audio to the batcher; while
    # there are some, the batcher's bounded wait is worth it
    state: dict[str, Any] = {"arriving": 0}

    @asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        batcher = MicroBatcher(
            lambda waves: predictor.predict_waveforms(waves, batch_size=cfg.max_batch),
            max_batch=cfg.max_batch,
            max_wait=cfg.max_wait_ms / 1000,
            max_queue=cfg.max_queue,
            on_batch=metrics.batch,
            expecting=lambda: state["arriving"],
        )
        batcher.start()
        state["batcher"] = batcher
        state["threaded"] = BatchedPredictor(predictor, batcher, asyncio.get_running_loop())
        yield
        # uvicorn has already let in-flight requests finish (graceful shutdown) when this runs
        await batcher.stop()

    app = FastAPI(
        title="serval",
        version=__version__,
        lifespan=lifespan,
        description="Speech emotion recognition: 7 emotion classes and 3 dimensional scores.",
    )
    app.state.metrics = metrics
    app.state.config = cfg

    errors = {
        code: {"model": ErrorBody, "description": text}
        for code, text in (
            (400, "bad parameters"),
            (413, "upload or audio too large / too long"),
            (415, "not an audio content type"),
            (422, "undecodable or invalid audio"),
            (503, "the model queue is full (see Retry-After)"),
        )
    }
    upload_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                },
                "audio/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    def endpoint_of(path: str) -> str:
        return (
            path
            if path
            in (
                "/v1/emotion",
                "/v1/timeline",
                "/v1/model",
                "/healthz",
                "/metrics",
                "/v1/stream",
                "/openapi.json",
                "/docs",
            )
            else "other"
        )

    def error_response(
        request: Request, status: int, type_: str, message: str, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        metrics.error(endpoint_of(request.url.path), type_)
        return JSONResponse(
            {"error": {"type": type_, "message": message}}, status_code=status, headers=headers
        )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(request, e.status, e.type, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        return error_response(request, 400, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(request, e.status_code, kind, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request, 500, "internal_error", f"{type(e).__name__}: {e}")

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        metrics.in_flight += 1
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.in_flight -= 1
            metrics.request(endpoint_of(request.url.path), status, time.perf_counter() - t0)

    def batcher() -> MicroBatcher:
        return state["batcher"]

    @contextmanager
    def arriving() -> Iterator[None]:
        # Shed load before reading a body the model has no room for. Requests still being received
        # count towards the queue too, which bounds the memory uploads can hold at once.
        if batcher().depth + state["arriving"] >= cfg.max_queue:
            raise _busy()
        state["arriving"] += 1
        try:
            yield
        finally:
            state["arriving"] -= 1

    def _busy() -> ApiError:
        return ApiError(
            503,
            "server_busy",
            f"the model queue is full ({cfg.max_queue} requests waiting); retry later",
            {"Retry-After": str(cfg.retry_after)},
        )

    def keep_of(classes: str | None) -> list[int] | None:
        try:
            return class_subset(classes, predictor.classes)
        except ValueError as e:
            raise ApiError(400, "invalid_request", str(e)) from None

    async def read_upload(request: Request, filename: str | None) -> tuple[bytes, str]:
        ctype = request.headers.get("content-type", "")
        mime = ctype.split(";")[0].strip().lower()
        if not mime or not any(mime == t or (t.endswith("/") and mime.startswith(t)) for t in ACCEPTED_TYPES):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {mime or '(none)'!r} is not audio; send the file's bytes as audio/* or "
                "application/octet-stream, or as the 'file' field of multipart/form-data",
            )
        body = await _read_limited(request, cfg.max_upload_bytes)
        if mime != "multipart/form-data":
            return body, filename or "upload"
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def chunks():
            yield body

        try:
            form = await MultiPartParser(request.headers, chunks(), max_files=1, max_fields=16).parse()
        except MultiPartException as e:
            raise ApiError(400, "invalid_request", f"malformed multipart body: {e.message}") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        if upload is None:
            raise ApiError(400, "invalid_request", "the multipart body has no 'file' field with the audio")
        part = (upload.content_type or "").split(";")[0].strip().lower()
        if part and not (
            part.startswith("audio/") or part in ("application/octet-stream", "application/ogg")
        ):
            raise ApiError(
                415, "unsupported_media_type", f"the uploaded file's content type {part!r} is not audio"
            )
        data = await upload.read()
        await upload.close()
        return data, filename or upload.filename or "upload"

    async def check_audio(data: bytes, name: str, max_seconds: float, min_seconds: float = 0.0) -> float:
        """The audio's duration from its header; 413 when longer than `max_seconds`, 422 when not audio."""
        try:
            info = await asyncio.to_thread(audio_info, data, name=name)
        except AudioError as e:
            raise ApiError(422, error_type(e), str(e)) from None
        if info.duration > max_seconds + 1e-3:
            raise ApiError(
                413,
                "audio_too_long",
                f"{name}: {info.duration:.1f} s of audio; this endpoint takes at most {max_seconds:g} s",
            )
        if info.duration < min_seconds:
            raise ApiError(
                422,
                "audio_too_short",
                f"{name}: {info.duration:.3f} s of audio is shorter than one window ({min_seconds:g} s)",
            )
        return info.duration

    async def decode(data: bytes, name: str, max_seconds: float) -> np.ndarray:
        await check_audio(data, name, max_seconds)  # header only: refuse long audio before decoding it
        try:
            return await asyncio.to_thread(load_audio, data, name=name)
        except AudioError as e:
            raise ApiError(422, error_type(e), str(e)) from None

    async def score(waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        try:
            return await batcher().submit(waves)
        except QueueFullError:
            raise _busy() from None

    @app.post(
        "/v1/emotion",
        response_model=EmotionRecord,
        responses=errors,
        openapi_extra=upload_body,
        summary="Emotion of one audio clip",
    )
    async def emotion(
        request: Request,
        classes: str | None = Query(None, description="comma-separated subset, renormalised"),
        filename: str | None = Query(None, description="name for the record (raw uploads)"),
    ):
        """The same record as `serval predict`: label, class probabilities and dimensional scores."""
        with arriving():
            keep = keep_of(classes)
            data, name = await read_upload(request, filename)
            wave = await decode(data, name, cfg.max_clip_seconds)
        probs, scores = await score([wave])
        return {
            "file": name,
            "duration": round(len(wave) / SAMPLE_RATE, 3),
            **label_record(probs[0], scores[0], predictor.classes, predictor.dimensions, keep),
        }

    @app.post("/v1/timeline", responses=errors, openapi_extra=upload_body, summary="Emotion over time")
    async def timeline(
        request: Request,
        window: float = Query(cfg.window, gt=0, le=30, description="window length (s)"),
        hop: float = Query(cfg.hop, gt=0, le=30, description="hop between window starts (s)"),
        max_segment: float = Query(cfg.max_segment, gt=0, description="longest merged segment (s)"),
        vad: bool = Query(False, description="leave windows without speech unscored (Silero VAD)"),
        min_speech: float = Query(0.5, ge=0, le=1, description="speech fraction a window needs (vad)"),
        filename: str | None = Query(None, description="name for the record (raw uploads)"),
    ):
        """Every window of the grid and the merged segments: the JSON of `serval timeline`."""
        min_length = min(cfg.min_length, window)
        with arriving():
            try:
                check_grid(window, hop, min_length)
            except ValueError as e:
                raise ApiError(400, "invalid_request", str(e)) from None
            data, name = await read_upload(request, filename)
            duration = await check_audio(data, name, cfg.max_timeline_seconds, min_length)
        audio = io.BytesIO(data)
        audio.name = name  # decoded chunk by chunk, so a long recording never sits in memory as samples
        try:  # in a thread whose model calls go through the batcher, a batch of windows at a time
            result = await asyncio.to_thread(
                grid_timeline,
                audio,
                state["threaded"],
                window=window,
                hop=hop,
                min_length=min_length,
                vad=vad,
                min_speech=min_speech,
                max_segment=max_segment,
                batch_size=cfg.max_batch,
            )
        except QueueFullError:
            raise _busy() from None
        except AudioError as e:  # a file that breaks part-way through
            raise ApiError(422, error_type(e), str(e)) from None
        return {**result, "file": name, "duration": round(duration, 3)}

    @app.get("/v1/model", response_model=ModelInfo, summary="The served model")
    async def model_info():
        config = getattr(predictor, "config", None)
        return {
            "name": predictor.name,
            "classes": list(predictor.classes),
            "dimensions": list(predictor.dimensions),
            "backbone": getattr(config, "backbone", None),
            "version": __version__,
            "limits": {
                "max_upload_mb": cfg.max_upload_mb,
                "max_clip_seconds": cfg.max_clip_seconds,
                "max_timeline_seconds": cfg.max_timeline_seconds,
                "max_stream_seconds": cfg.max_stream_seconds,
            },
            "batching": {
                "max_batch": cfg.max_batch,
                "max_wait_ms": cfg.max_wait_ms,
                "max_queue": cfg.max_queue,
            },
        }

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        alive = "batcher" in state and batcher().running
        body = {"status": "ok" if alive else "unavailable", "queue": batcher().depth if alive else 0}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(batcher().depth), media_type="text/plain; version=0.0.4")

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        await _stream(ws, predictor, cfg, batcher(), metrics)

    return app


async def _read_limited(request, limit: int) -> bytes:
    """The request body, or 413 once it passes `limit` bytes (the rest is drained, not stored)."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(
        413, "upload_too_large", f"the upload is larger than the server's limit of {limit} bytes"
    )
    if declared.isdigit() and int(declared) > limit:
        await _drain(request, limit)
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request, limit)
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request, limit: int) -> None:
    # Reading (and dropping) a moderately oversized body lets the client see the 413 instead of a
    # reset connection; past 4x the limit the connection is simply closed after the answer.
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > 4 * limit:
                break
    except Exception:  # the client went away or the stream was already consumed
        pass


# ---------------------------------------------------------------------------- streaming


class _StreamDecoder:
    """Binary WebSocket frames of PCM at any rate -> 16 kHz float32, across frame boundaries."""

    def __init__(self, sample_rate: int, encoding: str):
        if encoding not in STREAM_ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(STREAM_ENCODINGS)}, got {encoding!r}")
        if not 1000 <= sample_rate <= 384000:
            raise ValueError(f"sample_rate must be between 1000 and 384000 Hz, got {sample_rate}")
        self.dtype, self.scale = STREAM_ENCODINGS[encoding]
        self.width = np.dtype(self.dtype).itemsize
        self.rest = b""  # a sample split across two frames
        self.resampler = None
        if sample_rate != SAMPLE_RATE:
            import soxr

            self.resampler = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def push(self, data: bytes) -> np.ndarray:
        data = self.rest + data
        cut = len(data) - len(data) % self.width
        self.rest = data[cut:]
        x = np.frombuffer(data[:cut], self.dtype).astype(np.float32) * self.scale
        if not np.isfinite(x).all():
            raise ValueError("the stream holds non-finite samples (NaN or inf)")
        return self.resampler.resample_chunk(x) if self.resampler is not None else x

    def flush(self) -> np.ndarray:
        if self.resampler is None:
            return np.zeros(0, np.float32)
        return self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)


async def _stream(ws, predictor, cfg: ServerConfig, batcher: MicroBatcher, metrics: Metrics) -> None:
    """One WebSocket stream: PCM in, a result per complete window out, a merged summary at the end."""
    from starlette.websockets import WebSocketDisconnect

    await ws.accept()
    t0 = time.perf_counter()
    status = 1000
    metrics.streams += 1
    classes, dims = predictor.classes, predictor.dimensions

    async def fail(code: int, type_: str, message: str) -> None:
        nonlocal status
        status = code
        metrics.error("/v1/stream", type_)
        try:
            await ws.send_json({"type": "error", "error": {"type": type_, "message": message}})
            await ws.close(code)
        except (WebSocketDisconnect, RuntimeError):  # the client is already gone
            pass

    try:
        q = ws.query_params
        try:
            window = float(q.get("window", cfg.window))
            hop = float(q.get("hop", cfg.hop))
            windower = StreamingWindower(window, hop, min(cfg.min_length, window))
            sample_rate, encoding = int(q.get("sample_rate", SAMPLE_RATE)), q.get("encoding", "pcm_s16le")
            decoder = _StreamDecoder(sample_rate, encoding)
        except ValueError as e:
            return await fail(1008, "invalid_request", str(e))
        if batcher.full():
            return await fail(1013, "server_busy", "the model queue is full; retry later")
        await ws.send_json(
            {
                "type": "ready",
                "sample_rate": sample_rate,
                "encoding": encoding,
                "window": window,
                "hop": hop,
                "classes": list(classes),
                "dimensions": list(dims),
            }
        )
        results: list[WindowResult] = []
        max_samples = int(cfg.max_stream_seconds * SAMPLE_RATE)

        async def emit(windows) -> None:
            if not windows:
                return
            probs, scores = await batcher.submit([w.samples for w in windows])
            for w, p, s in zip(windows, probs, scores):
                r = WindowResult(round(w.start, 3), round(w.end, 3), p, s)
                results.append(r)
                metrics.stream_windows += 1
                await ws.send_json(
                    {"type": "window", "index": len(results) - 1, **result_record(r, classes, dims)}
                )

        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                status = 1001  # the client left without asking for the summary
                return
            if message.get("bytes") is not None:
                try:
                    x = decoder.push(message["bytes"])
                except ValueError as e:
                    return await fail(1007, "invalid_audio", str(e))
                if windower.total_samples + len(x) > max_samples:
                    return await fail(
                        1009,
                        "stream_too_long",
                        f"the stream passed the server's limit of {cfg.max_stream_seconds:g} s",
                    )
                await emit(windower.push(x))
                continue
            text = (message.get("text") or "").strip()
            try:
                kind = json.loads(text).get("type") if text.startswith("{") else text
            except (json.JSONDecodeError, AttributeError):
                kind = None
            if kind != "end":
                return await fail(
                    1003,
                    "invalid_request",
                    'text messages must be {"type": "end"}; send audio as binary frames',
                )
            break
        await emit(windower.push(decoder.flush()))
        duration = round(windower.total_samples / SAMPLE_RATE, 3)
        await emit(windower.flush())
        await ws.send_json(
            {
                "type": "summary",
                "duration": duration,
                **stream_summary(results, classes, dims, cfg.max_segment),
            }
        )
        await ws.close(1000)
    except WebSocketDisconnect:
        status = 1001
    except QueueFullError:
        await fail(1013, "server_busy", "the model queue is full; retry later")
    finally:
        metrics.streams -= 1
        metrics.request("/v1/stream", status, time.perf_counter() - t0)


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    p.add_argument("--model", help="model directory, hub id or meralion:PATH (default: the bundled model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--host", default=d.host, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--max-upload-mb", type=float, default=d.max_upload_mb, help="largest request body (413 beyond)"
    )
    p.add_argument(
        "--max-clip-seconds",
        type=float,
        default=d.max_clip_seconds,
        help="longest audio for /v1/emotion (413 beyond)",
    )
    p.add_argument(
        "--max-timeline-seconds",
        type=float,
        default=d.max_timeline_seconds,
        help="longest audio for /v1/timeline (413 beyond)",
    )
    p.add_argument(
        "--max-stream-seconds", type=float, default=d.max_stream_seconds, help="longest WebSocket stream"
    )
    p.add_argument(
        "--max-batch", type=int, default=d.max_batch, help="waveforms per model call; 1 disables batching"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help="how long a request waits for others to share its model call",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="requests being received or waiting for the model before new ones get 503",
    )
    p.add_argument("--window", type=float, default=d.window, help="default timeline/stream window (s)")
    p.add_argument("--hop", type=float, default=d.hop, help="default timeline/stream hop (s)")
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=d.graceful_timeout,
        help="seconds in-flight requests get to finish on shutdown",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    names = set(asdict(ServerConfig()))
    return ServerConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from serval.inference import NoDefaultModelError, load

    cfg = config_from_args(args)
    try:
        check_grid(cfg.window, cfg.hop, min(cfg.min_length, cfg.window))
        if cfg.max_batch < 1 or cfg.max_queue < 1 or cfg.max_wait_ms < 0:
            raise ValueError("--max-batch and --max-queue must be >= 1 and --max-wait-ms >= 0")
        predictor = load(args.model, device=args.device)
    except (NoDefaultModelError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"serval serve: {e}", file=sys.stderr)
        return 2
    app = create_app(predictor, cfg)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(cfg.graceful_timeout),
        )
    )
    server.run()  # returns after SIGINT/SIGTERM once in-flight requests are done
    return 0 if server.started else 1
