"""serval.compiled: bucketed static shapes give the unpadded outputs; the compiled path runs (tiny, CPU)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import clips

from serval.audio import load_audio
from serval.compiled import StaticShapes, next_size
from serval.inference import Predictor, ensemble_forward
from serval.model import SERConfig, SERModel

TOL = 1e-4


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    """Real speech at 7 lengths, none on a bucket's edge, one past the largest compiled batch's reach."""
    speech = np.concatenate([load_audio(p) for p in clips("ravdess", n=4) + clips("emodb", n=4)])
    seconds = (0.25, 0.9, 1.3, 2.2, 3.7, 4.05, 7.5)
    return [speech[i * 8000 : i * 8000 + round(s * 16000)] for i, s in enumerate(seconds)]


def tiny_model(seed: int = 0, **overrides) -> SERModel:
    torch.manual_seed(seed)
    model = SERModel(SERConfig.tiny(**overrides)).eval()
    for p in model.parameters():  # random, not initial, weights: outputs that differ between clips
        p.data += 0.05 * torch.randn_like(p)
    return model


def test_next_size():
    assert [next_size(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]


@pytest.mark.parametrize("layer_weighting", ["last", "weighted"])
@pytest.mark.slow
def test_buckets_give_the_unbucketed_outputs(waves, layer_weighting):
    model = tiny_model(layer_weighting=layer_weighting)
    plain, bucketed = Predictor(model, "cpu"), Predictor(model, "cpu", buckets=True)
    for batch_size in (1, 3, 16):  # 16: more rows than the compiled sizes, so no row padding
        want = plain.predict_waveforms(waves, batch_size=batch_size)
        got = bucketed.predict_waveforms(waves, batch_size=batch_size)
        for w, g in zip(want, got):
            assert g.shape == w.shape and np.abs(g - w).max() <= TOL
    assert np.abs(want[0][0] - want[0][-1]).max() > 10 * TOL  # the clips' outputs differ: a real check


def test_shapes_are_bucketed():
    model = tiny_model()
    seen = []
    static = StaticShapes([model], ensemble_forward, lambda: torch.autocast("cpu", enabled=False))
    eager = static._eager

    def spy(features, lengths):
        seen.append((tuple(features.shape), lengths.tolist()))
        return eager(features, lengths)

    static._eager = spy
    feats = torch.randn(3, model.config.n_mels, 370)
    probs, scores = static(feats, torch.tensor([370, 250, 12]))
    assert seen == [((4, model.config.n_mels, 400), [370, 250, 12, 400])]  # 4 rows, 4 s wide
    assert probs.shape[0] == scores.shape[0] == 3


@pytest.mark.slow
def test_compiled_dispatch_and_warmup(waves):
    """The compiled path (torch.compile, aot_eager: no C++ build) warms up its shapes, then gives the same outputs."""
    model = tiny_model()
    plain, compiled = Predictor(model, "cpu"), Predictor(model, "cpu")
    compiled.set_static(compile=True, widths=(100, 400), batch_sizes=(1, 2), backend="aot_eager")
    assert compiled.warmup() == 4
    short = [w[: 16000 * 3] for w in waves[:3]]
    for w, g in zip(
        plain.predict_waveforms(short, batch_size=2), compiled.predict_waveforms(short, batch_size=2)
    ):
        assert np.abs(g - w).max() <= TOL


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler"
)
@pytest.mark.slow
def test_compiled_path_runs_on_cpu(waves):
    """mode="reduce-overhead" with inductor on a tiny network; skipped where inductor cannot build C++ kernels."""
    from torch._inductor.exc import InductorError

    model = tiny_model()
    plain = Predictor(model, "cpu")
    compiled = Predictor(model, "cpu", compile=True)
    compiled.static.widths, compiled.static.batch_sizes = (100,), (1,)  # one compile: a slow step on a CPU
    try:
        assert compiled.warmup() == 1
    except InductorError as e:
        pytest.skip(
            f"inductor could not build its C++ kernels on this machine: {str(e).splitlines()[0][:200]}"
        )
    short = [w[:16000] for w in waves[:1]]
    for w, g in zip(
        plain.predict_waveforms(short, batch_size=1), compiled.predict_waveforms(short, batch_size=1)
    ):
        assert np.abs(g - w).max() <= TOL


def test_only_torch_predictors_compile():
    from serval.compiled import compile_predictor

    with pytest.raises(ValueError, match="--engine torch"):
        compile_predictor(object())
