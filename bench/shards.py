"""Shard writing from in-memory windows vs a plain sequential write of the same bytes (target >= 50%).

Both sides write the same number of bytes (the shards' size: the arrays plus json, tar headers and padding),
start from nothing on disk (the previous round's files are removed before the clock starts) and end with
their bytes fsynced. The windows carry what a real run gives them (per-turn and per-window metrics,
language, duplicate fingerprints), so the json, the index rows and the duplicate index cost what they do in
an ingest; building the samples (`window_sample`, upstream of the writer) is not timed.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import Row


def run(n_windows: int = 2000) -> list[Row]:
    from schemas.config import ShardConfig
    from tasks.shards import DatasetWriter

    samples = _samples(n_windows)
    root = Path(tempfile.mkdtemp(prefix="csm-bench-shards-", dir=os.environ.get("BENCH_DIR")))

    def clear() -> None:
        shutil.rmtree(root / "ds", ignore_errors=True)
        (root / "plain.bin").unlink(missing_ok=True)

    def write_shards() -> None:
        w = DatasetWriter(root / "ds", ShardConfig(max_samples=100))
        for window, sample in samples:
            w.write(window, sample)
        w.publish({"dataset": "bench"})  # includes sha256 of every shard and the parquet tables
        _sync(root / "ds" / "shards")

    write_shards()  # warm-up: imports, page cache
    nbytes = sum(f.stat().st_size for f in (root / "ds" / "shards").iterdir())
    blob = memoryview(np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8))

    def plain_write() -> None:
        with open(root / "plain.bin", "wb") as f:
            for i in range(0, len(blob), 1 << 22):
                f.write(blob[i : i + (1 << 22)])  # slices of a memoryview: no copies
            f.flush()
            os.fsync(f.fileno())

    t_plain = _best_of(plain_write, clear)
    t_shards = _best_of(write_shards, clear)
    shutil.rmtree(root, ignore_errors=True)
    mb = nbytes / 1e6
    return [Row("shard writing", "MB/s written as shards", mb / t_shards, f"plain write {mb / t_plain:.0f} MB/s",
                t_plain / t_shards, f"{n_windows} windows, {mb:.0f} MB, incl. json + index + duplicate index + "
                "sha256 + parquet + fsync; target >= 0.5")]


def _samples(n_windows: int) -> list[tuple]:
    """Windows as quality and dedupe leave them (metrics, language, fingerprints) and their samples."""
    from schemas.config import WindowConfig
    from tasks import quality
    from tasks.metrics import TURN_METRICS
    from tasks.shards import window_sample
    from tasks.windows import pack_windows
    from tests.test_windows import random_turns, tokenize

    rng = random.Random(0)
    samples = []
    while len(samples) < n_windows:
        turns = random_turns(rng, 60)
        for t in turns:
            t.extra["metrics"] = {k: rng.uniform(-30, 30) for k in TURN_METRICS}
        rid = f"rec-bench-{len(samples):05d}"
        windows, _ = pack_windows(rid, f"file:///{rid}.wav", turns, tokenize, WindowConfig())
        codes = np.random.default_rng(len(samples)).integers(0, 2048, (int(turns[-1].end * 12.5) + 2, 32))
        for w in windows:
            quality.annotate_window(w, {"language_probability": 0.98})
            w.extra.update(language="en", source_meta={})
            w.extra["fingerprint"] = quality.fingerprint(w, window_sample(w, codes)["codes.npy"])
            w.extra["metrics"]["audio_s"] = w.duration
            samples.append((w, window_sample(w, codes)))
    return samples[:n_windows]


def _best_of(fn: Callable[[], None], setup: Callable[[], None], repeat: int = 5) -> float:
    """Fastest of `repeat` timed calls, each after an untimed `setup`."""
    times = []
    for _ in range(repeat):
        setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _sync(folder: Path) -> None:
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
