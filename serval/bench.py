"""`serval bench`: speed and memory of inference (and a LoRA training step), measured in one run.

Three parts, each a ratio of two things measured side by side in the same run, so that ratios,
not absolute numbers, carry across machines:
- the network (random weights: cost does not depend on values) the published code's way (fp32,
  every clip padded to 30 s, no mask) against serval's (own length; bf16 on a GPU);
- every engine on the bundled model: torch fp32 on the CPU, ONNX Runtime, torch bf16 on a GPU when
  there is one, each against torch on the CPU;
- cold start: the whole process `serval predict CLIP` against `python -c "import torch"`, run in
  turn, with each one's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serval.locations import DEFAULT_MODEL
from serval.vocab import SAMPLE_RATE

if TYPE_CHECKING:  # the network parts need torch (serval[train]); the ONNX part runs without it
    import torch

    from serval.model import SERConfig, SERModel


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_call(
    call: Callable[[], object],
    clips: int,
    min_seconds: float = 2.0,
    max_iters: int = 50,
    after_warmup: Callable[[], object] | None = None,
) -> dict:
    """Clips per second of `call` (which runs `clips` clips), after one warm-up call (then `after_warmup`).

    Timed calls repeat until `min_seconds` have passed (at least one, at most `max_iters`); the
    result has the raw timing (`iters`, `seconds`) beside the rates.
    """
    call()
    if after_warmup is not None:
        after_warmup()
    iters, start = 0, time.perf_counter()
    while iters < max_iters and (iters == 0 or time.perf_counter() - start < min_seconds):
        call()
        iters += 1
    elapsed = time.perf_counter() - start
    return {
        "clips_per_s": round(clips * iters / elapsed, 2),
        "ms_per_batch": round(1000 * elapsed / iters, 2),
        "iters": iters,
        "seconds": round(elapsed, 6),
    }


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
    import torch

    from serval.features import compute_features

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    frames = []

    def step():
        feats, lengths = compute_features(
            waves,
            n_mels=model.config.n_mels,
            pad_to_30s=model.config.pad_to_30s,
            device=device,
            gain_invariant=model.config.gain_invariant,
        )
        frames.append(int(feats.shape[-1]))
        with torch.inference_mode(), autocast:
            model(feats, lengths.to(device)).logits.float().softmax(-1)
        _sync(device)

    reset = (lambda: torch.cuda.reset_peak_memory_stats(device)) if device.type == "cuda" else None
    result = time_call(step, len(waves), min_seconds, max_iters, after_warmup=reset)
    result["frames"] = frames[0]
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def time_train_step(config: SERConfig, waves: list[np.ndarray], device: torch.device, steps: int = 5) -> dict:
    """Samples per second of a LoRA (r=8 on q, k, v) training step with the downstream network trainable."""
    import torch

    from serval.features import compute_features
    from serval.model import SERConfig, SERModel

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
    import torch

    from serval.model import SERConfig, SERModel

    torch.manual_seed(seed)
    ours = SERModel(SERConfig.for_whisper(size)).to(device).eval()
    published = SERModel(SERConfig.for_whisper(size, pad_to_30s=True)).to(device).eval()
    published.load_state_dict(ours.state_dict())
    return ours, published


def engine_predictors(device: torch.device, model: str | None = None) -> dict:
    """{engine name: predictor} of one model: torch fp32 on the CPU, ONNX Runtime, torch bf16 on a GPU."""
    import torch

    from serval.onnx_engine import load_engine

    engines = {"torch_fp32_cpu": load_engine(model, "torch", device="cpu")}
    engines["onnxruntime_cpu"] = load_engine(model, "onnx", threads=torch.get_num_threads())
    if device.type == "cuda":
        engines["torch_bf16_cuda"] = load_engine(model, "torch", device=str(device))
    return engines


def time_engines(engines: dict, waves: list[np.ndarray], min_seconds: float = 2.0) -> dict:
    """Each engine's batch and single-clip timing on `waves`, with its ratios to the first (torch on the CPU)."""
    out = {}
    for name, predictor in engines.items():

        def run(batch, predictor=predictor):
            predictor.predict_waveforms(batch, batch_size=len(batch), check_finite=False)

        batch = time_call(lambda: run(waves), len(waves), min_seconds)
        single = time_call(lambda: run(waves[:1]), 1, min_seconds)
        out[name] = {"batch": batch, "single_clip_ms": single["ms_per_batch"]}
    base = next(iter(out.values()))
    for row in out.values():
        row["speedup_batch"] = round(row["batch"]["clips_per_s"] / base["batch"]["clips_per_s"], 2)
        row["speedup_single"] = round(base["single_clip_ms"] / row["single_clip_ms"], 2)
    return out


# Runs a command and prints its wall seconds and peak RSS (KiB). A child's peak is measured from this
# small process: one forked from the benchmark itself would count the benchmark's own pages as its peak.
_TIMER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "c = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, c)"
)


