"""`serval predict`: the decode -> batch -> predict pipeline over inputs (`serval.io.inputs`), its
streaming, resumable output (`serval.io.jsonl`), and its run on a Ray cluster (`serval.io.ray_pool`).

Items are read lazily; a background thread decodes them into a bounded queue while the model runs
(`serval.io.decoder`), and a bounded window of decoded clips is sorted by length into batches, so
memory does not grow with the number of inputs. Records are written as each window is done, in input order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from serval.atomic import atomic_write_text
from serval.audio import AudioError
from serval.clip import Clip
from serval.io.decoder import decoded
from serval.io.formats import format_records
from serval.io.inputs import iter_inputs, record_key
from serval.io.jsonl import JsonlLog, iter_records
from serval.io.ray_pool import RaySettings, add_ray_arguments, ray_map, ray_settings
from serval.longform import WINDOW_BATCHES, LongAudio, count_pieces, pooling_note, speech_of
from serval.progress import progress_bar
from serval.session import SESSION_BY, calibrate, groups_of
from serval.vad import speech_fields
from serval.vocab import SAMPLE_RATE, class_subset


def limit_primitive_cache() -> None:
    """Keep oneDNN's primitive cache small; set before the first model call (it is read once).

    Every new batch width is a new oneDNN convolution primitive holding its own copy of the reordered
    weights (about 5 MB for whisper-base), and batches sorted by length have many widths, so the default
    cache of 1024 grows with the number of clips. A small one keeps memory flat. Padding batches to a few
    widths would keep the cache warm, but changes the outputs' last digits (golden outputs).
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")


def predict_items(
    predictor,
    items: Iterable[Clip],
    batch_size: int = 16,
    classes: Sequence[str] | None = None,
    window: int | None = None,
    label_no_speech: bool = False,
) -> Iterator[list[dict]]:
    """The records of `items`, one list per window of decoded clips, in input order.

    A window (default `WINDOW_BATCHES` batches) is sorted by length and cut into batches, so a
    batch carries little padding while at most two windows of audio are in memory. A clip without
    speech gets label None unless `label_no_speech`.
    """
    limit_primitive_cache()
    keep = class_subset(classes, predictor.classes)
    window = window or batch_size * WINDOW_BATCHES
    pending: list[tuple[Clip, np.ndarray | AudioError]] = []
    for pair in decoded(items, depth=window):
        pending.append(pair)
        if len(pending) >= window:
            records, pending = _predict_window(predictor, pending, batch_size, keep, label_no_speech), []
            release_memory()
            yield records
    if pending:
        yield _predict_window(predictor, pending, batch_size, keep, label_no_speech)


def release_memory() -> None:
    """Hand freed heap pages back to the system (glibc), so that RSS follows the live data, not its peak."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (not glibc: nothing to do)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _predict_window(predictor, pending: list, batch_size: int, keep, label_no_speech: bool) -> list[dict]:
    records = [_head(item, wave) for item, wave in pending]
    ok = [i for i, (_, w) in enumerate(pending) if isinstance(w, np.ndarray)]
    ok.sort(key=lambda i: len(pending[i][1]))
    # clips in batches sorted by length; a long file on its own, read and scored piece by piece
    jobs = [ok[at : at + batch_size] for at in range(0, len(ok), batch_size)]
    jobs += [[i] for i, (_, w) in enumerate(pending) if isinstance(w, LongAudio)]
    # the VAD runs in its own thread while the model runs (ONNX Runtime lets go of the GIL); a long
    # file's speech is measured streamed, a block at a time, like its pieces
    with ThreadPoolExecutor(1, thread_name_prefix="serval-vad") as pool:
        speech = {i: pool.submit(speech_of, pending[i][1]) for i in ok}
        for batch in jobs:
            try:  # every wave was checked finite as it was read, naming its file: not again
                probs, scores = predictor.predict_waveforms(
                    [pending[i][1] for i in batch], batch_size=batch_size, check_finite=False
                )
                for i in batch:
                    if i not in speech:
                        speech[i] = pool.submit(speech_of, pending[i][1])
                fields = [speech_fields(speech[i].result()) for i in batch]
            except AudioError as e:  # a long file that breaks part-way through
                records[batch[0]] = _head(pending[batch[0]][0], e)
                continue
            for i, p, s, f in zip(batch, probs, scores, fields):
                records[i].update(predictor.record(p, s, keep, speech=f, label_no_speech=label_no_speech))
    return records


def _head(item: Clip, wave: np.ndarray | LongAudio | AudioError) -> dict:
    head: dict = {"file": item.path}
    if item.start is not None or item.end is not None:
        head.update(start=item.start, end=item.end)
    if isinstance(wave, AudioError):
        head["error"] = str(wave)
    else:
        head["duration"] = round(len(wave) / SAMPLE_RATE, 3)
        head["pieces"] = count_pieces(len(wave))
    return head


class JsonlOutput:
    """`serval predict`'s JSONL output, which a rerun resumes: `done` holds the keys of the records in it."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.log = JsonlLog(path, overwrite=overwrite)
        self.path = self.log.path
        self.done: set[tuple] = {record_key(r) for _, r in self.log}

    def write(self, records: Sequence[dict]) -> None:
        """Append records (on disk before this returns)."""
        self.log.append(records)
        self.done.update(record_key(r) for r in records)


