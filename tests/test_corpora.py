"""Corpus recipes: counts and labels on the real corpora, mock layouts of the others, splits, CLI."""

from __future__ import annotations

import csv
import inspect
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import RAVDESS_CODES

from serval.audio import load_audio
from serval.cli import main
from serval.corpora import RULES, assign_splits, corpus_labels, dropped_path, prepare_corpus
from serval.manifest import check_manifest, read_manifest
from serval.vocab import EMOTIONS


def _by_name(rows):
    return {Path(r.path).name: r for r in rows}


def _assert_speaker_disjoint(rows):
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r.speaker].add(r.split)
    shared = {s: v for s, v in splits_of.items() if len(v) > 1}
    assert not shared, f"speakers in more than one split: {shared}"


def _silent(path: Path, seconds: float = 0.3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.zeros(int(16000 * seconds), dtype=np.float32), 16000)
    return path


# --- the real corpora under ../shared/data --------------------------------------------------


@pytest.fixture(scope="module")
def ravdess_root(data_dir):
    return data_dir / "ravdess"


def test_ravdess_counts_and_labels(ravdess_root):
    rows, dropped = prepare_corpus("ravdess", ravdess_root)
    assert len(rows) == 1040 and len(dropped) == 160  # 20 actors x 8 calm clips dropped by default
    assert {d.original_label for d in dropped} == {"calm"}
    assert all("calm" in d.reason for d in dropped)
    labels = Counter(r.label for r in rows)
    assert labels == {
        "neutral": 80,
        **{k: 160 for k in ("happy", "sad", "angry", "fearful", "disgusted", "surprised")},
    }
    by_name = _by_name(rows)
    r = by_name["03-01-05-02-01-01-01.flac"]
    assert (r.label, r.speaker, r.extra["gender"], r.extra["intensity"]) == (
        "angry",
        "ravdess-01",
        "male",
        "strong",
    )
    assert by_name["03-01-08-01-02-02-20.flac"].extra["gender"] == "female"
    assert {r.language for r in rows} == {"en"} and {r.corpus for r in rows} == {"ravdess"}
    assert len({r.speaker for r in rows}) == 20
    _assert_speaker_disjoint(rows)

    kept, dropped = prepare_corpus("ravdess", ravdess_root, calm="neutral")
    assert len(kept) == 1200 and not dropped
    assert Counter(r.label for r in kept)["neutral"] == 240
    assert _by_name(kept)["03-01-02-01-01-01-01.flac"].extra["original_label"] == "calm"


def test_emodb_labels(data_dir):
    rows, dropped = prepare_corpus("emodb", data_dir / "emodb")
    assert len(rows) + len(dropped) == 304
    assert len(dropped) == 50 and {d.original_label for d in dropped} == {"boredom"}
    by_name = _by_name(rows)
    assert by_name["09a01Ea.flac"].label == "disgusted"
    assert by_name["09a01Fa.flac"].label == "happy"
    assert by_name["09a01Nb.flac"].label == "neutral"
    assert by_name["09a01Wb.flac"].label == "angry"
    assert "09a02La.flac" not in by_name
    assert (by_name["10a01Wa.flac"].extra["gender"], by_name["13a01Ac.flac"].extra["gender"]) == (
        "male",
        "female",
    )
    assert (by_name["10a01Wa.flac"].speaker, by_name["13a01Ac.flac"].label) == ("emodb-10", "fearful")
    assert {r.speaker for r in rows} == {f"emodb-{s}" for s in ("09", "10", "12", "13", "15", "16")}
    assert "surprised" not in {r.label for r in rows}
    assert {r.language for r in rows} == {"de"}
    _assert_speaker_disjoint(rows)

    kept, dropped = prepare_corpus("emodb", data_dir / "emodb", boredom="neutral")
    assert len(kept) == 304 and not dropped
    assert _by_name(kept)["09a02La.flac"].label == "neutral"


def test_ased_speakers_and_sentences(data_dir):
    rows, dropped = prepare_corpus("ased", data_dir / "ased")
    assert len(rows) == 1924 and not dropped
    by_name = _by_name(rows)
    odd = by_name["S4-04-02-01-29.flac"]  # the one upper-case file
    assert (odd.label, odd.speaker, odd.extra["sentence"], odd.extra["common_sentence"]) == (
        "sad",
        "ased-F29",
        "04",
        0,
    )
    speakers = {r.speaker for r in rows}
    assert len(speakers) == 60
    # the same speaker number under both gender codes is two people
    numbers = Counter(s[-2:] for s in speakers)
    assert any(n == 2 for n in numbers.values())
    assert Counter(r.label for r in rows) == {
        "neutral": 412,
        "fearful": 400,
        "happy": 376,
        "sad": 360,
        "angry": 376,
    }
    common = [r for r in rows if r.extra["common_sentence"] == 1]
    assert len(common) == 424 and {r.extra["sentence"] for r in common} == {"01", "02"}
    # common sentences come in all five emotions; sentence 03-07 each in one
    labels_per_sentence = defaultdict(set)
    for r in rows:
        labels_per_sentence[r.extra["sentence"]].add(r.label)
    assert len(labels_per_sentence["01"]) == 5 and len(labels_per_sentence["02"]) == 5
    _assert_speaker_disjoint(rows)
    speaker_splits = {(r.speaker, r.split) for r in rows}
    assert Counter(split for _, split in speaker_splits) == {"train": 48, "dev": 6, "test": 6}


def test_tess_labels_and_speakers(data_dir):
    rows, dropped = prepare_corpus("tess", data_dir / "tess")
    assert len(rows) == 700 and not dropped
    assert Counter(r.label for r in rows) == {c: 100 for c in EMOTIONS}  # all 7 classes, 100 each
    by_name = _by_name(rows)
    ps = by_name["YAF_jail_ps.flac"]
    assert (ps.label, ps.speaker, ps.extra["original_label"], ps.extra["word"]) == (
        "surprised",
        "tess-YAF",
        "pleasant surprise",
        "jail",
    )
    assert by_name["OAF_back_disgust.flac"].label == "disgusted"
    assert by_name["OAF_back_fear.flac"].label == "fearful"
    assert Counter(r.speaker for r in rows) == {"tess-OAF": 350, "tess-YAF": 350}
    assert {r.language for r in rows} == {"en"} and {r.extra["gender"] for r in rows} == {"female"}
    # two speakers cannot make a speaker-disjoint dev split: all of TESS is train
    assert {r.split for r in rows} == {"train"}
    held, _ = prepare_corpus("tess", data_dir / "tess", min_dev_speakers=4)
    assert {r.split for r in held} == {"train"}


