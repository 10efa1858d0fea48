"""Speaker diarization: who speaks when, then which speaker says each word.

Production loads the gated pyannote hub pipeline named in DiarizeConfig.pipeline. Offline (no hub), the same
pyannote.audio SpeakerDiarization pipeline is built from local parts: the pyannote segmentation model that
whisperx ships, and resemblyzer's GE2E speaker encoder wrapped as a pyannote Model
(tasks/speaker_embedding.py), clustered agglomeratively. Heavy imports stay inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from schemas.config import DiarizeConfig
from schemas.records import SpeakerSegment, Transcript

if TYPE_CHECKING:
    from pyannote.audio import Pipeline


def load_diarization_pipeline(cfg: DiarizeConfig, device: str) -> Pipeline:
    """The hub pipeline (cfg.pipeline, HF_TOKEN), or one built from cfg.segmentation + cfg.embedding."""
    import torch

    if cfg.segmentation:
        pipeline = _pipeline_from_parts(cfg)
    elif cfg.pipeline:
        from pyannote.audio import Pipeline

        pipeline = Pipeline.from_pretrained(cfg.pipeline, token=os.environ.get("HF_TOKEN"))
        if pipeline is None:  # pyannote returns None (after printing why) when the hub refuses
            raise RuntimeError(f"could not load diarization pipeline {cfg.pipeline!r}: gated? set HF_TOKEN")
    else:
        raise ValueError("DiarizeConfig needs either `pipeline` or `segmentation` + `embedding`")
    return pipeline.to(torch.device(device))


def _pipeline_from_parts(cfg: DiarizeConfig) -> Pipeline:
    from pyannote.audio import Model
    from pyannote.audio.core.plda import PLDA
    from pyannote.audio.pipelines import SpeakerDiarization

    if not cfg.embedding:
        raise ValueError("DiarizeConfig.segmentation is set but embedding is not")

    class _NoPLDA(PLDA):
        """pyannote 4 loads a PLDA (hub-only) for VBx even when another clustering is chosen; this one is never used."""

        def __init__(self) -> None:
            pass

        def __call__(self, embeddings: np.ndarray) -> np.ndarray:
            raise RuntimeError("no PLDA: this pipeline clusters agglomeratively")

    # load the checkpoints ourselves: pyannote routes embedding *strings* by substrings such as "nvidia"
    segmentation = Model.from_pretrained(cfg.segmentation)
    embedding = Model.from_pretrained(cfg.embedding)
    if segmentation is None or embedding is None:
        raise FileNotFoundError(f"no pyannote checkpoint at {cfg.segmentation} / {cfg.embedding}")
    pipeline = SpeakerDiarization(
        segmentation=segmentation,
        segmentation_step=cfg.segmentation_step,
        embedding=embedding,
        embedding_exclude_overlap=cfg.embedding_exclude_overlap,
        plda=_NoPLDA(),
        clustering="AgglomerativeClustering",
        embedding_batch_size=cfg.embedding_batch_size,
        segmentation_batch_size=cfg.segmentation_batch_size,
    )
    params: dict[str, Any] = {
        "segmentation": {"min_duration_off": cfg.min_duration_off},
        "clustering": {
            "method": cfg.clustering_method,
            "threshold": cfg.clustering_threshold,
            "min_cluster_size": cfg.min_cluster_size,
        },
    }
    if not segmentation.specifications.powerset:  # multilabel models (pyannote/segmentation) also need a threshold
        params["segmentation"]["threshold"] = cfg.segmentation_threshold
    return pipeline.instantiate(params)


def diarize(audio16: np.ndarray, pipeline: Any, cfg: DiarizeConfig, sample_rate: int = 16000) -> list[SpeakerSegment]:
    """Speaker turns (SPEAKER_00, SPEAKER_01, ...) of a mono float waveform, overlaps kept, sorted by start."""
    import torch

    audio = np.ascontiguousarray(audio16, dtype=np.float32)
    if not audio.flags.writeable:  # torch warns on read-only buffers (np.frombuffer); copy only then
        audio = audio.copy()
    waveform = torch.from_numpy(audio).reshape(1, -1)
    output = pipeline(
        {"waveform": waveform, "sample_rate": sample_rate, "uri": "recording"},
        min_speakers=cfg.min_speakers,
        max_speakers=cfg.max_speakers,
    )
    # pyannote 4 returns DiarizeOutput; legacy (3.x-style) pipelines return the Annotation itself
    annotation = getattr(output, "speaker_diarization", output)
    names = {label: f"SPEAKER_{i:02d}" for i, label in enumerate(sorted(annotation.labels(), key=str))}
    segments = [
        SpeakerSegment(start=round(turn.start, 3), end=round(turn.end, 3), speaker=names[label])
        for turn, _, label in annotation.itertracks(yield_label=True)
    ]
    return sorted(segments, key=lambda s: (s.start, s.end, s.speaker))


def assign_speakers(transcript: Transcript, segments: list[SpeakerSegment]) -> Transcript:
    """A copy of `transcript` whose words carry the speaker that overlaps them most (else the nearest one)."""
    import pandas as pd
    from whisperx.diarize import assign_word_speakers

    result = transcript.model_copy(deep=True)
    if not segments:
        return result
    df = pd.DataFrame([s.model_dump() for s in segments], columns=["start", "end", "speaker"])
    # whisperx works on its plain-dict transcript; keep index order to map speakers back onto our Words
    plain = {
        "segments": [
            {"start": s.start, "end": s.end, "words": [w.model_dump() for w in s.words]} for s in result.segments
        ]
    }
    plain = assign_word_speakers(df, plain, fill_nearest=True)
    for seg, seg_out in zip(result.segments, plain["segments"], strict=True):
        for word, word_out in zip(seg.words, seg_out["words"], strict=True):
            word.speaker = word_out.get("speaker")
    return result


def overlap_regions(segments: list[SpeakerSegment]) -> list[tuple[float, float]]:
    """Merged time spans where two or more speakers talk at once."""
    # sweep over boundaries; ends sort before starts at equal times so touching turns do not overlap
    spans = [s for s in segments if s.end > s.start]
    events = sorted([(s.start, 1) for s in spans] + [(s.end, -1) for s in spans])
    regions: list[tuple[float, float]] = []
    active, opened = 0, 0.0
    for time, delta in events:
        if active < 2 <= active + delta:
            opened = time
        elif active >= 2 > active + delta:
            if regions and regions[-1][1] >= opened:
                regions[-1] = (regions[-1][0], time)
            else:
                regions.append((opened, time))
        active += delta
    return regions


def build_offline_diarization(dest: Path) -> dict[str, str]:
    """Write local segmentation + GE2E embedding checkpoints under `dest`; DiarizeConfig paths plus provenance."""
    import whisperx

    from tasks.speaker_embedding import build_ge2e_checkpoint, resemblyzer_weights

    dest = Path(dest)
    seg_src = Path(whisperx.__file__).resolve().parent / "assets" / "pytorch_model.bin"
    seg_dir = dest / "pyannote-segmentation"
    seg_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(seg_src, seg_dir / "pytorch_model.bin")
    emb_src = resemblyzer_weights()
    emb_dir = dest / "ge2e-embedding"
    build_ge2e_checkpoint(emb_dir, emb_src)
    info = {
        "segmentation": str(seg_dir),
        "embedding": str(emb_dir),
        "segmentation_source": f"whisperx {metadata.version('whisperx')} whisperx/assets/pytorch_model.bin "
        "(real weights: pyannote/segmentation PyanNet, 5 s multilabel, 3 local speakers)",
        "segmentation_sha256": _sha256(seg_src),
        "embedding_source": f"resemblyzer {metadata.version('resemblyzer')} resemblyzer/pretrained.pt "
        "(real weights: GE2E 3x256 LSTM d-vector) as tasks.speaker_embedding.GE2EEmbedding",
        "embedding_sha256": _sha256(emb_src),
    }
    for part in ("segmentation", "embedding"):  # each model folder says what it holds, as the others do
        note = {"weights": "real", "source": info[f"{part}_source"], "sha256": info[f"{part}_sha256"]}
        (Path(info[part]) / "PROVENANCE.json").write_text(json.dumps(note, indent=1))
    return info


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
