"""Corpus recipes: turn a corpus as distributed into a manifest (`serval data prepare`).

Each recipe maps the corpus's own labels onto the 7 classes, fills language, speaker and
corpus, and lists every file it leaves out, with the reason. Splits are assigned by speaker
(never by clip) with a seeded rule, or taken from the corpus's official split. The label
mappings and the split rule are documented in docs/data.md.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import os
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serval.atomic import atomic_write_text
from serval.manifest import (
    ManifestRow,
    check_manifest,
    manifest_format,
    read_manifest,
    write_manifest,
)
from serval.vocab import AUDIO_EXTENSIONS, EMOTIONS


@dataclass(frozen=True)
class Dropped:
    """A file (or annotated span) a recipe left out, and why."""

    path: str
    reason: str
    original_label: str = ""


class CorpusError(ValueError):
    """A corpus folder a recipe cannot use (wrong folder, missing metadata)."""


# ---------------------------------------------------------------------------------------
# Helpers shared by the recipes


def _walk(root: Path, pattern: str = "*") -> list[Path]:
    """Files under root whose name matches `pattern`, following symlinked folders (each real folder once).

    `Path.rglob` does not descend into symlinked folders, and corpora are often assembled from links.
    """
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or a second link to the same folder
            subfolders.clear()
            continue
        seen.add(real)
        found.extend(Path(folder) / f for f in fnmatch.filter(files, pattern))
    return found


def _audio_files(root: Path) -> list[Path]:
    """Every audio file under root, sorted, hidden files skipped."""
    found = [
        p
        for p in _walk(root)
        if p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(found)


def _missing_reason(path: Path) -> str | None:
    """Why a listed audio file cannot be used, from the file system alone (no decoding)."""
    if not path.exists():
        return "audio file not found"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return None


def _find_one(root: Path, name: str) -> Path:
    """The single file called `name` under root (the corpus may sit one folder deeper)."""
    hits = sorted(_walk(root, name))
    if not hits:
        raise CorpusError(f"{root}: no {name} found under this folder")
    return hits[0]


def _table(f, path: Path, required: tuple[str, ...]) -> csv.DictReader:
    """A CSV reader over an open metadata table, after checking it has the columns a recipe needs."""
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise CorpusError(f"{path}: missing column(s) {', '.join(missing)} (found {reader.fieldnames})")
    return reader


def _index_by_stem(files: list[Path]) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        index[f.stem].append(f)
    return index


def _prefer_audio(paths: list[Path]) -> Path:
    """Of several files with one stem, a decoded audio file rather than a video container."""
    order = {".flac": 0, ".wav": 1, ".ogg": 2, ".mp3": 3, ".m4a": 4, ".mp4": 5}
    return min(paths, key=lambda p: (order.get(p.suffix.lower(), 9), str(p)))


def _scale(value: str, low: float, high: float) -> float | None:
    """A rating on [low, high] mapped to [0, 1]; None when empty, not a number or NaN."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):  # a table's "NaN" is a missing rating, not 0
        return None
    return min(1.0, max(0.0, (v - low) / (high - low)))


class _Result:
    """What a recipe collects: kept rows and dropped files."""

    def __init__(self, corpus: str, language: str | None):
        self.corpus, self.language = corpus, language
        self.rows: list[ManifestRow] = []
        self.dropped: list[Dropped] = []

    def keep(
        self,
        path: Path,
        label: str | None,
        speaker: str | None,
        *,
        gender: str | None = None,
        original: str = "",
        language: str | None = None,
        split: str | None = None,
        arousal: float | None = None,
        valence: float | None = None,
        dominance: float | None = None,
        **extra,
    ):
        assert label is None or label in EMOTIONS, label
        extra = {"gender": gender, "original_label": original, **extra}
        row = ManifestRow(
            path=str(path),
            label=label,
            arousal=arousal,
            valence=valence,
            dominance=dominance,
            language=language or self.language,
            speaker=speaker,
            corpus=self.corpus,
            split=split,
            extra={k: v for k, v in extra.items() if v is not None},
        )
        self.rows.append(row)

    def label_or_drop(
        self, mapping: dict, key: str, options: dict[str, str], path, original: str
    ) -> str | None:
        """The mapped label, or None after listing the file as dropped."""
        label, why = _map_label(mapping, key, options, original)
        if why:
            self.drop(path, why, original)
        return label

    def drop(self, path: Path | str, reason: str, original: str = ""):
        self.dropped.append(Dropped(str(path), reason, original))


def _map_label(
    mapping: dict[str, str | None], key: str, options: dict[str, str], original: str
) -> tuple[str | None, str | None]:
    """(label, None) for a corpus label code, or (None, why the clip is left out).

    A mapping value is one of the 7 classes, None (never kept), or "option:NAME" (decided by
    the --NAME option, see OPTIONS).
    """
    target = mapping.get(key, "?")
    if target == "?":
        return None, f"unknown label code {key!r}"
    if target is None:
        return None, f"'{original}' is not one of the 7 classes"
    if target.startswith("option:"):
        option = target.split(":", 1)[1]
        choice = options.get(option) or OPTIONS[option][1]
        if choice == "drop":
            return None, f"'{original}' is not one of the 7 classes (--{option} drop)"
        return choice, None
    return target, None


# label options: name -> (choices, default); a choice is 'drop' or one of the 7 classes.
OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "calm": (("drop", "neutral"), "drop"),
    "boredom": (("drop", "neutral"), "drop"),
    "excited": (("happy", "drop"), "happy"),
    "contempt": (("drop", "disgusted"), "drop"),
    "disappointed": (("drop", "sad"), "drop"),
}


# ---------------------------------------------------------------------------------------
# Recipes for the corpora under ../shared/data

