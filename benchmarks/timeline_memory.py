"""Peak memory of `serval timeline` on a long recording: it must not grow with the file's length.

Builds a synthetic recording from real RAVDESS clips joined with silences (written block by
block, never held whole), then runs `serval timeline` on it in a child process, once on the
first minute and once on the whole file, and compares the children's peak RSS. Reading a
1-hour file whole would cost 230 MB of float32 samples on its own; the bound checked here is
that the 1-hour run peaks at most `--bound-mb` (default 100) MB above the 1-minute run.

    python benchmarks/timeline_memory.py                 # 1 hour, tiny random model, no VAD
    python benchmarks/timeline_memory.py --vad --hours 2
    python benchmarks/timeline_memory.py --model DIR     # a real model (slower)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SERVAL_TEST_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))
from serval.vocab import SAMPLE_RATE  # noqa: E402


def write_recording(path: Path, seconds: float, seed: int = 0) -> None:
    """Real clips and 0.5-3 s silences, cycled until `seconds`, written as 16-bit WAV block by block."""
    files = sorted((DATA / "ravdess").glob("**/*.flac"))[:200]
    if not files:
        sys.exit(f"no RAVDESS clips under {DATA}")
    rng = np.random.default_rng(seed)
    total = int(seconds * SAMPLE_RATE)
    written = 0
    with sf.SoundFile(path, "w", SAMPLE_RATE, 1, subtype="PCM_16") as out:
        while written < total:
            clip, _ = sf.read(files[int(rng.integers(len(files)))], dtype="float32")
            gap = rng.normal(0, 1e-4, int(rng.uniform(0.5, 3.0) * SAMPLE_RATE)).astype(np.float32)
            block = np.concatenate([clip, gap])[: total - written]
            out.write(block)
            written += len(block)


def child_peak_rss(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd` in a fresh child (the only one), return (its peak RSS in MB, wall seconds)."""
    code = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.time()\n"
        "r = subprocess.run(sys.argv[1:])\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps({'rc': r.returncode, 'peak_mb': peak, 'seconds': time.time() - t}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return result["peak_mb"], result["seconds"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--model", help="model directory (default: a tiny random model, enough to measure memory)")
    p.add_argument("--vad", action="store_true", help="also run Silero VAD")
    p.add_argument("--bound-mb", type=float, default=100.0)
    p.add_argument("--workdir", help="keep the files here instead of a temporary folder")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            import torch

            from serval.checkpoint import save_model
            from serval.model import SERConfig, SERModel

            torch.manual_seed(0)
            model = str(save_model(SERModel(SERConfig.tiny()), tmp / "tiny"))
        long_file, short_file = tmp / "long.wav", tmp / "short.wav"
        t = time.time()
        write_recording(long_file, args.hours * 3600)
        write_recording(short_file, 60)
        print(
            f"wrote {args.hours:g} h recording ({long_file.stat().st_size / 2**20:.0f} MB) in {time.time() - t:.0f} s"
        )
        base = [
            sys.executable,
            "-m",
            "serval",
            "timeline",
            "--model",
            model,
            "--device",
            "cpu",
            "--no-progress",
        ]
        base += ["--vad"] if args.vad else []
        figures = {}
        for name, f in (("1 minute", short_file), (f"{args.hours:g} hours", long_file)):
            peak, seconds = child_peak_rss([*base, str(f), "-o", str(tmp / name.replace(" ", "_"))])
            figures[name] = peak
            print(f"{name:>10}: peak RSS {peak:7.1f} MB, {seconds:6.1f} s")
        windows = len(json.loads((tmp / f"{args.hours:g}_hours.json").read_text())["windows"])
        growth = figures[f"{args.hours:g} hours"] - figures["1 minute"]
        print(
            f"{windows} windows; peak RSS grows by {growth:.1f} MB from 1 minute to {args.hours:g} h "
            f"(bound {args.bound_mb:g} MB; the decoded file alone would be {args.hours * 3600 * SAMPLE_RATE * 4 / 2**20:.0f} MB)"
        )
        return 0 if growth <= args.bound_mb else 1


if __name__ == "__main__":
    sys.exit(main())