def test_turev_labels_and_speakers(data_dir):
    rows, dropped = prepare_corpus("turev", data_dir / "turev")
    assert len(rows) == 1081 and not dropped
    assert Counter(r.label for r in rows) == {"angry": 405, "happy": 275, "sad": 401}
    by_name = _by_name(rows)
    r = by_name["1234_kz_eger.flac"]
    assert (r.label, r.speaker, r.language, r.extra["word"]) == ("angry", "turev-1234", "tr", "eger")
    assert {r.speaker for r in rows} == {f"turev-{s}" for s in ("1157", "1234", "1358", "1984", "7895")}
    assert not [r for r in rows if r.speaker == "turev-1157" and r.label == "happy"]  # as distributed
    for path in (data_dir / "turev").rglob("*.flac"):  # the folder and the code agree on every clip
        assert by_name[path.name].label == path.parent.name.lower()
    _assert_speaker_disjoint(rows)


def test_turev_drops_calm_and_disagreeing_folders(tmp_path):
    root = tmp_path / "turev"
    _silent(root / "Calm" / "1157_sk_elma.wav")
    _silent(root / "Happy" / "1157_kz_elma.wav")  # angry code in the happy folder
    _silent(root / "Sad" / "1157_hl_elma.wav")
    rows, dropped = prepare_corpus("turev", root)
    assert [(Path(r.path).name, r.label) for r in rows] == [("1157_hl_elma.wav", "sad")]
    reasons = {Path(d.path).name: d.reason for d in dropped}
    assert "calm" in reasons["1157_sk_elma.wav"] and "folder is Happy" in reasons["1157_kz_elma.wav"]


def test_tava_ratings_and_classes(data_dir):
    rows, dropped = prepare_corpus("tava", data_dir / "tava")
    assert len(rows) == 224 and not dropped
    assert len({r.speaker for r in rows}) == 14 and Counter(r.speaker for r in rows)["tava-01"] == 16
    assert Counter(r.label for r in rows) == {None: 112, "happy": 28, "angry": 28, "fearful": 28, "sad": 28}
    words = defaultdict(set)
    for r in rows:
        words[r.label].add(r.extra["original_label"])
    assert words["happy"] == {"happy", "joyful"} and words["angry"] == {"enraged", "annoyed"}
    assert words["fearful"] == {"frightened", "worried"} and words["sad"] == {"depressed", "miserable"}
    assert len(words[None]) == 8
    # SummaryData.csv, speech row of speaker 1, "happy": valence 0.30254902, arousal 0.190718954,
    # dominance -0.045555556 on [-1, 1]; (x + 1) / 2 on [0, 1]
    r = _by_name(rows)["s01_happy_audio.flac"]
    assert (r.label, r.speaker, r.extra["gender"]) == ("happy", "tava-01", "male")
    assert r.valence == pytest.approx((0.30254902 + 1) / 2)
    assert r.arousal == pytest.approx((0.190718954 + 1) / 2)
    assert r.dominance == pytest.approx((-0.045555556 + 1) / 2)
    tranquil = _by_name(rows)["s01_tranquil_audio.flac"]  # no class, ratings kept
    assert tranquil.label is None and tranquil.arousal == pytest.approx((-0.847973856 + 1) / 2)
    assert all(r.arousal is not None and r.valence is not None and r.dominance is not None for r in rows)
    assert all(0 <= v <= 1 for r in rows for v in (r.arousal, r.valence, r.dominance))
    assert {r.language for r in rows} == {"en"}
    _assert_speaker_disjoint(rows)


def test_baved_levels_as_arousal(data_dir):
    rows, dropped = prepare_corpus("baved", data_dir / "baved")
    assert len(rows) == 776 and not dropped
    assert Counter(r.extra["level"] for r in rows) == {0: 222, 1: 274, 2: 280}
    for r in rows:  # only level 1 is a class; every level is an arousal value, and nothing else is rated
        assert r.label == ("neutral" if r.extra["level"] == 1 else None)
        assert r.arousal == {0: 0.0, 1: 0.5, 2: 1.0}[r.extra["level"]]
        assert r.valence is None and r.dominance is None
    r = _by_name(rows)["55-m-16-3-2-1063.flac"]
    assert (r.speaker, r.extra["gender"], r.extra["age"], r.extra["word"], r.language) == (
        "baved-55",
        "male",
        16,
        "3",
        "ar",
    )
    assert len({r.speaker for r in rows}) == 30
    assert _by_name(rows)["3-f-21-3-2-824.flac"].extra["gender"] == "female"
    _assert_speaker_disjoint(rows)


NEMO_SPEAKERS = {  # data.tsv: speaker -> (gender, age, clips)
    "EB0": ("female", 27, 539),
    "IC0": ("female", 28, 540),
    "KD0": ("female", 28, 540),
    "MP0": ("male", 24, 256),
    "SM0": ("male", 24, 538),
    "TP0": ("male", 26, 539),
    "WR0": ("male", 23, 539),
}


