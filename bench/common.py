"""Shared bits of the benchmarks: a result row, timing, and test audio."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Row:
    stage: str
    figure: str  # what was measured, with its unit
    value: float
    reference: str  # what it is compared with
    ratio: float | None  # value / reference (>= 1 meets the target where one is stated)
    note: str = ""


def best_of(fn, repeat: int = 3) -> float:
    """Fastest wall time of `repeat` calls (the least disturbed by the other tenants of a noisy machine)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def speech_file(path: Path, minutes: float) -> Path:
    """A dialogue of about `minutes` minutes (espeak-ng), written once and reused."""
    from tasks.synth import make_dialogue

    if not path.exists():
        make_dialogue(path, repeat=max(1, round(minutes * 60 / 78.5)))
    return path


def speech_array(seconds: float, sample_rate: int) -> np.ndarray:
    from tasks.decode import decode

    path = speech_file(Path("/tmp/csm-bench/dialogue-10min.mp3"), 10)
    audio = decode(path, sample_rate)
    reps = int(np.ceil(seconds * sample_rate / len(audio)))
    return np.tile(audio, reps)[: int(seconds * sample_rate)].copy()