def read_keys(path: str | os.PathLike, repair: bool = False) -> set[tuple]:
    """The record keys in a JSONL file; with `repair`, a torn last line (no newline, or not JSON) is cut off."""
    return {record_key(r) for _, r in iter_records(path, repair=repair)}


class RayPredictor:
    """A Ray actor holding one predictor: {"x": items as JSON} -> {"y": records as JSON}."""

    def __init__(self, model, device, batch_size: int, classes, threads: int, label_no_speech: bool = False):
        from serval.onnx_engine import load_engine

        limit_primitive_cache()
        # engine "auto": ONNX Runtime on a CPU worker, so a cluster needs no torch
        self.predictor = load_engine(model, device=device, threads=max(1, threads))
        torch = sys.modules.get("torch")
        if torch is not None:  # the torch engine (a GPU, or a model ONNX Runtime does not run)
            torch.set_num_threads(max(1, threads))
        self.batch_size, self.classes, self.label_no_speech = batch_size, classes, label_no_speech

    def __call__(self, batch: dict) -> dict:
        items = [Clip(*json.loads(x)) for x in batch["x"]]
        windows = predict_items(
            self.predictor, items, self.batch_size, self.classes, label_no_speech=self.label_no_speech
        )
        records = [json.dumps(r) for w in windows for r in w]
        return {"i": batch["i"], "y": np.array(records, dtype=object)}


