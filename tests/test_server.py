"""`serval serve` over real HTTP and WebSocket on loopback, with a tiny random model and real clips.

Most tests share one server started with the real CLI in a subprocess; the batching, queue and
shutdown tests run uvicorn in a thread around a predictor that can be held inside a model call,
so the state they check (requests waiting, a request in flight) is certain, not a race.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO, clips

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
ws_client = pytest.importorskip("websockets.sync.client")
ConnectionClosed = pytest.importorskip("websockets.exceptions").ConnectionClosed

from pydantic import TypeAdapter  # noqa: E402

import serval  # noqa: E402
from serval import vocab  # noqa: E402
from serval.audio import SAMPLE_RATE, load_audio, resample  # noqa: E402
from serval.inference import load  # noqa: E402
from serval.serve.app import create_app  # noqa: E402
from serval.serve.batching import MicroBatcher  # noqa: E402
from serval.serve.config import ServerConfig  # noqa: E402
from serval.timeline import grid_timeline  # noqa: E402
from serval.vocab import DIMENSIONS  # noqa: E402
from serval.windows import WindowSpec, window_grid  # noqa: E402

# Records are rounded to 6 decimals. The tiny random model's probabilities are near-uniform: different clips
# differ by only ~5e-4 (checked below), and fp32 sum orders (CPU, batch, engine) move them by ~1e-7.
TOL = 5e-6
# bytes that are no audio: no audio header at their start (checked in the test of raw bodies)
GARBAGE = np.random.default_rng(0).bytes(5000)


# ---------------------------------------------------------------------------- helpers and fixtures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_bytes(wave: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def speech(n: int) -> np.ndarray:
    """n real RAVDESS clips of different emotions, one after the other (16 kHz float32)."""
    return np.concatenate([load_audio(p) for p in clips("ravdess", "Actor_02/*.flac", n=n)])


def probs_of(record: dict, classes) -> np.ndarray:
    return np.array([record["probabilities"][c] for c in classes])


def scores_of(record: dict, dims) -> np.ndarray:
    return np.array([record["scores"][d] for d in dims])


def assert_error(r, status: int, type_: str, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == type_, body
    for w in words:
        assert w in body["error"]["message"], body


def wait_healthy(base: str, proc: subprocess.Popen | None, log: Path | None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server did not come up in {timeout} s:\n{log.read_text() if log else ''}")


@pytest.fixture(scope="module")
def predictor(model_dir):
    return load(model_dir, device="cpu")


def start_cli_server(model_dir: Path, log: Path, *extra: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "serval", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--device", "cpu", "--host", "127.0.0.1", "--log-level", "warning", *extra]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
    except Exception:
        proc.kill()
        raise
    return base, proc


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """The real `serval serve` in a subprocess, with small limits so the 413s are cheap to reach."""
    log = tmp_path_factory.mktemp("log") / "server.log"
    base, proc = start_cli_server(
        model_dir, log, "--max-upload-mb", "2", "--max-clip-seconds", "10", "--max-timeline-seconds", "40"
    )
    yield base, proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


class GatedPredictor:
    """A real predictor whose model calls can be held at a gate; records every batch size."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.classes, self.dimensions, self.name = predictor.classes, predictor.dimensions, predictor.name
        self.config = predictor.config
        self.trained_dimensions = predictor.trained_dimensions
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()
        self.batches: list[int] = []

    def predict_waveforms(self, waves, batch_size: int = 16, progress: bool = False):
        self.batches.append(len(waves))
        self.inside.set()
        assert self.gate.wait(30), "gate never opened"
        return self.predictor.predict_waveforms(waves, batch_size=batch_size)

    def record(self, probs, scores, keep=None):
        return self.predictor.record(probs, scores, keep)


class ThreadServer:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=20
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_healthy(self.base, None, None, timeout=30)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# ---------------------------------------------------------------------------- endpoints


def test_emotion_is_the_predict_record(served, predictor, ravdess_clips, emodb_clips):
    base, _ = served
    paths = [ravdess_clips[0], ravdess_clips[3], emodb_clips[0]]
    expected = predictor.predict([str(p) for p in paths])
    got = []
    with httpx.Client(base_url=base, timeout=60) as c:
        for p, want in zip(paths, expected):
            r = c.post("/v1/emotion", files={"file": (p.name, p.read_bytes(), "audio/flac")})
            assert r.status_code == 200, r.text
            rec = r.json()
            assert set(rec) == {
                "file",
                "duration",
                "pieces",
                "label",
                "probabilities",
                "scores",
                "speech_fraction",
                "no_speech",
            }
            assert rec["pieces"] == want["pieces"] == 1
            assert rec["file"] == p.name and rec["duration"] == want["duration"]
            assert rec["no_speech"] is want["no_speech"] is False
            assert rec["speech_fraction"] == pytest.approx(want["speech_fraction"], abs=2e-3)
            np.testing.assert_allclose(
                probs_of(rec, predictor.classes), probs_of(want, predictor.classes), atol=TOL
            )
            np.testing.assert_allclose(
                scores_of(rec, predictor.dimensions), scores_of(want, predictor.dimensions), atol=TOL
            )
            assert rec["label"] == max(rec["probabilities"], key=rec["probabilities"].get)
            got.append(probs_of(rec, predictor.classes))
        # the clips really differ by more than the tolerance, so a mixed-up answer would show
        assert np.abs(got[0] - got[1]).max() > 20 * TOL and np.abs(got[0] - got[2]).max() > 20 * TOL

        # raw body with its content type, a class subset renormalised over, and a name for the record
        p = paths[0]
        r = c.post(
            "/v1/emotion",
            content=p.read_bytes(),
            headers={"content-type": "audio/flac"},
            params={"classes": "neutral,angry,sad,happy", "filename": "call-17.flac"},
        )
        assert r.status_code == 200, r.text
        rec = r.json()
        assert rec["file"] == "call-17.flac"
        assert list(rec["probabilities"]) == ["neutral", "angry", "sad", "happy"]
        full = expected[0]["probabilities"]
        total = sum(full[k] for k in rec["probabilities"])
        for k, v in rec["probabilities"].items():
            assert v == pytest.approx(full[k] / total, abs=TOL)

        # another sample rate and format: a 44.1 kHz float WAV is resampled like any file
        wave = load_audio(paths[1])
        body = wav_bytes(resample(wave, 16000, 44100), 44100, "FLOAT")
        r = c.post("/v1/emotion", content=body, headers={"content-type": "audio/wav"})
        assert r.status_code == 200, r.text
        assert r.json()["duration"] == pytest.approx(len(wave) / 16000, abs=0.002)


