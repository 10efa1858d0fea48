"""Read a dataset back and check it against its manifest and the v1 sample contract.

The reader never unpickles: members are raw bytes, `.npy` goes through np.load(allow_pickle=False).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tasks import storage
from tasks.shards import NUM_CODEBOOKS, SCHEMA_VERSION

TURN_FIELDS = ("speaker", "text", "start", "end", "text_tokens", "frames")


class InvalidDataset(Exception):
    """The directory is not a complete, valid dataset; the message says why."""


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The dataset's manifest.json (a local folder or an fsspec URL)."""
    path = storage.join(dataset_dir, "manifest.json")
    if not storage.exists(path):
        raise InvalidDataset(f"{dataset_dir}: no manifest.json (not a dataset, or a run that did not finish)")
    manifest = storage.read_json(path)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise InvalidDataset(f"{path}: schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return manifest


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members -> json dict and int arrays, with no pickle anywhere."""
    return {
        "__key__": raw["__key__"],
        "json": json.loads(raw["json"]),
        "codes": np.load(io.BytesIO(raw["codes.npy"]), allow_pickle=False),
        "text": np.load(io.BytesIO(raw["text.npy"]), allow_pickle=False),
    }


def check_member_names(raw: dict[str, Any]) -> dict[str, Any]:
    """Refuse a sample whose tar member names could escape a directory (absolute paths, `..`)."""
    name = raw.get("__key__", "")
    if name.startswith("/") or ".." in Path(name).parts or "\\" in name:
        raise InvalidDataset(f"{raw.get('__url__', '?')}: unsafe tar member name {name!r}")
    return raw


def iter_samples(shard_paths: list[str]) -> Iterator[dict[str, Any]]:
    """Decoded samples of shards given as paths or fsspec URLs."""
    import fsspec
    import webdataset as wds

    def streams() -> Iterator[dict[str, Any]]:
        for url in shard_paths:
            with fsspec.open(str(url), "rb") as stream:
                yield {"url": str(url), "stream": stream}

    for raw in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(streams())):
        yield decode_sample(check_member_names(raw))


def check_sample(s: dict[str, Any], max_positions: int = 2048, frame_rate: float = 12.5) -> list[str]:
    """Problems with one decoded sample against contract v1 (empty list = valid)."""
    key, meta, codes, text = s["__key__"], s["json"], s["codes"], s["text"]
    problems = []
    expected_key = f"{meta.get('recording_id')}_w{meta.get('window', -1):05d}"
    if key != expected_key or "." in key:
        problems.append(f"{key}: key should be {expected_key} (no dots)")
    for field in ("recording_id", "window", "source", "n_positions", "turns"):
        if field not in meta:
            problems.append(f"{key}: json lacks {field}")
    if problems:
        return problems
    turns = meta["turns"]
    for i, t in enumerate(turns):
        missing = [f for f in TURN_FIELDS if f not in t]
        if missing:
            problems.append(f"{key}: turn {i} lacks {missing}")
        elif t["frames"] != max(1, math.ceil(round((t["end"] - t["start"]) * frame_rate, 6))):
            problems.append(f"{key}: turn {i} frames {t['frames']} != ceil(duration x {frame_rate})")
    if problems:
        return problems
    n = sum(t["text_tokens"] + t["frames"] + 1 for t in turns)
    if meta["n_positions"] != n:
        problems.append(f"{key}: n_positions {meta['n_positions']} != {n} from its turns")
    if n > max_positions:
        problems.append(f"{key}: {n} positions > max_positions {max_positions}")
    if codes.ndim != 2 or codes.shape != (sum(t["frames"] for t in turns), NUM_CODEBOOKS):
        problems.append(f"{key}: codes shape {codes.shape} != (sum of frames, {NUM_CODEBOOKS})")
    if not np.issubdtype(codes.dtype, np.integer) or (codes.size and (codes.min() < 0 or codes.max() >= 2048)):
        problems.append(f"{key}: codes must be integers in [0, 2048)")
    if text.dtype != np.int32 or text.shape != (sum(t["text_tokens"] for t in turns),):
        problems.append(f"{key}: text ids {text.dtype}{text.shape} != int32 (sum of text_tokens,)")
    return problems


def verify_dataset(dataset_dir: str | Path) -> dict[str, Any]:
    """Check every shard's sha256 against the manifest and every sample against the contract and the index.
    Raises InvalidDataset listing the problems; returns counts when all is well."""
    root = str(dataset_dir)
    manifest = load_manifest(root)
    max_positions = manifest.get("config", {}).get("windows", {}).get("max_positions", 2048)
    problems: list[str] = []
    for entry in manifest["shards"]:
        path = storage.join(root, entry["path"])
        if Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts:
            problems.append(f"{entry['path']}: shard path must stay inside the dataset")
        elif not storage.exists(path):
            problems.append(f"{path}: listed in the manifest but missing")
        elif storage.sha256(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 does not match the manifest")
    if problems:
        raise InvalidDataset("\n".join(problems))
    index = storage.read_parquet(storage.join(root, "index.parquet"))
    by_key = {row["key"]: row for row in index}
    seen = 0
    for entry in manifest["shards"]:
        for s in iter_samples([storage.join(root, entry["path"])]):
            seen += 1
            problems += check_sample(s, max_positions)
            row = by_key.get(s["__key__"])
            if row is None or row["shard"] != entry["path"] or row["n_positions"] != s["json"]["n_positions"]:
                problems.append(f"{s['__key__']}: index row missing or disagrees with the sample")
    if seen != len(index):
        problems.append(f"{seen} samples in the shards, {len(index)} rows in index.parquet")
    if problems:
        raise InvalidDataset("\n".join(problems[:50]))
    return {"shards": len(manifest["shards"]), "samples": seen}
