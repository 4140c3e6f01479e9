"""`serval timeline`: emotion over time in a long recording.

Two modes. The grid mode scores every window of a fixed grid (4 s windows every 2 s, the
paper's labelling grid; `--window 2 --hop 2` for its fine-grained 2 s segments), optionally
leaves silence unscored with Silero VAD, and joins adjacent windows with the same label into
segments of at most 15 s, as the paper merges them. The turns mode (`--segments TURNS`) scores
given speaker turns instead (RTTM or CSV start,end,speaker, e.g. from pyannote), one result
per turn, and summarises each speaker. Both read the audio chunk by chunk (`serval.windows`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serval import vocab
from serval.atomic import atomic_write, atomic_write_text
from serval.turns import Turn, TurnsError, read_turns, score_spans
from serval.windows import (
    Segment,
    WindowResult,
    WindowSpec,
    merge_windows,
    no_speech_spans,
    sliding_windows,
)

# ---------------------------------------------------------------------------- records


def source_name(source) -> str | None:
    """A path as given; a file object's name; None for bytes and arrays."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else None


def result_record(
    r: WindowResult, classes: Sequence[str], dimensions: Sequence[str], trained: Sequence[str]
) -> dict:
    """A window (or turn) as a JSON-ready dict; unscored windows have label None and no outputs.

    With VAD, `speech_fraction` and `no_speech` (left unscored for lack of speech). Scores of
    dimensions not in `trained` are None."""
    rec: dict = {"start": r.start, "end": r.end}
    if r.speech_fraction is not None:
        rec["speech_fraction"] = r.speech_fraction
        rec["no_speech"] = bool(r.no_speech)
    if r.error is not None:
        rec["error"] = r.error
    if r.scored:
        rec.update(vocab.label_body(r.probs, r.scores, classes, dimensions, trained=trained))
    else:
        rec["label"] = None
    return rec


def segment_record(
    s: Segment, classes: Sequence[str], dimensions: Sequence[str], trained: Sequence[str]
) -> dict:
    """A merged segment as a JSON-ready dict (scores of dimensions not in `trained` are None)."""
    return {
        "start": s.start,
        "end": s.end,
        "label": s.label,
        "windows": s.windows,
        "probabilities": vocab.probabilities(s.probs, classes),
        "scores": vocab.scores(s.scores, dimensions, trained),
    }


def _about(source, predictor, trained: Sequence[str]) -> dict:
    """What a timeline's JSON opens with: the file, the model, its classes and dimensions."""
    return {
        "file": source_name(source),
        "model": predictor.name,
        "classes": list(predictor.classes),
        "dimensions": list(predictor.dimensions),
        "trained_dimensions": list(trained),
    }


def grid_timeline(
    source, predictor, spec: WindowSpec = WindowSpec(), batch_size: int = 16, progress: bool = False
) -> dict:
    """Every window of the grid and the merged segments of a file or 16 kHz array, as a JSON-ready dict."""
    classes, dims = predictor.classes, predictor.dimensions
    trained = vocab.trained_dimensions(predictor)
    results = list(sliding_windows(source, predictor, spec, batch_size, progress=progress))
    segments = merge_windows(results, classes, spec.max_segment)
    return {
        **_about(source, predictor, trained),
        "grid": {"window": spec.window, "hop": spec.hop, "min_length": spec.min_length},
        "vad": {"threshold": spec.vad_threshold, "min_speech": spec.min_speech} if spec.vad else None,
        "max_segment": spec.max_segment,
        "windows": [result_record(r, classes, dims, trained) for r in results],
        "segments": [segment_record(s, classes, dims, trained) for s in segments],
        "unscored": [{"start": a, "end": b} for a, b in no_speech_spans(results)],
    }


def turns_timeline(
    source,
    predictor,
    turns: Sequence[Turn],
    max_window: float = 30.0,
    batch_size: int = 16,
    duration: float | None = None,
) -> dict:
    """One result per speaker turn (long turns cut into <= 30 s pieces and pooled) and a per-speaker summary.

    Turns running past `duration` are clipped to it; turns starting after it get an error record.
    """
    classes, dims = predictor.classes, predictor.dimensions
    trained = vocab.trained_dimensions(predictor)
    spans = [(t.start, t.end if duration is None else min(t.end, duration)) for t in turns]
    records = []
    for turn, r in zip(turns, score_spans(source, spans, predictor, max_window, batch_size)):
        rec = {"speaker": turn.speaker, **result_record(r, classes, dims, trained), "pieces": r.pieces}
        if duration is not None and turn.start >= duration:
            rec["error"] = f"turn starts at {turn.start:g} s, after the end of the audio ({duration:.3f} s)"
        elif r.end < turn.end:
            rec["clipped_from"] = turn.end
        records.append(rec)
    return {
        **_about(source, predictor, trained),
        "max_window": max_window,
        "turns": records,
        "speakers": speaker_summary(records, classes, dims, trained),
    }


