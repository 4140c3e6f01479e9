"""The API's response models and the OpenAPI text of its error answers and upload bodies."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class EmotionRecord(BaseModel):
    file: str
    duration: float
    label: str
    probabilities: dict[str, float]
    scores: dict[str, float]


class ModelInfo(BaseModel):
    name: str
    classes: list[str]
    dimensions: list[str]
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
