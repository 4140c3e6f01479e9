"""The limits and batching of one server: every field is a `serval serve` option, its help text the field's."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, replace

from serval.settings import STRICT, setting
from serval.windows import WindowSpec

# What one request holds, counted when its limits come from `memory_budget` (docs/serving.md, "Memory"):
# its upload, as 16-bit PCM at 48 kHz stereo (compressed audio holds less): in memory up to 1 MiB
# (`uploads.SPOOL_BYTES`), beyond that in a temporary file, counted once, since the temp dir may
# itself be memory (tmpfs)
UPLOAD_BYTES_PER_SECOND = 192_000
# what does not grow with its audio: the part of its upload kept in memory, a piece or chunk being
# decoded, its results
REQUEST_BYTES = 64 * 2**20
WINDOW_BYTES = 2048  # a timeline window's result, and its JSON
# one model call at a time, at most one 30 s piece of work (serval.longform): 330 MB on whisper-base
MODEL_CALL_BYTES = 512 * 2**20
BUDGETED = (
    "max_upload_mb",
    "max_clip_seconds",
    "max_timeline_seconds",
    "max_receiving",
    "max_queue",
    "max_timelines",
)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """ "2G", "512M", "1.5GiB", "300000000" -> bytes (binary units, as `free -h` shows them)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"a size is a positive number with an optional K, M, G or T (e.g. 2G), not {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(size: float) -> str:
    """Bytes as the largest binary unit that keeps a number >= 1: 2147483648 -> "2G"."""
    unit = next(u for u in ("T", "G", "M", "K", "") if size >= _UNITS[u] or u == "")
    return f"{size / _UNITS[unit]:.3g}{unit}"


@dataclass
class ServerConfig:
    """Limits and batching of one server; every field is a `serval serve` option."""

    __pydantic_config__ = STRICT

    host: str = setting("127.0.0.1", "address to bind (default: loopback only)")
    port: int = setting(8000, "port to listen on")
    max_upload_mb: float = setting(100.0, "largest request body, multipart envelope included; 413 beyond")
    upload_timeout: float = setting(10.0, "seconds an upload may send nothing before it is answered 408")
    min_upload_rate: float = setting(
        8192.0, "bytes/s an upload must average after its first --upload-timeout seconds (408 below; 0: off)"
    )
    max_receiving: int = setting(256, "uploads being received at once (bounds their memory); more get 503")
    max_clip_seconds: float = setting(60.0, "longest audio for /v1/emotion, 413 beyond (over 30 s: pooled)")
    max_timeline_seconds: float = setting(4 * 3600.0, "longest audio for /v1/timeline; 413 beyond")
    max_stream_seconds: float = setting(4 * 3600.0, "longest WebSocket stream")
    max_windows: int = setting(20_000, "windows of one timeline or stream (400 / close 1008 beyond)")
    max_batch: int = setting(16, "waveforms per model call; 1 disables batching")
    max_long_batch: int = setting(16, "timeline waveforms per model call at most (short requests first)")
    long_call_ms: float = setting(100.0, "model time a call with timeline windows should take (0: no bound)")
    timeline_nice: int = setting(10, "how much nicer timeline threads run, 0..19 (Linux): clips first")
    max_wait_ms: float = setting(10.0, "how long a request waits for others to share its model call")
    max_queue: int = setting(64, "clips decoded and waiting for the model; more get 503 + Retry-After")
    max_timelines: int = setting(16, "timelines being worked on; more get 503 + Retry-After")
    max_streams: int = setting(64, "open WebSocket streams; more are closed (1013)")
    stream_idle_seconds: float = setting(30.0, "a stream that sends nothing for this long is closed (1008)")
    retry_after: int = setting(1, "seconds, in a 503's Retry-After header")
    window: float = setting(4.0, "default timeline/stream window (s)")
    hop: float = setting(2.0, "default timeline/stream hop (s)")
    min_length: float = setting(0.5, "shortest final window of a timeline or stream (s)")
    max_segment: float = setting(15.0, "longest merged segment of a timeline or stream (s)")
    graceful_timeout: float = setting(30.0, "seconds in-flight requests get to finish on shutdown")
    memory_budget: int | None = setting(
        None,
        "memory one request may hold, e.g. 2G: sets the upload, duration and concurrency limits not "
        "given by hand (docs/serving.md, Memory)",
        parse=parse_size,
        metavar="SIZE",
    )
    max_requests: int | None = setting(
        None,
        "requests holding audio at once (received, queued, worked on); more get 503 "
        "(default: none, or from --memory-budget)",
    )
    label_no_speech: bool = setting(
        False, "/v1/emotion labels clips without speech too (default: label null; no_speech says why)"
    )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def limit_note(self) -> str:
        """What a 413 adds about where the limit comes from: the memory budget, when one is set."""
        if self.memory_budget is None:
            return ""
        return f" (the memory budget of {format_size(self.memory_budget)} per request)"

    def budgeted(self, given: Collection[str] = (), available: int | None = None) -> ServerConfig:
        """The limits `memory_budget` sets, except those in `given` (set by hand); `available`: the
        memory free for requests' work (default: the system's available memory now)."""
        if self.memory_budget is None:
            return self
        self.check()
        room = upload = self.memory_budget - REQUEST_BYTES  # the body is held once, mostly on disk
        available = memory_available() if available is None else available
        n = max(1, (available - MODEL_CALL_BYTES) // self.memory_budget)
        limits = {
            "max_upload_mb": upload / 2**20,
            "max_clip_seconds": math.floor(upload / UPLOAD_BYTES_PER_SECOND),
            "max_timeline_seconds": math.floor(room / (UPLOAD_BYTES_PER_SECOND + WINDOW_BYTES / self.hop)),
            "max_requests": n,
            "max_receiving": min(self.max_receiving, n),
            "max_queue": min(self.max_queue, n),
            "max_timelines": min(self.max_timelines, n),
        }
        return replace(self, **{k: v for k, v in limits.items() if k not in given})

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
        if self.max_requests is not None and not self.max_requests >= 1:
            raise ValueError(f"--max-requests must be >= 1, got {self.max_requests}")
        if self.memory_budget is not None and not self.memory_budget > REQUEST_BYTES:
            raise ValueError(f"--memory-budget must be more than {format_size(REQUEST_BYTES)}")
        if not 0 <= self.timeline_nice <= 19:
            raise ValueError(f"--timeline-nice must be 0..19, got {self.timeline_nice}")
        for name in ("max_wait_ms", "min_upload_rate", "long_call_ms"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0")
        for name in ("upload_timeout", "stream_idle_seconds", "max_upload_mb"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0")


def memory_available() -> int:
    """Bytes of memory the system can give now (Linux's MemAvailable; elsewhere, the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
