"""Segmentation into training windows of at most `max_positions` CSM positions.

A turn costs len(text tokens) + frames + 1 positions (the +1 is CSM's end-of-audio frame). A window is a
run of consecutive turns of one recording; speakers are renumbered 0..k in order of appearance inside each
window. A turn too long for a window is split at word boundaries. Nothing is dropped silently: what
cannot fit comes back as a `Reject`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from schemas.config import WindowConfig
from schemas.records import Reject, Turn, Window, WindowTurn

Tokenize = Callable[[int, str], list[int]]


def n_frames(start: float, end: float, frame_rate: float = 12.5) -> int:
    """Mimi frames covering [start, end): the duration times the frame rate, rounded up (at least one)."""
    return max(1, math.ceil(round((end - start) * frame_rate, 6)))


def pack_windows(
    recording_id: str, source: str, turns: list[Turn], tokenize: Tokenize, cfg: WindowConfig
) -> tuple[list[Window], list[Reject]]:
    """Pack turns greedily into windows. A turn whose `extra["index"]` does not follow the previous
    turn's (a turn was rejected in between) starts a new window, so a window never hides a gap."""
    windows: list[Window] = []
    rejects: list[Reject] = []
    current: list[WindowTurn] = []
    speakers: dict[str, int] = {}
    used = 0
    last_index: int | None = None

    def close() -> None:
        nonlocal current, speakers, used
        if current:
            windows.append(Window(recording_id=recording_id, window=len(windows), source=source,
                                  turns=current, n_positions=used))
        current, speakers, used = [], {}, 0

    queue = deque(turns)
    while queue:
        turn = queue.popleft()
        index = turn.extra.get("index")
        if current and index is not None and last_index is not None and index != last_index + 1 \
                and not turn.extra.get("piece_of"):
            close()
        placed = _fit(turn, speakers, tokenize, cfg, cfg.max_positions - used)
        if placed is None and current:
            close()
            placed = _fit(turn, speakers, tokenize, cfg, cfg.max_positions)
        if placed is None:
            pieces = split_turn(turn, tokenize, cfg)
            if len(pieces) > 1:
                queue.extendleft(reversed(pieces))
            else:
                rejects.append(Reject(
                    recording_id=recording_id, source=source, stage="windows", level="turn",
                    reason=f"turn at {turn.start:.2f}-{turn.end:.2f} s cannot be split to fit "
                           f"{cfg.max_positions} positions", rule="max_positions",
                    value=float(_cost(turn, 0, tokenize, cfg)[0]), threshold=float(cfg.max_positions),
                    start=turn.start, end=turn.end, seconds=turn.duration))
            continue
        current.append(placed)
        used += placed.text_tokens + placed.frames + 1
        last_index = index if index is not None else last_index
    close()
    return windows, rejects


def split_turn(turn: Turn, tokenize: Tokenize, cfg: WindowConfig) -> list[Turn]:
    """Split a turn at word boundaries into pieces that each fit an empty window (as speaker 0)."""
    words = turn.words
    pieces: list[Turn] = []
    i = 0
    while i < len(words):
        j = i + 1  # a piece holds words[i:j]; grow it while the next word still fits
        while j < len(words) and _cost(_piece(turn, words[i : j + 1]), 0, tokenize, cfg)[0] <= cfg.max_positions:
            j += 1
        pieces.append(_piece(turn, words[i:j]))
        i = j
    return pieces if len(pieces) > 1 else [turn]


def _piece(turn: Turn, words: list) -> Turn:
    text = " ".join(w.text.strip() for w in words if w.text.strip())
    return turn.model_copy(update={
        "start": words[0].start, "end": max(w.end for w in words), "text": text, "words": words,
        "extra": {**turn.extra, "piece_of": (turn.start, turn.end)},
    })


def _cost(turn: Turn, speaker: int, tokenize: Tokenize, cfg: WindowConfig) -> tuple[int, list[int], int]:
    tokens = tokenize(speaker, turn.text)
    frames = n_frames(turn.start, turn.end, cfg.frame_rate)
    return len(tokens) + frames + 1, tokens, frames


def _fit(turn: Turn, speakers: dict[str, int], tokenize: Tokenize, cfg: WindowConfig, room: int) -> WindowTurn | None:
    """The turn as placed in the current window, or None if it does not fit in `room` positions."""
    speaker = speakers.get(turn.speaker, len(speakers))
    cost, tokens, frames = _cost(turn, speaker, tokenize, cfg)
    if cost > room:
        return None
    speakers.setdefault(turn.speaker, speaker)
    return WindowTurn(speaker=speaker, text=turn.text, start=turn.start, end=turn.end, text_tokens=len(tokens),
                      frames=frames, source_speaker=turn.speaker, overlap=turn.overlap, tokens=tokens,
                      metrics=turn.extra.get("metrics", {}))
