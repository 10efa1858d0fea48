"""The ingest flow end to end on the offline model set: real whisperX, pyannote, Mimi and WebDataset code."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.shards import sha256_file
from tasks.verify import iter_samples, verify_dataset

pytestmark = pytest.mark.slow


def test_dataset_meets_contract(ingest_run) -> None:
    root = ingest_run["dir"]
    counts = verify_dataset(root)
    assert counts["samples"] > 0
    assert sorted(p.name for p in root.iterdir() if p.name != ".lock") == [
        "index.parquet", "manifest.json", "recordings.parquet", "rejects.parquet", "report", "shards"]
    assert (root / "report" / "index.html").exists()
    for entry in ingest_run["manifest"]["shards"]:
        assert re.fullmatch(r"shards/shard-\d{6}\.tar", entry["path"])
        assert sha256_file(root / entry["path"]) == entry["sha256"]


def test_samples_hold_the_conversation(ingest_run) -> None:
    root, manifest = ingest_run["dir"], ingest_run["manifest"]
    samples = list(iter_samples([str(root / e["path"]) for e in manifest["shards"]]))
    by_source: dict[str, list] = {}
    for s in samples:
        meta = s["json"]
        assert re.fullmatch(r"[A-Za-z0-9-]+_w\d{5}", s["__key__"])
        assert meta["source"].startswith("file://")
        assert meta["n_positions"] <= 2048
        assert s["codes"].shape == (sum(t["frames"] for t in meta["turns"]), 32)
        by_source.setdefault(meta["source"], []).append(s)
    assert len(by_source) == 2  # the mp3 and the opus; the text file is rejected
    dialogue = next(v for k, v in by_source.items() if k.endswith("dialogue.mp3"))
    turns = [t for s in sorted(dialogue, key=lambda s: s["json"]["window"]) for t in s["json"]["turns"]]
    # Two voices: the windows hold two speakers, renumbered from 0 in each window.
    assert all(s["json"]["turns"][0]["speaker"] == 0 for s in dialogue)
    assert max(t["speaker"] for t in turns) == 1
    # Turn order kept and times inside the recording.
    starts = [t["start"] for t in turns]
    assert starts == sorted(starts)
    duration = ingest_run["scripts"]["dialogue.mp3"]["duration"]
    assert 0 <= starts[0] and turns[-1]["end"] <= duration + 0.5
    # The transcript is the dialogue (real Whisper weights): most script words come back.
    said = " ".join(t["text"] for t in turns).lower()
    script_words = {w for t in ingest_run["scripts"]["dialogue.mp3"]["turns"] for w in re.findall(r"[a-z]+", t["text"].lower())}
    heard = set(re.findall(r"[a-z]+", said))
    assert len(script_words & heard) / len(script_words) > 0.7
    # Turns follow the script's speaker changes: diarization + turns split where the voice changes.
    assert len(turns) >= 0.6 * len(ingest_run["scripts"]["dialogue.mp3"]["turns"])


def test_text_ids_are_the_csm_turn_text(ingest_run, offline_models) -> None:
    import yaml

    from tokenizer.text import encode_turn_text, load_text_tokenizer

    tok = load_text_tokenizer(yaml.safe_load(offline_models.read_text())["tokenize"]["text"])
    root, manifest = ingest_run["dir"], ingest_run["manifest"]
    for s in iter_samples([str(root / e["path"]) for e in manifest["shards"]]):
        ids = [i for t in s["json"]["turns"] for i in encode_turn_text(tok, t["speaker"], t["text"])]
        np.testing.assert_array_equal(s["text"], np.array(ids, dtype=np.int32))


def test_bad_file_is_recorded_and_good_ones_kept(ingest_run) -> None:
    rejects = pq.read_table(ingest_run["dir"] / "rejects.parquet").to_pylist()
    bad = [r for r in rejects if "not-audio.wav" in r["source"]]
    assert len(bad) == 1 and bad[0]["stage"] == "decode" and bad[0]["level"] == "recording"
    assert "not-audio.wav" in bad[0]["reason"]
    counts = ingest_run["manifest"]["counts"]
    assert counts["recordings"] == 3 and counts["recordings_failed"] == 1


def test_manifest_accounts_and_names_the_weights(ingest_run) -> None:
    m = ingest_run["manifest"]
    assert m["schema_version"] == 1 and m["dataset"] == "demo"
    index = pq.read_table(ingest_run["dir"] / "index.parquet").to_pylist()
    assert m["counts"]["windows"] == len(index) == sum(e["samples"] for e in m["shards"])
    expected_in = sum(s["duration"] for s in ingest_run["scripts"].values())
    assert abs(m["counts"]["hours_in"] * 3600 - expected_in) < 1.0
    assert abs(m["counts"]["hours_kept"] * 3600 - sum(r["duration"] for r in index)) < 1e-6
    assert "real" in m["models"]["asr"]["weights"]
    assert m["models"]["asr"]["compute_type"] == "int8"  # what `default` resolved to on this CPU
    assert "random" in m["models"]["mimi"]["weights"]
    assert "mimi" in m["untrained_models"] and "asr" not in m["untrained_models"]
    assert m["config"]["windows"]["max_positions"] == 2048


def test_cli_prints_summary(ingest_run) -> None:
    out = ingest_run["stdout"]
    for label in ("hours in", "hours kept", "windows", "shards", "real-time factor", "untrained models"):
        assert label in out
