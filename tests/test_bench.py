"""`serval bench` measures what it says it measures (no speed is asserted: speed lives in the benchmark).

Every figure is checked for shape and sanity: positive and finite, rates equal to count / seconds, a
batch's time per clip within a loose factor of one clip's, and no figure longer than the call that made it.
"""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from serval.bench import (
    _peak_rss_mb,
    cold_start,
    format_report,
    model_pair,
    run_benchmark,
    time_engines,
    time_inference,
    time_train_step,
)
from serval.export import export_onnx
from serval.features import compute_features
from serval.inference import Predictor
from serval.onnx_engine import OnnxPredictor
from serval.vocab import SAMPLE_RATE

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "emodb-09-sad.flac")


# a batch's time per clip against one clip's: a loose bound (a shared CPU is noisy), never a speed claim
LOOSE = 4.0


def sane(*figures: float) -> None:
    """Each figure is a real measurement: a finite, positive number."""
    for figure in figures:
        assert isinstance(figure, int | float) and math.isfinite(figure) and figure > 0, figures


def batch_agrees_with_one_clip(batch_ms: float, clips: int, single_ms: float) -> None:
    """A batch of `clips` took about as long per clip as one clip did, and no less than one clip's share."""
    sane(batch_ms, single_ms)
    assert batch_ms / clips <= LOOSE * single_ms, (batch_ms, clips, single_ms)  # batching does not cost more
    assert single_ms <= LOOSE * batch_ms, (batch_ms, single_ms)  # one clip is not slower than the whole batch


def consistent(timing: dict, clips: int) -> None:
    """The rates of a timing are of its own raw measurement: `iters` passes of `clips` clips in `seconds`."""
    assert set(timing) >= {"clips_per_s", "ms_per_batch", "iters", "seconds"}
    assert isinstance(timing["iters"], int) and timing["iters"] >= 1
    sane(timing["seconds"], timing["clips_per_s"], timing["ms_per_batch"])
    # both sides are rounded (rates to 0.01, seconds to 1e-6): on a short timing the seconds' rounding
    # alone moves a rate of ~100 clips/s by more than 0.005, hence the relative tolerance beside it
    rate, ms = clips * timing["iters"] / timing["seconds"], 1000 * timing["seconds"] / timing["iters"]
    assert timing["clips_per_s"] == pytest.approx(rate, rel=1e-4, abs=0.006)
    assert timing["ms_per_batch"] == pytest.approx(ms, rel=1e-4, abs=0.006)


