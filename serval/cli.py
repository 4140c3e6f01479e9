"""The `serval` command. Each sub-command is defined by the module that owns the feature."""

from __future__ import annotations

import argparse
import copy
import importlib
import sys

from serval.version import __version__

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("serval.predict", "emotion of audio files, folders, manifests and datasets"),
    "timeline": ("serval.timeline", "emotion over time in a long recording"),
    "train": ("serval.train.command", "train a model from a YAML config"),
    "eval": ("serval.evaluate", "score models on a manifest, side by side"),
    "data": ("serval.corpora", "prepare and check data manifests"),
    "pseudolabel": ("serval.pseudolabel", "label audio with agreeing teacher models"),
    "serve": ("serval.serve.cli", "HTTP and WebSocket API"),
    "mcp": ("serval.serve.mcp", "MCP tool server for agents (stdio)"),
    "bench": ("serval.bench", "speed and memory benchmarks"),
    "export": ("serval.export", "export a model as an ONNX graph"),
    "benchmark": ("serval.emobox", "standard benchmarks: EmoBox's folds, trained and tested per fold"),
}


# import name -> what to pip install when it is missing (the extras, and base packages whose import
# name differs from their pip name); anything else is installed under its own name.
PIP_NAMES: dict[str, str] = {
    # training, export and the torch engine: not in the base install (ONNX Runtime runs inference)
    "torch": "serval[train]",
    "transformers": "serval[train]",
    "peft": "serval[train]",
    "onnx": "serval[train]",
    "ray": "serval[ray]",
    "funasr": "serval[funasr]",
    "ctranslate2": "serval[ct2]",
    "sklearn": "serval[train]",
    "yaml": "serval[train]",  # training configs only
    "matplotlib": "serval[plot]",
    "multipart": "python-multipart",
    "python_multipart": "python-multipart",
    "silero_vad": "silero-vad",
}


def missing_dependency(e: ImportError) -> str | None:
    """The one-line message for a third-party package that failed to import; None for serval's own."""
    top = (e.name or "").split(".")[0]
    if not top or top == "serval":
        return None
    pip_name = PIP_NAMES.get(top, top)
    if isinstance(e, ModuleNotFoundError):
        return f"needs the {top} package, which is not installed: pip install '{pip_name}'"
    return f"the installed {top} does not provide what serval needs ({e}): pip install -U '{pip_name}'"


# the arguments that name a model spec (serval.specs), on whichever command has them
MODEL_ARGUMENTS = ("model", "teacher", "relabel")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help with each option's default appended, unless the help says it already or the
    default says nothing (None, a flag's False, an empty list); an option without help shows its default."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    if action.nargs == 0 or not (action.option_strings or action.nargs == "?"):
        return False  # a flag (its default is False), or a positional that must be given
    return not (
        default is None or default is argparse.SUPPRESS or (isinstance(default, str | list) and not default)
    )


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with serval's help format; sub-commands' parsers, nested ones too, inherit it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def model_spec_problem(args: argparse.Namespace) -> str | None:
    """The first model spec among a command's arguments that names no model, as "<spec>: <cause>"."""
    from serval.specs import spec_problem

    for name in MODEL_ARGUMENTS:
        value = getattr(args, name, None)  # None: not given (the command's own default applies)
        for spec in value if isinstance(value, list) else [value]:
            problem = None if spec is None else spec_problem(spec)
            if problem is not None:
                return problem
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported to fill in its arguments."""
    parser = Parser(prog="serval", description="Speech emotion recognition.")
    parser.add_argument("--version", action="version", version=f"serval {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `serval ARGV`; the exit code (2: a usage error, a missing package or a bad model spec)."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in COMMANDS else None
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        problem = model_spec_problem(args)
        if problem is not None:  # before the command loads, exports or warns about anything
            print(f"serval {args.command}: {problem}", file=sys.stderr)
            return 2
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except ImportError as e:  # a package a command needs: one line naming what to install
        message = missing_dependency(e)
        if message is None:
            raise
        print(f"serval {command}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
