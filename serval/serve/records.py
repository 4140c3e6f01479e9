"""The timeline JSON (`serval timeline`, `POST /v1/timeline`, the MCP tool `emotion_timeline`) as types.

TypedDicts rather than models: a key that a record may lack (an unscored window has no
probabilities; `include_windows=false` drops the windows) is left out of the JSON, not written as null.
Pydantic (FastAPI's OpenAPI, the MCP SDK's output schema) reads them as JSON schemas.
"""

from __future__ import annotations

from typing import Annotated, NotRequired

from pydantic import Field
from typing_extensions import TypedDict  # pydantic takes typing's TypedDict only from Python 3.12

from serval.vocab import UNTRAINED

Seconds = Annotated[float, Field(description="seconds from the start of the recording")]
Probabilities = Annotated[dict[str, float], Field(description="probability of each emotion class")]
Scores = Annotated[
    dict[str, float | None], Field(description=f"each dimensional score in [0, 1]; {UNTRAINED}")
]
TrainedDimensions = Annotated[
    list[str], Field(description="the dimensions whose scores were trained (the others are null)")
]


class TimelineWindow(TypedDict):
    """One window of the grid; an unscored one (no speech, or an error) has label null and no outputs."""

    start: Seconds
    end: Seconds
    label: str | None
    speech_fraction: NotRequired[
        Annotated[float, Field(description="fraction of the window's 32 ms frames that are speech (vad)")]
    ]
    no_speech: NotRequired[Annotated[bool, Field(description="left unscored for lack of speech (vad)")]]
    error: NotRequired[str]
    probabilities: NotRequired[Probabilities]
    scores: NotRequired[Scores]


class TimelineSpan(TypedDict):
    start: Seconds
    end: Seconds


class TimelineSegment(TypedDict):
    """Adjacent windows with the same label, joined (at most `max_segment` seconds)."""

    start: Seconds
    end: Seconds
    label: str
    windows: Annotated[int, Field(description="how many windows were joined")]
    probabilities: Probabilities
    scores: Scores


class TimelineGrid(TypedDict):
    window: float
    hop: float
    min_length: float


class TimelineVad(TypedDict):
    threshold: float
    min_speech: float


class Timeline(TypedDict):
    """Every window of the grid and the merged segments of one recording."""

    file: str | None
    model: str
    classes: list[str]
    dimensions: list[str]
    trained_dimensions: TrainedDimensions
    grid: TimelineGrid
    vad: TimelineVad | None
    max_segment: float
    duration: NotRequired[Seconds]
    windows: NotRequired[list[TimelineWindow]]
    segments: list[TimelineSegment]
    unscored: NotRequired[
        Annotated[list[TimelineSpan], Field(description="spans left unscored for lack of speech (vad)")]
    ]
