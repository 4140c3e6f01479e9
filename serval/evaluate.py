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
and excluded for all. Predictions are cached per model and span (keyed by the model's
fingerprint and the file's size and mtime), so a re-run only computes what changed.
`serval.report` turns the report dict into Markdown tables and confusion-matrix PNGs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serval.audio import AudioError
from serval.batch import item_file, item_info, load_item, read_rows
from serval.metrics import bootstrap_ci, classification_scores, regression_scores
from serval.progress import progress_bar
from serval.report import existing_reports, slug, write_report
from serval.training_data import overlap, overlap_warning, record_of_spec
from serval.vocab import DIMENSIONS, EMOTIONS, PRIMARY4, trained_dimensions

PROTOCOLS = {"7class": EMOTIONS, "4class": PRIMARY4}
SEGMENTATIONS = ("utterance", "2s", "merged")
SEGMENT_SECONDS = 2.0
MIN_TAIL_SECONDS = 1.0  # a row's last piece shorter than this is not scored under "2s"
MERGE_MAX_SECONDS = 15.0
TOUCH_TOLERANCE = 0.01  # seconds between spans that still count as adjacent
CHUNK = 64  # spans decoded (and held in memory) at a time


# ----------------------------------------------------------------------------- segments


@dataclass(frozen=True)
class Unit:
    """One scored item: a span of a file, its gold label and dims, and the manifest rows it covers."""

    path: str
    start: float | None
    end: float | None
    label: str | None
    dims: tuple[float, float, float]  # NaN where not annotated
    language: str | None
    corpus: str | None
    rows: tuple[int, ...]

    @property
    def span(self) -> tuple[str, float | None, float | None]:
        return (self.path, self.start, self.end)


def _dims(row) -> tuple[float, float, float]:
    return tuple(float(v) if v is not None else math.nan for v in (row.arousal, row.valence, row.dominance))


def _unit(row, i: int, start=None, end=None, whole: bool = True) -> Unit:
    start, end = (row.start, row.end) if whole else (round(start, 6), round(end, 6))
    return Unit(str(row.path), start, end, row.label, _dims(row), row.language, row.corpus, (i,))


def _file_duration(path: str) -> float | None:
    try:
        return item_info(path).duration
    except AudioError:
        return None  # the load of the whole row will then fail and report why


def make_units(
    rows: Sequence, segmentation: str, duration: Callable[[str], float | None] = _file_duration
) -> list[Unit]:
    """Manifest rows -> the items scored under `segmentation` ("utterance", "2s" or "merged")."""
    if segmentation == "utterance":
        return [_unit(r, i) for i, r in enumerate(rows)]
    if segmentation == "2s":
        return _two_second_units(rows, duration)
    if segmentation == "merged":
        return _merged_units(rows)
    raise ValueError(f"unknown segmentation {segmentation!r}; choose from {', '.join(SEGMENTATIONS)}")


def _two_second_units(rows: Sequence, duration: Callable[[str], float | None]) -> list[Unit]:
    units = []
    for i, row in enumerate(rows):
        start = row.start or 0.0
        end = row.end if row.end is not None else duration(str(row.path))
        if end is None or end - start <= SEGMENT_SECONDS + TOUCH_TOLERANCE:
            units.append(_unit(row, i))  # already a 2 s segment (or shorter): scored as it is
            continue
        n_full = int(math.floor((end - start) / SEGMENT_SECONDS + 1e-6))
        for k in range(n_full):
            a = start + k * SEGMENT_SECONDS
            units.append(_unit(row, i, a, a + SEGMENT_SECONDS, whole=False))
        tail = end - (start + n_full * SEGMENT_SECONDS)
        if tail >= MIN_TAIL_SECONDS - 1e-6:
            units.append(_unit(row, i, start + n_full * SEGMENT_SECONDS, end, whole=False))
    return units


def _merged_units(rows: Sequence) -> list[Unit]:
    by_file: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_file.setdefault(str(row.path), []).append(i)
    groups: list[list[int]] = []
    for indices in by_file.values():
        indices.sort(key=lambda i: (rows[i].start or 0.0, i))
        current: list[int] = []
        for i in indices:
            row = rows[i]
            if current and _can_merge(rows[current[0]], rows[current[-1]], row):
                current.append(i)
            else:
                if current:
                    groups.append(current)
                current = [i]
        groups.append(current)
    groups.sort(key=lambda g: g[0])
    units = []
    for g in groups:
        first, last = rows[g[0]], rows[g[-1]]
        if len(g) == 1:
            units.append(_unit(first, g[0]))
            continue
        lengths = np.array([rows[i].end - rows[i].start for i in g])
        dims = np.array([_dims(rows[i]) for i in g])
        # duration-weighted mean; NaN as soon as one merged row lacks the dimension
        merged_dims = tuple(float(v) for v in (lengths[:, None] * dims).sum(0) / lengths.sum())
        units.append(
            Unit(
                str(first.path),
                first.start,
                last.end,
                first.label,
                merged_dims,
                first.language,
                first.corpus,
                tuple(g),
            )
        )
    return units


def _can_merge(first, last, row) -> bool:
    return (
        row.label is not None
        and row.label == last.label
        and last.end is not None
        and row.start is not None
        and row.end is not None
        and first.start is not None
        and abs(row.start - last.end) <= TOUCH_TOLERANCE
        and row.end - first.start <= MERGE_MAX_SECONDS + TOUCH_TOLERANCE
        and (row.language, row.corpus) == (last.language, last.corpus)
    )


# ----------------------------------------------------------------------------- prediction cache


class PredictionCache:
    """One JSONL file per model: a line per (model fingerprint, file, size, mtime, start, end)."""

    def __init__(self, directory: str | os.PathLike, name: str, fingerprint: str):
        self.fingerprint = fingerprint
        self.path = Path(directory) / f"{slug(name)}-{fingerprint[:16]}.jsonl"
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        self.records[record["key"]] = record
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by an interrupted run: that span is simply redone

    def key(self, span: tuple, file_id: tuple[int, int] | None) -> str | None:
        if file_id is None:
            return None
        path, start, end = span
        raw = f"{self.fingerprint}\n{Path(path).resolve()}\n{file_id[0]}\n{file_id[1]}\n{start}\n{end}"
        return hashlib.sha1(raw.encode()).hexdigest()

    def add(self, key: str | None, record: dict, persist: bool) -> None:
        if key is None:
            return
        record = {"key": key, **record}
        self.records[key] = record
        if persist:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(item_file(path))  # a dataset row: its data file
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _to_serval_order(
    values: Sequence, names: Sequence[str], target: Sequence[str], fill: float
) -> np.ndarray:
    """Values named by a system's own order -> `target` order; a name the system lacks gets `fill`."""
    out = np.full(len(target), fill, np.float64)
    for v, n in zip(values, names):
        if n in target:
            out[list(target).index(n)] = np.nan if v is None else v
    return out


# ----------------------------------------------------------------------------- evaluation


def fingerprint(system) -> str:
    """The system's cache identity: its `fingerprint`, or for an in-memory Predictor a hash of its weights."""
    if getattr(system, "fingerprint", None):
        return system.fingerprint
    models = getattr(system, "models", None)
    if not models:
        raise ValueError(
            f"{getattr(system, 'name', system)!r} has no fingerprint to key its cached predictions"
        )
    from serval.inference import weights_fingerprint  # in-memory models: torch is loaded already

    system.fingerprint = weights_fingerprint(models)
    return system.fingerprint


def unique_names(systems: Sequence) -> list[str]:
    """Display names: each system's name, disambiguated by its position when two are alike."""
    names = [str(getattr(s, "name", "") or f"model{i + 1}") for i, s in enumerate(systems)]
    return [f"{n} #{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def predict_all(
    units: Sequence[Unit],
    systems: Sequence,
    names: Sequence[str],
    cache_dir: str | os.PathLike,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[dict], dict[tuple, str]]:
    """Predictions of every system for every distinct span (cached), and the spans that failed to decode.

    Returns ([{span: record}] per system, {span: error}). A record holds "probs" (EMOTIONS
    order), "scores" (DIMENSIONS order; NaN where the system gave none or its output for the
    dimension was not trained) and the system's "detail", if any.
    """
    spans = list(dict.fromkeys(u.span for u in units))
    file_ids = {p: _file_id(p) for p in dict.fromkeys(s[0] for s in spans)}
    # the cache file is named by the system, not its display name, which depends on the other models
    caches = [
        PredictionCache(cache_dir, str(getattr(s, "name", n)), fingerprint(s)) for s, n in zip(systems, names)
    ]
    keys = [{s: c.key(s, file_ids[s[0]]) for s in spans} for c in caches]
    todo = [s for s in spans if any(k[s] is None or k[s] not in c.records for c, k in zip(caches, keys))]
    failures: dict[tuple, str] = {}
    bar = progress_bar(total=len(todo), enabled=progress and bool(todo), unit=" clip", desc="eval")
    for at in range(0, len(todo), CHUNK):
        chunk = todo[at : at + CHUNK]
        waves = {}
        for span in chunk:
            try:
                waves[span] = load_item(*span)
            except AudioError as e:
                failures[span] = str(e)
        for system, cache, key in zip(systems, caches, keys):
            need = [s for s in chunk if s in waves and (key[s] is None or key[s] not in cache.records)]
            if not need:
                continue
            probs, scores = system.predict_waveforms([waves[s] for s in need], batch_size=batch_size)
            details = getattr(system, "details", None) or [None] * len(need)
            for s, p, q, d in zip(need, probs, scores, details):
                record = {
                    "file": s[0],
                    "start": s[1],
                    "end": s[2],
                    "classes": list(system.classes),
                    "probs": [round(float(v), 7) for v in p],
                    "dimensions": list(system.dimensions),
                    "scores": [None if not np.isfinite(v) else round(float(v), 7) for v in q],
                    "detail": d,
                }
                # a transient failure (e.g. an HTTP error) is scored now but asked again next run
                cache.add(key[s], record, persist=not (isinstance(d, dict) and "error" in d))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    predictions = []
    for system, cache, key in zip(systems, caches, keys):
        trained = trained_dimensions(system)
        table = {}
        for s in spans:
            if s in failures or key[s] is None or key[s] not in cache.records:
                continue
            r = cache.records[key[s]]
            table[s] = {
                "probs": _to_serval_order(r["probs"], r["classes"], EMOTIONS, 0.0),
                # an untrained output is no prediction: NaN, so it is never scored (its CCC is n/a)
                "scores": _to_serval_order(
                    [v if d in trained else None for d, v in zip(r["dimensions"], r["scores"])],
                    r["dimensions"],
                    DIMENSIONS,
                    math.nan,
                ),
                "detail": r.get("detail"),
            }
        predictions.append(table)
    for s in spans:  # a file we could not stat is never cached and fails to load above
        if s not in failures and any(s not in t for t in predictions):
            failures[s] = f"{s[0]}: no prediction (file could not be read)"
    return predictions, failures


def _restricted_label(probs: np.ndarray, allowed: Sequence[str]) -> str | None:
    values = probs[[EMOTIONS.index(c) for c in allowed]]
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
) -> dict:
    """Score `systems` (Predictor-like objects or `--model` spec strings) on manifest `rows`.

    Returns the report as a JSON-ready dict (NaN written as null); `serval.report.write_report` saves it.
    """
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    if corpus_classes not in ("own", "all"):
        raise ValueError("corpus_classes must be 'own' or 'all'")
    if specs is None:
        specs = [s if isinstance(s, str) else None for s in systems]
    from serval.onnx_engine import load_engine  # engine "auto": ONNX Runtime on a CPU, no torch needed

    systems = [load_engine(s) if isinstance(s, str) else s for s in systems]
    names = unique_names(systems)
    units = {seg: make_units(rows, seg) for seg in segmentations}
    # a row with neither a label nor a dimension cannot be scored: it is not run either
    all_units = [u for seg in segmentations for u in units[seg] if _scorable(u)]
    predictions, failures = predict_all(all_units, systems, names, cache_dir, batch_size, progress)
    failed_rows = {i for u in all_units if u.span in failures for i in u.rows}
    labels_of = corpus_labels(rows)
    listed = {k: [c for c in EMOTIONS if c in v] for k, v in labels_of.items()}
    valid = {
        seg: [u for u in units[seg] if _scorable(u) and not failed_rows.intersection(u.rows)]
        for seg in segmentations
    }
    results = {
        seg: {
            proto: score_protocol(
                valid[seg], PROTOCOLS[proto], names, predictions, labels_of, corpus_classes, bootstrap, seed
            )
            for proto in protocols
        }
        for seg in segmentations
    }
    models = [
        model_entry(name, spec, system, table, training_record(spec, system), rows)
        for name, spec, system, table in zip(names, specs or [None] * len(systems), systems, predictions)
    ]
    return _json_ready(
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": _settings(segmentations, protocols, corpus_classes, bootstrap, seed),
            "n_rows": len(rows),
            "n_rows_excluded": len(failed_rows),
            "n_items": {seg: len(valid[seg]) for seg in segmentations},
            "same_segments": same_segmentations(valid),
            "corpus_labels": {str(k) if k is not None else "(none)": v for k, v in listed.items()},
            "models": models,
            "excluded": [{"file": s[0], "start": s[1], "end": s[2], "error": e} for s, e in failures.items()],
            "results": results,
            "dimensional": {seg: score_dimensions(valid[seg], names, predictions) for seg in segmentations},
        }
    )


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


