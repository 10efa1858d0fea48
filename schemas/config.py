"""Ingest configuration: the one place that holds the defaults.

Pydantic models, so Prefect shows them as forms in the UI and validates them on every run.
Production defaults name the real hub models; `csm-dataprep models offline DIR` writes a config that
points every model at local paths instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field


class DecodeConfig(BaseModel):
    asr_sample_rate: int = Field(16_000, description="Rate for ASR and diarization (Whisper and pyannote want 16 kHz).")
    codec_sample_rate: int = Field(24_000, description="Rate for Mimi (24 kHz).")
    max_duration_s: float = Field(6 * 3600, gt=0, description="Longer recordings are rejected.")
    min_duration_s: float = Field(1.0, ge=0, description="Shorter recordings are rejected.")


class AsrConfig(BaseModel):
    model: str = Field("large-v3", description="faster-whisper model name, hub id or local CTranslate2 dir.")
    compute_type: str = Field("default", description="CTranslate2 compute type; default = float16 on GPU, float32 on CPU.")
    batch_size: int = Field(16, ge=1)
    language: str | None = Field(None, description="Force a language; None detects it per recording.")
    vad_method: Literal["pyannote", "silero"] = "pyannote"
    vad_onset: float = 0.5
    vad_offset: float = 0.363
    chunk_size: int = Field(30, ge=1, le=30, description="Seconds of merged VAD speech per Whisper window.")
    beam_size: int = Field(5, ge=1)
    threads: int = Field(0, ge=0, description="CPU threads for CTranslate2; 0 = all cores.")
    language_detection_segments: int = Field(
        2, ge=1, description="Up to this many 30 s windows of speech (Silero VAD) are tried to detect the language."
    )


class AlignConfig(BaseModel):
    method: Literal["wav2vec2", "whisper"] = Field(
        "wav2vec2",
        description="wav2vec2: whisperx.align (CTC forced alignment). whisper: word times from "
        "faster-whisper's cross-attention alignment, for when no trained aligner is at hand.",
    )
    model: str | None = Field(
        None,
        description="wav2vec2: CTC hub id or local dir; None = whisperx's default for the language. whisper: a "
        "faster-whisper model, used only when the ASR model is not handed over.",
    )
    batch_size: int = Field(8, ge=1, description="Segments per encoder batch for method=whisper.")
    nltk_data: str | None = Field(
        None,
        description="Dir holding tokenizers/punkt_tab (whisperx.align splits sentences with it); None = nltk's "
        "search path, and whisperx downloads punkt_tab if it is missing.",
    )


class DiarizeConfig(BaseModel):
    pipeline: str | None = Field(
        "pyannote/speaker-diarization-community-1",
        description="pyannote pipeline hub id or local dir (gated: needs HF_TOKEN). Ignored if segmentation is set.",
    )
    segmentation: str | None = Field(None, description="Local pyannote segmentation model; builds the pipeline from parts.")
    embedding: str | None = Field(None, description="Speaker embedding for a pipeline built from parts.")
    clustering_threshold: float = Field(0.7, description="Agglomerative clustering threshold (pipeline built from parts).")
    clustering_method: Literal["average", "centroid", "complete", "median", "single", "ward", "weighted"] = Field(
        "average",
        description="Agglomerative linkage (pipeline built from parts). Average linkage is the most stable with "
        "GE2E embeddings, whose speakers sit close together (cosine distances mostly < 0.3).",
    )
    min_cluster_size: int = Field(15, ge=1, le=20, description="Smaller clusters merge into the nearest large one.")
    segmentation_threshold: float = Field(0.4442, gt=0, lt=1, description="Speech onset for multilabel segmentation models.")
    min_duration_off: float = Field(0.0, ge=0, description="Pauses shorter than this inside one speaker's speech are filled.")
    segmentation_step: float = Field(0.1, gt=0, le=1, description="Segmentation window step, as a ratio of its duration.")
    embedding_exclude_overlap: bool = Field(True, description="Embed each local speaker without overlapped frames.")
    embedding_batch_size: int = Field(32, ge=1)
    segmentation_batch_size: int = Field(32, ge=1)
    min_speakers: int | None = Field(None, ge=1)
    max_speakers: int | None = Field(None, ge=1)


class TurnsConfig(BaseModel):
    max_pause_s: float = Field(1.5, gt=0, description="A pause this long inside one speaker's speech starts a new turn.")


class WindowConfig(BaseModel):
    max_positions: int = Field(2048, ge=16, le=2048, description="Positions per training window (CSM context).")
    frame_rate: float = Field(12.5, description="Mimi frames per second.")


class QualityConfig(BaseModel):
    min_turn_s: float = Field(0.3, ge=0, description="Shorter turns are rejected (too short to carry a voice).")
    min_avg_logprob: float = Field(-1.0, description="Turns whose ASR mean log-probability is lower are rejected.")
    max_no_speech_prob: float = Field(0.8, ge=0, le=1, description="Turns more likely non-speech are rejected.")
    min_window_s: float = Field(1.0, ge=0, description="Windows with less audio are rejected.")


class TokenizeConfig(BaseModel):
    mimi: str = Field("kyutai/mimi", description="transformers MimiModel hub id or local dir.")
    text: str = Field("sesame/csm-1b", description="CSM text tokenizer (Llama-3) hub id or local dir (gated).")
    num_codebooks: int = Field(32, ge=1, le=32)
    chunk_s: float = Field(
        60.0, gt=0, description="Mimi encodes the recording in chunks this long: memory grows with the chunk "
        "(about 1.5 GB per 60 s on CPU for kyutai/mimi), not with the recording.")
    batch_size: int = Field(
        1,
        ge=1,
        description="Mimi chunks encoded per call. Peak memory is about 8 GB per 300 s chunk (float32, "
        "measured on CPU), so raise it for shorter chunks or a large GPU.",
    )


class ShardConfig(BaseModel):
    max_samples: int = Field(1000, ge=1, description="Samples per shard.")
    max_bytes: int = Field(500_000_000, ge=1_000_000, description="Bytes per shard.")


class IngestConfig(BaseModel):
    dataset: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    out: str = Field("data", description="Output root; the dataset lands in <out>/<dataset>/.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    decode: DecodeConfig = DecodeConfig()
    asr: AsrConfig = AsrConfig()
    align: AlignConfig = AlignConfig()
    diarize: DiarizeConfig = DiarizeConfig()
    turns: TurnsConfig = TurnsConfig()
    windows: WindowConfig = WindowConfig()
    quality: QualityConfig = QualityConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    shards: ShardConfig = ShardConfig()
    on_error: Literal["raise", "skip"] = Field("skip", description="skip: record a failed recording and go on.")
    overwrite: bool = Field(False, description="Replace an existing dataset of the same name.")
    retries: int = Field(1, ge=0, le=10, description="Retries of a failed model stage before the file is recorded as failed.")
    retry_delay_s: float = Field(2.0, ge=0)
    cache_dir: str | None = Field(
        None, description="Per-recording stage results (resume after a crash); default <out>/.cache. "
        "Keyed by content, stage config and models, so datasets can share it.")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: object) -> IngestConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
