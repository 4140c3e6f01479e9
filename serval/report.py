"""The `serval eval` report: Markdown tables, confusion-matrix PNGs, and writing them (`serval.evaluate` scores).

`write_report` saves a report dict from `serval.evaluate.evaluate` as report.json, report.md and
confusion/*.png; it never replaces an existing report unless asked to.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np

from serval.atomic import atomic_write, atomic_write_text

REPORT_FILES = ("report.json", "report.md")


def slug(text: str) -> str:
    """`text` made safe as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def pct(x: float | None) -> str:
    """A fraction as a percentage with 2 decimals, "-" when undefined."""
    return "-" if x is None else f"{100 * x:.2f}"


# ----------------------------------------------------------------------------- Markdown


def markdown_report(report: dict, title: str = "serval eval") -> str:
    """The comparison as Markdown: models, training-speaker overlap, one summary row per distinct view,
    per-class recall, confusion matrices, one table per breakdown, dimensions, replies, exclusions."""
    names = [m["name"] for m in report["models"]]
    views = distinct_views(report)
    lines = [f"# {title}", "", _preamble(report)]
    lines += _models_table(report["models"])
    lines += _overlap_notes(report["models"])
    lines += _summary_table(report["results"], names, views)
    lines += _same_segments_notes(report)
    lines += _recall_tables(report["results"], names, views)
    lines += _confusion_tables(report["results"], names, views)
    for attr in ("language", "corpus"):
        lines += _breakdown_table(report["results"], names, views, attr)
    lines += _dimensions_table(report["dimensional"], report.get("same_segments", {}))
    lines += _unparseable_table(report["models"])
    lines += _excluded_table(report["excluded"])
    return "\n".join(lines).rstrip() + "\n"


def distinct_views(report: dict) -> list[tuple[str, str, str]]:
    """(segments as shown, segmentation, protocol) of every view whose items no earlier view has:
    a segmentation with the same items as an earlier one (`same_segments`) is shown once, as "utterance = merged"."""
    same = report.get("same_segments", {})
    views = []
    for seg, by_proto in report["results"].items():
        if seg in same:
            continue
        shown = " = ".join([seg, *[t for t, kept in same.items() if kept == seg]])
        views += [(shown, seg, proto) for proto in by_proto]
    return views


def _preamble(report: dict) -> str:
    s = report["settings"]
    return (
        f"{report['n_rows']} manifest rows; {report['n_rows_excluded']} excluded for every model "
        f"(failed to decode). Classes per corpus: {s['corpus_classes']}. UAR 95 % CI: "
        f"{s['bootstrap_resamples']} bootstrap resamples of utterances, seed {s['seed']}. All values in %."
    )


