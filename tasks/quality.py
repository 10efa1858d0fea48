"""First quality gate: reject empty, too short and low-confidence speech, each with its reason.

Messages name the object (as lhotse's qa.py does); nothing is dropped without a `Reject`.
"""

from __future__ import annotations

from schemas.config import QualityConfig
from schemas.records import Reject, Transcript, Turn, Window


def check_transcript(recording_id: str, source: str, transcript: Transcript, duration: float) -> list[Reject]:
    """A recording whose transcript holds no words is rejected whole."""
    if any(w.text.strip() for w in transcript.words):
        return []
    return [Reject(recording_id=recording_id, source=source, stage="quality", level="recording",
                   reason=f"Recording {recording_id}: empty transcript", rule="empty_transcript",
                   seconds=duration, start=0.0, end=duration)]


def turn_confidence(turn: Turn, transcript: Transcript) -> tuple[float | None, float | None]:
    """Duration-weighted ASR mean log-probability and no-speech probability of the segments under a turn."""
    weights, logprob, no_speech = 0.0, 0.0, 0.0
    for seg in transcript.segments:
        overlap = min(seg.end, turn.end) - max(seg.start, turn.start)
        if overlap <= 0 or seg.avg_logprob is None:
            continue
        weights += overlap
        logprob += overlap * seg.avg_logprob
        no_speech += overlap * (seg.no_speech_prob or 0.0)
    if weights == 0:
        return None, None
    return logprob / weights, no_speech / weights


def filter_turns(
    recording_id: str, source: str, turns: list[Turn], transcript: Transcript, cfg: QualityConfig
) -> tuple[list[Turn], list[Reject]]:
    """Keep turns that pass; each kept turn records its position in `extra["index"]` so that windows
    never join turns across a rejected one."""
    kept: list[Turn] = []
    rejects: list[Reject] = []
    for index, turn in enumerate(turns):
        logprob, no_speech = turn_confidence(turn, transcript)
        turn.extra.update(index=index, avg_logprob=logprob, no_speech_prob=no_speech)
        name = f"Turn {recording_id}@{turn.start:.2f}-{turn.end:.2f}s"
        rule, value, threshold, reason = None, None, None, ""
        if not turn.text.strip():
            rule, reason = "empty_text", f"{name}: no text"
        elif turn.duration < cfg.min_turn_s:
            rule, value, threshold = "too_short", turn.duration, cfg.min_turn_s
            reason = f"{name}: {turn.duration:.2f} s < min_turn_s {cfg.min_turn_s}"
        elif logprob is not None and logprob < cfg.min_avg_logprob:
            rule, value, threshold = "low_asr_confidence", logprob, cfg.min_avg_logprob
            reason = f"{name}: ASR mean log-probability {logprob:.2f} < {cfg.min_avg_logprob}"
        elif no_speech is not None and no_speech > cfg.max_no_speech_prob:
            rule, value, threshold = "no_speech", no_speech, cfg.max_no_speech_prob
            reason = f"{name}: no-speech probability {no_speech:.2f} > {cfg.max_no_speech_prob}"
        if rule is None:
            kept.append(turn)
        else:
            rejects.append(Reject(recording_id=recording_id, source=source, stage="quality", level="turn",
                                  reason=reason, rule=rule, value=value, threshold=threshold,
                                  start=turn.start, end=turn.end, seconds=turn.duration))
    return kept, rejects


def filter_windows(windows: list[Window], cfg: QualityConfig) -> tuple[list[Window], list[Reject]]:
    kept, rejects = [], []
    for w in windows:
        if w.duration < cfg.min_window_s:
            rejects.append(Reject(
                recording_id=w.recording_id, source=w.source, stage="quality", level="window",
                reason=f"Window {w.key}: {w.duration:.2f} s of audio < min_window_s {cfg.min_window_s}",
                rule="window_too_short", value=w.duration, threshold=cfg.min_window_s,
                start=w.turns[0].start, end=w.turns[-1].end, seconds=w.duration))
        else:
            kept.append(w)
    # Renumber so window ids stay dense 0..n-1 within the recording.
    return [w.model_copy(update={"window": i}) for i, w in enumerate(kept)], rejects
