"""Bad input never stops a run, secrets never leak, and a run killed at any point resumes to the same dataset."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from tasks.synth import DIALOGUE, make_dialogue, speak, write_audio
from tasks.verify import iter_samples, verify_dataset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_TESTsecretTOKEN0123456789"
WEIRD_NAME = "ep 1 — ünïcødé $(touch pwned) ;'\" & x.mp3"


def cli(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def small_config(offline_models: Path, tmp: Path, **extra) -> Path:
    cfg = yaml.safe_load(offline_models.read_text())
    cfg["decode"] = {"max_duration_s": 1800}
    # the corpus holds the same speech in several formats on purpose: each must be processed, not deduplicated
    cfg.setdefault("quality", {}).update(duplicate_text_similarity=None, duplicate_audio_similarity=None)
    cfg.update(extra)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_long_file(path: Path, hours: float, sample_rate: int = 8000) -> None:
    """Hours of low noise, streamed to disk in blocks: never held in memory."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", sample_rate, 1, subtype="PCM_16") as f:
        for _ in range(int(hours * 3600 / 60)):
            f.write((rng.normal(0, 0.01, sample_rate * 60)).astype(np.float32))


def bad_corpus(d: Path) -> dict[str, str]:
    """name -> what must happen: 'kept' (processed into windows) or 'recorded' (in recordings/rejects)."""
    sr = 22_050
    speech = speak("This is a short test of a recording. We keep talking for a little while longer.", "en-us+m3", 160)
    good = d / "good dialogue.mp3"
    make_dialogue(good, lines=DIALOGUE[:4], seed=1)
    (d / "zero.wav").write_bytes(b"")
    write_audio(d / "full.mp3", speech, sr)
    (d / "truncated.mp3").write_bytes((d / "full.mp3").read_bytes()[: (d / "full.mp3").stat().st_size // 2])
    write_audio(d / "full.flac", speech, sr)
    (d / "truncated.flac").write_bytes((d / "full.flac").read_bytes()[:3000])
    (d / "full.flac").unlink()
    (d / "mp3-data.wav").write_bytes((d / "full.mp3").read_bytes())  # wrong extension
    (d / "full.mp3").unlink()
    (d / "text.wav").write_text("RIFF? no: a text file renamed .wav\n" * 50)
    sf.write(d / "eight-channels.wav", np.stack([speech] * 8, 1), sr)
    write_audio(d / "eight-khz.wav", speech, sr)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(d / "eight-khz.wav"), "-ar", "8000", str(d / "8k.wav")],
                   check=True)
    (d / "eight-khz.wav").unlink()
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(d / "8k.wav"), "-ar", "192000", str(d / "192k.wav")],
                   check=True)
    nan = speech.copy()
    nan[1000:2000] = np.nan
    nan[3000] = np.inf
    sf.write(d / "nan-inf.wav", nan, sr, subtype="FLOAT")
    sf.write(d / "silence.wav", np.zeros(sr * 5, np.float32), sr)
    sf.write(d / "two-seconds.wav", speech[: 2 * sr], sr)
    write_long_file(d / "very-long.wav", hours=1.0)  # over this run's max_duration_s (30 min)
    write_audio(d / WEIRD_NAME, speech, sr)
    return {"good dialogue.mp3": "kept", "zero.wav": "recorded", "truncated.mp3": "recorded",
            "truncated.flac": "recorded", "mp3-data.wav": "kept", "text.wav": "recorded",
            "eight-channels.wav": "kept", "8k.wav": "kept", "192k.wav": "kept", "nan-inf.wav": "recorded",
            "silence.wav": "recorded", "two-seconds.wav": "recorded", "very-long.wav": "recorded",
            WEIRD_NAME: "kept"}


