"""Reading an upload: its content type, a size-limited body, the audio file in a multipart form,
and the audio's duration checked from its header before anything is decoded.

The API takes audio bytes only, never a path: no request can make the server read a file from
its disk.
"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect

from serval.audio import AudioError, audio_info, load_audio
from serval.serve.errors import ApiError, audio_error

ACCEPTED_TYPES = ("audio/", "application/octet-stream", "application/ogg", "multipart/form-data")


async def read_upload(
    request: Request,
    filename: str | None,
    limit: int,
    timeout: float = 10.0,
    min_rate: float = 0.0,
    note: str = "",
) -> tuple[bytes, str]:
    """The uploaded audio's bytes and its name: a raw audio body or the 'file' of a multipart form.

    A body over `limit` bytes is a 413 (its message ends with `note`); one that stalls (see
    `read_limited`) a 408.
    """
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not mime or not any(mime == t or (t.endswith("/") and mime.startswith(t)) for t in ACCEPTED_TYPES):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {mime or '(none)'!r} is not audio; send the file's bytes as audio/* or "
            "application/octet-stream, or as the 'file' field of multipart/form-data",
        )
    body = await read_limited(request, limit, timeout, min_rate, note)
    if mime != "multipart/form-data":
        return body, filename or "upload"
    data, name = await _multipart_file(request, body)
    return data, filename or name or "upload"


async def _multipart_file(request: Request, body: bytes) -> tuple[bytes, str | None]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def chunks():
        yield body

    try:
        form = await MultiPartParser(request.headers, chunks(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise ApiError(400, "invalid_request", f"malformed multipart body: {e.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
    if upload is None:
        raise ApiError(400, "invalid_request", "the multipart body has no 'file' field with the audio")
    part = (upload.content_type or "").split(";")[0].strip().lower()
    if part and not (part.startswith("audio/") or part in ("application/octet-stream", "application/ogg")):
        raise ApiError(
            415, "unsupported_media_type", f"the uploaded file's content type {part!r} is not audio"
        )
    data = await upload.read()
    await upload.close()
    return data, upload.filename


async def read_limited(
    request: Request, limit: int, timeout: float = 10.0, min_rate: float = 0.0, note: str = ""
) -> bytes:
    """The request body, or 413 once it passes `limit` bytes (the rest is drained, not stored).

    408 when no bytes come for `timeout` seconds, or when after the first `timeout` seconds the body
    arrives slower than `min_rate` bytes/s on average: a stalled upload cannot hold its
    connection (and its memory) for long.
    """
    declared = request.headers.get("content-length", "")
    too_big = ApiError(
        413, "upload_too_large", f"the upload is larger than the server's limit of {limit} bytes{note}"
    )
    if declared.isdigit() and int(declared) > limit:
        await _drain(request, limit, timeout)
        raise too_big
    loop = asyncio.get_running_loop()
    start, chunks, size = loop.time(), [], 0
    stream = request.stream().__aiter__()
    while True:
        wait = timeout
        if min_rate > 0:  # the time by which `size` bytes would be too slow an average
            wait = min(wait, start + timeout + size / min_rate - loop.time())
        try:
            chunk = await asyncio.wait_for(anext(stream), max(wait, 0.0))
        except StopAsyncIteration:
            break
        except ClientDisconnect:  # the client gave up mid-upload: nobody to answer, nothing to log
            raise ApiError(499, "client_closed_request", "the client went away during the upload") from None
        except TimeoutError:
            raise ApiError(
                408,
                "upload_timeout",
                f"the upload stalled: {size} bytes in {loop.time() - start:.1f} s (the server needs "
                f"data at least every {timeout:g} s and {min_rate / 1024:g} KiB/s on average)",
                {"Connection": "close"},
            ) from None
        size += len(chunk)
        if size > limit:
            await _drain(request, limit, timeout)
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, limit: int, timeout: float) -> None:
    # Reading (and dropping) a moderately oversized body lets the client see the 413 instead of a
    # reset connection; past 4x the limit, or a stall of `timeout`, the connection is simply
    # closed after the answer.
    seen = 0
    try:
        stream = request.stream().__aiter__()
        while seen <= 4 * limit:
            seen += len(await asyncio.wait_for(anext(stream), timeout))
    except Exception:  # the end, a stall, the client gone, or the stream already consumed
        pass


async def check_audio(
    data: bytes, name: str, max_seconds: float, min_seconds: float = 0.0, note: str = ""
) -> float:
    """The audio's duration from its header; 413 when longer than `max_seconds` (the message ends
    with `note`), 422 when not audio."""
    try:
        info = await asyncio.to_thread(audio_info, data, name=name)
    except AudioError as e:
        raise audio_error(e) from None
    if info.duration > max_seconds + 1e-3:
        raise ApiError(
            413,
            "audio_too_long",
            f"{name}: {info.duration:.1f} s of audio; this endpoint takes at most {max_seconds:g} s{note}",
        )
    if info.duration < min_seconds:
        raise ApiError(
            422,
            "audio_too_short",
            f"{name}: {info.duration:.3f} s of audio is shorter than one window ({min_seconds:g} s)",
        )
    return info.duration


async def decode(data: bytes, name: str, max_seconds: float) -> np.ndarray:
    """The audio as 16 kHz samples, refused (413) from its header alone when longer than `max_seconds`."""
    await check_audio(data, name, max_seconds)
    try:
        return await asyncio.to_thread(load_audio, data, name=name)
    except AudioError as e:
        raise audio_error(e) from None
