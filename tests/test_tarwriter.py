"""tasks.tarwriter writes the same tar bytes as webdataset's ShardWriter, and fails like a writer should."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
import webdataset as wds

from tasks.tarwriter import ShardWriter


def _samples(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        frames = int(rng.integers(0, 300))
        meta = {"recording_id": "rec-é", "window": i, "metrics": {"snr_db": float(rng.normal())}, "x": None}
        out.append({"__key__": f"rec-{i:03d}_w{i:05d}", "json": meta,
                    "codes.npy": rng.integers(0, 2048, (frames, 32)).astype(np.int16),
                    "text.npy": rng.integers(0, 60000, int(rng.integers(0, 500))).astype(np.int32)})
    return out


def _write(writer_cls, pattern: str, samples: list[dict], **kw) -> list[str]:
    done: list[str] = []
    w = writer_cls(pattern, maxcount=7, maxsize=3e5, post=done.append, **kw)
    for s in samples:
        w.write(s)
    w.close()
    return done


def test_same_bytes_as_webdataset(tmp_path: Path) -> None:
    samples = _samples(40)
    ours = _write(ShardWriter, str(tmp_path / "a-%06d.tar"), samples, start_shard=3)
    # webdataset encodes json with json.dumps; give it our json bytes so the tar layer is what is compared
    as_bytes = [{**s, "json": orjson.dumps(s["json"])} for s in samples]
    theirs = _write(wds.ShardWriter, str(tmp_path / "b-%06d.tar"), as_bytes, start_shard=3, verbose=0, mtime=0)
    assert [Path(p).name[2:] for p in ours] == [Path(p).name[2:] for p in theirs]
    assert len(ours) > 2
    for a, b in zip(ours, theirs, strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_sha256_and_readback(tmp_path: Path) -> None:
    import hashlib

    samples = _samples(10)
    w = ShardWriter(str(tmp_path / "s-%06d.tar"), maxcount=4, maxsize=1e9)
    for s in samples:
        w.write(s)
    w.close()
    files = sorted(tmp_path.glob("*.tar"))
    assert {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files} == w.sha256
    read = list(wds.DataPipeline(wds.SimpleShardList([str(f) for f in files]), wds.tarfile_to_samples(),
                                 wds.decode()))
    assert [r["__key__"] for r in read] == [s["__key__"] for s in samples]
    for r, s in zip(read, samples, strict=True):
        assert r["json"] == s["json"]
        np.testing.assert_array_equal(r["codes.npy"], s["codes.npy"])
        assert r["text.npy"].dtype == np.int32


def test_write_error_surfaces(tmp_path: Path) -> None:
    w = ShardWriter(str(tmp_path / "missing" / "s-%06d.tar"), maxcount=4, maxsize=1e9)
    with pytest.raises(FileNotFoundError):
        w.write(_samples(1)[0])  # the shard is opened at its first sample, in the caller's thread
    w.close()  # nothing left to finish; the hashing thread stops


def test_background_error_surfaces_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error in the background thread (reading a finished shard back to hash it) reaches the caller
    once, at a later write or at close, and no hash is recorded for that shard."""
    import errno

    from tasks import tarwriter

    def failing_read(fd: int) -> str:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(tarwriter, "_sha256_fd", failing_read)
    seen: list[BaseException] = []
    w = ShardWriter(str(tmp_path / "s-%06d.tar"), maxcount=1, maxsize=1e9, on_error=seen.append)
    for s in _samples(3):
        w.write(s)  # one sample per shard: each write finishes the shard before
    w.close()
    assert len(seen) == 1 and isinstance(seen[0], OSError) and seen[0].errno == errno.EIO
    assert w.sha256 == {}