def same_segmentations(valid: dict[str, list[Unit]]) -> dict[str, str]:
    """{segmentation: an earlier one with exactly its items}, whose scores it therefore repeats: merged =
    utterance when no two rows of a file merge, 2s = utterance when no row is longer than 2 s."""
    same: dict[str, str] = {}
    order = list(valid)
    for i, seg in enumerate(order):
        twin = next((e for e in order[:i] if e not in same and valid[e] == valid[seg]), None)
        if twin is not None:
            same[seg] = twin
    return same


def training_record(spec: str | None, system) -> dict | None:
    """What a system was trained on (`serval.training_data`): from its model folders, or its attribute."""
    if isinstance(spec, str):
        return record_of_spec(spec)
    return getattr(system, "training_data", None)


def _scorable(u: Unit) -> bool:
    return u.label is not None or bool(np.isfinite(u.dims).any())


def corpus_labels(rows: Sequence) -> dict[str | None, set]:
    """The gold labels of each corpus, read from the whole manifest (an excluded clip does not change them)."""
    labels_of: dict[str | None, set] = {}
    for r in rows:
        if r.label is not None:
            labels_of.setdefault(r.corpus, set()).add(r.label)
    return labels_of


def score_protocol(
    units: Sequence[Unit],
    classes: Sequence[str],
    names: Sequence[str],
    predictions: Sequence[dict],
    labels_of: dict,
    corpus_classes: str,
    bootstrap: int,
    seed: int,
) -> dict:
    """{model: {"overall", "by_language", "by_corpus"}} over the units whose gold label is in `classes`.

    A unit's prediction is the argmax over the classes its corpus has (`corpus_classes="own"`)
    or over all of `classes` ("all").
    """
    items = [u for u in units if u.label in classes]
    allowed = {
        c: [k for k in classes if corpus_classes == "all" or k in labels_of.get(c, ())]
        for c in {u.corpus for u in items}
    }
    gold = [u.label for u in items]
    groups = [u.rows[0] for u in items]
    out = {}
    for name, table in zip(names, predictions):
        pred = [_restricted_label(table[u.span]["probs"], allowed[u.corpus]) for u in items]
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


