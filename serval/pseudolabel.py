"""`serval pseudolabel`: the paper's teacher-agreement pseudo-labelling of unlabelled speech.

The pipeline (MERaLiON-SER, section 3, after Wang et al. 2025):
1. Cut each recording (or manifest span) into utterances of 10-30 s: one that fits is kept
   whole, a longer one is cut into the fewest equal pieces of at most 30 s, a shorter one is
   dropped.
2. Label every 4 s window (2 s hop, the `serval.windows` grid) with each teacher. A window
   keeps an emotion only when all teachers give the same one of the six non-neutral emotions;
   otherwise it is neutral.
3. Select an utterance when at least `min_emotional` of its windows carry an emotion. Its
   label is the majority emotion of those windows (a tie goes to the emotion with the larger
   summed teacher probability). An utterance with no emotional window at all is kept as a
   neutral example (unless `keep_neutral` is off); one with some, but fewer than
   `min_emotional`, is ambiguous and dropped. Every decision is written with its reason.
4. Second pass (optional): relabel the selected utterances with a trained serval model, whose
   label and dimensional scores go into the manifest (the paper's two-pass labelling).

Runs are resumable: each finished recording is appended (fsynced) to `OUTPUT.progress.jsonl`,
and a rerun with the same settings skips what is there. The manifest, the per-window JSONL
and the decisions JSONL are written atomically at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from serval import vocab
from serval.clip import Clip
from serval.progress import progress_bar
from serval.pseudolabel_outputs import Progress, job_key, output_paths, write_outputs
from serval.vocab import EMOTIONS, class_name
from serval.windows import WindowSpec, iter_windows

NON_NEUTRAL = EMOTIONS[1:]


@dataclass
class PseudoLabelConfig:
    window: float = 4.0
    hop: float = 2.0
    min_window: float = 0.5  # grid rule: shortest end remainder given its own window (serval.windows)
    min_utterance: float = 10.0
    max_utterance: float = 30.0
    min_emotional: int = 2  # emotional windows an utterance needs to be selected as emotional
    keep_neutral: bool = True  # keep utterances without any emotional window, labelled neutral
    batch_size: int = 16

    def check(self) -> None:
        if not 0 < self.min_utterance <= self.max_utterance:
            raise ValueError(
                f"need 0 < min_utterance <= max_utterance, got {self.min_utterance:g} and "
                f"{self.max_utterance:g}"
            )
        if self.min_emotional < 1:
            raise ValueError(f"min_emotional must be >= 1, got {self.min_emotional}")


# ---------------------------------------------------------------------------- the rules


def agree(labels: Sequence[str | None]) -> str:
    """A window's label: the emotion every teacher gave, if it is one of the six non-neutral; else neutral."""
    first = labels[0] if labels else None
    if first in NON_NEUTRAL and all(label == first for label in labels):
        return first
    return "neutral"


def plan_utterances(
    start: float, end: float, min_len: float = 10.0, max_len: float = 30.0
) -> list[tuple[float, float]]:
    """Utterance spans of [start, end]: kept whole when it fits, cut into the fewest equal pieces of at most
    `max_len` when longer (or, if those would be shorter than `min_len`, into `max_len` pieces with a short
    remainder dropped), nothing when shorter than `min_len`."""
    d = end - start
    if d < min_len - 1e-9:
        return []
    n = max(1, int(np.ceil(d / max_len - 1e-9)))
    if d / n >= min_len - 1e-9:
        edges = np.linspace(start, end, n + 1)
        return [(round(float(a), 3), round(float(b), 3)) for a, b in zip(edges[:-1], edges[1:])]
    spans, a = [], start
    while end - a >= min_len - 1e-9:
        b = min(a + max_len, end)
        spans.append((round(a, 3), round(b, 3)))
        a = b
    return spans


def decide(window_labels: Sequence[str], confidences: Sequence[float], cfg: PseudoLabelConfig) -> dict:
    """Select an utterance from its windows' agreed labels: {"kept", "label", "reason", "emotional", "counts"}."""
    counts = Counter(label for label in window_labels if label != "neutral")
    n = sum(counts.values())
    detail = ", ".join(f"{e} {counts[e]}" for e in NON_NEUTRAL if counts[e])
    out = {"emotional": n, "counts": {e: counts[e] for e in NON_NEUTRAL if counts[e]}}
    if n == 0:
        if cfg.keep_neutral:
            return {
                **out,
                "kept": True,
                "label": "neutral",
                "reason": f"kept as neutral: none of {len(window_labels)} windows has an agreed emotion",
            }
        return {**out, "kept": False, "label": None, "reason": "dropped: no window has an agreed emotion"}
    if n < cfg.min_emotional:
        return {
            **out,
            "kept": False,
            "label": None,
            "reason": f"dropped: {n} emotional window(s) ({detail}) < {cfg.min_emotional}",
        }
    weight = {e: sum(c for lab, c in zip(window_labels, confidences) if lab == e) for e in counts}
    label = max(counts, key=lambda e: (counts[e], weight[e], -EMOTIONS.index(e)))
    return {
        **out,
        "kept": True,
        "label": label,
        "reason": f"kept: {n} emotional window(s) ({detail}) >= {cfg.min_emotional}; majority {label}",
    }