RAVDESS_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
RAVDESS_EMOTIONS = {
    "01": "neutral",
    "02": "option:calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgusted",
    "08": "surprised",
}
RAVDESS_WORDS = dict(
    zip(RAVDESS_EMOTIONS, ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"])
)


def ravdess(root: Path, options: dict[str, str]) -> _Result:
    """RAVDESS speech: `MM-VV-EE-II-SS-RR-AA` names; actor AA odd male, even female."""
    result = _Result("ravdess", "en")
    for path in _audio_files(root):
        m = RAVDESS_NAME.match(path.stem)
        if not m:
            result.drop(path, "file name is not MM-VV-EE-II-SS-RR-AA")
            continue
        modality, channel, emotion, intensity, statement, repetition, actor = m.groups()
        if channel != "01":
            result.drop(path, "song (vocal channel 02), not speech", RAVDESS_WORDS.get(emotion, emotion))
            continue
        if modality != "03":  # 01 audio-video, 02 video-only: the audio-only release (03) is the one to use
            result.drop(
                path, f"modality {modality} is not audio-only (03)", RAVDESS_WORDS.get(emotion, emotion)
            )
            continue
        label = result.label_or_drop(
            RAVDESS_EMOTIONS, emotion, options, path, RAVDESS_WORDS.get(emotion, emotion)
        )
        if label is None:
            continue
        result.keep(
            path,
            label,
            f"ravdess-{actor}",
            gender="male" if int(actor) % 2 else "female",
            original=RAVDESS_WORDS[emotion],
            intensity="strong" if intensity == "02" else "normal",
            sentence=statement,
        )
    return result


EMODB_NAME = re.compile(r"^(\d\d)([a-b]\d\d)([WLEAFTN])([a-z])$")
EMODB_EMOTIONS = {
    "W": "angry",
    "L": "option:boredom",
    "E": "disgusted",
    "A": "fearful",
    "F": "happy",
    "T": "sad",
    "N": "neutral",
}
EMODB_WORDS = {
    "W": "anger",
    "L": "boredom",
    "E": "disgust",
    "A": "fear",
    "F": "happiness",
    "T": "sadness",
    "N": "neutral",
}
EMODB_MALE = {"03", "10", "11", "12", "15"}  # the other five (08, 09, 13, 14, 16) are female


def emodb(root: Path, options: dict[str, str]) -> _Result:
    """EmoDB: `SSTTTEV` names (speaker, sentence, German emotion initial, version)."""
    result = _Result("emodb", "de")
    for path in _audio_files(root):
        m = EMODB_NAME.match(path.stem)
        if not m:
            result.drop(path, "file name is not SSTTTEV")
            continue
        speaker, sentence, emotion, version = m.groups()
        label = result.label_or_drop(EMODB_EMOTIONS, emotion, options, path, EMODB_WORDS[emotion])
        if label is None:
            continue
        result.keep(
            path,
            label,
            f"emodb-{speaker}",
            gender="male" if speaker in EMODB_MALE else "female",
            original=EMODB_WORDS[emotion],
            sentence=sentence,
        )
    return result


ASED_NAME = re.compile(r"^([nfhsa])([1-5])-(\d\d)-(\d\d)-(\d\d)-(\d\d)$", re.IGNORECASE)
ASED_EMOTIONS = {"n": "neutral", "f": "fearful", "h": "happy", "s": "sad", "a": "angry"}
ASED_NUMBERS = {"n": "1", "f": "2", "h": "3", "s": "4", "a": "5"}
ASED_FOLDER = re.compile(r"^0([1-5])[A-Za-z]+$")
ASED_COMMON_SENTENCES = {"01", "02"}


def ased(root: Path, options: dict[str, str]) -> _Result:
    """ASED v1: `xn-yy-aa-gg-bb` names; the speaker is the (gender gg, number bb) pair."""
    result = _Result("ased", "am")
    for path in _audio_files(root):
        m = ASED_NAME.match(path.stem)
        if not m:
            result.drop(path, "file name is not xn-yy-aa-gg-bb")
            continue
        letter, number, sentence, repetition, gender, speaker = m.groups()
        letter = letter.lower()  # one file is distributed as `S4-...`
        if ASED_NUMBERS[letter] != number:
            result.drop(path, f"emotion letter {letter!r} disagrees with number {number}", letter + number)
            continue
        folder = ASED_FOLDER.match(path.parent.name)
        if folder and folder.group(1) != number:
            result.drop(
                path, f"file name says emotion {number} but its folder is {path.parent.name}", letter + number
            )
            continue
        if gender not in ("01", "02"):
            result.drop(path, f"gender code {gender} is not 01 or 02")
            continue
        g = "F" if gender == "01" else "M"
        result.keep(
            path,
            ASED_EMOTIONS[letter],
            f"ased-{g}{speaker}",
            gender="female" if g == "F" else "male",
            original=ASED_EMOTIONS[letter],
            sentence=sentence,
            # 01-02 were said in all five emotions; 03-07 each in one, so their words give the label away.
            common_sentence=1 if sentence in ASED_COMMON_SENTENCES else 0,
        )
    return result


TESS_NAME = re.compile(r"^(OAF|YAF)_(.+)_(angry|disgust|fear|happy|neutral|ps|sad)$", re.IGNORECASE)
TESS_EMOTIONS = {
    "angry": "angry",
    "disgust": "disgusted",
    "fear": "fearful",
    "happy": "happy",
    "neutral": "neutral",
    "ps": "surprised",  # "pleasant surprise"
    "sad": "sad",
}


def tess(root: Path, options: dict[str, str]) -> _Result:
    """TESS: `SPK_word_emotion` names; two female speakers, OAF (aged 64) and YAF (aged 26)."""
    result = _Result("tess", "en")
    for path in _audio_files(root):
        m = TESS_NAME.match(path.stem)
        if not m:
            result.drop(path, "file name is not SPK_word_emotion (SPK OAF or YAF)")
            continue
        speaker, word, emotion = m.group(1).upper(), m.group(2), m.group(3).lower()
        result.keep(
            path,
            TESS_EMOTIONS[emotion],
            f"tess-{speaker}",
            gender="female",
            original="pleasant surprise" if emotion == "ps" else emotion,
            word=word.lower(),
        )
    return result


TUREV_NAME = re.compile(r"^(\d+)_([a-z]+)_(.+)$", re.IGNORECASE)
TUREV_CODES = {"kz": "angry", "mt": "happy", "hl": "sad"}  # kızgın, mutlu, hüzünlü
TUREV_FOLDERS = {"angry": "kz", "happy": "mt", "sad": "hl"}


def turev(root: Path, options: dict[str, str]) -> _Result:
    """TurEV-DB: `SPEAKER_code_word` names in folders Angry/Happy/Sad; its Calm folder is not neutral."""
    result = _Result("turev", "tr")
    for path in _audio_files(root):
        folder = path.parent.name.lower()
        if folder == "calm":
            result.drop(path, "'calm' is not one of the 7 classes (TurEV-DB's calm is not neutral)", "calm")
            continue
        m = TUREV_NAME.match(path.stem)
        if not m:
            result.drop(path, "file name is not SPEAKER_code_word")
            continue
        speaker, code, word = m.group(1), m.group(2).lower(), m.group(3)
        if code not in TUREV_CODES:
            result.drop(path, f"unknown label code {code!r}", code)
            continue
        if folder in TUREV_FOLDERS and TUREV_FOLDERS[folder] != code:
            result.drop(path, f"file name says {code!r} but its folder is {path.parent.name}", code)
            continue
        label = TUREV_CODES[code]
        result.keep(path, label, f"turev-{speaker}", original=label, word=word)
    return result


TAVA_NAME = re.compile(r"^s(\d+)_([a-z]+)_audio$", re.IGNORECASE)
# 8 of the 16 affect words are one of the 7 classes; the other 8 keep their ratings, unlabelled.
TAVA_AFFECTS = {
    "happy": "happy",
    "joyful": "happy",
    "enraged": "angry",
    "annoyed": "angry",
    "frightened": "fearful",
    "worried": "fearful",
    "depressed": "sad",
    "miserable": "sad",
    **dict.fromkeys(
        ("confident", "contemptuous", "dark", "mellow", "satisfied", "serene", "thrilled", "tranquil")
    ),
}
TAVA_COLUMNS = (
    "Speaker Number",
    "Affect Name",
    "Sex",
    "Variant",
    "meanValence",
    "meanArousal",
    "meanDominance",
)


def _tava_ratings(root: Path) -> dict[tuple[int, str], dict[str, str]]:
    """SummaryData.csv's `speech` rows by (speaker number, affect word); the tEGG rows are another recording."""
    table = _find_one(root, "SummaryData.csv")
    ratings = {}
    with open(table, encoding="utf-8-sig", newline="") as f:
        for rec in _table(f, table, TAVA_COLUMNS):
            if (rec["Variant"] or "").strip().lower() != "speech":
                continue
            try:
                speaker = int(rec["Speaker Number"])
            except ValueError:
                raise CorpusError(
                    f"{table}: speaker number {rec['Speaker Number']!r} is not a number"
                ) from None
            ratings[(speaker, rec["Affect Name"].strip().lower())] = rec
    return ratings


def tava(root: Path, options: dict[str, str], keep_dimensional: bool = True) -> _Result:
    """TAVA: `audio/recordings/sNN_affect_audio` with crowd ratings on [-1, 1] in `annotations/SummaryData.csv`.

    Ratings become (x + 1) / 2. Every rated clip is kept: the 8 affect words outside the 7 classes
    without a label (`keep_dimensional` changes nothing: the ratings are what this corpus is for).
    """
    result = _Result("tava", "en")
    ratings = _tava_ratings(root)
    for path in _audio_files(root):
        m = TAVA_NAME.match(path.stem)
        if not m:
            result.drop(path, "file name is not sNN_affect_audio")
            continue
        speaker, affect = int(m.group(1)), m.group(2).lower()
        if affect not in TAVA_AFFECTS:
            result.drop(path, f"unknown affect word {affect!r}", affect)
            continue
        rec = ratings.get((speaker, affect))
        if rec is None:
            result.drop(path, "no speech row for this clip in SummaryData.csv", affect)
            continue
        dims = {
            "arousal": _scale(rec["meanArousal"], -1, 1),
            "valence": _scale(rec["meanValence"], -1, 1),
            "dominance": _scale(rec["meanDominance"], -1, 1),
        }
        if TAVA_AFFECTS[affect] is None and all(v is None for v in dims.values()):
            result.drop(path, f"'{affect}' is not one of the 7 classes and the clip has no ratings", affect)
            continue
        sex = (rec["Sex"] or "").strip().lower()
        result.keep(
            path,
            TAVA_AFFECTS[affect],
            f"tava-{speaker:02d}",
            gender=sex if sex in ("male", "female") else None,
            original=affect,
            raters=(rec.get("Number of Raters") or "").strip() or None,
            **dims,
        )
    return result


BAVED_NAME = re.compile(r"^(\d+)-([mf])-(\d+)-(\d)-([012])-(\d+)$", re.IGNORECASE)
# LEVEL is a coarse three-step activation label: a proxy for arousal, not a rating of it.
BAVED_AROUSAL = {"0": 0.0, "1": 0.5, "2": 1.0}
BAVED_LEVELS = {"0": "level 0 (low)", "1": "level 1 (neutral)", "2": "level 2 (high)"}


def baved(root: Path, options: dict[str, str], keep_dimensional: bool = True) -> _Result:
    """BAVED: `SPK-GENDER-AGE-WORD-LEVEL-REP` names in folders 0-6 (the word).

    Level 1 is the class neutral; levels 0 and 2 carry no class. Every clip gets arousal
    0 / 0.5 / 1 from its level, a proxy (a speaker's intended activation, not a rating).
    """
    result = _Result("baved", "ar")
    for path in _audio_files(root):
        m = BAVED_NAME.match(path.stem)
        if not m:
            result.drop(path, "file name is not SPK-GENDER-AGE-WORD-LEVEL-REP")
            continue
        speaker, gender, age, word, level, _ = m.groups()
        if path.parent.name.isdigit() and path.parent.name != word:
            result.drop(path, f"file name says word {word} but its folder is {path.parent.name}", level)
            continue
        result.keep(
            path,
            "neutral" if level == "1" else None,
            f"baved-{int(speaker)}",
            gender="male" if gender.lower() == "m" else "female",
            original=BAVED_LEVELS[level],
            arousal=BAVED_AROUSAL[level],
            age=int(age),
            word=word,
            level=int(level),
        )
    return result


# ---------------------------------------------------------------------------------------
# Recipes for the corpora of the paper (not in ../shared/data; layouts as distributed)

CREMAD_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
CREMAD_EMOTIONS = {
    "ANG": "angry",
    "DIS": "disgusted",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}
CREMAD_LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}


