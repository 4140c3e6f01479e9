"""The HTTP and WebSocket endpoints: module-level handlers on one `APIRouter`.

Each handler reads the served model, limits and metrics from `app.state.service` (a `Service`),
so the router holds no state and a new endpoint is one more function here (or its own router
beside this one, included in `app.create_app`).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import BinaryIO, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse

from serval import __version__, vocab
from serval.audio import AudioError
from serval.longform import LongAudio, count_pieces, speech_of
from serval.serve.batching import ClientGoneError, QueueFullError
from serval.serve.errors import ApiError, audio_error
from serval.serve.schemas import (
    ERROR_RESPONSES,
    HEALTH_RESPONSES,
    TIMELINE_RESPONSE,
    UPLOAD_BODY,
    EmotionRecord,
    ModelInfo,
)
from serval.serve.service import Service
from serval.serve.streaming import stream_session
from serval.serve.uploads import check_audio, read_upload
from serval.timeline import grid_timeline
from serval.vad import speech_fields
from serval.windows import WindowResult, WindowSpec, pool

router = APIRouter()
T = TypeVar("T")


async def get_service(request: Request) -> Service:
    """The app's `Service` (a dependency of every handler)."""
    return request.app.state.service


def class_subset(text: str | None, classes) -> list[int] | None:
    """`"neutral,angry"` -> indices into `classes`; None keeps all; unknown names are a 400."""
    names = [c.strip() for c in (text or "").split(",") if c.strip()]
    try:
        return vocab.class_subset(names, classes)
    except vocab.UnknownClassesError as e:
        raise ApiError(400, "invalid_request", str(e)) from None


@router.post(
    "/v1/emotion",
    response_model=EmotionRecord,
    responses=ERROR_RESPONSES,
    openapi_extra=UPLOAD_BODY,
    summary="Emotion of one audio clip",
)
async def emotion(
    request: Request,
    classes: str | None = Query(None, description="comma-separated subset, renormalised"),
    filename: str | None = Query(None, description="name for the record (raw uploads)"),
    service: Service = Depends(get_service),
):
    """The same record as `serval predict`: label (null without speech), class probabilities,
    dimensional scores, speech_fraction and no_speech."""
    cfg, predictor = service.config, service.predictor
    keep = class_subset(classes, predictor.classes)
    with service.receiving_body():  # admitted by the `shed` middleware before this ran
        upload, name = await read_upload(
            request, filename, cfg.max_upload_bytes, cfg.upload_timeout, cfg.min_upload_rate, cfg.limit_note
        )
    with upload:  # a spooled body's file is removed when the answer is known, or on an error
        probs, scores, fraction, samples = await _score_clip(request, service, upload.source, name)
    return {
        "file": name,
        "duration": round(samples / vocab.SAMPLE_RATE, 3),
        "pieces": count_pieces(samples),
        **vocab.label_body(
            probs[0],
            scores[0],
            predictor.classes,
            predictor.dimensions,
            keep,
            trained=vocab.trained_dimensions(predictor),
            speech=speech_fields(fraction),
            label_no_speech=cfg.label_no_speech,
        ),
    }


async def _score_clip(request: Request, service: Service, data: bytes | str, name: str) -> tuple:
    """(probabilities, scores, speech fraction, samples) of one /v1/emotion clip."""
    with service.decoding_body():
        wave = await service.clip(data, name)  # a LongAudio beyond one 30 s piece, decoded as it is scored
    # the speech measure runs beside the model; a long clip's streamed a block at a time, as its pieces
    speech = asyncio.get_running_loop().run_in_executor(None, speech_of, wave)
    if isinstance(wave, LongAudio):
        with service.timeline():
            probs, scores = await _in_worker(request, service, functools.partial(service.score_long, wave))
    else:
        probs, scores = await service.score([wave])  # no await between: the clip goes straight in the queue
    try:
        fraction = await speech
    except AudioError as e:  # a long file that breaks part-way through
        raise audio_error(e) from None
    return probs, scores, fraction, len(wave)


def _seconds(description: str, **limits) -> Query:
    return Query(None, gt=0, allow_inf_nan=False, description=description, **limits)


