"""The API's response models, the OpenAPI text of its error answers and upload bodies, and the JSON
encoder that never writes a non-finite number."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from serval.serve.records import Probabilities, Scores, Timeline, TrainedDimensions
from serval.vad import LABEL_TEXT, NO_SPEECH_TEXT, SPEECH_FRACTION_TEXT


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class EmotionRecord(BaseModel):
    """`POST /v1/emotion`: the record of `serval predict` for one clip."""

    file: str
    duration: float = Field(description="seconds of audio")
    pieces: int = Field(description="<= 30 s pieces whose outputs the record pools (1 within the window)")
    label: str | None = Field(description=LABEL_TEXT)
    probabilities: dict[str, float] = Field(description="probability of each emotion class")
    scores: Scores
    speech_fraction: float = Field(description=SPEECH_FRACTION_TEXT)
    no_speech: bool = Field(description=NO_SPEECH_TEXT)


class Health(BaseModel):
    """`GET /healthz`: ok (200) while the model queue runs, unavailable (503) once it has stopped."""

    status: Literal["ok", "unavailable"]
    queue: int = Field(description="clips waiting for the model")


class Overall(TypedDict):
    label: str
    probabilities: Probabilities
    scores: Scores


class ServedTimeline(Timeline):
    """The timeline JSON (typed in serval.serve.records, shared with the MCP tool) and the whole upload's
    emotion: its scored windows pooled by duration (null when none was scored)."""

    overall: Overall | None


TIMELINE_RESPONSE = {
    200: {"model": ServedTimeline, "description": "the JSON of `serval timeline`, and `overall`"}
}
HEALTH_RESPONSES = {
    200: {"model": Health, "description": "serving"},
    503: {"model": Health, "description": "the model queue has stopped"},
}


class ModelInfo(BaseModel):
    name: str
    classes: list[str]
    dimensions: list[str]
    trained_dimensions: TrainedDimensions
    backbone: str | None
    version: str
    limits: dict[str, float]
    batching: dict[str, int | float]


# the error answers of the upload endpoints, for the OpenAPI document
ERROR_RESPONSES = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "bad parameters"),
        (413, "upload or audio too large / too long"),
        (415, "not an audio content type"),
        (422, "undecodable or invalid audio"),
        (503, "the model queue is full (see Retry-After)"),
    )
}

# the body is read by hand (size-limited), so FastAPI cannot describe it: say what it takes
_BINARY = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "audio/*": _BINARY,
            "application/octet-stream": _BINARY,
        },
    }
}


def finite(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) replaced by None, which JSON can carry."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(content: Any) -> str:
    """Strict JSON of `content`: a NaN or inf anywhere becomes null rather than invalid JSON or a 500."""
    try:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # "Out of range float values are not JSON compliant"
        return json.dumps(finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class SafeJSONResponse(JSONResponse):
    """The app's JSON responses, rendered with `dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")