def cremad(root: Path, options: dict[str, str]) -> _Result:
    """CREMA-D: `AudioWAV/ActorID_Sentence_Emotion_Level.wav`; sex from VideoDemographics.csv."""
    result = _Result("crema-d", "en")
    sex: dict[str, str] = {}
    demographics = sorted(_walk(root, "VideoDemographics.csv"))
    if demographics:
        with open(demographics[0], encoding="utf-8-sig", newline="") as f:
            for rec in _table(f, demographics[0], ("ActorID", "Sex")):
                actor, s = (rec.get("ActorID") or "").strip(), (rec.get("Sex") or "").strip().lower()
                if actor and s in ("male", "female"):
                    sex[actor] = s
    for path in _audio_files(root):
        m = CREMAD_NAME.match(path.stem)
        if not m:
            result.drop(path, "file name is not ActorID_Sentence_Emotion_Level")
            continue
        actor, sentence, emotion, level = m.groups()
        reason = _missing_reason(path)
        if reason:  # the release has a 0-byte file (1076_MTI_SAD_XX)
            result.drop(path, reason, emotion)
            continue
        label = result.label_or_drop(CREMAD_EMOTIONS, emotion, options, path, emotion)
        if label is None:
            continue
        result.keep(
            path,
            label,
            f"crema-d-{actor}",
            gender=sex.get(actor),
            original=emotion,
            sentence=sentence,
            intensity=CREMAD_LEVELS.get(level, level),
        )
    return result