@pytest.mark.slow
def test_nemo_labels_speakers_and_language(data_dir, tmp_path):
    rows, dropped = prepare_corpus("nemo", data_dir / "nemo")
    assert len(rows) == 3491 and not dropped
    labels = Counter(r.label for r in rows)
    assert labels == {
        "neutral": 629,
        "sad": 589,
        "surprised": 579,
        "angry": 569,
        "happy": 569,
        "fearful": 556,
    }
    words = {(r.extra["original_label"], r.label) for r in rows}
    assert words == {
        ("anger", "angry"),
        ("fear", "fearful"),
        ("happiness", "happy"),
        ("neutral", "neutral"),
        ("sadness", "sad"),
        ("surprised", "surprised"),
    }
    people = Counter((r.speaker, r.extra["gender"], r.extra["age"]) for r in rows)
    assert people == {(f"nemo-{s}", g, age): n for s, (g, age, n) in NEMO_SPEAKERS.items()}
    assert {r.language for r in rows} == {"pl"} and {r.corpus for r in rows} == {"nemo"}
    r = _by_name(rows)["WR0_surprised_64.opus"]  # data.tsv's first row
    assert (r.label, r.speaker, r.extra["text"]) == (
        "surprised",
        "nemo-WR0",
        "Ucho wykrywa dźwięki o różnej częstotliwości.",
    )
    emotions_per_sentence = defaultdict(set)  # each sentence is read in every emotion: words carry no label
    for r in rows:
        emotions_per_sentence[r.extra["text"]].add(r.label)
    assert len(emotions_per_sentence) == 90 and all(len(v) == 6 for v in emotions_per_sentence.values())
    _assert_speaker_disjoint(rows)

    out = tmp_path / "nemo.csv"
    assert main(["data", "prepare", "nemo", str(data_dir / "nemo"), "-o", str(out), "--check"]) == 0
    back = read_manifest(out)  # every path exists and its header reads (--check), and reads back
    assert [(r.path, r.label, r.speaker) for r in back] == [(r.path, r.label, r.speaker) for r in rows]
    one_each = {(r.speaker, r.label): r for r in back}  # 42 clips: one per speaker and class
    assert len(one_each) == 42
    for r in one_each.values():
        audio = load_audio(r.path)
        assert audio.dtype == np.float32 and 0.5 * 16000 < len(audio) < 10 * 16000
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0.01


@pytest.mark.slow  # decodes all 3,491 clips (about 2 minutes on one busy core)
def test_nemo_every_clip_decodes(data_dir):
    rows, _ = prepare_corpus("nemo", data_dir / "nemo")
    lengths = [len(load_audio(r.path)) for r in rows]
    assert min(lengths) > 0.5 * 16000 and len(lengths) == 3491


def test_nemo_table_and_files_disagree(tmp_path):
    """A listed clip without audio and an audio file data.tsv does not list are both named, with the reason."""
    root = tmp_path / "nemo"
    header = "file_id\temotion\traw_text\tnormalized_text\tspeaker_id\tgender\tage\n"
    lines = [
        'EB0/EB0_fear_1.opus\tfear\tMa "kota".\tma kota\tEB0\tfemale\t27',  # a quote is text, not CSV quoting
        "EB0/EB0_anger_1.opus\tanger\tMa kota.\tma kota\tEB0\tfemale\t27",
        "SM0/SM0_joy_1.opus\tjoy\tMa kota.\tma kota\tSM0\tmale\t",
    ]
    _silent(root / "EB0" / "EB0_fear_1.wav")
    (root / "EB0" / "EB0_fear_1.wav").rename(root / "EB0" / "EB0_fear_1.opus")  # names only: nothing decodes
    _silent(root / "SM0" / "SM0_joy_1.wav").rename(root / "SM0" / "SM0_joy_1.opus")
    _silent(root / "SM0" / "SM0_extra_2.wav")
    (root / "data.tsv").write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    rows, dropped = prepare_corpus("nemo", root)
    assert [(Path(r.path).name, r.label, r.extra["text"]) for r in rows] == [
        ("EB0_fear_1.opus", "fearful", 'Ma "kota".')
    ]
    assert [(Path(d.path).name, d.reason, d.original_label) for d in dropped] == [
        ("EB0_anger_1.opus", "audio file not found", "anger"),
        ("SM0_extra_2.wav", "not listed in data.tsv", ""),
        ("SM0_joy_1.opus", "unknown label code 'joy'", "joy"),
    ]
    (root / "data.tsv").write_text("file\temotion\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.tsv: missing column\(s\) file_id, speaker_id"):
        prepare_corpus("nemo", root)


# --- --keep-labels: the corpus's own label names -------------------------------------------------


def test_keep_labels_ravdess_has_8_classes_with_calm(ravdess_root):
    rows, dropped = prepare_corpus("ravdess", ravdess_root, keep_labels=True)
    assert len(rows) == 1200 and not dropped  # nothing is left out for lack of a mapping
    assert Counter(r.label for r in rows) == {
        "neutral": 80,
        **{k: 160 for k in ("calm", "happy", "sad", "angry", "fearful", "disgusted", "surprised")},
    }
    for r in rows:  # the label is the file name's emotion code, by the corpus's own table
        code = Path(r.path).name.split("-")[2]
        assert r.label == ("calm" if code == "02" else RAVDESS_CODES[code])
    assert corpus_labels("ravdess", keep_labels=True) == (
        "neutral",
        "calm",
        "happy",
        "sad",
        "angry",
        "fearful",
        "disgusted",
        "surprised",
    )
    plain, _ = prepare_corpus("ravdess", ravdess_root)  # the other 1,040 clips: same label, same split
    kept = {r.path: (r.label, r.split) for r in rows}
    assert {r.path: (r.label, r.split) for r in plain} == {p: v for p, v in kept.items() if v[0] != "calm"}
    with pytest.raises(ValueError, match="--calm maps 'calm' onto the 7 classes; --keep-labels keeps it"):
        prepare_corpus("ravdess", ravdess_root, keep_labels=True, calm="neutral")


def test_keep_labels_emodb_baved_tava(data_dir):
    rows, dropped = prepare_corpus("emodb", data_dir / "emodb", keep_labels=True)
    assert len(rows) == 304 and not dropped
    labels = Counter(r.label for r in rows)
    assert labels["boredom"] == 50 and set(labels) == {
        "angry",
        "boredom",
        "disgusted",
        "fearful",
        "happy",
        "sad",
        "neutral",
    }
    assert _by_name(rows)["09a02La.flac"].label == "boredom"

    rows, _ = prepare_corpus("baved", data_dir / "baved", keep_labels=True)
    assert Counter(r.label for r in rows) == {"low": 222, "neutral": 274, "high": 280}
    assert all(r.arousal == {"low": 0.0, "neutral": 0.5, "high": 1.0}[r.label] for r in rows)
    assert corpus_labels("baved", keep_labels=True) == ("low", "neutral", "high")

    rows, dropped = prepare_corpus("tava", data_dir / "tava", keep_labels=True)
    assert len(rows) == 224 and not dropped
    assert all(r.label == r.extra["original_label"] for r in rows)  # the 16 affect words, 14 speakers each
    assert Counter(r.label for r in rows) == {word: 14 for word in corpus_labels("tava", keep_labels=True)}
    assert len(corpus_labels("tava", keep_labels=True)) == 16


