"""The corpora whose labels live in metadata tables: one reader each, referenced from `recipes.RULES`.

A reader yields `(path, record)` for each annotated clip, or `(path or name, Skip)` for one it cannot
use (no audio file); `rules.Collector` does the rest. TAVA's ratings and CREMA-D's demographics are
read here too, once, for their rules' `parse`.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from serval.corpora.files import (
    CorpusError,
    audio_files,
    find_one,
    index_by_stem,
    missing_reason,
    prefer_audio,
    scale,
    table,
    walk,
)
from serval.corpora.labels import MSP_WORDS
from serval.corpora.rules import Record, Skip

Clips = Iterator[tuple[Path | str, Record | Skip]]

TAVA_COLUMNS = (
    "Speaker Number",
    "Affect Name",
    "Sex",
    "Variant",
    "meanValence",
    "meanArousal",
    "meanDominance",
)


def tava_ratings(root: Path) -> dict[tuple[int, str], dict[str, str]]:
    """SummaryData.csv's `speech` rows by (speaker number, affect word); the tEGG rows are another recording."""
    path = find_one(root, "SummaryData.csv")
    ratings = {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        for rec in table(f, path, TAVA_COLUMNS):
            if (rec["Variant"] or "").strip().lower() != "speech":
                continue
            try:
                speaker = int(rec["Speaker Number"])
            except ValueError:
                raise CorpusError(
                    f"{path}: speaker number {rec['Speaker Number']!r} is not a number"
                ) from None
            ratings[(speaker, rec["Affect Name"].strip().lower())] = rec
    return ratings


def cremad_sexes(root: Path) -> dict[str, str]:
    """Actor id -> male/female from CREMA-D's VideoDemographics.csv, where the folder has it."""
    sex: dict[str, str] = {}
    demographics = sorted(walk(root, "VideoDemographics.csv"))
    if demographics:
        with open(demographics[0], encoding="utf-8-sig", newline="") as f:
            for rec in table(f, demographics[0], ("ActorID", "Sex")):
                actor, s = (rec.get("ActorID") or "").strip(), (rec.get("Sex") or "").strip().lower()
                if actor and s in ("male", "female"):
                    sex[actor] = s
    return sex


MELD_SPLITS = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
MELD_MEDIA = re.compile(r"^dia(\d+)_utt(\d+)$")


def _meld_split_of(path: Path, root: Path) -> str | None:
    """train/dev/test from the media folder (train_splits, dev_splits_complete, output_repeated_splits_test)."""
    for part in reversed(path.parent.relative_to(root).parts):
        low = part.lower()
        for split in ("train", "dev", "test"):
            if low.startswith(split) or low.endswith("_" + split) or f"_{split}_" in low:
                return split
    return None


def meld_records(root: Path) -> Clips:
    """MELD: `{train,dev,test}_sent_emo.csv` and `dia{D}_utt{U}` media in the per-split folders."""
    media: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for f in audio_files(root):
        if MELD_MEDIA.match(f.stem) and (split := _meld_split_of(f, root)):
            media[(split, f.stem)].append(f)
    found_any = False
    for split, name in MELD_SPLITS.items():
        tables = sorted(walk(root, name))
        if tables:
            found_any = True
            yield from _meld_table(tables[0], split, media)
    if not found_any:
        raise CorpusError(f"{root}: no {', '.join(MELD_SPLITS.values())} found under this folder")


def _meld_table(path: Path, split: str, media: dict[tuple[str, str], list[Path]]) -> Clips:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for rec in table(f, path, ("Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")):
            stem = f"dia{rec['Dialogue_ID'].strip()}_utt{rec['Utterance_ID'].strip()}"
            emotion = rec["Emotion"].strip().lower()
            hits = media.get((split, stem))
            if not hits:
                yield f"{split}/{stem}", Skip("audio file not found", emotion)
                continue
            audio = prefer_audio(hits)
            reason = missing_reason(audio)
            yield (
                audio,
                Skip(reason, emotion)
                if reason
                else {
                    "code": emotion,
                    "speaker": f"meld-{rec['Speaker'].strip()}",
                    "split": split,
                    "dialogue": rec["Dialogue_ID"].strip(),
                    "sentiment": (rec.get("Sentiment") or "").strip() or None,
                },
            )


IEMOCAP_LINE = re.compile(
    r"^\[(\d+(?:\.\d+)?) - (\d+(?:\.\d+)?)\]\t(Ses(\d\d)\w*_([FM])\d+\w*)\t(\w+)\t\[([\d.]+), ([\d.]+), ([\d.]+)\]"
)


def iemocap_records(root: Path) -> Clips:
    """IEMOCAP: `Session*/dialog/EmoEvaluation/*.txt` labels, `Session*/sentences/wav/<dialog>/<turn>.wav`."""
    tables = sorted(p for p in walk(root, "*.txt") if p.parent.name == "EmoEvaluation")
    if not tables:
        raise CorpusError(f"{root}: no Session*/dialog/EmoEvaluation/*.txt found under this folder")
    wavs = index_by_stem([p for p in audio_files(root) if "sentences" in p.relative_to(root).parts])
    for path in tables:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if m := IEMOCAP_LINE.match(line.strip("\n")):
                    yield _iemocap_turn(m, wavs)


def _iemocap_turn(m: re.Match[str], wavs: dict[str, list[Path]]) -> tuple[Path | str, Record | Skip]:
    _, _, turn, session, sex, emotion, val, act, dom = m.groups()
    if not wavs.get(turn):
        return turn, Skip("audio file not found", emotion)
    return prefer_audio(wavs[turn]), {
        "code": emotion,
        "speaker": f"iemocap-Ses{session}{sex}",  # the turn's speaker, not the dialog's
        "gender": "female" if sex == "F" else "male",
        "session": int(session),
        "improvised": 1 if "_impro" in turn else 0,
        "arousal": scale(act, 1, 5),
        "valence": scale(val, 1, 5),
        "dominance": scale(dom, 1, 5),
    }


MSP_SPLITS = {"train": "train", "development": "dev", "test1": "test", "test2": "test2", "test3": "test3"}


def msp_records(root: Path) -> Clips:
    """MSP-Podcast: `Labels/labels_consensus.csv` (FileName, EmoClass, EmoAct/Val/Dom 1-7, SpkrID, Gender, Split_Set)."""
    path = find_one(root, "labels_consensus.csv")
    audio = {p.name: p for p in audio_files(root)}
    with open(path, encoding="utf-8-sig", newline="") as f:
        for rec in table(f, path, ("FileName", "EmoClass")):
            yield _msp_clip(rec, audio)


def _msp_clip(rec: dict[str, str], audio: dict[str, Path]) -> tuple[Path | str, Record | Skip]:
    name = rec["FileName"].strip()
    code = (rec.get("EmoClass") or "").strip().upper()
    path = audio.get(name) or audio.get(Path(name).stem + ".wav")
    if path is None:
        return name, Skip("audio file not found", MSP_WORDS.get(code, code))
    speaker = (rec.get("SpkrID") or "").strip()
    gender = (rec.get("Gender") or "").strip().lower()
    official = (rec.get("Split_Set") or "").strip().lower()
    return path, {
        "code": code,
        "speaker": None if speaker.lower() in ("", "unknown") else f"msp-podcast-{speaker}",
        "gender": gender if gender in ("male", "female") else None,
        "split": MSP_SPLITS.get(official, official or None),
        "arousal": scale(rec.get("EmoAct"), 1, 7),
        "valence": scale(rec.get("EmoVal"), 1, 7),
        "dominance": scale(rec.get("EmoDom"), 1, 7),
    }


M3ED_SPLITS = {"train": "train", "val": "dev", "test": "test"}
M3ED_GENDERS = {"male": "male", "female": "female", "m": "male", "f": "female"}


def m3ed_records(root: Path) -> Clips:
    """M3ED: `annotation.json` (movie -> dialog -> utterances), `splitInfo/movie_list_{train,val,test}.txt`,
    one audio file per utterance named `<Speaker>_<utterance id>` or `<utterance id>`."""
    with open(find_one(root, "annotation.json"), encoding="utf-8") as f:
        annotation = json.load(f)
    movie_split: dict[str, str] = {}
    for name, split in M3ED_SPLITS.items():
        for lst in sorted(walk(root, f"movie_list_{name}.txt")):
            movie_split.update(
                (m.strip(), split) for m in lst.read_text(encoding="utf-8").splitlines() if m.strip()
            )
    audio = index_by_stem(audio_files(root))
    for movie, dialogs in annotation.items():
        for dialog in dialogs.values():
            speakers = dialog.get("SpeakerInfo", {})
            speakers = speakers if isinstance(speakers, dict) else {}
            for utt_id, utt in dialog.get("Dialog", {}).items():
                yield _m3ed_utterance(movie, utt_id, utt, speakers, audio, movie_split.get(movie))


def _m3ed_utterance(
    movie: str, utt_id: str, utt: dict, speakers: dict, audio: dict[str, list[Path]], split: str | None
) -> tuple[Path | str, Record | Skip]:
    spk = utt.get("Speaker", "")
    emotion = utt.get("EmoAnnotation", {}).get("final_main_emo", "")
    if isinstance(emotion, list):
        emotion = emotion[0] if emotion else ""
    emotion = str(emotion).strip()
    hits = audio.get(f"{spk}_{utt_id}") or audio.get(utt_id)
    if not hits:
        return f"{movie}/{utt_id}", Skip("audio file not found", emotion)
    info = speakers.get(spk, {})
    return prefer_audio(hits), {
        "code": emotion.lower(),
        "original": emotion,
        "speaker": f"m3ed-{movie}-{info.get('Name') or spk}",
        "gender": M3ED_GENDERS.get(str(info.get("Gender", "")).strip().lower()),
        "split": split,
        "movie": movie,
    }


NEMO_COLUMNS = ("file_id", "emotion", "speaker_id")


def nemo_records(root: Path) -> Clips:
    """nEMO: `data.tsv` (file_id, emotion, raw_text, normalized_text, speaker_id, gender, age) lists every clip."""
    path = find_one(root, "data.tsv")
    listed = set()
    with open(path, encoding="utf-8", newline="") as f:
        for rec in table(f, path, NEMO_COLUMNS, delimiter="\t", quoting=csv.QUOTE_NONE):
            clip = path.parent / rec["file_id"].strip()
            listed.add(clip)
            yield clip, _nemo_clip(rec, clip)
    for clip in audio_files(root):
        if clip not in listed:
            yield clip, Skip("not listed in data.tsv")


def _nemo_clip(rec: dict[str, str], clip: Path) -> Record | Skip:
    emotion = rec["emotion"].strip().lower()
    if reason := missing_reason(clip):
        return Skip(reason, emotion)
    gender = (rec.get("gender") or "").strip().lower()
    age = (rec.get("age") or "").strip()
    return {
        "code": emotion,
        "speaker": f"nemo-{rec['speaker_id'].strip()}",
        "gender": gender if gender in ("male", "female") else None,
        "age": int(age) if age.isdigit() else None,
        "text": (rec.get("raw_text") or "").strip() or None,  # the same sentences in every emotion
    }
