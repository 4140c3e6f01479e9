"""Load benchmark of `serval serve`: N concurrent clients send real clips over loopback.

For each batching mode (off: one clip per model call; on: micro-batches) a fresh server is started
in a subprocess on 127.0.0.1, warmed up, then driven at each concurrency level for a bounded
number of requests and seconds. Reported per level: throughput, p50/p99 latency, errors, mean
model batch size and the server's peak RSS.

    python benchmarks/load.py                          # tiny random model, clients 1,4,16
    python benchmarks/load.py --size base --device cuda --clients 1,8,32 --requests 400
    python benchmarks/load.py --model path/to/model --out results.json

`--size` builds a random model of that Whisper size (the same compute as a trained one; no
weights needed). Clips come from ../shared/data (RAVDESS by default), read into memory first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SERVAL_TEST_DATA", REPO.parent / "shared" / "data"))
MODES = {
    "off": ["--max-batch", "1", "--max-wait-ms", "0"],
    "on": ["--max-batch", "16", "--max-wait-ms", "10"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process from /proc (Linux), in KiB; 0 where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def make_model(size: str, directory: Path) -> Path:
    import torch

    from serval.checkpoint import save_model
    from serval.model import SERConfig, SERModel

    torch.manual_seed(0)
    config = SERConfig.tiny() if size == "tiny" else SERConfig.for_whisper(size, name=f"random-{size}")
    return save_model(SERModel(config), directory / size)


def start_server(model: Path, device: str, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "serval",
        "serve",
        "--model",
        str(model),
        "--device",
        device,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def drive(
    base: str, pid: int, bodies: list[bytes], clients: int, requests: int, seconds: float
) -> dict:
    """`clients` concurrent loops posting clips until `requests` are done or `seconds` pass."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    issued = 0
    peak = rss_kib(pid)
    stop = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient, k: int) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < stop:
            body = bodies[(issued + k) % len(bodies)]
            issued += 1
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/emotion", content=body, headers={"content-type": "audio/flac"})
                status = r.status_code
            except httpx.HTTPError:
                status = -1
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1

    async def watch_memory() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
        before = (await c.get("/metrics")).text
        watcher = asyncio.create_task(watch_memory())
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, k) for k in range(clients)))
        wall = time.perf_counter() - t0
        watcher.cancel()
        after = (await c.get("/metrics")).text
    calls = metric(after, "serval_batch_size_count") - metric(before, "serval_batch_size_count")
    waves = metric(after, "serval_batch_size_sum") - metric(before, "serval_batch_size_sum")
    lat = np.array(latencies) * 1000
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "throughput_rps": round(ok / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "errors": len(latencies) - ok,
        "statuses": statuses,
        "mean_batch": round(waves / calls, 2) if calls else None,
        "peak_rss_mib": round(peak / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model directory (default: a random model of --size)")
    p.add_argument(
        "--size", default="tiny", help="tiny (test config) or a Whisper size: base, small, large-v2 …"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels")
    p.add_argument("--requests", type=int, default=200, help="requests per level (bounded)")
    p.add_argument("--seconds", type=float, default=30.0, help="time limit per level")
    p.add_argument("--clips", type=int, default=48, help="distinct real clips sent round-robin")
    p.add_argument("--corpus", default="ravdess")
    p.add_argument("--modes", default="off,on", help="batching modes to compare: off, on")
    p.add_argument("--out", help="also write the results as JSON here (never overwritten)")
    args = p.parse_args(argv)
    if args.out and Path(args.out).exists():
        p.error(f"{args.out} exists; not overwriting")

    found = sorted((DATA / args.corpus).rglob("*.flac"))
    if not found:
        p.error(f"no {args.corpus} clips under {DATA}")
    step = max(1, len(found) // args.clips)
    bodies = [f.read_bytes() for f in found[::step][: args.clips]]
    levels = [int(c) for c in args.clients.split(",")]
    results = {
        "device": args.device,
        "model": args.model or f"random {args.size}",
        "clips": len(bodies),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "modes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else make_model(args.size, Path(tmp))
        for mode in args.modes.split(","):
            proc, base = start_server(model, args.device, MODES[mode], Path(tmp) / f"server-{mode}.log")
            try:
                asyncio.run(drive(base, proc.pid, bodies, 4, 16, 60))  # warm-up: allocator, kernels, caches
                rows = []
                for n in levels:
                    row = asyncio.run(drive(base, proc.pid, bodies, n, args.requests, args.seconds))
                    rows.append(row)
                    print(
                        f"batching {mode:3s} clients {n:3d}: {row['throughput_rps']:7.1f} req/s  "
                        f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}  "
                        f"batch {row['mean_batch']}  peak RSS {row['peak_rss_mib']} MiB",
                        flush=True,
                    )
                results["modes"][mode] = {
                    "server_args": MODES[mode],
                    "levels": rows,
                    "peak_rss_mib": round(rss_kib(proc.pid, "VmHWM") / 1024, 1),
                }
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print(markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    errors = sum(r["errors"] for m in results["modes"].values() for r in m["levels"])
    return 1 if errors else 0


def markdown(results: dict) -> str:
    lines = [
        f"model: {results['model']}, device: {results['device']}, host: {results['host']}, "
        f"{results['clips']} distinct clips",
        "",
        "| batching | clients | requests | req/s | p50 ms | p99 ms | errors | mean batch | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, m in results["modes"].items():
        for r in m["levels"]:
            lines.append(
                f"| {mode} | {r['clients']} | {r['requests']} | {r['throughput_rps']} | {r['p50_ms']} | "
                f"{r['p99_ms']} | {r['errors']} | {r['mean_batch']} | {r['peak_rss_mib']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
