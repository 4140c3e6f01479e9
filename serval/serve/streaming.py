"""`WS /v1/stream`: live PCM in, a result per complete window out, a merged summary at the end.

The protocol (docs/serving.md): the server says "ready"; the client sends binary PCM frames and
gets a "window" message as soon as each window is complete; the client's `{"type": "end"}`
makes the server score the last, end-aligned window and send the "summary", then close.
Every error is an "error" message followed by a close with the code in the protocol's table.
At most `max_streams` streams are open at once (more are closed with 1013), and a stream that
sends nothing for `stream_idle_seconds` is closed (1008).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from serval import vocab
from serval.serve.batching import QueueFullError
from serval.serve.schemas import dumps
from serval.serve.service import Service
from serval.timeline import result_record, segment_record
from serval.windows import StreamingWindower, Window, WindowResult, merge_windows, pool

LIVE_SLACK = 5.0  # seconds of audio a live stream may be ahead of the clock (client-side buffering)
STREAM_ENCODINGS = {"pcm_s16le": ("<i2", 1 / 32768.0), "f32le": ("<f4", 1.0)}


class StreamDecoder:
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
        if sample_rate != vocab.SAMPLE_RATE:
            import soxr

            self.resampler = soxr.ResampleStream(
                sample_rate, vocab.SAMPLE_RATE, 1, dtype="float32", quality="HQ"
            )

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


def stream_summary(
    results: Sequence[WindowResult],
    classes: Sequence[str],
    dimensions: Sequence[str],
    max_segment: float,
    trained: Sequence[str],
) -> dict:
    """A finished stream: its windows merged into segments (as `serval timeline` merges them) and the
    duration-weighted emotion of the whole stream (scores null for dimensions not in `trained`)."""
    out: dict[str, Any] = {"windows": len(results), "overall": None}
    if any(r.scored for r in results):
        out["overall"] = vocab.label_body(*pool(results), classes, dimensions, trained=trained)
    out["segments"] = [
        segment_record(s, classes, dimensions, trained) for s in merge_windows(results, classes, max_segment)
    ]
    return out


def _end_of_audio(text: str | None) -> bool:
    """Whether a text frame is the client's end: `{"type": "end"}` or `end`."""
    text = (text or "").strip()
    try:
        kind = json.loads(text).get("type") if text.startswith("{") else text
    except (json.JSONDecodeError, AttributeError):
        kind = None
    return kind == "end"