# ---------------------------------------------------------------------------- teachers


def teacher_labels(teacher, waves: list[np.ndarray], batch_size: int) -> tuple[list[str | None], list[float]]:
    """Top class (serval name; None for an all-zero "no answer" row) and its probability, per wave."""
    probs, _ = teacher.predict_waveforms(waves, batch_size=batch_size)
    names = [class_name(c) for c in teacher.classes]
    labels, conf = [], []
    for p in np.asarray(probs, np.float64):
        k = int(np.argmax(p))
        ok = np.isfinite(p).all() and p[k] > 0
        labels.append(names[k] if ok else None)
        conf.append(round(float(p[k]), 6) if ok else 0.0)
    return labels, conf


# ---------------------------------------------------------------------------- one recording


def label_source(src: Clip, teachers: dict, cfg: PseudoLabelConfig) -> dict:
    """First pass for one recording: its utterances, every window's teacher labels and the decisions.

    Audio errors propagate (`serval.audio.AudioError`), naming the file.
    """
    from serval.audio import audio_info

    start = src.start or 0.0
    end = src.end if src.end is not None else audio_info(src.path).duration
    spans = plan_utterances(start, end, cfg.min_utterance, cfg.max_utterance)
    result: dict = {
        "key": job_key(src),
        "path": src.path,
        "start": round(start, 3),
        "end": round(end, 3),
        "utterances": [],
    }
    if not spans:
        result["reason"] = f"dropped: {end - start:.2f} s is shorter than {cfg.min_utterance:g} s"
        return result
    grid = WindowSpec(cfg.window, cfg.hop, cfg.min_window)
    for a, b in spans:
        windows = list(iter_windows(src.path, grid, start=a, end=b))
        waves = [w.samples for w in windows]
        per_teacher = {
            name: teacher_labels(t, waves, cfg.batch_size) if waves else ([], [])
            for name, t in teachers.items()
        }
        records, agreed, conf = [], [], []
        for i, w in enumerate(windows):
            labels = [per_teacher[name][0][i] for name in teachers]
            label = agree(labels)
            c = float(np.mean([per_teacher[name][1][i] for name in teachers])) if label != "neutral" else 0.0
            agreed.append(label)
            conf.append(c)
            records.append(
                {
                    "start": round(w.start, 3),
                    "end": round(w.end, 3),
                    "label": label,
                    "teachers": dict(zip(teachers, labels)),
                    "confidence": {name: per_teacher[name][1][i] for name in teachers},
                }
            )
        decision = decide(agreed, conf, cfg)
        result["utterances"].append({"start": a, "end": b, **decision, "windows": records})
    return result


# ---------------------------------------------------------------------------- the run


def collect_sources(inputs: Sequence[str]) -> list[Clip]:
    """Audio files (directories searched recursively, paths resolved) and manifest rows (.csv/.jsonl, with
    their columns), in the given order."""
    from serval.io.inputs import iter_inputs

    return list(iter_inputs(inputs, datasets=False, resolve=True))


