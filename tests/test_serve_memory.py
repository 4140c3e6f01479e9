"""`serval serve --memory-budget`: the limits it sets, the 413s that name it, and long clips on
`/v1/emotion` scored piece by piece (a tiny random model, real clips joined end to end)."""

from __future__ import annotations

import argparse
import signal
import subprocess

import numpy as np
import pytest
import soundfile as sf
from conftest import clips

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serval.audio import load_audio  # noqa: E402
from serval.cli import main  # noqa: E402
from serval.inference import load  # noqa: E402
from serval.serve import cli as serve_cli  # noqa: E402
from serval.serve.config import (  # noqa: E402
    MODEL_CALL_BYTES,
    REQUEST_BYTES,
    UPLOAD_BYTES_PER_SECOND,
    ServerConfig,
    format_size,
    parse_size,
)
from serval.serve.metrics import Metrics  # noqa: E402
from serval.serve.service import Service  # noqa: E402

GiB, MiB = 2**30, 2**20


def test_sizes_are_read_and_written_in_binary_units():
    assert parse_size("2G") == parse_size("2GiB") == parse_size("2gb") == 2 * GiB
    assert parse_size("512M") == 512 * MiB and parse_size("1.5G") == int(1.5 * GiB)
    assert parse_size("300000000") == 300_000_000
    for bad in ("", "2X", "-1G", "0", "lots"):
        with pytest.raises(ValueError, match="a size is a positive number"):
            parse_size(bad)
    assert format_size(2 * GiB) == "2G" and format_size(100 * MiB) == "100M" and format_size(1536) == "1.5K"


def test_the_budget_sets_sizes_durations_and_concurrency():
    cfg = ServerConfig(memory_budget=2 * GiB).budgeted(available=8 * GiB)
    room = 2 * GiB - REQUEST_BYTES
    assert cfg.max_upload_mb == pytest.approx(room / MiB)  # the body, held once (beyond 1 MiB on disk)
    assert cfg.max_clip_seconds == int(room / UPLOAD_BYTES_PER_SECOND) == 10835  # 3 h of 48 kHz stereo
    assert 10000 < cfg.max_timeline_seconds < cfg.max_clip_seconds  # the windows' results too
    assert cfg.max_requests == (8 * GiB - MODEL_CALL_BYTES) // (2 * GiB) == 3
    assert cfg.max_receiving == cfg.max_queue == cfg.max_timelines == 3
    # a smaller budget: shorter audio, more requests at once (never more than the limits' own defaults)
    small = ServerConfig(memory_budget=256 * MiB).budgeted(available=8 * GiB)
    assert small.max_clip_seconds < cfg.max_clip_seconds / 10 and small.max_requests == 30
    assert (small.max_queue, small.max_timelines, small.max_receiving) == (30, 16, 30)
    # limits given by hand stay; without a budget nothing changes
    kept = ServerConfig(memory_budget=2 * GiB, max_clip_seconds=60.0).budgeted({"max_clip_seconds"}, 8 * GiB)
    assert kept.max_clip_seconds == 60.0 and kept.max_timeline_seconds == cfg.max_timeline_seconds
    assert ServerConfig().budgeted(available=8 * GiB) == ServerConfig()
    # even a machine with less free memory than one budget serves one request at a time
    assert ServerConfig(memory_budget=2 * GiB).budgeted(available=GiB).max_requests == 1
    with pytest.raises(ValueError, match="--memory-budget must be more than 64M"):
        ServerConfig(memory_budget=10 * MiB).budgeted(available=8 * GiB)


