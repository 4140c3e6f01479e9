"""Throughput of `serval predict`: one process against `--ray` (a local cluster), whole commands, same clips.

Reports clips per second of each (Ray's start-up and actors' model loading included, as a user
meets them) and whether the two agree on every label.

    nice python benchmarks/ray_throughput.py [--clips 160] [--model default]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from predict_memory import ROOT, varied_clips  # noqa: E402


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=160)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "clips.csv"
        manifest.write_text("path\n" + "".join(f"{c}\n" for c in varied_clips(args.clips)))
        base = [
            sys.executable,
            "-m",
            "serval",
            "predict",
            str(manifest),
            "--model",
            args.model,
            "--no-progress",
        ]
        labels, result = {}, {"clips": args.clips}
        for name, extra in (("single", []), ("ray", ["--ray"])):
            out = Path(tmp) / f"{name}.jsonl"
            seconds = timed([*base, "-o", str(out), *extra])
            labels[name] = {
                (r["file"]): r.get("label") for r in map(json.loads, out.read_text().splitlines())
            }
            result[name] = {"seconds": round(seconds, 1), "clips_per_s": round(args.clips / seconds, 2)}
            print(f"{name}: {seconds:.1f} s, {args.clips / seconds:.2f} clips/s")
        result["labels_identical"] = labels["single"] == labels["ray"]
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
