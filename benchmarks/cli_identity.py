"""The CLI's outputs before and after a restructuring: `serval predict`, `timeline`, `eval`, `pseudolabel`.

    git worktree add --detach /work/base main
    python benchmarks/cli_identity.py --checkout /work/base /tmp/cli-before   # the reference
    python benchmarks/cli_identity.py /tmp/cli-after                         # this checkout
    python benchmarks/cli_identity.py --compare /tmp/cli-before /tmp/cli-after

A run writes its inputs under OUT/inputs (a fixed, seeded sample of 200 clips of ../shared/data; a
manifest of labelled rows with spans, adjacent spans and a corrupt file; a Parquet dataset of 5 clips;
a 40 s recording joined from sample clips; its speaker turns) and runs each command of CASES with the
`serval` of `--checkout` (default: this one), one process each, in OUT. Every case keeps its
outputs, stdout, stderr and exit code under OUT/<case>/.

`--compare A B` compares every output file of A with B's, field by field: strings, integers, booleans and
nulls (labels among them) exactly, numbers within 1e-4 (fp32 on another path); the run folder's own path
and eval's "created" time are ignored, and so are eval's prediction caches (internal: their keys may
change). It prints each difference and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPORA = ("ased", "baved", "emodb", "nemo", "ravdess", "tava", "tess", "turev")
SAMPLE, SEED, TOL = 200, 21, 1e-4
IGNORED_KEYS = {"created"}
SKIPPED_DIRS = {"inputs", "cache"}

# Labels from the file names, written out here so that the inputs do not depend on the code compared.
RAVDESS = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry", "06": "fearful", "07": "disgusted"}
RAVDESS["08"] = "surprised"
EMODB = {"W": "angry", "E": "disgusted", "A": "fearful", "F": "happy", "T": "sad", "N": "neutral"}
TESS = {"angry": "angry", "disgust": "disgusted", "fear": "fearful", "happy": "happy", "neutral": "neutral"}
TESS.update(ps="surprised", sad="sad")
NEMO = {"anger": "angry", "fear": "fearful", "happiness": "happy", "sadness": "sad", "neutral": "neutral"}
NEMO["surprised"] = "surprised"
ASED = {"n": "neutral", "f": "fearful", "h": "happy", "s": "sad", "a": "angry"}


def sample_clips(data: Path = DATA) -> list[Path]:
    """SAMPLE clips drawn with SEED from every corpus's audio files, in a fixed order."""
    files = sorted(p for c in CORPORA for p in (data / c).rglob("*") if p.suffix in (".flac", ".opus"))
    return sorted(random.Random(SEED).sample(files, SAMPLE))


def label_of(path: Path) -> tuple[str | None, float | None]:
    """(class, arousal) of a clip from its corpus's file-name code; None where the name gives none."""
    corpus, name = path.relative_to(DATA).parts[0], path.stem
    if corpus == "ravdess":
        return RAVDESS.get(name.split("-")[2]), None
    if corpus == "emodb":
        return EMODB.get(name[5]), None
    if corpus == "tess":
        return TESS.get(name.split("_")[-1]), None
    if corpus == "nemo":
        return NEMO.get(name.split("_")[1]), None
    if corpus == "ased":
        return ASED.get(name[0].lower()), None
    if corpus == "baved":
        level = int(name.split("-")[4])
        return ("neutral" if level == 1 else None), level / 2
    return None, None


def write_manifest(path: Path, rows: list[dict]) -> None:
    columns = ["path", "start", "end", "label", "arousal", "valence", "dominance"]
    columns += ["language", "speaker", "corpus", "split"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows)


def manifest_rows(clips: list[Path]) -> list[dict]:
    """The labelled clips as rows (every 2nd), three of them cut into adjacent 1 s spans, and a corrupt file."""
    import soundfile as sf

    rows = []
    for clip in clips[::2]:
        label, arousal = label_of(clip)
        if label is None and arousal is None:
            continue
        corpus = clip.relative_to(DATA).parts[0]
        rows.append(dict(path=str(clip), label=label, arousal=arousal, corpus=corpus, split="test"))
    for row in rows[:3]:
        duration = sf.info(row["path"]).duration
        for a in range(int(duration)):
            rows.append({**row, "start": a, "end": min(a + 1, round(duration, 3))})
    rows.append(dict(path="corrupt.wav", label="sad", corpus="ravdess", split="test"))
    return rows


