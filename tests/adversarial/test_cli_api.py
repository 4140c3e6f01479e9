"""Hostile grids on the command line and through the Python API, and a symlink loop
(issue 15, items 1 and 9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hostile import MIB, REPO, tone, wav_bytes

from serval.audio import AudioNotFoundError, audio_info, load_audio
from serval.windows import MAX_WINDOWS, StreamingWindower, WindowSpec, sliding_windows


def peak_rss_of(cmd: list[str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, int]:
    """Run `cmd`; its result and the peak RSS (bytes) of it alone, measured by a fresh parent."""
    probe = (
        "import resource, subprocess, sys, json\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True, stdin=subprocess.DEVNULL)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print(json.dumps([p.returncode, p.stdout, p.stderr, peak]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, timeout=timeout)
    code, stdout, stderr, peak = json.loads(out.stdout)
    return subprocess.CompletedProcess(cmd, code, stdout, stderr), peak


def test_cli_timeline_refuses_a_tiny_hop_in_one_line(tmp_path):
    clip = tmp_path / "x.wav"
    clip.write_bytes(wav_bytes(tone(3.0)))
    cmd = [sys.executable, "-m", "serval", "timeline", str(clip), "--window", "1", "--hop", "0.00001"]
    p, peak = peak_rss_of(cmd)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("serval timeline: hop must be between 0.01 s")
    assert peak < 512 * MIB


def test_cli_timeline_refuses_too_many_windows_before_any_work(tmp_path):
    clip = tmp_path / "long.wav"
    clip.write_bytes(wav_bytes(np.zeros(16000 * 1100, np.float32)))  # 1100 s at a 0.01 s hop
    cmd = [sys.executable, "-m", "serval", "timeline", str(clip), "--window", "1", "--hop", "0.01"]
    # the default model: its spec is checked (cheaply) first, then the grid is refused before it loads
    p, peak = peak_rss_of(cmd)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    assert f"at most {MAX_WINDOWS}" in p.stderr and "larger hop" in p.stderr
    assert peak < 512 * MIB


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"hop": 0.00001}, "hop"),
        ({"hop": 0.0}, "hop"),
        ({"hop": float("nan")}, "hop"),
        ({"window": float("inf")}, "window"),
        ({"max_segment": float("inf")}, "max_segment"),
        ({"min_length": float("nan")}, "min_length"),
        ({"vad_threshold": 2.0}, "vad_threshold"),
        ({"max_windows": 0}, "max_windows"),
    ],
)
def test_api_grids_are_checked(kw, word):
    with pytest.raises(ValueError, match=word):
        WindowSpec(**kw)


def test_api_window_count_is_bounded():
    spec = WindowSpec(window=1.0, hop=0.01, min_length=0.5, max_windows=50)
    assert spec.count(3.0) == 201
    with pytest.raises(ValueError, match="201 windows; at most 50"):
        spec.check_count(3.0)
    # the windower itself stops at the limit, so no caller can build more windows than allowed
    windower = StreamingWindower(spec)
    with pytest.raises(ValueError, match="more than 50 windows"):
        windower.push(tone(3.0))

    class Counting:
        classes, dimensions, name, calls = ("a", "b"), ("x",), "counting", 0

        def predict_waveforms(self, waves, batch_size=16):
            Counting.calls += len(waves)
            return np.full((len(waves), 2), 0.5, np.float32), np.zeros((len(waves), 1), np.float32)

    with pytest.raises(ValueError, match="more than 50 windows"):
        list(sliding_windows(tone(3.0), Counting(), spec, batch_size=8))
    assert Counting.calls <= 50


def test_a_symlink_loop_is_named_as_such(tmp_path):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    os.symlink(b, a)
    os.symlink(a, b)
    for fn in (load_audio, audio_info):
        with pytest.raises(AudioNotFoundError, match="symlink loop") as e:
            fn(a)
        assert str(a) in str(e.value)
    with pytest.raises(AudioNotFoundError, match="no such file"):  # a plain missing file is still that
        load_audio(tmp_path / "missing.wav")
    p = subprocess.run(
        [sys.executable, "-m", "serval", "timeline", str(a)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "symlink loop" in p.stderr and "Traceback" not in p.stderr
