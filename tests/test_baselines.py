"""Baselines: label parsing, the OpenAI-compatible LLM adapter against a loopback server,
emotion2vec's label mapping (FunASR stood in for), and the MERaLiON-SER-v1 importer path."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from serval.audio import load_audio
from serval.baselines import (
    PROMPT,
    AudioLLM,
    Emotion2Vec,
    emotion2vec_probabilities,
    parse_emotion_label,
)
from serval.checkpoint import save_model
from serval.eval_predictions import predict_all
from serval.evaluate import evaluate
from serval.inference import Predictor, load
from serval.manifest import ManifestRow
from serval.model import SERConfig, SERModel
from serval.vocab import EMOTIONS

# ----------------------------------------------------------------------------- label parsing


@pytest.mark.parametrize(
    "reply, label",
    [
        ("Angry", "angry"),
        ("angry.", "angry"),
        ("  SAD!\n", "sad"),
        ("Anger", "angry"),
        ("happiness", "happy"),
        ("Fear", "fearful"),
        ("Disgust.", "disgusted"),
        ("Surprise!", "surprised"),
        ("**Neutral**", "neutral"),
        ("The speaker sounds sad.", "sad"),
        ("Label: Fearful", "fearful"),
        ("The speaker is happy, clearly happy.", "happy"),  # one label, said twice
        ("I cannot tell.", None),
        ("", None),
        (None, None),
        ("neutral or sad", None),  # two labels: ambiguous
        ("Calm", None),  # not one of the 7
        ("sadder", None),  # whole words only
    ],
)
def test_parse_emotion_label(reply, label):
    assert parse_emotion_label(reply) == label


PAPER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "000_26edabeaeb4e5b1b.txt"


def papers_prompt() -> str:
    """The uniform LLM prompt as printed in the paper (section 5), typography and line breaks undone."""
    if not PAPER.is_file():
        pytest.skip("the paper's text is not under ../shared/reference")
    found = re.search(r'PROMPT = "(.*?)"', PAPER.read_text(), re.S)
    assert found, "no PROMPT in the paper's text"
    return " ".join(found.group(1).replace("\u2019", "'").split())


def test_prompt_is_the_papers(ravdess_clips):
    wave = load_audio(ravdess_clips[0])
    with ScriptedChatServer({len(wave): ["Sad"]}) as server:
        llm = load(f"llm:m@{server.url}", backoff=0.01)
        llm.predict_waveforms([wave])
    (request,) = server.requests
    sent = request["body"]["messages"][0]["content"][0]["text"]
    assert sent == papers_prompt()
    # the reply vocabulary it offers is serval's 7 classes, in checkpoint order
    offered = sent.split("from:", 1)[1].rstrip(".").split(",")
    assert [c.strip().lower() for c in offered] == list(EMOTIONS)
    assert llm.details == [{"reply": "Sad", "label": "sad"}]


# ----------------------------------------------------------------------------- the LLM adapter


class ScriptedChatServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 answering by the clip's length."""

    def __init__(self, replies: dict[int, list]):
        self.replies = replies  # n_samples -> list of replies (str, or an int HTTP status), one per request
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                audio = body["messages"][0]["content"][1]["input_audio"]
                wave, sr = sf.read(io.BytesIO(base64.b64decode(audio["data"])), dtype="float32")
                with server.lock:
                    server.requests.append(
                        {
                            "path": self.path,
                            "auth": self.headers.get("Authorization"),
                            "body": body,
                            "wave": wave,
                            "sr": sr,
                        }
                    )
                    script = server.replies.get(len(wave), ["no script for this clip"])
                    reply = script.pop(0) if len(script) > 1 else script[0]
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted failure"}')
                    return
                data = json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, n_samples: int) -> int:
        return sum(1 for r in self.requests if len(r["wave"]) == n_samples)


