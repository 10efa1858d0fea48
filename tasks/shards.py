"""WebDataset shards, the Parquet index and rejects, and the manifest: the dataset's contract (v1).

Layout: <out>/<dataset>/shards/shard-NNNNNN.tar, index.parquet, rejects.parquet, manifest.json.
Shards are written into a staging folder and renamed into place when the run finishes; the manifest is
written last, so a reader never sees a half-written dataset. See docs/dataset-format.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.config import ShardConfig
from schemas.records import Reject, Window

SCHEMA_VERSION = 1
NUM_CODEBOOKS = 32


def window_sample(window: Window, codes: np.ndarray, frame_rate: float = 12.5) -> dict[str, Any]:
    """The WebDataset sample of a window: its json, its turns' Mimi codes and its text token ids.

    `codes` are the recording's codes (n_frames, 32) from one encode; frame i covers [i/rate, (i+1)/rate).
    A turn's codes start at the frame holding its start time.
    """
    parts = []
    for turn in window.turns:
        first = min(math.floor(turn.start * frame_rate), max(0, len(codes) - turn.frames))
        cut = codes[first : first + turn.frames]
        if len(cut) != turn.frames:
            raise ValueError(f"Window {window.key}: turn at {turn.start:.2f} s needs {turn.frames} frames, "
                             f"the recording has {len(codes)}")
        parts.append(cut)
    audio = np.concatenate(parts).astype(np.int16)
    text = np.array([t for turn in window.turns for t in turn.tokens], dtype=np.int32)
    meta = window.model_dump(mode="json", exclude={"extra"})
    meta.update(window.extra)
    return {"__key__": window.key, "json": meta, "codes.npy": audio, "text.npy": text}


def index_row(window: Window, shard: str) -> dict[str, Any]:
    return {
        "key": window.key,
        "recording_id": window.recording_id,
        "window": window.window,
        "shard": shard,
        "source": window.source,
        "n_positions": window.n_positions,
        "n_turns": len(window.turns),
        "n_speakers": len({t.speaker for t in window.turns}),
        "duration": window.duration,
        "start": window.turns[0].start,
        "end": window.turns[-1].end,
        "text_tokens": sum(t.text_tokens for t in window.turns),
        "frames": sum(t.frames for t in window.turns),
    }


class DatasetExists(Exception):
    """The dataset directory already holds a manifest and overwrite was not asked for."""


class DatasetWriter:
    """Writes samples into staging shards as they come; `publish` moves everything into place."""

    def __init__(self, dataset_dir: str | Path, cfg: ShardConfig, overwrite: bool = False) -> None:
        import webdataset as wds

        self.dir = Path(dataset_dir)
        if (self.dir / "manifest.json").exists() and not overwrite:
            raise DatasetExists(f"{self.dir}: a dataset is already there (manifest.json); pass overwrite "
                                "or choose another dataset name")
        self.staging = self.dir / f".staging-{os.getpid()}-{int(time.time())}"
        (self.staging / "shards").mkdir(parents=True)
        self._pending: list[dict[str, Any]] = []  # index rows of the shard being written
        self.index: list[dict[str, Any]] = []
        self.rejects: list[Reject] = []
        self.shards: list[str] = []
        self._writer = wds.ShardWriter(str(self.staging / "shards" / "shard-%06d.tar"), maxcount=cfg.max_samples,
                                       maxsize=cfg.max_bytes, post=self._shard_done, verbose=0)

    def _shard_done(self, fname: str) -> None:
        if not self._pending:  # ShardWriter opens a shard before the first sample: drop it if none came
            Path(fname).unlink(missing_ok=True)
            return
        name = f"shards/{Path(fname).name}"
        self.shards.append(name)
        self.index.extend({**row, "shard": name} for row in self._pending)
        self._pending = []

    def write(self, window: Window, sample: dict[str, Any]) -> None:
        self._writer.write(sample)
        self._pending.append(index_row(window, ""))

    def reject(self, rejects: list[Reject]) -> None:
        self.rejects.extend(rejects)

    def publish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Close the last shard, hash everything, move shards, index and rejects into place, then the manifest."""
        self._writer.close()
        shards_dir = self.dir / "shards"
        if shards_dir.exists():  # an overwritten dataset: its old shards go
            shutil.rmtree(shards_dir)
        entries = []
        for name in self.shards:
            path = self.staging / name
            n = sum(1 for row in self.index if row["shard"] == name)
            entries.append({"path": name, "sha256": sha256_file(path), "samples": n, "bytes": path.stat().st_size})
        os.replace(self.staging / "shards", shards_dir)
        _write_parquet(self.index, INDEX_SCHEMA, self.dir / "index.parquet")
        _write_parquet([r.model_dump() for r in self.rejects], REJECT_SCHEMA, self.dir / "rejects.parquet")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            **manifest,
            "shards": entries,
            "index": {"path": "index.parquet", "sha256": sha256_file(self.dir / "index.parquet"),
                      "rows": len(self.index)},
            "rejects": {"path": "rejects.parquet", "sha256": sha256_file(self.dir / "rejects.parquet"),
                        "rows": len(self.rejects)},
        }
        write_json_atomic(self.dir / "manifest.json", manifest)
        shutil.rmtree(self.staging, ignore_errors=True)
        return manifest

    def abort(self) -> None:
        """Leave nothing behind but what was published before."""
        try:
            self._writer.close()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("recording_id", pa.string()), ("window", pa.int32()), ("shard", pa.string()),
    ("source", pa.string()), ("n_positions", pa.int32()), ("n_turns", pa.int32()), ("n_speakers", pa.int32()),
    ("duration", pa.float64()), ("start", pa.float64()), ("end", pa.float64()), ("text_tokens", pa.int32()),
    ("frames", pa.int32()),
])
REJECT_SCHEMA = pa.schema([
    ("recording_id", pa.string()), ("source", pa.string()), ("stage", pa.string()), ("level", pa.string()),
    ("reason", pa.string()), ("rule", pa.string()), ("value", pa.float64()), ("threshold", pa.float64()),
    ("start", pa.float64()), ("end", pa.float64()), ("seconds", pa.float64()),
])


def _write_parquet(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
