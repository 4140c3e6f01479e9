"""`serval train CONFIG.yaml [--set key=value ...] [--print-config]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from serval.train.config import load_config
from serval.train.loop import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `serval train`."""
    p.add_argument("config", help="training config (YAML), e.g. configs/whisper-base-cpu.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, dotted for nested ones (optim.lr_head=3e-4); repeatable",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    """Run `serval train`; returns the exit status."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"serval train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        best = train(cfg)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"serval train: {e}", file=sys.stderr)
        return 1
    if rank == 0:
        print(best)
    return 0
