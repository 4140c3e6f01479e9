"""`serval mcp`: serval as a tool for agents, over the Model Context Protocol (stdio transport).

Two tools, both returning structured records: `recognize_emotion` (the record of
`serval predict` for one clip) and `emotion_timeline` (the JSON of `serval timeline`). Audio is
given as a local path or as base64 bytes. The server runs on the user's machine for the user's
agent, so it may read local files, but only regular files under the folder it was started in
(`--root DIR` adds folders); a path outside gets the same answer whether or not it exists, so an
agent cannot probe the machine. Reading a file has a time limit. Standard output is the protocol
channel: nothing else may print there.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from serval import vocab
from serval.audio import AudioError, AudioNotFoundError, audio_info
from serval.longform import count_pieces, read_audio, speech_of
from serval.serve.records import Timeline
from serval.vad import LABEL_TEXT, NO_SPEECH_TEXT, SPEECH_FRACTION_TEXT, speech_fields


def instructions(predictor) -> str:
    """The server's instructions: what this model recognises, in its own class and dimension names."""
    classes, dims = predictor.classes, "/".join(predictor.dimensions) or "no dimensional"
    return (
        f"serval recognises emotion in speech: {len(classes)} classes ({', '.join(classes)}) "
        f"with probabilities, and {dims} scores in [0, 1] (null where this model's output for the "
        "dimension was not trained). Use recognize_emotion for one utterance "
        "(up to a few minutes) and emotion_timeline for a longer recording (windows over time merged "
        "into segments). Give audio as a file path or as base64 bytes."
    )


def recognize_description(predictor) -> str:
    """recognize_emotion's description, naming this model's classes and dimensions."""
    classes, dims = list(predictor.classes), "/".join(predictor.dimensions) or "no dimensional"
    example = (
        [c for c in vocab.PRIMARY4 if c in classes] if set(vocab.PRIMARY4) <= set(classes) else classes[:2]
    )
    return (
        "Recognise the emotion in one speech clip (any common audio format, any sample rate).\n\n"
        "Give `path` (a local audio file) or `audio_base64` (the file's bytes, base64-encoded; `filename` "
        f"names it in the result). The classes are {', '.join(classes)}. `classes` restricts the answer "
        f"to a subset, e.g. {json.dumps(example)}, with probabilities renormalised over it. Returns the "
        f"label, the probability of each class, {dims} scores in [0, 1] (each null where this model's "
        "output for the dimension was not trained), `speech_fraction` (how much of the clip Silero VAD "
        "calls speech) and `no_speech`; a clip without speech has label null, its probabilities and "
        "scores still given."
    )


TIMELINE_DESCRIPTION = (
    "Emotion over time in a longer recording: windows of `window` seconds every `hop` seconds, "
    "adjacent windows with the same label merged into segments of at most `max_segment` seconds.\n\n"
    "Give `path` or `audio_base64` as for recognize_emotion. `vad` leaves windows without speech "
    "unscored. Set `include_windows` false to get only the merged segments (shorter answers for "
    "long recordings). Returns the JSON of `serval timeline`: windows, segments, grid, duration; "
    "scores are null for dimensions not in `trained_dimensions`."
)


class EmotionResult(BaseModel):
    """The emotion of one clip, as `serval predict` reports it."""

    file: str = Field(description="the path, or the name given for base64 audio")
    duration: float = Field(description="seconds of audio")
    pieces: int = Field(description="<= 30 s pieces whose outputs the record pools (1 within the window)")
    label: str | None = Field(description=LABEL_TEXT)
    probabilities: dict[str, float] = Field(description="probability of each emotion class")
    scores: dict[str, float | None] = Field(
        description="each dimensional score (arousal, valence, dominance for the default model) in [0, 1]; "
        + vocab.UNTRAINED
    )
    speech_fraction: float = Field(description=SPEECH_FRACTION_TEXT)
    no_speech: bool = Field(description=NO_SPEECH_TEXT)


class ToolInputError(ValueError):
    """A bad tool call: no audio or both kinds, invalid base64, unknown classes, a path outside the roots."""


READ_TIMEOUT = 30.0  # seconds to open a file and read its header (a stuck network share, say)


