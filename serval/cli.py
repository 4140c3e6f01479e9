"""The `serval` command. Each sub-command is defined by the module that owns the feature."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("serval.batch", "emotion of audio files, folders, manifests and datasets"),
    "timeline": ("serval.timeline", "emotion over time in a long recording"),
    "train": ("serval.train.command", "train a model from a YAML config"),
    "eval": ("serval.evaluate", "score models on a manifest, side by side"),
    "data": ("serval.corpora", "prepare and check data manifests"),
    "pseudolabel": ("serval.pseudolabel", "label audio with agreeing teacher models"),
    "serve": ("serval.serve.cli", "HTTP and WebSocket API"),
    "mcp": ("serval.serve.mcp", "MCP tool server for agents (stdio)"),
    "bench": ("serval.bench", "speed and memory benchmarks"),
    "export": ("serval.export", "export a model as an ONNX graph"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported to fill in its arguments."""
    parser = argparse.ArgumentParser(prog="serval", description="Speech emotion recognition.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
