"""Helpers of the adversarial tests: a real `serval serve` in a subprocess, its memory, raw sockets.

Every test here plays a hostile or careless client and then checks three things: the documented
answer (status code, close code or error text), that the process is alive and `/healthz`
answers, and, where memory is at stake, how far the server's peak RSS rose.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_bytes(wave: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def tiny_model(directory: Path) -> Path:
    from serval.checkpoint import save_model
    from serval.model import SERConfig, SERModel

    torch.manual_seed(0)
    return save_model(SERModel(SERConfig.tiny()), directory / "tiny")


def rss(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process in bytes (VmHWM: its peak so far), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def healthy(base: str, timeout: float = 10.0) -> bool:
    r = httpx.get(f"{base}/healthz", timeout=timeout)
    return r.status_code == 200 and r.json()["status"] == "ok"


class Server:
    """`serval serve` in a subprocess on a free loopback port (stdout+stderr to `log`)."""

    def __init__(self, model: Path, log: Path, *flags: str):
        self.port, self.log = free_port(), log
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "serval", "serve", "--model", str(model), "--port", str(self.port)]
        cmd += ["--device", "cpu", "--log-level", "warning", *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if healthy(self.base, 2):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not come up:\n{log.read_text()}")
            time.sleep(0.2)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and healthy(self.base)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def raw_request(port: int, path: str, declared: int, body: bytes, ctype: str = "audio/wav") -> socket.socket:
    """A socket that sent a POST declaring `declared` body bytes and then only `body`."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {declared}\r\n\r\n"
    s.sendall(head.encode() + body)
    return s


def answer_of(s: socket.socket, timeout: float) -> str:
    """What the server sent back before closing or `timeout` ("" when it closed without a word;
    "(nothing yet)" when the socket is still open and silent)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b"}" in data:
                break
    except TimeoutError:
        return data.decode(errors="replace") or "(nothing yet)"
    except OSError:  # reset by the server
        pass
    return data.decode(errors="replace")
