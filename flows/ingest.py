"""Prefect flow `ingest`: raw conversational audio -> CSM-ready WebDataset shards.

Per recording: decode -> ASR (whisperX) -> word alignment -> diarization (pyannote) -> turns -> quality
gate -> windows -> Mimi + text tokens -> shards. Each stage is a thin task over a plain function in tasks/.
"""

from __future__ import annotations

import glob
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.config import IngestConfig, resolve_device
from schemas.records import Reject, Transcript, Turn, Window
from tasks import decode as decode_mod
from tasks import quality, shards, turns, windows
from tasks.models import Models, describe_models, load_models, untrained

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".opus", ".ogg", ".oga", ".webm", ".mp4", ".mkv",
                  ".mov", ".wma", ".aif", ".aiff", ".mka"}
# Arrays pass between tasks in memory: no hashing, no result persistence.
stage = task(cache_policy=NO_CACHE, persist_result=False)


@stage
def decode_audio(path: str, cfg: IngestConfig) -> decode_mod.DecodedAudio:
    return decode_mod.decode_recording(path, cfg.decode)


@stage
def transcribe(audio16: Any, models: Models) -> Transcript:
    from tasks.asr import transcribe as run

    return run(audio16, models.asr, models.cfg.asr)


@stage
def align(audio16: Any, transcript: Transcript, models: Models) -> Transcript:
    from tasks.asr import align as run

    return run(audio16, transcript, models.aligner(transcript.language), models.cfg.align, models.device)


@stage
def diarize(audio16: Any, transcript: Transcript, models: Models) -> tuple[Transcript, list[tuple[float, float]]]:
    from tasks.diarize import assign_speakers, overlap_regions
    from tasks.diarize import diarize as run

    segments = run(audio16, models.diarizer, models.cfg.diarize)
    return assign_speakers(transcript, segments), overlap_regions(segments)


@stage
def make_windows(rec_id: str, source: str, transcript: Transcript, overlaps: list, duration: float,
                 models: Models) -> tuple[list[Window], list[Reject]]:
    from tokenizer.text import encode_turn_text

    cfg = models.cfg
    rejects = quality.check_transcript(rec_id, source, transcript, duration)
    if rejects:
        return [], rejects
    all_turns: list[Turn] = turns.make_turns(transcript, overlaps, cfg.turns)
    kept, turn_rejects = quality.filter_turns(rec_id, source, all_turns, transcript, cfg.quality)
    packed, pack_rejects = windows.pack_windows(
        rec_id, source, kept, lambda spk, text: encode_turn_text(models.text_tokenizer, spk, text), cfg.windows)
    packed, window_rejects = quality.filter_windows(packed, cfg.quality)
    return packed, turn_rejects + pack_rejects + window_rejects


@stage
def tokenize_audio(audio24: Any, models: Models) -> Any:
    from tokenizer.mimi import encode_audio

    cfg = models.cfg.tokenize
    return encode_audio(audio24, models.mimi, num_codebooks=cfg.num_codebooks, chunk_s=cfg.chunk_s)


@dataclass
class RecordingResult:
    recording_id: str
    source: str
    duration: float = 0.0
    windows: list[Window] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    language: str | None = None


def process_recording(path: str, models: Models) -> RecordingResult:
    """All stages for one file. A failure becomes a recording-level reject naming the stage and reason."""
    cfg = models.cfg
    source = Path(path).resolve().as_uri()
    result = RecordingResult(recording_id=_safe_id(path), source=source)
    current = "decode"
    try:
        t = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t, current
            now = time.perf_counter()
            result.seconds[current] = now - t
            t, current = now, name

        result.recording_id = decode_mod.recording_id(path)
        audio = decode_audio(path, cfg)
        result.duration = audio.duration
        lap("asr")
        transcript = transcribe(audio.audio16, models)
        result.language = transcript.language
        lap("align")
        transcript = align(audio.audio16, transcript, models)
        lap("diarize")
        transcript, overlaps = diarize(audio.audio16, transcript, models)
        lap("windows")
        packed, result.rejects = make_windows(result.recording_id, source, transcript, overlaps, audio.duration,
                                              models)
        lap("tokenize")
        if packed:
            codes = tokenize_audio(audio.audio24, models)
            for w in packed:
                w.extra["language"] = transcript.language
                result.samples.append(shards.window_sample(w, codes, cfg.windows.frame_rate))
            result.windows = packed
        lap("done")
    except Exception as exc:  # noqa: BLE001 - recorded, per the error policy
        if cfg.on_error == "raise":
            raise
        result.windows, result.samples = [], []
        result.rejects = [Reject(recording_id=result.recording_id, source=source, stage=current, level="recording",
                                 reason=f"{path}: {type(exc).__name__}: {exc}", rule="error",
                                 seconds=result.duration)]
    return result


