"""What the user names as input: audio files, folders (searched recursively), manifests and datasets.

Each input is a `serval.clip.Clip`: a file, a span of one (a manifest row), or a row of a local dataset
(a `save_to_disk` folder or Parquet files with an `Audio` column), named `DATAFILE#ROW`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from serval.audio import MIN_DURATION, AudioError, AudioTooShortError, audio_info, load_array, load_audio
from serval.clip import Clip
from serval.io.hf_datasets import ROW_SEP, audio_column, dataset_files, is_dataset, open_table
from serval.longform import LongAudio, count_pieces, read_audio
from serval.manifest import read_manifest
from serval.vocab import AUDIO_EXTENSIONS, SAMPLE_RATE

MANIFEST_SUFFIXES = (".csv", ".jsonl")


def record_key(record: dict) -> tuple:
    """The key of the input a record answers (what a resumed run skips)."""
    return (record.get("file"), record.get("start"), record.get("end"))


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


def iter_inputs(inputs: Iterable[str], datasets: bool = True, resolve: bool = False) -> Iterator[Clip]:
    """Every clip the inputs name, in order: a file (its path as given, or resolved with
    `resolve`), each row of a manifest (.csv/.jsonl, with its columns), each row of a dataset (DATAFILE#ROW;
    without `datasets`, a dataset is taken as a file). Folders are searched recursively.

    Raises `ManifestError` for a bad manifest and `DatasetError` for a dataset without audio.
    """
    for name in inputs:
        p = Path(name)
        if datasets and is_dataset(p):
            for datafile, n in dataset_files(p):
                yield from (Clip(f"{datafile}{ROW_SEP}{i}") for i in range(n))
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            yield from read_manifest(p, labels=None)  # labels are not read here: any label set is input
        else:
            files = expand_inputs([name])
            yield from (Clip(str(Path(f).resolve()) if resolve else f) for f in files)


def audio_source(file: str) -> tuple[str | bytes, str]:
    """What to decode for an item's file, and its name in errors: the path, or a dataset row's bytes/path."""
    datafile = item_file(file)
    if datafile == file:
        return file, file
    row = file.rpartition(ROW_SEP)[2]
    audio = open_table(datafile).column(audio_column(datafile))[int(row)].as_py() or {}
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


def read_item(clip: Clip) -> np.ndarray | LongAudio:
    """A clip's samples; audio longer than one 30 s piece is a LongAudio, read piece by piece when scored.

    A clip with samples in memory (`audio`, 16 kHz) gives them, cut to its span; its `path` names it."""
    if clip.audio is not None:
        return _in_memory(clip)
    source, name = audio_source(clip.path)
    return read_audio(source, clip.start, clip.end, name=name)


def _in_memory(clip: Clip) -> np.ndarray | LongAudio:
    wave = load_array(clip.audio, name=clip.path or "<array>")
    first = round((clip.start or 0.0) * SAMPLE_RATE)
    wave = wave[first : None if clip.end is None else round(clip.end * SAMPLE_RATE)]
    if len(wave) < MIN_DURATION * SAMPLE_RATE:
        seconds = len(wave) / SAMPLE_RATE
        raise AudioTooShortError(
            clip.path or "<array>", f"audio is {seconds:.3f} s, shorter than the minimum {MIN_DURATION} s"
        )
    if count_pieces(len(wave)) == 1:
        return wave
    return LongAudio(clip.path, len(wave), lambda: iter([wave]))
