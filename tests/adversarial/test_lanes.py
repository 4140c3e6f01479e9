"""The model's queue under hostile load, in-process around a predictor whose calls can be held:
short clips ahead of long timelines, abandoned timelines stopped, refusals before the body,
and no non-finite number ever serialised (issue 15, items 4, 6 and 8)."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from hostile import answer_of, free_port, healthy, raw_request, tone, wav_bytes

from serval import vocab
from serval.serve.app import create_app
from serval.serve.config import ServerConfig

uvicorn = pytest.importorskip("uvicorn")
ws_client = pytest.importorskip("websockets.sync.client")

CLIP = 48_000  # a 3 s clip's samples; every timeline window here is 4 s (64 000)


class HeldPredictor:
    """Scores from the waveform's mean; each call waits at `gate` (and `delay`); calls recorded."""

    classes, dimensions, name = vocab.EMOTIONS, vocab.DIMENSIONS, "held"

    def __init__(self, delay: float = 0.0, nan: bool = False):
        self.gate, self.inside, self.delay, self.nan = threading.Event(), threading.Event(), delay, nan
        self.gate.set()
        self.calls: list[list[int]] = []

    def predict_waveforms(self, waves, batch_size: int = 16, progress: bool = False):
        self.calls.append([len(w) for w in waves])
        self.inside.set()
        assert self.gate.wait(60), "gate never opened"
        time.sleep(self.delay)
        probs = np.full((len(waves), len(self.classes)), 1 / len(self.classes), np.float32)
        scores = np.full((len(waves), len(self.dimensions)), np.nan if self.nan else 0.5, np.float32)
        return probs, scores


class ThreadServer:
    def __init__(self, app):
        self.app, self.port = app, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                if healthy(self.base, 2):
                    return self
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def service(self):
        return self.app.state.service


