"""Per-recording, per-stage results on disk, so a killed run redoes only unfinished work.

Our own small cache rather than Prefect task caching: stage inputs are large arrays and loaded models, which
Prefect would have to hash or serialise on every call. The key is the recording's content hash, the stage's
config and the models' identities (hub id or local path plus its PROVENANCE.json); a changed config or model
is a miss. Entries are written to a temporary name and renamed, so a kill never leaves a torn entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

T = TypeVar("T", bound=BaseModel)


class StageCache:
    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None
        self.hits = 0
        self.misses = 0

    def path(self, stage: str, recording_id: str, parts: Any, suffix: str) -> Path | None:
        if self.root is None:
            return None
        digest = hashlib.sha256(json.dumps([stage, recording_id, parts], sort_keys=True, default=str).encode())
        return self.root / stage / f"{recording_id}-{digest.hexdigest()[:16]}{suffix}"

    def record(self, stage: str, recording_id: str, parts: Any, compute: Callable[[], T], model: type[T]) -> T:
        """A pydantic record from the cache, or computed and stored."""
        path = self.path(stage, recording_id, parts, ".json")
        if path is not None and path.exists():
            self.hits += 1
            return model.model_validate_json(path.read_bytes())
        self.misses += 1
        value = compute()
        if path is not None:
            _atomic_write(path, value.model_dump_json().encode())
        return value

    def array(self, stage: str, recording_id: str, parts: Any, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """An integer array (Mimi codes) from the cache, or computed and stored (.npy, never pickled)."""
        path = self.path(stage, recording_id, parts, ".npy")
        if path is not None and path.exists():
            self.hits += 1
            return np.load(path, allow_pickle=False)
        self.misses += 1
        value = compute()
        if path is not None:
            import io

            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            _atomic_write(path, buf.getvalue())
        return value


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
