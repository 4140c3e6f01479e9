"""Batch jobs: inputs (files, folders, manifests, Hugging Face datasets), the decode -> batch -> predict
pipeline, streaming output, resume, and Ray. `serval predict` is its command.

An input is an `Item`: a file, a span of one (a manifest row), or a row of a local dataset (a
`save_to_disk` folder or Parquet files with an `Audio` column), named `DATAFILE#ROW`. Items are
read lazily; a background thread decodes them into a bounded queue while the model runs, and a
bounded window of decoded clips is sorted by length into batches, so memory does not grow with
the number of inputs. Records are written as each window is done, in input order.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serval.atomic import atomic_write_text
from serval.audio import AudioError, audio_info, load_audio
from serval.longform import WINDOW_BATCHES, LongAudio, count_pieces, pooling_note, read_audio, speech_of
from serval.progress import progress_bar
from serval.vad import speech_fields
from serval.vocab import AUDIO_EXTENSIONS, EMOTIONS, SAMPLE_RATE, class_subset

# Every new batch width is a new oneDNN convolution primitive holding its own copy of the reordered
# weights (about 5 MB for whisper-base), and batches sorted by length have many widths, so the default
# cache of 1024 grows with the number of clips. A small one keeps memory flat. Padding batches to a few
# widths would keep the cache warm, but changes the outputs' last digits (golden outputs).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")

MANIFEST_SUFFIXES = (".csv", ".jsonl")
ROW_SEP = "#"  # DATAFILE#ROW names a dataset row


# ---------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Item:
    """One input: `file` (a path, or DATAFILE#ROW for a dataset row), optionally a span of it."""

    file: str
    start: float | None = None
    end: float | None = None

    @property
    def key(self) -> tuple:
        return (self.file, self.start, self.end)


def record_key(record: dict) -> tuple:
    """The key of the input a record answers (what a resumed run skips)."""
    return (record.get("file"), record.get("start"), record.get("end"))


def is_dataset(path: str | os.PathLike) -> bool:
    """A `save_to_disk` folder (Dataset or DatasetDict), a Parquet file, or a folder of Parquet files."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".parquet"
    return p.is_dir() and (
        (p / "state.json").is_file() or (p / "dataset_dict.json").is_file() or any(p.glob("*.parquet"))
    )


def expand_inputs(items: Iterable[str]) -> list[str]:
    """Files stay as given; directories become their audio files, sorted, recursively."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(str(f) for f in sorted(p.rglob("*")) if f.suffix.lower() in AUDIO_EXTENSIONS)
        else:
            out.append(item)
    return out


def iter_items(inputs: Iterable[str]) -> Iterator[Item]:
    """The items of audio files, folders (recursively), manifests (.csv/.jsonl) and datasets, in order.

    Raises `ManifestError` for a bad manifest and `DatasetError` for a dataset without audio.
    """
    from serval.manifest import read_manifest

    for name in inputs:
        p = Path(name)
        if is_dataset(p):
            for datafile, n in dataset_files(p):
                yield from (Item(f"{datafile}{ROW_SEP}{i}") for i in range(n))
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            # the labels are not read here: a manifest of any label set is input like any other
            yield from (Item(str(r.path), r.start, r.end) for r in read_manifest(p, labels=None))
        else:
            yield from (Item(f) for f in expand_inputs([name]))


# ---------------------------------------------------------------------------- datasets


class DatasetError(ValueError):
    """A dataset that cannot be read as audio; `str(e)` names it."""


def dataset_files(path: str | os.PathLike) -> list[tuple[str, int]]:
    """(data file, rows) of a local dataset, in order: Arrow files of a `save_to_disk` folder, or Parquet."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text())["splits"]
        return [f for s in splits for f in dataset_files(p / s)]
    elif (p / "state.json").is_file():
        files = [p / f["filename"] for f in json.loads((p / "state.json").read_text())["_data_files"]]
    else:
        files = sorted(p.glob("*.parquet"))
    return [(str(f), _open_table(str(f)).num_rows) for f in files]


_TABLES: dict[str, tuple] = {}  # data file -> (table, audio column); a few stay open (memory-mapped)


def _open_table(datafile: str):
    """The (memory-mapped) table of one data file, with its audio column located."""
    if datafile in _TABLES:
        return _TABLES[datafile][0]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            'reading a Hugging Face dataset needs pyarrow: pip install "datasets"', name="pyarrow"
        ) from None
    try:
        if datafile.endswith(".parquet"):
            table = pq.read_table(datafile, memory_map=True)
        else:
            table = pa.ipc.open_stream(pa.memory_map(datafile)).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise DatasetError(f"{datafile}: cannot read the dataset file ({e})") from None
    column = _audio_column(table, datafile)
    if len(_TABLES) >= 8:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[datafile] = (table, column)
    return table


def _audio_column(table, datafile: str) -> str:
    """The column declared `Audio` in the Hugging Face metadata, else the one struct of bytes and path."""
    meta = (table.schema.metadata or {}).get(b"huggingface")
    features = json.loads(meta).get("info", {}).get("features", {}) if meta else {}
    declared = [k for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "Audio"]
    if declared:
        return declared[0]
    for field in table.schema:
        kind = field.type
        names = {kind.field(i).name for i in range(kind.num_fields)} if hasattr(kind, "num_fields") else set()
        if {"bytes", "path"} <= names:
            return field.name
    raise DatasetError(f"{datafile}: no Audio column (a struct of bytes and path)")


def audio_source(file: str) -> tuple[str | bytes, str]:
    """What to decode for an item's file, and its name in errors: the path, or a dataset row's bytes/path."""
    datafile = item_file(file)
    if datafile == file:
        return file, file
    row = file.rpartition(ROW_SEP)[2]
    table = _open_table(datafile)
    column = _TABLES[datafile][1]
    audio = table.column(column)[int(row)].as_py() or {}
    if audio.get("bytes"):
        return audio["bytes"], file
    if audio.get("path"):
        path = Path(audio["path"])
        return str(path if path.is_absolute() else Path(datafile).parent / path), file
    raise AudioError(file, "the dataset row has no audio (neither bytes nor path)")


def item_file(file: str) -> str:
    """The file on disk that holds an item: itself, or a dataset row's data file."""
    datafile, sep, row = file.rpartition(ROW_SEP)
    return (
        datafile if sep and row.isdigit() and not Path(file).exists() and Path(datafile).is_file() else file
    )


def item_info(file: str):
    """`serval.audio.audio_info` for an item's file: a path, or a dataset row (DATAFILE#ROW)."""
    source, name = audio_source(file)
    return audio_info(source, name=name)


def load_item(file: str, start: float | None = None, end: float | None = None) -> np.ndarray:
    """`serval.audio.load_audio` for an item's file: a path, or a dataset row (DATAFILE#ROW)."""
    source, name = audio_source(file)
    return load_audio(source, start, end, name=name)


def read_item(item: Item) -> np.ndarray | LongAudio:
    """An item's samples; audio longer than one 30 s piece is a LongAudio, read piece by piece when scored."""
    source, name = audio_source(item.file)
    return read_audio(source, item.start, item.end, name=name)


def read_rows(
    path: str | os.PathLike, label_column: str = "label", labels: Sequence[str] | None = EMOTIONS
) -> list:
    """Manifest rows (`serval.manifest.ManifestRow`) of a manifest, or of a dataset's rows for `serval eval`.

    A dataset row's path is DATAFILE#ROW; its `label_column` (text, or a ClassLabel index) and any
    manifest columns it has (language, speaker, corpus, split, dimensions) are carried over.
    """
    from serval.manifest import COLUMNS, ManifestRow, read_manifest

    if not is_dataset(path):
        return read_manifest(path, labels=labels)  # labels: the label set (None: any name)
    rows = []
    for datafile, _ in dataset_files(path):
        table = _open_table(datafile)
        audio = _TABLES[datafile][1]
        names = _class_names(table, label_column)
        keep = [c for c in table.column_names if c != audio]
        for i, values in enumerate(table.select(keep).to_pylist()):
            label = values.get(label_column)
            if isinstance(label, int) and names:
                label = names[label]
            meta = {k: values[k] for k in COLUMNS if k in values and k not in ("path", "label")}
            rows.append(
                ManifestRow(path=f"{datafile}{ROW_SEP}{i}", label=_emotion(label, datafile, i), **meta)
            )
    return rows


def _class_names(table, column: str) -> list[str] | None:
    meta = (table.schema.metadata or {}).get(b"huggingface")
    feature = json.loads(meta).get("info", {}).get("features", {}).get(column, {}) if meta else {}
    return feature.get("names") if feature.get("_type") == "ClassLabel" else None


def _emotion(label, datafile: str, row: int) -> str | None:
    from serval.vocab import EMOTIONS, class_name

    if label is None or label == "":
        return None
    name = class_name(str(label))
    if name not in EMOTIONS:
        raise DatasetError(f"{datafile}#{row}: label {label!r} is not one of {', '.join(EMOTIONS)}")
    return name


# ---------------------------------------------------------------------------- the pipeline


def decoded(items: Iterable[Item], depth: int) -> Iterator[tuple[Item, np.ndarray | LongAudio | AudioError]]:
    """(item, wave or its AudioError), decoded in a background thread at most `depth` ahead.

    Audio longer than one 30 s piece is not decoded here: it comes as a LongAudio (see `read_item`)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            for item in items:
                try:
                    result = read_item(item)
                except AudioError as e:
                    result = e
                while not stop.is_set():
                    try:
                        q.put((item, result), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # a bad manifest or dataset: raised in the consumer
            q.put((end, e))
            return
        q.put((end, None))

    thread = threading.Thread(target=work, name="serval-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, result = q.get()
            if item is end:
                if result is not None:
                    raise result
                return
            yield item, result
    finally:
        stop.set()


def predict_items(
    predictor,
    items: Iterable[Item],
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
    keep = class_subset(classes, predictor.classes)
    window = window or batch_size * WINDOW_BATCHES
    pending: list[tuple[Item, np.ndarray | AudioError]] = []
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


def _head(item: Item, wave: np.ndarray | LongAudio | AudioError) -> dict:
    head: dict = {"file": item.file}
    if item.start is not None or item.end is not None:
        head.update(start=item.start, end=item.end)
    if isinstance(wave, AudioError):
        head["error"] = str(wave)
    else:
        head["duration"] = round(len(wave) / SAMPLE_RATE, 3)
        head["pieces"] = count_pieces(len(wave))
    return head


# ---------------------------------------------------------------------------- streaming output


class JsonlOutput:
    """An append-only JSONL file of records that a rerun resumes: lines are flushed per window.

    Opening an existing file reads the keys it holds (a last line cut short by a kill is cut off);
    `overwrite` starts it empty instead.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        self.done: set[tuple] = set()
        if self.path.exists() and not overwrite:
            self.done = read_keys(self.path, repair=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(b"")

    def write(self, records: Sequence[dict]) -> None:
        """Append records (on disk before this returns)."""
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        self.done.update(record_key(r) for r in records)


def read_keys(path: str | os.PathLike, repair: bool = False) -> set[tuple]:
    """The record keys in a JSONL file; with `repair`, a torn last line (no newline, or not JSON) is cut off."""
    keys, good = set(), 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn")
                keys.add(record_key(json.loads(line)))
            except ValueError:
                break
            good += len(line)
    size = Path(path).stat().st_size
    if good < size:
        if not repair:
            raise ValueError(f"{path}: line after byte {good} is not a JSON record")
        with open(path, "r+b") as f:
            f.truncate(good)
    return keys


def format_records(records: list[dict], fmt: str) -> str:
    """Records as json (an array), jsonl, csv or an aligned table."""
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records)
    ok = next((r for r in records if "error" not in r), None)
    classes = list(ok["probabilities"]) if ok else []
    dims = list(ok["scores"]) if ok else []
    span = any("start" in r for r in records)
    speech = ["speech_fraction", "no_speech"]
    header = [
        "file",
        *(["start", "end"] if span else []),
        "duration",
        "label",
        *classes,
        *dims,
        *speech,
        "error",
    ]
    rows = []
    for r in records:
        rows.append(
            [
                r.get("file") or "",
                *([_cell(r.get("start")), _cell(r.get("end"))] if span else []),
                r.get("duration", ""),
                r.get("label", ""),  # None (no speech): csv writes an empty cell, the table "-"
                *[r.get("probabilities", {}).get(c, "") for c in classes],
                *[_score_cell(r, d) for d in dims],
                *[_cell(r.get(k)) for k in speech],
                r.get("error", ""),
            ]
        )
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        return buf.getvalue()
    cells = [header] + [[_table_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n" for row in cells)


def _cell(value) -> str | float:
    if isinstance(value, bool):  # as JSON writes it
        return "true" if value else "false"
    return "" if value is None else value


def _score_cell(record: dict, dim: str) -> float | str | None:
    # None: the dimension was not trained (csv writes an empty cell, the table "-"); "": no scores at all
    return record["scores"][dim] if "scores" in record else ""


def _table_cell(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------- Ray


@dataclass
class RaySettings:
    """Where and how wide: a cluster `address` (None: a local one), actors and what each holds."""

    address: str | None = None
    actors: int | None = None  # default: the cluster's CPUs (or GPUs) / each actor's share
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    num_cpus: int | None = None  # of a local cluster (default: this machine's)


def init_ray(settings: RaySettings, log: Callable[[str], None] | None = None):
    """Connect to the cluster at `settings.address`, or start a local one; never sends usage statistics."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # read by ray.init and every process it starts
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError('--ray needs Ray Data: pip install "serval[ray]"', name="ray") from None
    if not ray.is_initialized():
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
        if settings.address:
            ray.init(address=settings.address, **quiet)
        else:
            ray.init(num_cpus=settings.num_cpus or os.cpu_count(), include_dashboard=False, **quiet)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def ray_map(
    rows: Sequence[str], worker: type, kwargs: dict, batch_size: int, settings: RaySettings
) -> Iterator[tuple[int, str]]:
    """(row index, result) of every row (JSON text), run by a pool of `worker` actors, as results come.

    `worker(**kwargs)` is built once per actor; called on {"i": indices, "x": rows} it returns
    {"i": indices, "y": results}.
    """
    ray = init_ray(settings)
    resources = ray.cluster_resources()
    if settings.actors:
        actors = settings.actors
    elif settings.gpus_per_actor:
        actors = max(1, int(resources.get("GPU", 0) // settings.gpus_per_actor))
    else:
        actors = max(1, int(resources.get("CPU", 1) // settings.cpus_per_actor))
    blocks = max(1, min(len(rows) // batch_size, actors * 4))
    ds = ray.data.from_items([{"i": i, "x": r} for i, r in enumerate(rows)], override_num_blocks=blocks)
    ds = ds.map_batches(
        worker,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor or None,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield from zip(batch["i"].tolist(), batch["y"].tolist())


class RayPredictor:
    """A Ray actor holding one predictor: {"x": items as JSON} -> {"y": records as JSON}."""

    def __init__(self, model, device, batch_size: int, classes, threads: int, label_no_speech: bool = False):
        from serval.onnx_engine import load_engine

        # engine "auto": ONNX Runtime on a CPU worker, so a cluster needs no torch
        self.predictor = load_engine(model, device=device, threads=max(1, threads))
        torch = sys.modules.get("torch")
        if torch is not None:  # the torch engine (a GPU, or a model ONNX Runtime does not run)
            torch.set_num_threads(max(1, threads))
        self.batch_size, self.classes, self.label_no_speech = batch_size, classes, label_no_speech

    def __call__(self, batch: dict) -> dict:
        items = [Item(*json.loads(x)) for x in batch["x"]]
        windows = predict_items(
            self.predictor, items, self.batch_size, self.classes, label_no_speech=self.label_no_speech
        )
        records = [json.dumps(r) for w in windows for r in w]
        return {"i": batch["i"], "y": np.array(records, dtype=object)}


def ray_predict(
    items: Sequence[Item],
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
    import shutil

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
        rows = [json.dumps([it.file, it.start, it.end]) for it in todo]
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
    import shutil

    failed = []
    for f in sorted(folder.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh]
        new = [r for r in records if record_key(r) not in target.done]
        target.write(new)
        failed += [r for r in new if "error" in r]
    shutil.rmtree(folder, ignore_errors=True)
    return failed


# ---------------------------------------------------------------------------- CLI


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
    add_ray_arguments(p, "needs -o FILE.jsonl")
    p.add_argument("--no-progress", action="store_true")


def add_ray_arguments(p: argparse.ArgumentParser, note: str = "") -> None:
    """--ray [ADDRESS] and the actor pool's size and resources (predict, pseudolabel)."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on a Ray cluster (ray://HOST:10001, HOST:6379 or auto; a local one without ADDRESS)"
        + (f"; {note}" if note else ""),
    )
    p.add_argument(
        "--ray-actors", type=int, help="model actors (default: the cluster's CPUs or GPUs / per actor)"
    )
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="CPUs each actor holds (default 1)")
    p.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="GPUs each actor holds (default 0)")


def ray_settings(args: argparse.Namespace) -> RaySettings | None:
    """The RaySettings of --ray and its options; None without --ray."""
    if args.ray is None:
        return None
    return RaySettings(args.ray or None, args.ray_actors, args.ray_cpus_per_actor, args.ray_gpus_per_actor)


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.output).suffix.lower() if args.output else ""
    return {".jsonl": "jsonl", ".csv": "csv"}.get(suffix, "json")


def run(args: argparse.Namespace) -> int:
    from serval.manifest import ManifestError

    prog, fmt = "serval predict", _format(args)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    try:
        items = list(iter_items(args.inputs))
        if not items:
            print(f"{prog}: no audio files found in the given paths", file=sys.stderr)
            return 2
        if args.ray is not None:
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


def _run_local(args: argparse.Namespace, items: list[Item], fmt: str, classes) -> list[dict]:
    stream = fmt == "jsonl"
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
        text = format_records(kept, fmt)
        if args.output:
            atomic_write_text(args.output, text, overwrite=True)
        else:
            sys.stdout.write(text)
    return failed


def _run_ray(args: argparse.Namespace, items: list[Item], fmt: str, classes) -> list[dict]:
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
