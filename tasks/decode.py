"""Decode any format ffmpeg reads to mono float32 at the rates the models want."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas.config import DecodeConfig


class DecodeError(Exception):
    """The file could not be decoded; the message names the file and the reason."""


@dataclass
class DecodedAudio:
    """One recording at the two rates the stages need; one copy per rate, nothing else kept."""

    path: str
    audio16: np.ndarray  # ASR and diarization
    audio24: np.ndarray  # Mimi
    duration: float


def probe_duration(path: str | Path) -> float:
    """Duration of the first audio stream in seconds, from ffprobe (no decode)."""
    cmd = ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=duration:format=duration",
           "-of", "json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DecodeError(f"{path}: ffprobe failed: {_last_line(proc.stderr)}")
    info = json.loads(proc.stdout or "{}")
    if not info.get("streams"):
        raise DecodeError(f"{path}: no audio stream")
    for value in (info["streams"][0].get("duration"), info.get("format", {}).get("duration")):
        if value not in (None, "N/A"):
            return float(value)
    return float("nan")  # some containers (raw streams) do not say; decoding tells


def decode(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode the first audio stream, downmixed to mono and resampled by ffmpeg, as float32."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn", "-ac", "1",
           "-ar", str(sample_rate), "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise DecodeError(f"{path}: ffmpeg could not decode it: {_last_line(proc.stderr.decode(errors='replace'))}")
    audio = np.frombuffer(proc.stdout, dtype=np.float32)  # a view of ffmpeg's output: no copy
    if audio.size == 0:
        raise DecodeError(f"{path}: decoded to no samples")
    if not np.isfinite(audio).all():
        raise DecodeError(f"{path}: audio holds NaN or Inf samples")
    return audio


def decode_recording(path: str | Path, cfg: DecodeConfig) -> DecodedAudio:
    """Decode once per rate; reject what is too short or too long before any model sees it."""
    duration = probe_duration(path)
    if duration == duration and duration > cfg.max_duration_s:  # NaN-safe
        raise DecodeError(f"{path}: {duration:.0f} s is longer than max_duration_s={cfg.max_duration_s:.0f}")
    audio16 = decode(path, cfg.asr_sample_rate)
    duration = len(audio16) / cfg.asr_sample_rate
    if duration < cfg.min_duration_s:
        raise DecodeError(f"{path}: {duration:.2f} s is shorter than min_duration_s={cfg.min_duration_s}")
    audio24 = decode(path, cfg.codec_sample_rate)
    return DecodedAudio(str(path), audio16, audio24, duration)


def recording_id(path: str | Path, chunk: int = 1 << 20) -> str:
    """A stable id: a slug of the file name plus a hash of the content (same audio, same id)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return f"{name_slug(path)}-{digest.hexdigest()[:12]}"


def name_slug(path: str | Path) -> str:
    """The file name as a key-safe slug: letters, digits and dashes only (no dots, no spaces)."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", Path(path).stem).strip("-")[:48] or "rec"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no error message"
