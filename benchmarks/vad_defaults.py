"""Choosing the VAD defaults of `serval timeline --vad` by measuring them on built recordings.

A recording is built from real clips of ../shared/data (all 8 corpora, each clip trimmed to
its speech by energy, given a loudness between quiet and loud) joined by 0.5-3 s pauses and
a few long ones, over real background noise (../shared/data/noise) at a realistic SNR. The
ground truth is where the clips are. Every candidate setting (Silero speech threshold, the
share of a window that must be speech) is then scored on the default 4 s / 2 s grid:

- kept: the share of windows holding >= 1 s of speech that are scored (the goal: >= 95 %);
- noise scored: the share of windows holding no speech at all that are scored anyway;
- clips: the share of clips (>= 1 s) that at least one scored window overlaps by >= 0.5 s.

Silero runs once per recording; each threshold's frame flags come from Silero's own
hysteresis on those probabilities, and each window's speech fraction from the same function
`serval.windows.sliding_windows` uses. The defaults are then run through `sliding_windows`
itself on the first recording, and must decide every window the same way.

    python benchmarks/vad_defaults.py                    # seeds 0-11, 3 minutes each
    python benchmarks/vad_defaults.py --snr 0,12 --gain=-12,0  # louder noise, quieter talkers
    python benchmarks/vad_defaults.py --window 2 --hop 2        # the paper's fine-grained grid
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SERVAL_TEST_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))
from serval.vocab import SAMPLE_RATE  # noqa: E402

CORPORA = {  # corpus -> clip pattern under DATA
    "ravdess": "Actor_*/*.flac",
    "emodb": "*.flac",
    "ased": "*/*.flac",
    "tess": "*/*.flac",
    "turev": "*/*.flac",
    "tava": "audio/recordings/*.flac",
    "baved": "*/*.flac",
    "nemo": "*/*.opus",
}
NOISES = ("doing_the_dishes", "dude_miaowing", "exercise_bike", "pink_noise", "running_tap", "white_noise")
SPEECH_LEVEL = 0.05  # RMS of a clip at 0 dB gain (-26 dBFS); the SNR is measured against it
THRESHOLDS = (0.5, 0.35, 0.25, 0.15)
MIN_SPEECH = (0.5, 0.25, 0.15, 0.1, 0.05)


@dataclass
class Recording:
    """A built recording: 16 kHz samples, where the clips are, and how it was made."""

    seed: int
    wave: np.ndarray
    speech: list[tuple[float, float]]  # seconds, one span per clip, in time order
    noise: str
    snr_db: float
    clips: list[str] = field(default_factory=list)  # "corpus/name gain_db" per clip


def speech_part(x: np.ndarray) -> np.ndarray:
    """A clip without its leading and trailing pause, cut by 20 ms frame energy (1/20 of the loudest)."""
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    energy = np.sqrt((frames**2).mean(1))
    on = np.flatnonzero(energy > energy.max() / 20)
    return x[on[0] * 320 : (on[-1] + 1) * 320] if len(on) else x[:0]


def _files(corpus: str, data: Path) -> list[Path]:
    found = sorted((data / corpus).glob(CORPORA[corpus]))
    if not found:
        raise FileNotFoundError(f"{data / corpus}: no clips matching {CORPORA[corpus]}")
    return found


def _noise(name: str, n: int, rng: np.random.Generator, data: Path) -> np.ndarray:
    # a random stretch of the recording, looped to n samples, at unit RMS
    from serval.audio import load_audio

    x = load_audio(data / "noise" / "speech-commands" / f"{name}.flac")
    x = np.roll(x, -int(rng.integers(len(x))))
    x = np.tile(x, n // len(x) + 1)[:n]
    return (x / max(float(np.sqrt((x**2).mean())), 1e-9)).astype(np.float32)


def noise_stretch(name: str, seconds: float, rms: float, seed: int = 0, data: Path = DATA) -> np.ndarray:
    """`seconds` of one of NOISES at RMS `rms`, from a random point of its recording (looped)."""
    return _noise(name, int(seconds * SAMPLE_RATE), np.random.default_rng(seed), data) * np.float32(rms)


def build_recording(
    seed: int,
    seconds: float = 180.0,
    corpora: tuple[str, ...] = tuple(CORPORA),
    noise: str | None = None,
    snr_db: tuple[float, float] = (10.0, 25.0),
    gain_db: tuple[float, float] = (-8.0, 0.0),
    pause: tuple[float, float] = (0.5, 3.0),
    long_pauses: int = 4,
    data: Path = DATA,
) -> Recording:
    """Clips of `corpora` with pauses, over one noise at an SNR drawn from `snr_db`; deterministic in `seed`.

    Each clip is trimmed to its speech, set to SPEECH_LEVEL and then a gain drawn from `gain_db`
    (quiet and loud talkers). Pauses are drawn from `pause`; `long_pauses` of them are 8-12 s
    instead, so the grid has windows of noise alone."""
    from serval.audio import load_audio

    rng = np.random.default_rng(seed)
    files = {c: _files(c, data) for c in corpora}
    noise = noise or NOISES[seed % len(NOISES)]
    snr = float(rng.uniform(*snr_db))
    total = int(seconds * SAMPLE_RATE)
    long_at = set(rng.choice(np.arange(2, 30), size=long_pauses, replace=False).tolist())
    parts, spans, names, t = [], [], [], 0
    while True:
        gap = rng.uniform(8.0, 12.0) if len(spans) in long_at else rng.uniform(*pause)
        corpus = corpora[int(rng.integers(len(corpora)))]
        path = files[corpus][int(rng.integers(len(files[corpus])))]
        clip = speech_part(load_audio(path))
        if not len(clip):
            continue
        gain = float(rng.uniform(*gain_db))
        clip = clip / float(np.sqrt((clip**2).mean())) * SPEECH_LEVEL * 10 ** (gain / 20)
        start = t + int(gap * SAMPLE_RATE)
        if start + len(clip) > total - int(pause[0] * SAMPLE_RATE):
            break
        parts.append((start, clip.astype(np.float32)))
        spans.append((start / SAMPLE_RATE, (start + len(clip)) / SAMPLE_RATE))
        names.append(f"{corpus}/{path.name} {gain:+.1f} dB")
        t = start + len(clip)
    wave = _noise(noise, total, rng, data) * SPEECH_LEVEL * 10 ** (-snr / 20)
    for start, clip in parts:
        wave[start : start + len(clip)] += clip
    wave /= max(1.0, float(np.abs(wave).max()) / 0.99)  # never clipped
    return Recording(seed, wave.astype(np.float32), spans, noise, round(snr, 1), names)


def speech_seconds(spans: list[tuple[float, float]], a: float, b: float) -> float:
    """Seconds of [a, b) inside the speech spans."""
    return sum(max(0.0, min(b, e) - max(a, s)) for s, e in spans)


def vad_probabilities(wave: np.ndarray) -> np.ndarray:
    """Silero's speech probability of every 32 ms frame (the last partial frame zero-padded)."""
    from serval.vad import FRAME, SileroVAD

    vad = SileroVAD()
    pad = (-len(wave)) % FRAME
    return vad.probabilities(np.concatenate([wave, np.zeros(pad, np.float32)]))