def write_inputs(folder: Path, clips: list[Path]) -> None:
    """Everything the cases read, under folder (the run's inputs/)."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64)))
    (folder / "clips.txt").write_text("".join(f"{c}\n" for c in clips))
    write_manifest(folder / "eval.csv", manifest_rows(clips))
    # a 40 s recording: the first 12 clips one after the other, with 0.5 s of silence between
    gap = np.zeros(8000, np.float32)
    waves = [np.concatenate([sf.read(c, dtype="float32")[0], gap]) for c in clips[:12]]
    sf.write(folder / "long.wav", np.concatenate(waves), 16000, subtype="PCM_16")
    bounds = np.cumsum([0] + [len(w) / 16000 for w in waves])
    turns = [f"{a:.3f},{b:.3f},spk{i % 3}\n" for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    (folder / "turns.csv").write_text("start,end,speaker\n" + "".join(turns))
    spans = [dict(path="long.wav", start=5 * i, end=5 * i + 4, speaker=f"spk{i % 3}") for i in range(5)]
    write_manifest(folder / "spans.csv", spans)
    write_dataset(folder / "dataset.parquet", clips[:5])


def write_dataset(path: Path, clips: list[Path]) -> None:
    """A Parquet file with an audio struct column (bytes, path) and a text label, as `datasets` writes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    audio = [{"bytes": c.read_bytes(), "path": c.name} for c in clips]
    labels = [label_of(c)[0] or "" for c in clips]
    pq.write_table(pa.table({"audio": audio, "label": labels}), path)


def cases(clips: list[Path]) -> list[tuple[str, list[str]]]:
    """(case name, argv after `serval`); run in order in the run folder (outputs under the case's name)."""
    some = [str(c) for c in clips]
    half = some[: len(some) // 2]
    mixed = ["examples", *some, "inputs/corrupt.wav", "inputs/long.wav", "inputs/spans.csv"]
    mixed.append("inputs/dataset.parquet")
    pl = ["--teacher", "default", "--min-utterance", "2", "--max-utterance", "3", "--window", "1"]
    pl += ["--hop", "0.5", "--min-emotional", "1", "--no-progress"]
    return [
        ("predict-json", ["predict", *mixed, "--no-progress"]),
        (
            "predict-table",
            ["predict", "examples", "--format", "table", "--classes", "neutral,angry,sad,happy"],
        ),
        ("predict-csv", ["predict", *mixed, "-o", "predict-csv/out.csv", "--no-progress"]),
        (
            "predict-jsonl-half",
            ["predict", "examples", *half, "-o", "predict-jsonl/out.jsonl", "--no-progress"],
        ),
        ("predict-jsonl", ["predict", *mixed, "-o", "predict-jsonl/out.jsonl", "--no-progress"]),
        ("predict-jsonl-stdout", ["predict", "examples", "inputs/spans.csv", "--format", "jsonl"]),
        ("predict-exists", ["predict", "examples", "-o", "predict-csv/out.csv"]),
        (
            "timeline-grid",
            ["timeline", "inputs/long.wav", "--vad", "-o", "timeline-grid/t", "--formats", "json,csv"],
        ),
        ("timeline-stdout", ["timeline", "inputs/long.wav", "--window", "2", "--hop", "2", "--no-progress"]),
        (
            "timeline-turns",
            ["timeline", "inputs/long.wav", "--segments", "inputs/turns.csv", "-o", "timeline-turns/t"]
            + ["--formats", "json,csv"],
        ),
        ("eval", ["eval", "inputs/eval.csv", "-o", "eval", "--bootstrap", "200", "--no-progress"]),
        (
            "eval-cached",
            [
                "eval",
                "inputs/eval.csv",
                "-o",
                "eval-cached",
                "--cache-dir",
                "eval/cache",
                "--bootstrap",
                "200",
            ]
            + ["--no-progress", "--segments", "utterance,merged", "--protocols", "4class"],
        ),
        ("eval-dataset", ["eval", "inputs/dataset.parquet", "-o", "eval-dataset", "--bootstrap", "0"]),
        ("pseudolabel", ["pseudolabel", *some[:12], "inputs/spans.csv", *pl, "-o", "pseudolabel/out.csv"]),
        (
            "pseudolabel-relabel",
            ["pseudolabel", *some[12:18], *pl, "--relabel", "default", "-o", "pl2/out.jsonl"],
        ),
        (
            "relabel",
            ["pseudolabel", "pseudolabel/out.csv", "--relabel", "default", "-o", "relabel/out.jsonl"],
        ),
    ]


def run_cases(out: Path, checkout: Path, only: set[str] | None) -> int:
    """Write the inputs and run every case in out; the number of cases run."""
    clips = sample_clips()
    write_inputs(out / "inputs", clips)
    (out / "examples").mkdir(exist_ok=True)
    for f in sorted((ROOT / "examples").iterdir()):
        target = out / "examples" / f.name
        if not target.exists():
            target.write_bytes(f.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = 0
    for name, argv in cases(clips):
        if only and name not in only:
            continue
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "serval", *argv, *(["--no-progress"] * ("--no-progress" not in argv))],
            cwd=out,
            env=env,
            capture_output=True,
            text=True,
        )
        (folder / "stdout.txt").write_text(proc.stdout)
        (folder / "stderr.txt").write_text(proc.stderr)
        (folder / "rc.txt").write_text(f"{proc.returncode}\n")
        print(f"{name}: exit {proc.returncode} in {time.monotonic() - began:.1f} s", file=sys.stderr)
        done += 1
    return done


