"""Soak test of `serval serve`: a bounded mixed load on loopback, 10 minutes by default.

One server (a subprocess on 127.0.0.1) gets, all at once: a client posting short real clips one
after another (its latency is the figure that matters), clients posting 60 s timelines (every
third one gives up after a second and disconnects), WebSocket streams (every third one leaves
without `end`), and a client sending bad input (not audio, wrong content type, a 10 µs hop, an
infinite max_segment, uploads that stall). The short-clip latency is measured alone first
(idle), then under that load; at the end, 160 clips are posted at once (overload, to time the
503s). Reported: requests done and answers by status code per kind, the
short clips' p50/p99 idle and under load, and the server's RSS at the start, at minute 2 and at
the end.

    python benchmarks/soak.py                       # 10 minutes, tiny random model
    python benchmarks/soak.py --minutes 3 --size base --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from load import DATA, make_model, rss_kib, start_server  # noqa: E402

WAV = {"content-type": "audio/wav"}


def clips(corpus: str, n: int) -> list[np.ndarray]:
    """n real clips (16 kHz float32), evenly picked from the corpus."""
    from serval.audio import load_audio

    found = sorted((DATA / corpus).rglob("*.flac"))
    if not found:
        raise SystemExit(f"no {corpus} clips under {DATA}")
    return [load_audio(p) for p in found[:: max(1, len(found) // n)][:n]]


def wav(wave: np.ndarray) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class Soak:
    """The load's clients and what they saw."""

    def __init__(
        self, base: str, port: int, short: list[bytes], long: bytes, stream: np.ndarray, stop: float
    ):
        self.base, self.port, self.short, self.long, self.stream, self.stop = (
            base,
            port,
            short,
            long,
            stream,
            stop,
        )
        self.codes: dict[str, Counter] = {k: Counter() for k in ("short", "timeline", "stream", "bad")}
        self.latency: list[float] = []
        self.refusals: list[float] = []  # seconds to a 503
        self.stalls: list[asyncio.Task] = []

    def running(self) -> bool:
        return time.monotonic() < self.stop

    async def short_clips(self, c: httpx.AsyncClient, record: list[float]) -> None:
        i = 0
        while self.running():
            t0 = time.perf_counter()
            r = await c.post("/v1/emotion", content=self.short[i % len(self.short)], headers=WAV)
            took = time.perf_counter() - t0
            self.codes["short"][r.status_code] += 1
            (record if r.status_code == 200 else self.refusals).append(took)
            i += 1

    async def timelines(self, c: httpx.AsyncClient, k: int) -> None:
        n = 0
        while self.running():
            n += 1
            if (n + k) % 3 == 0:  # a client that gives up after a second
                try:
                    await c.post("/v1/timeline", content=self.long, headers=WAV, timeout=1.0)
                except httpx.TimeoutException:
                    self.codes["timeline"]["gave up"] += 1
                continue
            r = await c.post("/v1/timeline", content=self.long, headers=WAV)
            self.codes["timeline"][r.status_code] += 1
            if r.status_code == 503:
                await asyncio.sleep(1.0)

    async def streams(self, k: int) -> None:
        from websockets.asyncio.client import connect

        url = self.base.replace("http", "ws") + "/v1/stream"
        pcm = (self.stream * 32767).astype("<i2").tobytes()
        n = 0
        while self.running():
            n += 1
            async with connect(url) as ws:
                ready = json.loads(await ws.recv())
                if ready["type"] != "ready":
                    self.codes["stream"][ready["error"]["type"]] += 1
                    await asyncio.sleep(1.0)
                    continue
                for i in range(0, len(pcm), 16000):  # 0.5 s frames at 4x real time
                    await ws.send(pcm[i : i + 16000])
                    await asyncio.sleep(0.125)
                if (n + k) % 3 == 0:
                    self.codes["stream"]["left"] += 1
                    continue  # leaves without "end"
                await ws.send('{"type": "end"}')
                async for message in ws:
                    if json.loads(message)["type"] == "summary":
                        self.codes["stream"]["summary"] += 1

    async def bad_inputs(self, c: httpx.AsyncClient) -> None:
        attempts = [
            lambda: c.post("/v1/emotion", content=os.urandom(5000), headers={"content-type": "audio/wav"}),
            lambda: c.post("/v1/emotion", content=b"hello", headers={"content-type": "text/plain"}),
            lambda: c.post(
                "/v1/timeline", content=self.short[0], headers=WAV, params={"window": 1, "hop": 1e-5}
            ),
            lambda: c.post("/v1/timeline", content=self.short[0], headers=WAV, params={"max_segment": "inf"}),
        ]
        n = 0
        while self.running():
            r = await attempts[n % len(attempts)]()
            self.codes["bad"][r.status_code] += 1
            if n % 5 == 0:  # an upload that declares 100 KB and sends 4 bytes, left open
                self.stalls.append(asyncio.get_running_loop().create_task(self.stall()))
            n += 1
            await asyncio.sleep(0.5)

    async def stall(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"POST /v1/emotion HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n")
        writer.write(b"Content-Length: 100000\r\n\r\nRIFF")
        answer = await reader.read(64)
        self.codes["bad"]["stalled: " + (answer[9:12].decode() or "closed")] += 1
        writer.close()


