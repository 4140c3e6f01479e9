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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serval.atomic import atomic_write, atomic_write_text
from serval.audio import AudioError, audio_info, load_audio
from serval.baselines import DIMENSIONS, EMOTIONS, load_system
from serval.metrics import bootstrap_ci, classification_scores, regression_scores

PRIMARY4 = ("neutral", "angry", "sad", "happy")
PROTOCOLS = {"7class": EMOTIONS, "4class": PRIMARY4}
SEGMENTATIONS = ("utterance", "2s", "merged")
SEGMENT_SECONDS = 2.0
MIN_TAIL_SECONDS = 1.0  # a row's last piece shorter than this is not scored under "2s"
MERGE_MAX_SECONDS = 15.0
TOUCH_TOLERANCE = 0.01  # seconds between spans that still count as adjacent
CHUNK = 64  # spans decoded (and held in memory) at a time
REPORT_FILES = ("report.json", "report.md")


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
        return audio_info(path).duration
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


class PredictionCache:
    """One JSONL file per model: a line per (model fingerprint, file, size, mtime, start, end)."""

    def __init__(self, directory: str | os.PathLike, name: str, fingerprint: str):
        self.fingerprint = fingerprint
        self.path = Path(directory) / f"{_slug(name)}-{fingerprint[:16]}.jsonl"
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
        st = os.stat(path)
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
    h = hashlib.sha1(b"serval-in-memory")
    for m in models:
        h.update(json.dumps(m.config.to_dict(), sort_keys=True).encode())
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    system.fingerprint = h.hexdigest()
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
    order), "scores" (DIMENSIONS order, NaN if none) and the system's "detail", if any.
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
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit=" clip", desc="eval", file=sys.stderr)
    for at in range(0, len(todo), CHUNK):
        chunk = todo[at : at + CHUNK]
        waves = {}
        for span in chunk:
            try:
                waves[span] = load_audio(*span)
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
    for cache, key in zip(caches, keys):
        table = {}
        for s in spans:
            if s in failures or key[s] is None or key[s] not in cache.records:
                continue
            r = cache.records[key[s]]
            table[s] = {
                "probs": _to_serval_order(r["probs"], r["classes"], EMOTIONS, 0.0),
                "scores": _to_serval_order(r["scores"], r["dimensions"], DIMENSIONS, math.nan),
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

    Returns the report as a JSON-ready dict (NaN written as null); `write_report` saves it.
    """
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    if corpus_classes not in ("own", "all"):
        raise ValueError("corpus_classes must be 'own' or 'all'")
    if specs is None:
        specs = [s if isinstance(s, str) else None for s in systems]
    systems = [load_system(s) if isinstance(s, str) else s for s in systems]
    names = unique_names(systems)
    units = {seg: make_units(rows, seg) for seg in segmentations}
    # a row with neither a label nor a dimension cannot be scored: it is not run either
    all_units = [
        u for seg in segmentations for u in units[seg] if u.label is not None or np.isfinite(u.dims).any()
    ]
    predictions, failures = predict_all(all_units, systems, names, cache_dir, batch_size, progress)

    failed_rows = {i for u in all_units if u.span in failures for i in u.rows}
    # a corpus's label set is read from the whole manifest, so an excluded clip does not change it
    labels_of: dict[str | None, set] = {}
    for r in rows:
        if r.label is not None:
            labels_of.setdefault(r.corpus, set()).add(r.label)

    results: dict = {}
    dimensional: dict = {}
    n_items: dict = {}
    for seg in segmentations:
        valid = [
            u
            for u in units[seg]
            if not failed_rows.intersection(u.rows) and (u.label is not None or np.isfinite(u.dims).any())
        ]
        n_items[seg] = len(valid)
        results[seg] = {}
        for proto in protocols:
            classes = PROTOCOLS[proto]
            items = [u for u in valid if u.label in classes]
            allowed = {
                c: [k for k in classes if corpus_classes == "all" or k in labels_of.get(c, ())]
                for c in {u.corpus for u in items}
            }
            results[seg][proto] = {}
            for name, table in zip(names, predictions):
                pred = [_restricted_label(table[u.span]["probs"], allowed[u.corpus]) for u in items]
                gold = [u.label for u in items]
                groups = [u.rows[0] for u in items]
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
                results[seg][proto][name] = entry
        dim_items = [u for u in valid if np.isfinite(u.dims).any()]
        dimensional[seg] = {}
        for name, table in zip(names, predictions):
            if not dim_items:
                break
            pred = np.array([table[u.span]["scores"] for u in dim_items])
            if not np.isfinite(pred).any():
                continue  # no dimensional head (emotion2vec, LLMs)
            dimensional[seg][name] = regression_scores(
                np.array([u.dims for u in dim_items]), pred, DIMENSIONS
            )

    models = []
    for i, (name, system, table) in enumerate(zip(names, systems, predictions)):
        unparseable, errors = [], []
        for span, p in table.items():
            d = p["detail"]
            if isinstance(d, dict) and "error" in d:
                errors.append({"file": span[0], "start": span[1], "end": span[2], "error": d["error"]})
            elif isinstance(d, dict) and "reply" in d and not d.get("label"):
                unparseable.append({"file": span[0], "start": span[1], "end": span[2], "reply": d["reply"]})
        models.append(
            {
                "name": name,
                "spec": specs[i] if specs else None,
                "system": getattr(system, "name", None),
                "fingerprint": fingerprint(system),
                "unparseable": len(unparseable),
                "failed_requests": len(errors),
                "unparseable_replies": unparseable,
                "request_errors": errors,
            }
        )
    excluded = [{"file": s[0], "start": s[1], "end": s[2], "error": e} for s, e in failures.items()]
    return _json_ready(
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {
                "segmentations": list(segmentations),
                "protocols": list(protocols),
                "corpus_classes": corpus_classes,
                "bootstrap_resamples": bootstrap,
                "seed": seed,
                "segment_seconds": SEGMENT_SECONDS,
                "merge_max_seconds": MERGE_MAX_SECONDS,
            },
            "n_rows": len(rows),
            "n_rows_excluded": len(failed_rows),
            "n_items": n_items,
            "corpus_labels": {
                str(k) if k is not None else "(none)": [c for c in EMOTIONS if c in v]
                for k, v in labels_of.items()
            },
            "models": models,
            "excluded": excluded,
            "results": results,
            "dimensional": dimensional,
        }
    )


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


# ----------------------------------------------------------------------------- reports


def pct(x: float | None) -> str:
    """A fraction as a percentage with 2 decimals, "-" when undefined."""
    return "-" if x is None else f"{100 * x:.2f}"


def markdown_report(report: dict, title: str = "serval eval") -> str:
    """The comparison as Markdown tables: summary, breakdowns, dimensions, unparseable replies, exclusions."""
    s = report["settings"]
    names = [m["name"] for m in report["models"]]
    lines = [f"# {title}", ""]
    lines.append(
        f"{report['n_rows']} manifest rows; {report['n_rows_excluded']} excluded for every model "
        f"(failed to decode). Classes per corpus: {s['corpus_classes']}. UAR 95 % CI: "
        f"{s['bootstrap_resamples']} bootstrap resamples of utterances, seed {s['seed']}. All values in %."
    )
    lines += [
        "",
        "## Models",
        "",
        "| model | spec | unparseable replies | failed requests |",
        "| --- | --- | --- | --- |",
    ]
    for m in report["models"]:
        lines.append(
            f"| {m['name']} | {m['spec'] or m['system']} | {m['unparseable']} | {m['failed_requests']} |"
        )

    lines += [
        "",
        "## Summary",
        "",
        "| model | segments | protocol | n | UAR | UAR 95 % CI | accuracy | macro-F1 | no answer |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seg, by_proto in report["results"].items():
        for proto, by_model in by_proto.items():
            for name in names:
                o = by_model[name]["overall"]
                lo, hi = o["uar_ci95"]
                lines.append(
                    f"| {name} | {seg} | {proto} | {o['n']} | {pct(o['uar'])} | {pct(lo)}–{pct(hi)} "
                    f"| {pct(o['accuracy'])} | {pct(o['macro_f1'])} | {o['no_answer']} |"
                )

    for attr in ("language", "corpus"):
        key = f"by_{attr}"
        blocks = [
            (seg, proto, by_model)
            for seg, by_proto in report["results"].items()
            for proto, by_model in by_proto.items()
            if key in by_model[names[0]]
        ]
        if not blocks:
            continue
        lines += ["", f"## UAR by {attr}", ""]
        for seg, proto, by_model in blocks:
            groups = list(by_model[names[0]][key])
            lines += [
                f"{seg}, {proto}:",
                "",
                "| model | " + " | ".join(groups) + " |",
                "| --- |" + " --- |" * len(groups),
            ]
            for name in names:
                cells = [
                    f"{pct(by_model[name][key][g]['uar'])} (n={by_model[name][key][g]['n']})" for g in groups
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")

    if any(report["dimensional"].values()):
        lines += [
            "",
            "## Dimensions (CCC / Pearson r / MAE)",
            "",
            "| model | segments | dimension | n | CCC | Pearson r | MAE |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for seg, by_model in report["dimensional"].items():
            for name, dims in by_model.items():
                for dim, v in dims.items():
                    f = [("-" if v[k] is None else f"{v[k]:.4f}") for k in ("ccc", "pearson", "mae")]
                    lines.append(f"| {name} | {seg} | {dim} | {v['n']} | {f[0]} | {f[1]} | {f[2]} |")

    odd = [(m["name"], r) for m in report["models"] for r in m["unparseable_replies"]]
    if odd:
        lines += [
            "",
            "## Unparseable replies (scored as wrong)",
            "",
            "| model | file | span | reply |",
            "| --- | --- | --- | --- |",
        ]
        for name, r in odd:
            reply = " ".join(str(r["reply"]).split()).replace("|", "\\|")[:200]
            lines.append(f"| {name} | {r['file']} | {_span(r)} | {reply} |")
    if report["excluded"]:
        lines += [
            "",
            "## Excluded clips (failed to decode; left out for every model)",
            "",
            "| file | span | error |",
            "| --- | --- | --- |",
        ]
        for r in report["excluded"]:
            lines.append(f"| {r['file']} | {_span(r)} | {r['error'].replace('|', '/')} |")
    return "\n".join(lines).rstrip() + "\n"


def _span(r: dict) -> str:
    if r["start"] is None and r["end"] is None:
        return "whole"
    return f"{r['start'] or 0:g}–{'end' if r['end'] is None else format(r['end'], 'g')} s"


def plot_confusions(report: dict, directory: str | os.PathLike) -> list[Path]:
    """One PNG per model, segmentation and protocol: the row-normalised confusion matrix with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for seg, by_proto in report["results"].items():
        for proto, by_model in by_proto.items():
            for name, entry in by_model.items():
                o = entry["overall"]
                cm = np.array(o["confusion"], dtype=np.float64)
                columns = list(o["classes"])
                if any(
                    o["confusion_no_answer"]
                ):  # unparseable or out-of-protocol answers get their own column
                    cm = np.concatenate([cm, np.array(o["confusion_no_answer"], np.float64)[:, None]], 1)
                    columns.append("no answer")
                rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # row-normalised: recall on the diagonal
                k = len(o["classes"])
                fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2, 1.0 * k + 1.5))
                ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
                for i in range(k):
                    for j in range(len(columns)):
                        ax.text(
                            j,
                            i,
                            f"{int(cm[i, j])}",
                            ha="center",
                            va="center",
                            color="white" if rates[i, j] > 0.5 else "black",
                            fontsize=9,
                        )
                ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
                ax.set_yticks(range(k), o["classes"])
                ax.set_xlabel("predicted")
                ax.set_ylabel("gold")
                ax.set_title(f"{name}\n{seg}, {proto}: UAR {pct(o['uar'])} %, n={o['n']}", fontsize=10)
                fig.tight_layout()
                path = directory / f"{_slug(name)}__{seg}__{proto}.png"
                atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110))
                plt.close(fig)
                written.append(path)
    return written


