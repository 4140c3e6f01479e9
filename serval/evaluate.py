"""`serval eval`: score several models side by side on one manifest, under the paper's protocols.

A manifest row is one labelled clip (a file or a span of one). Three segmentations turn
rows into the items that are scored (section 6 of the paper):
- "utterance": each row as it is;
- "2s": each row cut into fixed 2 s segments carrying the row's gold label;
- "merged": adjacent rows of one file with the same gold label and touching spans merged,
  up to 15 s.
Each item is one model pass. Two protocols score them: "7class" (all classes) and
"4class" (gold in the primary 4, prediction = argmax over those 4 only). A corpus whose
labels are a subset of the 7 is scored over its own classes: the argmax for its items runs
over the protocol's classes that occur among the corpus's gold labels (docs/evaluation.md).

Every model sees exactly the same items: a clip that fails to decode is listed in the report
and excluded for all. The segmentations are `serval.eval_segments`; the predictions, cached per
model and span so that a re-run only computes what changed, `serval.eval_predictions`.
`serval.report` turns the report dict into Markdown tables and confusion-matrix PNGs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serval.clip import Clip
from serval.eval_predictions import class_order, predict_all, system_fingerprint, unique_names
from serval.eval_segments import (
    MERGE_MAX_SECONDS,
    SEGMENT_SECONDS,
    SEGMENTATIONS,
    make_units,
    same_segmentations,
    scorable,
)
from serval.io.hf_datasets import read_rows
from serval.metrics import bootstrap_ci, classification_scores, regression_scores
from serval.report import existing_reports, write_report
from serval.session import centre
from serval.training_data import overlap, overlap_warning, record_of_spec
from serval.vocab import DIMENSIONS, EMOTIONS, PRIMARY4

PROTOCOLS = {"7class": EMOTIONS, "4class": PRIMARY4}
EVAL_SESSIONS = ("corpus", "speaker")  # --session: the groups centred together
MODEL_PROTOCOL = "model"  # the models' own classes (a model trained on any label set; all must share them)


def protocol_classes(protocol: str, systems: Sequence) -> tuple[str, ...]:
    """The classes a protocol scores: its fixed set, or for "model" the classes every system shares."""
    if protocol != MODEL_PROTOCOL:
        return PROTOCOLS[protocol]
    own = {tuple(s.classes) for s in systems}
    if len(own) != 1:
        raise ValueError(f"protocol {MODEL_PROTOCOL!r} needs models with the same classes, not {sorted(own)}")
    return own.pop()


def labels_problem(rows: Sequence, protocols: Sequence[str], systems: Sequence) -> str | None:
    """Why `rows` cannot be scored under `protocols` by `systems`: the first row whose label is in no
    protocol's classes ("row N (path): ..."), or models that do not share their classes; else None.

    A fixed protocol (7class, 4class) takes any of the 7 classes: it scores the rows of its own and
    leaves the others out, as the report says; the model protocol takes the models' classes only."""
    try:
        known = set().union(
            *(EMOTIONS if p in PROTOCOLS else protocol_classes(p, systems) for p in protocols)
        )
    except ValueError as e:
        return str(e)
    for i, r in enumerate(rows, 1):
        if r.label is not None and r.label not in known:
            names = [c for c in class_order(systems) if c in known]
            return f"row {i} ({r.path}): label {r.label!r} is not one of {', '.join(names)}"
    return None


def _restricted_label(
    probs: np.ndarray, allowed: Sequence[str], order: Sequence[str] = EMOTIONS
) -> str | None:
    values = probs[[list(order).index(c) for c in allowed]]
    if not len(values) or not np.nanmax(values) > 0:
        return None  # the system's answer lies outside the allowed classes, or it gave none
    return allowed[int(np.nanargmax(values))]


