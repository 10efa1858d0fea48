"""Records that flow forward through the ingest stages. Times are seconds in the source recording."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, PrivateAttr


class Source(BaseModel):
    """One input recording: where it came from (`uri`), where its bytes are now (`path`), and what is known
    about it (podcast feed, title, published, GUID, URL)."""

    uri: str
    path: str
    meta: dict[str, str] = Field(default_factory=dict)


class Word(BaseModel):
    text: str
    start: float
    end: float
    score: float | None = None  # alignment or ASR word probability
    speaker: str | None = None


class Segment(BaseModel):
    """One ASR segment (a VAD chunk's transcript), with its words once aligned."""

    start: float
    end: float
    text: str
    words: list[Word] = Field(default_factory=list)
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


class Transcript(BaseModel):
    language: str
    language_probability: float | None = None
    segments: list[Segment] = Field(default_factory=list)

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]


class SpeakerSegment(BaseModel):
    """A stretch of audio attributed to one speaker by diarization."""

    start: float
    end: float
    speaker: str


class Turn(BaseModel):
    """Consecutive words of one speaker, without a long pause inside."""

    speaker: str
    start: float
    end: float
    text: str
    words: list[Word] = Field(default_factory=list)
    overlap: bool = False  # another speaker talks during this turn
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.start


class WindowTurn(BaseModel):
    """A turn as stored in a sample's json: speaker renumbered inside its window."""

    speaker: int
    text: str
    start: float
    end: float
    text_tokens: int
    frames: int
    source_speaker: str = ""
    overlap: bool = False
    metrics: dict[str, float | None] = Field(default_factory=dict)  # tasks/metrics.py TURN_METRICS
    tokens: list[int] = Field(default_factory=list, exclude=True)  # ids of f"[{speaker}]{text}"; stored in .text.npy


class Window(BaseModel):
    """Consecutive turns of one recording that fit in `max_positions` model positions."""

    recording_id: str
    window: int
    source: str
    turns: list[WindowTurn]
    n_positions: int
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.recording_id}_w{self.window:05d}"

    @property
    def duration(self) -> float:
        return sum(t.end - t.start for t in self.turns)


class Reject(BaseModel):
    """Something that did not make it into the dataset, and why."""

    recording_id: str
    source: str
    stage: str  # decode, asr, diarize, turns, windows, quality, tokenize, ...
    level: str  # recording, turn, window
    reason: str
    rule: str = ""
    value: float | None = None
    threshold: float | None = None
    start: float | None = None
    end: float | None = None
    seconds: float = 0.0
    # The time spans it removed (turns of a window); settled into `seconds` by tasks.quality.settle.
    _spans: list[tuple[float, float]] = PrivateAttr(default_factory=list)
