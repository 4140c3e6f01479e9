"""Manifest format: round trips, strict reading, atomic writing, and check_manifest on broken rows."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import soundfile as sf

from serval import manifest as mf
from serval.cli import main
from serval.manifest import (
    COLUMNS,
    ManifestError,
    ManifestRow,
    check_manifest,
    read_manifest,
    write_manifest,
)


def _rows(clips) -> list[ManifestRow]:
    a, b = clips[0], clips[1]
    return [
        ManifestRow(
            path=str(a),
            label="angry",
            arousal=0.75,
            valence=0.1,
            dominance=1.0,
            language="en",
            speaker="ravdess-01",
            corpus="ravdess",
            split="train",
            extra={"gender": "male", "sentence": "01"},
        ),
        ManifestRow(
            path=str(b), start=0.5, end=2.25, label=None, split="dev", extra={"note": 'a, "quoted" cell'}
        ),
        ManifestRow(path=a, start=1.0 / 3.0, end=3.0, label="surprised"),  # a Path is accepted too
    ]


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_round_trip(tmp_path, ravdess_clips, ext):
    rows = _rows(ravdess_clips)
    out = tmp_path / f"m{ext}"
    write_manifest(rows, out)
    back = read_manifest(out)
    assert [r.path for r in back] == [str(r.path) for r in rows]
    for got, want in zip(back, rows):
        for name in COLUMNS[1:]:
            assert getattr(got, name) == getattr(want, name), name  # floats exact (repr round trip)
        # extra columns are preserved; in CSV a row lacking one reads back as an empty cell
        for key, value in want.extra.items():
            assert got.extra[key] == value
    assert back[2].start == 1.0 / 3.0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_csv_header_and_extra_columns(tmp_path, ravdess_clips):
    out = tmp_path / "m.csv"
    write_manifest(_rows(ravdess_clips), out)
    header = out.read_text().splitlines()[0].split(",")
    assert header == [*COLUMNS, "gender", "sentence", "note"]


def test_relative_paths_empty_cells_and_case(tmp_path, ravdess_clips):
    audio = tmp_path / "audio"
    audio.mkdir()
    shutil.copy(ravdess_clips[0], audio / "a.flac")
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "m.csv").write_text(
        "path,label,arousal,speaker,my_column\n../audio/a.flac, Happy ,,spk1,x\n../audio/a.flac,,0.5,,\n"
    )
    rows = read_manifest(sub / "m.csv")
    assert os.path.isabs(rows[0].path) and os.path.samefile(rows[0].path, audio / "a.flac")
    assert rows[0].label == "happy" and rows[0].arousal is None and rows[0].start is None
    assert rows[0].speaker == "spk1" and rows[0].extra == {"my_column": "x"}
    assert rows[1].label is None and rows[1].arousal == 0.5 and rows[1].speaker is None


def test_read_names_file_and_line(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("path,label\na.wav,happy\nb.wav,bored\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3: unknown label 'bored'"):
        read_manifest(bad)
    dims = tmp_path / "d.jsonl"
    dims.write_text(json.dumps({"path": "a.wav", "valence": 1.2}) + "\n")
    with pytest.raises(ManifestError, match=r"d\.jsonl:1: valence 1.2 is out of range"):
        read_manifest(dims)
    (tmp_path / "h.csv").write_text("file,label\na.wav,happy\n")
    with pytest.raises(ManifestError, match="h.csv:1: no 'path' column"):
        read_manifest(tmp_path / "h.csv")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown manifest format"):
        read_manifest(tmp_path / "m.txt")


def test_write_refuses_to_overwrite(tmp_path, ravdess_clips):
    out = tmp_path / "m.csv"
    out.write_text("precious\n")
    with pytest.raises(FileExistsError, match="m.csv"):
        write_manifest(_rows(ravdess_clips), out)
    assert out.read_text() == "precious\n"
    # an invalid row is refused before anything is written
    with pytest.raises(ValueError, match="unknown label"):
        write_manifest([ManifestRow(path="x.wav", label="bored")], out, overwrite=True)
    assert out.read_text() == "precious\n"
    write_manifest(_rows(ravdess_clips), out, overwrite=True)
    assert len(read_manifest(out)) == 3


def test_check_manifest_finds_every_bad_row(tmp_path, ravdess_clips, monkeypatch):
    good, other = ravdess_clips[0], ravdess_clips[1]
    duration = sf.info(str(good)).duration
    (tmp_path / "not_audio.wav").write_text("this is text, not audio\n" * 20)
    (tmp_path / "empty.flac").write_bytes(b"")
    lines = [
        "path,start,end,label,arousal,valence,dominance,speaker",
        f"{good},,,happy,0.5,0.5,0.5,s1",  # 2 ok
        f"{tmp_path / 'missing.flac'},,,sad,,,,s1",  # 3 missing file
        f"{other},,,bored,,,,s1",  # 4 unknown label
        f"{other},0.0,1.0,happy,1.5,,,s1",  # 5 arousal out of range
        f"{other},2.0,1.0,happy,,,,s1",  # 6 start >= end
        f"{good},1.0,{duration + 5:.3f},sad,,,,s1",  # 7 end beyond the file
        f"{good},,,angry,,,,s2",  # 8 duplicate of 2 (same path, no span)
        "not_audio.wav,,,neutral,,,,s1",  # 9 unreadable (relative to the manifest)
        f"{other},1.0,2.5,neutral,,,,s1",  # 10 ok
        "empty.flac,,,neutral,,,,s1",  # 11 0-byte file
        f"{other},1.0,1.05,neutral,,,,s1",  # 12 shorter than the minimum
        f"{other},abc,,neutral,,,,s1",  # 13 start not a number
        f"{other},0.0,{sf.info(str(other)).duration + 0.005:.4f},neutral,,,,s1",  # 14 ok: within rounding
    ]
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")

    calls = []
    real = mf.audio_info
    monkeypatch.setattr(mf, "audio_info", lambda p: calls.append(p) or real(p))
    problems = check_manifest(path)
    found = {(p.line, p.column) for p in problems}
    assert found == {
        (3, "path"),
        (4, "label"),
        (5, "arousal"),
        (6, "end"),
        (7, "end"),
        (8, "path"),
        (9, "path"),
        (11, "path"),
        (12, "end"),
        (13, "start"),
    }
    msg = {p.line: p.message for p in problems}
    assert "not found" in msg[3]
    assert "bored" in msg[4]
    assert "out of range" in msg[5]
    assert "not before end" in msg[6]
    assert "beyond the file's duration" in msg[7]
    assert "duplicate of line 2" in msg[8]
    assert "unreadable audio" in msg[9] and "not_audio.wav" in msg[9]
    assert "0 bytes" in msg[11]
    assert "shorter than" in msg[12]
    assert "not a number" in msg[13]
    # each distinct file's header read once, however many rows use it
    assert sorted(calls) == sorted(set(calls))
    assert len(calls) == 5  # good, other, missing, not_audio, empty

    # --no-audio: only value problems remain
    value_only = {(p.line, p.column) for p in check_manifest(path, check_audio=False)}
    assert value_only == {(4, "label"), (5, "arousal"), (6, "end"), (8, "path"), (13, "start")}


def test_check_jsonl_line_numbers(tmp_path, ravdess_clips):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"path": str(ravdess_clips[0]), "label": "sad"})
    path.write_text(
        f"{good}\n\n{{broken json\n" + json.dumps({"path": str(ravdess_clips[1]), "label": "joy"}) + "\n"
    )
    problems = check_manifest(path)
    assert [(p.line, "JSON" in p.message or "joy" in p.message) for p in problems] == [(3, True), (4, True)]


def test_check_missing_manifest(tmp_path):
    problems = check_manifest(tmp_path / "nope.csv")
    assert len(problems) == 1 and problems[0].line == 0 and "not found" in problems[0].message


def test_cli_check(tmp_path, ravdess_clips, capsys):
    good = tmp_path / "good.csv"
    write_manifest(_rows(ravdess_clips), good)
    assert main(["data", "check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text(
        f"path,label\n{ravdess_clips[0]},happy\n{tmp_path / 'gone.wav'},sad\n{ravdess_clips[1]},meh\n"
    )
    assert main(["data", "check", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{bad}:3: audio file not found")
    assert out[1].startswith(f"{bad}:4: unknown label 'meh'")
    assert len(out) == 2


def test_row_fields_are_the_columns():
    from serval.vocab import DIMENSIONS

    names = tuple(f.name for f in dataclasses.fields(ManifestRow))
    assert names == (*COLUMNS, "extra", "audio")  # a row is a clip (serval.clip.Clip): in memory, its samples
    assert COLUMNS[4:7] == DIMENSIONS


def test_labels_are_the_shared_vocabulary(tmp_path, ravdess_clips):
    """Every class of serval.vocab reads back, and nothing else does: one list of names, not a copy."""
    from serval import vocab

    assert mf.EMOTIONS is vocab.EMOTIONS and mf.DIMENSIONS is vocab.DIMENSIONS
    good = tmp_path / "good.csv"
    write_manifest(
        [
            ManifestRow(path=str(ravdess_clips[0]), label=c, start=i * 0.1)
            for i, c in enumerate(vocab.EMOTIONS)
        ],
        good,
    )
    assert [r.label for r in read_manifest(good)] == list(vocab.EMOTIONS)
    with pytest.raises(ValueError, match="unknown label 'calm'"):
        write_manifest([ManifestRow(path=str(ravdess_clips[0]), label="calm")], tmp_path / "bad.csv")


def test_rows_with_dimensions_but_no_class(tmp_path, ravdess_clips):
    """A row rated on some dimensions but with no class is valid, and each absent dimension reads as None."""
    rows = [
        ManifestRow(path=str(ravdess_clips[0]), arousal=0.5, corpus="baved"),
        ManifestRow(path=str(ravdess_clips[1]), arousal=0.25, valence=0.75, dominance=0.0, corpus="tava"),
        ManifestRow(path=str(ravdess_clips[2]), valence=1.0),
    ]
    for ext in ("csv", "jsonl"):
        path = tmp_path / f"dims.{ext}"
        write_manifest(rows, path)
        assert check_manifest(path) == []
        back = read_manifest(path)
        assert [(r.label, r.arousal, r.valence, r.dominance) for r in back] == [
            (None, 0.5, None, None),
            (None, 0.25, 0.75, 0.0),
            (None, None, 1.0, None),
        ]
    assert main(["data", "check", str(tmp_path / "dims.csv")]) == 0


# --- label sets other than the 7 classes ------------------------------------------------------------


def test_a_label_set_of_its_own(tmp_path, ravdess_clips):
    """A manifest may hold any label set the caller names; a label outside it names its row and the set."""
    own = ("calm", "bored", "tense")
    rows = [ManifestRow(path=str(ravdess_clips[i]), label=label) for i, label in enumerate(own)]
    path = tmp_path / "own.csv"
    with pytest.raises(
        ValueError, match=r"row 0 \(.*\): unknown label 'calm' \(expected one of neutral, happy"
    ):
        write_manifest(rows, path)  # the default set is the 7 classes
    assert not path.exists()
    write_manifest(rows, path, labels=["Calm", " bored", "TENSE"])  # compared as manifests compare labels
    assert [r.label for r in read_manifest(path, labels=own)] == list(own)
    assert [r.label for r in read_manifest(path, labels=None)] == list(own)  # None: any label
    with pytest.raises(
        ManifestError, match=r"own\.csv:2: unknown label 'calm' \(expected one of neutral, happy"
    ):
        read_manifest(path)
    with pytest.raises(
        ManifestError, match=r"own\.csv:4: unknown label 'tense' \(expected one of calm, bored\)$"
    ):
        read_manifest(path, labels=["calm", "bored"])
    problems = check_manifest(path, labels=["calm", "bored"])
    assert [(p.line, p.column) for p in problems] == [(4, "label")]
    assert "expected one of calm, bored" in problems[0].message
    assert check_manifest(path, labels=own) == [] and check_manifest(path, labels=None) == []
    with pytest.raises(ValueError, match="non-empty names"):
        check_manifest(path, labels=["calm", ""])


def test_data_check_and_merge_take_a_label_set(tmp_path, ravdess_clips, capsys):
    own = tmp_path / "own.jsonl"
    write_manifest(
        [
            ManifestRow(path=str(ravdess_clips[0]), label="calm"),
            ManifestRow(path=str(ravdess_clips[1]), label="tense"),
        ],
        own,
        labels=None,
    )
    assert main(["data", "check", str(own)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(
        f"{own}:1: unknown label 'calm' (expected one of neutral, happy"
    )
    assert main(["data", "check", str(own), "--labels", "calm,bored,tense"]) == 0
    assert main(["data", "check", str(own), "--labels", "calm,bored"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{own}:2: unknown label 'tense' (expected one of calm, bored)"
    assert main(["data", "check", str(own), "--any-labels"]) == 0
    with pytest.raises(SystemExit):  # one set or any, not both
        main(["data", "check", str(own), "--any-labels", "--labels", "calm"])
    merged = tmp_path / "merged.csv"
    assert main(["data", "merge", str(own), "-o", str(merged)]) == 1 and not merged.exists()
    assert "unknown label 'calm'" in capsys.readouterr().err
    assert main(["data", "merge", str(own), "-o", str(merged), "--labels", "calm,tense"]) == 0
    assert [r.label for r in read_manifest(merged, labels=None)] == ["calm", "tense"]
