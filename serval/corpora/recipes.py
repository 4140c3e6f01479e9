"""The corpus recipes as data: one `Rule` per corpus in `RULES`, applied by `rules.Collector`.

A rule names the corpus's files (a pattern and a `parse` function that reads one name) or its
metadata reader (`metadata.py`), its label mapping (`labels.py`) and its language. The mappings and
the reasons behind them are documented in docs/data.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from serval.corpora import labels, metadata
from serval.corpora.files import missing_reason, scale
from serval.corpora.rules import Record, Rule, Skip


def _odd_male(number: str) -> str:
    return "male" if int(number) % 2 else "female"


def _intensity(code: str) -> str:
    return "strong" if code == "02" else "normal"


RAVDESS_NAME = re.compile(
    r"^(?P<modality>\d\d)-(?P<channel>\d\d)-(?P<emotion>\d\d)-(?P<intensity>\d\d)"
    r"-(?P<statement>\d\d)-(?P<repetition>\d\d)-(?P<actor>\d\d)$"
)


def _ravdess(g: dict[str, str], path: Path, context: None) -> Record | Skip:
    original = labels.RAVDESS_WORDS.get(g["emotion"], g["emotion"])
    if g["channel"] != "01":
        return Skip("song (vocal channel 02), not speech", original)
    if g["modality"] != "03":  # 01 audio-video, 02 video-only: the audio-only release (03) is the one to use
        return Skip(f"modality {g['modality']} is not audio-only (03)", original)
    return {
        "code": g["emotion"],
        "speaker": f"ravdess-{g['actor']}",
        "gender": _odd_male(g["actor"]),
        "intensity": _intensity(g["intensity"]),
        "sentence": g["statement"],
    }


EMODB_NAME = re.compile(r"^(?P<speaker>\d\d)(?P<sentence>[a-b]\d\d)(?P<emotion>[WLEAFTN])(?P<version>[a-z])$")
EMODB_MALE = {"03", "10", "11", "12", "15"}  # the other five (08, 09, 13, 14, 16) are female


def _emodb(g: dict[str, str], path: Path, context: None) -> Record:
    return {
        "code": g["emotion"],
        "speaker": f"emodb-{g['speaker']}",
        "gender": "male" if g["speaker"] in EMODB_MALE else "female",
        "sentence": g["sentence"],
    }


ASED_NAME = re.compile(
    r"^(?P<letter>[nfhsa])(?P<number>[1-5])-(?P<sentence>\d\d)-(?P<repetition>\d\d)"
    r"-(?P<gender>\d\d)-(?P<speaker>\d\d)$",
    re.IGNORECASE,
)
ASED_NUMBERS = {"n": "1", "f": "2", "h": "3", "s": "4", "a": "5"}
ASED_FOLDER = re.compile(r"^0([1-5])[A-Za-z]+$")
ASED_COMMON_SENTENCES = {"01", "02"}


def _ased(g: dict[str, str], path: Path, context: None) -> Record | Skip:
    letter, number = g["letter"].lower(), g["number"]  # one file is distributed as `S4-...`
    if ASED_NUMBERS[letter] != number:
        return Skip(f"emotion letter {letter!r} disagrees with number {number}", letter + number)
    folder = ASED_FOLDER.match(path.parent.name)
    if folder and folder.group(1) != number:
        return Skip(f"file name says emotion {number} but its folder is {path.parent.name}", letter + number)
    if g["gender"] not in ("01", "02"):
        return Skip(f"gender code {g['gender']} is not 01 or 02")
    sex = "F" if g["gender"] == "01" else "M"
    return {
        "code": letter,
        "speaker": f"ased-{sex}{g['speaker']}",
        "gender": "female" if sex == "F" else "male",
        "sentence": g["sentence"],
        # 01-02 were said in all five emotions; 03-07 each in one, so their words give the label away.
        "common_sentence": 1 if g["sentence"] in ASED_COMMON_SENTENCES else 0,
    }


TESS_NAME = re.compile(
    r"^(?P<speaker>OAF|YAF)_(?P<word>.+)_(?P<emotion>angry|disgust|fear|happy|neutral|ps|sad)$", re.IGNORECASE
)


def _tess(g: dict[str, str], path: Path, context: None) -> Record:
    """Two female speakers, OAF (aged 64) and YAF (aged 26)."""
    return {
        "code": g["emotion"].lower(),
        "speaker": f"tess-{g['speaker'].upper()}",
        "gender": "female",
        "word": g["word"].lower(),
    }


TUREV_NAME = re.compile(r"^(?P<speaker>\d+)_(?P<code>[a-z]+)_(?P<word>.+)$", re.IGNORECASE)
TUREV_FOLDERS = {"angry": "kz", "happy": "mt", "sad": "hl", "calm": "sk"}


def _turev_calm(path: Path) -> Skip | None:
    if path.parent.name.lower() == "calm":
        return Skip("'calm' is not one of the 7 classes (TurEV-DB's calm is not neutral)", "calm")
    return None


def _turev(g: dict[str, str], path: Path, context: None) -> Record:
    return {"code": g["code"].lower(), "speaker": f"turev-{g['speaker']}", "word": g["word"]}


def _turev_folder(record: Record, path: Path) -> Skip | None:
    """A code that disagrees with its folder (Angry, Happy, Sad, Calm)."""
    folder, code = path.parent.name.lower(), record["code"]
    if folder in TUREV_FOLDERS and TUREV_FOLDERS[folder] != code:
        return Skip(f"file name says {code!r} but its folder is {path.parent.name}", code)
    return None


TAVA_NAME = re.compile(r"^s(?P<speaker>\d+)_(?P<affect>[a-z]+)_audio$", re.IGNORECASE)


def _tava(g: dict[str, str], path: Path, ratings: dict[tuple[int, str], dict[str, str]]) -> Record:
    """Crowd ratings on [-1, 1] become (x + 1) / 2."""
    speaker, affect = int(g["speaker"]), g["affect"].lower()
    record: Record = {"code": affect, "speaker": f"tava-{speaker:02d}"}
    rec = ratings.get((speaker, affect))
    if rec is None:
        return record | {"_rated": False}
    sex = (rec["Sex"] or "").strip().lower()
    return record | {
        "_rated": True,
        "gender": sex if sex in ("male", "female") else None,
        "raters": (rec.get("Number of Raters") or "").strip() or None,
        "arousal": scale(rec["meanArousal"], -1, 1),
        "valence": scale(rec["meanValence"], -1, 1),
        "dominance": scale(rec["meanDominance"], -1, 1),
    }


def _tava_rated(record: Record, path: Path) -> Skip | None:
    return (
        None if record["_rated"] else Skip("no speech row for this clip in SummaryData.csv", record["code"])
    )


BAVED_NAME = re.compile(
    r"^(?P<speaker>\d+)-(?P<gender>[mf])-(?P<age>\d+)-(?P<word>\d)-(?P<level>[012])-(?P<repetition>\d+)$",
    re.IGNORECASE,
)
# LEVEL is a coarse three-step activation label: a proxy for arousal, not a rating of it.
BAVED_AROUSAL = {"0": 0.0, "1": 0.5, "2": 1.0}


def _baved(g: dict[str, str], path: Path, context: None) -> Record | Skip:
    """Every clip gets arousal 0 / 0.5 / 1 from its level (a speaker's intended activation, not a rating)."""
    word, level = g["word"], g["level"]
    if path.parent.name.isdigit() and path.parent.name != word:
        return Skip(f"file name says word {word} but its folder is {path.parent.name}", level)
    return {
        "code": level,
        "speaker": f"baved-{int(g['speaker'])}",
        "gender": "male" if g["gender"].lower() == "m" else "female",
        "arousal": BAVED_AROUSAL[level],
        "age": int(g["age"]),
        "word": word,
        "level": int(level),
    }


CREMAD_NAME = re.compile(
    r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{2})$"
)
CREMAD_LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}