ESD_EMOTIONS = {
    "neutral": "neutral",
    "angry": "angry",
    "happy": "happy",
    "sad": "sad",
    "surprise": "surprised",
}
ESD_NAME = re.compile(r"^(\d{4})_(\d{6})$")
ESD_SUBSETS = {"train": "train", "evaluation": "dev", "test": "test"}


def esd(root: Path, options: dict[str, str]) -> _Result:
    """ESD: `<speaker>/<Emotion>/[train|evaluation|test/]<speaker>_<utt>.wav`; 0001-0010 Mandarin, 0011-0020 English."""
    result = _Result("esd", None)
    for path in _audio_files(root):
        m = ESD_NAME.match(path.stem)
        if not m:
            result.drop(path, "file name is not <speaker>_<utterance>")
            continue
        speaker, _ = m.groups()
        emotion = next((p.name for p in path.parents if p.name.lower() in ESD_EMOTIONS), None)
        if emotion is None:
            result.drop(path, "no emotion folder (Angry, Happy, Neutral, Sad, Surprise) above the file")
            continue
        subset = ESD_SUBSETS.get(path.parent.name.lower())
        result.keep(
            path,
            ESD_EMOTIONS[emotion.lower()],
            f"esd-{speaker}",
            original=emotion,
            language="zh" if int(speaker) <= 10 else "en",
            official_split=subset,
        )
    return result


MELD_SPLITS = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
MELD_EMOTIONS = {
    "neutral": "neutral",
    "joy": "happy",
    "sadness": "sad",
    "anger": "angry",
    "fear": "fearful",
    "disgust": "disgusted",
    "surprise": "surprised",
}
MELD_MEDIA = re.compile(r"^dia(\d+)_utt(\d+)$")


def _meld_split_of(path: Path, root: Path) -> str | None:
    """train/dev/test from the media folder (train_splits, dev_splits_complete, output_repeated_splits_test)."""
    for part in reversed(path.parent.relative_to(root).parts):
        low = part.lower()
        for split in ("train", "dev", "test"):
            if low.startswith(split) or low.endswith("_" + split) or f"_{split}_" in low:
                return split
    return None


def meld(root: Path, options: dict[str, str]) -> _Result:
    """MELD: `{train,dev,test}_sent_emo.csv` and `dia{D}_utt{U}` media in the per-split folders."""
    result = _Result("meld", "en")
    media: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for f in _audio_files(root):
        if MELD_MEDIA.match(f.stem) and (split := _meld_split_of(f, root)):
            media[(split, f.stem)].append(f)
    found_any = False
    for split, name in MELD_SPLITS.items():
        tables = sorted(_walk(root, name))
        if not tables:
            continue
        found_any = True
        with open(tables[0], encoding="utf-8", errors="replace", newline="") as f:
            for rec in _table(f, tables[0], ("Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")):
                stem = f"dia{rec['Dialogue_ID'].strip()}_utt{rec['Utterance_ID'].strip()}"
                emotion = rec["Emotion"].strip().lower()
                hits = media.get((split, stem))
                where = hits[0] if hits else f"{split}/{stem}"
                if not hits:
                    result.drop(where, "audio file not found", emotion)
                    continue
                path = _prefer_audio(hits)
                reason = _missing_reason(path)
                if reason:
                    result.drop(path, reason, emotion)
                    continue
                label = result.label_or_drop(MELD_EMOTIONS, emotion, options, path, emotion)
                if label is None:
                    continue
                result.keep(
                    path,
                    label,
                    f"meld-{rec['Speaker'].strip()}",
                    original=emotion,
                    split=split,
                    dialogue=rec["Dialogue_ID"].strip(),
                    sentiment=(rec.get("Sentiment") or "").strip() or None,
                )
    if not found_any:
        raise CorpusError(f"{root}: no {', '.join(MELD_SPLITS.values())} found under this folder")
    return result


