"""The quality gate: rules over the stored metrics (tasks/metrics.py), applied at the recording, turn and
window level, each rejection a `Reject` naming the rule, the measured value and the threshold.

Messages name the object (as lhotse's qa.py does); nothing is dropped without a `Reject`. `settle` makes the
seconds add up: every second of a recording is either in a kept window or in exactly one reject (audio no
turn covers becomes an `untranscribed` gap), so hours kept + hours rejected = hours in.

The same rules run at ingest and in `csm-dataprep refilter` (tasks/report.py), on the same stored values.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.config import QualityConfig
from schemas.records import Reject, Transcript, Turn, Window
from tasks import metrics as m
from tasks.metrics import turn_confidence  # noqa: F401 - kept importable from here

STAGE = "quality"


@dataclass(frozen=True)
class Rule:
    """Reject when `metric` is below (kind "min") or above (kind "max") the QualityConfig field `threshold`."""

    name: str
    metric: str
    threshold: str
    kind: str  # "min" or "max"
    label: str
    unit: str = ""

    def limit(self, cfg: QualityConfig) -> float | None:
        if self.threshold == "require_dialogue":
            return 2.0 if cfg.require_dialogue else None
        value = getattr(cfg, self.threshold)
        return None if value is None else float(value)

    def fails(self, value: float | None, cfg: QualityConfig) -> float | None:
        """The threshold it fails, or None when it passes (or is off, or the value is unknown)."""
        limit = self.limit(cfg)
        if limit is None or value is None or value != value:
            return None
        return limit if (value < limit if self.kind == "min" else value > limit) else None

    def describe(self, value: float, limit: float) -> str:
        op = "<" if self.kind == "min" else ">"
        name = "require_dialogue (2 speakers)" if self.threshold == "require_dialogue" else self.threshold
        return f"{self.label} {value:.4g}{self.unit} {op} {name} {limit:g}{self.unit}"


SIGNAL_RULES = (
    Rule("mostly_silence", "silence_ratio", "max_silence_ratio", "max", "silent share"),
    Rule("clipped", "clipping_ratio", "max_clipping_ratio", "max", "clipped share of samples"),
    Rule("too_noisy", "snr_db", "min_snr_db", "min", "estimated SNR", " dB"),
)
LANGUAGE_RULES = (
    Rule("low_language_probability", "language_probability", "min_language_probability", "min",
         "language probability"),
)
SPEAKER_RULE = Rule("single_speaker", "n_speakers", "require_dialogue", "min", "speakers")
TURN_RULES = (
    Rule("too_short", "duration", "min_turn_s", "min", "duration", " s"),
    Rule("low_asr_confidence", "asr_avg_logprob", "min_avg_logprob", "min", "ASR mean log-probability"),
    Rule("no_speech", "asr_no_speech_prob", "max_no_speech_prob", "max", "no-speech probability"),
    Rule("compression_ratio", "compression_ratio", "max_compression_ratio", "max", "text compression ratio"),
    Rule("repeated_ngrams", "repeated_ngram_ratio", "max_repeated_ngram_ratio", "max", "repeated 3-gram share"),
    Rule("low_alignment", "aligned_ratio", "min_aligned_ratio", "min", "share of aligned words"),
    Rule("low_word_score", "word_score", "min_word_score", "min", "mean word score"),
    Rule("too_slow", "chars_per_s", "min_chars_per_s", "min", "speaking rate", " chars/s"),
    Rule("too_fast", "chars_per_s", "max_chars_per_s", "max", "speaking rate", " chars/s"),
    Rule("mostly_silence", "silence_ratio", "max_silence_ratio", "max", "silent share"),
)
SQUIM_RULES = (
    Rule("low_squim_stoi", "squim_stoi", "min_squim_stoi", "min", "SQUIM STOI"),
    Rule("low_squim_pesq", "squim_pesq", "min_squim_pesq", "min", "SQUIM PESQ"),
    Rule("low_squim_si_sdr", "squim_si_sdr", "min_squim_si_sdr", "min", "SQUIM SI-SDR", " dB"),
)
WINDOW_RULES = (
    Rule("window_too_short", "duration", "min_window_s", "min", "audio", " s"),
    SPEAKER_RULE,
    Rule("overlap", "overlap_ratio", "max_overlap_ratio", "max", "overlapped share"),
    Rule("too_noisy", "snr_db", "min_snr_db", "min", "estimated SNR", " dB"),
    Rule("clipped", "clipping_ratio", "max_clipping_ratio", "max", "clipped share of samples"),
    *SQUIM_RULES,
)
DUPLICATE_RULE = Rule("duplicate", "duplicate_similarity", "duplicate_text_similarity", "min", "similarity")
# Every rule with a threshold, by level: what the report draws and documents.
RULES_BY_LEVEL = {"recording": (*SIGNAL_RULES, *LANGUAGE_RULES, SPEAKER_RULE), "turn": TURN_RULES,
                  "window": WINDOW_RULES}


def first_failure(values: dict[str, Any], rules: Iterable[Rule], cfg: QualityConfig
                  ) -> tuple[Rule, float, float] | None:
    for rule in rules:
        value = values.get(rule.metric)
        limit = rule.fails(value, cfg)
        if limit is not None:
            return rule, float(value), limit
    return None


def _reject(recording_id: str, source: str, level: str, reason: str, rule: str, value: float | None = None,
            threshold: float | None = None, start: float | None = None, end: float | None = None,
            seconds: float = 0.0, spans: list[tuple[float, float]] | None = None) -> Reject:
    r = Reject(recording_id=recording_id, source=source, stage=STAGE, level=level, reason=reason, rule=rule,
               value=value, threshold=threshold, start=start, end=end, seconds=seconds)
    r._spans = list(spans or [])
    return r


# ---------------------------------------------------------------------------------------------- recording


def _recording_reject(recording_id: str, source: str, duration: float, reason: str, rule: str,
                      value: float | None = None, threshold: float | None = None) -> list[Reject]:
    return [_reject(recording_id, source, "recording", f"Recording {recording_id}: {reason}", rule, value, threshold,
                    0.0, duration, duration)]


def check_signal(recording_id: str, source: str, values: dict[str, Any], duration: float,
                 cfg: QualityConfig) -> list[Reject]:
    """Silence, clipping and noise of the whole recording, before any model runs."""
    failed = first_failure(values, SIGNAL_RULES, cfg)
    if failed is None:
        return []
    rule, value, limit = failed
    return _recording_reject(recording_id, source, duration, rule.describe(value, limit), rule.name, value, limit)


def check_language(recording_id: str, source: str, language: str | None, probability: float | None,
                   duration: float, cfg: QualityConfig) -> list[Reject]:
    """The detected language against `allowed_languages`, and the detection's confidence."""
    if cfg.allowed_languages is not None and language not in cfg.allowed_languages:
        return _recording_reject(recording_id, source, duration,
                                 f"language {language!r} not in allowed_languages {cfg.allowed_languages}",
                                 "language", probability)
    failed = first_failure({"language_probability": probability}, LANGUAGE_RULES, cfg)
    if failed is None:
        return []
    rule, value, limit = failed
    return _recording_reject(recording_id, source, duration, f"{language}: " + rule.describe(value, limit),
                             rule.name, value, limit)


