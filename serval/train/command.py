"""`serval train CONFIG.yaml [--set key=value ...] [--resume | --overwrite] [--print-config]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import yaml

from serval.train.config import load_config
from serval.train.loop import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `serval train`."""
    p.add_argument("config", help="training config (YAML), e.g. configs/quickstart-cpu.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, dotted for nested ones (optim.lr_head=3e-4); repeatable",
    )
    p.add_argument(
        "--init",
        metavar="MODEL",
        help="start from this model (default: the bundled one; a model dir; none: from the backbone): its "
        "encoder adapters and network, with the classifier rows of the classes it shares with `labels`",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in out_dir from its last checkpoint even if the config changed "
        "(resume: force); the same config resumes without it",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run in out_dir (checkpoints, best/, metrics; not the encoder cache) and start again",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (the model's sizes as built from its backbone) and exit",
    )


def run(args: argparse.Namespace) -> int:
    """Run `serval train`; returns the exit status."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(
            args.config,
            [*init_override(args.init), *args.overrides] + (["resume=force"] if args.resume else []),
        )
    except ValueError as e:
        print(f"serval train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        return _print_config(cfg)
    try:
        best = train(cfg, overwrite=args.overwrite)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"serval train: {e}", file=sys.stderr)
        return 1
    if rank == 0:
        print(best)
    return 0


def init_override(spec: str | None) -> list[str]:
    """`--init MODEL` as a `--set` override of `init_from` ("none": train from the backbone)."""
    if spec is None:
        return []
    return ["init_from=null" if spec.lower() == "none" else f"init_from={json.dumps(spec)}"]


def _print_config(cfg) -> int:
    from serval.train.network import build

    try:
        cfg, _ = build(cfg)  # the model that would be built: its sizes come from the backbone
    except (ValueError, KeyError, OSError) as e:
        print(f"serval train: cannot build the model to print its config: {e}", file=sys.stderr)
        return 1
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