def until(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def post(base: str, path: str, body: bytes, **params) -> httpx.Response:
    return httpx.post(
        base + path, content=body, headers={"content-type": "audio/wav"}, params=params, timeout=120
    )


def test_a_short_clip_is_served_next_behind_seven_long_timelines():
    held = HeldPredictor()
    app = create_app(held, ServerConfig(max_batch=16, max_long_batch=4, max_wait_ms=0))
    long, clip = wav_bytes(tone(60.0)), wav_bytes(tone(3.0, 330.0))
    with ThreadServer(app) as srv, ThreadPoolExecutor(8) as pool:
        held.gate.clear()
        timelines = [pool.submit(post, srv.base, "/v1/timeline", long) for _ in range(7)]
        until(lambda: srv.service.batcher.lane_depth("long") == 7)  # each has handed in a batch
        short = pool.submit(post, srv.base, "/v1/emotion", clip)
        until(lambda: srv.service.batcher.lane_depth("short") == 1)
        in_flight = len(held.calls)  # the call held at the gate is the last of these
        held.gate.set()
        assert short.result(60).status_code == 200
        assert all(t.result(120).status_code == 200 for t in timelines)
    first_with_clip = next(i for i, c in enumerate(held.calls) if CLIP in c)
    assert first_with_clip == in_flight  # the very next model call, not after the timelines' turns
    assert all(sum(n != CLIP for n in c) <= 4 for c in held.calls)  # long work comes 4 at a time
    assert sum(len(c) for c in held.calls) == 7 * 29 + 1


def test_a_timeline_whose_client_left_stops_being_scored():
    held = HeldPredictor(delay=0.1)
    app = create_app(held, ServerConfig(max_batch=16, max_long_batch=4, max_wait_ms=0))
    body = wav_bytes(tone(60.0))  # 113 windows at a 0.5 s hop: ~29 model calls of 0.1 s
    with ThreadServer(app) as srv:
        s = raw_request(srv.port, "/v1/timeline?hop=0.5", len(body), body)
        until(lambda: len(held.calls) >= 2)
        s.close()  # the client gives up
        until(lambda: srv.service.timelines == 0, timeout=10)  # its place is given back
        stopped_at = len(held.calls)
        time.sleep(0.5)
        assert len(held.calls) == stopped_at  # nothing more is scored for it
        assert sum(len(c) for c in held.calls) < 113 // 2
        assert healthy(srv.base)
        r = post(srv.base, "/v1/timeline", wav_bytes(tone(6.0)))
        assert r.status_code == 200 and len(r.json()["windows"]) == 2


def test_refusals_come_before_the_body_and_per_lane():
    held = HeldPredictor()
    app = create_app(held, ServerConfig(max_batch=1, max_wait_ms=0, max_queue=1, retry_after=2))
    clip = wav_bytes(tone(2.0))
    with ThreadServer(app) as srv, ThreadPoolExecutor(3) as pool:
        held.gate.clear()
        first = pool.submit(post, srv.base, "/v1/emotion", clip)
        until(held.inside.is_set)
        second = pool.submit(post, srv.base, "/v1/emotion", clip)
        until(lambda: srv.service.waiting == 1)  # the clip queue's one place is taken
        # a clip declaring 1 MB that sends no body is refused at once: nothing is read or decoded
        s = raw_request(srv.port, "/v1/emotion", 2**20, b"")
        answer = answer_of(s, 10)
        s.close()
        assert answer.startswith("HTTP/1.1 503") and "server_busy" in answer and "retry-after: 2" in answer
        # a timeline has its own lane: still admitted, and never refused later for lack of room
        timeline = pool.submit(post, srv.base, "/v1/timeline", wav_bytes(tone(8.0)))
        until(lambda: srv.service.timelines == 1)
        held.gate.set()
        assert first.result(60).status_code == 200 and second.result(60).status_code == 200
        r = timeline.result(60)
        assert r.status_code == 200, r.text
        assert healthy(srv.base)


def strict(text: str):
    def refuse(token):
        raise ValueError(f"non-JSON number {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_outputs_are_never_serialised():
    app = create_app(HeldPredictor(nan=True), ServerConfig())
    clip = wav_bytes(tone(4.5))
    with ThreadServer(app) as srv:
        r = post(srv.base, "/v1/emotion", clip)
        assert r.status_code == 200, r.text
        assert strict(r.text)["scores"] == dict.fromkeys(vocab.DIMENSIONS)
        r = post(srv.base, "/v1/timeline", clip)
        assert r.status_code == 200, r.text
        assert strict(r.text)["windows"][0]["scores"]["arousal"] is None
        pcm = (tone(4.5) * 32767).astype("<i2")
        with ws_client.connect(srv.base.replace("http", "ws") + "/v1/stream") as ws:
            assert strict(ws.recv(timeout=20))["type"] == "ready"
            ws.send(pcm.tobytes())
            ws.send("end")
            messages = [strict(ws.recv(timeout=20)) for _ in range(3)]
        assert [m["type"] for m in messages] == ["window", "window", "summary"]
        assert messages[0]["scores"]["valence"] is None
        metrics = httpx.get(srv.base + "/metrics").text
        assert 'status="500"' not in metrics
        assert healthy(srv.base)


def test_a_stream_pushing_faster_than_real_time_is_long_work():
    app = create_app(HeldPredictor(), ServerConfig(max_wait_ms=0))
    with ThreadServer(app) as srv:
        batcher, lanes = srv.service.batcher, []
        submit = batcher.submit

        async def spy(waves, lane="short"):
            lanes.append(lane)
            return await submit(waves, lane)

        batcher.submit = spy
        for seconds in (4.6, 30.0):  # live, then 25 s ahead of the clock in one frame
            with ws_client.connect(srv.base.replace("http", "ws") + "/v1/stream") as ws:
                assert json.loads(ws.recv(timeout=20))["type"] == "ready"
                ws.send((tone(seconds) * 32767).astype("<i2").tobytes())
                ws.send("end")
                while json.loads(ws.recv(timeout=30))["type"] != "summary":
                    pass
            lanes.append("|")
        assert healthy(srv.base)
    assert lanes == ["short", "short", "|", "long", "|"], lanes  # (30 s: 14 windows, no end remainder)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priority is a Linux feature")
def test_timeline_threads_run_below_the_rest():
    """Timeline work (decoding, VAD) runs nicer than the server's other threads, so it yields the CPU."""
    from serval.serve.metrics import Metrics
    from serval.serve.service import Service

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    for increment in (10, 0):
        service = Service(HeldPredictor(), ServerConfig(timeline_nice=increment), Metrics())
        try:
            inside = service.timeline_pool.submit(nice).result(10)
        finally:
            service.timeline_pool.shutdown()
        assert inside == min(19, nice() + increment)
    with pytest.raises(ValueError, match="timeline-nice"):
        ServerConfig(timeline_nice=20).check()