def test_keep_labels_turev_calm_and_labelled_tables(tmp_path):
    """TurEV-DB's Calm folder, IEMOCAP's excited and frustrated, MSP-Podcast's contempt: kept by name."""
    root = tmp_path / "turev"
    _silent(root / "Calm" / "1157_sk_elma.wav")
    _silent(root / "Sad" / "1157_hl_elma.wav")
    _silent(root / "Calm" / "1157_kz_armut.wav")  # an angry code in the calm folder
    rows, dropped = prepare_corpus("turev", root, keep_labels=True)
    assert [(Path(r.path).name, r.label) for r in rows] == [
        ("1157_sk_elma.wav", "calm"),
        ("1157_hl_elma.wav", "sad"),
    ]
    assert [d.reason for d in dropped] == ["file name says 'kz' but its folder is Calm"]

    root = tmp_path / "IEMOCAP"
    (root / "Session1" / "dialog" / "EmoEvaluation").mkdir(parents=True)
    name = "Ses01F_impro01"
    (root / "Session1" / "dialog" / "EmoEvaluation" / f"{name}.txt").write_text(
        IEMOCAP_EVAL.replace("Ses01F_impro01", name)
    )
    for turn in ("F000", "M001", "F002", "M003"):
        _silent(root / "Session1" / "sentences" / "wav" / name / f"{name}_{turn}.wav")
    rows, dropped = prepare_corpus("iemocap", root, keep_labels=True)
    assert [r.label for r in rows] == ["neutral", "frustrated", "excited"]
    assert {(d.original_label, d.reason) for d in dropped} == {
        ("xxx", "'xxx' is not an emotion label"),  # no majority: no label to keep
        ("ang", "audio file not found"),
    }
    rated, _ = prepare_corpus("iemocap", root, keep_labels=True, keep_dimensional=True)
    assert [r.label for r in rated] == ["neutral", "frustrated", "excited", None]  # xxx keeps its ratings


