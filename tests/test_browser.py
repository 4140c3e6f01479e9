"""The page at `/` and `/docs` in a real headless Chromium driven by selenium, against the real
`serval serve` (the bundled model) on loopback.

The microphone is Chromium's fake capture device playing a real angry RAVDESS clip in a loop. Nothing in
these tests reaches past 127.0.0.1: the driver is given explicitly (no Selenium Manager), selenium
is told to stay offline, and Chromium's background networking is off; every URL the browser
requested is checked against the server's origin.
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
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO, clips

from serval.audio import load_audio

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
    ),
    pytest.mark.slow,  # a browser and a server process
]
WAIT = 60  # seconds any one thing in the page may take on a busy CI machine
LONG = 300  # seconds for the timeline of a 90 s recording with the real model on a busy CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(log: Path, *options: str):
    """`serval serve` (the bundled model) with `options` on a free loopback port: its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "serval", "serve", "--device", "cpu", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "warning", *options]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server did not come up:\n{log.read_text()}"
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server the tests share: its base URL and its classes."""
    with serve(tmp_path_factory.mktemp("browser") / "server.log") as base:
        yield base, httpx.get(f"{base}/v1/model").json()["classes"]


@pytest.fixture(scope="module")
def angry_wav(tmp_path_factory) -> Path:
    """A real angry RAVDESS clip as 16-bit PCM WAV: the fake microphone plays it in a loop."""
    path = tmp_path_factory.mktemp("mic") / "angry.wav"
    clip = clips("ravdess", "Actor_01/03-01-05-02-*.flac", n=1)[0]
    wave = load_audio(clip)
    assert len(wave) > 16000 and np.abs(wave).max() > 0.05  # speech, not silence
    sf.write(path, wave, 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def driver(angry_wav, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # selenium must not look for drivers or send usage statistics over the network
    saved = {k: os.environ.get(k) for k in ("SE_OFFLINE", "SE_AVOID_STATS")}
    os.environ.update(SE_OFFLINE="true", SE_AVOID_STATS="true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--disable-features=Translate,MediaRouter,OptimizationHints",
        # no host name but 127.0.0.1 resolves, so nothing the browser does can leave the machine
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={angry_wav}",
        f"--user-data-dir={tmp_path_factory.mktemp('profile')}",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    d.set_page_load_timeout(WAIT)
    yield d
    d.quit()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def requested_urls(driver, base: str, responses: dict[str, str] | None = None) -> set[str]:
    """Every URL the page at `base` asked for since the last call: requests, WebSockets, resources.

    `responses`, when given, gets each answered URL's request id (for `Network.getResponseBody`)."""
    urls = set()
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        # the browser's own pages (its new-tab page at start-up) are not the page under test
        if msg["method"] == "Network.requestWillBeSent" and msg["params"]["documentURL"].startswith(base):
            urls.add(msg["params"]["request"]["url"])
        elif msg["method"] == "Network.webSocketCreated":
            urls.add(msg["params"]["url"])
        elif msg["method"] == "Network.responseReceived" and responses is not None:
            responses[msg["params"]["response"]["url"]] = msg["params"]["requestId"]
    urls |= set(driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"))
    return urls


def assert_same_origin(urls: set[str], base: str, *expected: str) -> None:
    ws = base.replace("http://", "ws://", 1)
    # data: URLs (Swagger UI's inline icons) are in the page itself, and chrome://resources/ in the
    # browser itself (the file input's icons): neither is fetched from any host
    local = (base + "/", ws + "/", "data:", "chrome://resources/")
    foreign = sorted(u for u in urls if not u.startswith(local))
    assert not foreign, f"the page loaded from other origins: {foreign}"
    for path in expected:
        assert any(u.split("?")[0] in (base + path, ws + path) for u in urls), (path, sorted(urls))


def open_page(driver, base: str):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("performance")  # drop what earlier tests logged
    driver.get(base + "/")
    # the page has loaded the model's classes (its legend) before the test acts
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements("css selector", "#legend span"))
    return WebDriverWait(driver, WAIT)


def label_of(driver) -> tuple[str, str]:
    e = driver.find_element("css selector", '[data-testid="label"]')
    return e.text.strip().lower(), e.get_attribute("data-source")


