"""The default model's shipped ONNX graph: write it, and time the first and later starts it gives.

`python benchmarks/default_graph.py --write` rewrites `serval/assets/default/onnx/` (graph.onnx without
weights, graph.json: where each weight comes from) with torch, after the default model changes;
`serval.export.export_graph_structure` checks every weight it records against torch's export.

`python benchmarks/default_graph.py --runs 3` times `serval predict CLIP` in fresh processes, the
cases interleaved, each first run on an empty cache:

- shipped, first run: the weights filled with numpy, ORT's optimised graph saved (no torch);
- shipped, later runs: the optimised graph read from the cache;
- exported, first run: what every first run did before, the backbone converted and the graph
  exported with torch (a copy of the default model that the shipped graph does not stand for, as
  its config differs in a key that changes nothing: gradient_checkpointing);
- exported, later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "examples" / "ravdess-16-angry.flac"


def write() -> None:
    from serval.export import export_graph_structure

    manifest = export_graph_structure()
    graph = manifest.with_name("graph.onnx")
    weights = json.loads(manifest.read_text())["weights"]
    print(f"wrote {graph} ({graph.stat().st_size / 1e6:.2f} MB) and {manifest.name}")
    print(f"weights (filled at first run): {weights['bytes'] / 1e6:.1f} MB, sha256 {weights['sha256']}")


def predict(cache: Path, model: str | None) -> float:
    """Seconds for one `serval predict CLIP` process with `cache` as its cache."""
    cmd = [sys.executable, "-m", "serval", "predict", str(CLIP), "--no-progress"]
    cmd += ["--model", model] if model else []
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SERVAL_CACHE": str(cache)})
    if done.returncode:
        raise SystemExit(done.stderr)
    return time.perf_counter() - start


def measure(runs: int) -> dict[str, list[float]]:
    from serval.locations import DEFAULT_MODEL

    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(DEFAULT_MODEL, Path(tmp) / "copy", ignore=shutil.ignore_patterns("onnx")))
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "gradient_checkpointing": True}))
        for i in range(runs):
            for kind, model in (("shipped", None), ("exported", str(copy))):
                cache = Path(tmp) / f"cache-{kind}-{i}"
                times.setdefault(f"{kind}, first run", []).append(predict(cache, model))
                for _ in range(2):
                    times.setdefault(f"{kind}, later runs", []).append(predict(cache, model))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite serval/assets/default/onnx/")
    p.add_argument(
        "--runs", type=int, default=0, help="time this many first runs of each kind (and 2 later runs each)"
    )
    args = p.parse_args()
    if args.write:
        write()
    if args.runs:
        times = measure(args.runs)
        machine = (
            f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
        )
        print(f"`serval predict {CLIP.name}`, seconds: median, then every run ({machine})")
        for kind, values in times.items():
            print(f"  {kind:22s} {statistics.median(values):6.2f}  {[round(v, 2) for v in values]}")


if __name__ == "__main__":
    main()