def within(seconds: float, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """`fn(*args, **kwargs)`, or ToolInputError when it takes longer than `seconds` (left behind in
    a daemon thread: a read that never returns cannot hang the tool)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=call, daemon=True, name="serval-mcp-read")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ToolInputError(f"{what}: reading took longer than {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def rewound(source: Any) -> Any:
    """An open file back at its start (each reader of serval.audio starts where the file stands)."""
    if hasattr(source, "seek"):
        source.seek(0)
    return source


class AudioInput:
    """Where a tool's audio comes from: a regular file under the allowed folders, or base64 bytes.

    The folders are the one the server was started in plus `roots`.
    """

    def __init__(self, roots: list[str] | None = None, cwd: str | None = None):
        self.cwd = Path(cwd or os.getcwd()).expanduser().resolve()  # where relative paths start
        self.allowed = list(dict.fromkeys([self.cwd, *(Path(r).expanduser().resolve() for r in roots or [])]))

    def source(self, path: str | None, audio_base64: str | None, filename: str | None) -> tuple[Any, str]:
        """(what `serval.audio` reads, the name for the record); ToolInputError for a bad choice."""
        if (path is None) == (audio_base64 is None):
            raise ToolInputError("give exactly one of `path` (a local audio file) or `audio_base64`")
        if path is not None:
            return self.open(path), path
        try:
            data = base64.b64decode(audio_base64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ToolInputError(f"audio_base64 is not valid base64 ({e})") from None
        return data, filename or "audio"

    def open(self, path: str) -> io.BufferedReader:
        """The file at `path`, opened for reading: only a regular file under the allowed folders."""
        given = self.cwd / Path(path).expanduser()  # an absolute path stays as it is
        try:
            resolved = given.resolve()  # symlinks and ".." followed before the check
        except (RuntimeError, OSError):  # a symlink loop
            resolved = None
        lexical = Path(os.path.normpath(given))
        if resolved is None and any(lexical.is_relative_to(r) for r in self.allowed):
            raise AudioNotFoundError(path, "symlink loop: the link leads back to itself")
        if resolved is None or not any(resolved.is_relative_to(r) for r in self.allowed):
            # the same answer for a path that exists and one that does not: nothing to probe
            folders = ", ".join(str(r) for r in self.allowed)
            raise ToolInputError(f"{path}: outside the folders this server may read ({folders})")
        try:
            info = os.stat(resolved)  # stat never blocks on a FIFO, open would
        except OSError as e:
            cause = "no such file" if isinstance(e, FileNotFoundError) else e.strerror
            raise AudioNotFoundError(path, cause) from None
        if not stat.S_ISREG(info.st_mode):
            raise ToolInputError(
                f"{path}: not a regular file (a directory, FIFO or device); give an audio file"
            )
        # O_NONBLOCK: should the path have become a FIFO since, opening it still returns at once
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ToolInputError(f"{path}: not a regular file; give an audio file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    @staticmethod
    def duration(source: Any, name: str, max_seconds: float, hint: str = "") -> float:
        """The audio's duration from its header; ToolInputError when longer than `max_seconds`."""
        duration = within(READ_TIMEOUT, name, audio_info, rewound(source), name=name).duration
        if duration > max_seconds + 1e-3:
            raise ToolInputError(
                f"{name}: {duration:.1f} s of audio; this tool takes at most {max_seconds:g} s{hint}"
            )
        return duration


class EmotionTools:
    """The two tools over one predictor; their signatures are the tools' input schemas.

    `label_no_speech`: recognize_emotion labels a clip without speech too (default: label null).
    """

    def __init__(
        self,
        predictor,
        audio: AudioInput,
        max_clip_seconds: float,
        max_timeline_seconds: float,
        label_no_speech: bool = False,
    ):
        self.predictor, self.audio = predictor, audio
        self.max_clip_seconds, self.max_timeline_seconds = max_clip_seconds, max_timeline_seconds
        self.label_no_speech = label_no_speech
        self.lock = (
            threading.Lock()
        )  # the SDK runs tools in worker threads; the model serves one call at a time

    def recognize_emotion(
        self,
        path: str | None = None,
        audio_base64: str | None = None,
        filename: str | None = None,
        classes: list[str] | None = None,
    ) -> EmotionResult:
        """The record of `serval predict` for one clip."""
        from mcp.server.mcpserver.exceptions import ToolError

        p = self.predictor
        try:
            source, name = self.audio.source(path, audio_base64, filename)
            keep = vocab.class_subset(classes, p.classes)
            self.audio.duration(
                source, name, self.max_clip_seconds, "; use emotion_timeline for long recordings"
            )
            # beyond one 30 s piece, a LongAudio: decoded piece by piece as it is scored
            wave = within(READ_TIMEOUT, name, read_audio, rewound(source), name=name)
            with self.lock:
                probs, scores = p.predict_waveforms([wave])
            speech = speech_fields(speech_of(wave))  # a long clip's streamed a block at a time
        except (AudioError, ToolInputError, vocab.UnknownClassesError) as e:
            raise ToolError(str(e)) from None
        body = vocab.label_body(
            probs[0],
            scores[0],
            p.classes,
            p.dimensions,
            keep,
            trained=vocab.trained_dimensions(p),
            speech=speech,
            label_no_speech=self.label_no_speech,
        )
        duration = round(len(wave) / vocab.SAMPLE_RATE, 3)
        return EmotionResult(file=name, duration=duration, pieces=count_pieces(len(wave)), **body)

    def emotion_timeline(
        self,
        path: str | None = None,
        audio_base64: str | None = None,
        filename: str | None = None,
        window: float = 4.0,
        hop: float = 2.0,
        max_segment: float = 15.0,
        vad: bool = False,
        include_windows: bool = True,
    ) -> Timeline:
        """The JSON of `serval timeline` for one recording."""
        from mcp.server.mcpserver.exceptions import ToolError

        from serval.timeline import grid_timeline
        from serval.windows import WindowSpec

        try:
            source, name = self.audio.source(path, audio_base64, filename)
            spec = WindowSpec(
                window=window, hop=hop, min_length=min(0.5, window), vad=vad, max_segment=max_segment
            )
            duration = self.audio.duration(source, name, self.max_timeline_seconds)
            spec.check_count(duration)
            if isinstance(source, bytes):  # read chunk by chunk like a file, never decoded whole
                source = io.BytesIO(source)
                source.name = name
            with self.lock:
                result = grid_timeline(rewound(source), self.predictor, spec)
        except (AudioError, ToolInputError, ValueError) as e:
            raise ToolError(str(e)) from None
        result.update(file=name, duration=round(duration, 3))
        if not include_windows:
            result.pop("windows")
        return result


def build_server(
    predictor,
    roots: list[str] | None = None,
    max_clip_seconds: float = 600.0,
    max_timeline_seconds: float = 4 * 3600.0,
    label_no_speech: bool = False,
):
    """The MCP server (an `mcp.server.mcpserver.MCPServer`) exposing `predictor` as two tools."""
    from mcp.server.mcpserver import MCPServer

    from serval import __version__

    tools = EmotionTools(
        predictor, AudioInput(roots), max_clip_seconds, max_timeline_seconds, label_no_speech
    )
    server = MCPServer(
        "serval", instructions=instructions(predictor), version=__version__, log_level="WARNING"
    )
    server.add_tool(tools.recognize_emotion, description=recognize_description(predictor))
    server.add_tool(tools.emotion_timeline, description=TIMELINE_DESCRIPTION)
    return server


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serval.onnx_engine import add_model_arguments

    add_model_arguments(p)
    p.add_argument(
        "--root",
        action="append",
        metavar="DIR",
        help="also read audio under DIR (repeatable); the folder the server starts in is always allowed",
    )
    p.add_argument(
        "--max-clip-seconds", type=float, default=600.0, help="longest audio for recognize_emotion"
    )
    p.add_argument(
        "--max-timeline-seconds", type=float, default=4 * 3600.0, help="longest audio for emotion_timeline"
    )
    p.add_argument(
        "--label-no-speech",
        action="store_true",
        help="recognize_emotion labels clips without speech too (default: label null; no_speech says why)",
    )


def run(args: argparse.Namespace) -> int:
    import mcp  # noqa: F401  (a missing package is reported before the model is prepared)

    from serval.locations import NoDefaultModelError
    from serval.onnx_engine import load_engine

    try:
        predictor = load_engine(args.model, args.engine, device=args.device)
    except (NoDefaultModelError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"serval mcp: {e}", file=sys.stderr)
        return 2
    for r in args.root or []:
        if not Path(r).is_dir():
            print(f"serval mcp: --root {r}: not a directory", file=sys.stderr)
            return 2
    server = build_server(
        predictor, args.root, args.max_clip_seconds, args.max_timeline_seconds, args.label_no_speech
    )
    server.run("stdio")
    return 0
