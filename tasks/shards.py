"""WebDataset shards, the Parquet index and rejects, and the manifest: the dataset's contract (v1).

Layout: <out>/<dataset>/shards/shard-NNNNNN.tar, index.parquet, rejects.parquet, recordings.parquet,
manifest.json.
Shards are written into a staging folder and renamed into place when the run finishes; the manifest is
written last, so a reader never sees a half-written dataset. See docs/dataset-format.md.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.config import ShardConfig
from schemas.records import Reject, Window
from tasks import storage
from tasks.metrics import RECORDING_METRICS, WINDOW_METRICS, DuplicateIndex, signature_bytes
from tasks.tarwriter import ShardWriter

SCHEMA_VERSION = 1
NUM_CODEBOOKS = 32
SOURCE_META = ("feed", "title", "published", "guid", "url")  # a podcast episode's metadata, where known


def window_codes(window: Window, codes: np.ndarray, frame_rate: float = 12.5) -> np.ndarray:
    """A window's Mimi codes, int16 (sum of its turns' frames, 32): the `.codes.npy` of its sample.

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
    return np.concatenate(parts, dtype=np.int16, casting="unsafe")  # one copy, cast on the way (as astype)


def window_sample(window: Window, codes: np.ndarray, frame_rate: float = 12.5) -> dict[str, Any]:
    """The WebDataset sample of a window: its json, its turns' Mimi codes (`window_codes`) and its text
    token ids."""
    audio = window_codes(window, codes, frame_rate)
    text = np.array([t for turn in window.turns for t in turn.tokens], dtype=np.int32)
    meta = window.model_dump(mode="json", exclude={"extra"})
    meta.update({k: v for k, v in window.extra.items() if k != "fingerprint"})  # fingerprints: index only
    return {"__key__": window.key, "json": meta, "codes.npy": audio, "text.npy": text}


def index_row(window: Window, shard: str) -> dict[str, Any]:
    # Once per window written, on the writer's critical path: one pass over the turns, lookups hoisted.
    turns, extra = window.turns, window.extra
    meta, metrics, fp = extra.get("source_meta") or {}, extra.get("metrics") or {}, extra.get("fingerprint") or {}
    speakers, seconds, text_tokens, frames = set(), [], 0, 0
    for t in turns:
        speakers.add(t.speaker)
        seconds.append(t.end - t.start)
        text_tokens += t.text_tokens
        frames += t.frames
    row = {
        "key": window.key,
        "recording_id": window.recording_id,
        "window": window.window,
        "shard": shard,
        "source": window.source,
        "n_positions": window.n_positions,
        "n_turns": len(turns),
        "n_speakers": len(speakers),
        "duration": sum(seconds),  # Window.duration, without a second pass
        "start": turns[0].start,
        "end": turns[-1].end,
        "text_tokens": text_tokens,
        "frames": frames,
    }
    row.update((f, meta.get(f)) for f in SOURCE_META)
    # quality metrics (tasks/metrics.py) and duplicate fingerprints: refilter and the report read these
    row["language"] = extra.get("language")
    row.update((k, metrics.get(k)) for k in WINDOW_METRICS)
    row["turn_seconds"] = seconds
    row["fp_text"] = signature_bytes(fp.get("fp_text"))
    row["fp_codes"] = signature_bytes(fp.get("fp_codes"))
    row["audio_hash"] = fp.get("audio_hash")
    return row


class DatasetExists(Exception):
    """Another run holds the dataset's lock."""


class DatasetWriteError(Exception):
    """Writing the dataset failed (disk full, quota, I/O error); nothing new was published."""