def test_uploaded_clip_shows_the_apis_label(server, driver):
    base, classes = server
    clip = clips("ravdess", "Actor_03/*.flac", n=1)[0]
    api = httpx.post(f"{base}/v1/emotion", files={"file": (clip.name, clip.read_bytes())}, timeout=WAIT)
    assert api.status_code == 200, api.text
    record = api.json()

    wait = open_page(driver, base)
    assert label_of(driver) == ("—", "")
    driver.find_element("css selector", 'input[type="file"]').send_keys(str(clip))
    wait.until(lambda d: label_of(d)[1] == "file")
    assert label_of(driver) == (record["label"], "file")
    # one bar per class, the label's the top one; the dimensions the API gave a value
    names = [e.text.lower() for e in driver.find_elements("css selector", "#probs .bar .name")]
    assert names == list(record["probabilities"]) == classes
    assert driver.find_element("css selector", "#probs .bar.top .name").text.lower() == record["label"]
    dims = [e.text.lower() for e in driver.find_elements("css selector", "#dims .bar .name")]
    assert dims == [d for d, v in record["scores"].items() if v is not None]
    # the timeline of the same clip
    wait.until(lambda d: d.find_elements("css selector", "#track .win"))
    files = {"file": (clip.name, clip.read_bytes())}
    timeline = httpx.post(f"{base}/v1/timeline", files=files, timeout=WAIT).json()
    wins = driver.find_elements("css selector", "#track .win")
    assert len(wins) == len(timeline["windows"]) > 0
    assert "error" not in driver.find_element("id", "status").get_attribute("class")
    assert_same_origin(
        requested_urls(driver, base), base, "/", "/static/app.js", "/v1/emotion", "/v1/timeline"
    )


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory) -> tuple[Path, Path]:
    """90 s of real speech, RAVDESS clips of two actors one after the other: as FLAC and as 16-bit WAV."""
    folder = tmp_path_factory.mktemp("long")
    waves = [load_audio(p) for p in clips("ravdess", "Actor_0[67]/*.flac", n=30)]
    wave = np.concatenate(waves)[: 90 * 16000]
    assert len(wave) == 90 * 16000
    flac, wav = folder / "talk.flac", folder / "talk.wav"
    sf.write(flac, wave, 16000, subtype="PCM_16")
    sf.write(wav, wave, 16000, subtype="PCM_16")
    return flac, wav


@pytest.mark.slow  # a 90 s timeline with the real model on the CPU
def test_long_file_shows_the_overall_label_and_the_timeline(server, driver, long_recording):
    from selenium.webdriver.support.ui import WebDriverWait

    base, classes = server
    flac, _ = long_recording
    limits = httpx.get(f"{base}/v1/model").json()["limits"]
    # longer than a clip may be (the clip endpoint refuses it from its header), within the timeline's limit
    assert limits["max_clip_seconds"] < 90 <= limits["max_timeline_seconds"]
    files = {"file": (flac.name, flac.read_bytes())}
    assert httpx.post(f"{base}/v1/emotion", files=files, timeout=WAIT).status_code == 413

    open_page(driver, base)
    driver.find_element("css selector", 'input[type="file"]').send_keys(str(flac))
    WebDriverWait(driver, LONG).until(lambda d: label_of(d)[1] == "timeline")
    status = driver.find_element("id", "status")
    assert "error" not in status.get_attribute("class") and status.text == "talk.flac: done"
    # the page asked the server for the timeline only (never for a clip endpoint's 413)
    answers: dict[str, str] = {}
    urls = requested_urls(driver, base, answers)
    assert_same_origin(urls, base, "/v1/timeline")
    assert not any(u.split("?")[0].endswith("/v1/emotion") for u in urls), sorted(urls)
    # and shows what it answered: the whole file's label (its windows pooled), bars, every window
    body = driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": answers[f"{base}/v1/timeline"]})
    t = json.loads(body["body"])
    assert t["duration"] == 90 and len(t["windows"]) > 40 and t["overall"]["label"] in classes
    assert label_of(driver) == (t["overall"]["label"], "timeline")
    names = [e.text.lower() for e in driver.find_elements("css selector", "#probs .bar .name")]
    assert names == classes
    assert driver.find_element("css selector", "#probs .bar.top .name").text.lower() == t["overall"]["label"]
    values = [float(e.text) for e in driver.find_elements("css selector", "#probs .bar .value")]
    np.testing.assert_allclose(values, [t["overall"]["probabilities"][c] for c in classes], atol=0.005)
    assert len(driver.find_elements("css selector", "#track .win")) == len(t["windows"])
    note = driver.find_element("id", "source").text
    assert note == f"talk.flac, 90 s: {len(t['windows'])} windows pooled"


