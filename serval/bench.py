"""`serval bench`: speed and memory of inference (and a LoRA training step), measured in one run.

Every figure is reported beside the published code's way of running the same network
(fp32, every clip padded to 30 s, no mask) measured in the same process, so that ratios,
not absolute numbers, carry across machines. Weights are random: cost does not depend on values.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from serval.features import compute_features
from serval.inference import resolve_device
from serval.model import WHISPER_SIZES, SERConfig, SERModel
from serval.vocab import SAMPLE_RATE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_inference(
    model: SERModel,
    waves: list[np.ndarray],
    device: torch.device,
    bf16: bool,
    min_seconds: float = 2.0,
    max_iters: int = 50,
) -> dict:
    """Clips per second for one batch of waveforms, features included, after one warm-up pass.

    Timed passes repeat until `min_seconds` have passed (at least one, at most `max_iters`); the
    result has the raw timing (`iters`, `seconds`) and the mel frames each clip was fed as (`frames`).
    """
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    frames = []

    def step():
        feats, lengths = compute_features(
            waves, n_mels=model.config.n_mels, pad_to_30s=model.config.pad_to_30s, device=device
        )
        frames.append(int(feats.shape[-1]))
        with torch.inference_mode(), autocast:
            out = model(feats, lengths.to(device))
        return out.logits.float().softmax(-1)

    step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iters, start = 0, time.perf_counter()
    while iters < max_iters and (iters == 0 or time.perf_counter() - start < min_seconds):
        step()
        _sync(device)
        iters += 1
    elapsed = time.perf_counter() - start
    result = {
        "clips_per_s": round(len(waves) * iters / elapsed, 2),
        "ms_per_batch": round(1000 * elapsed / iters, 2),
        "iters": iters,
        "seconds": round(elapsed, 6),
        "frames": frames[0],
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def time_train_step(config: SERConfig, waves: list[np.ndarray], device: torch.device, steps: int = 5) -> dict:
    """Samples per second of a LoRA (r=8 on q, k, v) training step with the downstream network trainable."""
    model = (
        SERModel(SERConfig(**{**config.to_dict(), "lora_r": 8, "gradient_checkpointing": False}))
        .to(device)
        .train()
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    labels = torch.randint(0, len(config.classes), (len(waves),), device=device)
    bf16 = device.type == "cuda"

    def step():
        feats, lengths = compute_features(waves, n_mels=config.n_mels, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(feats, lengths.to(device))
            loss = torch.nn.functional.cross_entropy(out.logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - start
    result = {"samples_per_s": round(len(waves) * steps / elapsed, 2)}
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def model_pair(size: str, device: torch.device, seed: int = 0) -> tuple[SERModel, SERModel]:
    """serval's way (own length) and the published way (fp32, padded to 30 s) of one random network."""
    torch.manual_seed(seed)
    ours = SERModel(SERConfig.for_whisper(size)).to(device).eval()
    published = SERModel(SERConfig.for_whisper(size, pad_to_30s=True)).to(device).eval()
    published.load_state_dict(ours.state_dict())
    return ours, published


def run_benchmark(
    size: str = "base",
    device: str | None = None,
    batch_size: int = 32,
    seconds: tuple[float, ...] = (4.0, 10.0),
    train: bool = False,
    seed: int = 0,
    min_seconds: float = 2.0,
) -> dict:
    """Published way vs serval's way for each clip length, plus single-clip latency."""
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)
    ours, published = model_pair(size, dev, seed)
    bf16 = dev.type == "cuda"
    report = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "whisper_size": size,
        "batch_size": batch_size,
        "serval_dtype": "bf16" if bf16 else "fp32",
        "results": [],
    }
    for sec in seconds:
        n = int(sec * SAMPLE_RATE)
        waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for _ in range(batch_size)]
        base = time_inference(published, waves, dev, bf16=False, min_seconds=min_seconds)
        fast = time_inference(ours, waves, dev, bf16=bf16, min_seconds=min_seconds)
        single_base = time_inference(published, waves[:1], dev, bf16=False, min_seconds=min_seconds)
        single_fast = time_inference(ours, waves[:1], dev, bf16=bf16, min_seconds=min_seconds)
        row = {
            "clip_seconds": sec,
            "published_fp32_30s": base,
            "serval_own_length": fast,
            "speedup_batch": round(fast["clips_per_s"] / base["clips_per_s"], 2),
            "single_clip_ms_published": single_base["ms_per_batch"],
            "single_clip_ms_serval": single_fast["ms_per_batch"],
            "speedup_single": round(single_base["ms_per_batch"] / single_fast["ms_per_batch"], 2),
        }
        if train:
            row["lora_train_step"] = time_train_step(ours.config, waves, dev)
        report["results"].append(row)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return report


def format_report(report: dict) -> str:
    """A Markdown table of a benchmark report."""
    lines = [
        f"device: {report['device']} · torch {report['torch']} · Whisper-{report['whisper_size']} encoder · "
        f"batch {report['batch_size']} · serval in {report['serval_dtype']}",
        "",
        "| clip | published (fp32, 30 s) clips/s | serval clips/s | speed-up | 1 clip published ms | 1 clip serval ms | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['clip_seconds']:g} s | {r['published_fp32_30s']['clips_per_s']} | "
            f"{r['serval_own_length']['clips_per_s']} | {r['speedup_batch']}x | {r['single_clip_ms_published']} | "
            f"{r['single_clip_ms_serval']} | {r['speedup_single']}x |"
        )
    train = [r for r in report["results"] if "lora_train_step" in r]
    for r in train:
        lines.append(f"\nLoRA training step, {r['clip_seconds']:g} s clips: {r['lora_train_step']}")
    lines.append(f"\npeak RSS: {report['peak_rss_mb']} MB")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size", choices=sorted(WHISPER_SIZES), default="base", help="Whisper encoder size (random weights)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, nargs="+", default=[4.0, 10.0], help="clip lengths to measure")
    p.add_argument("--train", action="store_true", help="also time a LoRA training step")
    p.add_argument("--json", help="also write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    report = run_benchmark(args.size, args.device, args.batch_size, tuple(args.seconds), train=args.train)
    sys.stdout.write(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