async def burst(base: str, body: bytes, clients: int) -> dict:
    """`clients` clips posted at once (overload) while a probe posts one clip at a time beside
    them: answers by code, and the probe's seconds to a 200 and to a 503 (the cost of a refusal
    as one more client sees it, not its place in the burst's own arrival order)."""
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as c:

        async def one() -> tuple[int, float]:
            t0 = time.perf_counter()
            r = await c.post("/v1/emotion", content=body, headers=WAV)
            return r.status_code, time.perf_counter() - t0

        flood = asyncio.gather(*(one() for _ in range(clients)))
        probes = []
        while not flood.done():
            probes.append(await one())
        answers = await flood
    ms = {code: percentiles([t for c, t in probes if c == code]) for code in sorted({c for c, _ in probes})}
    return {
        "clients": clients,
        "answers": dict(Counter(code for code, _ in answers)),
        "probe_p50_p99_ms": ms,
    }


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1000
    return round(float(np.percentile(ms, 50)), 1), round(float(np.percentile(ms, 99)), 1)


async def soak(base: str, port: int, pid: int, args, data: dict) -> dict:
    """Idle short-clip latency, then the mixed load for the rest of `args.minutes`."""
    start = time.monotonic()
    rss = {"start": rss_kib(pid)}
    memory: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as c:
        idle: list[float] = []
        warm = Soak(
            base, port, data["short"], data["long"], data["stream"], time.monotonic() + args.idle_seconds
        )
        await warm.short_clips(c, idle)
        s = Soak(base, port, data["short"], data["long"], data["stream"], start + args.minutes * 60)
        s.codes["short"] = warm.codes["short"]
        loaded: list[float] = []

        async def watch() -> None:
            while s.running():
                memory.append((time.monotonic() - start, rss_kib(pid)))
                await asyncio.sleep(5)

        tasks = [s.short_clips(c, loaded), s.bad_inputs(c), watch()]
        tasks += [s.timelines(c, k) for k in range(args.timelines)]
        tasks += [s.streams(k) for k in range(args.streams)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        results += await asyncio.gather(*s.stalls, return_exceptions=True)  # each answered in seconds
        overload = await burst(base, data["short"][0], args.burst)
        healthz = (await c.get("/healthz")).status_code
    crashed = [repr(r) for r in results if isinstance(r, BaseException)]
    at2 = [m for t, m in memory if t >= 120]
    # the load's last sample is minute 10; the burst's 160 uploads come after it and are reported apart
    rss |= {"minute_2": at2[0] if at2 else None, "end of load": memory[-1][1] if memory else None}
    rss["after the burst"] = rss_kib(pid)
    per_minute = {int(t // 60): m for t, m in memory}  # the last sample of each minute
    return {
        "minutes": args.minutes,
        "short_idle_p50_p99_ms": percentiles(idle),
        "short_load_p50_p99_ms": percentiles(loaded),
        "refusal_p50_p99_ms": percentiles(s.refusals) if s.refusals else None,
        "burst": overload,
        "answers": {k: dict(v) for k, v in s.codes.items()},
        "rss_mib": {k: round(v / 1024, 1) if v else None for k, v in rss.items()},
        "rss_growth_from_minute_2": round(rss["end of load"] / at2[0] - 1, 4) if at2 else None,
        "rss_mib_per_minute": [round(per_minute[k] / 1024, 1) for k in sorted(per_minute)],
        "healthz_at_end": healthz,
        "client_errors": crashed,
    }


def table(r: dict) -> str:
    rows = [
        ("minutes of load", r["minutes"]),
        ("short clips p50 / p99 idle (ms)", " / ".join(map(str, r["short_idle_p50_p99_ms"]))),
        ("short clips p50 / p99 under load (ms)", " / ".join(map(str, r["short_load_p50_p99_ms"]))),
        (
            "503 answers during the soak p50 / p99 (ms)",
            " / ".join(map(str, r["refusal_p50_p99_ms"] or ["-", "-"])),
        ),
        (
            f"burst of {r['burst']['clients']} clips at once: answers",
            ", ".join(f"{c} x{n}" for c, n in r["burst"]["answers"].items()),
        ),
        *(
            (f"burst: a probe's {code} p50 / p99 (ms)", " / ".join(map(str, v)))
            for code, v in r["burst"]["probe_p50_p99_ms"].items()
        ),
        *((f"{k}: answers", ", ".join(f"{c} x{n}" for c, n in v.items())) for k, v in r["answers"].items()),
        (
            "RSS start / minute 2 / end of load / after the burst (MiB)",
            " / ".join(str(v) for v in r["rss_mib"].values()),
        ),
        ("RSS at the end of each minute (MiB)", " ".join(str(v) for v in r["rss_mib_per_minute"])),
        ("RSS growth minute 2 -> end of load", r["rss_growth_from_minute_2"]),
        ("/healthz at the end", r["healthz_at_end"]),
    ]
    return "\n".join(["| measure | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the whole soak (default 10)")
    p.add_argument(
        "--idle-seconds", type=float, default=20.0, help="short clips alone first, for the idle figure"
    )
    p.add_argument("--model", help="a model directory (default: a random model of --size)")
    p.add_argument("--size", default="tiny", help="tiny (test config) or a Whisper size: base, small …")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timelines", type=int, default=7, help="concurrent timeline clients (60 s each)")
    p.add_argument("--streams", type=int, default=2, help="concurrent stream clients")
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="the server's --max-queue (small, so the burst overflows it)",
    )
    p.add_argument("--serve", default="", help="more `serval serve` options, e.g. '--max-long-batch 1'")
    p.add_argument("--burst", type=int, default=160, help="clips posted at once at the end (overload)")
    p.add_argument("--out", help="also write the results as JSON here (never overwritten)")
    args = p.parse_args(argv)
    if args.out and Path(args.out).exists():
        p.error(f"{args.out} exists; not overwriting")
    short = clips("ravdess", 24)
    data = {
        "short": [wav(x) for x in short],
        "long": wav(np.concatenate(short)[: 60 * 16000]),
        "stream": np.concatenate(short[:3]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else make_model(args.size, Path(tmp))
        proc, base = start_server(
            model,
            args.device,
            ["--upload-timeout", "5", "--max-queue", str(args.max_queue), *args.serve.split()],
            Path(tmp) / "server.log",
        )
        try:
            result = asyncio.run(soak(base, int(base.rsplit(":", 1)[1]), proc.pid, args, data))
        finally:
            proc.terminate()
            proc.wait(60)
            log = (Path(tmp) / "server.log").read_text()
    result |= {
        "serve_options": args.serve,
        "model": args.model or f"random {args.size}",
        "host": f"{platform.node()} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})",
        "tracebacks_in_server_log": log.count("Traceback"),
    }
    if "Traceback" in log:  # show the first one: a soak must end without any
        first = log[log.index("Traceback") :]
        print(first[: first.find("\n\n") if "\n\n" in first else 3000], file=sys.stderr)
    print(table(result))
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
