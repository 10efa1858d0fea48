"""Synthetic datasets that obey shard contract v1: random codes and text ids, real tar/index/manifest layout.

For tests and CPU smoke runs until (and besides) real ingest output: no audio, no models, a fraction of a second.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import webdataset as wds

NUM_CODEBOOKS = 32
CODEBOOK_SIZE = 2048
FRAME_RATE = 12.5  # Mimi frames per second


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_synthetic_dataset(
    out: str | Path,
    dataset: str = "synthetic",
    *,
    recordings: int = 6,
    windows_per_recording: int = 3,
    samples_per_shard: int = 4,
    turns: tuple[int, int] = (2, 4),
    text_tokens: tuple[int, int] = (3, 10),
    frames: tuple[int, int] = (8, 40),
    text_vocab_size: int = 51865,
    seed: int = 0,
) -> Path:
    """Write <out>/<dataset>/{shards/shard-NNNNNN.tar, index.parquet, rejects.parquet, manifest.json}.

    Ranges are inclusive (low, high). Returns the manifest path.
    """
    rng = np.random.default_rng(seed)
    root = Path(out) / dataset
    (root / "shards").mkdir(parents=True, exist_ok=True)
    samples = []
    for r in range(recordings):
        rec = f"rec{r:04d}"
        for w in range(windows_per_recording):
            meta_turns, texts, codes, t = [], [], [], 0.0
            for i in range(int(rng.integers(turns[0], turns[1] + 1))):
                nt, nf = int(rng.integers(*text_tokens, endpoint=True)), int(rng.integers(*frames, endpoint=True))
                texts.append(rng.integers(0, text_vocab_size, nt, dtype=np.int32))
                codes.append(rng.integers(0, CODEBOOK_SIZE, (nf, NUM_CODEBOOKS), dtype=np.int16))
                end = t + nf / FRAME_RATE
                meta_turns.append({"speaker": i % 2, "text": f"turn {i}", "start": t, "end": end, "text_tokens": nt, "frames": nf})
                t = end + 0.3
            n_positions = sum(x["text_tokens"] + x["frames"] + 1 for x in meta_turns)
            meta = {"recording_id": rec, "window": w, "source": f"{rec}.wav", "n_positions": n_positions, "turns": meta_turns}
            samples.append((f"{rec}_w{w:05d}", meta, np.concatenate(texts), np.concatenate(codes)))

    shards, index = [], []
    for s in range(0, len(samples), samples_per_shard):
        rel = f"shards/shard-{s // samples_per_shard:06d}.tar"
        chunk = samples[s : s + samples_per_shard]
        with wds.TarWriter(str(root / rel), encoder=False, mtime=0) as tw:
            for key, meta, text, code in chunk:
                tw.write({"__key__": key, "json": json.dumps(meta).encode(), "codes.npy": _npy(code), "text.npy": _npy(text)})
                dur = sum(x["end"] - x["start"] for x in meta["turns"])
                index.append(
                    {"key": key, "recording_id": meta["recording_id"], "window": meta["window"], "shard": rel,
                     "n_positions": meta["n_positions"], "duration": dur}
                )
        data = (root / rel).read_bytes()
        shards.append({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "samples": len(chunk), "bytes": len(data)})

    pd.DataFrame(index).to_parquet(root / "index.parquet")
    pd.DataFrame({"recording_id": pd.Series([], dtype=str), "reason": pd.Series([], dtype=str)}).to_parquet(
        root / "rejects.parquet"
    )
    manifest = {
        "schema_version": 1,
        "dataset": dataset,
        "shards": shards,
        "counts": {"recordings": recordings, "windows": len(samples)},
        "config": {"synthetic": True, "seed": seed},
        "models": {"text": "synthetic", "mimi": "synthetic"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root / "manifest.json"