def _table(heading: str, columns: list[str]) -> list[str]:
    return ["", heading, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def _models_table(models: list[dict]) -> list[str]:
    lines = _table("## Models", ["model", "spec", "trained on", "unparseable replies", "failed requests"])
    for m in models:
        trained = ", ".join(m.get("trained_on") or []) or "not recorded"
        lines.append(
            f"| {m['name']} | {m['spec'] or m['system']} | {trained} | {m['unparseable']} "
            f"| {m['failed_requests']} |"
        )
    return lines


def _overlap_notes(models: list[dict]) -> list[str]:
    notes = []
    for m in models:
        found = m.get("training_overlap") or {}
        if found.get("train"):
            notes.append(
                f"- **{m['name']} was trained on speakers of this manifest**: {_speakers(found['train'])}. "
                "Its scores on them are not speaker-independent."
            )
        if found.get("dev"):
            notes.append(
                f"- {m['name']} chose its checkpoints on these speakers (dev): {_speakers(found['dev'])}."
            )
    return ["", "## Training speakers in this manifest", "", *notes] if notes else []


def _speakers(by_corpus: dict) -> str:
    return "; ".join(
        f"{corpus}: " + ", ".join(f"{s} ({n} rows)" for s, n in speakers.items())
        for corpus, speakers in by_corpus.items()
    )


def _summary_table(results: dict, names: list[str], views: list) -> list[str]:
    columns = [
        "model",
        "segments",
        "protocol",
        "n",
        "UAR",
        "UAR 95 % CI",
        "accuracy",
        "macro-F1",
        "no answer",
    ]
    lines = _table("## Summary", columns)
    for shown, seg, proto in views:
        for name in names:
            lines.append(
                f"| {name} | {shown} | {proto} | "
                + " | ".join(_metric_cells(results[seg][proto][name]["overall"]))
                + " |"
            )
    return lines


def _metric_cells(o: dict, no_answer: bool = True) -> list[str]:
    lo, hi = o["uar_ci95"]
    cells = [str(o["n"]), pct(o["uar"]), f"{pct(lo)}–{pct(hi)}", pct(o["accuracy"]), pct(o["macro_f1"])]
    return cells + [str(o["no_answer"])] if no_answer else cells


def _same_segments_notes(report: dict) -> list[str]:
    why = {
        "merged": "no two rows of one file touch with the same label, so every merged segment is one row",
        "2s": f"no row is longer than {report['settings']['segment_seconds']:g} s, so every segment is a whole row",
    }
    notes = [
        f"{twin} = {kept}: {why.get(twin, 'the same items')}; its scores are those of {kept}, shown once."
        for twin, kept in report.get("same_segments", {}).items()
    ]
    return ["", *notes] if notes else []


def _recall_tables(results: dict, names: list[str], views: list) -> list[str]:
    # one table per protocol (its own classes): a row per model and segmentation
    lines = ["", "## Per-class recall"]
    for protocol in dict.fromkeys(proto for _, _, proto in views):
        rows = [(shown, seg) for shown, seg, proto in views if proto == protocol]
        classes = results[rows[0][1]][protocol][names[0]]["overall"]["classes"]
        lines += _table(f"### {protocol}", ["model", "segments", *classes, "UAR"])
        for shown, seg in rows:
            for name in names:
                o = results[seg][protocol][name]["overall"]
                lines.append(
                    f"| {name} | {shown} | "
                    + " | ".join(pct(o["recall"][c]) for c in classes)
                    + f" | {pct(o['uar'])} |"
                )
    return lines


def _confusion_tables(results: dict, names: list[str], views: list) -> list[str]:
    lines = ["", "## Confusion matrices (rows: gold, columns: predicted; counts)"]
    for shown, seg, proto in views:
        for name in names:
            o = results[seg][proto][name]["overall"]
            extra = any(o["confusion_no_answer"])  # unparseable or out-of-protocol answers
            columns = ["gold \\ predicted", *o["classes"], *(["no answer"] if extra else [])]
            lines += _table(f"### {name}: {shown}, {proto}", columns)
            for c, row, none in zip(o["classes"], o["confusion"], o["confusion_no_answer"]):
                lines.append(
                    f"| {c} | " + " | ".join(str(v) for v in [*row, *([none] if extra else [])]) + " |"
                )
    return lines


def _breakdown_table(results: dict, names: list[str], views: list, attr: str) -> list[str]:
    # one table for the breakdown: a row per model, view and language (or corpus), the metrics as columns
    key = f"by_{attr}"
    rows = [(shown, seg, proto) for shown, seg, proto in views if key in results[seg][proto][names[0]]]
    if not rows:
        return []
    columns = ["model", "segments", "protocol", attr, "n", "UAR", "UAR 95 % CI", "accuracy", "macro-F1"]
    lines = _table(f"## By {attr}", columns)
    for shown, seg, proto in rows:
        for name in names:
            for group, o in results[seg][proto][name][key].items():
                lines.append(
                    f"| {name} | {shown} | {proto} | {group} | " + " | ".join(_metric_cells(o, False)) + " |"
                )
    return lines


def _dimensions_table(dimensional: dict, same: dict) -> list[str]:
    if not any(dimensional.values()):
        return []
    columns = ["model", "segments", "dimension", "n", "CCC", "Pearson r", "MAE"]
    lines = _table("## Dimensions (CCC / Pearson r / MAE)", columns)
    for seg, by_model in dimensional.items():
        if seg in same:
            continue
        seg = " = ".join([seg, *[t for t, kept in same.items() if kept == seg]])
        for name, dims in by_model.items():
            for dim, v in dims.items():
                f = [("-" if v[k] is None else f"{v[k]:.4f}") for k in ("ccc", "pearson", "mae")]
                lines.append(f"| {name} | {seg} | {dim} | {v['n']} | {f[0]} | {f[1]} | {f[2]} |")
    return lines


def _unparseable_table(models: list[dict]) -> list[str]:
    odd = [(m["name"], r) for m in models for r in m["unparseable_replies"]]
    if not odd:
        return []
    lines = _table("## Unparseable replies (scored as wrong)", ["model", "file", "span", "reply"])
    for name, r in odd:
        reply = " ".join(str(r["reply"]).split()).replace("|", "\\|")[:200]
        lines.append(f"| {name} | {r['file']} | {_span(r)} | {reply} |")
    return lines


def _excluded_table(excluded: list[dict]) -> list[str]:
    if not excluded:
        return []
    heading = "## Excluded clips (failed to decode; left out for every model)"
    lines = _table(heading, ["file", "span", "error"])
    for r in excluded:
        lines.append(f"| {r['file']} | {_span(r)} | {r['error'].replace('|', '/')} |")
    return lines


def _span(r: dict) -> str:
    if r["start"] is None and r["end"] is None:
        return "whole"
    return f"{r['start'] or 0:g}–{'end' if r['end'] is None else format(r['end'], 'g')} s"


# ----------------------------------------------------------------------------- plots


def plots_unavailable() -> str | None:
    """Why plots cannot be drawn here (matplotlib is the `serval[plot]` extra), or None when they can."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed: pip install 'serval[plot]'"
    return None


def plot_confusions(report: dict, directory: str | os.PathLike) -> list[Path]:
    """One PNG per model and distinct view (segmentation, protocol): the row-normalised confusion matrix
    with counts; a segmentation with the same items as an earlier one (`same_segments`) gets none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for shown, seg, proto in distinct_views(report):
        for name, entry in report["results"][seg][proto].items():
            fig = _confusion_figure(plt, entry["overall"], f"{name}\n{shown}, {proto}")
            path = directory / f"{slug(name)}__{seg}__{proto}.png"
            atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110))
            plt.close(fig)
            written.append(path)
    return written