def test_files_past_the_servers_limits_say_the_limit(driver, long_recording, tmp_path):
    flac, wav = long_recording
    assert flac.stat().st_size < 2.5 * 2**20 < wav.stat().st_size
    limits = ("--max-timeline-seconds", "75", "--max-clip-seconds", "20", "--max-upload-mb", "2.5")
    with serve(tmp_path / "server.log", *limits) as base:
        wait = open_page(driver, base)
        status = driver.find_element("id", "status")
        # 90 s against the server's 75 s: said in the server's terms, with no label and no timeline
        driver.find_element("css selector", 'input[type="file"]').send_keys(str(flac))
        wait.until(lambda d: "error" in status.get_attribute("class"))
        assert status.text == "talk.flac is too long for this server: it takes files of up to 75 s"
        assert label_of(driver)[0] == "—" and not driver.find_elements("css selector", "#track .win")
        urls = requested_urls(driver, base)
        assert_same_origin(urls, base, "/v1/timeline")
        assert not any(u.split("?")[0].endswith("/v1/emotion") for u in urls), sorted(urls)
        # larger than the server's upload limit: said before anything is sent
        driver.execute_script("performance.clearResourceTimings()")
        driver.find_element("css selector", 'input[type="file"]').send_keys(str(wav))
        wait.until(lambda d: status.text.startswith("talk.wav"))
        assert status.text.endswith(" MB: this server takes uploads of up to 2.5 MB")
        assert "error" in status.get_attribute("class") and label_of(driver)[0] == "—"
        assert not any("/v1/" in u for u in requested_urls(driver, base))


def test_record_streams_the_microphone_live(server, driver, angry_wav):
    base, _ = server
    # what the API says of one window of the looping microphone: the clip, repeated
    wave, sr = sf.read(angry_wav, dtype="float32")
    looped = io.BytesIO()
    sf.write(looped, np.tile(wave, 2)[: 4 * sr], sr, format="WAV", subtype="PCM_16")
    headers = {"content-type": "audio/wav"}
    api = httpx.post(f"{base}/v1/emotion", content=looped.getvalue(), headers=headers, timeout=WAIT)
    expected = api.json()["label"]
    # the bundled model knows this clip, so a live label equal to it means the audio got through
    assert expected == "angry", api.text

    wait = open_page(driver, base)
    button = driver.find_element("css selector", '[data-testid="record"]')
    assert button.text == "Record"
    button.click()
    wait.until(lambda d: button.text == "Stop")
    # a window's result from WS /v1/stream while still recording
    wait.until(lambda d: label_of(d)[1] == "stream")
    assert label_of(driver)[0] == expected and button.text == "Stop"
    assert driver.find_elements("css selector", "#track .win")
    button.click()
    wait.until(lambda d: button.text == "Record")
    # the end of the stream: the server's summary of the whole recording
    wait.until(lambda d: label_of(d)[1] == "summary")
    assert label_of(driver)[0] == expected
    assert "error" not in driver.find_element("id", "status").get_attribute("class")
    wait.until(lambda d: button.is_enabled())
    # (the AudioWorklet's module load is not in Chromium's logs; that it ran shows in the windows)
    assert_same_origin(requested_urls(driver, base), base, "/static/app.js", "/v1/stream")


def test_bad_file_shows_the_apis_error(server, driver, tmp_path):
    base, _ = server
    fake = tmp_path / "notes.wav"
    fake.write_text("these are not the samples you are looking for\n" * 50)
    api = httpx.post(f"{base}/v1/emotion", files={"file": (fake.name, fake.read_bytes())}, timeout=WAIT)
    assert api.status_code == 422, api.text
    wait = open_page(driver, base)
    driver.find_element("css selector", 'input[type="file"]').send_keys(str(fake))
    status = driver.find_element("id", "status")
    wait.until(lambda d: "error" in status.get_attribute("class"))
    assert api.json()["error"]["message"] in status.text
    assert label_of(driver) == ("—", "")


def test_a_stream_the_server_ends_returns_to_record(driver, tmp_path):
    # a server whose streams may last 3 s: it answers the 4th second with an error and a close
    with serve(tmp_path / "server.log", "--max-stream-seconds", "3") as base:
        wait = open_page(driver, base)
        button = driver.find_element("css selector", '[data-testid="record"]')
        button.click()
        wait.until(lambda d: button.text == "Stop")
        status = driver.find_element("id", "status")
        wait.until(lambda d: "error" in status.get_attribute("class"))
        assert status.text.startswith("stream: ") and len(status.text) > len("stream: ")
        assert button.text == "Record" and button.is_enabled()
        # and the next recording starts afresh
        button.click()
        wait.until(lambda d: button.text == "Stop")
        button.click()
        wait.until(lambda d: button.text == "Record" and button.is_enabled())


def test_docs_render_from_this_server(server, driver):
    from selenium.webdriver.support.ui import WebDriverWait

    base, _ = server
    driver.get_log("performance")
    driver.get(base + "/docs")
    # Swagger UI ran and drew the operations of the OpenAPI document
    WebDriverWait(driver, WAIT).until(lambda d: len(d.find_elements("css selector", ".opblock")) >= 5)
    text = driver.find_element("id", "swagger-ui").text
    assert "/v1/emotion" in text and "/v1/timeline" in text
    assert_same_origin(
        requested_urls(driver, base),
        base,
        "/static/swagger-ui/swagger-ui-bundle.js",
        "/static/swagger-ui/swagger-ui.css",
        "/openapi.json",
    )
