"""serval.serve.cli: the options made from ServerConfig's fields, the same names and defaults as the
hand-written ones they replaced, and a config built from them."""

import argparse
import dataclasses

import pytest

from serval.cli import build_parser
from serval.serve import cli as serve_cli
from serval.serve.config import BUDGETED, ServerConfig

# `serval serve`'s options and defaults before they were made from the config (main at 39b8b33)
BEFORE = {
    "--model": None, "--device": "auto", "--engine": "auto", "--compile": False, "--host": "127.0.0.1",
    "--port": 8000, "--max-upload-mb": None, "--upload-timeout": 10.0, "--min-upload-rate": 8192.0,
    "--max-receiving": None, "--max-clip-seconds": None, "--max-timeline-seconds": None,
    "--max-stream-seconds": 14400.0, "--max-streams": 64, "--stream-idle-seconds": 30.0,
    "--max-windows": 20000, "--memory-budget": None, "--max-requests": None, "--max-batch": 16,
    "--max-long-batch": 16, "--long-call-ms": 100.0, "--timeline-nice": 10, "--max-wait-ms": 10.0,
    "--max-queue": None, "--max-timelines": None, "--window": 4.0, "--hop": 2.0,
    "--graceful-timeout": 30.0, "--label-no-speech": False, "--log-level": "info",
}  # fmt: skip


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser("serve")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_every_option_keeps_its_name_and_default_and_every_field_has_one():
    options = {a.option_strings[-1]: a for a in serve_parser()._actions}
    for flag, default in BEFORE.items():
        assert flag in options, flag
        assert options[flag].default == default, flag
    for f in dataclasses.fields(ServerConfig):
        action = options[f"--{f.name.replace('_', '-')}"]
        assert action.dest == f.name and len(action.help) > 15
        # a limit a memory budget sets is unset (None) unless given; the others show the field's default
        assert action.default == (None if f.name in BUDGETED else f.default), f.name
    help_text = serve_parser().format_help()
    assert "--retry-after" in help_text and "default 100, or from --memory-budget" in help_text


def test_options_become_the_config():
    p = serve_parser()
    assert serve_cli.config_from_args(p.parse_args([])) == ServerConfig()
    args = p.parse_args(
        [
            "--retry-after",
            "3",
            "--max-segment",
            "9",
            "--memory-budget",
            "1G",
            "--label-no-speech",
            "--port",
            "81",
        ]
    )
    cfg = serve_cli.config_from_args(args)
    assert (cfg.retry_after, cfg.max_segment, cfg.memory_budget, cfg.label_no_speech, cfg.port) == (
        3, 9.0, 2**30, True, 81,
    )  # fmt: skip
    assert serve_cli.given_limits(args) == set()
    with pytest.raises(SystemExit):
        p.parse_args(["--max-batch", "1.5"])