@pytest.mark.slow
def test_the_two_ways_are_one_network():
    ours, published = model_pair("tiny", torch.device("cpu"))
    assert not ours.config.pad_to_30s and published.config.pad_to_30s
    a, b = ours.state_dict(), published.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a 30 s clip needs no padding: both ways then compute the same thing
    clip = [np.random.default_rng(0).standard_normal(30 * SAMPLE_RATE).astype(np.float32) * 0.1]
    probs = []
    for model in (ours, published):
        feats, lengths = compute_features(
            clip, n_mels=model.config.n_mels, pad_to_30s=model.config.pad_to_30s
        )
        with torch.inference_mode():
            probs.append(model(feats, lengths).logits.softmax(-1))
    torch.testing.assert_close(probs[0], probs[1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_timing_is_bounded_and_self_consistent():
    ours, _ = model_pair("tiny", torch.device("cpu"))
    waves = [np.zeros(SAMPLE_RATE // 2, np.float32)] * 3
    once = time_inference(ours, waves, torch.device("cpu"), bf16=False, min_seconds=0.0)
    assert once["iters"] == 1 and once["frames"] == 50  # 0.5 s at 100 mel frames a second
    capped = time_inference(ours, waves, torch.device("cpu"), bf16=False, min_seconds=1e9, max_iters=3)
    assert capped["iters"] == 3  # max_iters ends it long before min_seconds
    for timing in (once, capped):
        consistent(timing, clips=3)


@pytest.mark.slow
def test_benchmark_report():
    start = time.perf_counter()
    report = run_benchmark(
        "tiny", "cpu", batch_size=2, seconds=(1.0,), min_seconds=0.0, engines=False, cold=False
    )
    wall = time.perf_counter() - start
    assert report["whisper_size"] == "tiny" and report["batch_size"] == 2 and report["serval_dtype"] == "fp32"
    (row,) = report["results"]
    base, fast = row["published_fp32_30s"], row["serval_own_length"]
    consistent(base, clips=2)
    consistent(fast, clips=2)
    assert base["frames"] == 3000 and fast["frames"] == 100  # padded to 30 s against the clip's own 1 s
    assert row["speedup_batch"] == pytest.approx(fast["clips_per_s"] / base["clips_per_s"], abs=0.006)
    assert base["seconds"] + fast["seconds"] <= wall  # measured inside the call, not made up
    batch_agrees_with_one_clip(base["ms_per_batch"], 2, row["single_clip_ms_published"])
    batch_agrees_with_one_clip(fast["ms_per_batch"], 2, row["single_clip_ms_serval"])
    assert row["speedup_single"] == pytest.approx(
        row["single_clip_ms_published"] / row["single_clip_ms_serval"], abs=0.006
    )
    assert report["peak_rss_mb"] > 50  # torch alone is more than that: it is this process's real peak
    table = format_report(report)
    assert (
        f"| 1 s | {base['clips_per_s']} | {fast['clips_per_s']} | {row['speedup_batch']}x | "
        f"{row['single_clip_ms_published']} | {row['single_clip_ms_serval']} | {row['speedup_single']}x |"
    ) in table
    assert "Whisper-tiny encoder · batch 2" in table and "LoRA training step" not in table


@pytest.mark.slow
def test_lora_train_step_runs():
    # the LoRA step builds its own adapted copy of the network and takes optimiser steps on it
    ours, _ = model_pair("tiny", torch.device("cpu"))
    waves = [np.zeros(SAMPLE_RATE // 2, np.float32)] * 2
    start = time.perf_counter()
    result = time_train_step(ours.config, waves, torch.device("cpu"), steps=2)
    wall = time.perf_counter() - start
    assert set(result) == {"samples_per_s"}  # no GPU figure on a CPU
    sane(result["samples_per_s"])
    # 2 steps of 2 samples were timed inside the call (after a warm-up step): its rate is at least this
    assert result["samples_per_s"] >= 2 * 2 / wall


@pytest.mark.slow
def test_engines_are_timed_against_torch(tmp_path):
    ours, _ = model_pair("tiny", torch.device("cpu"))
    engines = {
        "torch_fp32_cpu": Predictor(ours, "cpu"),
        "onnxruntime_cpu": OnnxPredictor(export_onnx(ours, tmp_path / "g.onnx")),
    }
    waves = [np.random.default_rng(1).standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1] * 3
    report = {"whisper_size": "tiny", "device": "cpu", "torch": "-", "batch_size": 3, "serval_dtype": "fp32"}
    report |= {
        "results": [],
        "peak_rss_mb": 1.0,
        "engines": [{"clip_seconds": 1.0, **time_engines(engines, waves, 0.0)}],
    }
    row = report["engines"][0]
    assert row["torch_fp32_cpu"]["speedup_batch"] == row["torch_fp32_cpu"]["speedup_single"] == 1.0
    ort = row["onnxruntime_cpu"]
    for name in engines:
        consistent(row[name]["batch"], clips=3)
        batch_agrees_with_one_clip(row[name]["batch"]["ms_per_batch"], 3, row[name]["single_clip_ms"])
        sane(row[name]["speedup_batch"], row[name]["speedup_single"])
    torch_rate = row["torch_fp32_cpu"]["batch"]["clips_per_s"]
    assert ort["speedup_batch"] == pytest.approx(ort["batch"]["clips_per_s"] / torch_rate, abs=0.006)
    assert ort["speedup_single"] == pytest.approx(
        row["torch_fp32_cpu"]["single_clip_ms"] / ort["single_clip_ms"], abs=0.006
    )
    table = format_report(report)
    assert f"| onnxruntime_cpu | {ort['batch']['clips_per_s']} | {ort['speedup_batch']}x |" in table


@pytest.mark.slow
def test_cold_start_runs_both_processes_in_turn(tmp_path):
    start = time.perf_counter()
    c = cold_start(EXAMPLE, repeats=1)
    wall = time.perf_counter() - start
    assert c["repeats"] == 1 and c["engine"] == "auto"
    sane(*(v for k, v in c.items() if k not in ("repeats", "engine")))
    # one timed pair, after a warm-up run of serval: both inside the call's own time
    assert c["serval_predict_s"] + c["import_torch_s"] <= wall
    assert c["ratio"] == pytest.approx(c["serval_predict_s"] / c["import_torch_s"], abs=0.006)
    # torch alone maps more than 50 MB: these are the children's real peaks, not this process's
    assert c["import_torch_peak_rss_mb"] > 50 and c["serval_predict_peak_rss_mb"] > 50
    # this process has torch and more loaded: a child's figure that counted its parent would not be below
    assert c["import_torch_peak_rss_mb"] < _peak_rss_mb()
    with pytest.raises(RuntimeError, match="missing.wav failed"):
        cold_start(tmp_path / "missing.wav", repeats=1)