# ------------------------------------------------------------------------------------ comparison

NUMBER = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?|-?\d+(?:[eE][-+]?\d+)?")


def load(path: Path, root: Path):
    """A file's content with the run folder's path replaced: JSON, a list of JSONL records, CSV rows or text."""
    text = path.read_text(encoding="utf-8").replace(str(root.resolve()), "<OUT>")
    if path.suffix == ".json" or (path.name == "stdout.txt" and text.startswith(("[", "{"))):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    if path.suffix == ".jsonl" or (path.name == "stdout.txt" and text.startswith('{"')):
        return [json.loads(line) for line in text.splitlines()]
    if path.suffix == ".csv":
        return [[_number(c) for c in row] for row in csv.reader(text.splitlines())]
    return [[_number(t) for t in _tokens(line)] for line in text.splitlines()]


def _tokens(line: str) -> list[str]:
    """A text line cut into numbers and the text between them."""
    out, at = [], 0
    for m in NUMBER.finditer(line):
        out += [line[at : m.start()], m.group()]
        at = m.end()
    return [t for t in out + [line[at:]] if t]


def _number(cell: str):
    try:
        return int(cell)
    except ValueError:
        pass
    try:
        return float(cell)
    except ValueError:
        return cell


def differences(a, b, where: str) -> list[str]:
    """Every place where b differs from a beyond the tolerance (numbers) or at all (everything else)."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        return [] if a == b and type(a) is type(b) else [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, int | float) and isinstance(b, int | float):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return []
        return [] if abs(a - b) <= TOL else [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}: key {k!r} only in one" for k in sorted(set(a) ^ set(b), key=str)]
        for k in a:
            if k in b and k not in IGNORED_KEYS:
                out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = [] if len(a) == len(b) else [f"{where}: {len(a)} items != {len(b)}"]
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{where}[{i}]")
        return out
    return [f"{where}: {a!r} != {b!r}"]


def files_of(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file()
        and not SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])
        and not p.relative_to(root).parts[0] == "examples"
        and p.suffix != ".png"
    }


def compare(a: Path, b: Path) -> list[str]:
    """The differences between two run folders, file by file."""
    fa, fb = files_of(a), files_of(b)
    out = [f"{f}: only in {a}" for f in sorted(fa - fb)] + [f"{f}: only in {b}" for f in sorted(fb - fa)]
    for f in sorted(fa & fb):
        out += differences(load(a / f, a), load(b / f, b), f)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="run folder to write")
    p.add_argument("--checkout", default=str(ROOT), help="the serval checkout to run (default: this one)")
    p.add_argument("--only", help="comma-separated case names (default: all)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two run folders")
    args = p.parse_args(argv)
    if args.compare:
        diffs = compare(Path(args.compare[0]), Path(args.compare[1]))
        for d in diffs[:200]:
            print(d)
        n = len(files_of(Path(args.compare[0])))
        print(f"{len(diffs)} differences in {n} files", file=sys.stderr)
        return 1 if diffs else 0
    if not args.out:
        p.error("give a run folder, or --compare A B")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    began = time.monotonic()
    n = run_cases(out, Path(args.checkout).resolve(), only)
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{n} cases in {time.monotonic() - began:.0f} s (load average {load_avg})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
