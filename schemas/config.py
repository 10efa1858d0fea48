"""Ingest configuration: the one place that holds the defaults.

Pydantic models, so Prefect shows them as forms in the UI and validates them on every run.
Production defaults name the real hub models; `csm-dataprep models offline DIR` writes a config that
points every model at local paths instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, model_validator


class DecodeConfig(BaseModel):
    asr_sample_rate: int = Field(16_000, description="Rate for ASR and diarization (Whisper and pyannote want 16 kHz).")
    codec_sample_rate: int = Field(
        24_000, description="Rate for Mimi (24 kHz); decoded again from the file and streamed to Mimi a chunk at "
        "a time, so only the ASR rate is ever held whole (about 0.7 GB for 3 hours).")
    max_duration_s: float = Field(6 * 3600, gt=0, description="Longer recordings are rejected.")
    min_duration_s: float = Field(1.0, ge=0, description="Shorter recordings are rejected.")


class AsrConfig(BaseModel):
    model: str = Field("large-v3", description="faster-whisper model name, hub id or local CTranslate2 dir.")
    compute_type: str = Field("default", description="CTranslate2 compute type; default = float16 on GPU, int8 on CPU.")
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
    """Quality gate thresholds, each applied at one level: recording (before ASR for signal rules), turn, or
    window. A threshold of None turns its rule off. Metrics are stored with the data (tasks/metrics.py), so
    `csm-dataprep refilter` can apply stricter thresholds later without running any model. Every rejection
    is a row of rejects.parquet (stage, level, rule, measured value, threshold, seconds removed)."""

    # -- recording, from the signal alone (before ASR, so junk costs no GPU time)
    silence_dbfs: float = Field(
        -50.0, le=0,
        description="A 20 ms frame quieter than this (RMS, dBFS) is silence. -50: loudness-normalised speech "
        "sits around -30..-10 dBFS and its quietest syllables above -50, while room tone between phrases of "
        "a usable recording is below it.")
    max_silence_ratio: float | None = Field(
        0.8, ge=0, le=1,
        description="Recordings and turns with a larger share of silent frames are rejected (rule "
        "mostly_silence). 0.8: conversation is 20-40% pauses, and a turn is words with short pauses; a "
        "recording or turn over 80% silent is dead air or words the ASR invented in silence.")
    max_clipping_ratio: float | None = Field(
        0.001, ge=0, le=1,
        description="Recordings and windows with a larger share of clipped samples are rejected (rule "
        "clipped). 0.001: a clean recording has a handful of samples at its peak; 0.1% means the waveform "
        "hits its ceiling on every loud syllable, a distortion Mimi's codes would learn.")
    min_snr_db: float | None = Field(
        10.0,
        description="Recordings and windows with a lower estimated SNR are rejected (rule too_noisy). The "
        "estimate is blind: 90th percentile of 20 ms frame levels over the recording's 10th percentile. "
        "Clean podcasts measure 30-60 dB, continuous speech with no pauses about 20 dB; under 10 dB the "
        "noise is as loud as the quiet half of the speech.")
    # -- recording, from ASR and diarization
    allowed_languages: list[str] | None = Field(
        None,
        description="Detected languages to keep (ISO 639-1, e.g. ['en']); other recordings are rejected "
        "(rule language). None keeps every language: the ASR is multilingual and the CSM tokenizer takes "
        "any text, so which languages a model should learn is the dataset's decision, and a default of "
        "['en'] would silently drop everything else.")
    min_language_probability: float | None = Field(
        None, ge=0, le=1,
        description="Recordings whose language detection is less sure are rejected (rule "
        "low_language_probability). None: detection runs on the first speech only and is unsure on short "
        "intros, accents and code-switching even when the transcript is fine, so it is off by default; "
        "0.5 is a reasonable setting for a single-language dataset.")
    require_dialogue: bool = Field(
        False,
        description="Reject recordings (before windows) and windows with fewer than two speakers (rule "
        "single_speaker). False: monologue (lectures, audiobooks, a host alone) still teaches voices; set "
        "it for a conversation-only dataset.")
    # -- turn
    min_turn_s: float = Field(0.3, ge=0, description="Shorter turns are rejected (too short to carry a voice).")
    min_avg_logprob: float | None = Field(
        -1.0, description="Turns whose ASR mean log-probability is lower are rejected (Whisper's own "
        "logprob_threshold: below it Whisper itself distrusts the decode).")
    max_no_speech_prob: float | None = Field(
        0.8, ge=0, le=1, description="Turns more likely non-speech are rejected (Whisper treats 0.6 with a low "
        "log-probability as silence; 0.8 alone is a confident no-speech).")
    max_compression_ratio: float | None = Field(
        2.4, gt=0,
        description="Turns whose text compresses better than this (zlib, in pieces of 80 words) are rejected "
        "as hallucination (rule compression_ratio). 2.4 is Whisper's compression_ratio_threshold: natural "
        "text of a segment's length compresses 1.3-2.0x, a looping decode far more.")
    max_repeated_ngram_ratio: float | None = Field(
        0.5, ge=0, le=1,
        description="Turns where more than this share of word 3-grams repeat an earlier one are rejected as "
        "hallucination (rule repeated_ngrams). 0.5: natural speech repeats under 15% even in long turns; a "
        "decoder stuck in a loop repeats nearly all.")
    min_aligned_ratio: float | None = Field(
        0.5, ge=0, le=1,
        description="Turns where a smaller share of words got an alignment score are rejected (rule "
        "low_alignment). 0.5: the others' times are interpolated guesses, so with most words untimed the "
        "turn's boundaries and codes are unreliable.")
    min_word_score: float | None = Field(
        None, ge=0, le=1,
        description="Turns whose mean word alignment score is lower are rejected (rule low_word_score). None: "
        "the score's scale depends on the aligner (wav2vec2 CTC posteriors vs Whisper word probabilities), "
        "so there is no default that fits both; see the report's distribution before setting it.")
    min_chars_per_s: float | None = Field(
        3.0, ge=0,
        description="Turns spoken slower (letters and digits per second) are rejected (rule too_slow). 3: "
        "conversational English runs 12-18, CJK 4-8 characters a second; under 3 the turn is mostly pauses "
        "or its word times are stretched by a bad alignment.")
    max_chars_per_s: float | None = Field(
        30.0, gt=0,
        description="Turns spoken faster are rejected (rule too_fast). 30: the fastest natural speech is "
        "about 25 letters a second; more means text the audio cannot hold (hallucinated words or squeezed "
        "word times).")
    # -- window
    min_window_s: float = Field(1.0, ge=0, description="Windows with less audio are rejected.")
    max_overlap_ratio: float | None = Field(
        0.3, ge=0, le=1,
        description="Windows with a larger share of overlapped speech (diarization's overlap regions, per "
        "turn) are rejected (rule overlap). 0.3: backchannels and interruptions overlap a few percent of a "
        "conversation; beyond a third, the turns' words and speakers are no longer reliably separated.")
    duplicate_text_similarity: float | None = Field(
        0.7, ge=0, le=1,
        description="A window whose transcript's word-bigram MinHash matches a window of another recording "
        "in the dataset (earlier runs included) at this Jaccard similarity or more is rejected (rule "
        "duplicate). 0.7: a re-encode of the same episode scores 0.8-1.0 (the ASR differs in a few words), "
        "a window sharing a few lines with another about 0.4, different conversations under 0.1.")
    duplicate_audio_similarity: float | None = Field(
        0.7, ge=0, le=1,
        description="Same, on the MinHash of 3-frame shingles of the window's codebook-0 Mimi codes (rule "
        "duplicate); identical codes count as 1.0, and None turns audio duplicates off. 0.7: a copy of the "
        "same audio scores near 1, a re-encoded copy 0.2-0.9 depending on the codec, so this catches exact "
        "and near-exact copies and leaves re-encodes to the transcript rule.")
    squim_model: str | None = Field(
        None,
        description="Non-intrusive speech quality (STOI, PESQ, SI-SDR estimates) per window with torchaudio's "
        "SQUIM objective model: 'SQUIM_OBJECTIVE' for the trained pipeline (downloads its weights), a local "
        "state_dict file or folder for squim_objective_base(), None to skip it (the default: it costs "
        "about one CPU-second per second measured).")
    squim_max_s: float = Field(
        4.0, gt=0,
        description="Seconds of each window's speech SQUIM measures (its first turns). 4: SQUIM was trained "
        "on utterances of a few seconds, and its cost grows with the length.")
    min_squim_stoi: float | None = Field(
        None, ge=0, le=1, description="Windows with lower SQUIM STOI are rejected (rule low_squim_stoi). None: "
        "off until the trained model is configured and the report's distribution is seen.")
    min_squim_pesq: float | None = Field(
        None, ge=1, le=4.5, description="Windows with lower SQUIM PESQ are rejected (rule low_squim_pesq). None: "
        "as min_squim_stoi; 2.5 is a common floor for clean training speech.")
    min_squim_si_sdr: float | None = Field(
        None, description="Windows with lower SQUIM SI-SDR (dB) are rejected (rule low_squim_si_sdr). None: "
        "as min_squim_stoi.")


class TokenizeConfig(BaseModel):
    mimi: str = Field("kyutai/mimi", description="transformers MimiModel hub id or local dir.")
    text: str = Field("sesame/csm-1b", description="CSM text tokenizer (Llama-3) hub id or local dir (gated).")
    num_codebooks: int = Field(32, ge=1, le=32)
    chunk_s: float = Field(
        60.0, gt=0, description="Mimi encodes the recording in chunks this long, streamed from ffmpeg: host and "
        "GPU memory grow with batch_size x chunk_s (about 1.5 GB per 60 s on CPU for kyutai/mimi), not with "
        "the recording.")
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
    out: str = Field("data", description="Output root, a local folder or an fsspec URL (s3://bucket/prefix, "
                     "gs://...); the dataset lands in <out>/<dataset>/.")
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

    def work_dir(self) -> Path:
        """Local scratch of a run (stage cache, downloads): `cache_dir`, else <out>/.cache, else (when `out` is
        an object store) $CSM_CACHE_DIR or ~/.cache/csm-dataprep."""
        import os

        if self.cache_dir:
            return Path(self.cache_dir)
        if "://" not in self.out or self.out.startswith("file://"):
            return Path(self.out.removeprefix("file://")) / ".cache"
        return Path(os.environ.get("CSM_CACHE_DIR", "~/.cache/csm-dataprep")).expanduser()

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: object) -> IngestConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)


class FanoutConfig(BaseModel):
    """How a fan-out ingest (flows/fanout.py) splits its sources and runs the partitions."""

    files: int | None = Field(
        50, ge=1, description="Sources per partition. A partition is one flow run on one worker process (one "
        "GPU): its models load once for all its files.")
    hours: float | None = Field(
        None, gt=0, description="Partition by hours of audio instead of files (set `files` to null): durations "
        "come from a source list's `duration` column, or ffprobe for local files.")
    assumed_hours: float = Field(1.0, gt=0, description="Hours counted for a source of unknown duration.")
    max_parallel: int = Field(
        8, ge=1, description="Partitions running at once: the fan-out's concurrency limit (the work pool's own "
        "limit, if set, also applies).")
    retries: int = Field(2, ge=0, le=10, description="Extra runs of a partition that ended without its part manifest.")
    deployment: str = Field("ingest/partition", description="The deployment that runs one partition.")
    poll_s: float = Field(5.0, gt=0, description="Seconds between checks of the partitions' runs.")

    @model_validator(mode="after")
    def _one_way(self) -> FanoutConfig:
        if (self.files is None) == (self.hours is None):
            raise ValueError("partition by `files` or by `hours` (set the other to null)")
        return self


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
