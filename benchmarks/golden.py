"""Byte-identical outputs: `serval predict examples/` and `serval eval` on a fixed manifest.

`python benchmarks/golden.py --write` records them under tests/golden/; without it the script
checks the current code against them and exits 1 on any difference. Refactors must leave them
unchanged; a new default model rewrites them (and says so in its commit). They run on the torch
engine (`--engine torch`): the default engine on a CPU, ONNX Runtime, agrees with it to about 1e-6,
not byte for byte (tests/test_onnx_engine.py checks the two agree on the examples).
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
DATA = ROOT.parent / "shared" / "data"
# A fixed, small manifest: two corpora, two languages, several classes, one clip per line.
CLIPS = [
    ("emodb/09a01Wb.flac", "angry", "de", "emodb"),
    ("emodb/09a01Nb.flac", "neutral", "de", "emodb"),
    ("emodb/09a05Tb.flac", "sad", "de", "emodb"),
    ("emodb/09a01Fa.flac", "happy", "de", "emodb"),
    ("ravdess/Actor_16/03-01-01-01-01-01-16.flac", "neutral", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-03-01-01-01-16.flac", "happy", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-04-01-01-01-16.flac", "sad", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-05-01-01-01-16.flac", "angry", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-06-01-01-01-16.flac", "fearful", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-07-01-01-01-16.flac", "disgusted", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-08-01-01-01-16.flac", "surprised", "en", "ravdess"),
]


def serval(*args: str) -> str:
    """Run the `serval` command of this interpreter's environment; its stdout."""
    cmd = [sys.executable, "-m", "serval", *args]
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def outputs() -> dict[str, str]:
    """{golden file name: text} as the current code produces them."""
    out = {"predict-examples.json": serval("predict", "examples/", "--format", "json", "--engine", "torch")}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "golden.csv"
        lines = ["path,label,language,corpus,speaker,split"]
        lines += [
            f"{DATA / p},{lab},{lang},{corpus},{p.split('/')[-1][:2]},test" for p, lab, lang, corpus in CLIPS
        ]
        manifest.write_text("\n".join(lines) + "\n")
        serval(
            "eval",
            str(manifest),
            "--model",
            "serval/assets/default",
            "-o",
            f"{tmp}/report",
            "--bootstrap",
            "50",
            "--no-progress",
            "--engine",
            "torch",
        )
        for name in ("report.json", "report.md"):
            text = (Path(tmp) / "report" / name).read_text().replace(str(DATA), "DATA").replace(tmp, "TMP")
            text = re.sub(r'"created": "[^"]*"', '"created": "-"', text)
            # the cache key hashes file times and absolute paths: never the same in two checkouts
            out[f"eval-{name}"] = re.sub(r'"fingerprint": "[^"]*"', '"fingerprint": "-"', text)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="record the current outputs as the golden ones")
    args = ap.parse_args()
    current = outputs()
    if args.write:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name, text in current.items():
            (GOLDEN / name).write_text(text)
        print(f"wrote {len(current)} golden files to {GOLDEN}")
        return 0
    bad = 0
    for name, text in current.items():
        want = (GOLDEN / name).read_text()
        if text != want:
            bad += 1
            diff = difflib.unified_diff(want.splitlines(), text.splitlines(), "golden", "now", lineterm="")
            print(f"{name} differs:\n" + "\n".join(list(diff)[:40]))
    print("all golden outputs identical" if not bad else f"{bad} golden outputs differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