def _scores(gold, pred, classes, groups, bootstrap: int, seed: int) -> dict:
    out = classification_scores(gold, pred, classes)
    if bootstrap and gold:
        out["uar_ci95"] = list(
            bootstrap_ci(gold, pred, classes, groups=groups, n_resamples=bootstrap, seed=seed)
        )
    else:
        out["uar_ci95"] = [math.nan, math.nan]
    return out


def evaluate(
    rows: Sequence,
    systems: Sequence,
    cache_dir: str | os.PathLike,
    segmentations: Sequence[str] = SEGMENTATIONS,
    protocols: Sequence[str] = tuple(PROTOCOLS),
    corpus_classes: str = "own",
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    specs: Sequence[str] | None = None,
    session: str | None = None,
) -> dict:
    """Score `systems` (Predictor-like objects or `--model` spec strings) on manifest `rows` into the
    report, a JSON-ready dict (NaN as null) that `serval.report.write_report` saves. `session`
    ("corpus", "speaker"): each group's probabilities centred before scoring (`session_tables`)."""
    _check_options(protocols, corpus_classes, session)
    specs = [s if isinstance(s, str) else None for s in systems] if specs is None else specs
    from serval.onnx_engine import load_engine  # engine "auto": ONNX Runtime on a CPU, no torch needed

    systems = [load_engine(s) if isinstance(s, str) else s for s in systems]
    names = unique_names(systems)
    units = {seg: make_units(rows, seg) for seg in segmentations}
    # a row with neither a label nor a dimension cannot be scored: it is not run either
    all_units = [u for seg in segmentations for u in units[seg] if scorable(u)]
    predictions, failures = predict_all(all_units, systems, names, cache_dir, batch_size, progress)
    failed_rows = {i for u in all_units if u.key in failures for i in u.extra["rows"]}
    labels_of = corpus_labels(rows)
    valid = {
        seg: [u for u in units[seg] if scorable(u) and not failed_rows.intersection(u.extra["rows"])]
        for seg in segmentations
    }
    classes = {p: protocol_classes(p, systems) for p in protocols}
    order = class_order(systems)
    tables = {seg: session_tables(units, predictions, session) for seg, units in valid.items()}
    results = _results(valid, classes, names, tables, labels_of, corpus_classes, bootstrap, seed, order)
    models = [
        model_entry(name, spec, system, table, training_record(spec, system), rows)
        for name, spec, system, table in zip(names, specs or [None] * len(systems), systems, predictions)
    ]
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            **_settings(segmentations, protocols, corpus_classes, bootstrap, seed),
            "session": session,
        },
        "n_rows": len(rows),
        "n_rows_excluded": len(failed_rows),
        "n_items": {seg: len(valid[seg]) for seg in segmentations},
        "same_segments": same_segmentations(valid),
        "corpus_labels": {
            str(k) if k is not None else "(none)": [c for c in order if c in v] for k, v in labels_of.items()
        },
        "models": models,
        "excluded": [{"file": s[0], "start": s[1], "end": s[2], "error": e} for s, e in failures.items()],
        "results": results,
        "dimensional": {seg: score_dimensions(valid[seg], names, predictions) for seg in segmentations},
    }
    return _json_ready(report)


def session_tables(units: Sequence[Clip], predictions: Sequence[dict], by: str | None) -> list[dict]:
    """Each system's predictions with the probabilities of `units` centred per group (serval.session):
    the units of a corpus (`by="corpus"`) or of a corpus's speaker ("speaker"); None: as they are."""
    if by is None:
        return list(predictions)
    groups: dict = {}
    for u in units:
        groups.setdefault(u.corpus if by == "corpus" else (u.corpus, u.speaker), {})[u.key] = None
    out = []
    for table in predictions:
        table = dict(table)
        for keys in groups.values():
            centred = centre(np.array([table[k]["probs"] for k in keys], np.float64))
            table.update({k: {**table[k], "probs": q} for k, q in zip(keys, centred)})
        out.append(table)
    return out