def frame_flags(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The speech flags `SileroVAD(threshold)` gives for these probabilities (its own hysteresis)."""
    from serval.vad import SileroVAD

    return SileroVAD(threshold)._flags(probs)


def decisions(rec: Recording, flags: np.ndarray, spec) -> list[tuple[float, float, float, bool]]:
    """(start, end, speech fraction, scored) of every window of `spec`'s grid, by the rule of
    `serval.windows.sliding_windows`."""
    from serval.windows import window_grid, window_speech

    out = []
    for a, b in window_grid(len(rec.wave) / SAMPLE_RATE, spec):
        first, n = round(a * SAMPLE_RATE), round((b - a) * SAMPLE_RATE)
        fraction = window_speech(flags, first, n)
        out.append((a, b, fraction, spec.keeps(fraction)))
    return out


def measure(rec: Recording, windows: list[tuple[float, float, float, bool]]) -> dict[str, tuple[int, int]]:
    """(hits, total) for kept speech windows, scored pure-noise windows and clips with a scored window."""
    held = [scored for a, b, _, scored in windows if speech_seconds(rec.speech, a, b) >= 1.0]
    silent = [scored for a, b, _, scored in windows if speech_seconds(rec.speech, a, b) == 0.0]
    long_clips = [(s, e) for s, e in rec.speech if e - s >= 1.0]
    hit = [any(scored and min(b, e) - max(a, s) >= 0.5 for a, b, _, scored in windows) for s, e in long_clips]
    return {
        "kept": (sum(held), len(held)),
        "silence": (sum(silent), len(silent)),
        "clips": (sum(hit), len(hit)),
    }


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def _pair(text: str) -> tuple[float, float]:
    a, b = (float(v) for v in text.split(","))
    return a, b


def _share(counts: list[tuple[int, int]]) -> str:
    hits, total = sum(h for h, _ in counts), sum(t for _, t in counts)
    return f"{100 * hits / max(total, 1):5.1f} % ({hits}/{total})"


def check_against_sliding_windows(rec: Recording, spec) -> None:
    """The replayed decisions must equal what `sliding_windows` itself decides (a null model scores)."""
    from serval.windows import sliding_windows

    class Null:
        classes, dimensions, name = ("neutral",), (), "null"

        def predict_waveforms(self, waves, batch_size=16):
            return np.ones((len(waves), 1), np.float32), np.zeros((len(waves), 0), np.float32)

    flags = frame_flags(vad_probabilities(rec.wave), spec.vad_threshold)
    replay = [scored for *_, scored in decisions(rec, flags, spec)]
    real = [r.scored for r in sliding_windows(rec.wave, Null(), spec)]
    if replay != real:
        diff = sum(a != b for a, b in zip(replay, real)) + abs(len(replay) - len(real))
        sys.exit(f"the replay differs from sliding_windows on {diff} windows")
    print(f"check: sliding_windows decides all {len(real)} windows of seed {rec.seed} as the replay does")


def main() -> int:
    from serval.windows import WindowSpec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0-11", help="recordings to build: a range 0-5 or a list 1,4,7")
    p.add_argument("--seconds", type=float, default=180.0, help="length of each recording")
    p.add_argument("--snr", default="10,25", help="range of the noise's SNR in dB (default 10,25)")
    p.add_argument("--gain", default="-8,0", help="range of the clips' gain in dB (default -8,0)")
    p.add_argument("--window", type=float, default=WindowSpec.window)
    p.add_argument("--hop", type=float, default=WindowSpec.hop)
    args = p.parse_args()
    t0 = time.time()
    recordings, probs = [], []
    for seed in _seeds(args.seeds):
        rec = build_recording(seed, args.seconds, snr_db=_pair(args.snr), gain_db=_pair(args.gain))
        recordings.append(rec)
        probs.append(vad_probabilities(rec.wave))
        print(f"seed {seed}: {len(rec.speech)} clips over {rec.noise} at {rec.snr_db:g} dB SNR", flush=True)
    print(f"built and ran Silero on {len(recordings)} recordings in {time.time() - t0:.0f} s\n")
    print(f"{args.window:g} s windows every {args.hop:g} s")
    print("| threshold | min_speech | kept (>= 1 s speech) | noise scored | clips with a scored window |")
    print("| --- | --- | --- | --- | --- |")
    for threshold in THRESHOLDS:
        flags = [frame_flags(pr, threshold) for pr in probs]
        for min_speech in MIN_SPEECH:
            spec = WindowSpec(args.window, args.hop, vad=True, vad_threshold=threshold, min_speech=min_speech)
            got = [measure(r, decisions(r, f, spec)) for r, f in zip(recordings, flags)]
            row = [_share([g[k] for g in got]) for k in ("kept", "silence", "clips")]
            default = (threshold, min_speech) == (WindowSpec.vad_threshold, WindowSpec.min_speech)
            print(f"| {threshold:g} | {min_speech:g}{' (default)' if default else ''} | {' | '.join(row)} |")
    per_recording(recordings, probs, WindowSpec(args.window, args.hop, vad=True))
    check_against_sliding_windows(recordings[0], WindowSpec(args.window, args.hop, vad=True))
    return 0


def per_recording(recordings: list[Recording], probs: list[np.ndarray], spec) -> None:
    """Each recording's kept share (and noise windows scored) for every threshold at the default
    min_speech: an average can hide a recording that a setting fails."""
    print(f"\nper recording, kept (noise scored) at min_speech {spec.min_speech:g} and threshold:")
    print(f"| seed | noise | SNR | {' | '.join(f'{t:g}' for t in THRESHOLDS)} |")
    print(f"| --- | --- | --- | {' | '.join('---' for _ in THRESHOLDS)} |")
    for rec, pr in zip(recordings, probs):
        cells = []
        for threshold in THRESHOLDS:
            at = replace(spec, vad_threshold=threshold)
            got = measure(rec, decisions(rec, frame_flags(pr, threshold), at))
            cells.append(f"{_share([got['kept']]).split(' (')[0]} ({got['silence'][0]})")
        print(f"| {rec.seed} | {rec.noise} | {rec.snr_db:g} dB | {' | '.join(cells)} |")


if __name__ == "__main__":
    sys.exit(main())