def check_transcript(recording_id: str, source: str, transcript: Transcript, duration: float) -> list[Reject]:
    """A recording whose transcript holds no words is rejected whole."""
    if any(w.text.strip() for w in transcript.words):
        return []
    return _recording_reject(recording_id, source, duration, "empty transcript", "empty_transcript")


def check_speakers(recording_id: str, source: str, n_speakers: int, duration: float,
                   cfg: QualityConfig) -> list[Reject]:
    limit = SPEAKER_RULE.fails(n_speakers, cfg)
    if limit is None:
        return []
    return _recording_reject(recording_id, source, duration, SPEAKER_RULE.describe(n_speakers, limit),
                             SPEAKER_RULE.name, float(n_speakers), limit)


def check_recording(recording_id: str, source: str, values: dict[str, Any], language: str | None,
                    duration: float, cfg: QualityConfig) -> list[Reject]:
    """Every recording-level rule over stored values (a recordings.parquet row): what refilter applies."""
    speakers = values.get("n_speakers")
    return (check_signal(recording_id, source, values, duration, cfg)
            or check_language(recording_id, source, language, values.get("language_probability"), duration, cfg)
            or (check_speakers(recording_id, source, int(speakers), duration, cfg) if speakers is not None else []))


# ---------------------------------------------------------------------------------------------- turns


