"""The gain-invariant front end (`SERConfig.gain_invariant`): a clip's level cannot change its answer.

Also benchmarks/level_invariance.py, which measures that on real clips.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from serval.audio import load_audio
from serval.checkpoint import save_model
from serval.features import PEAK_LOG10, compute_features, log_mel
from serval.model import SERConfig, SERModel
from serval.train.cache import encoder_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from level_invariance import GAINS_DB, sample_clips, scaled, unchanged  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def quiet(ravdess_clips) -> list[np.ndarray]:
    """Three real clips at -12 dB, so that +12 dB brings them back without clipping."""
    return [scaled(load_audio(p), -12.0) for p in ravdess_clips[:3]]


def tiny_folder(tmp_path: Path, gain_invariant: bool) -> Path:
    torch.manual_seed(0)
    model = SERModel(SERConfig.tiny(gain_invariant=gain_invariant, layer_weighting="weighted"))
    for p in model.parameters():  # a random model whose answers move with its input
        p.data += 0.2 * torch.randn_like(p)
    return save_model(model.eval(), tmp_path / f"tiny-{gain_invariant}")


def test_log_mel_is_the_same_at_any_level(quiet):
    for gain in (6.0, 12.0):
        louder = [scaled(w, gain) for w in quiet]
        for fn in (log_mel, lambda w, **k: tuple(t.numpy() for t in compute_features(w, **k))):
            a, _ = fn(quiet, gain_invariant=True)
            b, _ = fn(louder, gain_invariant=True)
            assert np.abs(a - b).max() <= TOL
            plain_a, _ = fn(quiet)
            plain_b, _ = fn(louder)  # Whisper's own features shift by 2 log10(g) / 4 where not clamped
            assert np.abs(plain_a - plain_b).max() >= gain / 20 / 2 - TOL
    feats, frames = log_mel(quiet, gain_invariant=True)
    for row, n in zip(feats, frames):
        assert row[:, :n].max() == pytest.approx((PEAK_LOG10 + 4) / 4, abs=1e-6)


def test_a_gain_invariant_model_gives_the_same_answer_at_any_level(quiet, tmp_path, monkeypatch):
    import serval

    monkeypatch.setenv("SERVAL_CACHE", str(tmp_path / "cache"))
    louder = [scaled(w, 12.0) for w in quiet]
    moved = {}
    for gain_invariant in (True, False):
        folder = tiny_folder(tmp_path, gain_invariant)
        for engine in ("torch", "onnx"):
            model = serval.load(folder, engine=engine)
            a, sa = model.predict_waveforms(quiet)
            b, sb = model.predict_waveforms(louder)
            moved[gain_invariant, engine] = max(np.abs(a - b).max(), np.abs(sa - sb).max())
    assert moved[True, "torch"] <= TOL and moved[True, "onnx"] <= TOL
    assert moved[False, "torch"] > 100 * TOL and moved[False, "onnx"] > 100 * TOL  # the test can fail


def test_cache_keys_tell_the_front_ends_apart():
    def settings(**options) -> dict:
        torch.manual_seed(0)
        return encoder_settings(SERModel(SERConfig.tiny(**options)), "float16")

    plain, invariant = settings(), settings(gain_invariant=True)
    assert "gain_invariant" not in plain  # caches written before the option keep their keys
    assert {k: v for k, v in invariant.items() if k != "gain_invariant"} == plain
    assert invariant["gain_invariant"] is True


def test_level_benchmark_counts_unchanged_labels(ravdess_clips, emodb_clips, tmp_path, monkeypatch):
    import serval
    from serval.clip import Clip

    monkeypatch.setenv("SERVAL_CACHE", str(tmp_path / "cache"))
    rows = [Clip(path=str(p), corpus="ravdess", split="dev") for p in ravdess_clips[:4]]
    rows += [Clip(path=str(p), corpus="emodb", split="train") for p in emodb_clips[:3]]
    picked = sample_clips(rows, per_corpus=3, seed=0)
    assert [r.corpus for r in picked] == ["emodb"] * 3 + ["ravdess"] * 3  # dev where a corpus has it
    assert sample_clips(rows, per_corpus=3, seed=0) == picked
    result = unchanged(serval.load(tiny_folder(tmp_path, True), engine="onnx"), picked)
    assert set(result) == {"all", "emodb", "ravdess"} and set(result["all"]) == {*GAINS_DB, "mean"}
    # quieter is exact; louder may clip a loud clip's peaks, which changes its features a little
    assert result["all"][-12.0] == result["all"][-6.0] == 1.0
    assert all(0.0 <= v <= 1.0 for table in result.values() for v in table.values())