@router.post(
    "/v1/timeline",
    responses={**TIMELINE_RESPONSE, **ERROR_RESPONSES},
    openapi_extra=UPLOAD_BODY,
    summary="Emotion over time",
)
async def timeline(
    request: Request,
    # the defaults are the server's (`serval serve --window/--hop`), so they are filled in per request
    window: float | None = _seconds("window length (s); default: the server's", le=30),
    hop: float | None = _seconds("hop between window starts (s, >= 0.01); default: the server's", le=30),
    max_segment: float | None = _seconds("longest merged segment (s); default: the server's"),
    vad: bool = Query(False, description="leave windows without speech unscored (Silero VAD)"),
    min_speech: float = Query(
        WindowSpec.min_speech,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="speech fraction a window needs (vad)",
    ),
    filename: str | None = Query(None, description="name for the record (raw uploads)"),
    service: Service = Depends(get_service),
):
    """Every window of the grid and the merged segments: the JSON of `serval timeline`."""
    cfg = service.config
    try:
        spec = cfg.window_spec(window, hop, max_segment, vad=vad, min_speech=min_speech)
    except ValueError as e:
        raise ApiError(400, "invalid_request", str(e)) from None
    with service.receiving_body():
        upload, name = await read_upload(
            request, filename, cfg.max_upload_bytes, cfg.upload_timeout, cfg.min_upload_rate, cfg.limit_note
        )
    with upload, service.timeline():  # a spooled body's file is removed when the timeline is done
        limit = cfg.max_timeline_seconds
        duration = await check_audio(upload.source, name, limit, spec.min_length, cfg.limit_note)
        try:
            spec.check_count(duration)
        except ValueError as e:
            raise ApiError(400, "too_many_windows", f"{name}: {e}") from None
        result = await _grid_timeline(request, service, upload.open(name), spec)
    overall = pooled(result["windows"], service.predictor)
    return {**result, "file": name, "duration": round(duration, 3), "overall": overall}


def pooled(windows: list[dict], predictor) -> dict | None:
    """The whole recording's label, probabilities and scores: its scored windows pooled by duration, as a
    stream's summary pools them; None when no window was scored."""
    classes, dims = predictor.classes, predictor.dimensions
    scored = [
        WindowResult(
            w["start"],
            w["end"],
            np.array([w["probabilities"][c] for c in classes], np.float32),
            np.array([np.nan if w["scores"][d] is None else w["scores"][d] for d in dims], np.float32),
        )
        for w in windows
        if w.get("probabilities")
    ]
    if not scored:
        return None
    return vocab.label_body(*pool(scored), classes, dims, trained=vocab.trained_dimensions(predictor))


async def _grid_timeline(request: Request, service: Service, audio: BinaryIO, spec: WindowSpec) -> dict:
    # `audio` (named for error messages) is decoded chunk by chunk, so a long recording never sits in
    # memory as samples

    def work(gone: threading.Event) -> dict:  # its model calls go through the batcher, a batch at a time
        with audio:
            return grid_timeline(audio, service.threaded(gone), spec, batch_size=service.config.max_batch)

    return await _in_worker(request, service, work)


async def _in_worker(request: Request, service: Service, work: Callable[[threading.Event], T]) -> T:
    """`work(gone)` in a timeline thread; `gone` is set when the client disconnects, which stops it."""
    gone = threading.Event()  # set when the client disconnects: its remaining windows are dropped
    watch = asyncio.create_task(_until_disconnected(request, gone))
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(service.timeline_pool, work, gone)
    except ClientGoneError:
        raise ApiError(
            499, "client_closed_request", "the client went away; its request was stopped"
        ) from None
    except QueueFullError:
        raise service.busy() from None
    except AudioError as e:  # a file that breaks part-way through
        raise audio_error(e) from None
    finally:
        watch.cancel()


async def _until_disconnected(request: Request, gone: threading.Event) -> None:
    # the body has been read, so the next message the server has for this request is its disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()


@router.get("/v1/model", response_model=ModelInfo, summary="The served model")
async def model_info(service: Service = Depends(get_service)):
    cfg, predictor = service.config, service.predictor
    config = getattr(predictor, "config", None)
    return {
        "name": predictor.name,
        "classes": list(predictor.classes),
        "dimensions": list(predictor.dimensions),
        "trained_dimensions": list(vocab.trained_dimensions(predictor)),
        "backbone": getattr(config, "backbone", None),
        "version": __version__,
        "limits": {
            "max_upload_mb": cfg.max_upload_mb,
            "max_clip_seconds": cfg.max_clip_seconds,
            "max_timeline_seconds": cfg.max_timeline_seconds,
            "max_stream_seconds": cfg.max_stream_seconds,
            **(
                {"memory_budget": cfg.memory_budget, "max_requests": cfg.max_requests}
                if cfg.memory_budget
                else {}
            ),
        },
        "batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms, "max_queue": cfg.max_queue},
    }


@router.get("/health", responses=HEALTH_RESPONSES, summary="Liveness (the same as /healthz)")
@router.get("/healthz", responses=HEALTH_RESPONSES, summary="Liveness")
async def healthz(service: Service = Depends(get_service)):
    """ok (200) while the model queue runs; unavailable (503) once it has stopped."""
    alive = service.running
    body = {"status": "ok" if alive else "unavailable", "queue": service.depth if alive else 0}
    return JSONResponse(body, status_code=200 if alive else 503)


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def prometheus(service: Service = Depends(get_service)):
    text = service.metrics.render(service.depth)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


@router.websocket("/v1/stream")
async def stream(ws: WebSocket):
    await stream_session(ws, ws.app.state.service)