def _results(
    valid: dict, classes: dict, names, tables: dict, labels_of, corpus_classes, bootstrap, seed, order
) -> dict:
    """{segmentation: {protocol: score_protocol's scores}}; `classes`: {protocol: its classes}; `tables`:
    {segmentation: the systems' predictions}; `order`: that of their probabilities (`class_order`)."""
    return {
        seg: {
            proto: score_protocol(
                units, known, names, tables[seg], labels_of, corpus_classes, bootstrap, seed, order
            )
            for proto, known in classes.items()
        }
        for seg, units in valid.items()
    }


def _check_options(protocols: Sequence[str], corpus_classes: str, session: str | None = None) -> None:
    if session not in (None, *EVAL_SESSIONS):
        raise ValueError(f"session must be one of {EVAL_SESSIONS} or None, not {session!r}")
    for p in protocols:
        if p not in PROTOCOLS and p != MODEL_PROTOCOL:
            raise ValueError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}, {MODEL_PROTOCOL}")
    if corpus_classes not in ("own", "all"):
        raise ValueError("corpus_classes must be 'own' or 'all'")


def _settings(segmentations, protocols, corpus_classes: str, bootstrap: int, seed: int) -> dict:
    return {
        "segmentations": list(segmentations),
        "protocols": list(protocols),
        "corpus_classes": corpus_classes,
        "bootstrap_resamples": bootstrap,
        "seed": seed,
        "segment_seconds": SEGMENT_SECONDS,
        "merge_max_seconds": MERGE_MAX_SECONDS,
    }


def training_record(spec: str | None, system) -> dict | None:
    """What a system was trained on (`serval.training_data`): from its model folders, or its attribute."""
    if isinstance(spec, str):
        return record_of_spec(spec)
    return getattr(system, "training_data", None)


def corpus_labels(rows: Sequence) -> dict[str | None, set]:
    """The gold labels of each corpus, read from the whole manifest (an excluded clip does not change them)."""
    labels_of: dict[str | None, set] = {}
    for r in rows:
        if r.label is not None:
            labels_of.setdefault(r.corpus, set()).add(r.label)
    return labels_of


def score_protocol(
    units: Sequence[Clip],
    classes: Sequence[str],
    names: Sequence[str],
    predictions: Sequence[dict],
    labels_of: dict,
    corpus_classes: str,
    bootstrap: int,
    seed: int,
    order: Sequence[str] = EMOTIONS,
) -> dict:
    """{model: {"overall", "by_language", "by_corpus"}} over the units whose gold label is in `classes`
    (`order`: the order of the predictions' probabilities, `class_order` of the systems).

    A unit's prediction is the argmax over the classes its corpus has (`corpus_classes="own"`)
    or over all of `classes` ("all").
    """
    items = [u for u in units if u.label in classes]
    allowed = {
        c: [k for k in classes if corpus_classes == "all" or k in labels_of.get(c, ())]
        for c in {u.corpus for u in items}
    }
    gold = [u.label for u in items]
    groups = [u.extra["rows"][0] for u in items]
    out = {}
    for name, table in zip(names, predictions):
        pred = [_restricted_label(table[u.key]["probs"], allowed[u.corpus], order) for u in items]
        entry = {"overall": _scores(gold, pred, classes, groups, bootstrap, seed)}
        for attr in ("language", "corpus"):
            values = sorted({getattr(u, attr) for u in items}, key=lambda v: (v is None, str(v)))
            if not values or values == [None]:
                continue
            entry[f"by_{attr}"] = {}
            for v in values:
                idx = [i for i, u in enumerate(items) if getattr(u, attr) == v]
                entry[f"by_{attr}"][str(v) if v is not None else "(none)"] = _scores(
                    [gold[i] for i in idx],
                    [pred[i] for i in idx],
                    classes,
                    [groups[i] for i in idx],
                    bootstrap,
                    seed,
                )
        out[name] = entry
    return out