def speaker_summary(
    records: Sequence[dict], classes: Sequence[str], dimensions: Sequence[str], trained: Sequence[str]
) -> dict:
    """Per speaker: turns, seconds, duration-weighted mean probabilities and scores (None where not
    in `trained`), seconds per label."""
    out: dict[str, dict] = {}
    for spk in dict.fromkeys(r["speaker"] for r in records):
        mine = [r for r in records if r["speaker"] == spk and "probabilities" in r]
        failed = sum(1 for r in records if r["speaker"] == spk and "probabilities" not in r)
        summary: dict = {
            "turns": len(mine),
            "failed_turns": failed,
            "duration": round(sum(r["end"] - r["start"] for r in mine), 3),
        }
        if mine:
            w = np.array([r["end"] - r["start"] for r in mine])[:, None]
            probs = (np.array([[r["probabilities"][c] for c in classes] for r in mine]) * w).sum(0) / w.sum()
            values = [
                [np.nan if r["scores"][d] is None else r["scores"][d] for d in dimensions] for r in mine
            ]
            scores = (np.array(values, np.float64) * w).sum(0) / w.sum()
            seconds = dict.fromkeys(classes, 0.0)
            for r in mine:
                seconds[r["label"]] += r["end"] - r["start"]
            summary.update(vocab.label_body(probs, scores, classes, dimensions, trained=trained))
            summary["label_seconds"] = {c: round(s, 3) for c, s in seconds.items() if s > 0}
        out[spk] = summary
    return out


# ---------------------------------------------------------------------------- outputs


def to_csv(
    rows: Sequence[dict], classes: Sequence[str], dimensions: Sequence[str], lead: Sequence[str]
) -> str:
    """Flat CSV: the `lead` columns, label, one column per class probability and per score."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*lead, "label", *classes, *dimensions])
    for r in rows:
        writer.writerow(
            [_csv_cell(r.get(k)) for k in lead]
            + [r.get("label") or ""]
            + [_csv_cell(r.get("probabilities", {}).get(c)) for c in classes]
            + [_csv_cell(r.get("scores", {}).get(d)) for d in dimensions]
        )
    return buf.getvalue()


def _csv_cell(v) -> str:
    if isinstance(v, bool):  # as JSON writes it
        return "true" if v else "false"
    return "" if v is None else str(v)


def speakers_csv(speakers: dict, classes: Sequence[str], dimensions: Sequence[str]) -> str:
    rows = [{"speaker": s, **v} for s, v in speakers.items()]
    return to_csv(rows, classes, dimensions, ("speaker", "turns", "failed_turns", "duration"))


NO_SPEECH_STYLE = {"facecolor": "0.88", "edgecolor": "0.6", "hatch": "//", "lw": 0, "zorder": 0}


def figure(result: dict):
    """The matplotlib Figure of a timeline: class probabilities and the trained dimensional scores over
    time, with the spans left unscored for lack of speech shaded grey, hatched and labelled "no speech";
    a model with no trained dimension gets the probabilities alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = result["classes"]
    dims = [d for d in result["dimensions"] if d in result.get("trained_dimensions", ())]
    items = result.get("windows", result.get("turns", []))
    t = np.array([(r["start"] + r["end"]) / 2 for r in items])
    probs = np.array(
        [[r["probabilities"][c] if "probabilities" in r else np.nan for c in classes] for r in items]
    )
    scores = np.array(
        [[np.nan if r.get("scores", {}).get(d) is None else r["scores"][d] for d in dims] for r in items]
    )
    if dims:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 6), sharex=True, height_ratios=[2, 1])
    else:  # no trained dimension: nothing honest to draw below the probabilities
        fig, ax1 = plt.subplots(1, 1, figsize=(12, 4))
        ax2 = None
    colors = plt.get_cmap("tab10").colors
    marker = "o" if "turns" in result else "."  # a marker keeps isolated speech windows visible
    for k, c in enumerate(classes):
        ax1.plot(t, probs[:, k] if len(items) else [], label=c, color=colors[k % 10], marker=marker, ms=3)
    bands = result.get("segments") or result.get("turns") or []
    for s in bands:  # the merged label (or the turn's label) as a strip above the curves
        if s.get("label") in classes:
            ax1.axvspan(
                s["start"], s["end"], ymin=0.94, ymax=1.0, color=colors[classes.index(s["label"]) % 10], lw=0
            )
    extent = max((r["end"] for r in items), default=0.0) - min((r["start"] for r in items), default=0.0)
    _shade_no_speech([ax for ax in (ax1, ax2) if ax is not None], result.get("unscored", []), extent)
    ax1.set_ylim(0, 1.06)
    ax1.set_ylabel("probability")
    ax1.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if ax2 is not None:
        for k, d in enumerate(dims):
            ax2.plot(t, scores[:, k] if len(items) else [], label=d, marker=marker, ms=3)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("score")
        ax2.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    (ax2 or ax1).set_xlabel("time (s)")
    ax1.set_title(Path(result["file"]).name if result.get("file") else "timeline")
    fig.tight_layout()
    return fig


