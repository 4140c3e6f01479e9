"""The limits and batching of one server: every field is a `serval serve` option."""

from __future__ import annotations

from dataclasses import dataclass

from serval.windows import WindowSpec


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
            **vad,
        )
