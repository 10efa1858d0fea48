"""Decode any format ffmpeg reads to mono float32 at the rates the models want."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from schemas.config import DecodeConfig


class DecodeError(Exception):
    """The file could not be decoded; the message names the file and the reason."""


@dataclass
class DecodedAudio:
    """One recording at the ASR rate, held whole (whisperX and pyannote need the whole array). The codec
    rate is not held: Mimi reads it from `stream(path, codec_sample_rate, ...)` a chunk at a time, so a
    3-hour file does not keep another 1 GB alive through every stage."""

    path: str
    audio16: np.ndarray  # ASR, alignment, diarization, signal metrics
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


def _ffmpeg(path: str | Path, sample_rate: int) -> list[str]:
    return ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn", "-ac", "1",
            "-ar", str(sample_rate), "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"]


def decode(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode the first audio stream, downmixed to mono and resampled by ffmpeg, as (writable) float32."""
    # one growing buffer (large reallocs are remapped in place): no joined copy of the whole output as
    # subprocess.run makes, and writable, so torch users (pyannote) need not copy it either
    buf = bytearray()
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a corrupt stream's error flood cannot block
        proc = subprocess.Popen(_ffmpeg(path, sample_rate), stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        while block := proc.stdout.read(1 << 22):
            buf += block
        proc.stdout.close()
        if proc.wait() != 0:
            raise DecodeError(f"{path}: ffmpeg could not decode it: {_stderr(err)}")
    audio = np.frombuffer(buf, dtype=np.float32)
    if audio.size == 0:
        raise DecodeError(f"{path}: decoded to no samples")
    block = 1 << 22  # checked a block at a time: no whole-file mask (3 h at 16 kHz: 170 MB)
    if not all(np.isfinite(audio[i : i + block]).all() for i in range(0, audio.size, block)):
        raise DecodeError(f"{path}: audio holds NaN or Inf samples")
    return audio


def stream(path: str | Path, sample_rate: int, block: int) -> Iterator[np.ndarray]:
    """Decode like `decode`, yielding float32 blocks of exactly `block` samples (the last may be shorter):
    memory is one block, whatever the file's length."""
    if block < 1:
        raise ValueError(f"block must be >= 1 sample, got {block}")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(_ffmpeg(path, sample_rate), stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        total = 0
        try:
            n = 4 * block
            while n == 4 * block:  # a short read is the end of the stream
                out = np.empty(block, dtype=np.float32)
                n = _read_into(proc.stdout, memoryview(out).cast("B"))
                if n % 4:
                    raise DecodeError(f"{path}: ffmpeg output ends mid-sample")
                if n:
                    out = out[: n // 4]
                    if not np.isfinite(out).all():
                        raise DecodeError(f"{path}: audio holds NaN or Inf samples")
                    total += len(out)
                    yield out
            proc.stdout.close()
            if proc.wait() != 0:
                raise DecodeError(f"{path}: ffmpeg could not decode it: {_stderr(err)}")
        finally:  # the consumer stopped early (or failed): do not leave ffmpeg blocked on a full pipe
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if total == 0:
            raise DecodeError(f"{path}: decoded to no samples")


def _read_into(f: IO[bytes], view: memoryview) -> int:
    """Fill `view` from `f` (a pipe returns short reads); fewer bytes only at end of stream."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def decode_recording(path: str | Path, cfg: DecodeConfig) -> DecodedAudio:
    """Decode at the ASR rate; reject what is too short or too long before any model sees it."""
    duration = probe_duration(path)
    if duration == duration and duration > cfg.max_duration_s:  # NaN-safe
        raise DecodeError(f"{path}: {duration:.0f} s is longer than max_duration_s={cfg.max_duration_s:.0f}")
    audio16 = decode(path, cfg.asr_sample_rate)
    duration = len(audio16) / cfg.asr_sample_rate
    if duration < cfg.min_duration_s:
        raise DecodeError(f"{path}: {duration:.2f} s is shorter than min_duration_s={cfg.min_duration_s}")
    return DecodedAudio(str(path), audio16, duration)


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


def _stderr(err: IO[bytes]) -> str:
    err.seek(0)
    return _last_line(err.read().decode(errors="replace"))


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no error message"
