"""The whole ingest, end to end: real time factor and, on a GPU, how busy the GPU was.

Runs `csm-dataprep ingest` in a fresh process (the real flow: embedded Prefect, read-ahead decode, ASR,
alignment, diarization, quality, Mimi, shards, publish) on an espeak-ng dialogue looped to `--minutes`, and
times it from the log line "models loaded" to the end (start-up, the Prefect server and model loading
reported apart: a worker pays them once for many files). On a GPU, `nvidia-smi` samples the card's
utilization (the share of time a kernel was running) every 100 ms over that span. Target on one H100 with
production-size models: >= 100x real time with the GPU busy >= 80% of the time.

    python bench/e2e.py --minutes 5                          # offline model set (CPU here)
    python bench/e2e.py --minutes 60 --config prod.yaml      # your production config on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Row, speech_file
from bench.memory import ROOT, WORK, ingest_env, long_file, offline_config

MARK = "models loaded on"


class GpuSampler:
    """utilization.gpu of the ingest's GPU, sampled by nvidia-smi every `ms` until stopped (none without one)."""

    def __init__(self, ms: int = 100) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        try:
            # the card the ingest gets: cuda:0, the first of CUDA_VISIBLE_DEVICES
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
            self.proc = subprocess.Popen(["nvidia-smi", f"--id={gpu}", "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits", f"--loop-ms={ms}"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            first = line.split(",")[0].strip()
            if first.isdigit():
                self.samples.append((time.perf_counter(), float(first)))

    def busy(self, start: float, end: float) -> float | None:
        window = [u for t, u in self.samples if start <= t <= end]
        return sum(window) / len(window) / 100 if window else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def measure(minutes: float, config: Path) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    short = speech_file(WORK / "dialogue-10min.mp3", 10)
    audio = long_file(short, minutes) if minutes != 10 else short
    out = Path(tempfile.mkdtemp(prefix="csm-bench-e2e-"))
    env = ingest_env(out)  # the CLI turns the embedded server's analytics off itself
    cmd = [sys.executable, "-m", "flows.cli", "ingest", str(audio), "--out", str(out), "--dataset", "e2e",
           "--config", str(config), "--overwrite"]
    gpu = GpuSampler()
    t0 = time.perf_counter()
    loaded, log = None, []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        log.append(line)
        if loaded is None and MARK in line:
            loaded = time.perf_counter()
    rc = proc.wait()
    end = time.perf_counter()
    gpu.stop()
    if rc != 0 or loaded is None:
        raise RuntimeError(f"ingest of {audio} failed (exit {rc}):\n{''.join(log[-60:])}")
    manifest = json.loads((out / "e2e" / "manifest.json").read_text())
    run = manifest["runs"][-1]["counts_this_run"]
    seconds = run["hours_in"] * 3600
    return {"audio_s": seconds, "startup_s": loaded - t0, "process_s": end - loaded,
            "x_real_time": seconds / (end - loaded), "busy": gpu.busy(loaded, end), "device": manifest["device"],
            "stages": run["stage_realtime_factor"], "untrained": manifest["untrained_models"]}


def run() -> list[Row]:
    r = measure(5.0, offline_config())
    busy = "n/a (no GPU)" if r["busy"] is None else f"GPU busy {100 * r['busy']:.0f}%"
    return [Row("end to end", f"x real time, whole ingest on {r['device']} (offline models)", r["x_real_time"],
                "100x on one H100 (production models)", None,
                f"{r['audio_s']:.0f} s of audio in {r['process_s']:.0f} s after {r['startup_s']:.0f} s of start-up "
                f"and model loading; {busy}; random weights: {', '.join(r['untrained']) or 'none'}")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--config", type=Path, default=None, help="ingest config (default: the offline model set)")
    a = p.parse_args()
    r = measure(a.minutes, a.config or offline_config())
    print(f"{r['audio_s']:.0f} s of audio on {r['device']}: {r['x_real_time']:.1f}x real time "
          f"({r['process_s']:.1f} s after {r['startup_s']:.1f} s of start-up and model loading)")
    print("GPU busy: " + ("n/a (no GPU)" if r["busy"] is None else f"{100 * r['busy']:.0f}% of that time"))
    print("stages, x real time: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["stages"].items())))
    print(f"random weights: {', '.join(r['untrained']) or 'none'}")


if __name__ == "__main__":
    main()