IEMOCAP_LINE = re.compile(
    r"^\[(\d+(?:\.\d+)?) - (\d+(?:\.\d+)?)\]\t(Ses(\d\d)\w*_([FM])\d+\w*)\t(\w+)\t\[([\d.]+), ([\d.]+), ([\d.]+)\]"
)
IEMOCAP_EMOTIONS = {
    "neu": "neutral",
    "hap": "happy",
    "exc": "option:excited",
    "sad": "sad",
    "ang": "angry",
    "fea": "fearful",
    "dis": "disgusted",
    "sur": "surprised",
    "fru": None,
    "oth": None,
    "xxx": None,
}


def iemocap(root: Path, options: dict[str, str], keep_dimensional: bool = False) -> _Result:
    """IEMOCAP: `Session*/dialog/EmoEvaluation/*.txt` labels, `Session*/sentences/wav/<dialog>/<turn>.wav`."""
    result = _Result("iemocap", "en")
    tables = sorted(p for p in _walk(root, "*.txt") if p.parent.name == "EmoEvaluation")
    if not tables:
        raise CorpusError(f"{root}: no Session*/dialog/EmoEvaluation/*.txt found under this folder")
    wavs = _index_by_stem([p for p in _audio_files(root) if "sentences" in p.relative_to(root).parts])
    for table in tables:
        with open(table, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = IEMOCAP_LINE.match(line.strip("\n"))
                if not m:
                    continue
                _, _, turn, session, sex, emotion, val, act, dom = m.groups()
                hits = wavs.get(turn)
                if not hits:
                    result.drop(turn, "audio file not found", emotion)
                    continue
                path = _prefer_audio(hits)
                dims = {
                    "arousal": _scale(act, 1, 5),
                    "valence": _scale(val, 1, 5),
                    "dominance": _scale(dom, 1, 5),
                }
                label, why = _map_label(IEMOCAP_EMOTIONS, emotion, options, emotion)
                # with --keep-dimensional, a known label outside the 7 is kept, unlabelled, for its ratings
                if why and not (keep_dimensional and emotion in IEMOCAP_EMOTIONS):
                    result.drop(path, why, emotion)
                    continue
                result.keep(
                    path,
                    label,
                    f"iemocap-Ses{session}{sex}",
                    gender="female" if sex == "F" else "male",
                    original=emotion,
                    session=int(session),
                    improvised=1 if "_impro" in turn else 0,
                    **dims,
                )
    return result


MSP_EMOTIONS = {
    "N": "neutral",
    "H": "happy",
    "S": "sad",
    "A": "angry",
    "F": "fearful",
    "D": "disgusted",
    "U": "surprised",
    "C": "option:contempt",
    "O": None,
    "X": None,
}
MSP_WORDS = {
    "N": "neutral",
    "H": "happy",
    "S": "sad",
    "A": "angry",
    "F": "fear",
    "D": "disgust",
    "U": "surprise",
    "C": "contempt",
    "O": "other",
    "X": "no agreement",
}
MSP_SPLITS = {"train": "train", "development": "dev", "test1": "test", "test2": "test2", "test3": "test3"}


def msp_podcast(root: Path, options: dict[str, str], keep_dimensional: bool = False) -> _Result:
    """MSP-Podcast: `Labels/labels_consensus.csv` (FileName, EmoClass, EmoAct/Val/Dom 1-7, SpkrID, Gender, Split_Set)."""
    result = _Result("msp-podcast", "en")
    table = _find_one(root, "labels_consensus.csv")
    audio = {p.name: p for p in _audio_files(root)}
    with open(table, encoding="utf-8-sig", newline="") as f:
        for rec in _table(f, table, ("FileName", "EmoClass")):
            name = rec["FileName"].strip()
            code = (rec.get("EmoClass") or "").strip().upper()
            path = audio.get(name) or audio.get(Path(name).stem + ".wav")
            if path is None:
                result.drop(name, "audio file not found", MSP_WORDS.get(code, code))
                continue
            dims = {
                "arousal": _scale(rec.get("EmoAct"), 1, 7),
                "valence": _scale(rec.get("EmoVal"), 1, 7),
                "dominance": _scale(rec.get("EmoDom"), 1, 7),
            }
            if code:
                label, why = _map_label(MSP_EMOTIONS, code, options, MSP_WORDS.get(code, code))
            else:
                label, why = None, "no emotion class (hidden test labels)"
            keep_unlabelled = (
                keep_dimensional and (code in MSP_EMOTIONS or not code) and dims["arousal"] is not None
            )
            if why and not keep_unlabelled:
                result.drop(path, why, MSP_WORDS.get(code, code))
                continue
            speaker = (rec.get("SpkrID") or "").strip()
            gender = (rec.get("Gender") or "").strip().lower()
            official = (rec.get("Split_Set") or "").strip()
            result.keep(
                path,
                label,
                None if speaker.lower() in ("", "unknown") else f"msp-podcast-{speaker}",
                gender=gender if gender in ("male", "female") else None,
                original=MSP_WORDS.get(code, code),
                split=MSP_SPLITS.get(official.lower(), official.lower() or None),
                **dims,
            )
    return result


M3ED_EMOTIONS = {
    "neutral": "neutral",
    "happy": "happy",
    "sad": "sad",
    "anger": "angry",
    "fear": "fearful",
    "disgust": "disgusted",
    "surprise": "surprised",
}
M3ED_SPLITS = {"train": "train", "val": "dev", "test": "test"}


def m3ed(root: Path, options: dict[str, str]) -> _Result:
    """M3ED: `annotation.json` (movie -> dialog -> utterances), `splitInfo/movie_list_{train,val,test}.txt`,
    one audio file per utterance named `<Speaker>_<utterance id>` or `<utterance id>`."""
    result = _Result("m3ed", "zh")
    with open(_find_one(root, "annotation.json"), encoding="utf-8") as f:
        annotation = json.load(f)
    movie_split: dict[str, str] = {}
    for name, split in M3ED_SPLITS.items():
        for lst in sorted(_walk(root, f"movie_list_{name}.txt")):
            for line in lst.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    movie_split[line.strip()] = split
    audio = _index_by_stem(_audio_files(root))
    for movie, dialogs in annotation.items():
        for dialog in dialogs.values():
            speakers = dialog.get("SpeakerInfo", {})
            for utt_id, utt in dialog.get("Dialog", {}).items():
                spk = utt.get("Speaker", "")
                emotion = utt.get("EmoAnnotation", {}).get("final_main_emo", "")
                if isinstance(emotion, list):
                    emotion = emotion[0] if emotion else ""
                emotion = str(emotion).strip()
                hits = audio.get(f"{spk}_{utt_id}") or audio.get(utt_id)
                if not hits:
                    result.drop(f"{movie}/{utt_id}", "audio file not found", emotion)
                    continue
                path = _prefer_audio(hits)
                label = result.label_or_drop(M3ED_EMOTIONS, emotion.lower(), options, path, emotion)
                if label is None:
                    continue
                info = speakers.get(spk, {}) if isinstance(speakers, dict) else {}
                name = info.get("Name") or spk
                gender = str(info.get("Gender", "")).strip().lower()
                result.keep(
                    path,
                    label,
                    f"m3ed-{movie}-{name}",
                    gender={"male": "male", "female": "female", "m": "male", "f": "female"}.get(gender),
                    original=emotion,
                    split=movie_split.get(movie),
                    movie=movie,
                )
    return result


INDOWAVE_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
INDOWAVE_EMOTIONS = {
    "01": "neutral",
    "02": "happy",
    "03": "surprised",
    "04": "disgusted",
    "05": "option:disappointed",
}
INDOWAVE_WORDS = {"01": "neutral", "02": "happy", "03": "surprise", "04": "disgust", "05": "disappointed"}


def indowave(root: Path, options: dict[str, str]) -> _Result:
    """IndoWaveSentiment: `AA-EE-II-RR.wav` (actor, emotion, intensity, repetition); odd actors male."""
    result = _Result("indowavesentiment", "id")
    for path in _audio_files(root):
        m = INDOWAVE_NAME.match(path.stem)
        if not m:
            result.drop(path, "file name is not AA-EE-II-RR")
            continue
        actor, emotion, intensity, _ = m.groups()
        label = result.label_or_drop(
            INDOWAVE_EMOTIONS, emotion, options, path, INDOWAVE_WORDS.get(emotion, emotion)
        )
        if label is None:
            continue
        result.keep(
            path,
            label,
            f"indowavesentiment-{actor}",
            gender="male" if int(actor) % 2 else "female",
            original=INDOWAVE_WORDS[emotion],
            intensity="strong" if intensity == "02" else "normal",
        )
    return result


@dataclass(frozen=True)
class Recipe:
    prepare: Callable[..., _Result]
    options: tuple[str, ...] = ()  # label options (see OPTIONS) that apply
    official_split: bool = False  # the corpus ships a split; used unless --split speaker
    dimensional: bool = False  # has arousal/valence/dominance ratings
    group: str | None = None  # extra column whose value groups speakers that share dialogues


RECIPES: dict[str, Recipe] = {
    "ravdess": Recipe(ravdess, ("calm",)),
    "emodb": Recipe(emodb, ("boredom",)),
    "ased": Recipe(ased),
    "tess": Recipe(tess),
    "turev": Recipe(turev),
    "tava": Recipe(tava, dimensional=True),
    "baved": Recipe(baved, dimensional=True),
    "crema-d": Recipe(cremad),
    "esd": Recipe(esd),
    "meld": Recipe(meld, official_split=True),
    "m3ed": Recipe(m3ed, official_split=True),
    "iemocap": Recipe(iemocap, ("excited",), dimensional=True, group="session"),
    "msp-podcast": Recipe(msp_podcast, ("contempt",), official_split=True, dimensional=True),
    "indowavesentiment": Recipe(indowave, ("disappointed",)),
}


# ---------------------------------------------------------------------------------------
# Speaker-disjoint splits

# The defaults are the split the bundled default model was trained with (MODEL_CARD.md, "Data"), so
# that a manifest's "test" holds no speaker it was trained on.
SPLIT_SEED = 0
DEV_FRACTION = 0.1
TEST_FRACTION = 0.1
MIN_DEV_SPEAKERS = 4  # a dev score judged on more than one or two voices, where the corpus has them
# A corpus of fewer speakers (units) gets no test split unless a test fraction is given: once dev has
# its 4, one more held out would leave train one or two voices (EmoDB's 6 speakers, TurEV-DB's 5).
MIN_TEST_CORPUS_SPEAKERS = 10


def _match_speakers(requested: list[str], known: set[str], corpus: str) -> set[str]:
    """Speaker ids from the command line; the corpus prefix (`ravdess-`) may be left out."""
    out = set()
    for s in requested:
        for candidate in (s, f"{corpus}-{s}"):
            if candidate in known:
                out.add(candidate)
                break
        else:
            raise ValueError(f"unknown speaker {s!r}; the speakers are: {', '.join(sorted(known))}")
    return out


def assign_splits(
    rows: list[ManifestRow],
    *,
    dev_fraction: float = DEV_FRACTION,
    test_fraction: float | None = None,
    seed: int = SPLIT_SEED,
    dev_speakers: list[str] | None = None,
    test_speakers: list[str] | None = None,
    group: str | None = None,
    min_dev_speakers: int = MIN_DEV_SPEAKERS,
) -> None:
    """Set each row's split to train/dev/test by speaker, in place (see docs/data.md for the rule).

    Speakers sharing a value of the extra column `group` (IEMOCAP sessions) move together. Dev
    gets at least `min_dev_speakers` where the corpus can spare them (train keeps one). A
    `test_fraction` of None is `TEST_FRACTION` for a corpus of at least `MIN_TEST_CORPUS_SPEAKERS`
    speakers and 0 for a smaller one.
    """
    given_test = TEST_FRACTION if test_fraction is None else test_fraction
    if not 0 <= dev_fraction < 1 or not 0 <= given_test < 1 or dev_fraction + given_test >= 1:
        raise ValueError("--dev-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
    if min_dev_speakers < 0:
        raise ValueError("--min-dev-speakers must be 0 or more")
    corpus = rows[0].corpus if rows else ""
    unit_of: dict[str, str] = {}
    gender_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.speaker is None:
            continue
        unit = str(row.extra.get(group, row.speaker)) if group else row.speaker
        unit_of[row.speaker] = unit
        gender_of[unit].add(str(row.extra.get("gender") or ""))
    units = sorted(set(unit_of.values()))
    if test_fraction is None:
        test_fraction = TEST_FRACTION if len(units) >= MIN_TEST_CORPUS_SPEAKERS else 0.0
    fixed: dict[str, str] = {}
    for split, requested in (("test", test_speakers), ("dev", dev_speakers)):
        for speaker in _match_speakers(requested or [], set(unit_of), corpus):
            unit = unit_of[speaker]
            if fixed.get(unit, split) != split:
                raise ValueError(f"speaker {speaker} is asked for both dev and test")
            fixed[unit] = split

    # Shuffle within each gender, then interleave the genders, so dev and test are mixed.
    rng = random.Random(seed)
    strata: dict[str, list[str]] = defaultdict(list)
    for unit in units:
        if unit not in fixed:
            genders = gender_of[unit]
            strata[next(iter(genders)) if len(genders) == 1 else ""].append(unit)
    for key in sorted(strata):
        rng.shuffle(strata[key])
    order: list[str] = []
    queues = [strata[k] for k in sorted(strata)]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))

    def wanted(fraction: float, at_least: int = 0) -> int:
        if len(units) < 3 or fraction <= 0:  # a fraction of 0: no such split, whatever the minimum
            return 0
        return max(at_least, max(1, round(fraction * len(units))))

    split_of = dict(fixed)
    for split, count, explicit in (
        ("test", wanted(test_fraction), test_speakers),
        ("dev", wanted(dev_fraction, min_dev_speakers), dev_speakers),
    ):
        if explicit:
            continue  # an explicit list is the whole of that split
        for _ in range(count - sum(1 for s in split_of.values() if s == split)):
            if len(order) > 1:  # never leave train empty
                split_of[order.pop(0)] = split
    for unit in order:
        split_of[unit] = "train"
    for row in rows:
        row.split = split_of[unit_of[row.speaker]] if row.speaker is not None else "train"


