"""The base install measured: `pip install <repo>` (no extra, torch not installed first) into a fresh venv.

Reported: its site-packages size (MB) and largest packages, the number of installed distributions, that
`import torch` fails there, and the cold start of `serval predict CLIP` in it (A: ONNX Runtime) against
today's torch install, this environment's `serval predict --engine torch CLIP` (B). The two run in turn,
the order swapped every pair, after one warm-up each (A's fills the default graph into an empty cache);
times are medians of the pairs and the ratio is the median of the pairwise ratios.

    python benchmarks/install_size.py                     # a real RAVDESS clip, 5 pairs
    python benchmarks/install_size.py --pairs 9 --json install.json --keep /tmp/base-venv

pip uses this machine's configured indexes (no network needed where they are local).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_MB = 350


def build_venv(venv: Path) -> float:
    """A fresh venv with `pip install ROOT`; returns the seconds the install took."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    start = time.perf_counter()
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], check=True)
    return time.perf_counter() - start


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def sizes_mb(folder: Path) -> dict[str, float]:
    """MB of each top-level entry of `folder` (files counted once each, links not followed)."""
    out = {}
    for entry in folder.iterdir():
        files = (
            [entry]
            if entry.is_file()
            else [p for p in entry.rglob("*") if p.is_file() and not p.is_symlink()]
        )
        out[entry.name] = sum(p.stat().st_size for p in files) / 2**20
    return out


def venv_facts(venv: Path) -> dict:
    """Size, distributions and whether torch imports, in the venv."""
    py = str(venv / "bin" / "python")
    sizes = sizes_mb(site_packages(venv))
    names = "import importlib.metadata as m; print(' '.join(sorted({d.metadata['Name'].lower() for d in m.distributions()})))"
    dists = subprocess.run([py, "-c", names], capture_output=True, text=True, check=True).stdout.split()
    torch = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True, cwd=venv)
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:10]
    return {
        "site_packages_mb": round(sum(sizes.values()), 1),
        "goal_mb": GOAL_MB,
        "distributions": len(dists),
        "names": dists,
        "import_torch_fails": torch.returncode != 0,
        "largest_mb": {k: round(v, 1) for k, v in largest},
    }


def timed(cmd: list[str], env: dict, cwd: Path) -> float:
    """Wall seconds of one whole process; it must succeed."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds


def cold_starts(venv: Path, clip: Path, pairs: int, cache: Path) -> dict:
    """A (base venv, ONNX Runtime) and B (this environment, torch engine) in turn, medians of `pairs`."""
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    base_env["SERVAL_CACHE"] = str(cache)
    torch_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    a_cmd = [str(venv / "bin" / "serval"), "predict", str(clip), "--no-progress"]
    b_cmd = [sys.executable, "-m", "serval", "predict", "--engine", "torch", str(clip), "--no-progress"]
    first_run = timed(a_cmd, base_env, cache)  # fills the graph into the empty cache
    timed(b_cmd, torch_env, cache)
    runs = []
    for i in range(pairs):
        if i % 2:
            b = timed(b_cmd, torch_env, cache)
            a = timed(a_cmd, base_env, cache)
        else:
            a = timed(a_cmd, base_env, cache)
            b = timed(b_cmd, torch_env, cache)
        runs.append((a, b))
    med = statistics.median
    return {
        "clip": str(clip),
        "pairs": pairs,
        "first_run_s": round(first_run, 2),
        "base_onnx_s": round(med(a for a, _ in runs), 3),
        "torch_install_s": round(med(b for _, b in runs), 3),
        "ratio": round(med(a / b for a, b in runs), 2),
    }


def default_clip() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import clips

    return clips("ravdess", n=1)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--clip", type=Path, help="the cold start's clip (default: a RAVDESS clip of ../shared/data)"
    )
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--keep", type=Path, help="build the venv here and keep it (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    clip = (args.clip or default_clip()).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        venv = args.keep or Path(tmp) / "venv"
        report = {
            "machine": f"{os.cpu_count()} CPUs, {sys.platform}",
            "install_s": round(build_venv(venv), 1),
        }
        report.update(venv_facts(venv))
        cache = Path(tmp) / "cache"
        cache.mkdir()
        report["cold_start"] = cold_starts(venv, clip, args.pairs, cache)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