class DatasetWriter:
    """Writes samples into staging shards as they come; `publish` moves everything into place.

    A dataset grows across runs: new shards are numbered after the existing ones, and the index, rejects and
    recordings tables are extended, so a second run over the same sources adds nothing (`seen`). With
    `overwrite` the old dataset is replaced instead. A lock file keeps two runs from writing at once.
    """

    def __init__(self, dataset_dir: str | Path, cfg: ShardConfig, overwrite: bool = False) -> None:
        self.dir = str(dataset_dir)  # a local folder or an fsspec URL (tasks/storage.py)
        self.remote = storage.is_remote(self.dir)
        self._lock = self._take_lock()
        self.overwrite = overwrite
        manifest_url = storage.join(self.dir, "manifest.json")
        listed = set()
        self.previous: dict[str, Any] = {"shards": [], "index": [], "rejects": [], "recordings": [], "runs": []}
        if not overwrite and storage.exists(manifest_url):
            manifest = storage.read_json(manifest_url)
            listed = {e["path"] for e in manifest["shards"]}
            self.previous = {
                "shards": manifest["shards"], "runs": manifest.get("runs", []),
                **{t: storage.read_parquet(storage.join(self.dir, f"{t}.parquet"))
                   for t in ("index", "rejects", "recordings")},
            }
        if self.remote:
            # Object stores have no locks or renames: shards are staged on local disk and uploaded at publish.
            # One writer per dataset is the deployment's concurrency limit (and each partition of a fan-out
            # writes its own part); shards of a killed run are unlisted and overwritten by the next one.
            self.staging = Path(tempfile.mkdtemp(prefix="csm-staging-"))
        else:
            root = storage.local_path(self.dir)
            for stale in root.glob(".staging-*"):  # we hold the lock: these are from runs that were killed
                shutil.rmtree(stale, ignore_errors=True)
            for orphan in (root / "shards").glob("*.tar") if (root / "shards").exists() else []:
                if f"shards/{orphan.name}" not in listed and not overwrite:  # moved in by a run killed before its manifest
                    orphan.unlink()
            self.staging = root / f".staging-{os.getpid()}-{int(time.time())}"
        numbers = [int(Path(e["path"]).stem.split("-")[-1]) for e in self.previous["shards"]]
        (self.staging / "shards").mkdir(parents=True)
        self._pending: list[dict[str, Any]] = []  # index rows of the shard being written
        self.index: list[dict[str, Any]] = []
        self.rejects: list[Reject] = []
        self.recordings: list[dict[str, Any]] = []
        self.shards: list[str] = []
        self.dedupe = DuplicateIndex()  # the dataset's windows, earlier runs included: duplicates are rejected
        for row in self.previous["index"]:
            self.dedupe.add_row(row)
        self.dedupe.freeze()
        self._seen = {r["recording_id"] for r in self.previous["recordings"]} | {
            r["guid"] for r in self.previous["recordings"] if r.get("guid")}
        # webdataset's shards byte for byte (mtime 0: the same samples give the same shards), ~10x cheaper
        self._writer = ShardWriter(str(self.staging / "shards" / "shard-%06d.tar"), maxcount=cfg.max_samples,
                                   maxsize=cfg.max_bytes, post=self._shard_done, on_error=self._write_failed,
                                   start_shard=max(numbers, default=-1) + 1)

    def _take_lock(self) -> Any:
        """An exclusive lock on a local dataset (None on an object store: see __init__)."""
        import fcntl

        if self.remote:
            return None
        root = storage.local_path(self.dir)
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "w")  # noqa: SIM115 - held for the writer's lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise DatasetExists(f"{self.dir}: another ingest run is writing this dataset") from None
        return lock

    def seen(self, key: str) -> bool:
        """Was this recording id (content hash) or episode GUID ingested by an earlier run or this one?"""
        return key in self._seen

    def _shard_done(self, fname: str) -> None:
        name = f"shards/{Path(fname).name}"  # the writer opens a shard at its first sample: never an empty one
        self.shards.append(name)
        for row in self._pending:
            row["shard"] = name
        self.index += self._pending
        self._pending = []

    def write(self, window: Window, sample: dict[str, Any]) -> None:
        try:
            self._writer.write(sample)
        except OSError as exc:
            self._write_failed(exc)
        self._pending.append(index_row(window, ""))
        self.dedupe.add_row(self._pending[-1])

    def _write_failed(self, exc: BaseException) -> None:
        """Shard data could not be written: here, or in the writer's thread (found by a later write or by the
        writer's close at publish)."""
        self.abort()
        raise DatasetWriteError(f"{self.dir}: cannot write shard data ({getattr(exc, 'strerror', None) or exc}); "
                                "nothing from this run was published") from exc

    def add_recording(self, row: dict[str, Any], rejects: list[Reject]) -> None:
        """Record one processed recording (kept or not) and its rejects."""
        self.recordings.append(row)
        self.rejects.extend(rejects)
        self._seen.update(v for v in (row["recording_id"], row.get("guid")) if v)

    def publish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Close the last shard, hash the new ones, move them, the tables, and last the manifest into place."""
        try:
            return self._publish(manifest)
        except OSError as exc:
            self.abort()
            raise DatasetWriteError(f"{self.dir}: cannot publish the dataset ({exc.strerror or exc}); "
                                    "the previous manifest, if any, still stands") from exc

    def _publish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        try:
            self._writer.close()  # the last shard's last batch is written here
        except OSError as exc:
            self._write_failed(exc)
        per_shard = Counter(row["shard"] for row in self.index)
        entries = []
        for name in self.shards:
            path = self.staging / name
            entries.append({"path": name, "sha256": self._writer.sha256[str(path)], "samples": per_shard[name],
                            "bytes": path.stat().st_size})
        if self.overwrite:  # without its manifest the old dataset is no longer a dataset to any reader
            storage.remove(storage.join(self.dir, "manifest.json"))
            storage.remove(storage.join(self.dir, "shards"), recursive=True)
        if not self.remote:  # a local dataset always has its shards folder, even with none in it yet
            (storage.local_path(self.dir) / "shards").mkdir(exist_ok=True)
        for name in self.shards:
            storage.put(self.staging / name, storage.join(self.dir, name))
        index = self.previous["index"] + self.index
        rejects = self.previous["rejects"] + [r.model_dump() for r in self.rejects]
        recordings = self.previous["recordings"] + self.recordings
        tables = {}
        for t, rows, schema in (("index", index, INDEX_SCHEMA), ("rejects", rejects, REJECT_SCHEMA),
                                ("recordings", recordings, RECORDING_SCHEMA)):
            local = self.staging / f"{t}.parquet"
            _write_parquet(rows, schema, local)
            tables[t] = publish_table(local, self.dir, len(rows))
        run = {k: v for k, v in manifest.items() if k in ("created", "counts_this_run")}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            **{k: v for k, v in manifest.items() if k != "counts_this_run"},
            "counts": dataset_counts(index, rejects, recordings),
            "shards": self.previous["shards"] + entries,
            "new_shards": [e["path"] for e in entries],
            "runs": self.previous["runs"] + [run],
            **tables,
        }
        storage.write_json(storage.join(self.dir, "manifest.json"), manifest)  # last: it makes the rest visible
        self.close()
        return manifest

    def abort(self) -> None:
        """Leave nothing behind but what was published before."""
        try:
            self._writer.close()
        except OSError:
            pass  # the disk that failed the write may fail the close too; the staging folder goes anyway
        finally:
            self.close()

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()


def hours_by_reason(rejects: list[dict]) -> dict[str, float]:
    """Hours rejected per `stage:rule`, from rejects rows."""
    by_reason: dict[str, float] = {}
    for r in rejects:
        key = f"{r['stage']}:{r['rule'] or 'error'}"
        by_reason[key] = by_reason.get(key, 0.0) + (r["seconds"] or 0.0) / 3600
    return by_reason


def dataset_counts(index: list[dict], rejects: list[dict], recordings: list[dict]) -> dict[str, Any]:
    """The dataset's totals, from its tables (so they stay right as runs add to it)."""
    return {
        "recordings": len(recordings),
        "recordings_failed": sum(1 for r in recordings if r["status"] == "failed"),
        "hours_in": sum(r["duration"] or 0.0 for r in recordings) / 3600,
        "hours_kept": sum(r["duration"] for r in index) / 3600,
        "hours_rejected_by_reason": hours_by_reason(rejects),
        "windows": len(index),
        "turns": sum(r["n_turns"] for r in index),
        "rejects": len(rejects),
    }


INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("recording_id", pa.string()), ("window", pa.int32()), ("shard", pa.string()),
    ("source", pa.string()), ("n_positions", pa.int32()), ("n_turns", pa.int32()), ("n_speakers", pa.int32()),
    ("duration", pa.float64()), ("start", pa.float64()), ("end", pa.float64()), ("text_tokens", pa.int32()),
    ("frames", pa.int32()), *[(f, pa.string()) for f in SOURCE_META],
    # added with the quality metrics (additive: older datasets read them as null)
    ("language", pa.string()), *[(k, pa.float64()) for k in WINDOW_METRICS],
    ("turn_seconds", pa.list_(pa.float64())), ("fp_text", pa.binary()), ("fp_codes", pa.binary()),
    ("audio_hash", pa.string()),
])
REJECT_SCHEMA = pa.schema([
    ("recording_id", pa.string()), ("source", pa.string()), ("stage", pa.string()), ("level", pa.string()),
    ("reason", pa.string()), ("rule", pa.string()), ("value", pa.float64()), ("threshold", pa.float64()),
    ("start", pa.float64()), ("end", pa.float64()), ("seconds", pa.float64()),
])
RECORDING_SCHEMA = pa.schema([
    ("recording_id", pa.string()), ("source", pa.string()), ("status", pa.string()), ("duration", pa.float64()),
    ("windows", pa.int32()), ("language", pa.string()), ("guid", pa.string()), ("feed", pa.string()),
    ("title", pa.string()), ("published", pa.string()), ("url", pa.string()), ("ingested", pa.string()),
    *[(k, pa.float64()) for k in RECORDING_METRICS],
])


def _write_parquet(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def publish_table(local: Path, dataset_dir: str | Path, rows: int) -> dict[str, Any]:
    """Move a finished local table into the dataset under its file name; returns its manifest entry.

    The file is fsynced first: the manifest written after it must not list a table a crash could tear (the
    shards get the same at the writer's close)."""
    with open(local, "rb") as f:
        os.fsync(f.fileno())
    entry = {"path": local.name, "sha256": sha256_file(local), "rows": rows}
    storage.put(local, storage.join(dataset_dir, local.name))
    return entry


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
