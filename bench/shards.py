"""Shard writing from in-memory windows vs a plain sequential write of the same bytes (target >= 50%)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.common import Row, best_of


def run(n_windows: int = 2000) -> list[Row]:
    from schemas.config import ShardConfig, WindowConfig
    from tasks.shards import DatasetWriter, window_sample
    from tasks.windows import pack_windows
    from tests.test_windows import random_turns, tokenize

    rng = random.Random(0)
    samples = []
    while len(samples) < n_windows:
        turns = random_turns(rng, 60)
        windows, _ = pack_windows("rec-bench", "file:///b.wav", turns, tokenize, WindowConfig())
        codes = np.random.default_rng(len(samples)).integers(0, 2048, (int(turns[-1].end * 12.5) + 2, 32))
        samples += [(w, window_sample(w, codes)) for w in windows]
    samples = samples[:n_windows]
    nbytes = sum(s["codes.npy"].nbytes + s["text.npy"].nbytes for _, s in samples)
    root = Path(tempfile.mkdtemp(prefix="csm-bench-shards-", dir=os.environ.get("BENCH_DIR")))

    def write_shards() -> None:
        shutil.rmtree(root / "ds", ignore_errors=True)
        w = DatasetWriter(root / "ds", ShardConfig(max_samples=100))
        for window, sample in samples:
            w.write(window, sample)
        w.publish({"dataset": "bench"})  # includes sha256 of every shard and the parquet tables
        _sync(root / "ds" / "shards")

    blob = np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8).tobytes()

    def plain_write() -> None:
        with open(root / "plain.bin", "wb") as f:
            for i in range(0, len(blob), 1 << 22):
                f.write(blob[i : i + (1 << 22)])
            f.flush()
            os.fsync(f.fileno())

    write_shards()  # warm-up: imports, page cache
    t_plain = best_of(plain_write)
    t_shards = best_of(write_shards)
    shutil.rmtree(root, ignore_errors=True)
    mb = nbytes / 1e6
    return [Row("shard writing", "MB/s written as shards", mb / t_shards, f"plain write {mb / t_plain:.0f} MB/s",
                t_plain / t_shards, f"{n_windows} windows, {mb:.0f} MB, incl. sha256 + parquet + fsync; target >= 0.5")]


def _sync(folder: Path) -> None:
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