def test_bad_inputs_are_recorded_and_good_ones_kept(tmp_path, offline_models, prefect_home) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    expected = bad_corpus(inputs)
    env = {**prefect_home, "HF_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET}
    cfg = small_config(offline_models, tmp_path)
    proc = cli(["ingest", str(inputs), "--out", str(tmp_path / "out"), "--dataset", "bad", "--config", str(cfg)], env)
    out, err = proc.communicate(timeout=1500)
    assert proc.returncode == 0, err[-5000:]
    root = tmp_path / "out" / "bad"
    verify_dataset(root)
    recordings = {Path(r["source"][len("file://"):]).name: r for r in pq.read_table(root / "recordings.parquet").to_pylist()}
    rejects = pq.read_table(root / "rejects.parquet").to_pylist()
    from urllib.parse import unquote

    recordings = {unquote(k): v for k, v in recordings.items()}
    assert set(recordings) == set(expected), "every input is accounted for"
    for name, what in expected.items():
        r = recordings[name]
        if what == "kept":
            assert r["status"] == "kept" and r["windows"] > 0, (name, r)
        elif r["status"] != "kept":  # recorded: its reject names the stage and the reason
            mine = [x for x in rejects if x["recording_id"] == r["recording_id"] and x["level"] == "recording"]
            assert mine and mine[0]["stage"] and mine[0]["reason"], (name, mine)
    long = [x for x in rejects if "very-long" in x["source"]]
    assert long and long[0]["stage"] == "decode" and "longer than max_duration_s" in long[0]["reason"]
    zero = [x for x in rejects if x["source"].endswith("zero.wav")]
    assert zero and "zero.wav" in zero[0]["reason"]
    assert not (ROOT / "pwned").exists() and not (inputs / "pwned").exists()
    # No secret anywhere: logs, manifest, tables, shards.
    assert SECRET not in out + err
    for f in root.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def dataset_digest(root: Path) -> dict:
    """Content of a dataset independent of when it was written: samples and index rows."""
    manifest = json.loads((root / "manifest.json").read_text())
    samples = {}
    for s in iter_samples([str(root / e["path"]) for e in manifest["shards"]]):
        h = hashlib.sha256(s["codes"].tobytes() + s["text"].tobytes() + json.dumps(s["json"], sort_keys=True).encode())
        samples[s["__key__"]] = h.hexdigest()
    index = sorted(pq.read_table(root / "index.parquet").to_pylist(), key=lambda r: r["key"])
    rejects = sorted(json.dumps(r, sort_keys=True) for r in pq.read_table(root / "rejects.parquet").to_pylist())
    return {"samples": samples, "index": index, "rejects": rejects}


def test_killed_run_resumes_to_the_same_dataset(tmp_path, offline_models, prefect_home) -> None:
    inputs = tmp_path / "in"
    make_dialogue(inputs / "a.mp3", lines=DIALOGUE[:4], seed=1)
    make_dialogue(inputs / "b.ogg", lines=DIALOGUE[4:8], seed=2)
    cfg = small_config(offline_models, tmp_path)
    args = [str(inputs), "--dataset", "ds", "--config", str(cfg)]
    env = prefect_home

    base = cli(["ingest", *args, "--out", str(tmp_path / "base")], env)
    assert base.wait(timeout=900) == 0, base.stderr.read()[-3000:]

    out = tmp_path / "resumed"
    cache = out / ".cache"
    kill_points = [2, 6]  # cached stage results when SIGKILL lands (4 per recording: asr, align, diarize, codes)
    for k in kill_points:
        proc = cli(["ingest", *args, "--out", str(out)], env, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if len([f for f in cache.rglob("*") if f.is_file() and not f.name.startswith(".")]) >= k:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before kill point {k}"
        assert not (out / "ds" / "manifest.json").exists()  # nothing half-written is visible
    final = cli(["ingest", *args, "--out", str(out)], env)
    stdout, stderr = final.communicate(timeout=900)
    assert final.returncode == 0, stderr[-3000:]
    verify_dataset(out / "ds")
    assert not list((out / "ds").glob(".staging-*"))
    assert dataset_digest(out / "ds") == dataset_digest(tmp_path / "base" / "ds")
    assert len(dataset_digest(out / "ds")["samples"]) > 0
    # fixed tar member times: even the shard bytes are the same
    shas = [[e["sha256"] for e in json.loads((d / "manifest.json").read_text())["shards"]]
            for d in (out / "ds", tmp_path / "base" / "ds")]
    assert shas[0] == shas[1]


def _server_children(pid: int) -> list[int]:
    """Child processes of `pid` that are Prefect's embedded API server (uvicorn on create_app)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return [k for k in kids if b"prefect.server.api.server:create_app" in Path(f"/proc/{k}/cmdline").read_bytes()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_sigterm_stops_the_run_and_its_embedded_server(tmp_path, offline_models, prefect_home) -> None:
    """`kill` on an ingest: the run ends with 143, publishes nothing, leaves no staging folder, and the
    embedded Prefect server it started goes with it (Python's default SIGTERM would orphan that server)."""
    inputs = tmp_path / "in"
    make_dialogue(inputs / "a.mp3", lines=DIALOGUE[:4], seed=1)
    out = tmp_path / "out"
    proc = cli(["ingest", str(inputs), "--dataset", "ds", "--config", str(small_config(offline_models, tmp_path)),
                "--out", str(out)], prefect_home)
    servers: list[int] = []
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        servers = servers or _server_children(proc.pid)
        if servers and any(f.is_file() for f in (out / ".cache").rglob("*")):  # mid-run: a stage has finished
            break
        time.sleep(0.05)
    assert proc.poll() is None and servers, "the run ended (or never started its server) before the signal"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(s) for s in servers):
        time.sleep(0.1)
    orphans = [s for s in servers if _alive(s)]
    for s in orphans:  # not left behind when the test fails (it also holds the run's stderr pipe open)
        os.kill(s, signal.SIGKILL)
    assert rc == 128 + signal.SIGTERM, proc.stderr.read()[-3000:]
    assert not orphans, "the embedded Prefect server outlived its run"
    assert not (out / "ds" / "manifest.json").exists()
    assert not list((out / "ds").glob(".staging-*"))