def _timed_process(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB, exit code) of one whole process, its output thrown away."""
    out = subprocess.run([sys.executable, "-c", _TIMER, *cmd], capture_output=True, text=True, check=True)
    seconds, kib, code = out.stdout.split()
    return float(seconds), int(kib) / 1024, int(code)


def cold_start(
    clip: str | os.PathLike, repeats: int = 3, engine: str = "auto", baseline: bool = True
) -> dict:
    """`serval predict CLIP` (whole process) against `python -c "import torch"`, run in turn `repeats` times.

    The ratio is the median of the pairwise ratios, so that a machine whose speed drifts still gives
    a fair one; times and peak RSS are medians too. `baseline=False` (no torch installed): serval alone.
    """
    if not baseline:
        return _cold_start_alone(clip, repeats, engine)
    ours = [sys.executable, "-m", "serval", "predict", os.fspath(clip), "--engine", engine, "--no-progress"]
    torch_only = [sys.executable, "-c", "import torch"]
    runs = []
    for i in range(repeats + 1):  # the first is a warm-up: the graph cache, the page cache
        a = _timed_process(ours)
        if a[2] != 0:
            raise RuntimeError(f"serval predict {clip} failed (exit {a[2]})")
        if i:
            runs.append((a, _timed_process(torch_only)))
    med = statistics.median
    return {
        "engine": engine,
        "repeats": repeats,
        "serval_predict_s": round(med(a[0] for a, _ in runs), 3),
        "import_torch_s": round(med(b[0] for _, b in runs), 3),
        "ratio": round(med(a[0] / b[0] for a, b in runs), 2),
        "serval_predict_peak_rss_mb": round(med(a[1] for a, _ in runs), 1),
        "import_torch_peak_rss_mb": round(med(b[1] for _, b in runs), 1),
    }


def _cold_start_alone(clip: str | os.PathLike, repeats: int, engine: str) -> dict:
    ours = [sys.executable, "-m", "serval", "predict", os.fspath(clip), "--engine", engine, "--no-progress"]
    runs = [_timed_process(ours) for _ in range(repeats + 1)]  # the first is a warm-up, as above
    if any(r[2] != 0 for r in runs):
        raise RuntimeError(f"serval predict {clip} failed")
    med = statistics.median
    return {
        "engine": engine,
        "repeats": repeats,
        "serval_predict_s": round(med(r[0] for r in runs[1:]), 3),
        "serval_predict_peak_rss_mb": round(med(r[1] for r in runs[1:]), 1),
    }


def _clip(path: str | None, folder: str) -> str:
    """The cold-start clip: `path`, else 4 s of noise written into `folder`."""
    if path:
        return path
    import soundfile as sf

    target = os.path.join(folder, "clip.wav")
    noise = np.random.default_rng(0).standard_normal(4 * SAMPLE_RATE).astype(np.float32) * 0.1
    sf.write(target, noise, SAMPLE_RATE)
    return target


def run_benchmark(
    size: str = "base",
    device: str | None = None,
    batch_size: int = 32,
    seconds: tuple[float, ...] = (4.0, 10.0),
    train: bool = False,
    seed: int = 0,
    min_seconds: float = 2.0,
    engines: bool = True,
    cold: bool = True,
    clip: str | None = None,
    repeats: int = 3,
) -> dict:
    """Published way vs serval's way for each clip length, plus single-clip latency.

    `engines`: also every engine on the bundled model (`time_engines`); `cold`: the cold start of
    `serval predict` on `clip` (default: 4 s of noise) against `import torch`, `repeats` pairs.
    """
    import torch

    from serval.inference import resolve_device

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
        waves = [
            rng.standard_normal(int(sec * SAMPLE_RATE)).astype(np.float32) * 0.1 for _ in range(batch_size)
        ]
        row = _length_row(ours, published, waves, dev, bf16, min_seconds)
        if train:
            row["lora_train_step"] = time_train_step(ours.config, waves, dev)
        report["results"].append({"clip_seconds": sec, **row})
    if engines and (DEFAULT_MODEL / "config.json").is_file():
        predictors = engine_predictors(dev)
        report["engines"] = engine_rows(predictors, seconds, batch_size, rng, min_seconds)
    if cold:
        with tempfile.TemporaryDirectory() as tmp:
            report["cold_start"] = cold_start(_clip(clip, tmp), repeats)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return report


def _length_row(ours, published, waves: list, dev, bf16: bool, min_seconds: float) -> dict:
    """The published way against serval's on one batch of clips of one length, and on its first clip alone."""
    base = time_inference(published, waves, dev, bf16=False, min_seconds=min_seconds)
    fast = time_inference(ours, waves, dev, bf16=bf16, min_seconds=min_seconds)
    single_base = time_inference(published, waves[:1], dev, bf16=False, min_seconds=min_seconds)
    single_fast = time_inference(ours, waves[:1], dev, bf16=bf16, min_seconds=min_seconds)
    return {
        "published_fp32_30s": base,
        "serval_own_length": fast,
        "speedup_batch": round(fast["clips_per_s"] / base["clips_per_s"], 2),
        "single_clip_ms_published": single_base["ms_per_batch"],
        "single_clip_ms_serval": single_fast["ms_per_batch"],
        "speedup_single": round(single_base["ms_per_batch"] / single_fast["ms_per_batch"], 2),
    }