def _cremad(g: dict[str, str], path: Path, sexes: dict[str, str]) -> Record | Skip:
    if reason := missing_reason(path):  # the release has a 0-byte file (1076_MTI_SAD_XX)
        return Skip(reason, g["emotion"])
    return {
        "code": g["emotion"],
        "speaker": f"crema-d-{g['actor']}",
        "gender": sexes.get(g["actor"]),
        "sentence": g["sentence"],
        "intensity": CREMAD_LEVELS.get(g["level"], g["level"]),
    }


ESD_NAME = re.compile(r"^(?P<speaker>\d{4})_(?P<utterance>\d{6})$")
ESD_SUBSETS = {"train": "train", "evaluation": "dev", "test": "test"}


def _esd(g: dict[str, str], path: Path, context: None) -> Record | Skip:
    """The emotion from the folder above; speakers 0001-0010 Mandarin, 0011-0020 English."""
    emotion = next((p.name for p in path.parents if p.name.lower() in labels.ESD_EMOTIONS), None)
    if emotion is None:
        return Skip("no emotion folder (Angry, Happy, Neutral, Sad, Surprise) above the file")
    return {
        "code": emotion.lower(),
        "original": emotion,
        "speaker": f"esd-{g['speaker']}",
        "language": "zh" if int(g["speaker"]) <= 10 else "en",
        "official_split": ESD_SUBSETS.get(path.parent.name.lower()),
    }


INDOWAVE_NAME = re.compile(r"^(?P<actor>\d\d)-(?P<emotion>\d\d)-(?P<intensity>\d\d)-(?P<repetition>\d\d)$")


