"""Speaker turns: consecutive words of one speaker, split on long pauses."""

from __future__ import annotations

from schemas.config import TurnsConfig
from schemas.records import Transcript, Turn, Word


def make_turns(
    transcript: Transcript, overlaps: list[tuple[float, float]], cfg: TurnsConfig
) -> list[Turn]:
    """Group speaker-labelled words into turns; mark turns that overlap another speaker."""
    turns: list[Turn] = []
    current: list[Word] = []
    speaker: str | None = None
    for word in sorted(transcript.words, key=lambda w: w.start):
        # A word diarization could not place stays with the turn it falls in.
        word_speaker = word.speaker or speaker
        if current and (word_speaker != speaker or word.start - current[-1].end > cfg.max_pause_s):
            turns.append(_turn(speaker, current, overlaps))
            current = []
        speaker = word_speaker
        current.append(word)
    if current:
        turns.append(_turn(speaker, current, overlaps))
    return turns


def _turn(speaker: str | None, words: list[Word], overlaps: list[tuple[float, float]]) -> Turn:
    start, end = words[0].start, max(w.end for w in words)
    return Turn(
        speaker=speaker or "UNKNOWN",
        start=start,
        end=end,
        text=" ".join(w.text.strip() for w in words if w.text.strip()),
        words=words,
        overlap=any(s < end and start < e for s, e in overlaps),
    )