def test_keep_labels_cli_writes_and_checks_the_own_label_set(tmp_path, ravdess_root, capsys):
    out = tmp_path / "ravdess8.csv"
    assert (
        main(["data", "prepare", "ravdess", str(ravdess_root), "-o", str(out), "--keep-labels", "--check"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "1200 clips of ravdess; 0 dropped" in printed and "(neutral 56, calm 112, happy 112," in printed
    assert Counter(r.label for r in read_manifest(out, labels=None))["calm"] == 160
    assert main(["data", "check", str(out), "--no-audio"]) == 1  # calm is not one of the 7
    assert "unknown label 'calm' (expected one of neutral, happy" in capsys.readouterr().out
    own = ",".join(corpus_labels("ravdess", keep_labels=True))
    assert main(["data", "check", str(out), "--no-audio", "--labels", own]) == 0
    args = ["data", "prepare", "ravdess", str(ravdess_root), "-o", str(tmp_path / "x.csv")]
    assert main([*args, "--keep-labels", "--calm", "neutral"]) == 1
    assert "--keep-labels keeps it as 'calm'" in capsys.readouterr().err


def test_dimensional_rows_round_trip_and_check(data_dir, tmp_path):
    """TAVA's and BAVED's unlabelled rows survive the manifest as written: no class, dims where present."""
    out = tmp_path / "dims.csv"
    assert main(["data", "prepare", "baved", str(data_dir / "baved"), "-o", str(out), "--check"]) == 0
    back = read_manifest(out)
    assert sum(r.label is None for r in back) == 502
    assert all(r.valence is None and r.dominance is None and r.arousal is not None for r in back)
    out = tmp_path / "tava.jsonl"
    assert main(["data", "prepare", "tava", str(data_dir / "tava"), "-o", str(out), "--check"]) == 0
    assert sum(r.label is None and r.valence is not None for r in read_manifest(out)) == 112


def test_min_dev_speakers(data_dir, ravdess_root):
    """Dev gets at least N speakers where the corpus can spare them; train always keeps one."""

    def count(rows, split):
        return len({r.speaker for r in rows if r.split == split})

    rows, _ = prepare_corpus("ravdess", ravdess_root, min_dev_speakers=4)
    assert (count(rows, "train"), count(rows, "dev"), count(rows, "test")) == (14, 4, 2)
    _assert_speaker_disjoint(rows)
    plain, _ = prepare_corpus("ravdess", ravdess_root, min_dev_speakers=0)
    assert count(plain, "dev") == 2  # the fraction alone
    none, _ = prepare_corpus("ravdess", ravdess_root, dev_fraction=0)
    assert count(none, "dev") == 0  # a fraction of 0 is no dev split, whatever the minimum
    rows, _ = prepare_corpus("turev", data_dir / "turev", min_dev_speakers=4, test_fraction=0)
    assert (count(rows, "train"), count(rows, "dev"), count(rows, "test")) == (1, 4, 0)
    rows, _ = prepare_corpus("emodb", data_dir / "emodb", min_dev_speakers=9, test_fraction=0)
    assert (count(rows, "train"), count(rows, "dev")) == (1, 5)
    with pytest.raises(ValueError, match="min-dev-speakers"):
        prepare_corpus("emodb", data_dir / "emodb", min_dev_speakers=-1)


def test_speaker_split_rule(ravdess_root):
    rows, _ = prepare_corpus("ravdess", ravdess_root, seed=3)
    again, _ = prepare_corpus("ravdess", ravdess_root, seed=3)
    assert [r.split for r in rows] == [r.split for r in again]  # seeded: reproducible
    other, _ = prepare_corpus("ravdess", ravdess_root, seed=4)
    assert [r.split for r in rows] != [r.split for r in other]

    def speakers(rs, split):
        return {r.speaker for r in rs if r.split == split}

    for split, n in (("dev", 4), ("test", 2)):
        chosen = speakers(rows, split)
        genders = Counter(r.extra["gender"] for r in rows if r.speaker in chosen and r.label == "angry")
        assert len(chosen) == n and genders["male"] == genders["female"]  # interleaved by gender

    fixed, _ = prepare_corpus(
        "ravdess", ravdess_root, dev_speakers=["01", "ravdess-02"], test_speakers=["20"]
    )
    assert speakers(fixed, "dev") == {"ravdess-01", "ravdess-02"}
    assert speakers(fixed, "test") == {"ravdess-20"}
    assert len(speakers(fixed, "train")) == 17
    with pytest.raises(ValueError, match="unknown speaker '99'"):
        prepare_corpus("ravdess", ravdess_root, dev_speakers=["99"])
    with pytest.raises(ValueError, match="both dev and test"):
        prepare_corpus("ravdess", ravdess_root, dev_speakers=["01"], test_speakers=["01"])

    none_held, _ = prepare_corpus("ravdess", ravdess_root, dev_fraction=0.0, test_fraction=0.25)
    assert len(speakers(none_held, "test")) == 5 and not speakers(none_held, "dev")


def test_the_default_model_records_every_speaker_here(data_dir):
    """The bundled model was trained on every labelled clip of the 8 corpora here (MODEL_CARD.md): its
    record names every speaker of each, so `serval eval` warns on any of them, and no dev speakers."""
    from serval.locations import DEFAULT_MODEL
    from serval.training_data import read_record

    record = read_record(DEFAULT_MODEL)
    if record is None:
        pytest.skip("the bundled model records no training data")
    corpora = ["ased", "baved", "emodb", "nemo", "ravdess", "tava", "tess", "turev"]
    assert sorted(record["train"]) == corpora and not record["dev"]
    for corpus, trained in record["train"].items():
        rows, _ = prepare_corpus(corpus, data_dir / corpus)
        assert {r.speaker for r in rows} == set(trained), corpus


def test_assign_splits_groups_and_unknown_speakers():
    from serval.manifest import ManifestRow

    rows = [
        ManifestRow(path=f"{i}.wav", speaker=f"s{i % 6}", corpus="c", extra={"session": i % 6 // 2})
        for i in range(30)
    ]
    rows.append(ManifestRow(path="x.wav", speaker=None, corpus="c"))
    assign_splits(rows, dev_fraction=0.34, test_fraction=0.34, group="session")
    by_session = defaultdict(set)
    for r in rows[:-1]:
        by_session[r.extra["session"]].add(r.split)
    assert all(len(v) == 1 for v in by_session.values())  # a session's two speakers stay together
    assert sorted(next(iter(v)) for v in by_session.values()) == ["dev", "test", "train"]
    assert rows[-1].split == "train"


def test_bad_options(ravdess_root, tmp_path):
    with pytest.raises(ValueError, match="--boredom does not apply to ravdess"):
        prepare_corpus("ravdess", ravdess_root, boredom="neutral")
    with pytest.raises(ValueError, match="no official split"):
        prepare_corpus("ravdess", ravdess_root, split="official")
    with pytest.raises(ValueError, match="corpus folder not found"):
        prepare_corpus("ravdess", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no ravdess audio files"):
        prepare_corpus("ravdess", tmp_path / "empty")


# --- mock layouts of the corpora that are not here ------------------------------------------


def test_crema_d_layout(tmp_path):
    root = tmp_path / "CREMA-D"
    for name in (
        "1001_DFA_ANG_XX",
        "1001_IEO_HAP_HI",
        "1002_TIE_SAD_LO",
        "1002_IWW_NEU_XX",
        "1003_MTI_FEA_MD",
    ):
        _silent(root / "AudioWAV" / f"{name}.wav")
    (root / "AudioWAV" / "1076_MTI_SAD_XX.wav").write_bytes(b"")  # as in the release
    _silent(root / "AudioWAV" / "readme_clip.wav")
    (root / "VideoDemographics.csv").write_text(
        "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n1002,21,Female,Caucasian,Not Hispanic\n"
    )
    rows, dropped = prepare_corpus("crema-d", root, dev_fraction=0, test_fraction=0)
    by_name = _by_name(rows)
    assert {k: r.label for k, r in by_name.items()} == {
        "1001_DFA_ANG_XX.wav": "angry",
        "1001_IEO_HAP_HI.wav": "happy",
        "1002_TIE_SAD_LO.wav": "sad",
        "1002_IWW_NEU_XX.wav": "neutral",
        "1003_MTI_FEA_MD.wav": "fearful",
    }
    assert by_name["1001_IEO_HAP_HI.wav"].extra["intensity"] == "high"
    assert by_name["1002_TIE_SAD_LO.wav"].extra["gender"] == "female"
    assert "gender" not in by_name["1003_MTI_FEA_MD.wav"].extra  # not in the demographics table
    assert by_name["1001_DFA_ANG_XX.wav"].speaker == "crema-d-1001"
    assert {(Path(d.path).name, d.reason) for d in dropped} == {
        ("1076_MTI_SAD_XX.wav", "empty file (0 bytes)"),
        ("readme_clip.wav", "file name is not ActorID_Sentence_Emotion_Level"),
    }


def test_esd_layout(tmp_path):
    root = tmp_path / "Emotion Speech Dataset"
    _silent(root / "0001" / "Neutral" / "train" / "0001_000001.wav")
    _silent(root / "0001" / "Surprise" / "test" / "0001_001401.wav")
    _silent(root / "0011" / "Angry" / "evaluation" / "0011_000351.wav")
    _silent(root / "0011" / "Sad" / "0011_001051.wav")  # flat layout of later releases
    _silent(root / "0011" / "0011_000999.wav")  # no emotion folder
    (root / "0011" / "0011.txt").write_text("0011_000351\tsome text\tAngry\n")
    rows, dropped = prepare_corpus("esd", root)
    got = {Path(r.path).name: (r.label, r.language, r.speaker, r.extra.get("official_split")) for r in rows}
    assert got == {
        "0001_000001.wav": ("neutral", "zh", "esd-0001", "train"),
        "0001_001401.wav": ("surprised", "zh", "esd-0001", "test"),
        "0011_000351.wav": ("angry", "en", "esd-0011", "dev"),
        "0011_001051.wav": ("sad", "en", "esd-0011", None),
    }
    assert [Path(d.path).name for d in dropped] == ["0011_000999.wav"]
    _assert_speaker_disjoint(rows)


def _meld_csv(path: Path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "Sr No.",
                "Utterance",
                "Speaker",
                "Emotion",
                "Sentiment",
                "Dialogue_ID",
                "Utterance_ID",
                "Season",
                "Episode",
                "StartTime",
                "EndTime",
            ]
        )
        for i, (speaker, emotion, dia, utt) in enumerate(records, 1):
            w.writerow(
                [i, "Oh my God!", speaker, emotion, "neutral", dia, utt, 1, 1, "00:00:01,000", "00:00:02,000"]
            )


def test_meld_layout(tmp_path):
    root = tmp_path / "MELD.Raw"
    _meld_csv(
        root / "train_sent_emo.csv",
        [("Joey", "joy", 0, 0), ("Rachel", "anger", 0, 1), ("Ross", "sadness", 1, 0)],
    )
    _meld_csv(root / "dev_sent_emo.csv", [("Monica", "surprise", 0, 0), ("Chandler", "fear", 110, 7)])
    _meld_csv(root / "test_sent_emo.csv", [("Phoebe", "disgust", 0, 0)])
    for folder, stem in [
        ("train_splits", "dia0_utt0"),
        ("train_splits", "dia0_utt1"),
        ("train_splits", "dia1_utt0"),
        ("dev_splits_complete", "dia0_utt0"),
        ("output_repeated_splits_test", "dia0_utt0"),
    ]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / f"{stem}.mp4").write_bytes(b"\0\0\0\x18ftypmp42")  # the release ships video
    _silent(root / "train_splits" / "dia0_utt0.wav")  # audio extracted beside it is preferred
    rows, dropped = prepare_corpus("meld", root)
    got = {(r.split, Path(r.path).name): (r.label, r.speaker) for r in rows}
    assert got == {
        ("train", "dia0_utt0.wav"): ("happy", "meld-Joey"),
        ("train", "dia0_utt1.mp4"): ("angry", "meld-Rachel"),
        ("train", "dia1_utt0.mp4"): ("sad", "meld-Ross"),
        ("dev", "dia0_utt0.mp4"): ("surprised", "meld-Monica"),
        ("test", "dia0_utt0.mp4"): ("disgusted", "meld-Phoebe"),
    }
    dev_row = next(r for r in rows if r.split == "dev")
    assert "dev_splits_complete" in dev_row.path  # dialogue ids restart per split: not the train file
    assert [(d.path, d.reason) for d in dropped] == [("dev/dia110_utt7", "audio file not found")]
    # --split speaker re-splits by speaker, ignoring the official split
    by_speaker, _ = prepare_corpus("meld", root, split="speaker", test_fraction=0.2, dev_fraction=0.2)
    _assert_speaker_disjoint(by_speaker)


IEMOCAP_EVAL = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral;\t()

[10.0100 - 11.3925]\tSes01F_impro01_M001\texc\t[4.0000, 3.5000, 3.0000]

[14.8872 - 18.0175]\tSes01F_impro01_F002\tfru\t[2.0000, 3.5000, 3.5000]

[19.2900 - 20.7875]\tSes01F_impro01_M003\txxx\t[2.5000, 2.0000, 2.5000]

[21.0000 - 23.0000]\tSes01F_impro01_F004\tang\t[1.0000, 5.0000, 4.5000]
"""


def test_iemocap_layout(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    for session in (1, 2, 3):
        name = f"Ses0{session}F_impro01"
        evaluation = IEMOCAP_EVAL.replace("Ses01F_impro01", name)
        (root / f"Session{session}" / "dialog" / "EmoEvaluation").mkdir(parents=True)
        (root / f"Session{session}" / "dialog" / "EmoEvaluation" / f"{name}.txt").write_text(evaluation)
        for turn in ("F000", "M001", "F002", "M003"):
            _silent(root / f"Session{session}" / "sentences" / "wav" / name / f"{name}_{turn}.wav")
        # F004 has no wav: listed as dropped
    rows, dropped = prepare_corpus("iemocap", root, dev_fraction=0, test_fraction=0.3)
    by_name = _by_name(rows)
    assert {k: r.label for k, r in by_name.items()} == {
        "Ses01F_impro01_F000.wav": "neutral",
        "Ses01F_impro01_M001.wav": "happy",  # excited merged into happy by default
        "Ses02F_impro01_F000.wav": "neutral",
        "Ses02F_impro01_M001.wav": "happy",
        "Ses03F_impro01_F000.wav": "neutral",
        "Ses03F_impro01_M001.wav": "happy",
    }
    excited = by_name["Ses01F_impro01_M001.wav"]
    assert (excited.valence, excited.arousal, excited.dominance) == (0.75, 0.625, 0.5)  # (x - 1) / 4
    assert (
        excited.speaker == "iemocap-Ses01M" and excited.extra["gender"] == "male"
    )  # speaker from the turn, not the dialog
    reasons = Counter((d.original_label, d.reason.split(" (")[0]) for d in dropped)
    assert reasons == {
        ("fru", "'fru' is not one of the 7 classes"): 3,
        ("xxx", "'xxx' is not one of the 7 classes"): 3,
        ("ang", "audio file not found"): 3,
    }
    # speakers are grouped by session: a session is never split
    split_of_session = {s: {r.split for r in rows if r.extra["session"] == s} for s in (1, 2, 3)}
    assert all(len(v) == 1 for v in split_of_session.values())
    assert sorted(next(iter(v)) for v in split_of_session.values()) == ["test", "train", "train"]
    _assert_speaker_disjoint(rows)

    no_exc, _ = prepare_corpus("iemocap", root, excited="drop")
    assert "happy" not in {r.label for r in no_exc}
    dims, dropped = prepare_corpus("iemocap", root, keep_dimensional=True)
    unlabelled = [r for r in dims if r.label is None]
    assert len(unlabelled) == 6 and all(r.arousal is not None for r in unlabelled)
    assert {d.reason for d in dropped} == {"audio file not found"}


def test_msp_podcast_layout(tmp_path):
    root = tmp_path / "MSP-Podcast"
    (root / "Labels").mkdir(parents=True)
    table = [
        ("MSP-PODCAST_0001_0008.wav", "N", "4.0", "4.2", "4.4", "127", "Female", "Train"),
        ("MSP-PODCAST_0001_0019.wav", "A", "6.0", "2.0", "5.5", "127", "Female", "Development"),
        ("MSP-PODCAST_0002_0001.wav", "C", "3.0", "3.0", "3.0", "4", "Male", "Test1"),
        ("MSP-PODCAST_0002_0002.wav", "O", "3.0", "3.0", "3.0", "4", "Male", "Test1"),
        ("MSP-PODCAST_0003_0001.wav", "U", "7.0", "1.0", "1.0", "Unknown", "Unknown", "Test2"),
        ("MSP-PODCAST_0004_0001.wav", "H", "5.0", "5.0", "5.0", "9", "Male", "Train"),  # no audio
    ]
    with open(root / "Labels" / "labels_consensus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"])
        w.writerows(table)
    for name, *_ in table[:-1]:
        _silent(root / "Audios" / name)
    rows, dropped = prepare_corpus("msp-podcast", root)
    got = {Path(r.path).name: (r.label, r.split, r.speaker) for r in rows}
    assert got == {
        "MSP-PODCAST_0001_0008.wav": ("neutral", "train", "msp-podcast-127"),
        "MSP-PODCAST_0001_0019.wav": ("angry", "dev", "msp-podcast-127"),
        "MSP-PODCAST_0003_0001.wav": ("surprised", "test2", None),
    }
    angry = _by_name(rows)["MSP-PODCAST_0001_0019.wav"]
    assert (angry.arousal, angry.valence, angry.dominance) == (5 / 6, 1 / 6, 0.75)  # (x - 1) / 6
    assert {(Path(d.path).name, d.original_label) for d in dropped} == {
        ("MSP-PODCAST_0002_0001.wav", "contempt"),
        ("MSP-PODCAST_0002_0002.wav", "other"),
        ("MSP-PODCAST_0004_0001.wav", "happy"),
    }
    dims, dropped = prepare_corpus("msp-podcast", root, keep_dimensional=True)
    unlabelled = {Path(r.path).name for r in dims if r.label is None}
    assert unlabelled == {"MSP-PODCAST_0002_0001.wav", "MSP-PODCAST_0002_0002.wav"}
    assert [d.reason for d in dropped] == ["audio file not found"]
    with_contempt, _ = prepare_corpus("msp-podcast", root, contempt="disgusted")
    assert _by_name(with_contempt)["MSP-PODCAST_0002_0001.wav"].label == "disgusted"
    own, dropped = prepare_corpus("msp-podcast", root, keep_labels=True)
    assert {Path(r.path).name: r.label for r in own if r.label in ("contempt", "other")} == {
        "MSP-PODCAST_0002_0001.wav": "contempt",
        "MSP-PODCAST_0002_0002.wav": "other",
    }
    assert len(own) == 5 and [d.reason for d in dropped] == ["audio file not found"]
    (root / "Labels" / "labels_consensus.csv").write_text("File,Class\nx.wav,N\n")
    with pytest.raises(ValueError, match=r"labels_consensus.csv: missing column\(s\) FileName, EmoClass"):
        prepare_corpus("msp-podcast", root)


def test_m3ed_layout(tmp_path):
    root = tmp_path / "M3ED"
    annotation = {
        "Anjia_1": {
            "Anjia_1_1": {
                "SpeakerInfo": {
                    "A": {"Name": "房似锦", "Gender": "Female"},
                    "B": {"Name": "徐文昌", "Gender": "Male"},
                },
                "Dialog": {
                    "Anjia_1_1_1": {
                        "Speaker": "A",
                        "StartTime": "00:00:01.0",
                        "EndTime": "00:00:02.0",
                        "Text": "你好",
                        "EmoAnnotation": {"final_main_emo": "Happy"},
                    },
                    "Anjia_1_1_2": {
                        "Speaker": "B",
                        "Text": "嗯",
                        "EmoAnnotation": {"final_main_emo": "Anger"},
                    },
                    "Anjia_1_1_3": {
                        "Speaker": "A",
                        "Text": "哦",
                        "EmoAnnotation": {"final_main_emo": "Surprise"},
                    },
                },
            }
        },
        "Zhuyu_2": {
            "Zhuyu_2_1": {
                "SpeakerInfo": {"A": {"Name": "李", "Gender": "Male"}},
                "Dialog": {
                    "Zhuyu_2_1_1": {
                        "Speaker": "A",
                        "Text": "唉",
                        "EmoAnnotation": {"final_main_emo": ["Sad"]},
                    }
                },
            }
        },
    }
    root.mkdir()
    (root / "annotation.json").write_text(json.dumps(annotation, ensure_ascii=False), encoding="utf-8")
    (root / "splitInfo").mkdir()
    (root / "splitInfo" / "movie_list_train.txt").write_text("Anjia_1\n")
    (root / "splitInfo" / "movie_list_test.txt").write_text("Zhuyu_2\n")
    (root / "splitInfo" / "movie_list_val.txt").write_text("")
    _silent(root / "modality_speech" / "A_Anjia_1_1_1.wav")
    _silent(root / "modality_speech" / "B_Anjia_1_1_2.wav")
    _silent(root / "modality_speech" / "A_Zhuyu_2_1_1.wav")
    rows, dropped = prepare_corpus("m3ed", root)
    got = {Path(r.path).name: (r.label, r.split, r.speaker, r.language) for r in rows}
    assert got == {
        "A_Anjia_1_1_1.wav": ("happy", "train", "m3ed-Anjia_1-房似锦", "zh"),
        "B_Anjia_1_1_2.wav": ("angry", "train", "m3ed-Anjia_1-徐文昌", "zh"),
        "A_Zhuyu_2_1_1.wav": ("sad", "test", "m3ed-Zhuyu_2-李", "zh"),
    }
    assert [(d.path, d.reason) for d in dropped] == [("Anjia_1/Anjia_1_1_3", "audio file not found")]


def test_indowavesentiment_layout(tmp_path):
    root = tmp_path / "IndoWaveSentiment"
    names = ["01-01-01-01", "02-02-02-03", "07-03-02-03", "08-04-01-02", "09-05-01-01", "10-05-02-02"]
    for name in names:
        _silent(root / f"{name}.wav")
    rows, dropped = prepare_corpus("indowavesentiment", root, dev_fraction=0, test_fraction=0)
    got = {Path(r.path).stem: (r.label, r.speaker, r.extra["gender"], r.extra["intensity"]) for r in rows}
    assert got == {
        "01-01-01-01": ("neutral", "indowavesentiment-01", "male", "normal"),
        "02-02-02-03": ("happy", "indowavesentiment-02", "female", "strong"),
        "07-03-02-03": ("surprised", "indowavesentiment-07", "male", "strong"),
        "08-04-01-02": ("disgusted", "indowavesentiment-08", "female", "normal"),
    }
    assert {d.original_label for d in dropped} == {"disappointed"}
    as_sad, _ = prepare_corpus("indowavesentiment", root, disappointed="sad")
    assert Counter(r.label for r in as_sad)["sad"] == 2 and {r.language for r in as_sad} == {"id"}


def test_every_recipe_has_a_test():
    """Each recipe of the registry has a test here named after it that runs it by name."""
    tests = {name: fn for name, fn in globals().items() if name.startswith("test_") and callable(fn)}
    untested = []
    for corpus in RULES:
        stem = "test_" + corpus.replace("-", "_") + "_"
        runs = [n for n, fn in tests.items() if n.startswith(stem) and f'"{corpus}"' in inspect.getsource(fn)]
        if not runs:
            untested.append(corpus)
    assert not untested, f"recipes without a test named test_<corpus>_…: {untested}"


# --- the CLI --------------------------------------------------------------------------------


def test_cli_prepare_and_check(tmp_path, data_dir, capsys):
    out = tmp_path / "out" / "ravdess.jsonl"
    argv = [
        "data",
        "prepare",
        "ravdess",
        str(data_dir / "ravdess"),
        "-o",
        str(out),
        "--dev-speakers",
        "01",
        "02",
    ]
    assert main(argv + ["--check"]) == 0
    text = capsys.readouterr().out
    assert "1040 clips" in text and "160 dropped" in text
    rows = read_manifest(out)
    assert len(rows) == 1040 and {r.speaker for r in rows if r.split == "dev"} == {"ravdess-01", "ravdess-02"}
    _assert_speaker_disjoint(rows)
    dropped = dropped_path(out)
    assert dropped.name == "ravdess.dropped.csv"
    with open(dropped, newline="") as f:
        listed = list(csv.DictReader(f))
    assert len(listed) == 160 and all(Path(d["path"]).name.split("-")[2] == "02" for d in listed)

    # nothing a user gave is overwritten
    before = out.read_bytes()
    assert (
        main(["data", "prepare", "ravdess", str(data_dir / "ravdess"), "-o", str(out), "--calm", "neutral"])
        == 1
    )
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert (
        main(
            [
                "data",
                "prepare",
                "ravdess",
                str(data_dir / "ravdess"),
                "-o",
                str(out),
                "--calm",
                "neutral",
                "--overwrite",
            ]
        )
        == 0
    )
    assert len(read_manifest(out)) == 1200
    assert dropped.read_text().strip() == "path,reason,original_label"
    assert check_manifest(out) == []
    assert main(["data", "check", str(out)]) == 0

    # errors are one clear line and exit 1
    capsys.readouterr()
    assert (
        main(
            [
                "data",
                "prepare",
                "ravdess",
                str(data_dir / "ravdess"),
                "-o",
                str(tmp_path / "x.csv"),
                "--boredom",
                "neutral",
            ]
        )
        == 1
    )
    assert "--boredom does not apply to ravdess" in capsys.readouterr().err
    assert main(["data", "prepare", "emodb", str(data_dir / "emodb"), "-o", str(tmp_path / "x.txt")]) == 1
    assert "unknown manifest format" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_merge_joins_manifests_and_refuses_overlap(tmp_path, data_dir):
    emodb, ased = tmp_path / "emodb.csv", tmp_path / "ased.csv"
    assert main(["data", "prepare", "emodb", str(data_dir / "emodb"), "-o", str(emodb)]) == 0
    assert main(["data", "prepare", "ased", str(data_dir / "ased"), "-o", str(ased)]) == 0
    merged = tmp_path / "all.csv"
    assert main(["data", "merge", str(emodb), str(ased), "-o", str(merged)]) == 0
    rows = read_manifest(merged)
    assert len(rows) == len(read_manifest(emodb)) + len(read_manifest(ased))
    assert {r.corpus for r in rows} == {"emodb", "ased"}
    assert main(["data", "merge", str(emodb), str(ased), "-o", str(merged)]) == 1  # never overwrites
    assert main(["data", "merge", str(emodb), str(emodb), "-o", str(tmp_path / "twice.csv")]) == 1


def test_data_prepare_follows_symlinked_folders(tmp_path, data_dir):
    from serval.corpora import prepare_corpus

    root = tmp_path / "ravdess"
    root.mkdir()
    (root / "Actor_01").symlink_to(data_dir / "ravdess" / "Actor_01", target_is_directory=True)
    (root / "more").mkdir()
    (root / "more" / "Actor_02").symlink_to(data_dir / "ravdess" / "Actor_02", target_is_directory=True)
    (root / "more" / "loop").symlink_to(root, target_is_directory=True)  # a cycle is walked once
    rows, dropped = prepare_corpus("ravdess", root)
    assert len(rows) + len(dropped) == 120  # 60 clips of each actor, none twice
    assert len({r.path for r in rows}) == len(rows)
    assert {r.speaker for r in rows} == {"ravdess-01", "ravdess-02"}
    assert all("/Actor_01/" in r.path or "/more/Actor_02/" in r.path for r in rows)


def test_data_prepare_warns_when_dev_and_test_are_empty(tmp_path, data_dir, capsys):
    root = tmp_path / "ravdess"
    root.mkdir()
    (root / "Actor_01").symlink_to(data_dir / "ravdess" / "Actor_01", target_is_directory=True)
    out = tmp_path / "one.csv"
    assert main(["data", "prepare", "ravdess", str(root), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: the dev and test splits are empty" in err and "1 speakers" in err, err

    from serval.corpora import prepare_corpus, split_warnings

    rows, _ = prepare_corpus("ravdess", data_dir / "ravdess")  # 20 speakers: both splits get some
    assert {r.split for r in rows} == {"train", "dev", "test"} and split_warnings(rows) == []
    for r in rows:
        r.split = "train" if r.split == "test" else r.split
    warnings = split_warnings(rows)
    assert len(warnings) == 1 and "the test split is empty" in warnings[0], warnings
