"""Long audio in constant memory (serval.longform): pieces read in blocks equal a whole decode's, each
model call holds a bounded batch, the pooled record keeps its semantics, and a 10-minute file runs in
bounded memory. Recordings are real clips from ../shared/data joined end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO, clips

import serval
from serval import longform, vad
from serval.audio import TruncatedAudioError, load_audio, resample
from serval.cli import main
from serval.inference import load
from serval.longform import (
    CALL_BUDGET,
    LongAudio,
    bounded_batches,
    count_pieces,
    cut,
    long_array,
    piece_bounds,
    read_audio,
    work,
)
from serval.vad import speech_fraction, streamed_speech_fraction
from serval.vocab import EMOTIONS, SAMPLE_RATE
from serval.windows import split_span

SR = SAMPLE_RATE


def joined(seconds: float, corpus: str = "ravdess") -> np.ndarray:
    """`seconds` of real speech at 16 kHz: clips of one corpus end to end."""
    parts, n = [], 0
    for clip in clips(corpus, n=max(4, int(seconds))):
        parts.append(load_audio(clip))
        n += len(parts[-1])
        if n >= seconds * SR:
            break
    assert n >= seconds * SR, "not enough clips"
    return np.concatenate(parts)[: round(seconds * SR)]


@pytest.fixture(scope="module")
def long_files(tmp_path_factory):
    """A 70 s recording as a 16 kHz FLAC and as a 44.1 kHz stereo WAV, and its 16 kHz samples."""
    folder = tmp_path_factory.mktemp("long")
    wave = joined(70)
    sf.write(folder / "talk16.flac", wave, SR)
    high = resample(wave, SR, 44100)
    sf.write(folder / "talk44.wav", np.stack([high, high], axis=1), 44100, subtype="FLOAT")
    return folder / "talk16.flac", folder / "talk44.wav", wave


def probs(record) -> np.ndarray:
    return np.array([record["probabilities"][c] for c in EMOTIONS])


# ---------------------------------------------------------------------------- pieces


@pytest.mark.slow
def test_cut_gives_the_slices_of_the_whole():
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(95 * SR + 7).astype(np.float32)
    bounds = piece_bounds(len(wave))
    assert len(bounds) == 4 and bounds[0][0] == 0 and bounds[-1][1] == len(wave)
    assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
    assert max(b - a for a, b in bounds) <= 30 * SR
    for block in (1, 4000, 10 * SR + 3, 200 * SR):  # blocks smaller and larger than a piece
        blocks = (wave[i : i + block] for i in range(0, len(wave), block))
        pieces = list(cut(blocks, bounds))
        assert [len(p) for p in pieces] == [b - a for a, b in bounds]
        for p, (a, b) in zip(pieces, bounds):
            np.testing.assert_array_equal(p, wave[a:b])
    # a stream that ends early (an MP3 header's estimate) ends its last piece there
    short = list(cut([wave[: bounds[2][0] + 100]], bounds))
    assert [len(p) for p in short] == [bounds[0][1], bounds[1][1] - bounds[1][0], 100]


def test_piece_bounds_are_split_span():
    for seconds in (0.5, 29.99, 30.0, 30.01, 61.3, 2400.0):
        n = round(seconds * SR)
        spans = split_span(0.0, n / SR, 30.0)
        assert piece_bounds(n) == [(round(a * SR), round(b * SR)) for a, b in spans]
        assert count_pieces(n) == len(spans) == max(1, int(np.ceil(n / (30 * SR))))


def test_a_model_call_holds_at_most_one_full_piece_of_work():
    def sizes(seconds, n, batch_size=16, budget=CALL_BUDGET):
        pieces = [(i, np.zeros(round(seconds * SR), np.float32)) for i in range(n)]
        return [len(b) for b in bounded_batches(pieces, batch_size, budget)]

    assert sizes(30, 5) == [1] * 5  # 30 s pieces one at a time
    assert sizes(4, 40) == [16, 16, 8]  # short clips still fill a batch
    assert sizes(10, 7) == [6, 1]
    assert sizes(30, 5, budget=None) == [5]  # a GPU: batch_size alone
    assert work(30.0) == CALL_BUDGET and 16 * work(4.0) <= CALL_BUDGET < 16 * work(6.0)
    # padded to the longest: sorted clips fill a batch until the longest would pass the budget
    mixed = [(i, np.zeros(round(s * SR), np.float32)) for i, s in enumerate([2, 2, 3, 25, 26])]
    assert [[i for i, _ in b] for b in bounded_batches(mixed, 16)] == [[0, 1, 2], [3], [4]]


def test_a_long_file_is_read_in_pieces_equal_to_the_whole_decode(long_files, read_spy):
    for path in long_files[:2]:
        whole = load_audio(path)
        read_spy.clear()
        audio = read_audio(path)
        assert isinstance(audio, LongAudio) and not read_spy  # only the header so far
        assert len(audio) == len(whole) and audio.pieces == 3 and audio.name == str(path)
        pieces = list(audio.iter_pieces())
        assert max(read_spy) <= 10 * sf.info(str(path)).samplerate  # blocks of 10 s, never the file
        assert [len(p) for p in pieces] == [b - a for a, b in piece_bounds(len(whole))]
        np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-6)
        again = list(audio.iter_pieces())  # a second reading starts from the beginning again
        np.testing.assert_array_equal(again[0], pieces[0])
    # bytes, spans, and a short file (decoded whole, as before)
    path, wave = long_files[0], long_files[2]
    from_bytes = read_audio(path.read_bytes(), name="upload.flac")
    assert isinstance(from_bytes, LongAudio) and from_bytes.name == "upload.flac"
    np.testing.assert_array_equal(np.concatenate(list(from_bytes.iter_pieces())), load_audio(path))
    span = read_audio(path, 5.0, 50.0)
    assert span.pieces == 2
    np.testing.assert_allclose(np.concatenate(list(span.iter_pieces())), wave[5 * SR : 50 * SR], atol=1e-6)
    short = read_audio(path, 5.0, 25.0)
    assert isinstance(short, np.ndarray) and len(short) == 20 * SR


def test_an_array_at_another_rate_is_resampled_piece_by_piece(long_files):
    wave = long_files[2]
    high = resample(wave, SR, 48000)
    audio = long_array(high, 48000)
    whole = resample(high, 48000)
    assert len(audio) == len(whole) and audio.pieces == 3
    np.testing.assert_allclose(np.concatenate(list(audio.iter_pieces())), whole, atol=1e-6)


@pytest.fixture
def read_spy(monkeypatch):
    """The frame counts soundfile is asked to read."""
    reads: list[int] = []
    original = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        reads.append(frames)
        return original(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    return reads


# ---------------------------------------------------------------------------- records


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load(model_dir, device="cpu")


@pytest.mark.slow
def test_the_record_pools_pieces_by_length_as_the_whole_array_would(tiny, long_files, caplog, monkeypatch):
    path16, path44, wave = long_files
    # the pooling rule written out on the whole array: equal pieces of <= 30 s, outputs weighted by length
    pieces = [wave[round(a * SR) : round(b * SR)] for a, b in split_span(0.0, len(wave) / SR, 30.0)]
    p, s = tiny.predict_waveforms(pieces)
    weights = np.array([len(x) for x in pieces], np.float64)[:, None]
    want_p, want_s = (p * weights).sum(0) / weights.sum(), (s * weights).sum(0) / weights.sum()
    monkeypatch.setattr(longform, "_noted", [])
    with caplog.at_level("WARNING", logger="serval"):
        high = {"array": resample(wave, SR, 48000), "sampling_rate": 48000}
        records = tiny.predict([str(path16), str(path44), wave, high])
    for r in records:
        assert r["pieces"] == 3 and r["duration"] == pytest.approx(70.0, abs=1e-3)
        assert r["label"] == tiny.classes[int(np.argmax(want_p))]
        np.testing.assert_allclose(probs(r), want_p, atol=1e-4 if r is records[0] else 2e-3)
    np.testing.assert_allclose([records[0]["scores"][d] for d in tiny.dimensions], want_s, atol=1e-4)
    # predict_waveforms and __call__ take the same long input, as an array or read piece by piece
    got_p, _ = tiny.predict_waveforms([read_audio(path16), wave])
    np.testing.assert_allclose(got_p, [want_p, want_p], atol=1e-5)
    assert tiny(str(path16), top_k=1)[0]["label"] == records[0]["label"]
    # said once per process, not per input
    notes = [r.message for r in caplog.records if "pools" in r.message]
    assert len(notes) == 1 and f"{path16}: 70.0 s" in notes[0] and "3 pieces" in notes[0]
    assert f"serval timeline {path16}" in notes[0]


@pytest.mark.slow
def test_a_long_input_s_speech_is_measured_a_block_at_a_time_as_the_whole_clip(tiny, long_files, monkeypatch):
    path16, path44, wave = long_files
    want = speech_fraction(wave)  # the whole recording in one call
    assert want > 0.3
    # streamed in odd block sizes, Silero's state carried: the same frames, so the same fraction
    step = 12_345
    assert streamed_speech_fraction(lambda: (wave[i : i + step] for i in range(0, len(wave), step))) == (
        pytest.approx(want, abs=1e-3)
    )
    seen = []
    push = vad.FrameStream.push
    monkeypatch.setattr(
        vad.FrameStream, "push", lambda self, x, last=False: seen.append(len(x)) or push(self, x, last)
    )
    high = {"array": resample(wave, SR, 48000), "sampling_rate": 48000}
    records = tiny.predict([str(path16), str(path44), wave, high])
    # no block the speech measure took is near the recording's length: it never held it whole
    assert seen and max(seen) <= 2 * longform.BLOCK_SECONDS * SR
    for r in records:
        assert r["pieces"] == 3 and r["no_speech"] is False
        assert r["speech_fraction"] == pytest.approx(want, abs=1e-3 if r is records[0] else 2e-2)
    # a long input without speech: no label unless asked for, its pooled probabilities still there
    quiet = np.zeros(70 * SR, np.float32)
    record = tiny.predict(quiet)
    assert record["pieces"] == 3 and record["no_speech"] is True and record["speech_fraction"] == 0.0
    assert record["label"] is None and set(record["probabilities"]) == set(tiny.classes)
    assert tiny.predict(quiet, label_no_speech=True)["label"] in tiny.classes


@pytest.mark.slow
def test_a_long_file_that_breaks_part_way_is_an_error_record(tiny, long_files, tmp_path):
    path16 = long_files[0]
    broken = tmp_path / "broken.flac"
    broken.write_bytes(path16.read_bytes()[: path16.stat().st_size * 2 // 3])
    good = clips("emodb", n=1)[0]
    records = tiny.predict([str(broken), str(good), str(path16)])
    assert "error" in records[0] and records[0]["error"].startswith(str(broken))
    assert "truncated" in records[0]["error"]
    assert records[1]["pieces"] == 1 and records[2]["pieces"] == 3 and "label" in records[2]
    with pytest.raises(TruncatedAudioError, match="broken.flac"):
        tiny.predict_waveforms([read_audio(broken)])
    with pytest.raises(TruncatedAudioError, match="broken.flac"):  # one input raises, as a bad read does
        tiny.predict(str(broken))


@pytest.mark.slow
def test_cli_predict_says_once_that_it_pools(model_dir, long_files, tmp_path, capsys):
    path16, path44, _ = long_files
    args = ["predict", str(path16), str(path44), "--model", str(model_dir), "--engine", "torch"]
    assert main([*args, "--no-progress", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert [r["pieces"] for r in records] == [3, 3]
    assert err.count("pools 3 pieces") == 1 and f"serval timeline {path16}" in err
    np.testing.assert_allclose(probs(records[0]), probs(records[1]), atol=2e-3)
    # a file within the window says nothing
    assert main(["predict", str(clips("emodb", n=1)[0]), "--model", str(model_dir), "--engine", "torch"]) == 0
    assert "pools" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_the_default_model_pools_a_2_minute_file_as_the_whole_array_does(tmp_path):
    predictor = serval.load(device="cpu")  # the bundled model on the default engine
    wave = joined(120, "tess")
    path = tmp_path / "two-minutes.flac"
    sf.write(path, wave, SR)
    bounds = piece_bounds(len(wave))
    p, _ = predictor.predict_waveforms([wave[a:b] for a, b in bounds])
    weights = np.array([b - a for a, b in bounds], np.float64)[:, None]
    want = (p * weights).sum(0) / weights.sum()
    record = predictor.predict(str(path))
    assert record["pieces"] == 4 and record["label"] == predictor.classes[int(np.argmax(want))]
    np.testing.assert_allclose(probs(record), want, atol=1e-4)


@pytest.mark.slow
def test_cli_predict_on_a_10_minute_file_stays_under_1_gb(tmp_path):
    path = tmp_path / "ten-minutes.flac"
    sf.write(path, joined(600, "ravdess"), SR)
    wrapper = (
        "import resource, subprocess, sys; "
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(done.stdout)"
    )
    cmd = [sys.executable, "-m", "serval", "predict", str(path), "--format", "json", "--no-progress"]
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=REPO)
    code, kib = done.stdout.split("\n", 1)[0].split()
    record = json.loads(done.stdout.split("\n", 1)[1])[0]
    assert code == "0" and record["pieces"] == 20 and record["duration"] == 600.0
    assert int(kib) * 1024 < 1e9, f"peak RSS {int(kib) / 1024:.0f} MiB"
