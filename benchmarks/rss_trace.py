"""A server's resident memory through one request: where in a long upload the peak is reached.

Starts `serval serve` as `soak_memory.py` does (default model, `--memory-budget 2G --timeline-nice 0`),
posts one recording to an endpoint, and prints the server's VmRSS and VmHWM (MiB) every `--every`
seconds until the answer is in.

    python benchmarks/rss_trace.py recording-2400s.flac --endpoint /v1/timeline
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from load import rss_kib, start_server  # noqa: E402
from soak_memory import BUDGET  # noqa: E402


def trace(recording: Path, endpoint: str, every: float, log: Path) -> tuple[int, list[tuple]]:
    """(status, [(seconds, rss_mib, hwm_mib), ...]) of one request to a fresh server."""
    extra = ["--memory-budget", BUDGET, "--timeline-nice", "0"]
    proc, base = start_server(Path("default"), "cpu", extra, log)
    samples: list[tuple] = []
    done, t0 = threading.Event(), time.monotonic()

    def sample() -> None:
        while not done.is_set():
            rss, hwm = rss_kib(proc.pid, "VmRSS") // 1024, rss_kib(proc.pid, "VmHWM") // 1024
            samples.append((round(time.monotonic() - t0, 1), rss, hwm))
            time.sleep(every)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        body, headers = recording.read_bytes(), {"content-type": "audio/flac"}
        status = httpx.post(base + endpoint, content=body, headers=headers, timeout=7200).status_code
        time.sleep(2 * every)
    finally:
        done.set()
        sampler.join()
        proc.terminate()
        proc.wait(timeout=60)
    return status, samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recording", type=Path)
    ap.add_argument("--endpoint", default="/v1/timeline")
    ap.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        status, samples = trace(args.recording, args.endpoint, args.every, Path(tmp) / "server.log")
    print(f"status {status}; seconds, VmRSS MiB, VmHWM MiB:")
    for s in samples:
        print(*s)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
