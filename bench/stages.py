"""Real-time factors of the model stages (ASR, alignment, diarization) on the offline models.

On a CPU these use the offline set (real Whisper base, real pyannote segmentation + GE2E): production runs
large-v3 on a GPU, whose figures need a lent GPU machine and hub weights.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import Row, speech_file
from bench.memory import offline_config


def run(minutes: float = 5.0) -> list[Row]:
    from schemas.config import IngestConfig, resolve_device
    from tasks.asr import align, load_aligner, load_asr, transcribe
    from tasks.decode import decode
    from tasks.diarize import diarize, load_diarization_pipeline

    cfg = IngestConfig.from_yaml(offline_config())
    device = resolve_device(cfg.device)
    audio = decode(speech_file(Path(f"/tmp/csm-bench/dialogue-{minutes:g}min.mp3"), minutes), 16_000)
    seconds = len(audio) / 16_000
    asr = load_asr(cfg.asr, device)
    t = time.perf_counter()
    transcript = transcribe(audio, asr, cfg.asr)
    t_asr = time.perf_counter() - t
    aligner = load_aligner(cfg.align, transcript.language, device, asr_model=asr)
    t = time.perf_counter()
    align(audio, transcript, aligner, cfg.align, device)
    t_align = time.perf_counter() - t
    pipeline = load_diarization_pipeline(cfg.diarize, device)
    t = time.perf_counter()
    diarize(audio, pipeline, cfg.diarize)
    t_diar = time.perf_counter() - t
    note = f"offline models on {device}, {seconds:.0f} s of dialogue"
    return [
        Row("asr", "x real time (whisperX, Whisper base, VAD, batched)", seconds / t_asr, "no CPU target", None, note),
        Row("align", f"x real time ({cfg.align.method})", seconds / t_align, "no CPU target", None, note),
        Row("diarize", "x real time (pyannote, segmentation + GE2E)", seconds / t_diar, "no CPU target", None, note),
    ]
