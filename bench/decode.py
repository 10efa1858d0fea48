"""ffmpeg decode + resample of mp3, real-time factor per core (target >= 300x)."""

from __future__ import annotations

from pathlib import Path

from bench.common import Row, best_of, speech_file


def run() -> list[Row]:
    from tasks.decode import decode, probe_duration

    path = speech_file(Path("/tmp/csm-bench/dialogue-10min.mp3"), 10)
    seconds = probe_duration(path)
    rows = []
    for rate in (16_000, 24_000):
        t = best_of(lambda rate=rate: decode(path, rate))
        rows.append(Row("decode", f"mp3 -> {rate // 1000} kHz mono f32, x real time", seconds / t,
                        "300x real time per core", seconds / t / 300, "ffmpeg decodes mp3 on one thread"))
    return rows