def existing_reports(output: str | os.PathLike) -> list[Path]:
    """Report files already in `output` (the cache folder does not count)."""
    output = Path(output)
    found = [output / f for f in REPORT_FILES if (output / f).exists()]
    if (output / "confusion").is_dir():
        found += sorted((output / "confusion").glob("*.png"))
    return found


def write_report(
    report: dict, output: str | os.PathLike, overwrite: bool = False, title: str = "serval eval"
) -> dict:
    """Write report.json, report.md and confusion/*.png into `output`; refuses to replace a report unless overwrite."""

    output = Path(output)
    existing = existing_reports(output)
    if existing and not overwrite:
        raise FileExistsError(
            f"{output}: already holds a report ({existing[0].name}); pass --overwrite to replace it"
        )
    if overwrite and (output / "confusion").is_dir():
        for old in (output / "confusion").glob("*.png"):
            old.unlink()  # stale plots of models no longer compared would mislead
    pngs = plot_confusions(report, output / "confusion")
    atomic_write_text(output / "report.json", json.dumps(report, indent=2) + "\n", overwrite=True)
    atomic_write_text(output / "report.md", markdown_report(report, title), overwrite=True)
    return {"json": output / "report.json", "markdown": output / "report.md", "png": pngs}


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "manifest", help="CSV or JSONL manifest (path, start, end, label, …, language, corpus, split)"
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="SPEC",
        help="repeatable: a serval model directory, meralion:PATH, emotion2vec:large|base|seed, "
        "llm:MODEL@BASE_URL",
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
    p.add_argument("--device", default="auto")
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


def run(args: argparse.Namespace) -> int:
    from serval.manifest import ManifestError, read_manifest

    prog = "serval eval"
    try:
        segmentations = _split_list(args.segments, SEGMENTATIONS, "--segments")
        protocols = _split_list(args.protocols, tuple(PROTOCOLS), "--protocols")
        rows = read_manifest(args.manifest)
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
    systems = []
    for spec in args.model:
        options = {}
        if spec.startswith("llm:"):
            options = {"api_key_env": args.llm_api_key_env, "concurrency": args.llm_concurrency}
        try:
            systems.append(load_system(spec, device=args.device, **options))
        except (ImportError, OSError, ValueError, KeyError) as e:
            print(f"{prog}: --model {spec}: {e}", file=sys.stderr)
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
