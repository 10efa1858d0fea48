"""A real Prefect stack for the deployment and UI tests (session fixtures, imported by conftest.py).

`prefect server start` (SQLite in a temporary PREFECT_HOME, a free port), the process work pools of
prefect.yaml, `prefect deploy --all` from the repository root, a worker for csm-cpu and two (`csm-dataprep
workers --processes 2`, as on a 2-GPU node) for csm-gpu, and a podcast feed of two
short generated episodes served by a local http.server. Workers get CSM_INGEST_CONFIG = the offline model set
with `out` in a temporary folder; train/csm's `config` is set to a tiny CPU run through the API.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.serve import api_call

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_train_config(out_dir: Path) -> dict[str, Any]:
    """train/csm's config for the tests: the tiny model, two optimizer steps on CPU."""
    return {"model_size": "tiny", "max_steps": 2, "warmup_steps": 0, "batch_size": 1, "grad_accum": 1,
            "num_workers": 0, "eval_fraction": 0.0, "eval_interval": 1000, "eval_batches": 1, "device": "cpu",
            "precision": "fp32", "out_dir": str(out_dir), "checkpoint_interval": 1000, "tensorboard": False,
            "export_final": False, "shuffle_buffer": 4, "bucket_batches": 1}


@dataclass
class Stack:
    api: str
    ui: str
    env: dict[str, str]
    out: Path  # ingest output root (the worker's CSM_INGEST_CONFIG `out`)
    train_out: Path
    logs: Path
    feed_url: str
    episodes: dict[str, dict] = field(default_factory=dict)  # guid -> title, file, script
    procs: list[subprocess.Popen] = field(default_factory=list)

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([PREFECT, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    # Through api_call, which retries the 503s a busy SQLite server answers, as Prefect's own client does
    def get(self, path: str) -> Any:
        return api_call("GET", f"{self.api}{path}").json()

    def post(self, path: str, body: dict) -> Any:
        return api_call("POST", f"{self.api}{path}", json=body).json()

    def run_deployment(self, name: str, **params: Any) -> str:
        """`prefect deployment run NAME --param k=v...`; returns the flow run id."""
        args = [a for k, v in params.items() for a in ("--param", f"{k}={json.dumps(v)}")]
        out = self.prefect("deployment", "run", name, *args).stdout
        m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert m, out
        return m.group(1)

    def wait_run(self, run_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{run_id}")
            if run["state_type"] in TERMINAL:
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} not finished after {timeout} s: {run['state_name']}\n{self.log_tail()}")

    def runs_of(self, deployment: str) -> list[dict]:
        dep = self.get(f"/deployments/name/{deployment}")
        return self.post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}, "sort": "START_TIME_ASC"})

    def events(self, name: str, at_least: int = 0, timeout: float = 60) -> list[dict]:
        """Events named `name`, waiting (the server stores events in batches) until there are `at_least`."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.post("/events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50})["events"]
            if len(events) >= at_least or time.monotonic() > deadline:
                return events
            time.sleep(1)

    def artifacts(self, key: str, run_id: str) -> list[dict]:
        return self.post("/artifacts/filter", {"artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [run_id]}}})

    def run_logs(self, run_id: str) -> str:
        logs = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"})
        return "\n".join(log["message"] for log in logs)

    def wait_logs(self, run_id: str, *needles: str, timeout: float = 30) -> str:
        """The run's logs once they hold every needle (logs reach the server in batches, after the state)."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.run_logs(run_id)
            if all(n in logs for n in needles) or time.monotonic() > deadline:
                return logs
            time.sleep(1)

    def log_tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in sorted(self.logs.glob("*.log")))