# ---------------------------------------------------------------------------------------
# Preparing a corpus


def prepare_corpus(
    corpus: str,
    root: str | os.PathLike,
    *,
    split: str = "auto",
    dev_speakers: list[str] | None = None,
    test_speakers: list[str] | None = None,
    dev_fraction: float = DEV_FRACTION,
    test_fraction: float | None = None,
    seed: int = SPLIT_SEED,
    min_dev_speakers: int = MIN_DEV_SPEAKERS,
    keep_dimensional: bool = False,
    **label_options: str | None,
) -> tuple[list[ManifestRow], list[Dropped]]:
    """Rows (sorted by path) and dropped files of one corpus; `label_options` are e.g. calm='neutral'."""
    if corpus not in RECIPES:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[corpus]
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(f"{root}: corpus folder not found")
    root = root.resolve()
    options = {k: v for k, v in label_options.items() if v is not None}
    for name, value in options.items():
        if name not in OPTIONS:
            raise ValueError(f"unknown label option {name!r}")
        if name not in recipe.options:
            raise ValueError(f"--{name} does not apply to {corpus} (it has no '{name}' label)")
        if value not in OPTIONS[name][0]:
            raise ValueError(f"--{name} must be one of {', '.join(OPTIONS[name][0])}, not {value!r}")
    if keep_dimensional and not recipe.dimensional:
        raise ValueError(f"--keep-dimensional does not apply to {corpus} (it has no dimensional ratings)")
    if split not in ("auto", "speaker", "official"):
        raise ValueError(f"split must be auto, speaker or official, not {split!r}")
    if split == "official" and not recipe.official_split:
        raise ValueError(f"{corpus} has no official split; use --split speaker")
    use_official = recipe.official_split and split != "speaker"
    if use_official and (dev_speakers or test_speakers):
        raise ValueError(
            f"--dev-speakers/--test-speakers need --split speaker ({corpus} uses its official split)"
        )

    if recipe.dimensional:
        result = recipe.prepare(root, options, keep_dimensional=keep_dimensional)
    else:
        result = recipe.prepare(root, options)
    if not result.rows and not result.dropped:
        raise CorpusError(f"{root}: no {corpus} audio files found under this folder")
    rows = sorted(result.rows, key=lambda r: (r.path, r.start or 0.0))
    if not use_official:
        assign_splits(
            rows,
            dev_fraction=dev_fraction,
            test_fraction=test_fraction,
            seed=seed,
            dev_speakers=dev_speakers,
            test_speakers=test_speakers,
            group=recipe.group,
            min_dev_speakers=min_dev_speakers,
        )
    return rows, sorted(result.dropped, key=lambda d: d.path)