def score_dimensions(units: Sequence[Clip], names: Sequence[str], predictions: Sequence[dict]) -> dict:
    """{model: CCC, Pearson r and MAE per dimension} over the units with annotated dimensions."""
    dim_items = [u for u in units if any(v is not None for v in u.dims)]
    out: dict = {}
    if not dim_items:
        return out
    gold = np.array([u.dims for u in dim_items], dtype=float)  # NaN where not annotated
    for name, table in zip(names, predictions):
        pred = np.array([table[u.key]["scores"] for u in dim_items])
        if not np.isfinite(pred).any():
            continue  # no dimensional head (emotion2vec, LLMs), or none of its outputs trained
        out[name] = regression_scores(gold, pred, DIMENSIONS)
    return out


def model_entry(
    name: str, spec: str | None, system, table: dict, record: dict | None = None, rows: Sequence = ()
) -> dict:
    """A model's entry in the report: what it is, what it was trained on and how much of the manifest that
    covers (`training_overlap`; null when the model records no training data), and the replies it could
    not give (LLM systems)."""
    unparseable, errors = [], []
    for span, p in table.items():
        d = p["detail"]
        if isinstance(d, dict) and "error" in d:
            errors.append({"file": span[0], "start": span[1], "end": span[2], "error": d["error"]})
        elif isinstance(d, dict) and "reply" in d and not d.get("label"):
            unparseable.append({"file": span[0], "start": span[1], "end": span[2], "reply": d["reply"]})
    return {
        "name": name,
        "spec": spec,
        "system": getattr(system, "name", None),
        "fingerprint": system_fingerprint(system),
        "trained_on": sorted(record["train"]) if record else None,
        "training_overlap": overlap(rows, record),
        "unparseable": len(unparseable),
        "failed_requests": len(errors),
        "unparseable_replies": unparseable,
        "request_errors": errors,
    }


def _json_ready(x):
    if isinstance(x, float):
        return None if not math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_ready(v) for v in x]
    if isinstance(x, np.generic):
        return _json_ready(x.item())
    return x


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serval.onnx_engine import add_engine_arguments

    p.add_argument(
        "manifest",
        help="CSV or JSONL manifest (path, start, end, label, …, language, corpus, split), or a Hugging "
        "Face dataset (save_to_disk folder or Parquet) with an Audio and a label column",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="SPEC",
        help="repeatable: default (the bundled model, when omitted), a serval model directory, "
        "meralion:PATH, emotion2vec:large|base|seed, llm:MODEL@BASE_URL",
    )
    p.add_argument(
        "-o", "--output", required=True, help="report folder (report.json, report.md, confusion/*.png)"
    )
    p.add_argument(
        "--segments",
        default=",".join(SEGMENTATIONS),
        help=f"comma-separated, from {', '.join(SEGMENTATIONS)} (default: all)",
    )
    p.add_argument(
        "--protocols",
        default=",".join(PROTOCOLS),
        help="comma-separated: 7class,4class (default: both), model (the models' own classes: any label set)",
    )
    p.add_argument(
        "--corpus-classes",
        choices=["own", "all"],
        default="own",
        help="own: a corpus is scored over the classes it has (default); all: argmax over every class",
    )
    p.add_argument(
        "--session",
        choices=EVAL_SESSIONS,
        help="score in session mode (serval predict --session): each corpus's, or each speaker's, "
        "predictions centred as a group first",
    )
    p.add_argument("--split", help="only rows of this split (e.g. test)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the UAR 95 %% CI (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    add_engine_arguments(p)
    p.add_argument("--cache-dir", help="prediction cache (default: OUTPUT/cache)")
    p.add_argument(
        "--llm-api-key-env",
        help="environment variable holding the LLM API key "
        "(default: SERVAL_LLM_API_KEY, then OPENAI_API_KEY)",
    )
    p.add_argument("--llm-concurrency", type=int, default=4, help="parallel requests per LLM")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in OUTPUT")
    p.add_argument("--no-progress", action="store_true")


def _split_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"{what}: {', '.join(bad) or 'none given'}; choose from {', '.join(allowed)}")
    return items


