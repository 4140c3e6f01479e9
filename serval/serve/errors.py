"""Errors as the API answers them: `{"error": {"type", "message"}}` with an HTTP status.

Every failure, ours or the framework's (validation, unknown path, a bug), goes through
`error_response`, so each is counted in `/metrics` and has the same shape.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serval.audio import AudioError
from serval.serve.metrics import endpoint_of
from serval.serve.schemas import SafeJSONResponse

log = logging.getLogger("serval.server")


class ApiError(Exception):
    """An error answered as `{"error": {"type", "message"}}` with an HTTP status."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


def error_type(e: AudioError) -> str:
    """`TruncatedAudioError` -> "truncated_audio"."""
    if type(e) is AudioError:
        return "invalid_audio"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__.removesuffix("Error")).lower()


def audio_error(e: AudioError) -> ApiError:
    """An audio file that cannot be decoded: 422, typed by its cause."""
    return ApiError(422, error_type(e), str(e))


def busy(max_queue: int, retry_after: int) -> ApiError:
    """The 503 of a full model queue, with its Retry-After."""
    return ApiError(
        503,
        "server_busy",
        f"the model queue is full ({max_queue} requests waiting); retry later",
        {"Retry-After": str(retry_after)},
    )


def error_response(
    request: Request, status: int, type_: str, message: str, headers: dict[str, str] | None = None
) -> SafeJSONResponse:
    """The JSON answer of an error, counted in the app's metrics."""
    request.app.state.metrics.error(endpoint_of(request.url.path), type_)
    return SafeJSONResponse(
        {"error": {"type": type_, "message": message}}, status_code=status, headers=headers
    )


async def api_error(request: Request, e: ApiError) -> SafeJSONResponse:
    return error_response(request, e.status, e.type, e.message, e.headers)


async def validation_error(request: Request, e: RequestValidationError) -> SafeJSONResponse:
    parts = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
    return error_response(request, 400, "invalid_request", "; ".join(parts))


async def http_error(request: Request, e: StarletteHTTPException) -> SafeJSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return error_response(request, e.status_code, kind, str(e.detail), getattr(e, "headers", None))


async def internal_error(request: Request, e: Exception) -> SafeJSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return error_response(request, 500, "internal_error", f"{type(e).__name__}: {e}")


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` in the API's error shape."""
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