def test_the_cli_leaves_limits_given_by_hand(capsys):
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    args = p.parse_args(["--memory-budget", "1G", "--max-clip-seconds", "120"])
    cfg = serve_cli.config_from_args(args)
    assert cfg.memory_budget == GiB and cfg.max_clip_seconds == 120.0
    assert serve_cli.given_limits(args) == {"max_clip_seconds"}
    budgeted = cfg.budgeted(serve_cli.given_limits(args), available=4 * GiB)
    assert budgeted.max_clip_seconds == 120.0 and budgeted.max_upload_mb == pytest.approx(960.0)
    assert "memory budget 1G per request" in serve_cli.budget_summary(budgeted)
    # without a budget every default is the config's own
    assert serve_cli.config_from_args(p.parse_args([])) == ServerConfig()
    # a budget too small for a request is refused before the model loads
    assert main(["serve", "--memory-budget", "10M"]) == 2
    assert "--memory-budget must be more than 64M" in capsys.readouterr().err


def test_max_requests_bounds_what_is_held_together(model_dir):
    service = Service(load(model_dir, device="cpu"), ServerConfig(max_requests=2), Metrics())
    try:
        assert service.refusal("/v1/emotion") is None
        service.receiving, service.timelines = 1, 1  # one upload arriving, one timeline working
        for path in ("/v1/emotion", "/v1/timeline"):
            refusal = service.refusal(path)
            assert refusal is not None and refusal.status == 503
        service.timelines = 0
        assert service.refusal("/v1/timeline") is None
    finally:
        service.timeline_pool.shutdown()


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """70 s and 120 s of real speech as 16 kHz FLAC files."""
    folder = tmp_path_factory.mktemp("recordings")
    wave = np.concatenate([load_audio(p) for p in clips("ravdess", "Actor_07/*.flac", n=40)])
    assert len(wave) > 120 * 16000
    for seconds in (70, 120):
        sf.write(folder / f"talk{seconds}.flac", wave[: seconds * 16000], 16000)
    return folder / "talk70.flac", folder / "talk120.flac"


@pytest.fixture(scope="module")
def budget_server(model_dir, tmp_path_factory):
    from test_server import start_cli_server

    log = tmp_path_factory.mktemp("log") / "server.log"
    base, proc = start_cli_server(model_dir, log, "--memory-budget", "80M")
    yield base, log
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_a_budgeted_server_answers_413_with_its_limit(budget_server, recordings):
    base, log = budget_server
    limit = (80 * MiB - REQUEST_BYTES) // UPLOAD_BYTES_PER_SECOND  # 87 s
    assert "memory budget 80M per request" in log.read_text() and f"up to {limit} s" in log.read_text()
    flac = {"content-type": "audio/flac"}
    with httpx.Client(base_url=base, timeout=120) as c:
        limits = c.get("/v1/model").json()["limits"]
        assert limits["memory_budget"] == 80 * MiB and limits["max_clip_seconds"] == limit
        # a timeline's windows count too: 86 s
        for endpoint, most in (("/v1/emotion", limit), ("/v1/timeline", limits["max_timeline_seconds"])):
            r = c.post(endpoint, content=recordings[1].read_bytes(), headers=flac)
            assert r.status_code == 413, r.text
            message = r.json()["error"]["message"]
            assert f"120.0 s of audio; this endpoint takes at most {most:g} s" in message
            assert "(the memory budget of 80M per request)" in message
        r = c.post("/v1/emotion", content=b"\0" * (17 * MiB), headers=flac)  # the limit: 16 MiB
        assert r.status_code == 413 and "the memory budget of 80M per request" in r.json()["error"]["message"]


@pytest.mark.slow
def test_a_long_clip_is_scored_piece_by_piece_as_predict_scores_it(budget_server, recordings, model_dir):
    base, _ = budget_server
    path = recordings[0]
    want = load(model_dir, device="cpu").predict(str(path))
    with httpx.Client(base_url=base, timeout=300) as c:
        r = c.post("/v1/emotion", content=path.read_bytes(), headers={"content-type": "audio/flac"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["pieces"] == want["pieces"] == 3 and got["duration"] == want["duration"] == 70.0
    assert got["label"] == want["label"]
    np.testing.assert_allclose(
        list(got["probabilities"].values()), list(want["probabilities"].values()), atol=1e-5
    )
    np.testing.assert_allclose(list(got["scores"].values()), list(want["scores"].values()), atol=1e-5)