def engine_rows(predictors: dict, seconds, batch_size: int, rng, min_seconds: float) -> list[dict]:
    """`time_engines` on a batch of random clips of each length: one row per length."""
    rows = []
    for sec in seconds:
        n = int(sec * SAMPLE_RATE)
        waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for _ in range(batch_size)]
        rows.append({"clip_seconds": sec, **time_engines(predictors, waves, min_seconds)})
    return rows


def run_onnx_benchmark(
    batch_size: int = 32,
    seconds: tuple[float, ...] = (4.0, 10.0),
    seed: int = 0,
    min_seconds: float = 2.0,
    cold: bool = True,
    clip: str | None = None,
    repeats: int = 3,
) -> dict:
    """The base install's benchmark (no torch): ONNX Runtime on the bundled model, and the cold start."""
    from serval.onnx_engine import load_engine

    rng = np.random.default_rng(seed)
    report = {
        "device": platform.processor() or "cpu",
        "torch": None,
        "threads": os.cpu_count(),
        "whisper_size": "base",
        "batch_size": batch_size,
        "serval_dtype": "fp32",
        "results": [],
        "engines": [],
    }
    predictors = {"onnxruntime_cpu": load_engine(None, "onnx")}
    report["engines"] = engine_rows(predictors, seconds, batch_size, rng, min_seconds)
    if cold:
        with tempfile.TemporaryDirectory() as tmp:
            report["cold_start"] = cold_start(_clip(clip, tmp), repeats, "onnx", baseline=False)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return report


def format_report(report: dict) -> str:
    """A Markdown table of a benchmark report."""
    lines = [
        f"device: {report['device']} · torch {report['torch'] or 'not installed'} · "
        f"Whisper-{report['whisper_size']} encoder · batch {report['batch_size']} · serval in {report['serval_dtype']}",
    ]
    if report["results"]:
        lines += [
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
    for row in report.get("engines", []):
        lines += [
            f"\nengines, bundled model, {row['clip_seconds']:g} s clips (ratios to torch fp32 on the CPU):",
            "",
            "| engine | clips/s | speed-up | 1 clip ms | speed-up |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, r in row.items():
            if name != "clip_seconds":
                lines.append(
                    f"| {name} | {r['batch']['clips_per_s']} | {r['speedup_batch']}x | "
                    f"{r['single_clip_ms']} | {r['speedup_single']}x |"
                )
    c = report.get("cold_start")
    if c and "import_torch_s" not in c:
        lines.append(
            f"\ncold start (median of {c['repeats']}): serval predict one clip {c['serval_predict_s']} s, "
            f"peak RSS {c['serval_predict_peak_rss_mb']} MB (torch not installed: no import-torch baseline)"
        )
    elif c:
        lines.append(
            f"\ncold start (median of {c['repeats']}, in turn): serval predict one clip {c['serval_predict_s']} s, "
            f"python -c 'import torch' {c['import_torch_s']} s, ratio {c['ratio']}x; peak RSS "
            f"{c['serval_predict_peak_rss_mb']} MB against {c['import_torch_peak_rss_mb']} MB"
        )
    lines.append(f"\npeak RSS of this process: {report['peak_rss_mb']} MB")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size",
        default="base",
        help="Whisper encoder size (random weights; tiny, base, small, medium, large-v3…)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, nargs="+", default=[4.0, 10.0], help="clip lengths to measure")
    p.add_argument("--train", action="store_true", help="also time a LoRA training step")
    p.add_argument("--no-engines", action="store_true", help="skip the engines on the bundled model")
    p.add_argument("--no-cold-start", action="store_true", help="skip the cold-start processes")
    p.add_argument("--clip", help="the audio file of the cold start (default: 4 s of noise)")
    p.add_argument("--repeats", type=int, default=3, help="cold-start pairs (default 3)")
    p.add_argument("--json", help="also write the report as JSON here")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    if not _has_torch():  # the base install: ONNX Runtime only, said in one line
        print(
            "serval bench: torch is not installed: ONNX Runtime only (the network parts: serval[train])",
            file=sys.stderr,
        )
        report = run_onnx_benchmark(
            args.batch_size,
            tuple(args.seconds),
            cold=not args.no_cold_start,
            clip=args.clip,
            repeats=args.repeats,
        )
        return _write(report, args.json)
    from serval.model_config import WHISPER_SIZES

    if args.size not in WHISPER_SIZES:
        raise ValueError(f"--size must be one of {', '.join(WHISPER_SIZES)}, not {args.size!r}")
    report = run_benchmark(
        args.size,
        args.device,
        args.batch_size,
        tuple(args.seconds),
        train=args.train,
        engines=not args.no_engines,
        cold=not args.no_cold_start,
        clip=args.clip,
        repeats=args.repeats,
    )
    return _write(report, args.json)


def _write(report: dict, json_path: str | None) -> int:
    sys.stdout.write(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0
