"""Writing WebDataset shards fast: the bytes of `webdataset.ShardWriter(..., mtime=0)`, a tenth of the cost.

Why not webdataset's writer: its TarWriter goes through `tarfile.addfile` per member (a TarInfo copied and
serialised in Python, the payload copied into a BytesIO and re-buffered in 10 KiB pieces by tarfile's
stream) and `json.dumps`; for our 3-member samples that came to ~0.5 ms a sample, several times the cost of
writing the bytes (docs/performance.md, `python -m bench shards`). Here a ustar header is a template plus name,
size and checksum, a sample's arrays go to `os.writev` as they are (no copies), and a background thread hashes
and fsyncs finished shards while the next one is written. Readers are unchanged (webdataset's tar
iterators, tarfile); tests/test_tarwriter.py checks the tars are byte for byte webdataset's.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import queue
import tarfile
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import orjson

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads an archive to whole records


def _template() -> tuple[bytes, bytes, bytes]:
    """The fields of webdataset's member headers that do not depend on the member (ustar, mode 0444, uid and
    gid 0, mtime 0, user and group "bigdata"), from tarfile itself so they follow its version."""
    info = tarfile.TarInfo("x")
    info.mode, info.mtime, info.uname, info.gname = 0o444, 0, "bigdata", "bigdata"
    buf = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return buf[100:124], buf[136:148], buf[156:]  # mode..gid, mtime, typeflag..end (name, size, chksum vary)


_HEAD, _MTIME, _TAIL = _template()
_FIXED_SUM = sum(_HEAD) + sum(_MTIME) + 8 * ord(" ") + sum(_TAIL)  # the checksum counts its own field as spaces
_ZEROS = bytes(BLOCK)


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for webdataset's members (names of up to 100 bytes)."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"{name}: tar member names are limited to 100 bytes")
    if size >= 8**11:
        raise ValueError(f"{name}: {size} bytes is too large for a ustar member")
    size_field = b"%011o\0" % size
    chksum = _FIXED_SUM + sum(raw) + sum(size_field)
    return raw.ljust(100, b"\0") + _HEAD + size_field + _MTIME + b"%06o\0 " % chksum + _TAIL


@lru_cache(maxsize=8192)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    if dtype.hasobject:
        raise ValueError("object arrays are not written")
    buf = io.BytesIO()  # numpy's own header bytes (v1.0, as np.save writes them), once per dtype and shape
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def encode(key: str, value: Any) -> tuple[bytes | memoryview, ...]:
    """A member's bytes (as pieces) by its extension: bytes as they are, `npy` arrays as np.save writes them,
    `json` with orjson (valid JSON like json.dumps' output, though not byte-identical: no spaces, UTF-8; and
    a tenth of its time on our samples, whose metrics are many floats)."""
    if key.endswith("npy") and isinstance(value, np.ndarray):
        arr = value if value.flags.c_contiguous else np.ascontiguousarray(value)
        return _npy_header(arr.dtype, arr.shape), memoryview(arr).cast("B")
    if isinstance(value, bytes | bytearray | memoryview):
        return (value,)
    if isinstance(value, str):
        return (value.encode(),)
    if key.endswith("npy"):
        return encode(key, np.asarray(value))
    if key.endswith("json"):
        return (orjson.dumps(value),)
    raise ValueError(f"{key}: no encoder for {type(value).__name__}")


class ShardWriter:
    """`webdataset.ShardWriter(pattern, maxcount, maxsize, post, start_shard, mtime=0)`, the same shards.

    A shard is opened at its first sample; `post(fname)` runs when a shard has its last sample written.
    Nothing is copied: a sample's members are pieces (headers, json bytes, views of its arrays, padding) that
    go to the file with one `os.writev` per `batch_bytes`, from the caller's thread (a writing thread would
    wait for the GIL after every write while the caller encodes: that cost more than the writes), so a
    sample's arrays must not change until a later `write` or `close` (they are written from where they are). A
    background thread hashes each finished shard from the page cache (`sha256[fname]`, one GIL-free call)
    while the next one is written, and fsyncs it late (`_run_sync`). `close()` waits for all of it. What the
    thread met is raised by the next `write` or by `close`, once; or, with `on_error`, handed to it there
    instead (so a caller can report a failed write as such even when `close` finds it). Write errors in the
    caller's thread are raised as they happen.
    """

    def __init__(self, pattern: str, maxcount: int, maxsize: float, post: Callable[[str], None] | None = None,
                 start_shard: int = 0, on_error: Callable[[BaseException], None] | None = None,
                 batch_bytes: int = 8 << 20) -> None:
        self.pattern, self.maxcount, self.maxsize, self.post = pattern, maxcount, maxsize, post
        self.on_error, self.batch_bytes = on_error, batch_bytes
        self._reported = False
        self.shard = start_shard
        self.fname: str | None = None
        self._fd = -1
        self.count = self.size = self.offset = 0
        self.sha256: dict[str, str] = {}
        self._error: BaseException | None = None
        self._batch: list[bytes | memoryview] = []
        self._batch_n = 0
        self._done: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run_sync, name="shard-sha256-fsync", daemon=True)
        self._thread.start()

    def write(self, sample: dict[str, Any]) -> None:
        self._raise()
        if "__key__" not in sample:
            raise ValueError("object must contain a __key__")
        if self.fname is None or self.count >= self.maxcount or self.size >= self.maxsize:
            self._next()
        key, batch, total = sample["__key__"], self._batch, 0
        for ext in sorted(k for k in sample if not k.startswith("_")):  # webdataset's member order
            pieces = encode(ext, sample[ext])
            n = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in pieces)
            pad = -n % BLOCK
            batch.append(member_header(f"{key}.{ext}", n))
            batch += pieces
            if pad:
                batch.append(_ZEROS[:pad])
            self.size += n
            total += BLOCK + n + pad
        self.offset += total
        self._batch_n += total
        self.count += 1
        if self._batch_n >= self.batch_bytes:
            self._flush()

    def close(self) -> None:
        """Finish the last shard and wait for every byte to be on disk."""
        try:
            self._finish()
        finally:
            if self._thread.is_alive():
                self._done.put(None)
                self._thread.join()
        self._raise()

    def _flush(self) -> None:
        batch, self._batch, self._batch_n = self._batch, [], 0
        if batch:
            _writev(self._fd, batch)

    def _next(self) -> None:
        self._finish()
        fname = self.pattern % self.shard
        self._fd = os.open(fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # RDWR: hashed through a mapping
        self.fname = fname
        self.shard += 1
        self.count = self.size = self.offset = 0

    def _finish(self) -> None:
        if self.fname is None:
            return
        fd, fname = self._fd, self.fname
        try:
            self._batch.append(bytes(2 * BLOCK + (-(self.offset + 2 * BLOCK)) % RECORD))  # end of archive
            self._flush()
        except BaseException:
            os.close(fd)
            raise
        finally:
            self.fname, self._fd = None, -1
        self._done.put((fd, fname))
        if self.post is not None:
            self.post(fname)

    def _raise(self) -> None:
        if self._error is None or self._reported:
            return
        self._reported = True
        if self.on_error is None:
            raise self._error
        self.on_error(self._error)

    def _run_sync(self, pending: int = 64) -> None:
        # fsync late, at close or once `pending` shards wait: an fsync while the next shard was being written
        # stalled those writes (docs/performance.md), and by then writeback has usually done the work.
        done: list[int] = []
        while True:
            item = self._done.get()
            if item is not None:
                fd, fname = item
                done.append(fd)
                try:
                    if self._error is None:
                        self.sha256[fname] = _sha256_fd(fd)
                        _start_writeback(fd)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc
            while done and (item is None or len(done) > pending):
                fd = done.pop(0)
                try:
                    if self._error is None:
                        os.fsync(fd)  # the manifest, written after close(), must not list a torn shard
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc
                finally:
                    os.close(fd)
            if item is None:
                return


def _writeback_starter() -> Callable[[int], None]:
    """Linux's sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE): start writing a file back, without waiting
    (so the fsync at close finds it mostly on disk). A no-op where libc has no such call."""
    import ctypes
    import sys

    def nothing(fd: int) -> None:
        pass

    if not sys.platform.startswith("linux"):
        return nothing
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return nothing
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd: fn(fd, 0, 0, 2)  # a hint: its failure is the fsync's to report


_start_writeback = _writeback_starter()


def _sha256_fd(fd: int) -> str:
    size = os.fstat(fd).st_size
    if size == 0:
        return hashlib.sha256().hexdigest()
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as m:
        return hashlib.sha256(m).hexdigest()


IOV_MAX = 1024  # Linux's limit on the pieces of one writev


def _writev(fd: int, pieces: list[bytes | memoryview]) -> None:
    """Write all of `pieces`, in order (a writev may be partial: a signal, a nearly full disk)."""
    for i in range(0, len(pieces), IOV_MAX):
        chunk = pieces[i : i + IOV_MAX]
        want = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in chunk)
        done = os.writev(fd, chunk)
        if done == want:
            continue
        for piece in chunk:  # the rest, piece by piece
            view = memoryview(piece).cast("B")
            if done >= view.nbytes:
                done -= view.nbytes
                continue
            view, done = view[done:], 0
            while view:
                view = view[os.write(fd, view) :]
