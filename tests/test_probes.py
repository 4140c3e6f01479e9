"""The model card's linear probes (benchmarks/probes.py): pooled features, their cache, CCC intervals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from probes import PooledFeatures, ccc_ci  # noqa: E402

from serval.audio import load_audio  # noqa: E402
from serval.metrics import ccc  # noqa: E402


def test_ccc_ci_brackets_the_estimate():
    rng = np.random.default_rng(0)
    gold = rng.uniform(size=200)
    pred = gold + rng.normal(scale=0.2, size=200)
    lo, hi = ccc_ci(gold, pred, n_resamples=300)
    assert lo < ccc(gold, pred) < hi and hi - lo < 0.2
    assert ccc_ci(gold, pred, n_resamples=300) == (lo, hi)  # seeded
    assert np.isnan(ccc_ci(gold[:1], pred[:1])[0])


def test_pooled_features_are_cached_per_clip(tmp_path, ravdess_clips, one_thread):
    features = PooledFeatures(tmp_path / "probe-cache")
    waves = [load_audio(p) for p in ravdess_clips[:2]]
    first = features(waves)
    assert first.shape == (2, 7 * 512) and np.isfinite(first).all()
    # the 7 blocks are 7 different encoder outputs (embedding, 5 inner layers, the normed last)
    blocks = first[0].reshape(7, 512)
    assert all(not np.allclose(blocks[i], blocks[i + 1]) for i in range(6))

    def no_encoding(_waves):
        raise AssertionError("a cached clip was encoded again")

    features._encode = no_encoding
    assert np.array_equal(features(waves[::-1]), first[::-1])
    other = PooledFeatures(tmp_path / "probe-cache")  # a new process reads the same files
    other._encode = no_encoding
    assert np.array_equal(other(waves), first)
    with pytest.raises(AssertionError, match="encoded again"):
        other([waves[0][: len(waves[0]) // 2]])  # a different clip is not a cache hit
