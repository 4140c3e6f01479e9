"""serval.vad: Silero's ONNX model on ONNX Runtime against Silero's TorchScript model, and no torch on its path."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import clips

from serval.audio import load_audio
from serval.vad import FRAME, SileroVAD
from serval.vocab import SAMPLE_RATE

# one pattern per corpus; nEMO is Ogg Opus, the rest FLAC
CORPORA = {
    "ravdess": "**/*.flac",
    "emodb": "*.flac",
    "ased": "**/*.flac",
    "tess": "**/*.flac",
    "nemo": "**/*.opus",
    "baved": "**/*.flac",
    "turev": "**/*.flac",
    "tava": "**/*.flac",
}
PAUSE = np.zeros(int(1.5 * SAMPLE_RATE), np.float32)


@pytest.fixture(scope="module")
def recordings() -> dict[str, np.ndarray]:
    """Per corpus, three of its clips joined by 1.5 s pauses (at most 20 s), so speech starts and stops."""
    out = {}
    for corpus, pattern in CORPORA.items():
        waves = [load_audio(p)[: 6 * SAMPLE_RATE] for p in clips(corpus, pattern, n=3)]
        out[corpus] = np.concatenate([PAUSE, waves[0], PAUSE, waves[1], PAUSE, waves[2], PAUSE[:1000]])
    return out


@pytest.fixture(scope="module")
def jit():
    """Silero's TorchScript model from the silero-vad wheel: the reference, used in this test only."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("silero_vad")  # not imported: it sets torch's thread count
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("silero-vad (the torch reference) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
    return torch.jit.load(str(path), map_location="cpu").eval()


def jit_probabilities(model, wave: np.ndarray) -> np.ndarray:
    import torch

    model.reset_states()
    n = len(wave) // FRAME
    frames = torch.from_numpy(np.ascontiguousarray(wave[: n * FRAME])).view(n, FRAME)
    with torch.inference_mode():
        return np.array([float(model(frames[i : i + 1], SAMPLE_RATE)) for i in range(n)])


def hysteresis(probs: np.ndarray, on: float, off: float) -> np.ndarray:
    """Silero's speech flags, written out apart from serval.vad: on at `on`, off again below `off`."""
    flags, speaking = np.zeros(len(probs), bool), False
    for i, p in enumerate(probs):
        speaking = p >= on or (speaking and p >= off)
        flags[i] = speaking
    return flags


def segments(flags: np.ndarray) -> list[tuple[int, int]]:
    """Runs of speech frames as (first, end) frame numbers."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def streamed(vad: SileroVAD, wave: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, flags) of `wave` pushed in chunks that do not line up with the frames."""
    rng, probs, flags, i = np.random.default_rng(seed), [], [], 0
    while i < len(wave):
        n = int(rng.integers(1, 4000))
        p = vad.probabilities(wave[i : i + n])
        probs.append(p)
        flags.append(vad._flags(p))
        i += n
    return np.concatenate(probs), np.concatenate(flags)


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_same_speech_segments_as_torch_silero(recordings, jit, one_thread, corpus):
    wave = recordings[corpus]
    vad = SileroVAD()
    probs, flags = streamed(vad, wave, seed=len(corpus))
    want = jit_probabilities(jit, wave)
    assert len(probs) == len(want) == len(wave) // FRAME
    assert np.abs(probs - want).max() <= 1e-4
    got, ref = segments(flags), segments(hysteresis(want, vad.threshold, vad.neg_threshold))
    assert len(ref) >= 3, ref  # the three clips are found at all (a test of the recording, not the VAD)
    assert len(got) == len(ref), (got, ref)
    for (a, b), (c, d) in zip(got, ref):
        assert abs(a - c) <= 1 and abs(b - d) <= 1, (got, ref)


def test_reset_starts_the_stream_again(recordings):
    wave = recordings["emodb"]
    vad = SileroVAD()
    first = vad.probabilities(wave)
    vad.push(wave[:7000])
    vad.reset()
    assert vad.frames == 0
    np.testing.assert_allclose(vad.probabilities(wave), first, atol=1e-6)  # same process, same session


def test_runs_without_torch(recordings, tmp_path):
    """The VAD imports neither torch nor the silero-vad package: both are made unimportable."""
    wave = recordings["ravdess"]
    np.save(tmp_path / "wave.npy", wave)
    code = (
        "import json, sys\n"
        "sys.modules['torch'] = sys.modules['silero_vad'] = None  # an import of either now fails\n"
        "import numpy as np\n"
        "from serval.vad import SileroVAD\n"
        "vad = SileroVAD()\n"
        f"wave = np.load({str(tmp_path / 'wave.npy')!r})\n"
        "flags = np.concatenate([vad.push(wave), vad.flush()])\n"
        "print(json.dumps(flags.astype(int).tolist()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ}
    )
    assert done.returncode == 0, done.stderr
    vad = SileroVAD()
    want = np.concatenate([vad.push(wave), vad.flush()])
    got = np.array(json.loads(done.stdout), bool)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(got, want)
