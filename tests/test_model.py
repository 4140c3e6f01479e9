"""The network: published layout, masks, Hugging Face parity, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from serval.masks import halve_time
from serval.model import SERConfig, SERModel, merge_lora_state_dict

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "meralion-ser-v1-state-dict.tsv"


def published_layout() -> dict[str, tuple[int, ...]]:
    if not REFERENCE.is_file():
        pytest.skip("reference state-dict listing not found")
    rows = (line.rstrip("\n").split("\t") for line in REFERENCE.read_text().splitlines() if line.strip())
    return {name: tuple(json.loads(shape)) for name, shape in rows}


@pytest.mark.slow
def test_medium_layout_matches_published_names_and_shapes():
    with torch.device("meta"):
        model = SERModel(SERConfig.for_whisper("medium"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == published_layout()
    outside = sum(v.numel() for k, v in model.state_dict().items() if not k.startswith("whisper."))
    assert abs(outside / 1e6 - 6.15) < 0.01


def test_weighted_layers_adds_only_layer_weights():
    with torch.device("meta"):
        model = SERModel(SERConfig.for_whisper("medium", layer_weighting="weighted"))
    extra = set(model.state_dict()) - set(published_layout())
    assert extra == {"layer_weights"}


def tiny_model(seed: int = 0, **overrides) -> SERModel:
    torch.manual_seed(seed)
    return SERModel(SERConfig.tiny(**overrides)).eval()


@pytest.mark.parametrize("weighting,stats", [("last", False), ("weighted", False), ("weighted", True)])
@pytest.mark.slow
def test_clip_alone_equals_clip_in_batch(weighting, stats):
    model = tiny_model(layer_weighting=weighting, layer_stats=stats)
    if stats:  # running statistics that are not the identity, so the standardisation is exercised
        model.layer_stats.standardise.running_mean.normal_()
        model.layer_stats.standardise.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(1)
    feats = torch.randn(3, 80, 400)
    lengths = torch.tensor([137, 400, 252])  # odd, full and even lengths
    with torch.no_grad():
        batched = model(feats, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone = model(feats[i : i + 1, :, :n], lengths[i : i + 1])
            assert torch.allclose(alone.logits[0], batched.logits[i], atol=1e-4)
            assert torch.allclose(alone.scores[0], batched.scores[i], atol=1e-4)
            assert torch.allclose(alone.embedding[0], batched.embedding[i], atol=1e-4)


@pytest.mark.slow
def test_layer_statistics_branch():
    with pytest.raises(ValueError, match="layer_stats needs layer_weighting 'weighted'"):
        SERModel(SERConfig.tiny(layer_weighting="last", layer_stats=True))
    model = tiny_model(layer_weighting="weighted", layer_stats=True).train()
    feats, lengths = torch.randn(1, 80, 200), torch.tensor([200])
    model(feats, lengths).logits.sum().backward()  # one clip in training: the running statistics stand in
    assert model.layer_stats.proj[1].weight.grad.abs().sum() > 0
    before = model.layer_stats.standardise.running_mean.clone()
    model(torch.randn(4, 80, 200), torch.tensor([200, 150, 90, 40]))
    assert not torch.equal(before, model.layer_stats.standardise.running_mean)  # batches update them


@pytest.mark.slow
def test_ecapa_drop_trains_the_branch_alone_on_dropped_clips_and_leaves_inference_alone():
    feats, lengths = torch.randn(2, 80, 200), torch.tensor([200, 140])
    plain, dropping = (
        tiny_model(layer_weighting="weighted", layer_stats=True),
        tiny_model(layer_weighting="weighted", layer_stats=True, ecapa_drop=0.5),
    )
    with torch.no_grad():
        assert torch.equal(plain(feats, lengths).logits, dropping(feats, lengths).logits)
    dropping.train()
    ecapa_used = []
    for seed in range(16):
        torch.manual_seed(seed)
        dropping.zero_grad()
        dropping(feats[:1], lengths[:1]).logits.sum().backward()
        grads = [p.grad for p in dropping.downstream_model.parameters() if p.grad is not None]
        ecapa_used.append(any(g.abs().sum() > 0 for g in grads))
        assert dropping.layer_stats.proj[1].weight.grad.abs().sum() > 0  # the branch always learns
    assert 0 < sum(ecapa_used) < 16  # some clips train the ECAPA network, the dropped ones do not
    with pytest.raises(ValueError, match="ecapa_drop"):
        SERModel(SERConfig.tiny(layer_weighting="weighted", layer_stats=True, ecapa_drop=1.0))


@pytest.mark.slow
def test_linear_head_mixes_its_probabilities_with_the_networks_and_takes_no_random_draw():
    with pytest.raises(ValueError, match="linear_head needs layer_weighting 'weighted'"):
        SERModel(SERConfig.tiny(linear_head=True))
    plain = tiny_model(layer_weighting="weighted", layer_stats=True)
    mixed = tiny_model(layer_weighting="weighted", layer_stats=True, linear_head=True)
    added = {f"linear_head.{n}" for n in ("center", "inv_scale", "weight", "bias")}
    assert set(mixed.state_dict()) - set(plain.state_dict()) == added
    assert all(torch.equal(v, mixed.state_dict()[k]) for k, v in plain.state_dict().items())  # same init
    torch.manual_seed(1)
    for buffer in mixed.linear_head.buffers():
        buffer.normal_(std=0.05)
    feats, lengths = torch.randn(3, 80, 120), torch.tensor([120, 80, 50])
    with torch.no_grad():
        net = plain(feats, lengths).logits.softmax(-1)
        stats = mixed.clip_statistics(*mixed.encode(feats, lengths))
        head = mixed.linear_head
        linear = (((stats - head.center) * head.inv_scale) @ head.weight.T + head.bias).softmax(-1)
        out = mixed(feats, lengths)
    assert torch.allclose(out.logits.softmax(-1), (net + linear) / 2, atol=1e-6)
    assert torch.equal(out.scores, plain(feats, lengths).scores)  # the scores stay the network's
    for w in (0.75, 1.0):  # the linear head's share (model.linear_weight); at 1 it alone decides
        mixed.config.linear_weight = w
        with torch.no_grad():
            weighted = mixed(feats, lengths).logits.softmax(-1)
        assert torch.allclose(weighted, (1 - w) * net + w * linear, atol=1e-6)
    for w in (0.0, 1.5):
        with pytest.raises(ValueError, match="linear_weight must be in"):
            SERConfig.tiny(layer_weighting="weighted", linear_head=True, linear_weight=w).check()


def test_weighted_sum_chooses_layers_not_magnitudes():
    model = tiny_model(layer_weighting="weighted")
    torch.manual_seed(2)
    hidden = torch.randn(2, model.config.encoder_layers + 1, 50, model.config.d_model)
    loud = hidden.clone()
    loud[:, 1] *= 300.0  # Whisper's inner residual streams carry channels in the hundreds
    with torch.no_grad():
        assert torch.allclose(model.head(hidden).logits, model.head(loud).logits, atol=1e-4)
        model.layer_weights.copy_(torch.tensor([-1e4] * model.config.encoder_layers + [0.0]))
        only_last = model.head(hidden).logits
        normed = torch.nn.functional.layer_norm(hidden[:, -1], hidden.shape[-1:])
        model.config.layer_weighting = "last"
        assert torch.allclose(only_last, model.head(normed).logits, atol=1e-5)


def test_padding_values_do_not_leak():
    model = tiny_model()
    feats = torch.randn(1, 80, 300)
    lengths = torch.tensor([180])
    garbage = feats.clone()
    garbage[..., 180:] = 1e3
    with torch.no_grad():
        assert torch.allclose(model(feats, lengths).logits, model(garbage, lengths).logits, atol=1e-5)


@pytest.mark.slow
def test_pad_to_30s_mode_ignores_lengths_like_the_published_code():
    model = tiny_model(pad_to_30s=True)
    feats = torch.randn(2, 80, 3000)
    with torch.no_grad():
        a = model(feats, torch.tensor([300, 3000])).logits
        b = model(feats, None).logits
    assert torch.allclose(a, b)


def test_halve_time_with_mask_averages_valid_frames_only():
    x = torch.tensor([[[1.0, 3.0, 5.0, 0.0]]])
    mask = torch.tensor([[True, True, True, False]])
    y, m = halve_time(x, mask)
    assert y.tolist() == [[[2.0, 5.0]]] and m.tolist() == [[True, True]]
    y, m = halve_time(x[..., :3], mask[:, :3])  # odd length: same answer
    assert y.tolist() == [[[2.0, 5.0]]]


@pytest.mark.slow
def test_encoder_matches_transformers_whisper_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    torch.manual_seed(0)
    cfg = SERConfig.tiny()
    hf = HFWhisperEncoder(
        WhisperConfig(
            num_mel_bins=80,
            d_model=cfg.d_model,
            encoder_layers=cfg.encoder_layers,
            encoder_attention_heads=cfg.encoder_attention_heads,
            encoder_ffn_dim=cfg.encoder_ffn_dim,
            max_source_positions=1500,
        )
    ).eval()
    model = SERModel(cfg).eval()
    model.load_backbone_state(hf.state_dict())
    feats = torch.randn(2, 80, 3000)
    with torch.no_grad():
        ref = hf(feats).last_hidden_state
        ours, _ = model.whisper.encoder(feats)
    assert (ours - ref).abs().max() < 1e-4


def test_lora_wraps_q_k_v_only_and_merges_into_published_names():
    model = tiny_model(lora_r=4, lora_alpha=8)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 3 * model.config.encoder_layers
    assert all(any(t in n for t in ("q_proj", "k_proj", "v_proj")) for n in lora)
    assert all(not p.requires_grad for p in model.backbone_parameters())
    assert all(p.requires_grad for p in model.lora_parameters())
    with torch.no_grad():  # make the adapters non-trivial, then check the merge is exact
        for p in model.lora_parameters():
            p.normal_(std=0.1)
    merged = merge_lora_state_dict(model.state_dict(), scaling=8 / 4)
    plain = SERModel(SERConfig.tiny()).eval()
    plain.load_state_dict(merged)
    feats = torch.randn(1, 80, 200)
    with torch.no_grad():
        assert torch.allclose(model(feats).logits, plain(feats).logits, atol=1e-4)
    assert set(model.merged_state_dict()) == set(plain.state_dict())


@pytest.mark.slow
def test_lora_on_top_layers_re_runs_them_from_a_frozen_encoder_cache():
    from serval.train.cache import backbone_fingerprint

    kw = dict(encoder_layers=3, layer_weighting="weighted", layer_stats=True)
    model = tiny_model(lora_r=4, lora_layers=1, **kw)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 3 and all(".layers.2." in n for n in lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    frozen = SERModel(SERConfig.tiny(**kw)).eval()  # the encoder the cache was made with
    frozen.load_state_dict(
        {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    )
    feats, lengths = torch.randn(2, 80, 60), torch.tensor([60, 41])
    with torch.no_grad():
        cache, tokens = frozen.encode(feats, lengths)
        assert torch.allclose(
            model.cached_forward(cache.half(), tokens).logits, model(feats, lengths).logits, atol=2e-2
        )
        assert torch.allclose(
            model.cached_forward(cache, tokens).logits, model(feats, lengths).logits, atol=1e-5
        )
        assert not torch.allclose(
            frozen.cached_forward(cache, tokens).logits, model(feats, lengths).logits, atol=1e-3
        )
    # the cache key is the frozen encoder's; adapters on every layer change what is cached, so they count
    assert backbone_fingerprint(model) == backbone_fingerprint(frozen)
    everywhere = tiny_model(lora_r=4, **kw)
    everywhere.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for n, p in everywhere.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    assert backbone_fingerprint(everywhere) != backbone_fingerprint(frozen)
    with pytest.raises(ValueError, match="lora_layers must be in"):
        SERModel(SERConfig.tiny(lora_r=4, lora_layers=3))


def test_unknown_config_key_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown setting bogus"):
        SERConfig.from_dict({"bogus": 1})
