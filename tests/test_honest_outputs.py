"""Honest outputs: a dimension whose output was never trained is reported as null, never as a number.

Two tiny random models with the same weights, one saved with no trained dimension and one with
arousal trained, show the difference everywhere a record goes: predict records (torch, ONNX, an
ensemble, csv/table), the timeline (windows, segments, speakers, CSV, plot), the server (emotion,
timeline, stream, model info), the MCP tool and evaluation; and the bundled model as it is today.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch
from conftest import clips

from serval import vocab
from serval.audio import SAMPLE_RATE, load_audio
from serval.batch import format_records
from serval.checkpoint import save_model
from serval.inference import load
from serval.locations import DEFAULT_MODEL
from serval.manifest import ManifestRow
from serval.model import SERConfig, SERModel
from serval.timeline import Turn, grid_timeline, outputs, plot, turns_timeline
from serval.vocab import DIMENSIONS
from serval.windows import WindowSpec

NONE = dict.fromkeys(DIMENSIONS)  # every key kept, every value null


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{trained dims: model folder}: the same random weights saved as untrained, arousal-only, all trained."""
    torch.manual_seed(5)
    state = SERModel(SERConfig.tiny()).state_dict()
    root = tmp_path_factory.mktemp("honest")
    out = {}
    for trained in [(), ("arousal",), DIMENSIONS]:
        model = SERModel(SERConfig.tiny(trained_dimensions=trained))
        model.load_state_dict(state)
        out[trained] = save_model(model, root / ("-".join(trained) or "none"))
    return out


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """~12 s of real RAVDESS speech from one actor, as FLAC."""
    wave = np.concatenate([load_audio(p) for p in clips("ravdess", "Actor_03/03-01-0[35]-02-*.flac", n=4)])
    path = tmp_path_factory.mktemp("audio") / "talk.flac"
    sf.write(path, wave, SAMPLE_RATE)
    return path


def test_vocab_scores_null_for_untrained_or_non_finite():
    assert vocab.scores([0.25, 0.5, 0.75], DIMENSIONS, ()) == NONE
    assert vocab.scores([0.25, 0.5, 0.75], DIMENSIONS, ("valence",)) == {
        "arousal": None,
        "valence": 0.5,
        "dominance": None,
    }
    assert vocab.scores([math.nan, 0.5, math.inf], DIMENSIONS, DIMENSIONS) == {
        "arousal": None,
        "valence": 0.5,
        "dominance": None,
    }
    body = vocab.label_body([0.1, 0.9], [0.3, 0.6, 0.2], ("sad", "happy"), DIMENSIONS, trained=("arousal",))
    assert body == {"label": "happy", "probabilities": {"sad": 0.1, "happy": 0.9}, "scores": {
        "arousal": 0.3, "valence": None, "dominance": None}}  # fmt: skip


def test_predict_records_say_only_what_was_trained(models, ravdess_clips, tmp_path, monkeypatch):
    clip = str(ravdess_clips[0])
    none, arousal = load(models[()], device="cpu"), load(models[("arousal",)], device="cpu")
    assert none.trained_dimensions == () and arousal.trained_dimensions == ("arousal",)
    a, b = none.predict(clip), arousal.predict(clip)
    assert a["probabilities"] == b["probabilities"] and a["label"] == b["label"]  # same weights
    assert a["scores"] == NONE
    raw = arousal.predict_waveforms([load_audio(clip)])[1][0]
    assert b["scores"] == {"arousal": round(float(raw[0]), 6), "valence": None, "dominance": None}
    # strict JSON carries the nulls
    assert json.loads(json.dumps(b, allow_nan=False))["scores"]["valence"] is None
    # an ensemble: trained only where every member is
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / "ensemble.json").write_text(
        json.dumps({"members": [str(models[DIMENSIONS]), str(models[("arousal",)])]})
    )
    assert load(ens, device="cpu").trained_dimensions == ("arousal",)
    # csv: an empty cell; table: "-"
    rows = format_records([b], "csv").splitlines()
    header, row = rows[0].split(","), rows[1].split(",")
    assert row[header.index("arousal")] == str(b["scores"]["arousal"])
    assert row[header.index("valence")] == "" and row[header.index("dominance")] == ""
    table = format_records([b], "table").splitlines()
    cells = table[1].split()
    assert cells[table[0].split().index("valence")] == "-" and cells[-1] == "-"


