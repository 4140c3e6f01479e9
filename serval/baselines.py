"""Other systems as predictors, so `serval eval` can score them on the same manifests.

Every system here is a `serval.predictor.Predictor`: `name`, `classes`, `dimensions`,
`predict_waveforms(waves, batch_size) -> (probs [N, 7], scores [N, 3])`, `predict` (records, from
`serval.api.AudioClassifier`) and a `fingerprint` (it keys the prediction cache); and, after each
call, `details`: one dict per input (e.g. an LLM's raw reply), or None.

Conventions that keep the scoring honest:
- a row of all-zero probabilities means "no answer" (an unparseable LLM reply, a failed
  request); it is scored as wrong, never dropped;
- a system without a dimensional head returns NaN scores, and is left out of CCC tables;
- a record of "no answer" has the label null (all its probabilities 0), never a guessed class;
- a `details` entry with an "error" key is a transient failure: it is scored as no answer
  but not cached, so a re-run asks again.

Specs (`emotion2vec:large|base|seed|DIR`, `llm:MODEL@BASE_URL`, and serval's own) are resolved
by `serval.inference.load`, the one resolver; MERaLiON-SER-v1 is imported by `serval.meralion`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from serval.api import AudioClassifier
from serval.audio import at_model_rate
from serval.audio import check_finite as check_wave
from serval.fingerprint import fingerprint
from serval.vocab import DIMENSIONS, EMOTIONS, SAMPLE_RATE

# The paper's uniform prompt for every audio LLM (section 5).
PROMPT = (
    "Determine the speaker's emotion in the given audio. "
    "Reply with a single label from: Neutral, Happy, Sad, Angry, Fearful, Disgusted, Surprised."
)


class Baseline(AudioClassifier):
    """What the baselines share: `predict` and `__call__` over their own `predict_waveforms`."""

    classes = EMOTIONS
    dimensions = DIMENSIONS
    trained_dimensions: tuple[str, ...] = ()  # no dimensional head: its scores are NaN, records null

    def record(
        self, probs: np.ndarray, scores: np.ndarray, keep: Sequence[int] | None = None, **speech
    ) -> dict:
        """As every predictor's record, but "no answer" (all-zero probabilities) has the label None."""
        body = super().record(probs, scores, keep, **speech)
        if not np.any(np.asarray(probs)):
            body["label"] = None
        return body

    def predict_waveforms(
        self,
        waves: Sequence[np.ndarray],
        batch_size: int = 16,
        progress: bool = False,
        *,
        check_finite: bool = True,
        sampling_rate: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Waveforms (16 kHz, or `sampling_rate`) -> (probs [N, 7], NaN scores [N, 3]); no dimensional head."""
        waves = _at_16k(waves, sampling_rate, check_finite)
        return self.probabilities(waves), np.full((len(waves), len(DIMENSIONS)), np.nan, np.float32)

    def probabilities(self, waves: list[np.ndarray]) -> np.ndarray:
        """The class probabilities [N, 7] of 16 kHz waveforms (all zero: no answer)."""
        raise NotImplementedError


def _at_16k(waves: Sequence[np.ndarray], sampling_rate: int | None, check_finite: bool) -> list[np.ndarray]:
    """The waves as float32 at 16 kHz, each checked finite unless the caller did already."""
    out = [at_model_rate(np.asarray(w, np.float32).reshape(-1), sampling_rate) for w in waves]
    if check_finite:
        for w in out:
            check_wave(w, "<array>")
    return out


# ----------------------------------------------------------------------------- emotion2vec

EMOTION2VEC_MODELS = {
    "large": "emotion2vec/emotion2vec_plus_large",
    "base": "emotion2vec/emotion2vec_plus_base",
    "seed": "emotion2vec/emotion2vec_plus_seed",
}
# emotion2vec's 9 labels; "other" and "unknown" have no counterpart among the 7.
EMOTION2VEC_TO_SERVAL = {
    "angry": "angry",
    "disgusted": "disgusted",
    "fearful": "fearful",
    "happy": "happy",
    "neutral": "neutral",
    "sad": "sad",
    "surprised": "surprised",
    "other": None,
    "unknown": None,
}


def emotion2vec_probabilities(labels: Sequence[str], scores: Sequence[float]) -> np.ndarray:
    """emotion2vec's 9 scores -> probabilities over the 7 classes (EMOTIONS order).

    FunASR labels look like "生气/angry" or "<unk>"; "other" and "unknown" are dropped and the
    7 remaining scores renormalised, so the argmax is the best of the 7. All-zero means no answer.
    """
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    probs = np.zeros(len(EMOTIONS), np.float64)
    for label, score in zip(labels, scores):
        name = str(label).rsplit("/", 1)[-1].strip().lower()
        name = "unknown" if name in ("<unk>", "unk", "") else name
        if name not in EMOTION2VEC_TO_SERVAL:
            raise ValueError(f"unexpected emotion2vec label {label!r}")
        target = EMOTION2VEC_TO_SERVAL[name]
        if target is not None:
            probs[EMOTIONS.index(target)] += max(float(score), 0.0)
    total = probs.sum()
    return (probs / total if total > 0 else probs).astype(np.float32)


class Emotion2Vec(Baseline):
    """emotion2vec+ (large, base or seed) through FunASR, mapped onto the 7 classes."""

    def __init__(self, variant: str, device: str | None = None, hub: str = "hf"):
        try:
            from funasr import AutoModel
        except ImportError as e:
            raise ImportError(
                "emotion2vec baselines need FunASR, which is not installed: pip install serval[funasr]"
            ) from e
        if variant in EMOTION2VEC_MODELS:
            model_id = EMOTION2VEC_MODELS[variant]
            if hub in ("ms", "modelscope"):
                model_id = model_id.replace("emotion2vec/", "iic/")
            self.name = f"emotion2vec-{variant}"
        elif Path(variant).is_dir():
            model_id, hub = variant, None
            self.name = f"emotion2vec ({Path(variant).name})"
        else:
            raise ValueError(
                f"emotion2vec:{variant}: choose large, base, seed or a local FunASR model directory"
            )
        kwargs = {"model": model_id, "disable_update": True}
        if hub:
            kwargs["hub"] = hub
        if device and device != "auto":
            kwargs["device"] = device
        self.model = AutoModel(**kwargs)
        self.fingerprint = fingerprint([f"emotion2vec\n{model_id}"])
        self.details = None

    def probabilities(self, waves: list[np.ndarray]) -> np.ndarray:
        """The 7 class probabilities [N, 7] of 16 kHz waveforms, one FunASR call each."""
        probs = np.zeros((len(waves), len(EMOTIONS)), np.float32)
        for i, wave in enumerate(waves):
            result = self.model.generate(
                np.asarray(wave, np.float32),
                granularity="utterance",
                extract_embedding=False,
                disable_pbar=True,
            )[0]
            probs[i] = emotion2vec_probabilities(result["labels"], result["scores"])
        return probs


# ----------------------------------------------------------------------------- audio LLMs

# Reply words -> class; matched as whole words, case-insensitively.
LABEL_WORDS = {
    "neutral": ("neutral", "neutrality"),
    "happy": ("happy", "happiness", "joy", "joyful", "glad"),
    "sad": ("sad", "sadness", "unhappy"),
    "angry": ("angry", "anger", "mad", "furious"),
    "fearful": ("fearful", "fear", "afraid", "scared", "frightened"),
    "disgusted": ("disgusted", "disgust", "disgusting"),
    "surprised": ("surprised", "surprise", "surprising"),
}
_WORD = {w: label for label, words in LABEL_WORDS.items() for w in words}
_WORD_RE = re.compile(r"[a-z]+")


def parse_emotion_label(reply: str | None) -> str | None:
    """The one class a reply names ("Anger.", "The speaker sounds sad"), or None if it names none or several."""
    if not reply:
        return None
    found = {_WORD[w] for w in _WORD_RE.findall(reply.lower()) if w in _WORD}
    return found.pop() if len(found) == 1 else None


def wav_base64(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
    """A waveform as a base64 16-bit PCM WAV file."""
    buf = io.BytesIO()
    sf.write(
        buf, np.clip(np.asarray(wave, np.float32), -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16"
    )
    return base64.b64encode(buf.getvalue()).decode("ascii")


class LLMRequestError(RuntimeError):
    pass


class AudioLLM(Baseline):
    """Any audio LLM behind an OpenAI-compatible chat-completions API, asked the paper's prompt.

    The API key comes from the environment (`api_key_env`, default SERVAL_LLM_API_KEY, then
    OPENAI_API_KEY). 5xx, 429, timeouts and connection errors are retried with exponential
    backoff; a reply naming no single class is kept as "unparseable" in `details`.
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        prompt: str = PROMPT,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        concurrency: int = 4,
        max_tokens: int = 32,
    ):
        self.model, self.base_url, self.prompt = model, base_url.rstrip("/"), prompt
        env_names = [api_key_env] if api_key_env else ["SERVAL_LLM_API_KEY", "OPENAI_API_KEY"]
        self.api_key = api_key or next((os.environ[n] for n in env_names if os.environ.get(n)), None)
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.concurrency, self.max_tokens = max(1, concurrency), max_tokens
        self.name = model
        self.fingerprint = fingerprint([f"llm\n{model}\n{self.base_url}\n{prompt}"])
        self.details = None

    def request_body(self, wave: np.ndarray) -> dict:
        """The chat-completions request for one clip: the prompt and the audio as base64 WAV."""
        return {
            "model": self.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.prompt},
                        {"type": "input_audio", "input_audio": {"data": wav_base64(wave), "format": "wav"}},
                    ],
                }
            ],
        }

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                # exponential backoff with jitter, so parallel workers do not retry in lockstep
                time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random() / 2))
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                last = f"HTTP {e.code}: {detail}"
                if e.code < 500 and e.code != 429:
                    raise LLMRequestError(f"{url}: {last}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                raise LLMRequestError(f"{url}: reply is not JSON ({e})") from e
        raise LLMRequestError(f"{url}: gave up after {self.max_retries + 1} attempts; last: {last}")

    def ask(self, wave: np.ndarray) -> dict:
        """One clip -> {"reply", "label"} (label None if unparseable) or {"error"} if the request failed."""
        try:
            response = self._post(self.request_body(wave))
            reply = response["choices"][0]["message"]["content"]
        except LLMRequestError as e:
            return {"error": str(e)}
        except (KeyError, IndexError, TypeError) as e:
            return {"error": f"malformed response ({type(e).__name__}: {e})"}
        if isinstance(reply, list):  # some servers answer with content parts
            reply = " ".join(p.get("text", "") for p in reply if isinstance(p, dict))
        reply = reply if isinstance(reply, str) else ""
        return {"reply": reply, "label": parse_emotion_label(reply)}

    def probabilities(self, waves: list[np.ndarray]) -> np.ndarray:
        """One request per clip (in parallel) -> one-hot probabilities [N, 7]; `details` per clip."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            details = list(pool.map(self.ask, waves))
        probs = np.zeros((len(waves), len(EMOTIONS)), np.float32)
        for i, d in enumerate(details):
            if d.get("label"):
                probs[i, EMOTIONS.index(d["label"])] = 1.0
        self.details = details
        return probs
