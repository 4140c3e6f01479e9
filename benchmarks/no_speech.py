"""The measurement behind `serval.vad.NO_SPEECH_FRACTION`: the speech fraction of real speech and of
sounds that are not speech.

Speech: every clip of the 8 corpora in ../shared/data (or `--per-corpus N` of each). Not speech:
digital silence, dither, white, pink and brown noise at several levels, pure tones, chords and
synthetic melodies (harmonic notes with envelopes and vibrato), 3 s and 10 s long, and the
recorded background noises of noise/speech-commands (reported, not part of the rule: a miaowing
cat is not required to be silence). Prints, per group, the lowest and highest fractions, and every
speech clip measured below the threshold. Exits 1 when a sound that is not speech reaches it.

    python benchmarks/no_speech.py                  # all ~9,700 clips: about 10 minutes on 2 busy cores
    python benchmarks/no_speech.py --per-corpus 50  # a quick look
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from serval.audio import load_audio
from serval.vad import NO_SPEECH_FRACTION, speech_fraction
from serval.vocab import SAMPLE_RATE

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = ("ravdess", "emodb", "ased", "tess", "turev", "tava", "baved", "nemo")
SR = SAMPLE_RATE


def _note(freq: float, seconds: float, rng: np.random.Generator, vibrato: float = 0.0) -> np.ndarray:
    """A harmonic note (decaying partials, attack/release envelope, optional vibrato)."""
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * freq * (t + vibrato * np.sin(2 * np.pi * 5.5 * t) / (2 * np.pi * 5.5))
    wave = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**1.5 for k in range(1, 9))
    env = np.minimum(1, t / 0.02) * np.exp(-1.5 * t)
    return wave * env


def _melody(seconds: float, rng: np.random.Generator, vibrato: float) -> np.ndarray:
    scale = 261.63 * 2 ** (np.array([0, 2, 4, 5, 7, 9, 11, 12]) / 12)
    notes = [
        _note(rng.choice(scale), 0.25 * rng.integers(1, 4), rng, vibrato) for _ in range(int(seconds * 4))
    ]
    return np.concatenate(notes)[: int(seconds * SR)]


def _colored(n: int, rng: np.random.Generator, power: float) -> np.ndarray:
    """Noise with a 1/f**power spectrum (0 white, 1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    x = np.fft.irfft(spec / f ** (power / 2), n)
    return x / np.abs(x).max()


def synthetic(seconds: float, seed: int = 0) -> dict[str, np.ndarray]:
    """{name: 16 kHz wave} of sounds that are not speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    out: dict[str, np.ndarray] = {"silence": np.zeros(n), "dither": rng.standard_normal(n) * 1e-4}
    for db in (-40, -20, -6):
        out[f"white {db} dBFS"] = rng.standard_normal(n) * 10 ** (db / 20) / 3
    for name, power in (("pink", 1), ("brown", 2)):
        out[f"{name} noise"] = 0.3 * _colored(n, rng, power)
    for f in (100, 220, 440, 1000, 3000):
        out[f"tone {f} Hz"] = 0.5 * np.sin(2 * np.pi * f * t)
    out["square 220 Hz"] = 0.3 * np.sign(np.sin(2 * np.pi * 220 * t))
    out["tremolo 440 Hz"] = 0.5 * np.sin(2 * np.pi * 440 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    for name, freqs in (("C major", (261.63, 329.63, 392.0)), ("A minor 7", (220.0, 261.63, 329.63, 392.0))):
        out[f"chord {name}"] = 0.2 * sum(np.sin(2 * np.pi * f * t) for f in freqs)
        out[f"chord {name} harmonic"] = 0.2 * sum(_note(f, seconds, rng) for f in freqs)
    out["melody"] = 0.4 * _melody(seconds, rng, 0.0)
    out["melody vibrato"] = 0.4 * _melody(seconds, rng, 0.01)
    out["melody + chord"] = 0.3 * _melody(seconds, rng, 0.005) + 0.1 * sum(
        np.sin(2 * np.pi * f * t) for f in (130.81, 164.81, 196.0)
    )
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def melodies() -> dict[str, np.ndarray]:
    """Ten random melodies, with and without vibrato, 1 to 5 s long: the sounds nearest to speech here."""
    out = {}
    for seed in range(10):
        for seconds in (1.0, 2.0, 3.0, 5.0):
            for vibrato in (0.0, 0.01):
                wave = 0.4 * _melody(seconds, np.random.default_rng(100 + seed), vibrato)
                out[f"melody {seed} {seconds:g}s vibrato {vibrato:g}"] = wave.astype(np.float32)
    return out


def speech(per_corpus: int | None) -> dict[str, list[tuple[float, str]]]:
    """{corpus: [(fraction, clip)]} over the corpora's clips (every one, or `per_corpus` of each)."""
    found: dict[str, list[tuple[float, str]]] = {}
    for corpus in CORPORA:
        files = sorted(
            p for p in (DATA / corpus).rglob("*") if p.suffix in (".flac", ".opus", ".ogg", ".wav")
        )
        if per_corpus:
            files = files[:: max(1, len(files) // per_corpus)][:per_corpus]
        found[corpus] = sorted((speech_fraction(load_audio(f)), str(f.relative_to(DATA))) for f in files)
        print(f"{corpus}: {len(files)} clips", file=sys.stderr)
    return found


def not_speech_report() -> float:
    """Print the highest fraction of each kind of sound that is not speech; the highest of all."""
    print(f"NO_SPEECH_FRACTION = {NO_SPEECH_FRACTION}\n\nnot speech (the highest over 1, 3 and 10 s):")
    worst = 0.0
    sets = [synthetic(seconds, seed) for seed, seconds in enumerate((1.0, 3.0, 10.0))]
    for name in sets[0]:
        value = max(speech_fraction(s[name]) for s in sets)
        worst = max(worst, value)
        print(f"  {name:28s} {value:.3f}")
    values = {k: speech_fraction(w) for k, w in melodies().items()}
    top = max(values, key=values.get)
    worst = max(worst, values[top])
    print(f"  {len(values)} melodies, 1-5 s         {values[top]:.3f} ({top})")
    print("recorded noise (reported only):")
    for f in sorted((DATA / "noise").rglob("*.flac")):
        print(f"  {f.stem:28s} {speech_fraction(load_audio(f)):.3f}")
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-corpus", type=int, help="clips of each corpus (default: every one)")
    args = ap.parse_args()
    worst = not_speech_report()
    print(f"speech: lowest, 1st percentile, median, clips below {NO_SPEECH_FRACTION}:")
    below, total = [], 0
    for corpus, values in speech(args.per_corpus).items():
        v = np.array([x for x, _ in values])
        below += [(x, name) for x, name in values if x < NO_SPEECH_FRACTION]
        total += len(v)
        n_below = int((v < NO_SPEECH_FRACTION).sum())
        print(
            f"  {corpus:8s} n={len(v):5d} min {v.min():.3f} p1 {np.percentile(v, 1):.3f} "
            f"median {np.median(v):.3f} below {n_below}"
        )
    print(
        f"\nnot speech: at most {worst:.3f}; speech clips below {NO_SPEECH_FRACTION}: {len(below)} of {total}"
    )
    for x, name in below:
        print(f"  {x:.3f} {name}")
    return 0 if worst < NO_SPEECH_FRACTION else 1


if __name__ == "__main__":
    sys.exit(main())