def pseudolabel(
    inputs: Sequence[str],
    teachers: Sequence[str],
    output: str | os.PathLike,
    cfg: PseudoLabelConfig | None = None,
    relabel: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    restart: bool = False,
    progress: bool = False,
    log=None,
    ray=None,
) -> dict:
    """Run the pipeline and write the manifest, OUTPUT-stem.windows.jsonl and OUTPUT-stem.decisions.jsonl.

    With teachers: the first pass, then (with `relabel`) the second pass over the selected utterances.
    Without teachers: the second pass alone, relabelling every row of the input manifests (the output of
    an earlier first pass) with the `relabel` model. Returns counts {"sources", "failed", "utterances",
    "kept"}. Resumes an interrupted run with the same settings; a recording that fails is recorded and
    skipped. `ray` (`serval.io.ray_pool.RaySettings`): the first pass runs on a Ray cluster's actors.
    """
    from serval.inference import load

    cfg = cfg or PseudoLabelConfig()
    paths = output_paths(output)
    _check_run(cfg, teachers, relabel, paths, overwrite)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    sources = collect_sources(inputs)
    if not sources:
        raise ValueError(f"no audio files or manifest rows found in {list(inputs)}")
    settings = {"teachers": list(teachers), "relabel": relabel, "config": asdict(cfg)}
    # A fresh run loads its teachers before it starts the progress log, so a teacher that fails to
    # load leaves no log behind to refuse the next run's (corrected) settings.
    fresh = restart or not paths["progress"].exists()
    models = {spec: load(spec, device=device) for spec in teachers} if fresh else None
    state = Progress(paths["progress"], settings, restart=restart)
    if not teachers:  # second pass only: every input row is one selected utterance
        for src in sources:
            if job_key(src) not in state.done:
                state.done[job_key(src)] = given_utterance(src)
    todo = [s for s in sources if job_key(s) not in state.done]
    if len(todo) < len(sources) and teachers:
        log(f"resuming: {len(sources) - len(todo)} of {len(sources)} recordings already labelled")
    if todo and ray is not None:
        first_pass_on_ray(todo, state, teachers, cfg, device, ray, progress, log)
    elif todo:
        models = models or {spec: load(spec, device=device) for spec in teachers}
        for src in progress_bar(todo, progress, desc="first pass", unit=" file"):
            rec = first_pass_record(src, models, cfg)
            if "error" in rec:
                log(f"serval pseudolabel: {rec['error']}")
            state.add(rec)
    if relabel:
        second_pass(sources, state, relabel, device, cfg, progress, log)
    return write_outputs(sources, state, paths, teachers, relabel, overwrite)