def _confusion_figure(plt, o: dict, title: str):
    cm = np.array(o["confusion"], dtype=np.float64)
    columns = list(o["classes"])
    if any(o["confusion_no_answer"]):  # unparseable or out-of-protocol answers get their own column
        cm = np.concatenate([cm, np.array(o["confusion_no_answer"], np.float64)[:, None]], 1)
        columns.append("no answer")
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # row-normalised: recall on the diagonal
    k = len(o["classes"])
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2, 1.0 * k + 1.5))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(len(columns)):
            color = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(k), o["classes"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"{title}: UAR {pct(o['uar'])} %, n={o['n']}", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- files


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
    """Write report.json, report.md and confusion/*.png (where matplotlib is installed) into `output`;
    refuses to replace a report unless overwrite."""
    output = Path(output)
    existing = existing_reports(output)
    if existing and not overwrite:
        raise FileExistsError(
            f"{output}: already holds a report ({existing[0].name}); pass --overwrite to replace it"
        )
    if overwrite and (output / "confusion").is_dir():
        for old in (output / "confusion").glob("*.png"):
            old.unlink()  # stale plots of models no longer compared would mislead
    pngs = [] if plots_unavailable() else plot_confusions(report, output / "confusion")
    atomic_write_text(output / "report.json", json.dumps(report, indent=2) + "\n", overwrite=True)
    atomic_write_text(output / "report.md", markdown_report(report, title), overwrite=True)
    return {"json": output / "report.json", "markdown": output / "report.md", "png": pngs}
