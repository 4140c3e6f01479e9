"""`serval serve`: its options (one per `ServerConfig` field) and the uvicorn server."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

from serval.serve.config import BUDGETED, ServerConfig, format_size, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serval.onnx_engine import add_engine_arguments

    d = ServerConfig()
    p.add_argument("--model", help="model directory, hub id or meralion:PATH (default: the bundled model)")
    add_engine_arguments(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch engine: compile small batches at bucketed shapes (CUDA graphs on a GPU), at start-up",
    )
    p.add_argument("--host", default=d.host, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=None,
        help=f"largest request body (413 beyond; default {d.max_upload_mb:g}, or from --memory-budget)",
    )
    p.add_argument(
        "--upload-timeout",
        type=float,
        default=d.upload_timeout,
        help="seconds an upload may send nothing before it is answered 408",
    )
    p.add_argument(
        "--min-upload-rate",
        type=float,
        default=d.min_upload_rate,
        help="bytes/s an upload must average after its first --upload-timeout seconds (408 below; 0: off)",
    )
    p.add_argument(
        "--max-receiving",
        type=int,
        default=None,
        help=f"uploads being received at once; more get 503 (default {d.max_receiving}, or fewer from "
        "--memory-budget)",
    )
    _audio_limit_arguments(p, d)
    _batching_arguments(p, d)
    p.add_argument("--window", type=float, default=d.window, help="default timeline/stream window (s)")
    p.add_argument("--hop", type=float, default=d.hop, help="default timeline/stream hop (s)")
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=d.graceful_timeout,
        help="seconds in-flight requests get to finish on shutdown",
    )
    p.add_argument(
        "--label-no-speech",
        action="store_true",
        help="/v1/emotion labels clips without speech too (default: label null; no_speech says why)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _audio_limit_arguments(p: argparse.ArgumentParser, d: ServerConfig) -> None:
    """How much audio one request or stream may bring, and the memory budget that can set it."""
    p.add_argument(
        "--max-clip-seconds",
        type=float,
        default=None,
        help=f"longest audio for /v1/emotion (413 beyond; default {d.max_clip_seconds:g}, or from "
        "--memory-budget)",
    )
    p.add_argument(
        "--max-timeline-seconds",
        type=float,
        default=None,
        help=f"longest audio for /v1/timeline (413 beyond; default {d.max_timeline_seconds:g}, or from "
        "--memory-budget)",
    )
    p.add_argument(
        "--max-stream-seconds", type=float, default=d.max_stream_seconds, help="longest WebSocket stream"
    )
    p.add_argument(
        "--max-streams",
        type=int,
        default=d.max_streams,
        help="open WebSocket streams; more are closed (1013)",
    )
    p.add_argument(
        "--stream-idle-seconds",
        type=float,
        default=d.stream_idle_seconds,
        help="a stream that sends nothing for this long is closed (1008)",
    )
    p.add_argument(
        "--max-windows",
        type=int,
        default=d.max_windows,
        help="windows of one timeline or stream (400 / close 1008 beyond)",
    )
    p.add_argument(
        "--memory-budget",
        type=parse_size,
        metavar="SIZE",
        help="memory one request may hold, e.g. 2G: sets the upload, duration and concurrency limits not "
        "given by hand (docs/serving.md, Memory)",
    )
    p.add_argument(
        "--max-requests",
        type=int,
        help="requests holding audio at once (received, queued, worked on); more get 503 "
        "(default: none, or from --memory-budget)",
    )


def _batching_arguments(p: argparse.ArgumentParser, d: ServerConfig) -> None:
    """The model queue's options: batch sizes, lanes, waiting and admission limits."""
    p.add_argument(
        "--max-batch", type=int, default=d.max_batch, help="waveforms per model call; 1 disables batching"
    )
    p.add_argument(
        "--max-long-batch",
        type=int,
        default=d.max_long_batch,
        help="timeline waveforms per model call at most (short requests go first)",
    )
    p.add_argument(
        "--long-call-ms",
        type=float,
        default=d.long_call_ms,
        help="model time a call with timeline windows should take (0: no bound), so a clip waits little",
    )
    p.add_argument(
        "--timeline-nice",
        type=int,
        default=d.timeline_nice,
        help="how much nicer timeline threads (decoding, VAD) run than the rest, 0..19 (Linux)",
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
        default=None,
        help=f"clips decoded and waiting for the model before new ones get 503 (default {d.max_queue}, "
        "or fewer from --memory-budget)",
    )
    p.add_argument(
        "--max-timelines",
        type=int,
        default=None,
        help=f"timelines being worked on before new ones get 503 (default {d.max_timelines}, or fewer from "
        "--memory-budget)",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The options as a ServerConfig; an option left out (None) keeps the config's default."""
    names = set(asdict(ServerConfig()))
    return ServerConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def given_limits(args: argparse.Namespace) -> set[str]:
    """The limits a memory budget would set that were given by hand, which it leaves alone."""
    return {k for k in (*BUDGETED, "max_requests") if getattr(args, k, None) is not None}


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does); True when set.

    glibc gives threads their own arenas, up to 8 per core, and keeps what each one freed: a server
    whose timeline threads come and go would otherwise grow its RSS by arenas that sit mostly idle."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-8, arenas))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    limit_malloc_arenas()  # before the model's and the server's threads exist

    from serval.locations import NoDefaultModelError
    from serval.onnx_engine import load_engine
    from serval.serve.app import create_app

    cfg = config_from_args(args)
    try:
        cfg.check()  # the limits and the default grid, before the model loads
        engine = "torch" if args.compile and args.engine == "auto" else args.engine
        predictor = load_engine(args.model, engine, device=args.device)
        if cfg.memory_budget is not None:  # measured with the model loaded: what is left is for requests
            cfg = cfg.budgeted(given_limits(args))
            print(f"serval serve: {budget_summary(cfg)}", file=sys.stderr)
        if args.compile:  # paid now, before the server listens, never by a request
            from serval.compiled import compile_predictor

            print(f"serval serve: compiled {compile_predictor(predictor)} shapes", file=sys.stderr)
    except (NoDefaultModelError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"serval serve: {e}", file=sys.stderr)
        return 2
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(predictor, cfg),
            host=cfg.host,
            port=cfg.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(cfg.graceful_timeout),
        )
    )
    server.run()  # returns after SIGINT/SIGTERM once in-flight requests are done
    return 0 if server.started else 1


def budget_summary(cfg: ServerConfig) -> str:
    """The limits a memory budget gave, in one line."""
    return (
        f"memory budget {format_size(cfg.memory_budget)} per request: uploads up to "
        f"{cfg.max_upload_mb:.0f} MiB, "
        f"/v1/emotion up to {cfg.max_clip_seconds:g} s, /v1/timeline up to {cfg.max_timeline_seconds:g} s, "
        f"{cfg.max_requests} requests at once"
    )