def split_warnings(rows: list[ManifestRow]) -> list[str]:
    """A line for each of dev and test that came out empty (too few speakers, or none named)."""
    speakers = len({r.speaker for r in rows if r.speaker is not None})
    empty = [s for s in ("dev", "test") if not any(r.split == s for r in rows)]
    if not empty or not rows:
        return []
    return [
        f"warning: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
        f"({len(rows)} clips, {speakers} speakers): pass --dev-speakers/--test-speakers, larger "
        "--dev-fraction/--test-fraction, or score on another corpus"
    ]


def dropped_path(manifest: str | os.PathLike) -> Path:
    """Where the list of dropped files goes: `<manifest without extension>.dropped.csv`."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.stem + ".dropped.csv")


def write_dropped(dropped: list[Dropped], path: str | os.PathLike, overwrite: bool = False) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "reason", "original_label"])
    for d in dropped:
        writer.writerow([d.path, d.reason, d.original_label])
    atomic_write_text(path, out.getvalue(), overwrite=overwrite)


def summary(rows: list[ManifestRow], dropped: list[Dropped]) -> str:
    """A few lines: clips and speakers per split, labels, drop reasons."""
    lines = []
    by_split: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        by_split[row.split or "-"].append(row)
    for split in sorted(by_split, key=lambda s: ({"train": 0, "dev": 1, "test": 2}.get(s, 3), s)):
        part = by_split[split]
        speakers = {r.speaker for r in part if r.speaker}
        labels = Counter(r.label or "(none)" for r in part)
        counts = ", ".join(f"{k} {labels[k]}" for k in [*EMOTIONS, "(none)"] if labels[k])
        lines.append(f"  {split}: {len(part)} clips, {len(speakers)} speakers ({counts})")
    reasons = Counter(d.reason for d in dropped)
    for reason, n in reasons.most_common():
        lines.append(f"  dropped {n}: {reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# CLI: serval data prepare / serval data check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser(
        "prepare", help="write a manifest for a corpus", description="Write a manifest for a corpus."
    )
    p.add_argument("corpus", choices=sorted(RECIPES), help="which corpus ROOT holds")
    p.add_argument("root", type=Path, help="the corpus folder, as distributed")
    p.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.csv or .jsonl)")
    p.add_argument(
        "--split",
        choices=("auto", "speaker", "official"),
        default="auto",
        help="speaker: seeded speaker-disjoint split; official: the corpus's own "
        "(meld, m3ed, msp-podcast); auto: official where there is one (default)",
    )
    p.add_argument("--dev-speakers", nargs="+", metavar="SPEAKER", help="these speakers form the dev set")
    p.add_argument("--test-speakers", nargs="+", metavar="SPEAKER", help="these speakers form the test set")
    p.add_argument(
        "--dev-fraction",
        type=float,
        default=DEV_FRACTION,
        help=f"share of speakers for dev (default {DEV_FRACTION})",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help=f"share of speakers for test (default {TEST_FRACTION}; 0 for a corpus of fewer than "
        f"{MIN_TEST_CORPUS_SPEAKERS} speakers)",
    )
    p.add_argument(
        "--seed", type=int, default=SPLIT_SEED, help=f"seed of the speaker split (default {SPLIT_SEED})"
    )
    p.add_argument(
        "--min-dev-speakers",
        type=int,
        default=MIN_DEV_SPEAKERS,
        metavar="N",
        help=f"dev gets at least N speakers where the corpus can spare them (default {MIN_DEV_SPEAKERS}; "
        "0: the fraction alone)",
    )
    for name, (choices, default) in OPTIONS.items():
        applies = ", ".join(c for c, r in RECIPES.items() if name in r.options)
        p.add_argument(
            f"--{name}", choices=choices, default=None, help=f"{applies}: '{name}' clips (default {default})"
        )
    p.add_argument(
        "--keep-dimensional",
        action="store_true",
        help="iemocap, msp-podcast: keep clips outside the 7 classes, unlabelled, for their A/V/D ratings "
        "(tava and baved always keep them)",
    )
    p.add_argument(
        "--check", action="store_true", help="also read every audio header (as `serval data check`)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing manifest")

    c = sub.add_parser(
        "check", help="list every problem of a manifest", description="List every problem of a manifest."
    )
    c.add_argument("manifest", type=Path, nargs="+", help="manifest(s) to check")
    c.add_argument("--no-audio", action="store_true", help="check the values only, do not open audio files")

    m = sub.add_parser(
        "merge", help="join manifests into one", description="Join manifests (e.g. several corpora) into one."
    )
    m.add_argument("manifest", type=Path, nargs="+", help="manifests to join, in order")
    m.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.csv or .jsonl)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing manifest")


def _run_prepare(args: argparse.Namespace) -> int:
    try:
        manifest_format(args.output)
        dropped_file = dropped_path(args.output)
        for target in (args.output, dropped_file):
            if target.exists() and not args.overwrite:
                print(f"{target}: already exists (pass --overwrite to replace it)", file=sys.stderr)
                return 1
        rows, dropped = prepare_corpus(
            args.corpus,
            args.root,
            split=args.split,
            dev_speakers=args.dev_speakers,
            test_speakers=args.test_speakers,
            dev_fraction=args.dev_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            min_dev_speakers=args.min_dev_speakers,
            keep_dimensional=args.keep_dimensional,
            **{name: getattr(args, name) for name in OPTIONS},
        )
    except (ValueError, OSError) as e:
        print(f"serval data prepare: {e}", file=sys.stderr)
        return 1
    write_manifest(rows, args.output, overwrite=args.overwrite)
    write_dropped(dropped, dropped_file, overwrite=args.overwrite)
    print(
        f"{args.output}: {len(rows)} clips of {args.corpus}; {len(dropped)} dropped (listed in {dropped_file})"
    )
    print(summary(rows, dropped))
    for line in split_warnings(rows):
        print(f"serval data prepare: {line}", file=sys.stderr)
    if args.check:
        return _report(args.output, check_manifest(args.output))
    return 0


def _report(manifest: Path, problems) -> int:
    for p in problems:
        print(p.format(manifest))
    if problems:
        print(f"{manifest}: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _run_merge(args: argparse.Namespace) -> int:
    try:
        rows, seen = [], {}
        for source in args.manifest:
            for row in read_manifest(source):
                key = (str(row.path), row.start, row.end)
                if key in seen:
                    raise ValueError(
                        f"{row.path} ({row.start}-{row.end}) is in {seen[key]} and again in {source}"
                    )
                seen[key] = source
                rows.append(row)
        write_manifest(rows, args.output, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"serval data merge: {e}", file=sys.stderr)
        return 1
    print(f"{args.output}: {len(rows)} rows from {len(args.manifest)} manifests")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        return _run_prepare(args)
    if args.data_command == "merge":
        return _run_merge(args)
    status = 0
    for manifest in args.manifest:
        bad = _report(manifest, check_manifest(manifest, check_audio=not args.no_audio))
        if not bad:
            print(f"{manifest}: ok")
        status |= bad
    return status
