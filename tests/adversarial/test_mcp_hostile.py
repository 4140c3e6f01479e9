"""A hostile agent against the real `serval mcp` process: a FIFO, paths outside the allowed
folders, tiny and non-finite grids (issue 15, items 1, 5 and 6). One session makes every call."""

from __future__ import annotations

import math
import os
import sys

import pytest
from hostile import REPO, tiny_model, tone, wav_bytes

from serval import vocab

pytest.importorskip("mcp")
anyio = pytest.importorskip("anyio")
pytestmark = pytest.mark.slow  # a real server process per module


async def session_calls(cwd, args, calls):
    from mcp import ClientSession, StdioServerParameters, stdio_client

    # the SDK passes HOME and PATH only, unless told: the server then uses the test session's caches
    env = dict(os.environ)
    params = StdioServerParameters(
        command=sys.executable, cwd=str(cwd), args=["-m", "serval", "mcp", *args], env=env
    )
    results = {}
    with anyio.fail_after(120):  # a call that hangs fails the test instead of hanging it
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            for key, (name, arguments) in calls.items():
                results[key] = await session.call_tool(name, arguments)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-mcp")
    start, extra = tmp / "start", tmp / "extra"
    start.mkdir()
    extra.mkdir()
    (start / "clip.wav").write_bytes(wav_bytes(tone(3.0)))
    (extra / "other.wav").write_bytes(wav_bytes(tone(2.0, 330.0)))
    os.mkfifo(start / "pipe.wav")  # nobody ever writes to it: opening it for reading would block
    calls = {
        "fifo": ("recognize_emotion", {"path": "pipe.wav"}),
        "fifo_timeline": ("emotion_timeline", {"path": str(start / "pipe.wav")}),
        "here": ("recognize_emotion", {"path": "clip.wav"}),
        "widened": ("recognize_emotion", {"path": str(extra / "other.wav")}),
        "outside_file": ("recognize_emotion", {"path": str(REPO / "pyproject.toml")}),
        "outside_missing": ("recognize_emotion", {"path": str(REPO / "no-such-file.wav")}),
        "outside_dir": ("recognize_emotion", {"path": str(REPO / "serval")}),
        "dotdot": ("recognize_emotion", {"path": "../../no-such-file.wav"}),
        "tiny_hop": ("emotion_timeline", {"path": "clip.wav", "window": 1, "hop": 0.00001}),
        "inf_segment": ("emotion_timeline", {"path": "clip.wav", "max_segment": math.inf}),
        "nan_window": ("emotion_timeline", {"path": "clip.wav", "window": math.nan}),
        "after": ("emotion_timeline", {"path": "clip.wav", "window": 1, "hop": 0.5}),
    }
    args = ["--model", str(tiny_model(tmp)), "--device", "cpu", "--root", str(extra)]
    return anyio.run(session_calls, start, args, calls)


def text(result) -> str:
    assert result.is_error, result
    return result.content[0].text


def test_a_fifo_is_a_tool_error_not_a_hang(results):
    for key in ("fifo", "fifo_timeline"):
        assert "pipe.wav" in text(results[key]) and "not a regular file" in text(results[key])


def test_the_default_root_is_the_start_folder_and_root_widens_it(results):
    assert not results["here"].is_error and results["here"].structured_content["duration"] == 3.0
    assert not results["widened"].is_error and results["widened"].structured_content["duration"] == 2.0


def test_outside_paths_reveal_nothing(results):
    answers = {}
    for key, name in [
        ("outside_file", str(REPO / "pyproject.toml")),
        ("outside_missing", str(REPO / "no-such-file.wav")),
        ("outside_dir", str(REPO / "serval")),
        ("dotdot", "../../no-such-file.wav"),
    ]:
        message = text(results[key])
        assert name in message and "outside the folders this server may read" in message
        answers[key] = message.replace(name, "PATH")
    assert len(set(answers.values())) == 1, answers  # exists, missing, a folder: the same answer


def test_hostile_grids_are_tool_errors(results):
    assert "hop must be between 0.01 s" in text(results["tiny_hop"])
    assert "max_segment" in text(results["inf_segment"])
    assert "window" in text(results["nan_window"])
    after = results["after"]  # the server is still there and right
    assert not after.is_error and len(after.structured_content["windows"]) == 5


def test_a_read_that_never_returns_is_a_tool_error(tmp_path, monkeypatch):
    """A file whose reads block (a stuck network share) fails the call after READ_TIMEOUT, naming it."""
    import threading
    import time
    from types import SimpleNamespace

    from mcp.server.mcpserver.exceptions import ToolError

    from serval.serve import mcp as tool

    stuck = threading.Event()
    monkeypatch.setattr(tool, "READ_TIMEOUT", 0.5)
    monkeypatch.setattr(tool, "audio_info", lambda *a, **k: stuck.wait(30))
    (tmp_path / "share.wav").write_bytes(wav_bytes(tone(1.0)))
    never_called = SimpleNamespace(classes=vocab.EMOTIONS, dimensions=vocab.DIMENSIONS)
    tools = tool.EmotionTools(never_called, tool.AudioInput(cwd=str(tmp_path)), 60.0, 3600.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(ToolError, match=r"share\.wav: reading took longer than 0\.5 s"):
            tools.recognize_emotion(path="share.wav")
        assert time.monotonic() - t0 < 5
    finally:
        stuck.set()
