"""Hostile clients of one real `serval serve` (CLI, subprocess): tiny grids, stalled uploads,
non-finite parameters, stream floods and idle streams (issue 15, items 1, 2, 6 and 7)."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest
from hostile import MIB, Server, answer_of, raw_request, rss, tiny_model, tone, wav_bytes

ws_client = pytest.importorskip("websockets.sync.client")
ConnectionClosed = pytest.importorskip("websockets.exceptions").ConnectionClosed

UPLOAD_TIMEOUT = 2.0  # --upload-timeout of the server under test
IDLE = 2.0  # --stream-idle-seconds
MAX_STREAMS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-http")
    srv = Server(
        tiny_model(tmp),
        tmp / "server.log",
        "--upload-timeout", str(UPLOAD_TIMEOUT),
        "--max-streams", str(MAX_STREAMS),
        "--stream-idle-seconds", str(IDLE),
        "--max-windows", "500",
        "--max-queue", "64",
    )  # fmt: skip
    yield srv
    srv.stop()
    assert "Traceback" not in (tmp / "server.log").read_text()


def error_of(r: httpx.Response, status: int, type_: str, *words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == type_, err
    for w in words:
        assert w in err["message"], err


def post(srv: Server, path: str, body: bytes, timeout: float = 60, **params) -> httpx.Response:
    return httpx.post(
        srv.base + path, content=body, headers={"content-type": "audio/wav"}, params=params, timeout=timeout
    )


def test_a_tiny_hop_is_a_400_in_bounded_memory(server):
    body = wav_bytes(tone(3.0))  # ~96 KB, as in the report
    before = rss(server.proc.pid)
    r = post(server, "/v1/timeline", body, timeout=30, window=1, hop=0.00001)
    error_of(r, 400, "invalid_request", "hop", "0.01")
    # a hop that passes the minimum but makes more windows than the server allows
    error_of(
        post(server, "/v1/timeline", wav_bytes(tone(8.0)), window=1, hop=0.01), 400, "too_many_windows", "500"
    )
    assert rss(server.proc.pid, "VmHWM") - before < 512 * MIB
    assert server.alive
    assert post(server, "/v1/timeline", body, window=1, hop=0.5).status_code == 200


def test_a_tiny_hop_closes_the_stream_with_an_error(server):
    with ws_client.connect(f"{server.ws}/v1/stream?window=1&hop=0.00001", open_timeout=20) as ws:
        msg = json.loads(ws.recv(timeout=20))
        assert msg["type"] == "error" and msg["error"]["type"] == "invalid_request"
        assert "hop" in msg["error"]["message"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert ws.close_code == 1008
    assert server.alive


@pytest.mark.parametrize(
    "params, word",
    [
        ({"max_segment": "inf"}, "max_segment"),
        ({"max_segment": "nan"}, "max_segment"),
        ({"window": "nan"}, "window"),
        ({"hop": "inf"}, "hop"),
        ({"hop": "-inf"}, "hop"),
        ({"min_speech": "nan"}, "min_speech"),
    ],
)
def test_non_finite_parameters_are_400(server, params, word):
    r = post(server, "/v1/timeline", wav_bytes(tone(5.0)), **params)
    error_of(r, 400, "invalid_request", word)
    assert server.alive


@pytest.mark.parametrize("query", ["window=inf", "hop=nan", "sample_rate=inf", "window=1e309"])
def test_non_finite_stream_parameters_close_with_1008(server, query):
    with ws_client.connect(f"{server.ws}/v1/stream?{query}", open_timeout=20) as ws:
        msg = json.loads(ws.recv(timeout=20))
        assert msg["type"] == "error" and msg["error"]["type"] == "invalid_request", msg
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert ws.close_code == 1008
    assert server.alive


def test_stalled_uploads_neither_block_others_nor_stay(server):
    before = rss(server.proc.pid)
    stalled = [raw_request(server.port, "/v1/emotion", 100_000, b"RIFF") for _ in range(64)]
    trickle = raw_request(server.port, "/v1/emotion", 100_000, b"R")
    t0 = time.monotonic()
    metrics = httpx.get(server.base + "/metrics", timeout=10).text
    assert "serval_in_flight_requests 66" in metrics  # the 65 being received, and this one
    r = post(server, "/v1/emotion", wav_bytes(tone(2.0)), timeout=30)  # a well-behaved client
    assert r.status_code == 200, r.text
    # a client that sends a byte every 0.4 s never stalls for the timeout, but is far below the rate
    for _ in range(10):
        try:
            trickle.sendall(b"I")
        except OSError:
            break
        time.sleep(0.4)
    answers = [answer_of(s, 3 * UPLOAD_TIMEOUT) for s in [*stalled, trickle]]
    took = time.monotonic() - t0
    for a in answers:
        assert a == "" or a.startswith("HTTP/1.1 408"), a[:200]
    assert sum(a.startswith("HTTP/1.1 408") for a in answers) >= 60
    assert "upload_timeout" in answers[-1] and "stalled" in answers[-1]
    assert took < 8 * UPLOAD_TIMEOUT
    for s in [*stalled, trickle]:
        s.close()
    assert rss(server.proc.pid, "VmHWM") - before < 256 * MIB
    assert server.alive


def test_streams_are_capped_and_idle_ones_closed(server):
    url = f"{server.ws}/v1/stream"
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(ws_client.connect(url, open_timeout=20)) for _ in range(MAX_STREAMS)]
        for ws in opened:
            assert json.loads(ws.recv(timeout=20))["type"] == "ready"
        with ws_client.connect(url, open_timeout=20) as extra:
            msg = json.loads(extra.recv(timeout=20))
            assert msg["type"] == "error" and msg["error"]["type"] == "too_many_streams"
            with pytest.raises(ConnectionClosed):
                extra.recv(timeout=10)
        assert extra.close_code == 1013
        # the open ones send nothing: each is closed after the idle timeout, with a reason
        t0 = time.monotonic()
        for ws in opened:
            msg = json.loads(ws.recv(timeout=5 * IDLE))
            assert msg["type"] == "error" and msg["error"]["type"] == "stream_idle"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == 1008
        assert time.monotonic() - t0 < 5 * IDLE
    # room again: a stream that keeps sending is served to its summary
    pcm = (tone(5.0) * 32767).astype("<i2")
    with ws_client.connect(url, open_timeout=20) as ws:
        assert json.loads(ws.recv(timeout=20))["type"] == "ready"
        for i in range(0, len(pcm), 8000):
            ws.send(pcm[i : i + 8000].tobytes())
        ws.send("end")
        kinds = []
        while not kinds or kinds[-1] != "summary":
            kinds.append(json.loads(ws.recv(timeout=30))["type"])
    assert kinds.count("window") == 2 and kinds[-1] == "summary"
    assert server.alive


def test_a_stream_past_the_windows_limit_is_closed(server):
    # --max-windows 500 at a 0.01 s hop: 5 s of audio plus one window
    pcm = (tone(7.0) * 32767).astype("<i2")
    with ws_client.connect(f"{server.ws}/v1/stream?window=1&hop=0.01", open_timeout=20) as ws:
        assert json.loads(ws.recv(timeout=20))["type"] == "ready"
        msg = None
        try:
            for i in range(0, len(pcm), 16000):
                ws.send(pcm[i : i + 16000].tobytes())
            while (msg := json.loads(ws.recv(timeout=30)))["type"] == "window":
                pass
        except ConnectionClosed:
            pass
    assert msg is not None and msg["type"] == "error" and msg["error"]["type"] == "too_many_windows", msg
    assert ws.close_code == 1008
    assert server.alive


def test_clients_leaving_mid_upload_leave_no_trace(server):
    for _ in range(8):
        s = raw_request(server.port, "/v1/emotion", 100_000, b"RIFF" + bytes(1000))
        s.close()
    time.sleep(0.5)
    metrics = httpx.get(server.base + "/metrics", timeout=10).text
    assert 'status="500"' not in metrics and "Traceback" not in server.log.read_text()
    assert server.alive