@pytest.mark.slow
def test_onnx_graph_carries_the_trained_dimensions(models, ravdess_clips, tmp_path, monkeypatch):
    from serval.export import export_onnx
    from serval.onnx_engine import OnnxPredictor, load_engine

    monkeypatch.setenv("SERVAL_CACHE", str(tmp_path / "cache"))
    clip = str(ravdess_clips[1])
    torch_rec = load(models[("arousal",)], device="cpu").predict(clip)
    system = load_engine(models[("arousal",)], "onnx")
    assert isinstance(system, OnnxPredictor) and system.trained_dimensions == ("arousal",)
    rec = system.predict(clip)
    assert rec["scores"]["valence"] is None and rec["scores"]["dominance"] is None
    assert abs(rec["scores"]["arousal"] - torch_rec["scores"]["arousal"]) <= 1e-4
    assert load_engine(models[()], "onnx").predict(clip)["scores"] == NONE
    # a graph exported before serval wrote the key says nothing, so none is trained
    graph = export_onnx(load(models[DIMENSIONS], device="cpu").models, tmp_path / "all.onnx")
    assert OnnxPredictor(graph).trained_dimensions == DIMENSIONS
    proto = onnx.load(graph)
    keep = [p for p in proto.metadata_props if p.key != "trained_dimensions"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.save(proto, tmp_path / "old.onnx")
    old = OnnxPredictor(tmp_path / "old.onnx")
    assert old.trained_dimensions == () and old.predict(clip)["scores"] == NONE


@pytest.mark.slow
def test_timeline_reports_and_plots_only_trained_outputs(models, recording, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    spec = WindowSpec(window=4.0, hop=2.0)
    none, arousal = load(models[()], device="cpu"), load(models[("arousal",)], device="cpu")
    a, b = grid_timeline(recording, none, spec), grid_timeline(recording, arousal, spec)
    assert a["trained_dimensions"] == [] and b["trained_dimensions"] == ["arousal"]
    assert a["windows"] and a["segments"]
    for item in a["windows"] + a["segments"]:
        assert item["scores"] == NONE
    for item in b["windows"] + b["segments"]:
        assert isinstance(item["scores"]["arousal"], float)
        assert item["scores"]["valence"] is None and item["scores"]["dominance"] is None
    csv_rows = outputs(b, str(tmp_path / "b"), ["csv"])[str(tmp_path / "b.csv")].splitlines()
    header = csv_rows[0].split(",")
    first = csv_rows[1].split(",")
    assert first[header.index("arousal")] != "" and first[header.index("valence")] == ""
    # speaker summaries: the mean of a trained score, null for the others
    turns = [Turn(0.0, 5.0, "A"), Turn(5.0, 10.0, "B"), Turn(10.0, 12.0, "A")]
    t = turns_timeline(recording, arousal, turns)
    for summary in t["speakers"].values():
        assert isinstance(summary["scores"]["arousal"], float) and summary["scores"]["valence"] is None
    assert all(s["scores"] == NONE for s in turns_timeline(recording, none, turns)["speakers"].values())

    # the plot: no dimension panel when none is trained, one line per trained dimension otherwise
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kw: figures.append(self))
    plot(a, tmp_path / "a.png")
    plot(b, tmp_path / "b.png")
    plot(grid_timeline(recording, load(models[DIMENSIONS], device="cpu"), spec), tmp_path / "c.png")
    labels = [[[line.get_label() for line in ax.get_lines()] for ax in fig.axes] for fig in figures]
    classes = list(none.classes)
    assert labels == [[classes], [classes, ["arousal"]], [classes, list(DIMENSIONS)]]


def test_server_answers_null_for_untrained(models, ravdess_clips, recording):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from serval.serve.app import create_app
    from serval.serve.config import ServerConfig

    body = ravdess_clips[2].read_bytes()
    talk = recording.read_bytes()
    pcm = (load_audio(recording)[: 6 * SAMPLE_RATE] * 32767).astype("<i2").tobytes()
    seen = {}
    for trained in [(), ("arousal",)]:
        app = create_app(load(models[trained], device="cpu"), ServerConfig())
        with TestClient(app) as c:
            head = {"content-type": "audio/flac"}
            rec = c.post("/v1/emotion", content=body, headers=head).json()
            timeline = c.post("/v1/timeline", content=talk, headers=head).json()
            info = c.get("/v1/model").json()
            with c.websocket_connect("/v1/stream?sample_rate=16000") as ws:
                ready = ws.receive_json()
                ws.send_bytes(pcm)
                window = ws.receive_json()
                ws.send_text(json.dumps({"type": "end"}))
                messages = [ws.receive_json()]
                while messages[-1]["type"] != "summary":
                    messages.append(ws.receive_json())
            schema = c.get("/openapi.json").json()
        seen[trained] = rec, timeline, info, ready, window, messages[-1]
        assert info["trained_dimensions"] == ready["trained_dimensions"] == list(trained)
        assert timeline["trained_dimensions"] == list(trained)
        for scores in [
            rec["scores"],
            *(w["scores"] for w in timeline["windows"]),
            *(s["scores"] for s in timeline["segments"]),
            window["scores"],
            messages[-1]["overall"]["scores"],
            *(s["scores"] for s in messages[-1]["segments"]),
        ]:
            assert list(scores) == list(DIMENSIONS)
            assert [d for d, v in scores.items() if v is not None] == list(trained)
    # the schema says what a null means
    record = schema["components"]["schemas"]["EmotionRecord"]["properties"]["scores"]
    assert vocab.UNTRAINED in record["description"]
    assert {"type": "null"} in record["additionalProperties"]["anyOf"]
    # the same weights: the trained score is the number, the untrained one is null
    assert seen[()][0]["probabilities"] == seen[("arousal",)][0]["probabilities"]


@pytest.mark.slow
def test_mcp_tool_answers_and_schema_say_null(models, ravdess_clips, recording):
    pytest.importorskip("mcp")
    from serval.serve.mcp import RECOGNIZE_DESCRIPTION, AudioInput, EmotionResult, EmotionTools

    for trained in [(), ("arousal",)]:
        tools = EmotionTools(load(models[trained], device="cpu"), AudioInput(cwd="/"), 600, 3600)
        rec = tools.recognize_emotion(path=str(ravdess_clips[3])).model_dump()
        timeline = tools.emotion_timeline(path=str(recording), include_windows=False)
        for scores in [rec["scores"], *(s["scores"] for s in timeline["segments"])]:
            assert [d for d, v in scores.items() if v is not None] == list(trained)
            assert list(scores) == list(DIMENSIONS)
    prop = EmotionResult.model_json_schema()["properties"]["scores"]
    assert (
        vocab.UNTRAINED in prop["description"] and {"type": "null"} in prop["additionalProperties"]["anyOf"]
    )
    assert "not trained" in RECOGNIZE_DESCRIPTION


@pytest.mark.slow
def test_eval_does_not_score_untrained_outputs(models, tmp_path):
    from serval.evaluate import make_units, predict_all, score_dimensions

    gold = [(0.2, 0.7, 0.4), (0.4, 0.5, 0.5), (0.6, 0.3, 0.7), (0.8, 0.6, 0.6)]
    rows = [ManifestRow(str(p), None, None, "sad", *g) for p, g in zip(clips("ravdess", n=4), gold)]
    units = make_units(rows, "utterance")
    systems = [load(models[trained], device="cpu") for trained in [(), ("arousal",), DIMENSIONS]]
    names = ["none", "arousal", "all"]
    tables, failures = predict_all(units, systems, names, tmp_path / "cache")
    assert not failures
    dims = score_dimensions(units, names, tables)
    assert "none" not in dims  # nothing trained: no CCC row at all
    assert dims["arousal"]["arousal"]["n"] == len(rows) and dims["arousal"]["valence"]["n"] == 0
    assert math.isnan(dims["arousal"]["valence"]["ccc"])
    assert dims["all"]["valence"]["n"] == len(rows)  # the same weights, trained: scored
    assert dims["all"]["arousal"]["ccc"] == dims["arousal"]["arousal"]["ccc"]


def test_the_bundled_model_reports_only_its_trained_dimensions(ravdess_clips):
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip("no bundled model")
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    trained = tuple(config.get("trained_dimensions", ()))  # absent: none (a model saved before the field)
    system = load("default", device="cpu")
    assert system.trained_dimensions == trained
    rec = system.predict(str(ravdess_clips[0]))
    assert list(rec["scores"]) == list(DIMENSIONS)
    assert [d for d, v in rec["scores"].items() if v is not None] == list(trained)


def test_the_model_card_names_only_trained_scores(models):
    none = (models[()] / "README.md").read_text()
    arousal = (models[("arousal",)] / "README.md").read_text()
    assert "scores in [0, 1]" not in none
    assert "Its arousal, valence, dominance outputs were not trained: null in records." in none
    assert ") and arousal scores in [0, 1]. Its valence, dominance outputs were not trained" in arousal
    assert "not trained" not in (models[DIMENSIONS] / "README.md").read_text()
