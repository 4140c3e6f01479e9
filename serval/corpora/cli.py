"""`serval data`: prepare a corpus's manifest, check manifests, merge them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serval.corpora.labels import OPTIONS
from serval.corpora.prepare import (
    corpus_labels,
    dropped_path,
    prepare_corpus,
    split_warnings,
    summary,
    write_dropped,
)
from serval.corpora.recipes import RULES
from serval.corpora.split import (
    DEV_FRACTION,
    MIN_DEV_SPEAKERS,
    MIN_TEST_CORPUS_SPEAKERS,
    SPLIT_SEED,
    TEST_FRACTION,
)
from serval.manifest import Problem, check_manifest, manifest_format, read_manifest, write_manifest
from serval.vocab import EMOTIONS

# prepare_corpus's keywords, each the dest of the prepare flag of the same name
PREPARE_SETTINGS = (
    "split",
    "dev_speakers",
    "test_speakers",
    "dev_fraction",
    "test_fraction",
    "seed",
    "min_dev_speakers",
    "keep_dimensional",
    "keep_labels",
    *OPTIONS,
)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="write a manifest for a corpus", description="Write a manifest for a corpus."
    )
    p.add_argument("corpus", choices=sorted(RULES), help="which corpus ROOT holds")
    p.add_argument("root", type=Path, help="the corpus folder, as distributed")
    p.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.csv or .jsonl)")
    p.add_argument(
        "--split",
        choices=("auto", "speaker", "official"),
        default="auto",
        help="speaker: seeded speaker-disjoint split; official: the corpus's own "
        "(meld, m3ed, msp-podcast); auto: official where there is one (default)",
    )
    p.add_argument("--dev-speakers", nargs="+", metavar="SPEAKER", help="these speakers form the dev set")
    p.add_argument("--test-speakers", nargs="+", metavar="SPEAKER", help="these speakers form the test set")
    for flag, kind, default, metavar, help_text in (  # the speaker split's numbers
        ("--dev-fraction", float, DEV_FRACTION, None, f"share of speakers for dev (default {DEV_FRACTION})"),
        (
            "--test-fraction",
            float,
            None,
            None,
            f"share of speakers for test (default {TEST_FRACTION}; 0 for a corpus of fewer than "
            f"{MIN_TEST_CORPUS_SPEAKERS} speakers)",
        ),
        ("--seed", int, SPLIT_SEED, None, f"seed of the speaker split (default {SPLIT_SEED})"),
        (
            "--min-dev-speakers",
            int,
            MIN_DEV_SPEAKERS,
            "N",
            f"dev gets at least N speakers where the corpus can spare them (default {MIN_DEV_SPEAKERS}; "
            "0: the fraction alone)",
        ),
    ):
        p.add_argument(flag, type=kind, default=default, metavar=metavar, help=help_text)
    for name, (choices, default) in OPTIONS.items():
        applies = ", ".join(c for c, r in RULES.items() if name in r.get("options", ()))
        p.add_argument(
            f"--{name}", choices=choices, default=None, help=f"{applies}: '{name}' clips (default {default})"
        )
    for flag, help_text in (
        (
            "--keep-labels",
            "keep the corpus's own labels (ravdess calm, emodb boredom, baved low/neutral/high, ...) "
            "instead of mapping them onto the 7 classes",
        ),
        (
            "--keep-dimensional",
            "iemocap, msp-podcast: keep clips outside the 7 classes, unlabelled, for their A/V/D ratings "
            "(tava and baved always keep them)",
        ),
        ("--check", "also read every audio header (as `serval data check`)"),
        ("--overwrite", "replace an existing manifest"),
    ):
        p.add_argument(flag, action="store_true", help=help_text)


def _add_label_set(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--labels",
        type=lambda text: text.split(","),
        metavar="A,B,...",
        default=list(EMOTIONS),
        help="the allowed labels, comma-separated (default the 7 classes)",
    )
    which.add_argument(
        "--any-labels", dest="labels", action="store_const", const=None, help="allow any label"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serval data` sub-commands: prepare, check, merge."""
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    _add_prepare(sub)
    c = sub.add_parser(
        "check", help="list every problem of a manifest", description="List every problem of a manifest."
    )
    c.add_argument("manifest", type=Path, nargs="+", help="manifest(s) to check")
    c.add_argument("--no-audio", action="store_true", help="check the values only, do not open audio files")
    _add_label_set(c)
    m = sub.add_parser(
        "merge", help="join manifests into one", description="Join manifests (e.g. several corpora) into one."
    )
    m.add_argument("manifest", type=Path, nargs="+", help="manifests to join, in order")
    m.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.csv or .jsonl)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    _add_label_set(m)


def _run_prepare(args: argparse.Namespace) -> int:
    try:
        manifest_format(args.output)
        dropped_file = dropped_path(args.output)
        for target in (args.output, dropped_file):
            if target.exists() and not args.overwrite:
                print(f"{target}: already exists (pass --overwrite to replace it)", file=sys.stderr)
                return 1
        settings = {name: getattr(args, name) for name in PREPARE_SETTINGS}
        rows, dropped = prepare_corpus(args.corpus, args.root, **settings)
    except (ValueError, OSError) as e:
        print(f"serval data prepare: {e}", file=sys.stderr)
        return 1
    labels = corpus_labels(args.corpus, args.keep_labels)
    write_manifest(rows, args.output, overwrite=args.overwrite, labels=labels)
    write_dropped(dropped, dropped_file, overwrite=args.overwrite)
    print(
        f"{args.output}: {len(rows)} clips of {args.corpus}; {len(dropped)} dropped (listed in {dropped_file})"
    )
    print(summary(rows, dropped, labels))
    for line in split_warnings(rows):
        print(f"serval data prepare: {line}", file=sys.stderr)
    if args.check:
        return _report(args.output, check_manifest(args.output, labels=labels))
    return 0


def _report(manifest: Path, problems: list[Problem]) -> int:
    for p in problems:
        print(p.format(manifest))
    if problems:
        print(f"{manifest}: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _run_merge(args: argparse.Namespace) -> int:
    try:
        rows, seen = [], {}
        for source in args.manifest:
            for row in read_manifest(source, labels=args.labels):
                key = (str(row.path), row.start, row.end)
                if key in seen:
                    raise ValueError(
                        f"{row.path} ({row.start}-{row.end}) is in {seen[key]} and again in {source}"
                    )
                seen[key] = source
                rows.append(row)
        write_manifest(rows, args.output, overwrite=args.overwrite, labels=args.labels)
    except (ValueError, OSError) as e:
        print(f"serval data merge: {e}", file=sys.stderr)
        return 1
    print(f"{args.output}: {len(rows)} rows from {len(args.manifest)} manifests")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one `serval data` action; the exit code."""
    if args.data_command == "prepare":
        return _run_prepare(args)
    if args.data_command == "merge":
        return _run_merge(args)
    status = 0
    for manifest in args.manifest:
        try:
            problems = check_manifest(manifest, check_audio=not args.no_audio, labels=args.labels)
        except ValueError as e:  # a label set that is no set (--labels ,)
            print(f"serval data check: {e}", file=sys.stderr)
            return 1
        bad = _report(manifest, problems)
        if not bad:
            print(f"{manifest}: ok")
        status |= bad
    return status
