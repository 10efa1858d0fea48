"""Loader: shards -> collated CSM training batches, positions per second per CPU core, by DataLoader workers.

Target >= 500,000 positions/s per core (one H100 training CSM-1B consumes about 60,000 positions/s).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import Row


def run(batches: int = 150) -> list[Row]:
    from training.config import TrainConfig
    from training.data import Loader, load_manifest
    from training.synthetic import write_synthetic_dataset

    # Full-size windows: ~2000 positions each, as the ingest packs them.
    root = write_synthetic_dataset(Path(tempfile.mkdtemp(prefix="csm-bench-loader-")), recordings=40,
                                   windows_per_recording=10, samples_per_shard=50, turns=(8, 10),
                                   text_tokens=(10, 30), frames=(120, 180))
    manifest = load_manifest(str(root))
    rows = []
    for workers in (0, 1, 2):
        cfg = TrainConfig(num_workers=workers, batch_size=8, epochs=100, shuffle_buffer=100, eval_fraction=0.0)
        loader = Loader(manifest, cfg, rank=0, world_size=1, text_vocab_size=51866)
        loader.next()  # start-up (worker processes, first shards) is not throughput
        positions, t = 0, time.perf_counter()
        for _ in range(batches):
            positions += int(loader.next()["attention_mask"].sum())
        rate = positions / (time.perf_counter() - t)
        cores = max(1, workers)
        rows.append(Row("loader", f"positions/s per core, {workers} DataLoader workers", rate / cores,
                        "500,000 per core", rate / cores / 500_000, f"{rate:,.0f} positions/s in all"))
    return rows