def score_dimensions(units: Sequence[Unit], names: Sequence[str], predictions: Sequence[dict]) -> dict:
    """{model: CCC, Pearson r and MAE per dimension} over the units with annotated dimensions."""
    dim_items = [u for u in units if np.isfinite(u.dims).any()]
    out: dict = {}
    if not dim_items:
        return out
    gold = np.array([u.dims for u in dim_items])
    for name, table in zip(names, predictions):
        pred = np.array([table[u.span]["scores"] for u in dim_items])
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
        "fingerprint": fingerprint(system),
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
        "--protocols", default=",".join(PROTOCOLS), help="comma-separated: 7class,4class (default: both)"
    )
    p.add_argument(
        "--corpus-classes",
        choices=["own", "all"],
        default="own",
        help="own: a corpus is scored over the classes it has (default); all: argmax over every class",
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
    return systems


def run(args: argparse.Namespace) -> int:
    from serval.manifest import ManifestError
    from serval.report import plots_unavailable

    prog = "serval eval"
    if why := plots_unavailable():  # said before predicting, not after
        print(f"{prog}: no confusion plots ({why})", file=sys.stderr)
    args.model = args.model or ["default"]
    try:
        segmentations = _split_list(args.segments, SEGMENTATIONS, "--segments")
        protocols = _split_list(args.protocols, tuple(PROTOCOLS), "--protocols")
        rows = read_rows(args.manifest)
    except (ValueError, ManifestError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if args.split:
        rows = [r for r in rows if r.split == args.split]
    if not rows:
        print(
            f"{prog}: {args.manifest}: no rows" + (f" in split {args.split!r}" if args.split else ""),
            file=sys.stderr,
        )
        return 2
    existing = existing_reports(args.output)
    if existing and not args.overwrite:
        print(
            f"{prog}: {args.output} already holds a report ({existing[0].name}); pass --overwrite to replace it",
            file=sys.stderr,
        )
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
