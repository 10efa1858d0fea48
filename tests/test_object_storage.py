"""Datasets on an S3-compatible object store (moto server on loopback): written, appended to, verified,
ingested into from S3 sources by the real CLI, and streamed by the training loader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from tasks import storage
from tasks.verify import InvalidDataset, verify_dataset
from tests.s3server import BUCKET
from tests.test_shards import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_dataset_written_appended_and_verified_on_s3(s3) -> None:
    url = f"s3://{BUCKET}/unit/ds"
    manifest, expected = write_dataset(url)
    fs = fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url, detail=False))
    assert names == ["index.parquet", "manifest.json", "recordings.parquet", "rejects.parquet", "shards"]
    assert verify_dataset(url) == {"shards": len(manifest["shards"]), "samples": len(expected)}
    # a second run appends after the existing shards; the first run's stay as they were
    first = {e["path"]: e["sha256"] for e in manifest["shards"]}
    again, more = write_dataset(url, n_recordings=2, seed=1, prefix="more")
    assert {e["path"]: e["sha256"] for e in again["shards"][: len(first)]} == first
    assert set(again["new_shards"]).isdisjoint(first)
    assert verify_dataset(url)["samples"] == len(expected) + len(more)
    assert storage.read_json(f"{url}/manifest.json")["counts"]["windows"] == len(expected) + len(more)
    # a changed shard is caught through the store too
    victim = f"{url}/{again['shards'][0]['path']}"
    fs.pipe_file(victim.removeprefix("s3://"), b"not a tar")
    with pytest.raises(InvalidDataset, match="sha256"):
        verify_dataset(url)


@pytest.mark.slow
def test_ingest_from_s3_to_s3_and_train_streaming_from_s3(s3, offline_models, prefect_home, tmp_path) -> None:
    from tasks.synth import make_dialogue
    from training.config import TrainConfig
    from training.train import run

    fs = fsspec.filesystem("s3")
    local = tmp_path / "in" / "talk.mp3"
    make_dialogue(local, repeat=1)
    fs.put_file(str(local), f"{BUCKET}/raw/talk.mp3")
    env = {**prefect_home, **s3, "CSM_CACHE_DIR": str(tmp_path / "cache")}
    out = f"s3://{BUCKET}/datasets"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", f"s3://{BUCKET}/raw/", "--out", out,
                           "--dataset", "talks", "--config", str(offline_models)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    url = f"{out}/talks"
    manifest = storage.read_json(f"{url}/manifest.json")
    assert manifest["counts"]["windows"] >= 1 and manifest["shards"]
    assert manifest["config"]["out"] == out
    assert fs.exists(f"{BUCKET}/datasets/talks/report/index.html")  # the report is uploaded next to it
    # the CLI verifies it in place, reading shards from the store
    check = subprocess.run([sys.executable, "-m", "flows.cli", "verify", url], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.startswith("OK:"), check.stdout + check.stderr
    # nothing but the local cache was written on this machine
    assert not (ROOT / "s3:").exists() and (tmp_path / "cache").is_dir()
    # the training loader streams the shards straight from S3
    result = run(f"{url}/manifest.json", TrainConfig(model_size="tiny", batch_size=1, grad_accum=1, num_workers=0,
                                                      max_steps=2, warmup_steps=0, eval_fraction=0.0,
                                                      shuffle_buffer=2, bucket_batches=1, export_final=False,
                                                      tensorboard=False, out_dir=str(tmp_path / "train")))
    assert result.step == 2 and result.stopped == "max_steps"
