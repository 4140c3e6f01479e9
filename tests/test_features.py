"""serval.features against transformers' WhisperFeatureExtractor on real clips from the three corpora."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blas_threads, clips
from transformers import WhisperFeatureExtractor

from serval.audio import load_audio
from serval.features import (
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    compute_features,
    log_mel,
    mel_filter_bank,
    mel_filters,
    num_frames,
)

TOL = 1e-4  # max abs difference allowed against the reference, in normalised log-mel units


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    """12 real clips: 4 RAVDESS (English), 4 EmoDB (German), 4 ASED (Amharic), of differing lengths."""
    paths = clips("ravdess", n=4) + clips("emodb", n=4) + clips("ased", n=4)
    out = [load_audio(p) for p in paths]
    assert len({len(w) for w in out}) > 3
    return out


@pytest.fixture(scope="module")
def reference(waves) -> dict[int, np.ndarray]:
    """WhisperFeatureExtractor's 30 s features of the clips, for 80 and 128 mel bins."""
    return {
        n: WhisperFeatureExtractor(feature_size=n)(waves, sampling_rate=16000, return_tensors="np")[
            "input_features"
        ]
        for n in (80, 128)
    }


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.slow
def test_30s_matches_whisper_feature_extractor(waves, reference, n_mels):
    feats, lengths = compute_features(waves, n_mels=n_mels, pad_to_30s=True)
    ref = reference[n_mels]
    assert feats.dtype == torch.float32 and feats.shape == (len(waves), n_mels, N_FRAMES) == ref.shape
    assert lengths.dtype == torch.long and lengths.tolist() == [N_FRAMES] * len(waves)
    assert np.abs(feats.numpy() - ref).max() <= TOL


