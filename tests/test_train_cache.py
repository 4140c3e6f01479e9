"""The encoder-output cache of the CPU path: keys, stored outputs, reuse and re-keying on real clips."""

from __future__ import annotations

import csv
import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, RAVDESS_CODES, clips

from serval.audio import load_audio
from serval.features import compute_features
from serval.model import SERConfig, SERModel
from serval.train import load_config, train
from serval.train.cache import EncoderCache, backbone_fingerprint, encoder_settings

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **overrides) -> SERModel:
    torch.manual_seed(seed)
    return SERModel(SERConfig.tiny(**overrides)).eval()


def test_key_follows_audio_settings_and_weights(tmp_path):
    model = tiny_model()
    wave = load_audio(clips("ravdess", n=1)[0])
    cache = EncoderCache(tmp_path, encoder_settings(model, "float16"))
    key = cache.key(wave)
    assert key == cache.key(wave.copy()) and len(key) == 64
    nudged = wave.copy()
    nudged[1000] += 1e-4
    assert cache.key(nudged) != key
    assert cache.key(wave[:-1]) != key
    assert EncoderCache(tmp_path, encoder_settings(model, "float32")).key(wave) != key
    weighted = tiny_model(layer_weighting="weighted")
    assert EncoderCache(tmp_path, encoder_settings(weighted, "float16")).key(wave) != key
    other = tiny_model(seed=1)
    assert backbone_fingerprint(other) != backbone_fingerprint(model)
    assert EncoderCache(tmp_path, encoder_settings(other, "float16")).key(wave) != key
    # the head does not change what the encoder stores, so it does not change the key
    with torch.no_grad():
        model.emotion_layer.weight.add_(1.0)
    assert EncoderCache(tmp_path, encoder_settings(model, "float16")).key(wave) == key
    with pytest.raises(ValueError, match="cache dtype"):
        EncoderCache(tmp_path, {**encoder_settings(model, "float16"), "dtype": "int8"})


def test_cached_outputs_equal_direct_encoding_of_real_clips(tmp_path):
    model = tiny_model()
    waves = [load_audio(p) for p in clips("emodb", n=2) + clips("ravdess", n=2)]
    assert len({len(w) for w in waves}) > 1  # different lengths: batched encoding pads
    cache = EncoderCache(tmp_path, encoder_settings(model, "float32"))
    keys = [cache.key(w) for w in waves]
    assert cache.encode_missing(model, waves, keys, batch_size=4) == 4
    assert cache.encode_missing(model, waves, keys, batch_size=4) == 0
    for wave, key in zip(waves, keys):
        feats, frames = compute_features([wave])
        with torch.no_grad():
            hidden, tokens = model.encode(feats, frames)
        stored, length = cache.get(key)
        assert length == int(tokens[0]) == stored.shape[0]
        torch.testing.assert_close(stored, hidden[0], atol=1e-4, rtol=1e-4)

    # a damaged entry is a miss: re-encoded, never served
    cache.path(keys[0]).write_bytes(b"not a safetensors file")
    with pytest.raises(KeyError, match="unreadable cache entry"):
        cache.get(keys[0])
    assert cache.encode_missing(model, waves, keys) == 1
    assert not list(Path(tmp_path).rglob(".tmp-*"))


def _manifest(path: Path, files: list[Path], spans: dict[int, tuple[float, float]] | None = None) -> Path:
    spans = spans or {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "start", "end", "label", "split"])
        for i, p in enumerate(files):
            start, end = spans.get(i, ("", ""))
            w.writerow([p, start, end, RAVDESS_CODES[p.stem.split("-")[2]], "dev" if i % 4 == 3 else "train"])
    return path


def _train_cached(caplog, tmp_path: Path, name: str, manifest: Path, *extra: str) -> tuple[Path, str]:
    """A tiny frozen_cached run on `tmp_path / "cache"`: (its best model, its "encoder cache" log line)."""
    cfg = load_config(None, [
        "model.d_model=64", "model.encoder_layers=2", "model.encoder_attention_heads=2",
        "model.encoder_ffn_dim=128", "model.channels=32", "model.embed_dim=32", "mode=frozen_cached",
        "progress=false", "tensorboard=false", f"out_dir={tmp_path / name}", f"data.train={manifest}",
        "data.train_split=train", f"data.dev={manifest}", "data.dev_split=dev", "optim.batch_size=2",
        "optim.epochs=2", f"cache.dir={tmp_path / 'cache'}", "data.max_seconds=2.5", *extra,
    ])  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serval.train"):
        best = train(cfg)
    return best, next(r.getMessage() for r in caplog.records if "encoder cache" in r.getMessage())


