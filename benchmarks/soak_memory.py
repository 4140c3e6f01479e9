"""Peak memory of every entry point on long audio: 30 s, 5 min and 40 min recordings, and 1,000 short clips.

Entry points: `serval predict FILE` (CLI), `serval.load().predict(FILE)` (API), `POST /v1/emotion`,
`POST /v1/timeline`, the WebSocket stream `/v1/stream` and the MCP tool `recognize_emotion`. Each case
is a fresh process on the default model and the default engine (`--engine auto`: ONNX Runtime on a
CPU). The CLI and API are measured by the peak RSS of a child process (`resource.getrusage` in a
wrapper process); the servers (`serval serve --memory-budget 2G --timeline-nice 0`, `serval mcp`) by their peak RSS
(`VmHWM`) once the case's requests are answered. The recordings are real clips from ../shared/data
joined end to end into one 16 kHz FLAC. The goal (issue 23): the peak at 40 min is at most 1.2x the
peak at 30 s on every entry point, and at most 0.8 GB for the CLI.

    nice python benchmarks/soak_memory.py --out soak_memory.json          # every case (hours on 2 cores)
    python benchmarks/soak_memory.py --entries cli,api --sizes 30,300 --clips 0
    python benchmarks/soak_memory.py --out soak_memory.json --table        # the table of what is done

Results are written to `--out` after every case, and a rerun skips the cases already there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from load import DATA, REPO, rss_kib, start_server  # noqa: E402
from predict_memory import WRAPPER, varied_clips  # noqa: E402

ENTRIES = ("cli", "api", "emotion", "timeline", "stream", "mcp")
SIZES = (30, 300, 2400)  # seconds
BUDGET = "2G"  # the servers' --memory-budget: its limits admit a 40-minute upload
API = (
    "import json, sys, serval; paths = json.load(open(sys.argv[1])); model = serval.load(); "
    "records = model.predict(paths if len(paths) > 1 else paths[0])"
)
FLAC = {"content-type": "audio/flac"}
STREAM_AHEAD = 10.0  # seconds of audio a stream client sends beyond the server's last answer


def recording(seconds: int, folder: Path) -> Path:
    """A `seconds`-long 16 kHz FLAC of real clips joined end to end (corpora in turn), made once."""
    import soundfile as sf

    from serval.audio import load_audio

    path = folder / f"recording-{seconds}s.flac"
    if not path.exists():
        parts, n = [], 0
        for clip in varied_clips(max(8, seconds // 2)):
            parts.append(load_audio(clip))
            n += len(parts[-1])
            if n >= seconds * 16000:
                break
        while n < seconds * 16000:  # fewer clips than needed: go round them again
            parts += parts[: len(parts)]
            n = sum(len(p) for p in parts)
        sf.write(path, np.concatenate(parts)[: seconds * 16000], 16000, format="FLAC")
    return path


def wrapped_peak(cmd: list[str]) -> float:
    """Peak RSS (MiB) of `cmd` run as a child of a wrapper process."""
    done = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.split()[-1]) / 1024


def cli_case(paths: list[Path], work: Path) -> float:
    if len(paths) == 1:
        cmd = [sys.executable, "-m", "serval", "predict", str(paths[0]), "--format", "json"]
    else:
        manifest = work / "clips.csv"
        manifest.write_text("path\n" + "".join(f"{p}\n" for p in paths))
        out = work / "out.jsonl"
        cmd = [sys.executable, "-m", "serval", "predict", str(manifest), "-o", str(out), "--overwrite"]
    return wrapped_peak([*cmd, "--no-progress"])


def api_case(paths: list[Path], work: Path) -> float:
    listing = work / "paths.json"
    listing.write_text(json.dumps([str(p) for p in paths]))
    return wrapped_peak([sys.executable, "-c", API, str(listing)])


async def post_all(base: str, endpoint: str, bodies: list[bytes], concurrency: int) -> list[int]:
    """Post every body to `endpoint`, `concurrency` at a time; the status codes."""
    import httpx

    codes: list[int] = []
    todo = iter(bodies)
    async with httpx.AsyncClient(base_url=base, timeout=7200) as c:

        async def worker() -> None:
            for body in todo:
                codes.append((await c.post(endpoint, content=body, headers=FLAC)).status_code)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return codes


async def stream_all(base: str, waves: list[np.ndarray], concurrency: int) -> list[int]:
    """Stream every wave (16 kHz) to /v1/stream as fast as it is taken; windows seen per stream."""
    from websockets.asyncio.client import connect

    seen: list[int] = []
    todo = iter(waves)

    async def one(wave: np.ndarray) -> int:
        pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
        url = base.replace("http", "ws") + "/v1/stream"
        answered, progress = [0.0], asyncio.Event()  # the end (s) of the last window answered
        async with connect(url, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"

            async def send() -> None:
                # at most STREAM_AHEAD s past the last answer, so that pings are not stuck behind audio
                for i in range(0, len(pcm), 16000):
                    while i / 32000 - answered[0] > STREAM_AHEAD:
                        progress.clear()
                        await progress.wait()
                    await ws.send(pcm[i : i + 16000])
                await ws.send('{"type": "end"}')

            sender, windows = asyncio.create_task(send()), 0
            async for text in ws:
                message = json.loads(text)
                if message["type"] == "window":
                    windows += 1
                    answered[0] = message["end"]
                    progress.set()
                if message["type"] == "error":
                    sender.cancel()
                    return -1
                if message["type"] == "summary":
                    break
            await sender
            return windows

    async def worker() -> None:
        for wave in todo:
            seen.append(await one(wave))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return seen


def server_case(entry: str, paths: list[Path], work: Path) -> float:
    from serval.audio import load_audio

    # --timeline-nice 0: on a shared machine a niced timeline thread barely gets a core; it changes the time, not the memory
    extra = ["--memory-budget", BUDGET, "--timeline-nice", "0"]
    proc, base = start_server(Path("default"), "cpu", extra, work / "server.log")
    try:
        many = len(paths) > 1
        if entry == "stream":
            waves = [load_audio(p) for p in paths]
            seen = asyncio.run(stream_all(base, waves, 8 if many else 1))
            ok = all(n > 0 for n in seen)
        else:
            bodies = [p.read_bytes() for p in paths]
            codes = asyncio.run(post_all(base, f"/v1/{entry}", bodies, 4 if many else 1))
            ok = all(c == 200 for c in codes)
        if not ok:
            raise RuntimeError(f"{entry}: not every request succeeded; see {work / 'server.log'}")
        return rss_kib(proc.pid, "VmHWM") / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=60)


async def mcp_calls(paths: list[Path]) -> float:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    args = ["-m", "serval", "mcp", "--max-clip-seconds", "3000", "--root", "/"]
    # the whole environment, so that the server runs this checkout's serval (PYTHONPATH) as the others do
    params = StdioServerParameters(command=sys.executable, cwd=str(REPO), args=args, env=dict(os.environ))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        for p in paths:
            result = await session.call_tool("recognize_emotion", {"path": str(p)})
            if result.is_error:
                raise RuntimeError(f"mcp: {p}: {result.content}")
        return max(rss_kib(pid, "VmHWM") for pid in mcp_servers()) / 1024


def mcp_servers() -> list[int]:
    """Pids of this process's `serval mcp` children."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)
        if ppid == os.getpid() and b"mcp" in cmdline:
            found.append(int(entry.name))
    return found


