"""Shared fixtures: the offline model set (built once per session) and one real ingest run on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prefect_stack import podcast_run, prefect_stack  # noqa: F401 - session fixtures: a real Prefect stack
from tests.s3server import s3  # noqa: F401 - session fixture: an S3-compatible server on loopback

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def offline_models(tmp_path_factory) -> Path:
    """`csm-dataprep models offline DIR`, as a user runs it; returns DIR/config.yaml."""
    from tasks.models import build_offline_set

    return build_offline_set(tmp_path_factory.mktemp("offline-models"))


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> dict[str, str]:
    """Environment for a subprocess that runs flows on the embedded default: local Prefect with SQLite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    # a loaded 2-core machine can take longer than the default 20 s to start the embedded server
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    return env


@pytest.fixture(scope="session")
def ingest_run(tmp_path_factory, offline_models, prefect_home) -> dict:
    """The demo job through the CLI: a generated dialogue (mp3), the same voices in opus, and a bad file."""
    from tasks.synth import DIALOGUE, make_dialogue

    inputs = tmp_path_factory.mktemp("inputs")
    script = make_dialogue(inputs / "dialogue.mp3", repeat=2)
    short = make_dialogue(inputs / "second talk.opus", lines=DIALOGUE[4:10], seed=3)
    (inputs / "not-audio.wav").write_text("this is a text file with a .wav name")
    out = tmp_path_factory.mktemp("out")
    cmd = [sys.executable, "-m", "flows.cli", "ingest", str(inputs), "--out", str(out), "--dataset", "demo",
           "--config", str(offline_models)]
    proc = subprocess.run(cmd, cwd=ROOT, env=prefect_home, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"dir": out / "demo", "stdout": proc.stdout, "stderr": proc.stderr, "inputs": inputs,
            "scripts": {"dialogue.mp3": script, "second talk.opus": short},
            "manifest": json.loads((out / "demo" / "manifest.json").read_text())}
