"""serval.audio on real clips from ../shared/data and on broken files built from them."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import soundfile as sf
from conftest import clips

from serval import audio
from serval.audio import (
    MIN_DURATION,
    SAMPLE_RATE,
    AudioError,
    AudioInfo,
    AudioNotFoundError,
    AudioSpanError,
    AudioTooShortError,
    EmptyAudioError,
    NonFiniteAudioError,
    TruncatedAudioError,
    UnsupportedAudioError,
    ZeroLengthAudioError,
    audio_info,
    iter_chunks,
    load_audio,
    resample,
)


@pytest.fixture(scope="module")
def clip():
    """A real RAVDESS clip (16 kHz mono FLAC, ~3.3 s) and its samples as soundfile decodes them."""
    path = clips("ravdess", n=1)[0]
    samples, sr = sf.read(path, dtype="float32")
    assert sr == SAMPLE_RATE and samples.ndim == 1
    return path, samples


@pytest.fixture(scope="module")
def stereo44(clip, tmp_path_factory):
    """The clip as a 44.1 kHz stereo FLAC whose channels differ (left = clip, right = half of it)."""
    path, x = clip
    hi = resample(x, SAMPLE_RATE, 44100)
    out = tmp_path_factory.mktemp("a") / "stereo44.flac"
    sf.write(out, np.stack([hi, 0.5 * hi], axis=1), 44100, subtype="PCM_24")
    return out, x


@pytest.fixture
def read_spy(monkeypatch):
    """Records the frame count of every SoundFile.read call."""
    calls: list[int] = []
    real = sf.SoundFile.read

    def read(self, frames=-1, *args, **kwargs):
        out = real(self, frames, *args, **kwargs)
        calls.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", read)
    return calls


def _raises(kind, source, **kwargs) -> AudioError:
    with pytest.raises(kind) as info:
        load_audio(source, **kwargs)
    e = info.value
    assert isinstance(e, AudioError) and isinstance(e, ValueError)
    assert e.cause and str(e) == f"{e.path}: {e.cause}"
    return e


# --- decoding --------------------------------------------------------------------------------


def test_real_clips_decode_to_16k_mono_float32():
    for path in clips("ravdess", n=2) + clips("emodb", n=2) + clips("ased", n=2):
        x = load_audio(path)
        info = sf.info(path)
        assert x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous
        assert len(x) == info.frames
        np.testing.assert_array_equal(x, sf.read(path, dtype="float32")[0])


@pytest.mark.parametrize(
    "ext,fmt,subtype,min_corr",
    [
        ("wav", "WAV", "PCM_16", 0.9999),
        ("wav", "WAV", "FLOAT", 0.9999),
        ("ogg", "OGG", "VORBIS", 0.98),
        ("opus", "OGG", "OPUS", 0.97),
        ("mp3", "MP3", "MPEG_LAYER_III", 0.98),
    ],
)
def test_formats(clip, tmp_path, ext, fmt, subtype, min_corr):
    _, x = clip
    path = tmp_path / f"clip.{ext}"
    try:
        sf.write(path, x, SAMPLE_RATE, format=fmt, subtype=subtype)
    except (sf.LibsndfileError, TypeError, ValueError) as e:  # an older libsndfile without this codec
        pytest.skip(f"libsndfile cannot write {fmt}/{subtype}: {e}")
    y = load_audio(path)
    assert y.dtype == np.float32 and abs(len(y) - len(x)) <= 0.01 * SAMPLE_RATE
    n = min(len(x), len(y))
    assert np.corrcoef(x[:n], y[:n])[0, 1] > min_corr


def test_resampled_stereo_44k(stereo44):
    path, x = stereo44
    info = audio_info(path)
    assert (info.sample_rate, info.channels) == (44100, 2)
    assert info.duration == pytest.approx(len(x) / SAMPLE_RATE, abs=1e-4)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(x)) <= 1
    n = min(len(x), len(y))
    # channels averaged: (x + x/2) / 2, and 16k -> 44.1k -> 16k is nearly transparent
    err = y[:n] - 0.75 * x[:n]
    assert np.sqrt(np.mean(err**2)) < 1e-3 * np.sqrt(np.mean(x**2)) + 1e-5
    back = resample(y, SAMPLE_RATE, 44100)
    assert abs(len(back) - info.frames) <= 2


def test_resample_rates():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(8000).astype(np.float32)
    assert len(resample(x, 8000)) == 16000
    assert np.array_equal(resample(x, 16000), x)
    assert resample(x.astype(np.float64), 8000).dtype == np.float32


def test_bytes_and_file_objects(clip):
    path, x = clip
    data = path.read_bytes()
    np.testing.assert_array_equal(load_audio(data), x)
    with open(path, "rb") as fh:
        np.testing.assert_array_equal(load_audio(fh, 1.0, 2.0), x[16000:32000])

    class Stream(io.RawIOBase):  # an upload stream that cannot seek
        def __init__(self, b):
            self._b = io.BytesIO(b)

        def readable(self):
            return True

        def readinto(self, buf):
            return self._b.readinto(buf)

    np.testing.assert_array_equal(load_audio(Stream(data)), x)
    assert audio_info(data) == AudioInfo(len(x) / SAMPLE_RATE, SAMPLE_RATE, 1, len(x))


# --- errors ----------------------------------------------------------------------------------


def test_missing_and_directory(tmp_path):
    e = _raises(AudioNotFoundError, tmp_path / "nope.flac")
    assert e.path == str(tmp_path / "nope.flac") and "no such file" in e.cause
    _raises(AudioNotFoundError, tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    e = _raises(EmptyAudioError, p)
    assert "0 bytes" in e.cause
    _raises(EmptyAudioError, b"")


def test_not_audio(tmp_path):
    p = tmp_path / "noise.wav"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    e = _raises(UnsupportedAudioError, p)
    assert e.path == str(p)
    p2 = tmp_path / "notes.flac"
    p2.write_text("this is not audio\n" * 50)
    _raises(UnsupportedAudioError, p2)
    with pytest.raises(UnsupportedAudioError, match="^<bytes>: "):
        load_audio(b"garbage" * 100)
    with pytest.raises(UnsupportedAudioError, match="^upload.mp3: "):
        load_audio(b"garbage" * 100, name="upload.mp3")


def test_truncated_flac(clip, tmp_path):
    path, x = clip
    data = path.read_bytes()
    half = tmp_path / "half.flac"
    half.write_bytes(data[: len(data) // 2])
    e = _raises(TruncatedAudioError, half)
    assert "truncated" in e.cause and e.path == str(half)
    # the intact first part can still be read as a span
    np.testing.assert_array_equal(load_audio(half, 0.1, 0.6), x[1600:9600])
    head = tmp_path / "head.flac"
    head.write_bytes(data[:40])  # cut inside the header
    _raises(TruncatedAudioError, head)
    with pytest.raises(TruncatedAudioError, match="^upload.flac: "):
        load_audio(data[: len(data) // 2], name="upload.flac")


def test_truncated_wav(clip, tmp_path):
    _, x = clip
    full = tmp_path / "full.wav"
    sf.write(full, x, SAMPLE_RATE, subtype="PCM_16")
    data = full.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    e = _raises(TruncatedAudioError, cut)
    assert "header announces" in e.cause
    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes(data[:44])  # the header still announces 3.3 s of samples
    _raises(TruncatedAudioError, header_only)


def test_truncated_mp3(clip, tmp_path):
    _, x = clip
    p = tmp_path / "clip.mp3"
    try:
        sf.write(p, x, SAMPLE_RATE, format="MP3", subtype="MPEG_LAYER_III")
    except (sf.LibsndfileError, TypeError, ValueError) as e:
        pytest.skip(f"libsndfile cannot write MP3: {e}")
    data = p.read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])
    _raises(TruncatedAudioError, cut)


def test_zero_length_wav(tmp_path):
    p = tmp_path / "no_samples.wav"
    sf.write(p, np.zeros(0, np.float32), SAMPLE_RATE, subtype="PCM_16")  # a complete header, 0 frames
    e = _raises(ZeroLengthAudioError, p)
    assert "no samples" in e.cause


def test_non_finite_samples(clip, tmp_path):
    _, x = clip
    y = x.copy()
    y[8000] = np.nan
    y[9000] = np.inf
    p = tmp_path / "nan.wav"
    sf.write(p, y, SAMPLE_RATE, subtype="FLOAT")
    e = _raises(NonFiniteAudioError, p)
    assert "2 non-finite" in e.cause and "0.500 s" in e.cause
    np.testing.assert_array_equal(load_audio(p, 0.0, 0.4), x[:6400])  # a clean span is fine


def test_too_short(clip, tmp_path):
    _, x = clip
    p = tmp_path / "short.flac"
    sf.write(p, x[:800], SAMPLE_RATE)  # 50 ms
    e = _raises(AudioTooShortError, p)
    assert "0.050 s" in e.cause and str(MIN_DURATION) in e.cause
    assert len(load_audio(p, min_duration=0.01)) == 800
    _raises(AudioTooShortError, clip[0], start=1.0, end=1.05)


def test_span_validation(clip):
    path, x = clip
    dur = len(x) / SAMPLE_RATE
    for start, end in [(-0.5, 1.0), (2.0, 1.0), (1.0, 1.0), (dur + 1, None), (0.0, dur + 0.5)]:
        e = _raises(AudioSpanError, path, start=start, end=end)
        assert e.path == str(path) and "span" in e.cause
    # an end a few ms past the duration (rounded manifests) is clipped
    np.testing.assert_array_equal(load_audio(path, 3.0, dur + 0.005), x[48000:])


def test_errors_pickle():
    e = TruncatedAudioError("a.flac", "truncated: x")
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is TruncatedAudioError and (e2.path, e2.cause, str(e2)) == (e.path, e.cause, str(e))


# --- spans and chunks ------------------------------------------------------------------------


def test_span_reads_only_the_span(clip, read_spy):
    path, x = clip
    y = load_audio(path, 1.25, 2.5)
    np.testing.assert_array_equal(y, x[20000:40000])
    assert read_spy == [20000]


def test_span_resampled_matches_full_decode(stereo44, read_spy):
    path, _ = stereo44
    full = load_audio(path)
    read_spy.clear()
    y = load_audio(path, 1.0, 2.0)
    assert len(y) == 16000
    np.testing.assert_allclose(y, full[16000:32000], atol=1e-6)
    assert sum(read_spy) < 0.4 * audio_info(path).frames  # 1 s (+ context) of 3.3 s


def test_iter_chunks_equals_full_load(clip, stereo44):
    for path in (clip[0], stereo44[0]):
        full = load_audio(path)
        chunks = list(iter_chunks(path, 0.7))
        assert [o for o, _ in chunks] == pytest.approx([0.0, 0.7, 1.4, 2.1, 2.8])
        assert all(len(c) == 11200 for _, c in chunks[:-1])
        np.testing.assert_allclose(np.concatenate([c for _, c in chunks]), full, atol=1e-6)


def test_iter_chunks_overlap_and_span(clip, stereo44):
    for path in (clip[0], stereo44[0]):
        full = load_audio(path)
        chunks = list(iter_chunks(path, 1.0, overlap_seconds=0.25, start=0.5, end=3.1))
        assert [o for o, _ in chunks] == pytest.approx([0.5, 1.25, 2.0, 2.75])
        assert [len(c) for _, c in chunks] == [16000, 16000, 16000, 5600]
        for offset, c in chunks:
            i = round(offset * SAMPLE_RATE)
            np.testing.assert_allclose(c, full[i : i + len(c)], atol=1e-6)
        # the span ends exactly on a chunk boundary: no empty or repeated tail chunk
        chunks = list(iter_chunks(path, 1.0, overlap_seconds=0.5, start=0.0, end=2.0))
        assert [(o, len(c)) for o, c in chunks] == [(0.0, 16000), (0.5, 16000), (1.0, 16000)]


def test_iter_chunks_streams_long_file(read_spy):
    path = clips("noise", "speech-commands/*.flac")[0]
    info = audio_info(path)
    assert info.duration > 30
    it = iter_chunks(path, 2.0)
    offset, first = next(it)
    assert offset == 0.0 and len(first) == 32000
    assert sum(read_spy) <= audio._STREAM_BLOCK * info.sample_rate < info.frames / 2
    n = len(first) + sum(len(c) for _, c in it)
    assert max(read_spy) <= audio._STREAM_BLOCK * info.sample_rate
    assert n == len(load_audio(path))


def test_iter_chunks_errors(clip, tmp_path):
    path, _ = clip
    with pytest.raises(ValueError, match="overlap"):
        next(iter_chunks(path, 1.0, overlap_seconds=1.0))
    with pytest.raises(ValueError, match="chunk_seconds"):
        next(iter_chunks(path, 0))
    with pytest.raises(AudioNotFoundError):
        next(iter_chunks(tmp_path / "missing.wav", 1.0))
    half = tmp_path / "half.flac"
    data = path.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedAudioError, match="truncated"):
        list(iter_chunks(half, 0.5))


# ---------------------------------------------------------------------------- arrays as users hold them


def test_integer_pcm_is_scaled_as_files_are(clip, tmp_path):
    path, x = clip
    as_int16, _ = sf.read(path, dtype="int16")
    assert as_int16.dtype == np.int16 and np.abs(as_int16).max() > 1000  # real PCM, not float-range values
    np.testing.assert_array_equal(audio.array_to_mono(as_int16), x)  # the file is 16-bit: exactly its floats
    as_int32, _ = sf.read(path, dtype="int32")
    np.testing.assert_allclose(audio.array_to_mono(as_int32), x, atol=1e-7)
    # 8-bit unsigned PCM (silence is 128), as in an 8-bit WAV: libsndfile's own reading of it
    wav8 = tmp_path / "u8.wav"
    sf.write(wav8, x, SAMPLE_RATE, subtype="PCM_U8")
    raw = np.frombuffer(wav8.read_bytes()[44:], np.uint8)[: len(x)]  # after the header; no pad byte
    assert raw.dtype == np.uint8 and abs(int(np.median(raw)) - 128) <= 2
    np.testing.assert_allclose(audio.array_to_mono(raw), load_audio(wav8), atol=1e-7)
    edges = {
        np.int16: ([-32768, 0, 16384, 32767], [-1.0, 0.0, 0.5, 32767 / 32768]),
        np.int32: ([-(2**31), 0, 2**30], [-1.0, 0.0, 0.5]),
        np.uint8: ([0, 128, 192, 255], [-1.0, 0.0, 0.5, 127 / 128]),
        np.int8: ([-128, 0, 64], [-1.0, 0.0, 0.5]),
    }
    for dtype, (given, want) in edges.items():
        got = audio.array_to_mono(np.array(given, dtype))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-7)
    big_endian = as_int16.astype(">i2")
    np.testing.assert_array_equal(audio.array_to_mono(big_endian), x)
    float64 = audio.array_to_mono(x.astype(np.float64))
    assert float64.dtype == np.float32 and np.array_equal(float64, x)


def test_channels_are_averaged_as_files_are(stereo44, clip):
    path, _ = stereo44
    left_right = resample(sf.read(path, dtype="float32")[0], 44100)  # (n, 2): channels differ
    from_file = load_audio(path)
    for layout in (left_right, left_right.T, np.ascontiguousarray(left_right.T)):
        np.testing.assert_allclose(audio.load_array(layout), from_file, atol=1e-6)
    np.testing.assert_allclose(audio.load_array(left_right), left_right.mean(axis=1), atol=1e-7)
    _, x = clip
    for one in (x[None, :], x[:, None]):  # one channel either way round is the clip itself
        np.testing.assert_array_equal(audio.load_array(one), x)
    eight = np.repeat(x[:, None], 8, axis=1)
    np.testing.assert_allclose(audio.load_array(eight), x, atol=1e-7)


def test_arrays_that_are_not_one_clip_name_their_shape(clip):
    _, x = clip
    bad_shapes = {
        (9, len(x)): np.zeros((9, len(x)), np.float32),  # a batch of 9 clips, or 9 channels: refused
        (len(x), 9): np.zeros((len(x), 9), np.float32),
        (2, 3, 4000): np.zeros((2, 3, 4000), np.float32),
        (2, 2): np.zeros((2, 2), np.float32),
        (): np.float32(0.5) * np.ones(()),
    }
    for shape, array in bad_shapes.items():
        with pytest.raises(UnsupportedAudioError, match=r"clip\.wav: an array of shape") as e:
            audio.load_array(array, name="clip.wav")
        assert str(shape) in str(e.value) and "at most 8 channels" in str(e.value)
    for array in (np.arange(4000), np.ones(4000, np.complex64), np.ones(4000, bool)):
        with pytest.raises(UnsupportedAudioError, match=f"dtype {array.dtype} are not audio"):
            audio.load_array(array)
    with pytest.raises(EmptyAudioError, match="<array>: no samples"):
        audio.load_array(np.zeros((0, 2), np.float32))
    spiked = np.stack([x, x], axis=1)
    spiked[8000, 1] = np.nan
    with pytest.raises(NonFiniteAudioError, match="the first at 0.500 s"):
        audio.load_array(spiked)
    with pytest.raises(ValueError, match="sampling_rate must be between"):
        audio.load_array(x, 100)
