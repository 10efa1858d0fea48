"""Where datasets live: a local folder or an fsspec URL (s3://, gs://, az://, memory://...).

Everything that reads or writes a dataset's files goes through these few functions, so the same code serves
a laptop's disk and an object store. Writes are whole-object (a shard, a table, the manifest): an object
store makes each one visible at once, and locally a temporary name plus `os.replace` does the same.
S3-compatible endpoints (MinIO, moto, R2...) are configured the fsspec way, e.g. FSSPEC_S3_ENDPOINT_URL or
AWS_ENDPOINT_URL, credentials from the usual AWS variables.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.core import url_to_fs

if TYPE_CHECKING:
    import pyarrow as pa


def is_remote(url: str | Path) -> bool:
    """An fsspec URL other than a plain path or file://."""
    s = str(url)
    return "://" in s and not s.startswith("file://")


def local_path(url: str | Path) -> Path:
    return Path(str(url).removeprefix("file://"))


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a path or a URL (URLs always use `/`)."""
    if not is_remote(base):
        return str(local_path(base).joinpath(*parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def parent(url: str | Path) -> str:
    return str(local_path(url).parent) if not is_remote(url) else str(url).rstrip("/").rsplit("/", 1)[0]


def exists(url: str | Path) -> bool:
    if not is_remote(url):
        return local_path(url).exists()
    fs, path = url_to_fs(str(url))
    return fs.exists(path)


def read_bytes(url: str | Path) -> bytes:
    with fsspec.open(str(url), "rb") as f:
        return f.read()


def open_read(url: str | Path) -> Any:
    """A binary file object for reading (a context manager), local or remote."""
    return fsspec.open(str(url), "rb")


def read_json(url: str | Path) -> Any:
    return json.loads(read_bytes(url))


def write_bytes(url: str | Path, data: bytes) -> None:
    """Write a whole file so that a reader sees the old content or the new one, never a part."""
    if not is_remote(url):
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())  # on disk before the rename: after a crash, the old file or the whole new one
        os.replace(tmp, path)
        return
    fs, path = url_to_fs(str(url))
    fs.pipe_file(path, data)  # one PUT: visible whole or not at all


def write_json(url: str | Path, data: Any) -> None:
    write_bytes(url, json.dumps(data, indent=2, default=str).encode())


def put(local: Path, url: str | Path) -> None:
    """Move a finished local file to `url` (a rename on the same disk, an upload to an object store)."""
    if not is_remote(url):
        dest = local_path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(local, dest)
        except OSError as exc:  # another filesystem: copy under a temporary name, then rename
            if exc.errno != 18:  # EXDEV
                raise
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)
            local.unlink()
        return
    fs, path = url_to_fs(str(url))
    fs.put_file(str(local), path)
    local.unlink()


def remove(url: str | Path, recursive: bool = False) -> None:
    """Remove a file (or a folder with `recursive`); a missing one is fine."""
    if not is_remote(url):
        path = local_path(url)
        if recursive:
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    fs, path = url_to_fs(str(url))
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def sha256(url: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with fsspec.open(str(url), "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_parquet(url: str | Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """A parquet table's rows; [] if the file does not exist."""
    import pyarrow.parquet as pq

    if not exists(url):
        return []
    with fsspec.open(str(url), "rb") as f:
        return pq.read_table(f, columns=columns).to_pylist()


def read_table(url: str | Path, columns: list[str]) -> pa.Table | None:
    """Those of `columns` that a parquet table has, as an arrow Table (tables of older datasets lack the
    newer columns); None if the file does not exist. Only these columns are read from the file."""
    import pyarrow.parquet as pq

    if not exists(url):
        return None
    with fsspec.open(str(url), "rb") as f:
        table = pq.ParquetFile(f)
        have = set(table.schema_arrow.names)
        return table.read(columns=[c for c in columns if c in have])


def display(url: str | Path) -> str:
    """How a log line or an event names a file: an absolute path locally, the URL otherwise."""
    return str(url) if is_remote(url) else str(local_path(url).resolve())