def test_llm_adapter_against_loopback_server(tmp_path, ravdess_clips, monkeypatch):
    clips = ravdess_clips[:6]
    waves = [load_audio(p) for p in clips]
    lengths = [len(w) for w in waves]
    assert len(set(lengths)) == len(lengths), "the server tells clips apart by length"
    replies = {
        lengths[0]: ["Angry"],
        lengths[1]: ["The speaker sounds sad."],
        lengths[2]: ["I cannot determine the emotion from this audio."],  # unparseable
        lengths[3]: [503, 500, "Happiness"],  # retried until it answers
        lengths[4]: ["neutral, or maybe sad"],  # unparseable: two labels
        lengths[5]: [500],  # always failing: a failed request, not an unparseable reply
    }
    rows = [ManifestRow(str(p), label="sad", language="en", corpus="ravdess") for p in clips]
    monkeypatch.setenv("SERVAL_LLM_API_KEY", "sk-test")
    with ScriptedChatServer(replies) as server:
        llm = load(f"llm:test-audio-llm@{server.url}", backoff=0.01, max_retries=3, concurrency=3)
        assert isinstance(llm, AudioLLM) and llm.name == "test-audio-llm"
        # corpus_classes="all": with "own", the corpus's only label (sad) would be the only allowed answer
        report = evaluate(
            rows,
            [llm],
            tmp_path / "cache",
            segmentations=["utterance"],
            protocols=["7class"],
            corpus_classes="all",
            bootstrap=0,
        )

        first = server.requests[0]
        assert first["path"] == "/v1/chat/completions"
        assert first["auth"] == "Bearer sk-test"
        assert first["body"]["model"] == "test-audio-llm"
        content = first["body"]["messages"][0]["content"]
        assert content[0] == {"type": "text", "text": PROMPT}
        assert content[1]["type"] == "input_audio" and content[1]["input_audio"]["format"] == "wav"
        # the audio sent is the clip (16 kHz, 16-bit PCM)
        sent = next(r for r in server.requests if len(r["wave"]) == lengths[0])
        assert sent["sr"] == 16000
        assert np.abs(sent["wave"] - waves[0]).max() < 1e-4

        assert server.count(lengths[3]) == 3  # 503, 500, then the answer
        assert server.count(lengths[5]) == 4  # 1 + 3 retries

        model = report["models"][0]
        assert model["unparseable"] == 2
        assert sorted(r["reply"] for r in model["unparseable_replies"]) == [
            "I cannot determine the emotion from this audio.",
            "neutral, or maybe sad",
        ]
        assert model["failed_requests"] == 1
        assert "gave up after 4 attempts" in model["request_errors"][0]["error"]
        overall = report["results"]["utterance"]["7class"]["test-audio-llm"]["overall"]
        # all six are scored (none dropped): the three without an answer count as wrong
        assert overall["n"] == 6 and overall["no_answer"] == 3
        assert overall["confusion"][EMOTIONS.index("sad")] == [0, 1, 1, 1, 0, 0, 0]
        assert overall["recall"]["sad"] == pytest.approx(1 / 6)

        # a re-run uses the cache for every answered clip (unparseable ones too) and asks again
        # only for the failed request
        before = len(server.requests)
        again = load(f"llm:test-audio-llm@{server.url}", backoff=0.01, max_retries=0)
        evaluate(
            rows, [again], tmp_path / "cache", segmentations=["utterance"], protocols=["7class"], bootstrap=0
        )
        assert len(server.requests) == before + 1
        assert server.requests[-1]["wave"].shape[0] == lengths[5]


def test_llm_client_errors_are_not_retried(ravdess_clips):
    wave = load_audio(ravdess_clips[0])
    with ScriptedChatServer({len(wave): [401]}) as server:
        llm = AudioLLM("m", server.url, api_key="bad", backoff=0.01)
        probs, scores = llm.predict_waveforms([wave])
        assert server.count(len(wave)) == 1
    assert probs.sum() == 0 and np.isnan(scores).all()
    assert "HTTP 401" in llm.details[0]["error"]


def test_llm_unreachable_server_is_a_failed_request(ravdess_clips):
    with ScriptedChatServer({}) as server:
        url = server.url  # the port is closed once the server is gone
    llm = AudioLLM("m", url, backoff=0.01, max_retries=1, timeout=2)
    probs, _ = llm.predict_waveforms([load_audio(ravdess_clips[0])])
    assert probs.sum() == 0 and "gave up after 2 attempts" in llm.details[0]["error"]


def test_bad_llm_spec():
    with pytest.raises(ValueError, match="llm:MODEL@BASE_URL"):
        load("llm:no-url")


# ----------------------------------------------------------------------------- emotion2vec

FUNASR_LABELS = [
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    "<unk>",
]


def test_emotion2vec_label_mapping_by_hand():
    scores = [0.1, 0.0, 0.0, 0.2, 0.1, 0.4, 0.1, 0.0, 0.1]  # other .4 and unknown .1 dropped
    p = emotion2vec_probabilities(FUNASR_LABELS, scores)
    expected = {"angry": 0.2, "happy": 0.4, "neutral": 0.2, "sad": 0.2}
    assert p == pytest.approx([expected.get(c, 0.0) for c in EMOTIONS])
    # "other" winning does not decide the label: the best of the 7 does
    assert EMOTIONS[int(np.argmax(p))] == "happy"
    assert emotion2vec_probabilities(FUNASR_LABELS, [0, 0, 0, 0, 0, 0.7, 0, 0, 0.3]).sum() == 0  # no answer
    with pytest.raises(ValueError, match="bored"):
        emotion2vec_probabilities(["bored"], [1.0])


