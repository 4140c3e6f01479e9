"""`serval serve`: its options (one per `ServerConfig` field) and the uvicorn server."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from serval.serve.config import ServerConfig


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
    from serval.serve.app import create_app

    cfg = config_from_args(args)
    try:
        cfg.window_spec()  # the default grid, checked before the model loads
        if cfg.max_batch < 1 or cfg.max_queue < 1 or cfg.max_wait_ms < 0:
            raise ValueError("--max-batch and --max-queue must be >= 1 and --max-wait-ms >= 0")
        predictor = load(args.model, device=args.device)
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
