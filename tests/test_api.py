"""The Python API users expect: one input or many, sample rates, and the pipeline-shaped `__call__`,
on the bundled model and real clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import clips

import serval
from serval.audio import (
    AudioError,
    AudioNotFoundError,
    NonFiniteAudioError,
    UnsupportedAudioError,
    load_array,
    load_audio,
    resample,
)
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
    # one input that cannot be read raises, from predict as from the pipeline call
    for call in (predictor.predict, predictor):
        with pytest.raises(AudioNotFoundError, match="missing.wav: no such file"):
            call(str(missing))
        with pytest.raises(NonFiniteAudioError, match="<array>: 16000 non-finite"):
            call(np.full(16000, np.nan, np.float32), sampling_rate=48000)
    nan = {"array": np.full(16000, np.nan), "sampling_rate": 48000, "path": "nan.wav"}
    assert predictor.predict([nan])[0] == {
        "file": "nan.wav",
        "error": "nan.wav: 16000 non-finite (NaN/inf) samples, the first at 0.000 s",
    }


def test_integer_pcm_gives_the_float_answer(predictor, clip):
    """An int16 array (soundfile, scipy, recorders) is its float samples, not 32768 times louder."""
    as_float = load_audio(clip)
    as_int16, _ = sf.read(clip, dtype="int16")
    want = predictor.predict(as_float)
    for array in (as_int16, sf.read(clip, dtype="int32")[0], as_float.astype(np.float64)):
        got = predictor.predict(array)
        assert got["label"] == want["label"] and got["duration"] == want["duration"]
        np.testing.assert_allclose(probs(got), probs(want), atol=1e-4)
    # the same scaling in every array path: a datasets-style dict at another rate, predict_waveforms
    high = np.round(resample(as_float, 16000, 48000) * 32767).astype(np.int16)
    from_dict = predictor.predict({"array": high, "sampling_rate": 48000})
    np.testing.assert_allclose(probs(from_dict), probs(want), atol=0.02)
    assert from_dict["label"] == want["label"]
    p, _ = predictor.predict_waveforms([as_int16])
    np.testing.assert_allclose(p[0], probs(want), atol=1e-4)
    # the scaling itself, on the samples: the default model cannot show it, since its front end is
    # gain-invariant and gives the int16 samples read as floats (32768 times louder) the same answer
    np.testing.assert_allclose(load_array(as_int16, 16000), as_float, atol=1 / 32768)
    assert np.abs(load_array(as_int16.astype(np.float32), 16000)).max() > 100
    loud = predictor.predict(as_int16.astype(np.float32))
    np.testing.assert_allclose(probs(loud), probs(want), atol=1e-3)


def test_stereo_arrays_are_their_mono_mean(predictor, clip, tmp_path):
    left = load_audio(clip)
    right = load_audio(clips("ravdess", "Actor_04/*.flac", n=1)[0])
    n = min(len(left), len(right))
    stereo = np.stack([left[:n], right[:n]], axis=1)  # two different voices: the mean is a real mix
    want = predictor.predict(stereo.mean(axis=1))
    for layout in (stereo, stereo.T):
        got = predictor.predict(layout)
        assert isinstance(got, dict) and got["label"] == want["label"] and got["duration"] == want["duration"]
        np.testing.assert_allclose(probs(got), probs(want), atol=1e-4)
    pcm = np.round(stereo * 32767).astype(np.int16)  # int16 stereo: scaled, then averaged
    got, mean = predictor.predict(pcm), predictor.predict((pcm / 32768).mean(axis=1))
    assert got["label"] == mean["label"]
    np.testing.assert_allclose(probs(got), probs(mean), atol=1e-4)
    path = tmp_path / "stereo.wav"  # a stereo file is averaged the same way
    sf.write(path, stereo, 16000, subtype="FLOAT")
    np.testing.assert_allclose(probs(predictor.predict(path)), probs(want), atol=1e-4)
    alone = predictor.predict(left[:n])
    assert np.abs(probs(alone) - probs(want)).max() > 1e-3  # the second channel counts


def test_one_row_is_one_clip_and_other_shapes_are_errors(predictor, clip):
    wave = load_audio(clip)
    want = predictor.predict(wave)
    for row in (wave[None, :], wave[:, None]):
        got = predictor.predict(row)
        assert isinstance(got, dict) and got["label"] == want["label"]
        np.testing.assert_allclose(probs(got), probs(want), atol=1e-6)
        assert predictor(row, top_k=1)[0]["label"] == want["label"]
    batch = np.stack([wave[:16000]] * 9)  # 9 clips stacked: not one clip; a list of them is the way
    with pytest.raises(UnsupportedAudioError, match=r"shape \(9, 16000\).*a list of arrays"):
        predictor.predict(batch)
    records = predictor.predict([batch, wave, np.zeros((2, 3, 4000), np.float32)])
    assert "(9, 16000)" in records[0]["error"] and records[1]["label"] == want["label"]
    assert "(2, 3, 4000)" in records[2]["error"]
    assert [r[0]["label"] for r in predictor(list(batch[:2]), top_k=1)] == [
        predictor(wave[:16000], top_k=1)[0]["label"]
    ] * 2


def test_records_say_whether_there_is_speech(predictor, clip):
    from test_speech import not_speech

    sounds = not_speech()
    names = ["silence", "white noise -6 dBFS", "tone 440 Hz", "chord C major", "melody"]
    records = predictor.predict([*(sounds[n] for n in names), str(clip)])
    for name, r in zip(names, records):
        assert r["no_speech"] is True and r["speech_fraction"] < 0.1, name
        assert r["label"] is None, name  # no emotion label for what is not speech ...
        assert sum(probs(r)) == pytest.approx(1, abs=1e-4)  # ... though the numbers are still there
        assert set(r["scores"]) == {"arousal", "valence", "dominance"}
    speech = records[-1]
    assert speech["no_speech"] is False and speech["speech_fraction"] > 0.3 and speech["label"] in EMOTIONS
    assert list(speech)[-2:] == ["speech_fraction", "no_speech"]
    # the old behaviour on request: every clip labelled with its most probable class
    labelled = predictor.predict([*(sounds[n] for n in names), str(clip)], label_no_speech=True)
    for r, plain in zip(labelled, records):
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["no_speech"] == plain["no_speech"] and r["probabilities"] == pytest.approx(
            plain["probabilities"], abs=1e-4
        )
    one = predictor.predict(sounds["silence"], classes=PRIMARY4)
    assert one["label"] is None and list(one["probabilities"]) == list(PRIMARY4)
    assert predictor(sounds["silence"], top_k=1)[0]["label"] in EMOTIONS  # the pipeline shape ranks anyway