@pytest.mark.parametrize("n_mels", [80, 128])
def test_own_length_is_prefix_of_30s(waves, reference, n_mels):
    feats, lengths = compute_features(waves, n_mels=n_mels)
    expected = [len(w) // HOP_LENGTH for w in waves]
    assert lengths.tolist() == expected
    width = max(expected) + max(expected) % 2
    assert feats.shape == (len(waves), n_mels, width) and width % 2 == 0
    for i, f in enumerate(expected):
        # the dynamic-range clamp is over the clip's own frames; on these clips its peak is the
        # same as over the 30 s window's, so the prefix matches to the same tolerance everywhere
        assert np.abs(feats[i, :, :f].numpy() - reference[n_mels][i, :, :f]).max() <= TOL
        assert torch.all(feats[i, :, f:] == 0.0)


def test_batch_invariance(waves):
    short, long = waves[4], np.concatenate([waves[0], waves[1], waves[2]])
    assert len(short) < len(long)
    alone, n_alone = compute_features([short])
    batched, n_batched = compute_features([long, short, waves[9]])
    f = len(short) // HOP_LENGTH
    assert n_alone.item() == n_batched[1].item() == f
    assert batched.shape[2] > alone.shape[2]
    torch.testing.assert_close(batched[1, :, :f], alone[0, :, :f], atol=1e-6, rtol=0)
    # a loud neighbour does not move the clip's dynamic-range clamp
    loud, _ = compute_features([short, 20 * long])
    torch.testing.assert_close(loud[0, :, :f], alone[0, :, :f], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_near_and_past_30s(waves):
    """Clips that end within the 30 s window's reflect pad, or run past it, up to max_frames."""
    joined = np.concatenate(waves * 4)
    assert len(joined) > N_SAMPLES + 200
    edge = [joined[: N_SAMPLES - 37], joined[:N_SAMPLES], joined[: N_SAMPLES - 1000]]
    ref = WhisperFeatureExtractor()(edge, sampling_rate=16000, return_tensors="np")["input_features"]
    feats, lengths = compute_features(edge)
    assert lengths.tolist() == [2999, 3000, 2993] and feats.shape[2] == 3000
    for i, f in enumerate(lengths.tolist()):
        assert np.abs(feats[i, :, :f].numpy() - ref[i, :, :f]).max() <= TOL
    # past 30 s: own-length frames use the real samples, so only frames clear of the cut match
    feats, lengths = compute_features([joined[: N_SAMPLES + 159]])
    assert lengths.tolist() == [3000]
    assert np.abs(feats[0, :, :2999].numpy() - ref[1, :, :2999]).max() <= TOL
    assert np.abs(feats[0, :, 2999].numpy() - ref[1, :, 2999]).max() > 10 * TOL
    with pytest.raises(ValueError, match="timeline"):
        compute_features([joined[: N_SAMPLES + 160]])
    feats, lengths = compute_features([joined], max_frames=len(joined) // HOP_LENGTH)
    assert lengths.item() == len(joined) // HOP_LENGTH and feats.shape[2] % 2 == 0


def test_inputs_and_errors(waves):
    w = waves[0]
    base, _ = compute_features([w])
    as_tensor, _ = compute_features([torch.from_numpy(w)])
    as_f64, _ = compute_features([w.astype(np.float64)])
    torch.testing.assert_close(as_tensor, base, atol=0, rtol=0)
    torch.testing.assert_close(as_f64, base, atol=0, rtol=0)
    f = num_frames(len(w))
    assert f == len(w) // HOP_LENGTH and base.shape[2] == f + f % 2
    with pytest.raises(ValueError, match="empty"):
        compute_features([])
    with pytest.raises(ValueError, match="1-D"):
        compute_features([np.stack([w, w])])
    with pytest.raises(ValueError, match="list of 1-D"):
        compute_features(w)
    with pytest.raises(ValueError, match="fewer than one feature frame"):
        compute_features([w, w[:100]])
    bad = w.copy()
    bad[10] = np.nan
    with pytest.raises(ValueError, match=r"clips \[1\].*NaN"):
        compute_features([w, bad])
    # 30 s mode takes any length: short clips are padded, long ones cut
    feats, _ = compute_features([w[:100], np.concatenate(waves * 4)], pad_to_30s=True)
    assert feats.shape == (2, 80, N_FRAMES) and torch.isfinite(feats).all()


def test_mel_filters_cached():
    fb = mel_filters(128)
    assert fb.shape == (128, 201) and mel_filters(128) is fb and mel_filters(80).shape == (80, 201)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_transformers(n_mels):
    """Our own filters, bit for bit the ones transformers builds for WhisperFeatureExtractor."""
    from transformers.audio_utils import mel_filter_bank as reference

    ref = reference(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    ours = mel_filter_bank(n_mels)
    assert ours.dtype == ref.dtype == np.float64 and ours.shape == ref.shape == (201, n_mels)
    assert np.array_equal(ours, ref)
    assert np.array_equal(mel_filters(n_mels).numpy(), ref.T.astype(np.float32))


@pytest.mark.parametrize("pad_to_30s", [False, True])
@pytest.mark.slow
def test_numpy_log_mel_matches_torch(waves, pad_to_30s):
    joined = np.concatenate(waves * 4)
    batch = [*waves, waves[0][:1600], joined[: N_SAMPLES - 37], joined[:N_SAMPLES]]
    feats, lengths = compute_features(batch, n_mels=128, pad_to_30s=pad_to_30s)
    ours, our_lengths = log_mel(batch, n_mels=128, pad_to_30s=pad_to_30s)
    assert ours.dtype == np.float32 and ours.shape == tuple(feats.shape)
    assert our_lengths.dtype == np.int64 and our_lengths.tolist() == lengths.tolist()
    assert np.abs(ours - feats.numpy()).max() <= TOL
    assert np.all(ours[len(waves), :, 10:] == 0.0) == (not pad_to_30s)  # the 0.1 s clip's padding
    with pytest.raises(ValueError, match=r"clips \[1\].*NaN"):
        log_mel([waves[0], np.full(1600, np.inf, np.float32)])
    with pytest.raises(ValueError, match="fewer than one feature frame"):
        log_mel([waves[0][:100]])


def test_import_is_torch_free():
    """The numpy path (the ONNX engine's) neither imports torch nor transformers."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from serval.features import log_mel; "
        "f, n = log_mel([np.zeros(1600, np.float32)]); "
        "print(f.shape, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1,", "80,", "10)", "False", "False"]


def test_check_finite_can_be_skipped(waves):
    bad = waves[0].copy()
    bad[10] = np.nan
    feats, _ = compute_features([bad], check_finite=False)  # the caller vouches; no error
    ours, _ = log_mel([bad], check_finite=False)
    assert feats.shape[2] == ours.shape[2] == num_frames(len(bad)) + num_frames(len(bad)) % 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pad_to_30s", [False, True])
def test_cuda_matches_cpu(waves, pad_to_30s):
    cpu, n_cpu = compute_features(waves, n_mels=128, pad_to_30s=pad_to_30s)
    gpu, n_gpu = compute_features(waves, n_mels=128, pad_to_30s=pad_to_30s, device="cuda")
    assert gpu.device.type == "cuda" and n_gpu.tolist() == n_cpu.tolist()
    assert (gpu.cpu() - cpu).abs().max().item() <= TOL


def test_numpy_log_mel_runs_its_product_on_one_blas_thread(monkeypatch):
    """Woken BLAS threads spin after the product and take the cores ONNX Runtime runs on next."""
    import serval.features as features

    real = features._mel_matrix
    seen = []

    class Spy:
        def __init__(self, matrix):
            self.matrix = matrix

        def __matmul__(self, other):
            seen.append(blas_threads())
            return self.matrix @ other

    before = blas_threads()
    monkeypatch.setattr(features, "_mel_matrix", lambda n: Spy(real(n)))
    wave = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    feats, _ = features.log_mel([wave])
    assert before and seen == [[1] * len(before)]  # numpy's BLAS found, and held to one thread
    assert blas_threads() == before  # given back
    monkeypatch.setattr(features, "_mel_matrix", real)
    assert np.allclose(feats, features.log_mel([wave])[0])
