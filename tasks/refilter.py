"""`csm-dataprep refilter`: a dataset filtered again with new quality thresholds, from its stored metrics.

No model runs: the rules of tasks/quality.py are applied to the metrics ingest stored (recordings.parquet for
recording rules, each turn's `metrics` in the sample json for turn rules, window metrics recomputed from the
turns', as ingest computes them), and the samples that pass are copied into a new dataset through the same
DatasetWriter (WebDataset ShardWriter, raw .json/.npy members, no pickle), with index, rejects, recordings
and a manifest holding every shard's sha256.

A turn that now fails splits its window there (a window never joins turns across a rejected one); speakers
are renumbered inside the new windows, and only then is the text tokenizer loaded, to re-encode the turns
whose speaker number changed. Thresholds can only tighten what was kept: what ingest rejected was never
tokenized, so a looser threshold brings nothing back. With the source's own config, refilter reproduces the
source's windows.

Seconds stay exact: every rejected row of the source is carried over, and the kept time a new rule removes
is claimed by the new rejects (tasks/quality.Timeline), so kept + rejected = in still holds.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from schemas.config import IngestConfig
from schemas.records import Reject, Window, WindowTurn
from tasks import quality
from tasks.report import kept_seconds
from tasks.shards import DatasetWriter, sha256_file
from tasks.verify import iter_samples, load_manifest

WINDOW_FIELDS = ("recording_id", "window", "source", "turns", "n_positions")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def refilter_config(source_config: dict[str, Any], config: str | Path | dict[str, Any], dataset: str) -> IngestConfig:
    """The source dataset's config with the given YAML (or mapping) laid over it. The YAML is an ingest config
    (any subset, e.g. `quality: {min_snr_db: 20}`) or just QualityConfig fields (`min_snr_db: 20`)."""
    data = config if isinstance(config, dict) else (yaml.safe_load(Path(config).read_text()) or {})
    if not set(data) & set(IngestConfig.model_fields):
        data = {"quality": data}
    from pydantic import ValidationError

    merged = _merge(source_config, data)
    try:
        return IngestConfig.model_validate({**merged, "dataset": dataset})
    except ValidationError:  # the folder's name is not a valid dataset name: keep the source's
        return IngestConfig.model_validate(merged)


class _Tokenizer:
    """The text tokenizer, loaded on first use (only when a speaker number changes)."""

    def __init__(self, name: str) -> None:
        self.name, self._tok = name, None

    @property
    def loaded(self) -> bool:
        return self._tok is not None

    def encode(self, speaker: int, text: str) -> list[int]:
        from tokenizer.text import encode_turn_text, load_text_tokenizer

        if self._tok is None:
            self._tok = load_text_tokenizer(self.name)
        return encode_turn_text(self._tok, speaker, text)


def _window(recording_id: str, source: str, run: list[tuple[dict, np.ndarray, np.ndarray]], extra: dict[str, Any],
            tokenizer: _Tokenizer) -> tuple[Window, np.ndarray]:
    """A window of consecutive stored turns (their json, codes and text ids), speakers renumbered from 0."""
    speakers: dict[int, int] = {}
    turns = []
    for t, _, ids in run:
        speaker = speakers.setdefault(t["speaker"], len(speakers))
        tokens = ids.tolist() if speaker == t["speaker"] else tokenizer.encode(speaker, t["text"])
        turns.append(WindowTurn(speaker=speaker, text=t["text"], start=t["start"], end=t["end"],
                                text_tokens=len(tokens), frames=t["frames"], source_speaker=t.get("source_speaker", ""),
                                overlap=t.get("overlap", False), metrics=t.get("metrics", {}), tokens=tokens))
    n_positions = sum(t.text_tokens + t.frames + 1 for t in turns)
    window = Window(recording_id=recording_id, window=0, source=source, turns=turns, n_positions=n_positions,
                    extra=copy.deepcopy(extra))
    return window, np.concatenate([c for _, c, _ in run]).astype(np.int16)


def _sample(window: Window, codes: np.ndarray) -> dict[str, Any]:
    """The WebDataset sample, laid out as tasks.shards.window_sample lays it out."""
    meta = window.model_dump(mode="json", exclude={"extra"})
    meta.update({k: v for k, v in window.extra.items() if k != "fingerprint"})
    text = np.array([i for t in window.turns for i in t.tokens], dtype=np.int32)
    return {"__key__": window.key, "json": meta, "codes.npy": codes, "text.npy": text}


def _turn_reject(recording_id: str, source: str, t: dict, rule: str, value: Any, limit: Any, why: str) -> Reject:
    r = Reject(recording_id=recording_id, source=source, stage=quality.STAGE, level="turn",
               reason=f"Turn {recording_id}@{t['start']:.2f}-{t['end']:.2f}s: {why} (refilter)", rule=rule,
               value=value, threshold=limit, start=t["start"], end=t["end"])
    r._spans = [(t["start"], t["end"])]
    return r


def refilter(dataset_dir: str | Path, config: str | Path | dict[str, Any], out_dir: str | Path,
             overwrite: bool = False, report: bool = True) -> dict[str, Any]:
    """Write the dataset `out_dir`: the samples of `dataset_dir` that pass `config`'s thresholds. Returns
    its manifest (with `refilter`: source, figures, whether the text tokenizer had to be loaded)."""
    started = time.perf_counter()
    src, out = Path(dataset_dir), Path(out_dir)
    manifest = load_manifest(src)
    if out.resolve() == src.resolve():
        raise ValueError("refilter writes a new dataset: --out must not be the source dataset")
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out}: already a dataset (pass overwrite to replace it)")
    cfg = refilter_config(manifest.get("config", {}), config, out.name)
    q = cfg.quality
    index = pq.read_table(src / "index.parquet").to_pylist()
    recordings = pq.read_table(src / "recordings.parquet").to_pylist() if (src / "recordings.parquet").exists() else []
    old_rejects: dict[str, list[Reject]] = defaultdict(list)
    for row in pq.read_table(src / "rejects.parquet").to_pylist():
        old_rejects[row["recording_id"]].append(Reject.model_validate(row))
    rows_by_key = {r["key"]: r for r in index}
    rec_by_id = {r["recording_id"]: r for r in recordings}
    tokenizer = _Tokenizer(cfg.tokenize.text)
    writer = DatasetWriter(out, cfg.shards, overwrite=True)
    new_rejects: dict[str, list[Reject]] = defaultdict(list)
    kept_windows: dict[str, int] = defaultdict(int)

    def process(recording_id: str, samples: list[dict[str, Any]]) -> None:
        samples.sort(key=lambda s: s["json"]["window"])
        rec = rec_by_id.get(recording_id, {})
        source = samples[0]["json"]["source"]
        duration = rec.get("duration") or max(t["end"] for s in samples for t in s["json"]["turns"])
        was_kept = sum(kept_seconds(rows_by_key.get(s["__key__"]) or {"duration": 0.0}) for s in samples)
        whole = quality.check_recording(recording_id, source, rec, rec.get("language"), duration, q)
        if whole:
            r = whole[0]
            r.start, r.end, r.seconds = None, None, was_kept
            r.reason += f" (refilter: its {len(samples)} windows, {was_kept:.2f} s, removed)"
            new_rejects[recording_id].append(r)
            return
        windows: list[Window] = []
        rejects: list[Reject] = []
        codes_of: dict[int, np.ndarray] = {}
        for s in samples:
            meta = s["json"]
            extra = {k: v for k, v in meta.items() if k not in WINDOW_FIELDS}
            run: list[tuple[dict, np.ndarray, np.ndarray]] = []
            frame = token = 0
            for t in meta["turns"]:
                piece = (t, s["codes"][frame : frame + t["frames"]], s["text"][token : token + t["text_tokens"]])
                frame, token = frame + t["frames"], token + t["text_tokens"]
                rule, value, limit, why = quality.turn_failure(t["text"], t.get("metrics", {}), q)
                if not rule:
                    run.append(piece)
                    continue
                rejects.append(_turn_reject(recording_id, source, t, rule, value, limit, why))
                if run:
                    w, codes = _window(recording_id, source, run, extra, tokenizer)
                    windows.append(w)
                    codes_of[id(w.turns[0])] = codes
                run = []
            if run:
                w, codes = _window(recording_id, source, run, extra, tokenizer)
                windows.append(w)
                codes_of[id(w.turns[0])] = codes
        for w in windows:
            quality.annotate_window(w, rec)
        windows, window_rejects = quality.filter_windows(windows, q, rec)
        windows, duplicates = quality.drop_duplicates(windows, lambda w: codes_of[id(w.turns[0])], writer.dedupe, q)
        timeline = quality.Timeline(duration)
        for w in windows:
            w.extra["metrics"]["audio_s"] = timeline.claim((t.start, t.end) for t in w.turns)
        for r in rejects + window_rejects + duplicates:
            r.seconds = timeline.claim(quality.spans_of(r))
            if not r.reason.endswith("(refilter)"):
                r.reason += " (refilter)"
            new_rejects[recording_id].append(r)
        for w in windows:
            writer.write(w, _sample(w, codes_of[id(w.turns[0])]))
        kept_windows[recording_id] = len(windows)

    try:
        group: list[dict[str, Any]] = []
        for entry in manifest["shards"]:
            for s in iter_samples([str(src / entry["path"])]):
                if group and s["json"]["recording_id"] != group[0]["json"]["recording_id"]:
                    process(group[0]["json"]["recording_id"], group)
                    group = []
                group.append(s)
        if group:
            process(group[0]["json"]["recording_id"], group)
        added = sum(len(v) for v in new_rejects.values())
        for rec in recordings:
            rid = rec["recording_id"]
            row = dict(rec)
            if row.get("status") == "kept":
                row["windows"] = kept_windows.get(rid, 0)
                row["status"] = "kept" if row["windows"] else "rejected"
            writer.add_recording(row, old_rejects.pop(rid, []) + new_rejects.pop(rid, []))
        for rejects in (*old_rejects.values(), *new_rejects.values()):  # rows of recordings the table lacks
            writer.rejects.extend(rejects)
        counts = {"windows_in": len(index), "windows_kept": sum(kept_windows.values()),
                  "new_rejects": added, "wall_s": time.perf_counter() - started}
        result = writer.publish({
            "dataset": cfg.dataset,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": cfg.model_dump(mode="json"),
            "models": manifest.get("models", {}),
            "untrained_models": manifest.get("untrained_models", []),
            "device": "none (refilter runs no model)",
            "refilter": {"source": str(src.resolve()), "source_dataset": manifest.get("dataset"),
                         "source_manifest_sha256": sha256_file(src / "manifest.json"),
                         "text_tokenizer_loaded": tokenizer.loaded, **counts},
            "counts_this_run": counts,
        })
    except BaseException:
        writer.abort()
        raise
    if report:
        from tasks.report import build_report

        build_report(out)
    return result


def main_summary(manifest: dict[str, Any]) -> str:
    info = manifest.get("refilter", {})
    c = manifest.get("counts", {})
    return json.dumps({"windows_in": info.get("windows_in"), "windows_kept": c.get("windows"),
                       "hours_in": c.get("hours_in"), "hours_kept": c.get("hours_kept"),
                       "hours_rejected_by_reason": c.get("hours_rejected_by_reason"),
                       "text_tokenizer_loaded": info.get("text_tokenizer_loaded")}, indent=1)
