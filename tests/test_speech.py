"""A clip's speech measure (`serval.vad.speech_fraction`, NO_SPEECH_FRACTION): real speech from every
corpus in ../shared/data has speech; silence, noise, tones, chords and melodies have none."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import clips

from serval.audio import SAMPLE_RATE, load_audio
from serval.vad import (
    FRAME,
    NO_SPEECH_FRACTION,
    SileroVAD,
    frame_probabilities,
    speech_fields,
    speech_fraction,
)

SR = SAMPLE_RATE
# every corpus, the glob of its clips, and how many to take (spread over the sorted list)
CORPORA = {
    "ravdess": ("**/*.flac", 8),
    "emodb": ("*.flac", 4),
    "ased": ("**/*.flac", 6),
    "tess": ("**/*.flac", 6),
    "turev": ("**/*.flac", 6),
    "tava": ("audio/recordings/*.flac", 4),
    "baved": ("**/*.flac", 6),
    "nemo": ("**/*.opus", 4),
}


def _t(seconds: float) -> np.ndarray:
    return np.arange(int(seconds * SR)) / SR


def harmonic(freq: float, seconds: float) -> np.ndarray:
    """A note with decaying partials and a struck envelope (a piano or guitar, roughly)."""
    t = _t(seconds)
    partials = sum(np.sin(2 * np.pi * k * freq * t) / k**1.5 for k in range(1, 9))
    return partials * np.minimum(1, t / 0.02) * np.exp(-1.5 * t)


def not_speech() -> dict[str, np.ndarray]:
    """Sounds that must have no speech: silence, noise, tones, a chord, a melody (3 s each)."""
    rng = np.random.default_rng(0)
    t = _t(3.0)
    melody = [harmonic(f, 0.375) for f in (261.6, 329.6, 392.0, 523.3, 440.0, 349.2, 293.7, 261.6)]
    sounds = {
        "silence": np.zeros(len(t)),
        "white noise -20 dBFS": 0.03 * rng.standard_normal(len(t)),
        "white noise -6 dBFS": 0.17 * rng.standard_normal(len(t)),
        "tone 440 Hz": 0.5 * np.sin(2 * np.pi * 440 * t),
        "tone 1 kHz": 0.5 * np.sin(2 * np.pi * 1000 * t),
        "chord C major": 0.2 * sum(np.sin(2 * np.pi * f * t) for f in (261.63, 329.63, 392.0)),
        "chord, harmonic notes": 0.2 * sum(harmonic(f, 3.0) for f in (220.0, 261.63, 329.63, 392.0)),
        "melody": 0.4 * np.concatenate(melody),
    }
    return {k: v.astype(np.float32) for k, v in sounds.items()}


def speech_clips() -> list:
    return [p for corpus, (glob, n) in CORPORA.items() for p in clips(corpus, glob, n=n)]


def test_sounds_without_speech_have_no_speech():
    for name, wave in not_speech().items():
        fraction = speech_fraction(wave)
        assert 0.0 <= fraction < NO_SPEECH_FRACTION, (name, fraction)
        assert speech_fields(fraction)["no_speech"] is True


def test_speech_from_every_corpus_has_speech(data_dir):
    found = {str(p.relative_to(data_dir)): speech_fraction(load_audio(p)) for p in speech_clips()}
    assert {k.split("/")[0] for k in found} == set(CORPORA)
    low = {k: round(v, 3) for k, v in found.items() if v < NO_SPEECH_FRACTION}
    assert not low, f"speech clips measured as no speech: {low}"
    # and the threshold is not a hair's breadth below them: the quietest still has twice as much
    assert min(found.values()) >= 2 * NO_SPEECH_FRACTION


def test_the_quietest_clips_have_speech():
    """RAVDESS normal-intensity neutral clips and TESS's older speaker are the quietest recordings."""
    quiet = clips("ravdess", "Actor_*/03-01-01-01-*.flac", n=6) + clips("tess", "OAF/*_neutral.flac", n=4)
    for p in quiet:
        x = load_audio(p)
        assert np.sqrt(np.mean(x**2)) < 0.05  # really quiet
        assert speech_fraction(x) >= NO_SPEECH_FRACTION, p
        assert speech_fraction(0.1 * x) >= NO_SPEECH_FRACTION, p  # and at a tenth of the level


def test_screams_are_heard_an_octave_lower(data_dir):
    """Screamed and sobbed clips that Silero hears as no speech at their own pitch are speech an
    octave lower; the sounds that are not speech stay below the threshold either way."""
    from serval.vad import _fraction

    screams = [
        "ravdess/Actor_18/03-01-05-02-02-01-18.flac",  # angry, strong
        "tava/audio/recordings/s23_frightened_audio.flac",
        "ased/04Sad/s4-07-01-01-05.flac",
    ]
    for name in screams:
        wave = load_audio(data_dir / name)
        assert _fraction(frame_probabilities(wave)) < NO_SPEECH_FRACTION, name  # missed at full pitch
        assert speech_fraction(wave) >= 2 * NO_SPEECH_FRACTION, name


def test_fields_round_and_decide_on_the_same_number():
    assert speech_fields(0.4321) == {"speech_fraction": 0.432, "no_speech": False}
    assert speech_fields(0.0) == {"speech_fraction": 0.0, "no_speech": True}
    just_below = NO_SPEECH_FRACTION - 0.0004  # rounds to NO_SPEECH_FRACTION: speech, as the record says
    assert speech_fields(just_below) == {"speech_fraction": NO_SPEECH_FRACTION, "no_speech": False}
    assert speech_fields(NO_SPEECH_FRACTION - 0.001)["no_speech"] is True


def test_frame_probabilities_are_streaming_silero():
    """One ONNX call per clip gives what the streaming TorchScript VAD gives frame by frame."""
    pytest.importorskip("torch")
    waves = [load_audio(p) for p in clips("ravdess", n=2) + clips("nemo", "**/*.opus", n=1)]
    long = np.concatenate(waves * 5)  # ~50 s: more frames than one ONNX call takes
    assert len(long) > 1024 * FRAME
    for wave in [*waves, long, waves[0][:1000]]:
        vad = SileroVAD()
        padded = np.concatenate([wave, np.zeros(-len(wave) % FRAME, np.float32)])
        want = vad.probabilities(padded)
        got = frame_probabilities(wave)
        assert got.shape == want.shape == (-(-len(wave) // FRAME),)
        np.testing.assert_allclose(got, want, atol=1e-4)
        stream = SileroVAD()
        flags = np.concatenate([stream.push(wave), stream.flush()])
        assert abs(speech_fraction(wave) - flags.mean()) <= 1 / len(flags)  # a flag may flip at 0.5 exactly


def test_threads_share_one_model():
    waves = [load_audio(p) for p in clips("emodb", n=4)] + list(not_speech().values())[:4]
    alone = [speech_fraction(w) for w in waves]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(speech_fraction, waves * 3))
    assert together == alone * 3
    assert max(alone) > 0.5 and min(alone) == 0.0  # speech and silence both among them
    assert speech_fraction(np.zeros(0, np.float32)) == 0.0