class StreamSession:
    """One open stream: its grid and decoder, the windows scored so far, and the close code."""

    def __init__(self, ws: WebSocket, service: Service):
        self.ws, self.service = ws, service
        self.classes, self.dims = service.predictor.classes, service.predictor.dimensions
        self.trained = vocab.trained_dimensions(service.predictor)
        self.status = 1000
        self.results: list[WindowResult] = []
        self.windower: StreamingWindower | None = None
        self.started = time.monotonic()
        self.decoder: StreamDecoder | None = None

    async def fail(self, code: int, type_: str, message: str) -> None:
        """Send an error message and close with `code`."""
        self.status = code
        self.service.metrics.error("/v1/stream", type_)
        try:
            await self.send({"type": "error", "error": {"type": type_, "message": message}})
            await self.ws.close(code)
        except (WebSocketDisconnect, RuntimeError):  # the client is already gone
            pass

    async def send(self, message: dict) -> None:
        """One JSON text frame; a non-finite number in it is sent as null (never as invalid JSON)."""
        await self.ws.send_text(dumps(message))

    async def open(self) -> bool:
        """Read the stream's parameters and say "ready"; False (after an error) when it cannot start."""
        q, cfg = self.ws.query_params, self.service.config
        try:
            spec = cfg.window_spec(float(q.get("window", cfg.window)), float(q.get("hop", cfg.hop)))
            self.windower = StreamingWindower(spec)
            sample_rate = int(q.get("sample_rate", vocab.SAMPLE_RATE))
            encoding = q.get("encoding", "pcm_s16le")
            self.decoder = StreamDecoder(sample_rate, encoding)
        except ValueError as e:
            await self.fail(1008, "invalid_request", str(e))
            return False
        if self.service.short_queue_full():
            await self.fail(1013, "server_busy", "the model queue is full; retry later")
            return False
        ready = {"type": "ready", "sample_rate": sample_rate, "encoding": encoding}
        ready |= {"window": spec.window, "hop": spec.hop}
        await self.send(
            ready
            | {
                "classes": list(self.classes),
                "dimensions": list(self.dims),
                "trained_dimensions": list(self.trained),
            }
        )
        return True

    def lane(self) -> str:
        """ "short" while the stream is live (no further ahead of the clock than LIVE_SLACK), else
        "long": a client pushing audio faster than real time is bulk work, like a timeline."""
        ahead = self.windower.total_samples / vocab.SAMPLE_RATE - (time.monotonic() - self.started)
        return "short" if ahead <= LIVE_SLACK else "long"

    async def emit(self, windows: Sequence[Window]) -> None:
        """Score complete windows and send each one's result."""
        if not windows:
            return
        probs, scores = await self.service.batcher.submit([w.samples for w in windows], self.lane())
        for w, p, s in zip(windows, probs, scores):
            r = WindowResult(round(w.start, 3), round(w.end, 3), p, s)
            self.results.append(r)
            self.service.metrics.stream_windows += 1
            record = result_record(r, self.classes, self.dims, self.trained)
            await self.send({"type": "window", "index": len(self.results) - 1, **record})

    async def receive(self) -> bool:
        """Take audio frames until the client's end (True); False when the stream ended otherwise."""
        cfg = self.service.config
        max_samples = int(cfg.max_stream_seconds * vocab.SAMPLE_RATE)
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), cfg.stream_idle_seconds)
            except TimeoutError:
                text = f"no data for {cfg.stream_idle_seconds:g} s; the stream was closed"
                await self.fail(1008, "stream_idle", text)
                return False
            if message["type"] == "websocket.disconnect":
                self.status = 1001  # the client left without asking for the summary
                return False
            if message.get("bytes") is None:
                if _end_of_audio(message.get("text")):
                    return True
                text = 'text messages must be {"type": "end"}; send audio as binary frames'
                await self.fail(1003, "invalid_request", text)
                return False
            try:
                x = self.decoder.push(message["bytes"])
            except ValueError as e:
                await self.fail(1007, "invalid_audio", str(e))
                return False
            if self.windower.total_samples + len(x) > max_samples:
                limit = self.service.config.max_stream_seconds
                await self.fail(
                    1009, "stream_too_long", f"the stream passed the server's limit of {limit:g} s"
                )
                return False
            try:
                windows = self.windower.push(x)
            except ValueError as e:  # the grid passed the server's windows per stream
                await self.fail(1008, "too_many_windows", str(e))
                return False
            await self.emit(windows)

    async def finish(self) -> None:
        """Score the rest (the end-aligned window), send the summary and close."""
        await self.emit(self.windower.push(self.decoder.flush()))
        duration = round(self.windower.total_samples / vocab.SAMPLE_RATE, 3)
        await self.emit(self.windower.flush())
        max_segment = self.service.config.max_segment
        summary = stream_summary(self.results, self.classes, self.dims, max_segment, self.trained)
        await self.send({"type": "summary", "duration": duration, **summary})
        await self.ws.close(1000)


async def stream_session(ws: WebSocket, service: Service) -> None:
    """Serve one WebSocket stream from accept to close, counted in the metrics."""
    await ws.accept()
    t0 = time.perf_counter()
    session = StreamSession(ws, service)
    full = service.metrics.streams >= service.config.max_streams
    service.metrics.streams += 1
    try:
        if full:
            limit = service.config.max_streams
            await session.fail(1013, "too_many_streams", f"{limit} streams are open already; retry later")
        elif await session.open() and await session.receive():
            await session.finish()
    except WebSocketDisconnect:
        session.status = 1001
    except QueueFullError:
        await session.fail(1013, "server_busy", "the model queue is full; retry later")
    except ValueError as e:  # the end-aligned last window passed the windows per stream
        await session.fail(1008, "too_many_windows", str(e))
    finally:
        service.metrics.streams -= 1
        service.metrics.request("/v1/stream", session.status, time.perf_counter() - t0)