def run_case(entry: str, paths: list[Path], work: Path) -> float:
    """Peak RSS (MiB) of one entry point on `paths` (one recording, or many clips)."""
    if entry == "cli":
        return cli_case(paths, work)
    if entry == "api":
        return api_case(paths, work)
    if entry == "mcp":
        return asyncio.run(mcp_calls(paths))
    return server_case(entry, paths, work)


def table(results: dict) -> str:
    """The Markdown table of the results so far (peak MiB, and the case's seconds), with the 40-min / 30-s ratio."""
    lines = [
        "| entry point | 30 s | 5 min | 40 min | 1,000 clips | 40 min / 30 s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for entry in ENTRIES:
        r = results.get(entry, {})
        cells = [
            f"{r[k]['peak_mib']:.0f} MiB ({r[k]['seconds']:.0f} s)" if k in r else "not run"
            for k in ("30", "300", "2400", "clips")
        ]
        ratio = f"{r['2400']['peak_mib'] / r['30']['peak_mib']:.2f}x" if "2400" in r and "30" in r else "-"
        lines.append(f"| {entry} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", default=",".join(ENTRIES))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="recording lengths in seconds")
    ap.add_argument("--clips", type=int, default=1000, help="short clips (0: none)")
    ap.add_argument("--out", default="soak_memory.json", help="results JSON (a rerun skips what it holds)")
    ap.add_argument("--workdir", help="where the recordings are made (default: a temporary folder)")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.table:
        print(table(results))
        return 0
    results["machine"] = machine()
    cases = [(e, s) for s in args.sizes.split(",") if s for e in args.entries.split(",")]
    cases += [(e, "clips") for e in args.entries.split(",")] if args.clips else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for entry, size in cases:
            if size in results.get(entry, {}):
                continue
            paths = varied_clips(args.clips) if size == "clips" else [recording(int(size), work)]
            t0 = time.perf_counter()
            peak = run_case(entry, paths, work)
            took = time.perf_counter() - t0
            results.setdefault(entry, {})[size] = {"peak_mib": round(peak, 1), "seconds": round(took, 1)}
            out.write_text(json.dumps(results, indent=2))
            print(f"{entry} {size}: peak RSS {peak:.0f} MiB in {took:.0f} s", flush=True)
    print(table(results))
    return 0


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "?",
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB, {platform.system()}"


if __name__ == "__main__":
    assert DATA.is_dir(), f"no data at {DATA}"
    sys.exit(main())
