"""Peak memory of `serval predict` against the number of clips: 40 against 480 clips of varied length.

Each run is its own process (`serval predict MANIFEST -o out.jsonl`), measured by the peak RSS of its
children (resource.getrusage in a wrapper process). The clips mix corpora from ../shared/data so
that lengths vary (EmoDB 2 s, RAVDESS 3-5 s, and the longer clips of the others). The goal
(issue 13): the ratio 480/40 stays within 1.3.

    nice python benchmarks/predict_memory.py [--small 40] [--large 480] [--model default]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPORA = ("emodb", "ravdess", "ased", "tess", "turev", "tava", "baved")

# A wrapper process: runs the command, then prints the peak RSS (KiB on Linux) of its children.
WRAPPER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
    "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def varied_clips(n: int) -> list[Path]:
    """n clips taken round-robin from the corpora (each corpus's clips spread evenly), so lengths vary."""
    pools = []
    for corpus in CORPORA:
        found = sorted((DATA / corpus).rglob("*.flac"))
        if found:
            step = max(1, len(found) // n)
            pools.append(found[::step])
    out: list[Path] = []
    for i in range(n):
        pool = pools[i % len(pools)]
        out.append(pool[(i // len(pools)) % len(pool)])
    return out


def peak_rss(clips: list[Path], model: str, tmp: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `serval predict` process over `clips`."""
    manifest = tmp / f"clips-{len(clips)}.csv"
    manifest.write_text("path\n" + "".join(f"{c}\n" for c in clips))
    out = tmp / f"out-{len(clips)}.jsonl"
    cmd = [sys.executable, "-m", "serval", "predict", str(manifest), "--model", model, "-o", str(out)]
    t0 = time.perf_counter()
    kib = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd, "--no-progress", "--overwrite"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.split()[-1]
    return int(kib) / 1024, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=40)
    ap.add_argument("--large", type=int, default=480)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    result = {"machine": f"{platform.machine()}, {platform.processor() or '?'}, {_cores()} cores"}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.small, args.large):
            clips = varied_clips(n)
            from serval.audio import audio_info

            seconds = [audio_info(c).duration for c in clips]
            mib, took = peak_rss(clips, args.model, Path(tmp))
            result[n] = {
                "peak_rss_mib": round(mib, 1),
                "seconds": round(took, 1),
                "clip_seconds": [round(min(seconds), 2), round(max(seconds), 2)],
            }
            print(
                f"{n} clips ({min(seconds):.1f}-{max(seconds):.1f} s): peak RSS {mib:.0f} MiB in {took:.0f} s"
            )
    ratio = result[args.large]["peak_rss_mib"] / result[args.small]["peak_rss_mib"]
    result["ratio"] = round(ratio, 3)
    print(f"ratio {args.large}/{args.small}: {ratio:.2f} (goal <= 1.3)")
    print(json.dumps(result))
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