def _check_run(cfg: PseudoLabelConfig, teachers, relabel, paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse a run that cannot work before any model loads: its settings, or outputs already there."""
    from serval.manifest import manifest_format

    cfg.check()
    if not teachers and not relabel:
        raise ValueError("give teachers (--teacher, first pass) or a model to relabel with (--relabel)")
    if len(set(teachers)) != len(teachers):
        raise ValueError(f"the same teacher is given twice: {list(teachers)}")
    manifest_format(paths["manifest"])  # .csv or .jsonl, before any work
    existing = [str(p) for k, p in paths.items() if k != "progress" and p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")


def first_pass_record(src: Clip, teachers: dict, cfg: PseudoLabelConfig) -> dict:
    """`label_source`'s record, or the error record of a recording that cannot be read."""
    from serval.audio import AudioError

    try:
        return label_source(src, teachers, cfg)
    except (AudioError, OSError) as e:
        return {"key": job_key(src), "path": src.path, "error": str(e)}


class RayTeachers:
    """A Ray actor holding the teachers: {"x": sources as JSON} -> {"y": first-pass records as JSON}."""

    def __init__(self, teachers: Sequence[str], cfg: dict, device: str | None):
        from serval.inference import load

        self.teachers = {spec: load(spec, device=device) for spec in teachers}
        self.cfg = PseudoLabelConfig(**cfg)

    def __call__(self, batch: dict) -> dict:
        out = [
            json.dumps(first_pass_record(Clip(**json.loads(x)), self.teachers, self.cfg)) for x in batch["x"]
        ]
        return {"i": batch["i"], "y": np.array(out, dtype=object)}


def first_pass_on_ray(todo, state: Progress, teachers, cfg: PseudoLabelConfig, device, ray, progress, log):
    """The first pass by a pool of `RayTeachers` actors; each finished recording goes to the log as it comes."""
    from serval.io.ray_pool import ray_map

    rows = [json.dumps(asdict(src)) for src in todo]
    kwargs = {"teachers": list(teachers), "cfg": asdict(cfg), "device": device}
    bar = progress_bar(total=len(todo), enabled=progress, desc="first pass", unit=" file")
    for _, text in ray_map(rows, RayTeachers, kwargs, 1, ray):
        rec = json.loads(text)
        if "error" in rec:
            log(f"serval pseudolabel: {rec['error']}")
        state.add(rec)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def given_utterance(src: Clip) -> dict:
    """A manifest row as a selected utterance (second-pass-only runs); the whole file when it has no span."""
    label = src.label
    return {
        "key": job_key(src),
        "path": src.path,
        "start": src.start,
        "end": src.end,
        "given": True,
        "utterances": [
            {
                "start": src.start,
                "end": src.end,
                "kept": True,
                "label": label,
                "emotional": None,
                "counts": {},
                "reason": "given: a row of the input manifest",
                "windows": 0,
            }
        ],
    }


def second_pass(
    sources, state: Progress, relabel: str, device, cfg: PseudoLabelConfig, progress: bool, log
) -> None:
    """Relabel the kept utterances with a trained model: label, confidence and dimensional scores."""
    from serval.audio import AudioError, load_audio
    from serval.inference import load

    todo = [
        s
        for s in sources
        if job_key(s) in state.done
        and job_key(s) not in state.relabelled
        and any(u["kept"] for u in state.done[job_key(s)]["utterances"])
    ]
    if not todo:
        return
    model = load(relabel, device=device)
    names = [class_name(c) for c in model.classes]
    groups = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    for group in progress_bar(groups, progress, desc="second pass", unit=" file"):
        jobs, records = [], {}
        for src in group:
            try:
                for u in state.done[job_key(src)]["utterances"]:
                    if u["kept"]:
                        jobs.append((src, u, load_audio(src.path, u["start"], u["end"])))
            except (AudioError, OSError) as e:
                jobs = [j for j in jobs if j[0] is not src]
                records[job_key(src)] = {
                    "relabel": job_key(src),
                    "model": relabel,
                    "error": str(e),
                    "utterances": [],
                }
                log(f"serval pseudolabel: second pass: {e}")
        probs, scores = (
            model.predict_waveforms([x for _, _, x in jobs], batch_size=cfg.batch_size) if jobs else ([], [])
        )
        for (src, u, _), p, s in zip(jobs, np.asarray(probs, np.float64), np.asarray(scores, np.float64)):
            rec = records.setdefault(
                job_key(src), {"relabel": job_key(src), "model": relabel, "utterances": []}
            )
            rec["utterances"].append(
                {
                    "start": u["start"],
                    "end": u["end"],
                    "label": names[int(np.argmax(p))],
                    "confidence": round(float(np.max(p)), 6),
                    # only trained outputs become dimensional labels
                    "scores": {
                        d: v
                        for d, v in vocab.scores(s, model.dimensions, vocab.trained_dimensions(model)).items()
                        if v is not None
                    },
                }
            )
        for src in group:
            state.add(records[job_key(src)])


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serval.io.ray_pool import add_ray_arguments

    p.add_argument(
        "inputs",
        nargs="+",
        metavar="AUDIO_DIR_OR_MANIFEST",
        help="audio files, directories of them, or manifests (.csv/.jsonl)",
    )
    p.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="SPEC",
        help="a teacher (repeat): default (the bundled model), a serval model dir, meralion:PATH, "
        "emotion2vec:base|seed|large; "
        "without teachers, --relabel relabels the rows of an input manifest (second pass only)",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="MANIFEST", help="output manifest (.csv or .jsonl)"
    )
    p.add_argument(
        "--relabel", metavar="MODEL", help="second pass: relabel the selected utterances with this model"
    )
    p.add_argument("--window", type=float, default=4.0, help="labelling window in seconds (default 4)")
    p.add_argument("--hop", type=float, default=2.0, help="seconds between windows (default 2)")
    p.add_argument(
        "--min-utterance", type=float, default=10.0, help="shortest utterance in seconds (default 10)"
    )
    p.add_argument(
        "--max-utterance", type=float, default=30.0, help="longest utterance in seconds (default 30)"
    )
    p.add_argument(
        "--min-emotional",
        type=int,
        default=2,
        help="emotional windows an utterance needs to be selected (default 2)",
    )
    p.add_argument(
        "--drop-neutral",
        action="store_true",
        help="drop utterances without any emotional window instead of keeping them as neutral",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument(
        "--restart", action="store_true", help="discard an unfinished run's progress and start over"
    )
    add_ray_arguments(p, "the first pass runs on its actors")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from serval.io.ray_pool import ray_settings

    # every option named as a config field sets it; --drop-neutral is the one said the other way round
    options = {f.name: getattr(args, f.name) for f in fields(PseudoLabelConfig) if hasattr(args, f.name)}
    cfg = PseudoLabelConfig(**options, keep_neutral=not args.drop_neutral)
    try:
        counts = pseudolabel(
            args.inputs,
            args.teacher,
            args.output,
            cfg,
            relabel=args.relabel,
            device=args.device,
            overwrite=args.overwrite,
            restart=args.restart,
            progress=not args.no_progress,
            ray=ray_settings(args),
        )
    except (ValueError, FileExistsError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"serval pseudolabel: {e}", file=sys.stderr)
        return 2
    print(
        f"serval pseudolabel: {counts['kept']} of {counts['utterances']} utterances kept from "
        f"{counts['sources']} recordings ({counts['failed']} failed) -> {args.output}",
        file=sys.stderr,
    )
    return 1 if counts["failed"] else 0
