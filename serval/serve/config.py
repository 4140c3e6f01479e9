"""The limits and batching of one server: every field is a `serval serve` option."""

from __future__ import annotations

import math
from dataclasses import dataclass

from serval.windows import WindowSpec


@dataclass
class ServerConfig:
    """Limits and batching of one server; every field is a `serval serve` option."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 100.0  # whole request body, multipart envelope included
    upload_timeout: float = 10.0  # seconds an upload may send nothing before it is answered 408
    min_upload_rate: float = 8192.0  # bytes/s an upload must average once upload_timeout has passed
    max_receiving: int = 256  # uploads being received at once; more get 503 (bounds their memory)
    max_clip_seconds: float = 60.0  # /v1/emotion; longer clips are pooled over <= 30 s pieces
    max_timeline_seconds: float = 4 * 3600.0  # /v1/timeline
    max_stream_seconds: float = 4 * 3600.0  # one WebSocket stream
    max_windows: int = 20_000  # windows of one timeline or stream (400 / close 1008 beyond)
    max_batch: int = 16  # waveforms per model call (1 = no micro-batching)
    max_long_batch: int = 16  # timeline waveforms per model call at most
    long_call_ms: float = 100.0  # model time a call with timeline windows should take, at most one window
    # timeline threads (decoding, VAD) run this much nicer (Linux), so clips get the CPU first
    timeline_nice: int = 10
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # clips decoded and waiting for the model; more get 503 + Retry-After
    max_timelines: int = 16  # timelines being worked on at once; more get 503 + Retry-After
    max_streams: int = 64  # open WebSocket streams; more are closed with 1013
    stream_idle_seconds: float = 30.0  # a stream that sends nothing for this long is closed (1008)
    retry_after: int = 1  # seconds, in the 503's Retry-After header
    window: float = 4.0  # default timeline/stream window and hop (seconds)
    hop: float = 2.0
    min_length: float = 0.5  # shortest final window of a timeline or stream
    max_segment: float = 15.0  # longest merged segment
    graceful_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown
    label_no_speech: bool = False  # /v1/emotion labels a clip without speech too (default: label null)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def window_spec(
        self,
        window: float | None = None,
        hop: float | None = None,
        max_segment: float | None = None,
        **vad,
    ) -> WindowSpec:
        """A request's grid: its own values where given, the server's otherwise; ValueError if invalid.

        The shortest final window is the server's, but never longer than the window itself.
        """
        window = self.window if window is None else window
        return WindowSpec(
            window=window,
            hop=self.hop if hop is None else hop,
            min_length=min(self.min_length, window),
            max_segment=self.max_segment if max_segment is None else max_segment,
            max_windows=self.max_windows,
            **vad,
        )

    def check(self) -> None:
        """ValueError naming the first option out of range (the default grid included)."""
        self.window_spec()
        for name in (
            "max_batch",
            "max_long_batch",
            "max_queue",
            "max_timelines",
            "max_streams",
            "max_receiving",
        ):
            if not getattr(self, name) >= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.timeline_nice <= 19:
            raise ValueError(f"--timeline-nice must be 0..19, got {self.timeline_nice}")
        for name in ("max_wait_ms", "min_upload_rate", "long_call_ms"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0")
        for name in ("upload_timeout", "stream_idle_seconds", "max_upload_mb"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0")