def test_emotion2vec_without_funasr_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "funasr", None)  # import funasr -> ImportError
    with pytest.raises(ImportError, match=r"pip install serval\[funasr\]"):
        load("emotion2vec:large")


def test_emotion2vec_adapter_with_funasr_stand_in(monkeypatch, ravdess_clips):
    calls = {}

    class AutoModel:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def generate(self, wave, **kwargs):
            calls.setdefault("inputs", []).append((wave, kwargs))
            long = len(wave) > 3.5 * 16000  # scripted: long clips angry, short ones "other" then sad
            scores = [0.6, 0, 0, 0, 0.1, 0.2, 0.1, 0, 0] if long else [0, 0, 0, 0, 0.1, 0.6, 0.3, 0, 0]
            return [{"key": "x", "labels": FUNASR_LABELS, "scores": scores}]

    monkeypatch.setitem(sys.modules, "funasr", types.SimpleNamespace(AutoModel=AutoModel))
    system = load("emotion2vec:seed", device="cpu")
    assert isinstance(system, Emotion2Vec) and system.name == "emotion2vec-seed"
    assert calls["init"]["model"] == "emotion2vec/emotion2vec_plus_seed" and calls["init"]["hub"] == "hf"
    waves = [load_audio(p) for p in ravdess_clips[:4]]
    probs, scores = system.predict_waveforms(waves)
    assert np.isnan(scores).all()  # no dimensional head
    for w, p in zip(waves, probs):
        assert EMOTIONS[int(np.argmax(p))] == ("angry" if len(w) > 3.5 * 16000 else "sad")
        assert p.sum() == pytest.approx(1.0)
    assert all(
        np.array_equal(x, w) and k["granularity"] == "utterance" for (x, k), w in zip(calls["inputs"], waves)
    )
    with pytest.raises(ValueError, match="large, base, seed"):
        load("emotion2vec:huge")


# ----------------------------------------------------------------------------- MERaLiON-SER-v1


@pytest.mark.slow
def test_meralion_checkpoint_through_the_importer(tmp_path, ravdess_clips):
    torch.manual_seed(3)
    source = SERModel(SERConfig.tiny()).eval()
    ckpt = tmp_path / "meralion"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(
        json.dumps({"model_type": "ser_whisper_ecapa", "encoder_attention_heads": 2})
    )
    system = load(f"meralion:{ckpt}", device="cpu")
    assert isinstance(system, Predictor) and system.name == "MERaLiON-SER-v1"
    waves = [load_audio(ravdess_clips[0])]  # one clip: every pass is a padded 30 s one
    source.config.pad_to_30s = True  # the published behaviour the importer keeps
    expected_probs, expected_scores = Predictor(source, "cpu").predict_waveforms(waves)
    probs, scores = system.predict_waveforms(waves)
    assert np.allclose(probs, expected_probs, atol=1e-5)
    # the evaluation reads outputs by name: the checkpoint's (valence, arousal, dominance) order
    # is put back into (arousal, valence, dominance)
    rows = [ManifestRow(str(ravdess_clips[0]), label="sad")]
    predictions, failures = predict_all(rows_to_units(rows), [system], ["m"], tmp_path / "cache")
    assert not failures
    got = predictions[0][(str(ravdess_clips[0]), None, None)]["scores"][None]
    order = [list(system.dimensions).index(d) for d in ("arousal", "valence", "dominance")]
    assert np.allclose(got, scores[:, order], atol=1e-6)
    # same weights, same raw outputs; only the names of the columns differ
    assert np.allclose(scores, expected_scores, atol=1e-5)
    assert system.dimensions == ("valence", "arousal", "dominance") and not np.allclose(
        got, scores, atol=1e-6
    )
    with pytest.raises(FileNotFoundError, match="no such MERaLiON-SER checkpoint"):
        load(f"meralion:{tmp_path / 'absent'}")


def rows_to_units(rows):
    from serval.eval_segments import make_units

    return make_units(rows, "utterance")


def test_model_fingerprint_follows_the_weights(tmp_path):
    torch.manual_seed(0)
    path = save_model(SERModel(SERConfig.tiny()), tmp_path / "m")
    a = load(str(path), device="cpu").fingerprint
    assert load(str(path), device="cpu").fingerprint == a
    torch.manual_seed(1)
    save_model(SERModel(SERConfig.tiny()), path)  # retrained in place
    assert load(str(path), device="cpu").fingerprint != a
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load(str(Path(tmp_path) / "nothing"))
