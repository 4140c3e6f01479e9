"""Each corpus's label codes, what they map to among the 7 classes, and the corpus's own label names.

A mapping value is one of the 7 classes, None (not one of them: the clip is dropped, or kept without a
class where the recipe keeps unlabelled clips), or "option:NAME" (decided by the --NAME option, see
OPTIONS). With --keep-labels a code takes its own name instead: the class's name where the code is
one of the 7 (EmoDB's anger is `angry`), else the corpus's word for it (a rule's `own`: calm, boredom).
"""

from __future__ import annotations

from collections.abc import Mapping

from serval.vocab import EMOTIONS

# label options: name -> (choices, default); a choice is 'drop' or one of the 7 classes.
OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "calm": (("drop", "neutral"), "drop"),
    "boredom": (("drop", "neutral"), "drop"),
    "excited": (("happy", "drop"), "happy"),
    "contempt": (("drop", "disgusted"), "drop"),
    "disappointed": (("drop", "sad"), "drop"),
}

# RAVDESS: EE of MM-VV-EE-II-SS-RR-AA
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

# EmoDB: the German initial (Wut, Langeweile, Ekel, Angst, Freude, Trauer, neutral)
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

# ASED: the first letter of the file name
ASED_EMOTIONS = {"n": "neutral", "f": "fearful", "h": "happy", "s": "sad", "a": "angry"}

# TESS: the last word of the file name
TESS_EMOTIONS = {
    "angry": "angry",
    "disgust": "disgusted",
    "fear": "fearful",
    "happy": "happy",
    "neutral": "neutral",
    "ps": "surprised",  # "pleasant surprise"
    "sad": "sad",
}
TESS_WORDS = {"ps": "pleasant surprise"}

# TurEV-DB: the code in SPEAKER_code_word
TUREV_CODES = {"kz": "angry", "mt": "happy", "hl": "sad"}  # kızgın, mutlu, hüzünlü
TUREV_WORDS = {**TUREV_CODES, "sk": "calm"}  # sakin: the Calm folder, which is not neutral

# TAVA: the affect word of sNN_affect_audio. 8 of the 16 are one of the 7 classes; the other 8 keep
# their ratings, unlabelled.
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

# BAVED: LEVEL of SPK-GENDER-AGE-WORD-LEVEL-REP, a coarse three-step activation label: only level 1
# is a class (neutral).
BAVED_CLASSES = {"0": None, "1": "neutral", "2": None}
BAVED_LEVELS = {"0": "level 0 (low)", "1": "level 1 (neutral)", "2": "level 2 (high)"}

# nEMO: the emotion column of data.tsv
NEMO_EMOTIONS = {
    "anger": "angry",
    "fear": "fearful",
    "happiness": "happy",
    "neutral": "neutral",
    "sadness": "sad",
    "surprised": "surprised",
}

# CREMA-D: the acted emotion in ActorID_Sentence_Emotion_Level (not the crowd votes)
CREMAD_EMOTIONS = {
    "ANG": "angry",
    "DIS": "disgusted",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}

# ESD: the emotion folder above the file
ESD_EMOTIONS = {
    "neutral": "neutral",
    "angry": "angry",
    "happy": "happy",
    "sad": "sad",
    "surprise": "surprised",
}

# MELD: the Emotion column of {train,dev,test}_sent_emo.csv
MELD_EMOTIONS = {
    "neutral": "neutral",
    "joy": "happy",
    "sadness": "sad",
    "anger": "angry",
    "fear": "fearful",
    "disgust": "disgusted",
    "surprise": "surprised",
}

# IEMOCAP: the emotion of each EmoEvaluation line
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

# MSP-Podcast: EmoClass of labels_consensus.csv
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

# M3ED: final_main_emo of annotation.json, lower-cased
M3ED_EMOTIONS = {
    "neutral": "neutral",
    "happy": "happy",
    "sad": "sad",
    "anger": "angry",
    "fear": "fearful",
    "disgust": "disgusted",
    "surprise": "surprised",
}

# IndoWaveSentiment: EE of AA-EE-II-RR
INDOWAVE_EMOTIONS = {
    "01": "neutral",
    "02": "happy",
    "03": "surprised",
    "04": "disgusted",
    "05": "option:disappointed",
}
INDOWAVE_WORDS = {"01": "neutral", "02": "happy", "03": "surprise", "04": "disgust", "05": "disappointed"}


def own_name(code: str, labels: Mapping[str, str | None], own: Mapping[str, str]) -> str | None:
    """The corpus's own name for a code (--keep-labels); None for a code that names no emotion."""
    if code in own:
        return own[code]
    target = labels.get(code)
    return target if target in EMOTIONS else None


def map_label(
    labels: Mapping[str, str | None], code: str, options: Mapping[str, str], original: str
) -> tuple[str | None, str | None]:
    """(label, None) for a known corpus label code, or (None, why the clip has no class)."""
    target = labels[code]
    if target is None:
        return None, f"'{original}' is not one of the 7 classes"
    if target.startswith("option:"):
        option = target.split(":", 1)[1]
        choice = options.get(option) or OPTIONS[option][1]
        if choice == "drop":
            return None, f"'{original}' is not one of the 7 classes (--{option} drop)"
        return choice, None
    return target, None
