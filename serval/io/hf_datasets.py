"""Local Hugging Face datasets, read with pyarrow: a `save_to_disk` folder (Dataset or DatasetDict), a
Parquet file or a folder of Parquet files, whose `Audio` column holds each row's bytes or path.

A row is named `DATAFILE#ROW`; a few tables stay open (memory-mapped) while their rows are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from serval.manifest import COLUMNS, ManifestRow, read_manifest
from serval.vocab import EMOTIONS, class_name

ROW_SEP = "#"  # DATAFILE#ROW names a dataset row
_TABLES: dict[str, tuple] = {}  # data file -> (table, audio column); a few stay open (memory-mapped)


class DatasetError(ValueError):
    """A dataset that cannot be read as audio; `str(e)` names it."""


def is_dataset(path: str | os.PathLike) -> bool:
    """A `save_to_disk` folder (Dataset or DatasetDict), a Parquet file, or a folder of Parquet files."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".parquet"
    return p.is_dir() and (
        (p / "state.json").is_file() or (p / "dataset_dict.json").is_file() or any(p.glob("*.parquet"))
    )


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
    return [(str(f), open_table(str(f)).num_rows) for f in files]


def open_table(datafile: str):
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
    column = _find_audio_column(table, datafile)
    if len(_TABLES) >= 8:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[datafile] = (table, column)
    return table


def audio_column(datafile: str) -> str:
    """The name of a data file's audio column."""
    open_table(datafile)
    return _TABLES[datafile][1]


def _find_audio_column(table, datafile: str) -> str:
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


def read_rows(
    path: str | os.PathLike, label_column: str = "label", labels: Sequence[str] | None = EMOTIONS
) -> list[ManifestRow]:
    """Manifest rows of a manifest, or of a dataset's rows for `serval eval`.

    A dataset row's path is DATAFILE#ROW; its `label_column` (text, or a ClassLabel index) and any
    manifest columns it has (language, speaker, corpus, split, dimensions) are carried over.
    """
    if not is_dataset(path):
        return read_manifest(path, labels=labels)  # labels: a manifest's label set (None: any name)
    rows = []
    for datafile, _ in dataset_files(path):
        table = open_table(datafile)
        audio = audio_column(datafile)
        names = _class_names(table, label_column)
        keep = [c for c in table.column_names if c != audio]
        for i, values in enumerate(table.select(keep).to_pylist()):
            label = values.get(label_column)
            if isinstance(label, int) and names:
                label = names[label]
            meta = {k: values[k] for k in COLUMNS if k in values and k not in ("path", "label")}
            rows.append(
                ManifestRow(path=f"{datafile}{ROW_SEP}{i}", label=_label(label, labels, datafile, i), **meta)
            )
    return rows


def _class_names(table, column: str) -> list[str] | None:
    meta = (table.schema.metadata or {}).get(b"huggingface")
    feature = json.loads(meta).get("info", {}).get("features", {}).get(column, {}) if meta else {}
    return feature.get("names") if feature.get("_type") == "ClassLabel" else None


def _label(label, labels: Sequence[str] | None, datafile: str, row: int) -> str | None:
    """A row's label as a class name: one of `labels` (its aliases too), or any name when None."""
    if label is None or label == "":
        return None
    own = str(label).strip().lower()  # as a manifest reads a label
    if labels is None or own in labels:
        return own
    name = class_name(own)  # "anger", "生气/angry": serval's names
    if name not in labels:
        raise DatasetError(f"{datafile}#{row}: label {label!r} is not one of {', '.join(labels)}")
    return name
