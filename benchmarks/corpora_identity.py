"""Byte-identical corpus manifests: `serval data prepare` of this checkout against a reference checkout.

    git worktree add /tmp/corpora-before c1e9118
    python benchmarks/corpora_identity.py --reference /tmp/corpora-before

runs `serval data prepare` (through `serval.cli.main`, one process per checkout) for every corpus
present under ../shared/data, with the options the project uses (benchmarks/prepare_all.sh), and for
small folder trees that mimic the corpora that are not here (CREMA-D, ESD, MELD, M3ED, IEMOCAP,
MSP-Podcast, IndoWaveSentiment, a TurEV-DB with its Calm folder). It compares each manifest, each
`.dropped.csv`, the printed output and the exit code byte for byte, and exits 1 on any difference.
A restructuring of the recipes must leave them all unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
REAL = ("ravdess", "emodb", "ased", "tess", "turev", "tava", "baved")


def real_cases(data: Path) -> list[tuple[str, list[str]]]:
    """(name, argv after `data prepare`) for the corpora present under data."""
    extra = {
        "ravdess": ["--calm", "neutral"],
        "emodb": ["--test-fraction", "0"],
        "turev": ["--test-fraction", "0"],
    }
    cases = []
    for corpus in REAL:
        if not (data / corpus).is_dir():
            continue
        root = str(data / corpus)
        cases.append((f"{corpus}.csv", [corpus, root]))
        cases.append(
            (
                f"{corpus}-all.csv",
                [corpus, root, "--seed", "0", "--min-dev-speakers", "4", *extra.get(corpus, [])],
            )
        )
    if (data / "ravdess").is_dir():
        ravdess = str(data / "ravdess")
        cases += [
            ("ravdess-lines.jsonl", ["ravdess", ravdess]),
            ("ravdess-fixed.csv", ["ravdess", ravdess, "--seed", "3", "--dev-speakers", "01", "02"]),
            ("ravdess-test25.csv", ["ravdess", ravdess, "--dev-fraction", "0", "--test-fraction", "0.25"]),
            ("ravdess-bad-option.csv", ["ravdess", ravdess, "--boredom", "neutral"]),
            ("ravdess-official.csv", ["ravdess", ravdess, "--split", "official"]),
        ]
    if (data / "emodb").is_dir():
        cases.append(("emodb-boredom.csv", ["emodb", str(data / "emodb"), "--boredom", "neutral"]))
    if (data / "tava").is_dir():
        cases.append(("tava-lines.jsonl", ["tava", str(data / "tava")]))
    return cases


# --- folder trees that mimic the corpora not under ../shared/data ---------------------------------


def _audio(path: Path, empty: bool = False) -> None:
    """A short silent WAV (16-bit, 16 kHz), or a 0-byte file; recipes read names, not samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if empty:
        path.write_bytes(b"")
        return
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 4800)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def mock_cremad(root: Path) -> None:
    for actor in ("1001", "1002", "1003", "1004"):
        for emo in ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"):
            _audio(root / "AudioWAV" / f"{actor}_DFA_{emo}_XX.wav")
    _audio(root / "AudioWAV" / "1076_MTI_SAD_XX.wav", empty=True)
    _audio(root / "AudioWAV" / "not_a_crema_name.wav")
    _csv(
        root / "VideoDemographics.csv",
        ["ActorID", "Age", "Sex"],
        [["1001", 51, "Male"], ["1002", 21, "Female"]],
    )


def mock_esd(root: Path) -> None:
    for speaker in ("0001", "0002", "0011", "0012"):
        for emo in ("Angry", "Happy", "Neutral", "Sad", "Surprise"):
            for i, subset in enumerate(("train", "evaluation", "test", None)):
                folder = root / speaker / emo / subset if subset else root / speaker / emo
                _audio(folder / f"{speaker}_{i:06d}.wav")
    _audio(root / "0001" / "Other" / "0001_000099.wav")


def mock_meld(root: Path) -> None:
    header = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"]
    tables = {
        "train": [
            ["Joey", "joy", 0, 0],
            ["Rachel", "anger", 0, 1],
            ["Ross", "sadness", 1, 0],
            ["Ross", "neutral", 1, 1],
        ],
        "dev": [["Monica", "surprise", 0, 0], ["Chandler", "fear", 110, 7]],
        "test": [["Phoebe", "disgust", 0, 0], ["Joey", "joy", 2, 3]],
    }
    folders = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
    for split, rows in tables.items():
        _csv(
            root / f"{split}_sent_emo.csv",
            header,
            [[i, "Oh.", s, e, "neutral", d, u] for i, (s, e, d, u) in enumerate(rows)],
        )
        for _, _, d, u in rows[:-1] if split == "dev" else rows:
            (root / folders[split]).mkdir(parents=True, exist_ok=True)
            (root / folders[split] / f"dia{d}_utt{u}.mp4").write_bytes(b"\0\0\0\x18ftypmp42")
    _audio(root / "train_splits" / "dia0_utt0.wav")