@flow(name="ingest", log_prints=True)
def ingest(sources: list[str], config: IngestConfig | None = None) -> dict[str, Any]:
    """Ingest audio files, folders or globs into the dataset `<config.out>/<config.dataset>/`."""
    cfg = config or IngestConfig()
    logger = get_run_logger()
    started = time.perf_counter()
    files = expand_sources(sources)
    if not files:
        raise ValueError(f"no audio files found in {sources}")
    device = resolve_device(cfg.device)
    model_info = describe_models(cfg)
    logger.info("ingest %d files into %s/%s on %s", len(files), cfg.out, cfg.dataset, device)
    for name, info in model_info.items():
        logger.info("model %-22s %s [%s]", name, info.get("name"), info.get("weights"))
    if untrained(model_info):
        logger.warning("untrained (random) weights: %s: their outputs are not meaningful", ", ".join(untrained(model_info)))
    models = load_models(cfg, device)
    writer = shards.DatasetWriter(Path(cfg.out) / cfg.dataset, cfg.shards, overwrite=cfg.overwrite)
    results: list[RecordingResult] = []
    try:
        from tqdm import tqdm

        for path in tqdm(files, desc="recordings", unit="file", disable=None):
            r = process_recording(path, models)
            for window, sample in zip(r.windows, r.samples, strict=True):
                writer.write(window, sample)
            writer.reject(r.rejects)
            r.samples = []  # written: free the codes
            results.append(r)
            logger.info("%s: %.1f s, %d windows, %d rejects", path, r.duration, len(r.windows), len(r.rejects))
        wall = time.perf_counter() - started
        summary = summarize(results, writer, wall)
        manifest = writer.publish({
            "dataset": cfg.dataset,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": cfg.model_dump(mode="json"),
            "models": model_info,
            "untrained_models": untrained(model_info),
            "device": device,
            "counts": summary,
        })
    except BaseException:
        writer.abort()
        raise
    summary["shards"] = len(manifest["shards"])
    summary["manifest"] = str((Path(cfg.out) / cfg.dataset / "manifest.json").resolve())
    summary["untrained_models"] = manifest["untrained_models"]
    return summary


def summarize(results: list[RecordingResult], writer: shards.DatasetWriter, wall: float) -> dict[str, Any]:
    by_reason: dict[str, float] = defaultdict(float)
    for r in writer.rejects:
        by_reason[f"{r.stage}:{r.rule or 'error'}"] += r.seconds / 3600
    stage_s: dict[str, float] = defaultdict(float)
    for r in results:
        for k, v in r.seconds.items():
            stage_s[k] += v
    seconds_in = sum(r.duration for r in results)
    seconds_kept = sum(w.duration for r in results for w in r.windows)
    return {
        "recordings": len(results),
        "recordings_failed": sum(1 for r in results if any(x.level == "recording" for x in r.rejects)),
        "hours_in": seconds_in / 3600,
        "hours_kept": seconds_kept / 3600,
        "hours_rejected_by_reason": dict(by_reason),
        "windows": len(writer.index),
        "turns": sum(len(w.turns) for r in results for w in r.windows),
        "rejects": len(writer.rejects),
        "wall_s": wall,
        "realtime_factor": seconds_in / wall if wall > 0 else math.nan,
        "stage_realtime_factor": {k: seconds_in / v for k, v in stage_s.items() if v > 0},
    }


def expand_sources(sources: list[str]) -> list[str]:
    """Files as given; folders walked for audio/video files; globs expanded. Sorted, without duplicates."""
    found: list[str] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found += [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES]
        elif p.exists():
            found.append(str(p))
        else:
            found += [f for f in sorted(glob.glob(src, recursive=True)) if os.path.isfile(f)]
    return list(dict.fromkeys(found))


def _safe_id(path: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9-]+", "-", Path(path).stem).strip("-")[:48] or "rec"
