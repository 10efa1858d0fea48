"""`csm-dataprep workers`: the Prefect workers of one node, one process per GPU.

Each worker is `prefect worker start --pool POOL --limit 1` with CUDA_VISIBLE_DEVICES set to its own GPU, so a
flow run it starts (a partition of a fan-out) sees exactly one GPU and runs alone on it; the run loads its
models once and keeps them for every file of its partition. Processes per node is `--processes` (default:
one per GPU in `--gpus`). On Kubernetes the same packing comes from the pod spec (one GPU per pod): see
docker/k8s/.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def worker_commands(pool: str, processes: int | None, gpus: list[str], name: str | None = None,
                    env: dict[str, str] | None = None) -> list[tuple[list[str], dict[str, str]]]:
    """The command and environment of each worker process: worker i gets GPU gpus[i % len(gpus)], or no GPU
    (CUDA_VISIBLE_DEVICES empty) when `gpus` is empty."""
    n = processes or len(gpus) or 1
    base = name or socket.gethostname()
    prefect = str(Path(sys.executable).with_name("prefect"))
    out = []
    for i in range(n):
        worker = f"{base}-{i}"
        e = {**(env if env is not None else os.environ), "CSM_WORKER": worker,
             "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)] if gpus else ""}
        out.append(([prefect, "worker", "start", "--pool", pool, "--name", worker, "--limit", "1"], e))
    return out


def detect_gpus() -> list[str]:
    """GPU indices this node has (nvidia-smi), [] without one."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []


def run_workers(pool: str, processes: int | None, gpus: str, name: str | None = None) -> int:
    """Start the workers and wait; SIGTERM/SIGINT stop them all. Returns when every worker has exited."""
    ids = detect_gpus() if gpus == "auto" else [] if gpus in ("", "none") else gpus.split(",")
    procs = []
    for cmd, env in worker_commands(pool, processes, ids, name):
        print(f"{env['CSM_WORKER']}: GPU {env['CUDA_VISIBLE_DEVICES'] or 'none'}", flush=True)
        procs.append(subprocess.Popen(cmd, env=env))

    def stop(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while any(p.poll() is None for p in procs):
        time.sleep(1)
    return max(p.returncode or 0 for p in procs)
