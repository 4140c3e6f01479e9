"""`serval mcp` through the official MCP SDK's stdio client: the real server process, real clips.

One server session (process start-up dominates the time) makes every call; the tests then check
their answers against the in-process predictor.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import sys

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from conftest import DATA, REPO, ConstantPredictor, clips

pytest.importorskip("mcp")
anyio = pytest.importorskip("anyio")
pytestmark = pytest.mark.slow  # a real server process per module

from serval import vocab  # noqa: E402
from serval.audio import load_audio  # noqa: E402
from serval.checkpoint import save_model  # noqa: E402
from serval.inference import load  # noqa: E402
from serval.model import SERConfig, SERModel  # noqa: E402
from serval.timeline import grid_timeline  # noqa: E402
from serval.vocab import DIMENSIONS, EMOTIONS, PRIMARY4  # noqa: E402
from serval.windows import WindowSpec  # noqa: E402

# Records are rounded to 6 decimals. The tiny random model's probabilities are near-uniform: different clips
# differ by only ~1e-4 (checked below), and fp32 sum orders (CPU, batch, engine) move them by ~1e-7.
TOL = 5e-6


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def probs(record: dict, classes) -> np.ndarray:
    return np.array([record["probabilities"][c] for c in classes])


async def session_calls(args: list[str], calls: dict[str, tuple[str, dict]], cwd=REPO):
    """Start `serval mcp ARGS` in `cwd` over stdio, initialise, list its tools and make `calls`."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    # the SDK passes HOME and PATH only, unless told: the server then uses the test session's caches
    env = dict(os.environ)
    params = StdioServerParameters(
        command=sys.executable, cwd=str(cwd), args=["-m", "serval", "mcp", *args], env=env
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        init = await session.initialize()
        tools = {t.name: t for t in (await session.list_tools()).tools}
        results = {key: await session.call_tool(name, arguments) for key, (name, arguments) in calls.items()}
    return init, tools, results


@pytest.fixture(scope="module")
def run(tmp_path_factory, ravdess_clips, emodb_clips):
    torch.manual_seed(1)
    tmp = tmp_path_factory.mktemp("mcp")
    # every dimension marked trained, so records carry scores to compare (nulls: test_honest_outputs)
    model_dir = save_model(SERModel(SERConfig.tiny(trained_dimensions=DIMENSIONS)), tmp / "tiny")
    predictor = load(model_dir, device="cpu")
    clip, other = ravdess_clips[4], emodb_clips[1]
    talk = tmp / "audio" / "conversation.wav"
    talk.parent.mkdir()
    sf.write(
        talk,
        np.concatenate([load_audio(p) for p in clips("ravdess", "Actor_05/*.flac", n=4)]),
        16000,
        subtype="FLOAT",
    )
    meeting = tmp / "audio" / "meeting.flac"  # 65 s: longer than the model's window, read in pieces
    sf.write(
        meeting,
        np.concatenate([load_audio(p) for p in clips("ravdess", "Actor_06/*.flac", n=20)])[: 65 * 16000],
        16000,
    )
    broken = tmp / "audio" / "broken.flac"
    broken.write_bytes(clip.read_bytes()[:2500])
    wav22k = io.BytesIO()  # 22.05 kHz 16-bit WAV bytes: decoded and resampled like a file
    sf.write(wav22k, soxr.resample(load_audio(clip), 16000, 22050), 22050, format="WAV", subtype="PCM_16")
    outside = REPO / "pyproject.toml"  # readable, but neither under a --root nor where the tool starts
    silence = io.BytesIO()
    sf.write(silence, np.zeros(32000, np.float32), 16000, format="WAV", subtype="PCM_16")
    calls = {
        "path": ("recognize_emotion", {"path": str(clip)}),
        "base64": (
            "recognize_emotion",
            {
                "audio_base64": b64(other.read_bytes()),
                "filename": other.name,
                "classes": ["neutral", "angry"],
            },
        ),
        "resampled": ("recognize_emotion", {"audio_base64": b64(wav22k.getvalue())}),
        "long": ("recognize_emotion", {"path": str(meeting)}),
        "long_base64": ("recognize_emotion", {"audio_base64": b64(meeting.read_bytes())}),
        "silence": ("recognize_emotion", {"audio_base64": b64(silence.getvalue()), "filename": "quiet.wav"}),
        "timeline": ("emotion_timeline", {"path": str(talk), "window": 3, "hop": 1.5, "max_segment": 6}),
        "segments": ("emotion_timeline", {"audio_base64": b64(talk.read_bytes()), "include_windows": False}),
        "broken": ("recognize_emotion", {"path": str(broken)}),
        "missing": ("recognize_emotion", {"path": str(tmp / "audio" / "missing.wav")}),
        "no_audio": ("recognize_emotion", {}),
        "both": ("recognize_emotion", {"path": str(clip), "audio_base64": b64(b"x")}),
        "bad_base64": ("recognize_emotion", {"audio_base64": "%%% not base64 %%%"}),
        "bad_class": ("recognize_emotion", {"path": str(clip), "classes": ["bored"]}),
        "bad_grid": ("emotion_timeline", {"path": str(talk), "window": 2, "hop": 3}),
        "outside": ("recognize_emotion", {"path": str(outside)}),
        "sneaky": ("recognize_emotion", {"path": str(tmp / "audio" / ".." / ".." / ".." / outside.name)}),
    }
    args = ["--model", str(model_dir), "--device", "cpu", "--root", str(tmp / "audio"), "--root", str(DATA)]
    (tmp / "start").mkdir()
    init, tools, results = anyio.run(session_calls, args, calls, tmp / "start")
    return dict(
        predictor=predictor,
        clip=clip,
        other=other,
        talk=talk,
        meeting=meeting,
        init=init,
        tools=tools,
        results=results,
        silence=silence.getvalue(),
    )


def _types(prop: dict) -> dict:
    """A JSON-schema property as {type: item type or None}, e.g. {"array": "string", "null": None}."""
    options = prop.get("anyOf", [prop])
    return {o["type"]: o.get("items", {}).get("type") for o in options}


def test_tools_are_listed_with_schemas(run):
    init, tools = run["init"], run["tools"]
    assert init.server_info.name == "serval"
    assert init.server_info.version == __import__("serval").__version__
    # the instructions name every class, in the model's order, and the dimensions
    found = re.search(r"(\d+) classes \(([^)]*)\)", init.instructions)
    assert found, init.instructions
    assert int(found[1]) == len(EMOTIONS) and tuple(found[2].split(", ")) == EMOTIONS
    assert f"{'/'.join(DIMENSIONS)} scores in [0, 1]" in init.instructions
    assert set(tools) == {"recognize_emotion", "emotion_timeline"}
    assert all(name in init.instructions for name in tools)

    optional = {"string": None, "null": None}
    recognize = tools["recognize_emotion"]
    schema = recognize.input_schema
    # every argument is optional: the tool itself says which audio argument is missing
    assert schema["type"] == "object" and not schema.get("required")
    assert {k: _types(v) for k, v in schema["properties"].items()} == {
        "path": optional,
        "audio_base64": optional,
        "filename": optional,
        "classes": {"array": "string", "null": None},
    }
    assert all(v["default"] is None for v in schema["properties"].values())
    out = recognize.output_schema
    assert (
        set(out["required"])
        == set(out["properties"])
        == {
            "file",
            "duration",
            "pieces",
            "label",
            "probabilities",
            "scores",
            "speech_fraction",
            "no_speech",
        }
    )
    assert out["properties"]["pieces"]["type"] == "integer"
    assert [out["properties"][k]["type"] for k in ("file", "duration", "speech_fraction", "no_speech")] == [
        "string",
        "number",
        "number",
        "boolean",
    ]
    # no label for a clip without speech, and the schema says so
    assert _types(out["properties"]["label"]) == {"string": None, "null": None}
    assert "null when no_speech" in out["properties"]["label"]["description"]
    assert "Silero VAD" in out["properties"]["speech_fraction"]["description"]
    for k in ("probabilities", "scores"):
        assert out["properties"][k]["type"] == "object"
    assert out["properties"]["probabilities"]["additionalProperties"] == {"type": "number"}
    # a score is null where the model's output for the dimension was not trained, and it says so
    assert out["properties"]["scores"]["additionalProperties"] == {
        "anyOf": [{"type": "number"}, {"type": "null"}]
    }
    assert all(d in out["properties"]["scores"]["description"] for d in DIMENSIONS)
    assert "not trained" in out["properties"]["scores"]["description"]
    description = recognize.description
    assert "emotion" in description.lower()
    assert description.startswith("Recognise the emotion in one speech clip")
    assert f"{'/'.join(DIMENSIONS)} scores in [0, 1]" in description
    assert all(f'"{c}"' in description for c in PRIMARY4)  # the subset example uses real class names

    timeline = tools["emotion_timeline"]
    schema = timeline.input_schema
    assert schema["type"] == "object" and not schema.get("required")
    props = schema["properties"]
    assert {k: _types(v) for k, v in props.items()} == {
        "path": optional,
        "audio_base64": optional,
        "filename": optional,
        "window": {"number": None},
        "hop": {"number": None},
        "max_segment": {"number": None},
        "vad": {"boolean": None},
        "include_windows": {"boolean": None},
    }
    defaults = {k: props[k]["default"] for k in ("window", "hop", "max_segment", "vad", "include_windows")}
    assert defaults == {"window": 4.0, "hop": 2.0, "max_segment": 15.0, "vad": False, "include_windows": True}
    assert timeline.description.startswith("Emotion over time in a longer recording")
    assert "`serval timeline`" in timeline.description and "recognize_emotion" in timeline.description


def test_recognize_emotion_says_no_speech(run, tmp_path):
    from serval.serve.mcp import AudioInput, EmotionTools

    rec = run["results"]["silence"].structured_content
    assert not run["results"]["silence"].is_error and rec["file"] == "quiet.wav"
    assert rec["label"] is None and rec["no_speech"] is True and rec["speech_fraction"] == 0.0
    assert sum(rec["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    speech = run["results"]["path"].structured_content
    assert speech["no_speech"] is False and speech["speech_fraction"] > 0.3 and speech["label"] in EMOTIONS
    # `serval mcp --label-no-speech`: the tool labels it anyway
    tools = EmotionTools(run["predictor"], AudioInput(cwd=str(tmp_path)), 600, 3600, label_no_speech=True)
    labelled = tools.recognize_emotion(audio_base64=b64(run["silence"]))
    assert labelled.no_speech is True and labelled.label == max(
        labelled.probabilities, key=labelled.probabilities.get
    )


def test_recognize_emotion_is_the_predict_record(run):
    predictor, res = run["predictor"], run["results"]
    want = predictor.predict([str(run["clip"])])[0]
    rec = res["path"].structured_content
    assert (
        not res["path"].is_error and rec["file"] == str(run["clip"]) and rec["duration"] == want["duration"]
    )
    np.testing.assert_allclose(probs(rec, predictor.classes), probs(want, predictor.classes), atol=TOL)
    np.testing.assert_allclose(
        [rec["scores"][d] for d in predictor.dimensions],
        [want["scores"][d] for d in predictor.dimensions],
        atol=TOL,
    )
    assert rec["label"] == max(rec["probabilities"], key=rec["probabilities"].get)

    full = predictor.predict([str(run["other"])])[0]["probabilities"]
    rec = res["base64"].structured_content
    assert rec["file"] == run["other"].name and list(rec["probabilities"]) == ["neutral", "angry"]
    assert rec["probabilities"]["neutral"] == pytest.approx(
        full["neutral"] / (full["neutral"] + full["angry"]), abs=TOL
    )
    assert abs(full["neutral"] - probs(res["path"].structured_content, predictor.classes)[0]) > 20 * TOL

    rec = res["resampled"].structured_content
    assert not res["resampled"].is_error and rec["file"] == "audio"
    assert rec["duration"] == pytest.approx(want["duration"], abs=2e-3)
    # resampled there and back the clip is not bit-identical, but the model hears nearly the same
    np.testing.assert_allclose(probs(rec, predictor.classes), probs(want, predictor.classes), atol=1e-3)


def test_a_long_recording_is_pooled_over_its_pieces(run):
    predictor, res = run["predictor"], run["results"]
    want = predictor.predict(str(run["meeting"]))
    assert want["pieces"] == 3
    for key in ("long", "long_base64"):
        rec = res[key].structured_content
        assert not res[key].is_error and rec["pieces"] == 3 and rec["duration"] == 65.0
        assert rec["label"] == want["label"]
        np.testing.assert_allclose(probs(rec, predictor.classes), probs(want, predictor.classes), atol=TOL)
    assert res["path"].structured_content["pieces"] == 1


def test_emotion_timeline_is_the_timeline_json(run):
    predictor, res = run["predictor"], run["results"]
    want = grid_timeline(
        load_audio(run["talk"]), predictor, WindowSpec(window=3.0, hop=1.5, min_length=0.5, max_segment=6.0)
    )
    got = res["timeline"].structured_content
    assert not res["timeline"].is_error
    assert got["file"] == str(run["talk"]) and got["duration"] == pytest.approx(
        sf.info(run["talk"]).duration, abs=1e-3
    )
    assert [(w["start"], w["end"]) for w in got["windows"]] == [
        (w["start"], w["end"]) for w in want["windows"]
    ]
    for g, w in zip(got["windows"], want["windows"]):
        np.testing.assert_allclose(probs(g, predictor.classes), probs(w, predictor.classes), atol=TOL)
    assert [(s["start"], s["end"], s["label"]) for s in got["segments"]] == [
        (s["start"], s["end"], s["label"]) for s in want["segments"]
    ]

    rec = res["segments"].structured_content
    assert "windows" not in rec and rec["grid"]["window"] == 4.0 and rec["file"] == "audio"
    assert rec["segments"][0]["start"] == 0 and rec["segments"][-1]["end"] == pytest.approx(
        rec["duration"], abs=1e-3
    )


@pytest.mark.parametrize(
    "key, words",
    [
        ("broken", ["broken.flac", "truncated"]),
        ("missing", ["missing.wav", "no such file"]),
        ("no_audio", ["exactly one of"]),
        ("both", ["exactly one of"]),
        ("bad_base64", ["base64"]),
        ("bad_class", ["bored"]),
        ("bad_grid", ["hop"]),
        ("outside", ["pyproject.toml", "outside the folders"]),
        ("sneaky", ["outside the folders"]),
    ],
)
def test_bad_calls_are_tool_errors(run, key, words):
    result = run["results"][key]
    assert result.is_error
    text = result.content[0].text
    for w in words:
        assert w in text, text


def test_bad_model_is_a_clear_exit(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the missing dir is then not looked up on the Hub
    p = subprocess.run(
        [sys.executable, "-m", "serval", "mcp", "--model", str(tmp_path / "none")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert p.returncode == 2 and "serval mcp:" in p.stderr and str(tmp_path / "none") in p.stderr
    assert p.stdout == ""  # stdout is the protocol channel


def test_mcp_timeline_output_schema_is_typed():
    from serval.serve.mcp import build_server

    tools = {t.name: t for t in asyncio.run(build_server(ConstantPredictor()).list_tools())}
    out = tools["emotion_timeline"].output_schema
    assert set(out["required"]) >= {"segments", "grid", "classes", "file"}
    assert "windows" in out["properties"] and "windows" not in out["required"]  # include_windows=false
    segment = out["$defs"]["TimelineSegment"]["properties"]
    assert segment["label"]["type"] == "string" and segment["probabilities"]["type"] == "object"


@pytest.mark.slow
def test_mcp_tool_answers_and_schema_say_null(trained_dims_models, ravdess_clips, one_actor_talk):
    pytest.importorskip("mcp")
    from serval.serve.mcp import AudioInput, EmotionResult, EmotionTools, recognize_description

    for trained in [(), ("arousal",)]:
        tools = EmotionTools(load(trained_dims_models[trained], device="cpu"), AudioInput(cwd="/"), 600, 3600)
        rec = tools.recognize_emotion(path=str(ravdess_clips[3])).model_dump()
        timeline = tools.emotion_timeline(path=str(one_actor_talk), include_windows=False)
        for scores in [rec["scores"], *(s["scores"] for s in timeline["segments"])]:
            assert [d for d, v in scores.items() if v is not None] == list(trained)
            assert list(scores) == list(DIMENSIONS)
    prop = EmotionResult.model_json_schema()["properties"]["scores"]
    assert (
        vocab.UNTRAINED in prop["description"] and {"type": "null"} in prop["additionalProperties"]["anyOf"]
    )
    assert "not trained" in recognize_description(tools.predictor)
