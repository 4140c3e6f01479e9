"""Counters and histograms for `/metrics`, in the Prometheus text format."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# the paths counted by name; anything else is "other", so scanners cannot grow the label set
ENDPOINTS = (
    "/v1/emotion",
    "/v1/timeline",
    "/v1/model",
    "/health",
    "/healthz",
    "/metrics",
    "/v1/stream",
    "/openapi.json",
    "/docs",
)


def endpoint_of(path: str) -> str:
    """The metrics label of a request path."""
    return path if path in ENDPOINTS else "other"


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
        out = _family(
            "serval_requests_total", "HTTP requests and WebSocket streams, by endpoint and status.", "counter"
        )
        out += [
            f'serval_requests_total{{endpoint="{e}",status="{s}"}} {n}'
            for (e, s), n in sorted(self.requests.items())
        ]
        out += _family("serval_errors_total", "Failed requests by endpoint and error type.", "counter")
        out += [
            f'serval_errors_total{{endpoint="{e}",type="{t}"}} {n}'
            for (e, t), n in sorted(self.errors.items())
        ]
        out += _family("serval_request_duration_seconds", "Time from request to response.", "histogram")
        for e, h in sorted(self.latency.items()):
            out += h.lines("serval_request_duration_seconds", f'endpoint="{e}"')
        for name, h, text in (
            ("serval_batch_size", self.batch_size, "Waveforms per model call."),
            ("serval_batch_requests", self.batch_requests, "Requests sharing one model call."),
            ("serval_model_seconds", self.model_seconds, "Duration of one model call."),
        ):
            out += [*_family(name, text, "histogram"), *h.lines(name)]
        for name, value, text in (
            ("serval_queue_depth", queue_depth, "Requests waiting for the model."),
            ("serval_in_flight_requests", self.in_flight, "HTTP requests being handled."),
            ("serval_open_streams", self.streams, "Open WebSocket streams."),
        ):
            out += [*_family(name, text, "gauge"), f"{name} {value}"]
        out += _family("serval_stream_windows_total", "Windows scored for WebSocket streams.", "counter")
        out.append(f"serval_stream_windows_total {self.stream_windows}")
        return "\n".join(out) + "\n"


def _family(name: str, text: str, kind: str) -> list[str]:
    """The HELP and TYPE lines that open a Prometheus metric family."""
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


class Observe:
    """ASGI middleware: count every HTTP request, its status and its latency.

    Plain ASGI (not `BaseHTTPMiddleware`), so the request's `receive` reaches the handlers as the
    server gave it: a handler can see its client disconnect.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.request(endpoint_of(scope["path"]), status, time.perf_counter() - t0)
