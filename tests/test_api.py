"""The Python API users expect: one input or many, sample rates, and the pipeline-shaped `__call__`,
on the bundled model and real clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import clips

import serval
from serval.audio import AudioError, load_audio, resample
from serval.vocab import EMOTIONS, PRIMARY4


@pytest.fixture(scope="module")
def predictor():
    return serval.load(device="cpu")


@pytest.fixture(scope="module")
def clip() -> Path:
    return clips("ravdess", "Actor_03/*.flac", n=1)[0]


def probs(record) -> np.ndarray:
    return np.array([record["probabilities"][c] for c in EMOTIONS])


def test_one_input_gives_one_record(predictor, clip):
    many = predictor.predict([str(clip)])
    assert isinstance(many, list) and len(many) == 1
    for one in (str(clip), clip):  # a str is one path, not one input per character
        record = predictor.predict(one)
        assert isinstance(record, dict) and record == many[0]
    wave = load_audio(clip)
    record = predictor.predict(wave)
    assert isinstance(record, dict) and record["file"] is None and record["label"] == many[0]["label"]
    np.testing.assert_allclose(probs(record), probs(many[0]), atol=1e-6)
    assert [r["label"] for r in predictor.predict([wave, str(clip)])] == [many[0]["label"]] * 2


def test_an_array_at_another_rate_is_resampled(predictor, clip, tmp_path):
    wave = load_audio(clip)
    high = resample(wave, 16000, 48000)
    want = predictor.predict(wave)
    got = predictor.predict(high, sampling_rate=48000)
    assert got["label"] == want["label"] and got["duration"] == pytest.approx(want["duration"], abs=1e-3)
    np.testing.assert_allclose(probs(got), probs(want), atol=0.02)
    # read as 16 kHz, the same samples are a slowed-down clip three times as long: far from the original
    wrong = predictor.predict(high)
    assert wrong["duration"] == pytest.approx(3 * want["duration"], abs=1e-2)
    assert np.abs(probs(wrong) - probs(want)).max() > 5 * np.abs(probs(got) - probs(want)).max()

    # the same rate everywhere an array is taken: a datasets-style dict, predict_waveforms, __call__
    as_dict = predictor.predict({"array": high, "sampling_rate": 48000})
    np.testing.assert_allclose(probs(as_dict), probs(got), atol=1e-6)
    p, _ = predictor.predict_waveforms([high], sampling_rate=48000)
    np.testing.assert_allclose(p[0], probs(got), atol=1e-5)
    assert predictor(high, sampling_rate=48000)[0]["label"] == want["label"]
    # a file's own rate is read from its header
    path = tmp_path / "high.wav"
    sf.write(path, high, 48000, subtype="FLOAT")
    from_file = predictor.predict(path)
    assert from_file["label"] == want["label"]
    np.testing.assert_allclose(probs(from_file), probs(got), atol=1e-4)
    with pytest.raises(ValueError, match="sampling_rate"):
        predictor.predict(high, sampling_rate=-1)


def test_call_has_the_pipeline_shape(predictor, clip):
    record = predictor.predict(clip)
    ranked = predictor(str(clip))
    assert [set(r) for r in ranked] == [{"label", "score"}] * len(EMOTIONS)
    assert ranked[0]["label"] == record["label"]
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-4)
    assert {r["label"]: r["score"] for r in ranked} == record["probabilities"]
    assert predictor(str(clip), top_k=2) == ranked[:2]
    other = clips("emodb", n=1)[0]
    both = predictor([str(clip), str(other)], top_k=1)
    alone = [ranked[:1], predictor(str(other), top_k=1)]
    assert [[r["label"] for r in x] for x in both] == [[r["label"] for r in x] for x in alone]
    # batched with another clip the numbers move only by float rounding
    assert [x[0]["score"] for x in both] == pytest.approx([x[0]["score"] for x in alone], abs=1e-5)
    subset = predictor(str(clip), classes=PRIMARY4)
    assert {r["label"] for r in subset} == set(PRIMARY4) and sum(r["score"] for r in subset) == pytest.approx(
        1
    )


def test_bad_inputs(predictor, clip, tmp_path):
    missing = tmp_path / "missing.wav"
    records = predictor.predict([str(missing), clip, np.zeros(0, np.float32)])
    assert records[0]["file"] == str(missing) and "missing.wav" in records[0]["error"]
    assert records[1]["label"] in EMOTIONS
    assert records[2]["file"] is None and "no samples" in records[2]["error"]
    with pytest.raises(AudioError, match="missing.wav"):  # the pipeline call raises, naming the file
        predictor([clip, missing])
    nan = np.full(16000, np.nan, np.float32)
    assert "non-finite" in predictor.predict(nan, sampling_rate=48000)["error"]