def _stop(procs: list[subprocess.Popen], grace: float = 15) -> None:
    """Stop processes started in their own sessions, with everything in their process groups: SIGTERM to all,
    SIGKILL to what is left after `grace` seconds."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory, request) -> Iterator[Stack]:
    from flows.serve import set_parameters, wait_healthy
    from tasks.synth import DIALOGUE, make_dialogue
    from tests.httpserve import rss, serve

    base = tmp_path_factory.mktemp("prefect-stack")
    logs = base / "logs"
    logs.mkdir()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(base / "home"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               # Workers poll every 3 s (default 10): each poll writes to the database, and on SQLite a write that lands
               # while the server handles a create (read, validate the parameters, insert) makes that insert
               # fail at once with "database is locked" (a 503). Polling every second made that the common case.
               PREFECT_WORKER_QUERY_SECONDS="3", PREFECT_WORKER_PREFETCH_SECONDS="5",
               CSM_INGEST_CONFIG=str(base / "ingest.yaml"),
               # SQLite serialises writes; on a loaded 2-core machine a write can wait longer than the default
               # 10 s (workers' heartbeats, task runs of two flows): give the server more patience
               PREFECT_SERVER_DATABASE_TIMEOUT="60", PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT="30",
               # the server logs the exception behind each 503 (else it answers them silently)
               PREFECT_API_LOG_RETRYABLE_ERRORS="true")
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str, program: str = PREFECT) -> None:
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - the child holds it
        procs.append(subprocess.Popen([program, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    try:
        # The server starts while the models and the episodes are prepared.
        start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        offline_models = request.getfixturevalue("offline_models")
        # The feed: two short episodes (two lines each).
        site = base / "site"
        episodes = {
            "episode-1": {"title": "Episode one: starting out", "file": "media/ep1.mp3", "lines": DIALOGUE[:2],
                          "seed": 1, "pubDate": "Mon, 06 Jan 2025 10:00:00 +0000"},
            "episode-2": {"title": "Episode two: audio first", "file": "media/ep2.mp3", "lines": DIALOGUE[2:4],
                          "seed": 2, "pubDate": "Tue, 07 Jan 2025 10:00:00 +0000"},
        }
        for ep in episodes.values():
            ep["script"] = make_dialogue(site / ep["file"], lines=ep.pop("lines"), seed=ep.pop("seed"))
        (site / "feed.xml").write_text(rss([{"guid": g, "title": e["title"], "url": e["file"],
                                             "pubDate": e["pubDate"]} for g, e in episodes.items()],
                                           title="Synthetic talks"))
        # The workers' default ingest config: the offline models, writing under `out`.
        out = base / "out"
        ingest_cfg = yaml.safe_load(Path(offline_models).read_text())
        ingest_cfg["out"] = str(out)
        (base / "ingest.yaml").write_text(yaml.safe_dump(ingest_cfg))
        pools = [p["name"] for p in yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["work_pools"].values()]

        with serve(site) as site_url:
            stack = Stack(api=api, ui=f"http://127.0.0.1:{port}", env=env, out=out, train_out=base / "train",
                          logs=logs, feed_url=f"{site_url}/feed.xml", episodes=episodes, procs=procs)
            wait_healthy(api, timeout=180)
            for pool in pools:
                stack.prefect("work-pool", "create", pool, "--type", "process")
            stack.prefect("--no-prompt", "deploy", "--all")
            set_parameters(api, "train/csm", {"config": tiny_train_config(stack.train_out)})
            start("worker-csm-cpu", "worker", "start", "--pool", "csm-cpu", "--name", "test-csm-cpu")
            # the GPU pool as a GPU node runs it: one worker process per GPU, one flow run each (here 2, no GPU)
            start("workers-csm-gpu", "workers", "--pool", "csm-gpu", "--processes", "2", "--gpus", "none",
                  "--name", "test-gpu", program=str(Path(sys.executable).with_name("csm-dataprep")))
            yield stack
    finally:
        _stop(procs[1:])  # the workers, then the server
        _stop(procs[:1])


@pytest.fixture(scope="session")
def podcast_run(prefect_stack: Stack) -> dict:
    """The first `ingest/podcasts` run over the feed (both episodes new); the finished flow run."""
    run_id = prefect_stack.run_deployment("ingest/podcasts", feeds=[prefect_stack.feed_url])
    run = prefect_stack.wait_run(run_id, timeout=420)
    assert run["state_type"] == "COMPLETED", prefect_stack.run_logs(run_id)[-5000:] + prefect_stack.log_tail()
    return run