@pytest.mark.slow
def test_frozen_cached_training_encodes_once_and_rekeys_a_changed_span(tmp_path, caplog):
    files = [p for p in clips("ravdess", "Actor_03/*.flac") if p.stem.split("-")[2] != "02"][::6][:8]
    cache_dir = tmp_path / "cache"
    run = functools.partial(_train_cached, caplog, tmp_path)

    entries = lambda: sorted(p.name for p in cache_dir.rglob("*.safetensors"))  # noqa: E731
    manifest = _manifest(tmp_path / "m.csv", files)
    noise = [f"augment.noise_dir={DATA / 'noise'}", "augment.noise_prob=1.0", "cache.augmented_copies=1"]
    best, message = run("a", manifest, *noise)
    first = entries()
    # 6 train + 2 dev clips, and one noisy (seeded, hence distinct) copy of each training clip
    assert "14 encoded now, 0 reused" in message and len(first) == 14

    _, message = run("b", manifest, *noise, "optim.epochs=1")  # same clips and encoder: nothing encoded
    assert "0 encoded now, 14 reused" in message and entries() == first

    spans = {0: (0.5, 2.0)}  # one clip's span changes: exactly that clip (and its copy) is encoded again
    _, message = run("c", _manifest(tmp_path / "m2.csv", files, spans), *noise, "optim.epochs=1")
    assert "2 encoded now, 12 reused" in message and len(entries()) == len(first) + 2

    plain = ("augment.speed_factors=[1.0]", "cache.augmented_copies=1", "optim.epochs=1")
    codec = ("augment.codecs=[opus]", "augment.codec_prob=1.0")  # a copy through Opus alone is a new one
    _, message = run("d", manifest, *plain, *codec)
    assert "6 encoded now, 8 reused" in message and len(entries()) == len(first) + 8
    with pytest.raises(ValueError, match="cache.augmented_copies needs augmentation"):
        run("e", manifest, *plain)

    import serval

    records = serval.load(best).predict([str(files[0])])
    assert set(records[0]["probabilities"]) == set(SERConfig().classes)
    assert np.isclose(sum(records[0]["probabilities"].values()), 1.0, atol=1e-4)


@pytest.mark.slow
def test_lora_on_the_top_layer_trains_on_the_frozen_encoders_cache(tmp_path, caplog):
    from safetensors.torch import load_file

    import serval
    from serval.checkpoint import load_model

    files = [p for p in clips("ravdess", "Actor_03/*.flac") if p.stem.split("-")[2] != "02"][::6][:8]
    manifest = _manifest(tmp_path / "m.csv", files)
    weighted = ("model.layer_weighting=weighted", "model.layer_stats=true", "optim.epochs=1")
    _, message = _train_cached(caplog, tmp_path, "plain", manifest, *weighted)
    assert "8 encoded now, 0 reused" in message
    lora = ("model.lora_r=4", "model.lora_layers=1", "optim.lr_lora=1e-2")
    best, message = _train_cached(caplog, tmp_path, "lora", manifest, *weighted, *lora)
    assert "0 encoded now, 8 reused" in message  # the adapters sit above the cached layers
    out = tmp_path / "lora"
    trained = load_file(str(out / (out / "last").read_text().strip() / "model.safetensors"))
    adapters = {k: v for k, v in trained.items() if "lora_" in k}
    assert adapters and all(".layers.1." in k for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # B starts at zero
    # the audio path runs the whole encoder, the saved adapters on its top layer
    assert torch.equal(load_model(best).state_dict()[next(iter(adapters))], next(iter(adapters.values())))
    records = serval.load(best).predict([str(files[0])])
    assert np.isclose(sum(records[0]["probabilities"].values()), 1.0, atol=1e-4)


@pytest.mark.slow
def test_the_linear_head_is_fitted_on_whole_training_clips_after_training(tmp_path, caplog):
    import serval
    from serval.checkpoint import load_model
    from serval.train.linear_head import ABSENT_BIAS

    files = [p for p in clips("ravdess", "Actor_05/*.flac") if p.stem.split("-")[2] in ("01", "05", "06")][
        ::3
    ][:8]
    manifest = _manifest(tmp_path / "m.csv", files)
    best, _ = _train_cached(
        caplog, tmp_path, "run", manifest, "model.layer_weighting=weighted", "select.linear_head=true",
        "augment.crop_seconds=0.5", "model.lora_r=4", "model.lora_layers=1",
    )  # fmt: skip
    model = load_model(best)
    assert model.config.linear_head and not model.config.layer_stats
    train_files = [f for i, f in enumerate(files) if i % 4 != 3]  # as _manifest splits them
    labels = [SERConfig().classes.index(RAVDESS_CODES[f.stem.split("-")[2]]) for f in train_files]
    absent = [c for c in range(7) if c not in labels]
    assert (
        model.linear_head.bias[absent].eq(ABSENT_BIAS).all()
        and model.linear_head.weight[labels].abs().sum() > 0
    )
    # fitted on the whole clips (up to data.max_seconds, not the 0.5 s training crops): the head alone separates them
    feats, frames = compute_features([load_audio(str(f))[:40000] for f in train_files], n_mels=80)
    with torch.no_grad():
        stats = model.clip_statistics(*model.encode(feats, frames))
        guess = model.linear_head(stats).argmax(-1).tolist()
    assert guess == labels
    assert "linear head fitted on 6 training clips" in caplog.text
    records = serval.load(best).predict([str(files[3])])
    assert np.isclose(sum(records[0]["probabilities"].values()), 1.0, atol=1e-4)