def mock_m3ed(root: Path) -> None:
    def utt(speaker: str, emo) -> dict:
        return {"Speaker": speaker, "Text": "好", "EmoAnnotation": {"final_main_emo": emo}}

    annotation = {
        "Anjia_1": {
            "Anjia_1_1": {
                "SpeakerInfo": {"A": {"Name": "房", "Gender": "Female"}, "B": {"Name": "徐", "Gender": "m"}},
                "Dialog": {
                    "Anjia_1_1_1": utt("A", "Happy"),
                    "Anjia_1_1_2": utt("B", "Anger"),
                    "Anjia_1_1_3": utt("A", "Surprise"),
                },
            }
        },
        "Zhuyu_2": {
            "Zhuyu_2_1": {
                "SpeakerInfo": {"A": {"Name": "李", "Gender": "Male"}},
                "Dialog": {"Zhuyu_2_1_1": utt("A", ["Sad"]), "Zhuyu_2_1_2": utt("A", "Contempt")},
            }
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotation.json").write_text(json.dumps(annotation, ensure_ascii=False), encoding="utf-8")
    for name, movies in (("train", "Anjia_1\n"), ("val", ""), ("test", "Zhuyu_2\n")):
        (root / "splitInfo").mkdir(exist_ok=True)
        (root / "splitInfo" / f"movie_list_{name}.txt").write_text(movies)
    for stem in ("A_Anjia_1_1_1", "B_Anjia_1_1_2", "A_Zhuyu_2_1_1", "Zhuyu_2_1_2"):
        _audio(root / "modality_speech" / f"{stem}.wav")


IEMOCAP_EVAL = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\tNAME_F000\tneu\t[2.5000, 2.5000, 2.5000]
[10.0100 - 11.3925]\tNAME_M001\texc\t[4.0000, 3.5000, 3.0000]
[14.8872 - 18.0175]\tNAME_F002\tfru\t[2.0000, 3.5000, 3.5000]
[19.2900 - 20.7875]\tNAME_M003\txxx\t[2.5000, 2.0000, 2.5000]
[21.0000 - 23.0000]\tNAME_F004\tang\t[1.0000, 5.0000, 4.5000]
[24.0000 - 25.0000]\tNAME_M005\tsur\t[3.0000, 4.0000, 2.0000]
"""


def mock_iemocap(root: Path) -> None:
    for session in (1, 2, 3, 4, 5):
        name = f"Ses0{session}F_impro01"
        folder = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        folder.mkdir(parents=True)
        (folder / f"{name}.txt").write_text(IEMOCAP_EVAL.replace("NAME", name))
        for turn in ("F000", "M001", "F002", "M003", "M005"):
            _audio(root / f"Session{session}" / "sentences" / "wav" / name / f"{name}_{turn}.wav")


def mock_msp(root: Path) -> None:
    table = [
        ("MSP-PODCAST_0001_0008.wav", "N", "4.0", "4.2", "4.4", "127", "Female", "Train"),
        ("MSP-PODCAST_0001_0019.wav", "A", "6.0", "2.0", "5.5", "127", "Female", "Development"),
        ("MSP-PODCAST_0002_0001.wav", "C", "3.0", "3.0", "3.0", "4", "Male", "Test1"),
        ("MSP-PODCAST_0002_0002.wav", "O", "3.0", "3.0", "3.0", "4", "Male", "Test1"),
        ("MSP-PODCAST_0002_0003.wav", "X", "3.0", "NaN", "3.0", "4", "Male", "Train"),
        ("MSP-PODCAST_0003_0001.wav", "U", "7.0", "1.0", "1.0", "Unknown", "Unknown", "Test2"),
        ("MSP-PODCAST_0005_0001.wav", "", "2.0", "6.0", "2.0", "12", "Female", "Test3"),
        ("MSP-PODCAST_0006_0001.wav", "H", "5.0", "5.0", "5.0", "13", "Male", "Train"),
        ("MSP-PODCAST_0004_0001.wav", "H", "5.0", "5.0", "5.0", "9", "Male", "Train"),  # no audio
    ]
    header = ["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"]
    _csv(root / "Labels" / "labels_consensus.csv", header, [list(r) for r in table])
    for name, *_ in table[:-1]:
        _audio(root / "Audios" / name)


def mock_indowave(root: Path) -> None:
    for actor in range(1, 11):
        for emotion in range(1, 6):
            _audio(root / f"{actor:02d}-{emotion:02d}-{1 + actor % 2:02d}-01.wav")
    _audio(root / "readme-01.wav")


def mock_turev(root: Path) -> None:
    for speaker in ("1157", "1234", "1358", "1984"):
        _audio(root / "Calm" / f"{speaker}_sk_elma.wav")
        _audio(root / "Happy" / f"{speaker}_mt_elma.wav")
        _audio(root / "Sad" / f"{speaker}_hl_armut.wav")
        _audio(root / "Angry" / f"{speaker}_kz_armut.wav")
    _audio(root / "Happy" / "1157_kz_kiraz.wav")
    _audio(root / "Angry" / "1157_zz_kiraz.wav")


MOCKS = {
    "crema-d": (mock_cremad, [[]]),
    "esd": (mock_esd, [[], ["--seed", "2"]]),
    "meld": (mock_meld, [[], ["--split", "speaker", "--dev-fraction", "0.2", "--test-fraction", "0.2"]]),
    "m3ed": (mock_m3ed, [[]]),
    "iemocap": (mock_iemocap, [[], ["--excited", "drop"], ["--keep-dimensional"]]),
    "msp-podcast": (
        mock_msp,
        [[], ["--keep-dimensional"], ["--contempt", "disgusted"], ["--split", "speaker"]],
    ),
    "indowavesentiment": (mock_indowave, [[], ["--disappointed", "sad"]]),
    "turev": (mock_turev, [[]]),
}


def mock_cases(folder: Path) -> list[tuple[str, list[str]]]:
    """Build the mock trees under folder; (name, argv) for each run on them."""
    cases = []
    for corpus, (build, variants) in MOCKS.items():
        root = folder / f"mock-{corpus}"
        build(root)
        for i, extra in enumerate(variants):
            cases.append((f"mock-{corpus}-{i}.jsonl", [corpus, str(root), *extra]))
    return cases


# --- running and comparing ------------------------------------------------------------------------


def child(spec: Path, out: Path) -> None:
    """Run every case of spec with this process's serval; write manifests and printed output to out."""
    from serval.cli import main

    for name, argv in json.loads(spec.read_text()):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(["data", "prepare", *argv, "-o", str(out / name)])
            except SystemExit as e:
                code = e.code
        printed = f"exit {code}\n--- stdout\n{stdout.getvalue()}--- stderr\n{stderr.getvalue()}"
        (out / f"{name}.printed").write_text(printed.replace(str(out), "<OUT>"))


def run_checkout(checkout: Path, spec: Path, out: Path) -> None:
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [sys.executable, __file__, "--child", str(spec), str(out)]
    subprocess.run(cmd, env=env, check=True, cwd=checkout)


def compare(before: Path, after: Path) -> list[str]:
    """A line (with a short diff) for each file that differs or exists on one side only."""
    problems = []
    for name in sorted({p.name for p in before.iterdir()} | {p.name for p in after.iterdir()}):
        a, b = before / name, after / name
        if not a.exists() or not b.exists():
            problems.append(f"{name}: only {'after' if b.exists() else 'before'}")
        elif a.read_bytes() != b.read_bytes():
            diff = difflib.unified_diff(
                a.read_text(errors="replace").splitlines(),
                b.read_text(errors="replace").splitlines(),
                lineterm="",
                n=0,
            )
            problems.append(f"{name}: differs\n  " + "\n  ".join(list(diff)[2:12]))
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="checkout of the code to compare with")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared corpora (default ../shared/data)")
    parser.add_argument("--keep", type=Path, help="write the outputs here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corpora-identity-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cases = real_cases(args.data) + mock_cases(work / "mocks")
        spec = work / "cases.json"
        spec.write_text(json.dumps(cases))
        run_checkout(args.reference.resolve(), spec, work / "before")
        run_checkout(ROOT, spec, work / "after")
        problems = compare(work / "before", work / "after")
        files = len(list((work / "after").iterdir()))
    for line in problems:
        print(line)
    print(f"{len(cases)} runs, {files} files compared: {len(problems) or 'no'} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(main())