def _shade_no_speech(axes: list, spans: Sequence[dict], extent: float) -> None:
    # Shaded on every axis so a gap in the curves never reads as a scored stretch; labelled on the
    # top axis where the span is wide enough for the words (the hatching and the legend mark the rest).
    for ax in axes:
        for i, s in enumerate(spans):
            label = "no speech" if ax is axes[0] and i == 0 else None
            ax.axvspan(s["start"], s["end"], gid="no-speech", label=label, **NO_SPEECH_STYLE)
    for s in spans:
        if s["end"] - s["start"] >= 0.04 * extent:
            axes[0].text(
                (s["start"] + s["end"]) / 2,
                0.5,
                "no speech",
                ha="center",
                va="center",
                rotation=90,
                color="0.35",
                fontsize=8,
                transform=axes[0].get_xaxis_transform(),
                gid="no-speech-label",
            )


def plot(result: dict, path: str | os.PathLike) -> None:
    """Write `figure(result)` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def outputs(result: dict, prefix: str, formats: Sequence[str]) -> dict[str, str | None]:
    """Output path -> text (None for the PNG) for the chosen formats."""
    classes, dims = result["classes"], result["dimensions"]
    out: dict[str, str | None] = {}
    if "json" in formats:
        out[f"{prefix}.json"] = json.dumps(result, indent=1) + "\n"
    if "csv" in formats:
        if "turns" in result:
            out[f"{prefix}.csv"] = to_csv(
                result["turns"], classes, dims, ("speaker", "start", "end", "pieces", "error")
            )
            out[f"{prefix}.speakers.csv"] = speakers_csv(result["speakers"], classes, dims)
        else:
            lead = ("start", "end", "speech_fraction", "no_speech")
            out[f"{prefix}.csv"] = to_csv(result["windows"], classes, dims, lead)
            out[f"{prefix}.segments.csv"] = to_csv(
                result["segments"], classes, dims, ("start", "end", "windows")
            )
    if "png" in formats:
        out[f"{prefix}.png"] = None
    return out


# WindowSpec's fields that are timeline options, with their help texts
GRID_OPTIONS = {
    "window": "window length in seconds",
    "hop": "seconds between window starts",
    "min_length": "shortest end remainder that still gets its own end-aligned window, in seconds",
    "vad_threshold": "Silero speech probability at which a 32 ms frame turns to speech",
    "min_speech": "fraction of a window's frames that must be speech for it to be scored (with --vad)",
    "max_segment": "longest merged segment in seconds",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serval.onnx_engine import add_engine_arguments

    p.add_argument("file", metavar="FILE", help="audio file (any length)")
    p.add_argument(
        "--model",
        help="default (the bundled model, when omitted), a model directory, hub id or meralion:PATH",
    )
    for name, text in GRID_OPTIONS.items():  # the defaults are WindowSpec's, so the CLI and the API agree
        if name == "vad_threshold":
            p.add_argument(
                "--vad", action="store_true", help="leave windows without speech unscored (Silero VAD)"
            )
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=float,
            default=getattr(WindowSpec, name),
            help=f"{text} (default %(default)g)",
        )
    p.add_argument(
        "--segments",
        metavar="TURNS",
        help="score these speaker turns (RTTM, or CSV start,end,speaker) instead of a fixed grid",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="PREFIX",
        help="write PREFIX.json, PREFIX.csv, PREFIX.segments.csv (or .speakers.csv) and PREFIX.png; "
        "without it the JSON goes to standard output",
    )
    p.add_argument(
        "--formats", default="json,csv,png", help="which outputs to write with -o (default json,csv,png)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--batch-size", type=int, default=16)
    add_engine_arguments(p)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from serval.audio import AudioError
    from serval.locations import NoDefaultModelError
    from serval.onnx_engine import load_engine

    try:
        formats = _formats(args)
        spec, duration, turns = _plan(args)
        _refuse_overwrite(args, formats, turns)
    except (AudioError, TurnsError, ValueError) as e:
        return _fail(str(e))
    try:
        predictor = load_engine(args.model, args.engine, device=args.device)
        if turns is not None:
            result = turns_timeline(
                args.file, predictor, turns, batch_size=args.batch_size, duration=duration
            )
        else:
            result = grid_timeline(args.file, predictor, spec, args.batch_size, progress=not args.no_progress)
    except AudioError as e:
        return _fail(str(e), 1)
    except (NoDefaultModelError, FileNotFoundError, ValueError, RuntimeError) as e:
        return _fail(str(e))
    result["duration"] = round(duration, 3)
    _write(result, args, formats)
    failed = [r for r in result.get("turns", []) if "error" in r]
    for r in failed:
        print(
            f"serval timeline: turn {r['start']}-{r['end']} ({r['speaker']}): {r['error']}", file=sys.stderr
        )
    if not any("probabilities" in r for r in result.get("windows", result.get("turns", []))):
        return _fail(
            f"{args.file}: nothing was scored (audio shorter than {args.min_length:g} s, or no speech)", 1
        )
    return 1 if failed else 0


def _fail(message: str, code: int = 2) -> int:
    print(f"serval timeline: {message}", file=sys.stderr)
    return code


def _formats(args: argparse.Namespace) -> list[str]:
    """The --formats asked for; ValueError for an unknown one, or for only a PNG without matplotlib
    (serval[plot]; beside other formats the PNG is dropped, with a one-line note)."""
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - {"json", "csv", "png"})
    if unknown or not formats:
        raise ValueError(f"--formats takes json, csv, png; got {args.formats!r}")
    from serval.report import plots_unavailable

    if args.output and "png" in formats and (why := plots_unavailable()):
        if formats == ["png"]:
            raise ValueError(f"the PNG plot needs matplotlib ({why})")
        formats.remove("png")
        print(f"serval timeline: no PNG plot ({why})", file=sys.stderr)
    return formats


def _plan(args: argparse.Namespace) -> tuple[WindowSpec, float, list[Turn] | None]:
    """The grid, the recording's duration and the turns (None: the grid mode), checked before any work."""
    from serval.audio import audio_info

    spec = WindowSpec(**{name: getattr(args, name) for name in GRID_OPTIONS}, vad=args.vad)
    duration = audio_info(args.file).duration
    if not args.segments:
        spec.check_count(duration)  # too fine a grid for the recording: refused before any work
    return spec, duration, read_turns(args.segments) if args.segments else None


def _refuse_overwrite(args: argparse.Namespace, formats: list[str], turns: list[Turn] | None) -> None:
    """ValueError, before any work, if an output would replace a file and --overwrite was not given."""
    if not args.output:
        return
    dummy = (
        {"classes": [], "dimensions": [], "turns": [], "speakers": {}}
        if turns
        else {"classes": [], "dimensions": [], "windows": [], "segments": []}
    )
    existing = [p for p in outputs(dummy, args.output, formats) if Path(p).exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")


def _write(result: dict, args: argparse.Namespace, formats: list[str]) -> None:
    """The JSON on standard output, or each of the outputs under -o PREFIX."""
    if not args.output:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return
    for path, text in outputs(result, args.output, formats).items():
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            atomic_write(target, lambda tmp: plot(result, tmp))
        else:
            atomic_write_text(target, text, overwrite=True)
        print(f"wrote {target}", file=sys.stderr)


__all__ = [
    "Turn",
    "TurnsError",
    "read_turns",
    "grid_timeline",
    "turns_timeline",
    "speaker_summary",
    "figure",
    "plot",
]