def ray_predict(
    items: Sequence[Clip],
    output: str | os.PathLike,
    model: str | None,
    settings: RaySettings,
    device: str | None = None,
    batch_size: int = 16,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
    label_no_speech: bool = False,
) -> list[dict]:
    """Predict `items` on a Ray cluster into the JSONL file `output`; returns this run's error records.

    Results go to shards, each its own file under OUTPUT.shards/ once all its records are in, then
    are appended to `output` in input order. A rerun skips every input already in `output` or a shard.
    """

    out, folder = Path(output), Path(f"{output}.shards")
    if overwrite:
        shutil.rmtree(folder, ignore_errors=True)
    target = JsonlOutput(out, overwrite=overwrite)
    done = set(target.done)
    for f in sorted(folder.glob("*.jsonl")):
        done |= read_keys(f, repair=True)
    todo = [it for it in items if it.key not in done]
    if len(todo) < len(items):
        log(f"resuming: {len(items) - len(todo)} of {len(items)} inputs already done")
    window = batch_size * WINDOW_BATCHES
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        first = 1 + max((int(f.stem) for f in folder.glob("*.jsonl") if f.stem.isdigit()), default=-1)
        size = window * max(1, -(-len(todo) // (window * 64)))  # about 64 shards, each whole windows
        kwargs = dict(
            model=model,
            device=device,
            batch_size=batch_size,
            classes=classes,
            threads=int(max(1, settings.cpus_per_actor)),
            label_no_speech=label_no_speech,
        )
        rows = [json.dumps([it.path, it.start, it.end]) for it in todo]
        shards: dict[int, dict[int, str]] = {}
        bar = progress_bar(total=len(todo), enabled=progress, unit=" clip", desc="predict")
        for i, record in ray_map(rows, RayPredictor, kwargs, window, settings):
            shard = shards.setdefault(i // size, {})
            shard[i] = record
            if len(shard) == min(size, len(todo) - i // size * size):  # complete: on disk as one file
                lines = "".join(shard[j] + "\n" for j in sorted(shard))
                atomic_write_text(folder / f"{first + i // size:06d}.jsonl", lines)
                del shards[i // size]
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    return merge_shards(folder, target)


def merge_shards(folder: Path, target: JsonlOutput) -> list[dict]:
    """Append the shards' records not yet in `target`, shard by shard, then remove the shards; the errors."""

    failed = []
    for f in sorted(folder.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh]
        new = [r for r in records if record_key(r) not in target.done]
        target.write(new)
        failed += [r for r in new if "error" in r]
    shutil.rmtree(folder, ignore_errors=True)
    return failed


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serval.onnx_engine import add_engine_arguments

    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="audio files, directories of them, manifests (.csv/.jsonl) or Hugging Face datasets "
        "(a save_to_disk folder, or Parquet files with an Audio column)",
    )
    p.add_argument(
        "--model",
        help="default (the bundled model, when omitted), a model or ensemble directory, a Hub id "
        "or meralion:PATH",
    )
    p.add_argument(
        "--format",
        choices=["json", "jsonl", "csv", "table"],
        help="default: from the -o suffix (.jsonl, .csv, .json), else json",
    )
    p.add_argument("--batch-size", type=int, default=16)
    add_engine_arguments(p)
    p.add_argument("--classes", help="comma-separated subset, e.g. neutral,angry,sad,happy (renormalised)")
    p.add_argument(
        "-o",
        "--output",
        help="write here instead of standard output. JSONL is written as results come, and a rerun "
        "resumes it (skipping the inputs it holds); other formats are never overwritten",
    )
    p.add_argument("--overwrite", action="store_true", help="start -o afresh instead of resuming or refusing")
    p.add_argument(
        "--label-no-speech",
        action="store_true",
        help="label clips without speech too (default: their label is null; no_speech says why)",
    )
    p.add_argument(
        "--session",
        choices=SESSION_BY,
        help="calibrate each group of inputs against itself (all: the inputs as one group; folder: each "
        "input's folder; speaker: a manifest's speaker column). Far more accurate on voices, languages "
        "and studios the model never heard when each group holds a mix of emotions; a group of one "
        "emotion is pushed away from it (MODEL_CARD.md, 'Session mode'). The output is written at the "
        "end, not resumed",
    )
    add_ray_arguments(p, "needs -o FILE.jsonl")
    p.add_argument("--no-progress", action="store_true")


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.output).suffix.lower() if args.output else ""
    return {".jsonl": "jsonl", ".csv": "csv"}.get(suffix, "json")


def run(args: argparse.Namespace) -> int:
    from serval.manifest import ManifestError

    limit_primitive_cache()
    prog, fmt = "serval predict", _format(args)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    try:
        items = list(iter_inputs(args.inputs))
        if not items:
            print(f"{prog}: no audio files found in the given paths", file=sys.stderr)
            return 2
        if args.ray is not None:
            if args.session:
                raise ValueError("--session calibrates every input's result together: run it without --ray")
            failed = _run_ray(args, items, fmt, classes)
        else:
            failed = _run_local(args, items, fmt, classes)
    except ModuleNotFoundError as e:  # e.g. --engine torch in the base install: which extra to install
        from serval.cli import missing_dependency

        print(f"{prog}: {missing_dependency(e) or e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, ImportError, ManifestError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # serval.inference.NoDefaultModelError
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    for r in failed:
        print(f"{prog}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _load(args: argparse.Namespace):
    from serval.api import AudioClassifier
    from serval.onnx_engine import load_engine

    predictor = load_engine(args.model, getattr(args, "engine", "auto"), device=args.device)
    if not isinstance(predictor, AudioClassifier):  # emotion2vec:, llm: have no records of their own
        raise ValueError(f"{args.model}: predict runs serval models; score other systems with serval eval")
    return predictor


def _run_local(args: argparse.Namespace, items: list[Clip], fmt: str, classes) -> list[dict]:
    groups = groups_of(items, args.session) if args.session else None  # before the model loads
    stream = fmt == "jsonl" and groups is None  # a session's results are known once all of it is
    out = None
    if args.output and stream:
        out = JsonlOutput(args.output, overwrite=args.overwrite)
        todo = [it for it in items if it.key not in out.done]
        if len(todo) < len(items):
            print(
                f"serval predict: resuming: {len(items) - len(todo)} of {len(items)} inputs already in "
                f"{args.output}",
                file=sys.stderr,
            )
        items = todo
    elif args.output and Path(args.output).exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    predictor = _load(args)
    show = not args.no_progress and len(items) > args.batch_size
    bar = progress_bar(total=len(items), enabled=show, unit=" clip", desc="predict")
    kept, failed, noted = [], [], False
    for records in predict_items(
        predictor, items, args.batch_size, classes, label_no_speech=args.label_no_speech
    ):
        failed += [r for r in records if "error" in r]
        pooled = next((r for r in records if r.get("pieces", 1) > 1), None)
        if pooled and not noted:  # once per run, not once per long file
            print(
                f"serval predict: {pooling_note(pooled['file'], pooled['duration'], pooled['pieces'])}",
                file=sys.stderr,
            )
            noted = True
        if out is not None:
            out.write(records)
        elif stream:
            sys.stdout.write(format_records(records, "jsonl"))
            sys.stdout.flush()
        else:
            kept += records
        if bar is not None:
            bar.update(len(records))
    if bar is not None:
        bar.close()
    if not stream:
        text = format_records(kept if groups is None else calibrate(kept, groups), fmt)
        if args.output:
            atomic_write_text(args.output, text, overwrite=True)
        else:
            sys.stdout.write(text)
    return failed


def _run_ray(args: argparse.Namespace, items: list[Clip], fmt: str, classes) -> list[dict]:
    if not args.output or fmt != "jsonl":
        raise ValueError("--ray writes JSONL shards: give -o FILE.jsonl")
    # a bad model spec or class subset fails here, in one line, not in every actor
    class_subset(classes, _load(args).classes)
    return ray_predict(
        items,
        args.output,
        args.model,
        ray_settings(args),
        device=args.device,
        batch_size=args.batch_size,
        classes=classes,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        log=lambda m: print(f"serval predict: {m}", file=sys.stderr),
        label_no_speech=args.label_no_speech,
    )
