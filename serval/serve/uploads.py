"""Reading an upload: its content type, a size-limited body, the audio file in a multipart form,
and the audio's duration checked from its header before anything is decoded.

The API takes audio bytes only, never a path: no request can make the server read a file from
its disk. A body larger than `SPOOL_BYTES` is written, as it arrives, to a temporary file of the
server's own (`Upload`), removed when the request ends, so a long recording is not held in memory.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
from typing import BinaryIO

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect

from serval.audio import AudioError, EmptyAudioError, audio_info, load_audio, sniff_format
from serval.serve.errors import ApiError, audio_error

AUDIO_TYPES = ("audio/", "application/ogg")  # declared audio: decoded as it is
# what a client sends when it does not say (`curl --data-binary` sends a form type by default): the
# bytes themselves must show that they are audio
GENERIC_TYPES = ("", "application/octet-stream", "application/x-www-form-urlencoded")


SPOOL_BYTES = 2**20  # a body up to this size stays in memory; a larger one goes to a temporary file


class Upload:
    """A request body: in memory up to `spool` bytes, beyond that in a temporary file in the system's
    temp dir (`TMPDIR`), removed by `close` (`with upload:` closes it, on errors and cancellation too)."""

    def __init__(self, spool: int | None = None):
        self.spool, self.size = SPOOL_BYTES if spool is None else spool, 0
        self.path: str | None = None  # the temporary file, once the body outgrew `spool`
        self._sink: BinaryIO | None = io.BytesIO()
        self._data = b""

    def write(self, chunk: bytes) -> None:
        if self.path is None and self.size + len(chunk) > self.spool:
            fd, self.path = tempfile.mkstemp(prefix="serval-upload-")
            held, self._sink = self._sink, os.fdopen(fd, "wb")
            self._sink.write(held.getbuffer())
        self._sink.write(chunk)
        self.size += len(chunk)

    def finish(self) -> Upload:
        """Done writing: the body can now be read (`source`, `open`)."""
        if self._sink is not None:
            if self.path is None:
                self._data = self._sink.getvalue()  # no copy: the buffer is handed over
            self._sink.close()
            self._sink = None
        return self

    @property
    def source(self) -> bytes | str:
        """What `serval.audio` reads: the bytes, or the temporary file's path (each reading opens its own)."""
        return self._data if self.path is None else self.path

    def open(self, name: str) -> BinaryIO:
        """A new reader of the body, its `name` set to `name` (for error messages)."""
        fh = io.BytesIO(self._data) if self.path is None else io.FileIO(self.path)
        fh.name = name
        return fh if self.path is None else io.BufferedReader(fh)

    def head(self, n: int = 16) -> bytes:
        with self.open("") as fh:
            return fh.read(n)

    def close(self) -> None:
        """Drop the body: the temporary file is removed (readers still open keep reading, on POSIX)."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self._data = b""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _declares_audio(mime: str) -> bool:
    return any(mime == t or (t.endswith("/") and mime.startswith(t)) for t in AUDIO_TYPES)


async def read_upload(
    request: Request,
    filename: str | None,
    limit: int,
    timeout: float = 10.0,
    min_rate: float = 0.0,
    note: str = "",
) -> tuple[Upload, str]:
    """The uploaded audio (an `Upload`; the caller closes it) and its name: a raw audio body or the
    'file' of a multipart form.

    A body over `limit` bytes is a 413 (its message ends with `note`); one that stalls (see
    `read_limited`) a 408; one with a generic or no content type whose bytes are not audio (see
    `recognise`) a 415.
    """
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (_declares_audio(mime) or mime in GENERIC_TYPES or mime == "multipart/form-data"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {mime!r} is not audio; send the file's bytes as audio/*, "
            "application/octet-stream or with no content type, or as the 'file' field of multipart/form-data",
        )
    body = await read_limited(request, limit, timeout, min_rate, note)
    try:
        if mime == "multipart/form-data":
            with body:
                body, name, mime = await _multipart_file(request, body)
            name = filename or name or "upload"
        else:
            name = filename or "upload"
        if mime in GENERIC_TYPES:
            await recognise(body, name, mime)
    except BaseException:
        body.close()
        raise
    return body, name


async def recognise(data: Upload, name: str, mime: str) -> None:
    """415 unless `data`, sent with a generic content type `mime` (or none), is audio: its first bytes
    are a RIFF/WAVE, fLaC, OggS, ID3, FORM or MPEG frame header, or libsndfile reads it.

    Bytes that announce audio pass even when broken, so their decoding error (422) says what is wrong.
    """
    head = data.head()
    if not head or sniff_format(head) is not None:
        return
    try:
        await asyncio.to_thread(audio_info, data.source, name=name)
    except EmptyAudioError:
        return
    except AudioError as e:
        declared = f"content type {mime!r}" if mime else "no content type"
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{name}: sent with {declared}, and its bytes are not audio: they begin {head[:8]!r}, not a "
            f"RIFF/WAVE, fLaC, OggS, ID3 or MP3 frame header, and libsndfile says: {e.cause}",
        ) from None


async def _multipart_file(request: Request, body: Upload) -> tuple[Upload, str | None, str]:
    """The multipart form's file (an `Upload`, spooled as the body is), its file name and its own content type."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def chunks():
        with body.open("") as fh:
            while chunk := fh.read(2**16):
                yield chunk

    try:
        form = await MultiPartParser(request.headers, chunks(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise ApiError(400, "invalid_request", f"malformed multipart body: {e.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        if upload is None:
            raise ApiError(400, "invalid_request", "the multipart body has no 'file' field with the audio")
        part = (upload.content_type or "").split(";")[0].strip().lower()
        if not (_declares_audio(part) or part in GENERIC_TYPES):
            raise ApiError(
                415, "unsupported_media_type", f"the uploaded file's content type {part!r} is not audio"
            )
        data = Upload(body.spool)
        try:
            while chunk := await upload.read(2**16):
                data.write(chunk)
        except BaseException:
            data.close()
            raise
        return data.finish(), upload.filename, part
    finally:
        await form.close()


async def read_limited(
    request: Request, limit: int, timeout: float = 10.0, min_rate: float = 0.0, note: str = ""
) -> Upload:
    """The request body (an `Upload`: beyond `SPOOL_BYTES`, in a temporary file), or 413 once it
    passes `limit` bytes (the rest is drained, not stored).

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
    body = Upload()
    try:
        return await _receive(request, body, limit, timeout, min_rate, too_big)
    except BaseException:  # a refusal, a stall, a client gone or a cancelled request: the file goes too
        body.close()
        raise


async def _receive(
    request: Request, body: Upload, limit: int, timeout: float, min_rate: float, too_big: ApiError
) -> Upload:
    loop = asyncio.get_running_loop()
    start = loop.time()
    stream = request.stream().__aiter__()
    while True:
        wait = timeout
        if min_rate > 0:  # the time by which the bytes so far would be too slow an average
            wait = min(wait, start + timeout + body.size / min_rate - loop.time())
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
                f"the upload stalled: {body.size} bytes in {loop.time() - start:.1f} s (the server needs "
                f"data at least every {timeout:g} s and {min_rate / 1024:g} KiB/s on average)",
                {"Connection": "close"},
            ) from None
        if body.size + len(chunk) > limit:
            await _drain(request, limit, timeout)
            raise too_big
        body.write(chunk)
    return body.finish()


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
    data: bytes | str, name: str, max_seconds: float, min_seconds: float = 0.0, note: str = ""
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


async def decode(data: bytes | str, name: str, max_seconds: float) -> np.ndarray:
    """The audio as 16 kHz samples, refused (413) from its header alone when longer than `max_seconds`."""
    await check_audio(data, name, max_seconds)
    try:
        return await asyncio.to_thread(load_audio, data, name=name)
    except AudioError as e:
        raise audio_error(e) from None