def _load_systems(args: argparse.Namespace, rows: Sequence, prog: str) -> list | None:
    """The systems of `--model`, after a warning for each whose training speakers are in `rows`; None
    (the cause printed) when one cannot be loaded."""
    from serval.onnx_engine import load_engine

    for spec in args.model:  # before any prediction: a leak is worth knowing before the wait
        warning = overlap_warning(f"--model {spec}", overlap(rows, record_of_spec(spec)))
        if warning:
            print(f"{prog}: warning: {warning}", file=sys.stderr)
    systems = []
    for spec in args.model:
        options = {}
        if spec.startswith("llm:"):
            options = {"api_key_env": args.llm_api_key_env, "concurrency": args.llm_concurrency}
        try:
            systems.append(load_engine(spec, args.engine, device=args.device, **options))
        except (ImportError, OSError, ValueError, KeyError) as e:
            print(f"{prog}: --model {spec}: {e}", file=sys.stderr)
            return None
    problem = labels_problem(
        rows, _split_list(args.protocols, (*PROTOCOLS, MODEL_PROTOCOL), "--protocols"), systems
    )
    if problem:
        print(f"{prog}: {args.manifest}: {problem}", file=sys.stderr)
        return None
    return systems


def run(args: argparse.Namespace) -> int:
    from serval.predict import limit_primitive_cache
    from serval.report import plots_unavailable

    prog = "serval eval"
    if why := plots_unavailable():  # said before predicting, not after
        print(f"{prog}: no confusion plots ({why})", file=sys.stderr)
    limit_primitive_cache()
    args.model = args.model or ["default"]
    try:
        segmentations, protocols, rows = _read_inputs(args)
    except ValueError as e:  # a ManifestError is one too
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    systems = _load_systems(args, rows, prog)
    if systems is None:
        return 2
    cache_dir = args.cache_dir or Path(args.output) / "cache"
    report = evaluate(
        rows,
        systems,
        cache_dir,
        segmentations=segmentations,
        protocols=protocols,
        corpus_classes=args.corpus_classes,
        bootstrap=args.bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        specs=args.model,
        session=args.session,
    )
    report["manifest"] = str(Path(args.manifest).resolve())
    written = write_report(
        report, args.output, overwrite=args.overwrite, title=f"serval eval: {Path(args.manifest).name}"
    )
    for e in report["excluded"]:
        print(f"{prog}: excluded for every model: {e['error']}", file=sys.stderr)
    for m in report["models"]:
        if m["unparseable"] or m["failed_requests"]:
            print(
                f"{prog}: {m['name']}: {m['unparseable']} unparseable replies, {m['failed_requests']} failed "
                "requests (scored as wrong)",
                file=sys.stderr,
            )
    print(f"wrote {written['json']}, {written['markdown']} and {len(written['png'])} confusion plots")
    return 0


def _read_inputs(args: argparse.Namespace) -> tuple[list[str], list[str], list]:
    """The segmentations, protocols and manifest rows asked for; ValueError saying what is wrong."""
    segmentations = _split_list(args.segments, SEGMENTATIONS, "--segments")
    protocols = _split_list(args.protocols, (*PROTOCOLS, MODEL_PROTOCOL), "--protocols")
    rows = read_rows(args.manifest, labels=None if MODEL_PROTOCOL in protocols else EMOTIONS)
    if args.split:
        rows = [r for r in rows if r.split == args.split]
    if args.session == "speaker" and (missing := [r for r in rows if not r.speaker]):
        raise ValueError(f"{args.manifest}: --session speaker: {len(missing)} rows have no speaker")
    if not rows:
        raise ValueError(f"{args.manifest}: no rows" + (f" in split {args.split!r}" if args.split else ""))
    existing = existing_reports(args.output)
    if existing and not args.overwrite:
        raise ValueError(
            f"{args.output} already holds a report ({existing[0].name}); pass --overwrite to replace it"
        )
    return segmentations, protocols, rows
