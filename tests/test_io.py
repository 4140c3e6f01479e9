"""serval.io's shared pieces on real files: the resumable JSONL log, input discovery, and the fingerprint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from serval.fingerprint import fingerprint
from serval.io.inputs import iter_inputs
from serval.io.jsonl import JsonlLog, iter_records


def test_the_log_appends_reads_back_by_offset_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    log = JsonlLog(path)
    assert path.read_bytes() == b""  # created (folder too), empty
    offsets = log.append([{"a": 1}, {"b": "ü"}])
    offsets += log.append([{"c": [1, 2]}])
    assert [r for _, r in log] == [{"a": 1}, {"b": "ü"}, {"c": [1, 2]}]
    assert [o for o, _ in log] == offsets and log.read_at(offsets[1]) == {"b": "ü"}
    whole = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'{"d": 4')  # a write torn by a kill
    with pytest.raises(ValueError, match=f"log.jsonl: line after byte {whole}"):
        list(iter_records(path))
    assert path.stat().st_size > whole  # reading without repair changes nothing
    reopened = JsonlLog(path)
    assert [r for _, r in reopened] == [{"a": 1}, {"b": "ü"}, {"c": [1, 2]}]
    assert path.stat().st_size == whole  # cut off once read through
    reopened.append([{"d": 4}])
    assert [json.loads(line) for line in path.read_text().splitlines()][-1] == {"d": 4}
    JsonlLog(path, overwrite=True)
    assert path.read_bytes() == b""
    JsonlLog(path).start([{"settings": 1}])
    assert [r for _, r in JsonlLog(path)] == [{"settings": 1}]


def test_one_discovery_for_files_folders_manifests_and_datasets(emodb_clips, tmp_path, monkeypatch):
    folder = tmp_path / "clips"
    folder.mkdir()
    for clip in emodb_clips[:2]:
        (folder / clip.name).write_bytes(clip.read_bytes())
    (folder / "notes.txt").write_text("not audio")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"path": str(emodb_clips[3]), "start": 0.5, "speaker": "s1", "mood": "x"}) + "\n"
    )
    monkeypatch.chdir(tmp_path)
    rows = list(iter_inputs(["clips", str(manifest), "loose.wav"]))
    assert [r.path for r in rows] == [f"clips/{emodb_clips[0].name}", f"clips/{emodb_clips[1].name}"] + [
        str(emodb_clips[3]),
        "loose.wav",  # not there: its error comes when it is read
    ]
    assert (rows[2].start, rows[2].speaker, rows[2].extra) == (0.5, "s1", {"mood": "x"})
    resolved = list(iter_inputs(["clips"], resolve=True))
    assert [Path(r.path) for r in resolved] == sorted(f.resolve() for f in folder.glob("*.flac"))
    assert [c.key for c in iter_inputs([str(manifest)])] == [(str(emodb_clips[3]), 0.5, None)]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    audio = [{"bytes": c.read_bytes(), "path": c.name} for c in emodb_clips[:3]]
    pq.write_table(pa.table({"audio": audio}), tmp_path / "ds.parquet")
    assert [r.path for r in iter_inputs(["ds.parquet"])] == [f"ds.parquet#{i}" for i in range(3)]
    assert [r.path for r in iter_inputs(["ds.parquet"], datasets=False)] == ["ds.parquet"]


def test_the_fingerprint_is_the_sha256_of_its_parts_in_order(emodb_clips):
    clip = emodb_clips[0]
    data = clip.read_bytes()
    assert fingerprint([clip]) == hashlib.sha256(data).hexdigest()  # a file: its bytes
    assert fingerprint(["ab", b"c", clip]) == hashlib.sha256(b"abc" + data).hexdigest()
    assert fingerprint(iter(["a", "b"])) == fingerprint(["ab"]) != fingerprint(["ba"])