@pytest.mark.slow
def test_timeline_is_the_timeline_json(served, predictor, tmp_path):
    base, _ = served
    wave = speech(5)  # ~18 s of real speech
    body = wav_bytes(wave)
    decoded = load_audio(body)  # what the server sees: the 16-bit samples
    r = httpx.post(
        f"{base}/v1/timeline",
        content=body,
        headers={"content-type": "audio/wav"},
        params={"window": 3, "hop": 1.5, "max_segment": 6, "filename": "talk.wav"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    got = r.json()
    want = grid_timeline(decoded, predictor, WindowSpec(window=3.0, hop=1.5, min_length=0.5, max_segment=6.0))
    assert got["file"] == "talk.wav" and got["duration"] == round(len(decoded) / 16000, 3)
    assert got["grid"] == {"window": 3.0, "hop": 1.5, "min_length": 0.5} and got["max_segment"] == 6.0
    assert set(got) - {"duration", "overall"} == set(want)
    grid = window_grid(len(decoded) / 16000, WindowSpec(window=3.0, hop=1.5, min_length=0.5))
    assert [(w["start"], w["end"]) for w in got["windows"]] == [(round(a, 3), round(b, 3)) for a, b in grid]
    for g, w in zip(got["windows"], want["windows"]):
        np.testing.assert_allclose(probs_of(g, predictor.classes), probs_of(w, predictor.classes), atol=TOL)
    assert [(s["start"], s["end"], s["label"], s["windows"]) for s in got["segments"]] == [
        (s["start"], s["end"], s["label"], s["windows"]) for s in want["segments"]
    ]
    # segments tile the recording without gaps and respect the maximum length
    segs = got["segments"]
    assert segs[0]["start"] == 0 and segs[-1]["end"] == pytest.approx(got["duration"], abs=1e-3)
    assert all(a["end"] == b["start"] for a, b in zip(segs, segs[1:]))
    assert all(s["end"] - s["start"] <= 6.0 + 1e-6 for s in segs)
    # the whole recording: the windows' probabilities and scores, weighted by their durations
    wins = want["windows"]
    weights = np.array([w["end"] - w["start"] for w in wins])
    for key, names in (("probabilities", predictor.classes), ("scores", predictor.dimensions)):
        values = np.array([[w[key][n] for n in names] for w in wins])
        mean = weights @ values / weights.sum()
        np.testing.assert_allclose([got["overall"][key][n] for n in names], mean, atol=TOL)
    top = int(np.argmax(probs_of(got["overall"], predictor.classes)))
    assert got["overall"]["label"] == predictor.classes[top]


def test_model_health_metrics_openapi(served, predictor, ravdess_clips):
    base, _ = served
    with httpx.Client(base_url=base, timeout=30) as c:
        info = c.get("/v1/model").json()
        assert info["name"] == "tiny" and info["classes"] == list(predictor.classes)
        assert info["dimensions"] == ["arousal", "valence", "dominance"] and "backbone" in info
        assert info["version"] == __import__("serval").__version__
        assert info["limits"]["max_clip_seconds"] == 10 and info["batching"]["max_batch"] == 16
        # /health is /healthz under the name most probes try first
        for path in ("/healthz", "/health"):
            r = c.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.json()["status"] == "ok" and set(r.json()) == {"status", "queue"}

        before = c.get("/metrics").text
        ok = c.post("/v1/emotion", files={"file": ("a.flac", ravdess_clips[1].read_bytes())})
        assert ok.status_code == 200
        bad = c.post("/v1/emotion", content=b"hello", headers={"content-type": "text/plain"})
        assert bad.status_code == 415
        m = c.get("/metrics")
        assert m.headers["content-type"].startswith("text/plain")
        after = m.text
        key = 'serval_requests_total{endpoint="/v1/emotion",status="200"}'
        assert metric(after, key) == metric(before, key) + 1
        err = 'serval_errors_total{endpoint="/v1/emotion",type="unsupported_media_type"}'
        assert metric(after, err) == metric(before, err) + 1
        assert metric(after, "serval_batch_size_count") >= metric(before, "serval_batch_size_count") + 1
        lat = 'serval_request_duration_seconds_count{endpoint="/v1/emotion"}'
        assert metric(after, lat) >= metric(before, lat) + 2
        assert "# TYPE serval_request_duration_seconds histogram" in after
        assert 'serval_batch_size_bucket{le="+Inf"}' in after

        schema = c.get("/openapi.json").json()
        paths = {"/v1/emotion", "/v1/timeline", "/v1/model", "/health", "/healthz", "/metrics"}
        assert paths <= set(schema["paths"])
        assert 'serval_requests_total{endpoint="/health",status="200"}' in after
        body = schema["paths"]["/v1/emotion"]["post"]["requestBody"]["content"]
        assert "multipart/form-data" in body and "audio/*" in body
        assert {"413", "415", "422", "503"} <= set(schema["paths"]["/v1/emotion"]["post"]["responses"])
        assert c.get("/docs").status_code == 200


def test_bad_input_gets_clear_errors_and_the_server_lives_on(served, ravdess_clips, tmp_path):
    base, proc = served
    good = ravdess_clips[2].read_bytes()
    with httpx.Client(base_url=base, timeout=60) as c:

        def post(content=None, ctype="audio/flac", path="/v1/emotion", **kw):
            headers = {"content-type": ctype} if ctype else {}
            return c.post(path, content=content, headers=headers, **kw)

        # corrupt: a real FLAC cut short, and bytes that are no audio at all
        assert_error(post(good[:3000], params={"filename": "cut.flac"}), 422, "truncated_audio", "cut.flac")
        assert_error(post(GARBAGE, "audio/wav"), 422, "unsupported_audio", "upload")
        assert_error(post(b""), 422, "empty_audio")
        assert_error(post(wav_bytes(np.zeros(800, np.float32))), 422, "audio_too_short")
        # the API takes bytes only: a path in the body is decoded as bytes, never opened
        assert_error(post(str(ravdess_clips[2]).encode()), 422, "unsupported_audio")
        # wrong content types
        assert_error(
            c.post("/v1/emotion", json={"path": str(ravdess_clips[2])}), 415, "unsupported_media_type"
        )
        assert_error(post(good, "text/plain"), 415, "unsupported_media_type", "text/plain")
        r = c.post("/v1/emotion", files={"file": ("notes.txt", b"some text", "text/plain")})
        assert_error(r, 415, "unsupported_media_type", "text/plain")
        assert_error(
            c.post("/v1/emotion", files={"other": ("a", b"x", "application/json")}, data={"k": "v"}),
            415,
            "unsupported_media_type",
        )
        assert_error(
            c.post("/v1/emotion", files={}, data={"file": "not a file"}), 415, "unsupported_media_type"
        )
        r = c.post(
            "/v1/emotion",
            content=b'--xx\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--xx--\r\n',
            headers={"content-type": "multipart/form-data; boundary=xx"},
        )
        assert_error(r, 400, "invalid_request", "'file'")
        # too large an upload (2 MB limit), and too long an audio (10 s limit) for the endpoint
        big = wav_bytes(np.tile(load_audio(ravdess_clips[2]), 25))  # ~90 s, ~2.8 MB
        assert len(big) > 2 * 2**20
        assert_error(post(big, "audio/wav"), 413, "upload_too_large")
        long = wav_bytes(speech(4))  # ~14 s, ~0.45 MB
        assert_error(
            post(long, "audio/wav", params={"filename": "long.wav"}), 413, "audio_too_long", "long.wav"
        )
        assert post(long, "audio/wav", path="/v1/timeline").status_code == 200  # the timeline takes it
        # a timeline of a file that breaks part-way: the header is fine, the samples run out
        buf = io.BytesIO()
        sf.write(buf, speech(4), 16000, format="FLAC")
        cut = buf.getvalue()[: len(buf.getvalue()) // 2]
        assert_error(
            post(cut, path="/v1/timeline", params={"filename": "cut.flac"}),
            422,
            "truncated_audio",
            "cut.flac",
        )
        assert_error(
            post(wav_bytes(np.zeros(4000, np.float32)), "audio/wav", path="/v1/timeline"),
            422,
            "audio_too_short",
        )
        # bad parameters
        assert_error(post(good, params={"classes": "neutral,bored"}), 400, "invalid_request", "bored")
        assert_error(
            post(good, path="/v1/timeline", params={"window": 2, "hop": 3}), 400, "invalid_request", "hop"
        )
        assert_error(c.get("/v1/nothing"), 404, "not_found")
        # still alive and still right
        assert proc.poll() is None
        assert c.get("/healthz").status_code == 200
        assert c.post("/v1/emotion", content=good, headers={"content-type": "audio/flac"}).status_code == 200


def encoded(wave: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def raw_bodies(ravdess_clips) -> dict[str, bytes]:
    """Real clips as the bytes of a file in each format a raw upload may hold."""
    flac = ravdess_clips[4]
    pcm, sr = sf.read(flac, dtype="int16")
    mp3 = encoded(load_audio(flac), "MP3")  # libsndfile writes MPEG frames with no tag before them
    id3 = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + bytes(10)  # an ID3v2.4 tag of 10 padding bytes
    return {
        "wav": wav_bytes(pcm, sr),
        "flac": flac.read_bytes(),
        "opus": clips("nemo", "EB0/*.opus", n=1)[0].read_bytes(),  # Ogg Opus
        "mp3": mp3,
        "id3+mp3": id3 + mp3,
        "au": encoded(load_audio(flac), "AU"),  # no header serval knows: libsndfile reads it
    }


@pytest.mark.slow
def test_raw_bodies_are_recognised_by_their_bytes(served, predictor, raw_bodies):
    from serval.audio import sniff_format

    base, _ = served
    heads = {k: sniff_format(v[:16]) for k, v in raw_bodies.items()}
    assert heads == {
        "wav": "WAV", "flac": "FLAC", "opus": "OGG", "mp3": "MP3", "id3+mp3": "MP3", "au": None
    }  # fmt: skip
    with httpx.Client(base_url=base, timeout=60) as c:
        for kind, body in raw_bodies.items():
            want = predictor.predict([load_audio(body)])[0]
            # no content type at all, the generic binary one, and the form type curl --data-binary sends
            for ctype in (None, "application/octet-stream", "application/x-www-form-urlencoded"):
                headers = {"content-type": ctype} if ctype else {}
                r = c.post("/v1/emotion", content=body, headers=headers, params={"filename": f"a.{kind}"})
                assert r.status_code == 200, (kind, ctype, r.text)
                assert r.request.headers.get("content-type") == ctype
                rec = r.json()
                assert rec["file"] == f"a.{kind}" and rec["label"] == want["label"], (kind, ctype)
                np.testing.assert_allclose(
                    probs_of(rec, predictor.classes), probs_of(want, predictor.classes), atol=TOL
                )
            r = c.post("/v1/timeline", content=body)  # the timeline takes them too
            assert r.status_code == 200 and r.json()["windows"], (kind, r.text)
        # a multipart file part of a generic type is recognised the same way
        files = {"file": ("clip", raw_bodies["flac"], "application/octet-stream")}
        assert c.post("/v1/emotion", files=files).status_code == 200
        files = {"file": ("clip", raw_bodies["opus"], "")}
        assert c.post("/v1/emotion", files=files).status_code == 200

        # bytes that are not audio: a 415 that says so, whatever generic type they came with
        assert sniff_format(GARBAGE[:16]) is None
        for ctype in (None, "application/octet-stream"):
            r = c.post("/v1/emotion", content=GARBAGE, headers={"content-type": ctype} if ctype else {})
            head = repr(GARBAGE[:8])
            assert_error(r, 415, "unsupported_media_type", "upload: sent with", "not audio", head)
        r = c.post("/v1/emotion", data={"file": "not a file"})  # a real HTML form, not a file
        assert_error(r, 415, "unsupported_media_type", "'application/x-www-form-urlencoded'", "b'file=not'")
        r = c.post("/v1/timeline", content=b"hello world", params={"filename": "notes.txt"})
        assert_error(r, 415, "unsupported_media_type", "notes.txt: sent with no content type", "not audio")
        r = c.post("/v1/emotion", files={"file": ("noise.bin", GARBAGE, "application/octet-stream")})
        assert_error(r, 415, "unsupported_media_type", "noise.bin")
        # bytes that announce audio but break are audio errors, with the decoder's reason
        assert_error(c.post("/v1/emotion", content=raw_bodies["flac"][:3000]), 422, "truncated_audio")
        assert_error(c.post("/v1/emotion", content=b""), 422, "empty_audio")
        # a declared type that is not audio is refused before the body is looked at
        r = c.post("/v1/emotion", content=raw_bodies["wav"], headers={"content-type": "text/plain"})
        assert_error(r, 415, "unsupported_media_type", "text/plain")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_data_binary_just_works(served, predictor, raw_bodies, tmp_path):
    base, _ = served
    path = tmp_path / "a.wav"
    path.write_bytes(raw_bodies["wav"])
    done = subprocess.run(
        ["curl", "-sS", "--data-binary", f"@{path}", f"{base}/v1/emotion"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rec = json.loads(done.stdout)
    want = predictor.predict([load_audio(path)])[0]
    assert rec["file"] == "upload" and rec["label"] == want["label"], rec
    np.testing.assert_allclose(probs_of(rec, predictor.classes), probs_of(want, predictor.classes), atol=TOL)


# ---------------------------------------------------------------------------- streaming


def test_stream_answers_per_window_before_the_end(served, predictor):
    base, _ = served
    wave = speech(3)  # ~11 s
    pcm = np.clip(np.round(wave * 32768), -32768, 32767).astype("<i2")
    heard = pcm.astype(np.float32) / 32768  # exactly what the server decodes
    chunk = 4000  # 0.25 s frames
    url = base.replace("http", "ws") + "/v1/stream?window=4&hop=2"
    windows = []
    with ws_client.connect(url, open_timeout=20) as ws:
        ready = json.loads(ws.recv(timeout=20))
        assert ready["type"] == "ready" and ready["sample_rate"] == 16000 and ready["window"] == 4.0
        first_window_end = 4 * 16000
        sent = 0
        while sent < first_window_end + chunk:
            ws.send(pcm[sent : sent + chunk].tobytes())
            sent += chunk
        # the first window's result arrives while the stream is still open and most audio unsent
        msg = json.loads(ws.recv(timeout=30))
        assert msg["type"] == "window" and (msg["start"], msg["end"]) == (0.0, 4.0)
        windows.append(msg)
        # odd frame sizes: samples split across frames must be put back together
        rest = pcm[sent:].tobytes()
        for i in range(0, len(rest), 3001):
            ws.send(rest[i : i + 3001])
        ws.send(json.dumps({"type": "end"}))
        while True:
            msg = json.loads(ws.recv(timeout=30))
            if msg["type"] == "summary":
                break
            assert msg["type"] == "window"
            windows.append(msg)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)  # the server closes after the summary
        assert ws.close_code == 1000
    duration = len(pcm) / 16000
    grid = window_grid(duration, WindowSpec(window=4.0, hop=2.0, min_length=0.5))
    assert [(w["start"], w["end"]) for w in windows] == [(round(a, 3), round(b, 3)) for a, b in grid]
    assert [w["index"] for w in windows] == list(range(len(windows)))
    expected, _ = predictor.predict_waveforms([heard[round(a * 16000) : round(b * 16000)] for a, b in grid])
    for w, p in zip(windows, expected):
        np.testing.assert_allclose(probs_of(w, predictor.classes), p, atol=TOL)
    assert msg["duration"] == pytest.approx(duration, abs=1e-3) and msg["windows"] == len(windows)
    segs = msg["segments"]
    assert segs[0]["start"] == 0 and segs[-1]["end"] == pytest.approx(duration, abs=1e-3)
    assert all(a["end"] == b["start"] for a, b in zip(segs, segs[1:]))
    assert sum(s["windows"] for s in segs) == len(windows)
    assert msg["overall"]["label"] in predictor.classes


def test_stream_at_a_declared_rate(served, predictor):
    base, _ = served
    wave = speech(2)
    x8 = resample(wave, 16000, 8000)
    with ws_client.connect(base.replace("http", "ws") + "/v1/stream?sample_rate=8000&encoding=f32le") as ws:
        assert json.loads(ws.recv(timeout=20))["sample_rate"] == 8000
        for i in range(0, len(x8), 1000):
            ws.send(x8[i : i + 1000].astype("<f4").tobytes())
        ws.send("end")
        msgs = []
        while not msgs or msgs[-1]["type"] != "summary":
            msgs.append(json.loads(ws.recv(timeout=30)))
    assert msgs[-1]["duration"] == pytest.approx(len(x8) / 8000, abs=0.01)
    assert [(m["start"], m["end"]) for m in msgs[:-1]] == [
        (round(a, 3), round(b, 3))
        for a, b in window_grid(msgs[-1]["duration"], WindowSpec(window=4.0, hop=2.0, min_length=0.5))
    ]


@pytest.mark.parametrize(
    "query, send, code, kind",
    [
        ("?window=4&hop=9", None, 1008, "invalid_request"),
        ("?encoding=mp3", None, 1008, "invalid_request"),
        ("", "hello", 1003, "invalid_request"),
        ("?encoding=f32le", np.array([0.1, np.nan, 0.2], "<f4").tobytes(), 1007, "invalid_audio"),
    ],
    ids=["hop>window", "unknown-encoding", "text-frame", "nan-samples"],
)
def test_stream_errors(served, query, send, code, kind):
    base, proc = served
    with ws_client.connect(base.replace("http", "ws") + "/v1/stream" + query) as ws:
        msg = json.loads(ws.recv(timeout=20))
        if send is not None:
            assert msg["type"] == "ready"
            ws.send(send)
            msg = json.loads(ws.recv(timeout=20))
        assert msg["type"] == "error" and msg["error"]["type"] == kind and msg["error"]["message"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == code
    assert proc.poll() is None


def test_timeline_and_stream_default_to_the_servers_grid(predictor):
    app = create_app(predictor, ServerConfig(window=3.0, hop=1.0, max_segment=5.0))
    body = wav_bytes(speech(2))
    with ThreadServer(app) as srv, httpx.Client(base_url=srv.base, timeout=60) as c:

        def grid(**params):
            r = c.post("/v1/timeline", content=body, headers={"content-type": "audio/wav"}, params=params)
            assert r.status_code == 200, r.text
            return r.json()["grid"], r.json()["max_segment"]

        assert grid() == ({"window": 3.0, "hop": 1.0, "min_length": 0.5}, 5.0)
        # a request's own values win; the shortest final window never exceeds the window
        assert grid(window=0.4, hop=0.2, max_segment=8) == (
            {"window": 0.4, "hop": 0.2, "min_length": 0.4},
            8.0,
        )
        with ws_client.connect(srv.base.replace("http", "ws") + "/v1/stream") as ws:
            ready = json.loads(ws.recv(timeout=20))
        assert (ready["window"], ready["hop"]) == (3.0, 1.0)


def test_a_clip_without_speech_has_no_label_unless_the_server_says(predictor, ravdess_clips):
    t = np.arange(32000) / 16000
    silent = {"silence.wav": np.zeros(32000, np.float32), "tone.wav": 0.5 * np.sin(2 * np.pi * 440 * t)}
    for label_no_speech in (False, True):
        app = create_app(predictor, ServerConfig(label_no_speech=label_no_speech))
        with ThreadServer(app) as srv, httpx.Client(base_url=srv.base, timeout=60) as c:
            for name, wave in silent.items():
                r = c.post("/v1/emotion", files={"file": (name, wav_bytes(wave), "audio/wav")})
                assert r.status_code == 200, r.text
                rec = r.json()
                assert rec["no_speech"] is True and rec["speech_fraction"] < 0.1
                assert sum(rec["probabilities"].values()) == pytest.approx(1, abs=1e-4)
                top = max(rec["probabilities"], key=rec["probabilities"].get)
                assert rec["label"] == (top if label_no_speech else None)
            r = c.post("/v1/emotion", files={"file": ("a.flac", ravdess_clips[0].read_bytes())})
            assert r.json()["no_speech"] is False and r.json()["label"] is not None
            schema = c.get("/openapi.json").json()["components"]["schemas"]["EmotionRecord"]["properties"]
            assert "null when no_speech" in schema["label"]["description"]
            assert "Silero VAD" in schema["speech_fraction"]["description"]


# ---------------------------------------------------------------------------- batching, queue, shutdown


def test_concurrent_requests_share_model_calls(predictor, ravdess_clips):
    gated = GatedPredictor(predictor)
    app = create_app(gated, ServerConfig(max_batch=8, max_wait_ms=5, max_queue=16))
    paths = ravdess_clips[:6]
    expected = predictor.predict([str(p) for p in paths])
    with (
        ThreadServer(app) as srv,
        ThreadPoolExecutor(6) as pool,
        httpx.Client(base_url=srv.base, timeout=60) as c,
    ):

        def ask(p: Path):
            return c.post(
                "/v1/emotion",
                content=p.read_bytes(),
                headers={"content-type": "audio/flac"},
                params={"filename": p.name},
            )

        gated.gate.clear()
        first = pool.submit(ask, paths[0])
        assert gated.inside.wait(20)  # the first request is inside the model, alone
        rest = [pool.submit(ask, p) for p in paths[1:]]
        wait_until(lambda: metric(c.get("/metrics").text, "serval_queue_depth") == 5)
        gated.gate.set()
        answers = [f.result(60) for f in [first, *rest]]
    assert gated.batches == [1, 5]  # the five that waited went through in one model call
    for r, p, want in zip(answers, paths, expected):
        assert r.status_code == 200 and r.json()["file"] == p.name
        np.testing.assert_allclose(
            probs_of(r.json(), predictor.classes), probs_of(want, predictor.classes), atol=TOL
        )


def test_full_queue_answers_503_with_retry_after(predictor, ravdess_clips):
    gated = GatedPredictor(predictor)
    app = create_app(gated, ServerConfig(max_batch=1, max_wait_ms=0, max_queue=2, retry_after=3))
    body = ravdess_clips[0].read_bytes()
    with (
        ThreadServer(app) as srv,
        ThreadPoolExecutor(3) as pool,
        httpx.Client(base_url=srv.base, timeout=60) as c,
    ):

        def ask():
            return c.post("/v1/emotion", content=body, headers={"content-type": "audio/flac"})

        gated.gate.clear()
        held = [pool.submit(ask)]
        assert gated.inside.wait(20)
        held += [pool.submit(ask), pool.submit(ask)]
        wait_until(lambda: metric(c.get("/metrics").text, "serval_queue_depth") == 2)
        r = ask()
        assert_error(r, 503, "server_busy")
        assert r.headers["retry-after"] == "3"
        with ws_client.connect(srv.base.replace("http", "ws") + "/v1/stream") as ws:
            assert json.loads(ws.recv(timeout=20))["error"]["type"] == "server_busy"
        gated.gate.set()
        assert [f.result(60).status_code for f in held] == [200, 200, 200]
        assert ask().status_code == 200  # room again


def test_uploads_being_received_hold_no_place_in_the_model_queue(predictor, ravdess_clips):
    # an upload in progress does not take the queue's one place, but --max-receiving bounds them
    app = create_app(predictor, ServerConfig(max_queue=1, max_receiving=2))
    body = ravdess_clips[0].read_bytes()
    started, release = threading.Event(), threading.Event()

    def slow_body():
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]
            started.set()
            assert release.wait(30)

    with (
        ThreadServer(app) as srv,
        ThreadPoolExecutor(2) as pool,
        httpx.Client(base_url=srv.base, timeout=60) as c,
    ):
        slow = pool.submit(c.post, "/v1/emotion", content=slow_body(), headers={"content-type": "audio/flac"})
        assert started.wait(20)
        wait_until(lambda: metric(c.get("/metrics").text, "serval_in_flight_requests") >= 2)
        r = c.post("/v1/emotion", content=body, headers={"content-type": "audio/flac"})
        assert r.status_code == 200, r.text  # the queue's place is free while the other one uploads
        started.clear()
        slow2 = pool.submit(
            c.post, "/v1/emotion", content=slow_body(), headers={"content-type": "audio/flac"}
        )
        assert started.wait(20)
        wait_until(lambda: metric(c.get("/metrics").text, "serval_in_flight_requests") >= 3)
        r = c.post("/v1/emotion", content=body, headers={"content-type": "audio/flac"})
        assert_error(r, 503, "server_busy")  # two uploads are being received: no room for a third
        release.set()
        assert slow.result(60).status_code == 200 and slow2.result(60).status_code == 200
        assert c.post("/v1/emotion", content=body, headers={"content-type": "audio/flac"}).status_code == 200


UPLOAD_PEAK = """
import asyncio, os, sys
from starlette.requests import Request
from serval.serve.uploads import read_limited
chunk, n = os.urandom(65536), 512  # a 32 MiB body in the 64 KiB chunks a server receives
sent = [0]
async def receive():
    sent[0] += 1
    return {"type": "http.request", "body": bytes(memoryview(chunk)), "more_body": sent[0] < n}
def peak_kib():  # this process's own peak: ru_maxrss starts from the parent's (pytest's) after a fork
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
async def read():  # measured inside the loop: asyncio.run's teardown has a peak of its own
    before = peak_kib()
    body = await read_limited(Request({"type": "http", "method": "POST", "headers": []}, receive), 2**30)
    added = (peak_kib() - before) / 1024
    with body:
        assert body.size == n * len(chunk) and os.path.dirname(body.path) == sys.argv[1]
        with body.open("upload") as fh:  # the file holds the body as it was sent
            assert all(fh.read(len(chunk)) == chunk for _ in range(n)) and fh.read() == b""
    assert not os.path.exists(body.path)
    print(added)
asyncio.run(read())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_a_large_upload_is_spooled_to_a_file_not_held_in_memory(tmp_path):
    # a 40-minute FLAC is 31 MB: reading it must add far less than its size (it goes to a file in
    # TMPDIR as it arrives), and the file is the body, removed when the upload is closed
    done = subprocess.run(
        [sys.executable, "-c", UPLOAD_PEAK, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    added_mib = float(done.stdout.split()[-1])
    assert added_mib < 8, f"reading a 32 MiB upload added {added_mib:.0f} MiB"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def spooled(monkeypatch, tmp_path):
    """Where uploads are spooled during a test (a folder of its own), and every file made there."""
    import tempfile

    made = []
    mkstemp = tempfile.mkstemp

    def recorded(*args, **kwargs):
        fd, path = mkstemp(*args, **{**kwargs, "dir": tmp_path})
        made.append(Path(path))
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", recorded)
    return made


def test_a_spooled_upload_gives_the_results_of_one_held_in_memory(predictor, spooled, monkeypatch):
    from serval.serve import uploads

    # 40 s of 16-bit WAV is 1.3 MB, past the 1 MiB kept in memory: both endpoints read it from a file
    body = wav_bytes(np.tile(speech(3), 4)[: 40 * SAMPLE_RATE])
    with ThreadServer(create_app(predictor, ServerConfig())) as srv:
        answers = {}
        for spool in (2 * len(body), uploads.SPOOL_BYTES):  # in memory, then (as by default) in a file
            monkeypatch.setattr(uploads, "SPOOL_BYTES", spool)
            answers[spool] = [
                httpx.post(
                    f"{srv.base}{path}", content=body, headers={"content-type": "audio/wav"}, timeout=120
                )
                for path in ("/v1/emotion", "/v1/timeline")
            ]
        # a WAV cut short (its header announces 80 s, 1.5 MB are sent): 422, and its file removed too
        broken = wav_bytes(np.tile(speech(3), 8)[: 80 * SAMPLE_RATE])[:1_500_000]
        bad = httpx.post(f"{srv.base}/v1/timeline", content=broken, headers={"content-type": "audio/wav"})
    in_memory, on_disk = answers.values()
    assert len(spooled) == 3 and not any(p.exists() for p in spooled)  # two good uploads, one broken
    assert [r.status_code for r in on_disk + in_memory] == [200] * 4 and bad.status_code == 422
    assert "serval-upload" not in bad.text and "upload" in bad.json()["error"]["message"]  # named as sent
    clip, memo = on_disk[0].json(), in_memory[0].json()
    assert clip["pieces"] == 2 and clip["duration"] == memo["duration"] == 40.0
    np.testing.assert_allclose(probs_of(clip, predictor.classes), probs_of(memo, predictor.classes), atol=TOL)
    timeline, memo = on_disk[1].json(), in_memory[1].json()
    assert len(timeline["windows"]) == len(memo["windows"]) == 19
    for w, m in zip(timeline["windows"], memo["windows"], strict=True):
        assert (w["start"], w["end"]) == (m["start"], m["end"])
        np.testing.assert_allclose(probs_of(w, predictor.classes), probs_of(m, predictor.classes), atol=TOL)


def test_shutdown_finishes_in_flight_requests(predictor, ravdess_clips):
    gated = GatedPredictor(predictor)
    app = create_app(gated, ServerConfig())
    srv = ThreadServer(app).__enter__()
    with ThreadPoolExecutor(1) as pool:
        gated.gate.clear()
        job = pool.submit(
            httpx.post,
            f"{srv.base}/v1/emotion",
            content=ravdess_clips[0].read_bytes(),
            headers={"content-type": "audio/flac"},
            timeout=60,
        )
        assert gated.inside.wait(20)
        srv.server.should_exit = True  # what SIGTERM/SIGINT do
        wait_until(lambda: _refused(srv.base))  # no new connections while draining
        assert srv.thread.is_alive()  # ... but the one in flight is still being served
        gated.gate.set()
        r = job.result(60)
    assert r.status_code == 200 and r.json()["label"] in predictor.classes
    srv.thread.join(30)
    assert not srv.thread.is_alive()


def _refused(base: str) -> bool:
    try:
        httpx.get(f"{base}/healthz", timeout=1)
    except httpx.TransportError:
        return True
    return False


@pytest.mark.slow
def test_sigterm_lets_a_slow_upload_finish(model_dir, tmp_path, ravdess_clips):
    base, proc = start_cli_server(model_dir, tmp_path / "server.log")
    body = ravdess_clips[1].read_bytes()
    sent_first = threading.Event()

    def slow_body():
        for i in range(0, len(body), 16384):
            yield body[i : i + 16384]
            sent_first.set()
            time.sleep(0.15)

    try:
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(
                httpx.post,
                f"{base}/v1/emotion",
                content=slow_body(),
                headers={"content-type": "audio/flac"},
                timeout=60,
            )
            assert sent_first.wait(20)
            # the upload is being received (the /metrics request itself is the other one in flight)
            wait_until(lambda: metric(httpx.get(f"{base}/metrics").text, "serval_in_flight_requests") >= 2)
            proc.send_signal(signal.SIGTERM)  # mid-upload
            r = job.result(60)
        assert r.status_code == 200, r.text
        assert r.json()["duration"] == pytest.approx(sf.info(str(ravdess_clips[1])).duration, abs=1e-3)
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit is "killed by SIGTERM"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_batcher_round_robins_long_requests():
    import asyncio

    calls: list[list[int]] = []

    def predict(waves):
        calls.append([int(w[0]) for w in waves])
        x = np.array([[w[0]] for w in waves], np.float32)
        return x, -x

    async def main():
        b = MicroBatcher(predict, max_batch=4, max_wait=0.05, max_queue=8)
        b.start()
        long = [np.full(10, i, np.float32) for i in range(10)]  # ids 0..9
        short = [np.full(10, 100 + i, np.float32) for i in range(2)]
        results = await asyncio.gather(b.submit(long), b.submit(short[:1]), b.submit(short[1:]))
        await b.stop()
        return results

    (lp, ls), (sp, _), (tp, _) = asyncio.run(main())
    np.testing.assert_array_equal(lp[:, 0], np.arange(10))
    np.testing.assert_array_equal(ls[:, 0], -np.arange(10))
    assert sp[0, 0] == 100 and tp[0, 0] == 101
    # the long request is served 4 at a time and the short ones do not wait for all of it
    assert calls[0] == [0, 1, 2, 3] and calls[1] == [100, 101, 4, 5]
    assert sorted(sum(calls, [])) == [*range(10), 100, 101]
    assert all(len(c) <= 4 for c in calls)


def test_the_long_lanes_first_call_measures_the_model_with_one_window():
    import asyncio

    def sizes(long_call: float | None) -> list[int]:
        calls: list[int] = []

        def predict(waves):
            calls.append(len(waves))
            x = np.array([[w[0]] for w in waves], np.float32)
            return x, x

        async def main():
            b = MicroBatcher(predict, max_batch=16, max_wait=0, max_long_batch=16, long_call=long_call)
            b.start()
            probs, _ = await b.submit([np.full(10, i, np.float32) for i in range(16)], "long")
            await b.stop()
            np.testing.assert_array_equal(probs[:, 0], np.arange(16))

        asyncio.run(main())
        return calls

    # the model's speed unknown, one window; then what a (here generous) time bound allows, so a
    # recording's first call has the same size whatever its length
    assert sizes(10.0) == [1, 15]
    assert sizes(None) == [16]  # without a time bound, max_long_batch at once


def test_batcher_waits_only_for_requests_on_their_way():
    import asyncio

    calls: list[int] = []

    def predict(waves):
        calls.append(len(waves))
        x = np.array([[w[0]] for w in waves], np.float32)
        return x, x

    async def alone() -> float:
        b = MicroBatcher(predict, max_batch=8, max_wait=2.0, expecting=lambda: 0)
        b.start()
        t0 = time.perf_counter()
        await b.submit([np.zeros(4, np.float32)])
        took = time.perf_counter() - t0
        await b.stop()
        return took

    async def with_company() -> float:
        coming = [1]
        b = MicroBatcher(predict, max_batch=8, max_wait=0.3, expecting=lambda: coming[0])
        b.start()

        async def late():
            await asyncio.sleep(0.05)
            coming[0] = 0
            return await b.submit([np.ones(4, np.float32)])

        t0 = time.perf_counter()
        (first, _), (second, _) = await asyncio.gather(b.submit([np.zeros(4, np.float32)]), late())
        took = time.perf_counter() - t0
        await b.stop()
        assert first[0, 0] == 0 and second[0, 0] == 1
        return took

    assert asyncio.run(alone()) < 1.0  # nobody else is coming: no 2 s wait
    assert calls == [1]
    # one more request is on its way: the first waits for it (bounded), and they share a call
    assert asyncio.run(with_company()) < 0.3
    assert calls == [1, 2]


@pytest.fixture(scope="module")
def default_model():
    return serval.load("default", device="cpu")


def test_timeline_and_health_answers_are_typed(default_model):
    from fastapi.testclient import TestClient

    from serval.serve.app import create_app
    from serval.serve.schemas import Health, ServedTimeline

    with TestClient(create_app(default_model)) as client:
        doc = client.get("/openapi.json").json()
        health = client.get("/healthz")
        clip = clips("ravdess", n=1)[0]
        answer = client.post(
            "/v1/timeline?vad=true", files={"file": (clip.name, clip.read_bytes(), "audio/flac")}
        )
    schemas = doc["components"]["schemas"]

    def schema_of(path, method, code):
        ref = doc["paths"][path][method]["responses"][code]["content"]["application/json"]["schema"]["$ref"]
        return schemas[ref.rsplit("/", 1)[1]]

    assert set(schema_of("/healthz", "get", "200")["properties"]) == {"status", "queue"}
    assert schema_of("/healthz", "get", "503") == schema_of("/healthz", "get", "200")
    timeline = schema_of("/v1/timeline", "post", "200")
    assert {"windows", "segments", "grid", "duration", "classes"} <= set(timeline["properties"])
    assert health.status_code == 200 and Health.model_validate(health.json()).status == "ok"
    body = answer.json()
    assert answer.status_code == 200 and body["windows"] and "speech_fraction" in body["windows"][0]
    # the real answer fits the published type with nothing left over
    adapter = TypeAdapter(ServedTimeline)
    assert adapter.dump_python(adapter.validate_python(body), mode="json") == body


def test_server_answers_null_for_untrained(trained_dims_models, ravdess_clips, one_actor_talk):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from serval.serve.app import create_app
    from serval.serve.config import ServerConfig

    body = ravdess_clips[2].read_bytes()
    talk = one_actor_talk.read_bytes()
    pcm = (load_audio(one_actor_talk)[: 6 * SAMPLE_RATE] * 32767).astype("<i2").tobytes()
    seen = {}
    for trained in [(), ("arousal",)]:
        app = create_app(load(trained_dims_models[trained], device="cpu"), ServerConfig())
        with TestClient(app) as c:
            head = {"content-type": "audio/flac"}
            rec = c.post("/v1/emotion", content=body, headers=head).json()
            timeline = c.post("/v1/timeline", content=talk, headers=head).json()
            info = c.get("/v1/model").json()
            with c.websocket_connect("/v1/stream?sample_rate=16000") as ws:
                ready = ws.receive_json()
                ws.send_bytes(pcm)
                window = ws.receive_json()
                ws.send_text(json.dumps({"type": "end"}))
                messages = [ws.receive_json()]
                while messages[-1]["type"] != "summary":
                    messages.append(ws.receive_json())
            schema = c.get("/openapi.json").json()
        seen[trained] = rec, timeline, info, ready, window, messages[-1]
        assert info["trained_dimensions"] == ready["trained_dimensions"] == list(trained)
        assert timeline["trained_dimensions"] == list(trained)
        for scores in [
            rec["scores"],
            *(w["scores"] for w in timeline["windows"]),
            *(s["scores"] for s in timeline["segments"]),
            window["scores"],
            messages[-1]["overall"]["scores"],
            *(s["scores"] for s in messages[-1]["segments"]),
        ]:
            assert list(scores) == list(DIMENSIONS)
            assert [d for d, v in scores.items() if v is not None] == list(trained)
    # the schema says what a null means
    record = schema["components"]["schemas"]["EmotionRecord"]["properties"]["scores"]
    assert vocab.UNTRAINED in record["description"]
    assert {"type": "null"} in record["additionalProperties"]["anyOf"]
    # the same weights: the trained score is the number, the untrained one is null
    assert seen[()][0]["probabilities"] == seen[("arousal",)][0]["probabilities"]