def _indowave(g: dict[str, str], path: Path, context: None) -> Record:
    return {
        "code": g["emotion"],
        "speaker": f"indowavesentiment-{g['actor']}",
        "gender": _odd_male(g["actor"]),
        "intensity": _intensity(g["intensity"]),
    }


RULES: dict[str, Rule] = {
    "ravdess": {
        "language": "en",
        "name": RAVDESS_NAME,
        "form": "MM-VV-EE-II-SS-RR-AA",
        "parse": _ravdess,
        "labels": labels.RAVDESS_EMOTIONS,
        "words": labels.RAVDESS_WORDS,
        "own": {"02": "calm"},
        "options": ("calm",),
    },
    "emodb": {
        "language": "de",
        "name": EMODB_NAME,
        "form": "SSTTTEV",
        "parse": _emodb,
        "labels": labels.EMODB_EMOTIONS,
        "words": labels.EMODB_WORDS,
        "own": {"L": "boredom"},
        "options": ("boredom",),
    },
    "ased": {
        "language": "am",
        "name": ASED_NAME,
        "form": "xn-yy-aa-gg-bb",
        "parse": _ased,
        "labels": labels.ASED_EMOTIONS,
        "words": labels.ASED_EMOTIONS,
    },
    "tess": {
        "language": "en",
        "name": TESS_NAME,
        "form": "SPK_word_emotion (SPK OAF or YAF)",
        "parse": _tess,
        "labels": labels.TESS_EMOTIONS,
        "words": labels.TESS_WORDS,
    },
    "turev": {
        "language": "tr",
        "skip": _turev_calm,
        "name": TUREV_NAME,
        "form": "SPEAKER_code_word",
        "parse": _turev,
        "after": _turev_folder,
        "labels": labels.TUREV_CODES,
        "words": labels.TUREV_WORDS,
        "own": {"sk": "calm"},
    },
    "tava": {
        "language": "en",
        "context": metadata.tava_ratings,
        "name": TAVA_NAME,
        "form": "sNN_affect_audio",
        "parse": _tava,
        "after": _tava_rated,
        "labels": labels.TAVA_AFFECTS,
        "own": {word: word for word in labels.TAVA_AFFECTS},
        "unknown": "unknown affect word {!r}",
        "unlabelled": "rated",  # every rated clip is kept: the ratings are what this corpus is for
        "dimensional": True,
    },
    "baved": {
        "language": "ar",
        "name": BAVED_NAME,
        "form": "SPK-GENDER-AGE-WORD-LEVEL-REP",
        "parse": _baved,
        "labels": labels.BAVED_CLASSES,
        "words": labels.BAVED_LEVELS,
        "own": {"0": "low", "1": "neutral", "2": "high"},
        "unlabelled": "rated",
        "dimensional": True,
    },
    "crema-d": {
        "language": "en",
        "context": metadata.cremad_sexes,
        "name": CREMAD_NAME,
        "form": "ActorID_Sentence_Emotion_Level",
        "parse": _cremad,
        "labels": labels.CREMAD_EMOTIONS,
    },
    "esd": {
        "language": None,
        "name": ESD_NAME,
        "form": "<speaker>_<utterance>",
        "parse": _esd,
        "labels": labels.ESD_EMOTIONS,
    },
    "meld": {
        "language": "en",
        "records": metadata.meld_records,
        "labels": labels.MELD_EMOTIONS,
        "official_split": True,
    },
    "m3ed": {
        "language": "zh",
        "records": metadata.m3ed_records,
        "labels": labels.M3ED_EMOTIONS,
        "official_split": True,
    },
    "iemocap": {
        "language": "en",
        "records": metadata.iemocap_records,
        "labels": labels.IEMOCAP_EMOTIONS,
        "own": {"exc": "excited", "fru": "frustrated", "oth": "other"},  # xxx: no majority, no label
        "options": ("excited",),
        "unlabelled": "dimensional",
        "dimensional": True,
        "group": "session",
    },
    "msp-podcast": {
        "language": "en",
        "records": metadata.msp_records,
        "labels": labels.MSP_EMOTIONS,
        "words": labels.MSP_WORDS,
        "own": {"C": "contempt", "O": "other"},  # X: no agreement, no label
        "options": ("contempt",),
        "missing": "no emotion class (hidden test labels)",
        "unlabelled": "dimensional",
        "official_split": True,
        "dimensional": True,
    },
    "indowavesentiment": {
        "language": "id",
        "name": INDOWAVE_NAME,
        "form": "AA-EE-II-RR",
        "parse": _indowave,
        "labels": labels.INDOWAVE_EMOTIONS,
        "words": labels.INDOWAVE_WORDS,
        "own": {"05": "disappointed"},
        "options": ("disappointed",),
    },
    "nemo": {"language": "pl", "records": metadata.nemo_records, "labels": labels.NEMO_EMOTIONS},
}
