"""Shard writing round trip: WebDataset shards, index, rejects and manifest, read back without pickle."""

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.config import ShardConfig, WindowConfig
from schemas.records import Reject
from tasks.shards import DatasetExists, DatasetWriter, sha256_file, window_sample
from tasks.verify import InvalidDataset, iter_samples, verify_dataset
from tasks.windows import pack_windows
from tests.test_windows import random_turns, tokenize


def write_dataset(root, n_recordings=3, max_samples=4, seed=0, prefix="rec"):
    rng = random.Random(seed)
    writer = DatasetWriter(root, ShardConfig(max_samples=max_samples))
    expected = {}
    for r in range(n_recordings):
        turns = random_turns(rng, 30)
        windows, _ = pack_windows(f"{prefix}{r}-abc", f"file:///{prefix}{r}.wav", turns, tokenize, WindowConfig(max_positions=512))
        codes = np.random.default_rng(r).integers(0, 2048, (int(turns[-1].end * 12.5) + 2, 32))
        for w in windows:
            sample = window_sample(w, codes)
            expected[w.key] = sample
            writer.write(w, sample)
        row = {"recording_id": f"{prefix}{r}-abc", "source": f"file:///{prefix}{r}.wav", "status": "kept",
               "duration": turns[-1].end, "windows": len(windows)}
        writer.add_recording(row, [Reject(recording_id=f"{prefix}{r}-abc", source="s", stage="quality", level="turn",
                                          reason="too short", rule="too_short", seconds=0.2)])
    manifest = writer.publish({"dataset": "t", "config": {"windows": {"max_positions": 512}}})
    return manifest, expected


def test_round_trip(tmp_path) -> None:
    root = tmp_path / "ds"
    manifest, expected = write_dataset(root)
    assert len(manifest["shards"]) == -(-len(expected) // 4)  # max_samples=4 per shard
    assert verify_dataset(root) == {"shards": len(manifest["shards"]), "samples": len(expected)}
    # the layout of contract v1, and nothing half-written left behind
    assert sorted(p.name for p in root.iterdir() if p.name != ".lock") == ["index.parquet", "manifest.json", "recordings.parquet", "rejects.parquet", "shards"]
    assert all(p.name.startswith("shard-") and p.suffix == ".tar" for p in (root / "shards").iterdir())
    got = {s["__key__"]: s for s in iter_samples([str(root / e["path"]) for e in manifest["shards"]])}
    assert got.keys() == expected.keys()
    for key, s in got.items():
        np.testing.assert_array_equal(s["codes"], expected[key]["codes.npy"])
        np.testing.assert_array_equal(s["text"], expected[key]["text.npy"])
        assert s["json"]["n_positions"] == expected[key]["json"]["n_positions"]
    for e in manifest["shards"]:
        assert sha256_file(root / e["path"]) == e["sha256"]
    assert pq.read_table(root / "rejects.parquet").num_rows == 3
    assert sum(e["samples"] for e in manifest["shards"]) == pq.read_table(root / "index.parquet").num_rows


def test_tampered_shard_is_refused(tmp_path) -> None:
    root = tmp_path / "ds"
    manifest, _ = write_dataset(root, n_recordings=1)
    shard = root / manifest["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(InvalidDataset, match="sha256"):
        verify_dataset(root)


def test_directory_without_manifest_is_refused(tmp_path) -> None:
    root = tmp_path / "ds"
    write_dataset(root, n_recordings=1)
    (root / "manifest.json").unlink()
    with pytest.raises(InvalidDataset, match="no manifest.json"):
        verify_dataset(root)


def test_second_run_appends_and_knows_what_it_has(tmp_path) -> None:
    root = tmp_path / "ds"
    first, expected = write_dataset(root, n_recordings=2)
    w = DatasetWriter(root, ShardConfig(max_samples=4))
    assert w.seen("rec0-abc") and w.seen("rec1-abc") and not w.seen("rec9-abc")
    turns = random_turns(random.Random(9), 20)
    windows, _ = pack_windows("rec9-abc", "file:///rec9.wav", turns, tokenize, WindowConfig(max_positions=512))
    codes = np.zeros((int(turns[-1].end * 12.5) + 2, 32), dtype=np.int16)
    for win in windows:
        w.write(win, window_sample(win, codes))
    w.add_recording({"recording_id": "rec9-abc", "source": "s", "status": "kept", "duration": 1.0,
                     "windows": len(windows)}, [])
    second = w.publish({"dataset": "t"})
    # old shards untouched, new ones numbered after them
    assert second["shards"][: len(first["shards"])] == first["shards"]
    numbers = [int(e["path"][-10:-4]) for e in second["shards"]]
    assert numbers == list(range(len(numbers)))
    assert second["counts"]["windows"] == len(expected) + len(windows)
    assert second["counts"]["recordings"] == 3 and len(second["runs"]) == 2
    assert verify_dataset(root)["samples"] == len(expected) + len(windows)


def test_concurrent_writer_is_refused(tmp_path) -> None:
    w = DatasetWriter(tmp_path / "ds", ShardConfig())
    with pytest.raises(DatasetExists, match="another ingest run"):
        DatasetWriter(tmp_path / "ds", ShardConfig())
    w.abort()
    DatasetWriter(tmp_path / "ds", ShardConfig()).abort()  # the lock is released


def test_overwrite_replaces_the_dataset(tmp_path) -> None:
    root = tmp_path / "ds"
    write_dataset(root, n_recordings=1)
    w = DatasetWriter(root, ShardConfig(), overwrite=True)
    manifest = w.publish({"dataset": "t"})
    assert manifest["shards"] == [] and not any((root / "shards").iterdir())
    assert json.loads((root / "manifest.json").read_text())["index"]["rows"] == 0


def test_abort_leaves_nothing(tmp_path) -> None:
    root = tmp_path / "ds"
    w = DatasetWriter(root, ShardConfig())
    w.abort()
    assert [p.name for p in root.iterdir()] == [".lock"]


def test_unsafe_member_names_are_refused(tmp_path) -> None:
    import io
    import tarfile

    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("../../etc/x.json", "../../etc/x.codes.npy"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(InvalidDataset, match="unsafe tar member"):
        list(iter_samples([str(shard)]))


def test_verify_cli(tmp_path) -> None:
    from flows.cli import main

    root = tmp_path / "ds"
    write_dataset(root, n_recordings=1)
    assert main(["verify", str(root)]) == 0
    (root / "manifest.json").unlink()
    assert main(["verify", str(root)]) == 1


DISK_FULL_SCRIPT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from tests.test_shards import write_dataset
from tasks.shards import DatasetWriteError
try:
    write_dataset(sys.argv[1], n_recordings=3, max_samples=1000)
except DatasetWriteError as exc:
    print("ERROR:", exc)
    sys.exit(3)
"""


def test_full_disk_fails_clearly_and_publishes_nothing(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(root)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "cannot write shard data" in proc.stdout and "nothing from this run was published" in proc.stdout
    assert not (root / "manifest.json").exists()
    assert not list(root.rglob("*.tar")) and not list(root.glob(".staging-*"))
    with pytest.raises(InvalidDataset):
        verify_dataset(root)