def turn_failure(text: str, values: dict[str, Any], cfg: QualityConfig) -> tuple[str, float | None, float | None, str]:
    """(rule, value, threshold, why) of the first turn rule a turn fails, or ("", ...) when it passes."""
    if not text.strip():
        return "empty_text", None, None, "no text"
    failed = first_failure(values, TURN_RULES, cfg)
    if failed is None:
        return "", None, None, ""
    rule, value, limit = failed
    return rule.name, value, limit, rule.describe(value, limit)


def filter_turns(
    recording_id: str, source: str, turns: list[Turn], transcript: Transcript, cfg: QualityConfig,
    sig: m.Signal | None = None, overlaps: list[tuple[float, float]] | None = None,
) -> tuple[list[Turn], list[Reject]]:
    """Measure every turn (into `extra["metrics"]`) and keep those that pass; each kept turn records its
    position in `extra["index"]` so that windows never join turns across a rejected one."""
    kept: list[Turn] = []
    rejects: list[Reject] = []
    for index, turn in enumerate(turns):
        values = m.turn_metrics(turn, transcript, sig, overlaps or [])
        turn.extra.update(index=index, metrics=values, avg_logprob=values["asr_avg_logprob"],
                          no_speech_prob=values["asr_no_speech_prob"])
        rule, value, threshold, why = turn_failure(turn.text, values, cfg)
        if not rule:
            kept.append(turn)
        else:
            rejects.append(_reject(recording_id, source, "turn",
                                   f"Turn {recording_id}@{turn.start:.2f}-{turn.end:.2f}s: {why}", rule, value,
                                   threshold, turn.start, turn.end, turn.duration, [(turn.start, turn.end)]))
    return kept, rejects


# ---------------------------------------------------------------------------------------------- windows


def annotate_window(window: Window, recording: dict[str, Any] | None = None) -> dict[str, Any]:
    """Set the window's metrics (json `metrics`) from its turns'; SQUIM values already there are kept."""
    durations = [t.end - t.start for t in window.turns]
    values = m.window_metrics([t.metrics for t in window.turns], durations, recording)
    old = window.extra.get("metrics", {})
    values.update({k: old.get(k) for k in m.SQUIM_METRICS})
    values.update(n_speakers=len({t.speaker for t in window.turns}), duration=window.duration)
    window.extra["metrics"] = values
    return values


def _window_reject(w: Window, why: str, rule: str, value: float | None, threshold: float | None) -> Reject:
    return _reject(w.recording_id, w.source, "window", f"Window {w.key}: {why}", rule, value, threshold,
                   w.turns[0].start, w.turns[-1].end, w.duration, [(t.start, t.end) for t in w.turns])


def filter_windows(windows: list[Window], cfg: QualityConfig, recording: dict[str, Any] | None = None,
                   rules: Iterable[Rule] = WINDOW_RULES) -> tuple[list[Window], list[Reject]]:
    """Window rules over each window's metrics (computed here if missing); survivors renumbered 0..n-1."""
    rules = tuple(rules)
    kept, rejects = [], []
    for w in windows:
        values = w.extra.get("metrics") or annotate_window(w, recording)
        failed = first_failure(values, rules, cfg)
        if failed is None:
            kept.append(w)
        else:
            rule, value, limit = failed
            rejects.append(_window_reject(w, rule.describe(value, limit), rule.name, value, limit))
    return renumber(kept), rejects


def renumber(windows: list[Window]) -> list[Window]:
    """Window ids dense 0..n-1 within the recording, in order (extra is shared, not copied)."""
    return [w if w.window == i else w.model_copy(update={"window": i}) for i, w in enumerate(windows)]


def fingerprint(window: Window, codes: np.ndarray) -> dict[str, Any]:
    """The window's duplicate fingerprints from its turns' text and its sample's codes (n_frames, 32)."""
    return {"fp_text": m.text_fingerprint([t.text for t in window.turns]),
            "fp_codes": m.codes_fingerprint(codes), "audio_hash": m.audio_hash(codes)}


