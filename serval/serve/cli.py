"""`serval serve`: its options (one per `ServerConfig` field, made from the fields) and the uvicorn server."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import fields

from serval.onnx_engine import add_model_arguments
from serval.serve.config import BUDGETED, ServerConfig, format_size
from serval.settings import read


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch engine: compile small batches at bucketed shapes (CUDA graphs on a GPU), at start-up",
    )
    add_config_arguments(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One option per `ServerConfig` field, named after it, with its default and help text; a limit a
    memory budget may set defaults to None (unset), so that the budget knows it was not given."""
    hints = typing.get_type_hints(ServerConfig)
    for f in fields(ServerConfig):
        flag, text = f"--{f.name.replace('_', '-')}", f.metadata["help"]
        if hints[f.name] is bool:
            p.add_argument(flag, action="store_true", help=text)
            continue
        default = f.default
        if f.name in BUDGETED:
            fewer = "fewer " if f.name in ("max_receiving", "max_queue", "max_timelines") else ""
            default, text = None, f"{text} (default {f.default:g}, or {fewer}from --memory-budget)"
        kind = f.metadata.get("parse") or next(
            t for t in (int, float, str) if t in (hints[f.name], *typing.get_args(hints[f.name]))
        )
        p.add_argument(flag, type=kind, default=default, metavar=f.metadata.get("metavar"), help=text)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The options as a ServerConfig; an option left out (None) keeps the config's default."""
    names = {f.name for f in fields(ServerConfig)}
    return read(
        ServerConfig, {k: v for k, v in vars(args).items() if k in names and v is not None}, "serval serve"
    )


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