def duplicate_of(fp: dict[str, Any], recording_id: str, index: m.DuplicateIndex | None,
                 cfg: QualityConfig) -> tuple[str, float, float] | None:
    """(why, similarity, threshold) if a window of another recording in `index` is the same audio."""
    if index is None or not len(index):
        return None
    found = index.query(recording_id, fp.get("fp_text"), fp.get("fp_codes"), fp.get("audio_hash"))
    if "exact" in found and cfg.duplicate_audio_similarity is not None:
        return f"same Mimi codes as {found['exact'][1]}", 1.0, 1.0
    for kind, limit in (("codes", cfg.duplicate_audio_similarity), ("text", cfg.duplicate_text_similarity)):
        if limit is not None and kind in found and found[kind][0] >= limit:
            what = "audio (code-0 shingles)" if kind == "codes" else "transcript (word 3-grams)"
            return f"{what} {found[kind][0]:.2f} similar to {found[kind][1]} >= {limit:g}", found[kind][0], limit
    return None


def drop_duplicates(windows: list[Window], samples_codes: Callable[[Window], np.ndarray],
                    index: m.DuplicateIndex | None, cfg: QualityConfig) -> tuple[list[Window], list[Reject]]:
    """Fingerprint each window (into `extra["fingerprint"]`) and reject those another recording already has."""
    kept, rejects = [], []
    for w in windows:
        fp = fingerprint(w, samples_codes(w))
        w.extra["fingerprint"] = fp
        dup = duplicate_of(fp, w.recording_id, index, cfg)
        if dup is None:
            kept.append(w)
        else:
            why, value, limit = dup
            rejects.append(_window_reject(w, f"duplicate: {why}", "duplicate", value, limit))
    return renumber(kept), rejects


# ---------------------------------------------------------------------------------------------- seconds


class Timeline:
    """Claims on a recording's [0, duration]: each second is claimed once, by the first thing that asks."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.starts: list[float] = []
        self.ends: list[float] = []  # disjoint, sorted
        self.total = 0.0

    def claim(self, spans: Iterable[tuple[float, float]]) -> float:
        """Claim the spans; returns the seconds that were not claimed before."""
        added = 0.0
        for s, e in sorted((max(0.0, s), min(self.duration, e)) for s, e in spans):
            if e <= s:
                continue
            lo = bisect.bisect_left(self.ends, s)  # first claimed span ending at or after s
            hi = bisect.bisect_right(self.starts, e)  # spans starting after e are untouched
            covered = sum(max(0.0, min(e, self.ends[i]) - max(s, self.starts[i])) for i in range(lo, hi))
            added += (e - s) - covered
            if lo < hi:
                s, e = min(s, self.starts[lo]), max(e, self.ends[hi - 1])
            self.starts[lo:hi], self.ends[lo:hi] = [s], [e]
        self.total += added
        return added


def spans_of(r: Reject) -> list[tuple[float, float]]:
    if r._spans:
        return list(r._spans)
    return [(r.start, r.end)] if r.start is not None and r.end is not None else []


def settle(recording_id: str, source: str, duration: float, windows: list[Window],
           rejects: list[Reject]) -> list[Reject]:
    """Make the seconds exact: kept windows claim their turns' time first (`metrics["audio_s"]`: overlapping
    turns count once), then each reject claims what is left of its spans (its `seconds`), and the rest of the
    recording (pauses between turns, audio no turn covers) becomes one `untranscribed` reject. A recording
    rejected whole (level recording) is already exact."""
    if any(r.level == "recording" for r in rejects):
        return rejects
    timeline = Timeline(duration)
    for w in windows:
        w.extra.setdefault("metrics", {})["audio_s"] = timeline.claim((t.start, t.end) for t in w.turns)
    for r in rejects:
        r.seconds = timeline.claim(spans_of(r))
    rest = duration - timeline.total
    if rest > 1e-9:
        rejects.append(_reject(
            recording_id, source, "gap",
            f"Recording {recording_id}: {rest:.2f} s outside every turn (pauses, silence, music, or speech the "
            "ASR did not transcribe)", "untranscribed", rest / duration if duration > 0 else None, None,
            None, None, rest))
    return rejects
