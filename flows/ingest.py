"""Prefect flow `ingest`: raw conversational audio -> CSM-ready WebDataset shards.

Per recording: decode -> ASR (whisperX) -> word alignment -> diarization (pyannote) -> turns -> quality
gate -> windows -> Mimi + text tokens -> shards. Each stage is a thin task over a plain function in tasks/.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from schemas.config import FanoutConfig, IngestConfig, resolve_device
from schemas.records import Reject, Source, SpeakerSegment, Transcript, Turn, Window
from tasks import decode as decode_mod
from tasks import metrics, quality, shards, storage, turns, windows
from tasks.cache import StageCache
from tasks.diarize import assign_speakers, overlap_regions
from tasks.models import Models, describe_models, load_models, untrained
from tasks.sources import FetchConfig

CONFIG_ENV = "CSM_INGEST_CONFIG"  # an ingest config YAML: the default of runs that pass no `config`

# Arrays pass between tasks in memory: no hashing, no result persistence.
stage = task(cache_policy=NO_CACHE, persist_result=False)


@stage
def decode_audio(path: str, cfg: IngestConfig, decoded: Any = None) -> decode_mod.DecodedAudio:
    """The recording at the ASR rate; `decoded` is the result (or the error) of a decode run ahead of time
    (ingest_sources decodes the next file while the models work on this one)."""
    if isinstance(decoded, BaseException):
        raise decoded
    return decoded if decoded is not None else decode_mod.decode_recording(path, cfg.decode)


@stage
def transcribe(audio16: Any, models: Models) -> Transcript:
    from tasks.asr import transcribe as run

    return run(audio16, models.asr, models.cfg.asr)


@stage
def align(audio16: Any, transcript: Transcript, models: Models) -> Transcript:
    from tasks.asr import align as run

    if not transcript.segments:  # nothing heard: no aligner to load (the detected language may be junk)
        return transcript
    return run(audio16, transcript, models.aligner(transcript.language), models.cfg.align, models.device)


class Diarization(BaseModel):
    segments: list[SpeakerSegment]


@stage
def diarize(audio16: Any, models: Models) -> Diarization:
    from tasks.diarize import diarize as run

    return Diarization(segments=run(audio16, models.diarizer, models.cfg.diarize))


@stage
def make_windows(rec_id: str, source: str, transcript: Transcript, overlaps: list, duration: float,
                 models: Models, audio16: Any = None, signal: metrics.Signal | None = None,
                 recording: dict[str, Any] | None = None) -> tuple[list[Window], list[Reject]]:
    """Turns -> measured and filtered turns -> windows -> measured and filtered windows (tasks/quality.py)."""
    from tokenizer.text import encode_turn_text

    cfg, q = models.cfg, models.cfg.quality
    recording = recording or {}
    rejects = quality.check_transcript(rec_id, source, transcript, duration) or quality.check_speakers(
        rec_id, source, metrics.count_speakers(transcript), duration, q)
    if rejects:
        return [], rejects
    all_turns: list[Turn] = turns.make_turns(transcript, overlaps, cfg.turns)
    kept, turn_rejects = quality.filter_turns(rec_id, source, all_turns, transcript, q, signal, overlaps)
    packed, pack_rejects = windows.pack_windows(
        rec_id, source, kept, lambda spk, text: encode_turn_text(models.text_tokenizer, spk, text), cfg.windows)
    for w in packed:
        quality.annotate_window(w, recording)
    packed, window_rejects = quality.filter_windows(packed, q, recording)
    squim_rejects: list[Reject] = []
    if q.squim_model and packed and audio16 is not None:  # measured only on windows that passed the rest
        model = metrics.load_squim(q.squim_model, models.device)
        for w in packed:
            clip = metrics.window_audio(audio16, [(t.start, t.end) for t in w.turns], q.squim_max_s,
                                        cfg.decode.asr_sample_rate)
            w.extra["metrics"].update(metrics.squim_scores(model, clip, models.device))
        packed, squim_rejects = quality.filter_windows(packed, q, recording, quality.SQUIM_RULES)
    return packed, turn_rejects + pack_rejects + window_rejects + squim_rejects


@stage
def tokenize_audio(path: str, models: Models) -> Any:
    """Mimi codes of the file, decoded at 24 kHz chunk by chunk: the whole recording is never held at 24 kHz."""
    from tokenizer.mimi import chunk_samples, encode_stream

    cfg = models.cfg.tokenize
    chunks = decode_mod.stream(path, models.cfg.decode.codec_sample_rate, chunk_samples(cfg.chunk_s))
    return encode_stream(chunks, models.mimi, num_codebooks=cfg.num_codebooks, chunk_s=cfg.chunk_s,
                         batch_size=cfg.batch_size)


@dataclass
class RecordingResult:
    recording_id: str
    source: Source
    duration: float = 0.0
    windows: list[Window] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    language: str | None = None
    failed: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)  # tasks/metrics.py RECORDING_METRICS

    def row(self) -> dict[str, Any]:
        """Its row in recordings.parquet."""
        status = "failed" if self.failed else ("kept" if self.windows else "rejected")
        return {"recording_id": self.recording_id, "source": self.source.uri, "status": status,
                "duration": self.duration, "windows": len(self.windows), "language": self.language,
                "ingested": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **{k: self.metrics.get(k) for k in metrics.RECORDING_METRICS},
                **{k: self.source.meta.get(k) for k in shards.SOURCE_META}}


def process_recording(item: Source, models: Models, rec_id: str | None = None,
                      cache: StageCache | None = None, dedupe: metrics.DuplicateIndex | None = None,
                      decoded: Any = None) -> RecordingResult:
    """All stages for one file. A failure becomes a recording-level reject naming the stage and reason.
    `dedupe` holds the dataset's windows so far: a window another recording already has is rejected.

    Model stages go through `cache` (keyed by content, stage config and models), so a rerun after a crash
    redoes only what had not finished.
    """
    cfg = models.cfg
    cache = cache or StageCache(None)
    path, source = item.path, item.uri
    result = RecordingResult(recording_id=rec_id or decode_mod.name_slug(path), source=item)
    rid = result.recording_id
    info = describe_models(cfg, models.device)
    asr_key = [cfg.decode.asr_sample_rate, cfg.asr.model_dump(), info["asr"]]

    def retried(t: Any) -> Any:  # model stages may fail transiently (GPU OOM, a flaky mount): retry, then record
        return t.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_s)

    current = "decode"
    try:
        t = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t, current
            now = time.perf_counter()
            result.seconds[current] = now - t
            t, current = now, name

        audio = decode_audio(path, cfg, decoded)
        result.duration = audio.duration
        signal = metrics.analyse_signal(audio.audio16, cfg.decode.asr_sample_rate, cfg.quality.silence_dbfs)
        result.metrics = signal.recording_metrics()
        result.rejects = quality.check_signal(rid, source, result.metrics, audio.duration, cfg.quality)
        if result.rejects:  # silence, clipping or noise: no model needs to hear it
            lap("done")
            return result
        lap("asr")
        transcript = cache.record("asr", rid, asr_key, lambda: retried(transcribe)(audio.audio16, models), Transcript)
        result.language = transcript.language
        result.metrics["language_probability"] = transcript.language_probability
        if transcript.segments:  # (with no speech the detected language means nothing)
            result.rejects = quality.check_language(rid, source, transcript.language,
                                                    transcript.language_probability, audio.duration, cfg.quality)
            if result.rejects:  # not a language this dataset keeps: no aligner needed
                lap("done")
                return result
        lap("align")
        transcript = cache.record("align", rid, [asr_key, cfg.align.model_dump(), info["align"]],
                                  lambda: retried(align)(audio.audio16, transcript, models), Transcript)
        lap("diarize")
        diar_key = [cfg.decode.asr_sample_rate, cfg.diarize.model_dump(),
                    {k: v for k, v in info.items() if k.startswith("diarize")}]
        segments = cache.record("diarize", rid, diar_key, lambda: retried(diarize)(audio.audio16, models),
                                Diarization).segments
        transcript, overlaps = assign_speakers(transcript, segments), overlap_regions(segments)
        result.metrics["n_speakers"] = metrics.count_speakers(transcript)
        lap("windows")
        packed, result.rejects = make_windows(result.recording_id, source, transcript, overlaps, audio.duration,
                                              models, audio.audio16, signal, result.metrics)
        lap("tokenize")
        rate = cfg.windows.frame_rate
        if packed:
            codes_key = [cfg.decode.codec_sample_rate, cfg.tokenize.model_dump(exclude={"text"}), info["mimi"]]
            codes = cache.array("codes", rid, codes_key, lambda: retried(tokenize_audio)(path, models))
            for w in packed:
                w.extra.update(language=transcript.language, source_meta=item.meta)
            packed, duplicates = quality.drop_duplicates(
                packed, lambda w: shards.window_codes(w, codes, rate), dedupe, cfg.quality)
            result.rejects += duplicates
        # every second in a kept window or in one reject; sets each window's metrics["audio_s"]
        result.rejects = quality.settle(rid, source, audio.duration, packed, result.rejects)
        result.samples = [shards.window_sample(w, codes, rate) for w in packed]
        result.windows = packed
        lap("done")
    except Exception as exc:  # noqa: BLE001 - recorded, per the error policy
        if cfg.on_error == "raise":
            raise
        result.windows, result.samples, result.failed = [], [], True
        result.rejects = [Reject(recording_id=result.recording_id, source=source, stage=current, level="recording",
                                 reason=f"{path}: {type(exc).__name__}: {exc}", rule="error",
                                 seconds=result.duration)]
    return result


@flow(name="ingest", log_prints=True)
def ingest(
    sources: list[str] | None = None,
    feeds: list[str] | None = None,
    config: IngestConfig | None = None,
    dataset: str | None = None,
    fetch: FetchConfig | None = None,
    fanout: FanoutConfig | None = None,
) -> dict[str, Any]:
    """Ingest audio into the dataset `<config.out>/<config.dataset>/`.

    The dataset grows across runs: an episode (same GUID) or recording (same content) already in it is skipped.
    Once the new shards are published and verified, the run emits `shards.ready` (resource `dataset.<name>`,
    payload `manifest`) and leaves a summary table and a link to the manifest as artifacts.

    Args:
        sources: Files, folders, globs, http(s) URLs, fsspec URIs (s3://, gs://, memory://...) and .csv/.parquet
            manifests with a `uri` column.
        feeds: Podcast RSS/Atom feed URLs (http/https): new episodes are downloaded and ingested, keeping their
            feed, title, published date, GUID and URL.
        config: Every ingest option. None: the YAML file named by $CSM_INGEST_CONFIG on the worker if set,
            else the defaults.
        dataset: Dataset name, replacing the config's.
        fetch: Download bounds (size, time), episodes per feed, parallel downloads. None: the defaults.
        fanout: Spread the run over a work pool: the sources and new episodes are split into partitions, each
            ingested by an `ingest/partition` run on its own worker (one GPU each), then merged into the
            dataset (flows/fanout.py). None: this run ingests everything itself.
    """
    from flows import inputs, publish
    from tasks.sources import remove_downloads

    logger = get_run_logger()
    cfg = resolve_config(config, dataset)
    fetch = fetch or FetchConfig()
    if not sources and not feeds:
        raise ValueError("nothing to ingest: give `sources` and/or `feeds`")
    if fanout is not None:
        from flows.fanout import fan_out

        return fan_out(sources or [], feeds or [], cfg, fanout, fetch)
    dataset_dir = storage.join(cfg.out, cfg.dataset)
    got = inputs.gather(sources or [], feeds or [], dataset_dir, cfg.work_dir() / "downloads", fetch)
    if sources and not feeds and not got.sources:
        raise ValueError(f"no audio files found in {sources}" + "".join(f"\n{u}: {r}" for u, r in got.failures))
    if feeds and not sources and not got.feeds_ok:
        raise RuntimeError("no feed could be fetched:" + "".join(f"\n{u}: {r}" for u, r in got.failures))
    if got.sources:
        summary = ingest_sources(got.sources, cfg)
    else:
        logger.info("nothing new to ingest into %s", dataset_dir)
        summary = _nothing_new(dataset_dir)
    summary["recordings_skipped"] = summary.get("recordings_skipped", 0) + got.episodes_seen
    summary["sources_failed"] = len(got.failures)
    publish.publish_run(summary, cfg.dataset, dataset_dir)
    if not fetch.keep_downloads:
        remove_downloads(got.downloaded)
    return summary


def resolve_config(config: IngestConfig | None, dataset: str | None = None) -> IngestConfig:
    """The run's config: as given, else the YAML named by $CSM_INGEST_CONFIG (a worker's default), else the
    defaults; `dataset` replaces its dataset name."""
    import os

    if config is None:
        path = os.environ.get(CONFIG_ENV)
        config = IngestConfig.from_yaml(path) if path else IngestConfig()
    if dataset:
        config = IngestConfig.model_validate({**config.model_dump(), "dataset": dataset})
    return config


def _nothing_new(dataset_dir: str) -> dict[str, Any]:
    """The summary of a run that had nothing to process."""
    manifest = storage.join(dataset_dir, "manifest.json")
    exists = storage.exists(manifest)
    shards_now = len(storage.read_json(manifest)["shards"]) if exists else 0
    return {"recordings": 0, "recordings_skipped": 0, "recordings_failed": 0, "hours_in": 0.0, "hours_kept": 0.0,
            "hours_rejected_by_reason": {}, "windows": 0, "turns": 0, "rejects": 0, "wall_s": 0.0,
            "realtime_factor": 0.0, "stage_realtime_factor": {}, "shards": 0, "dataset_shards": shards_now,
            "manifest": storage.display(manifest) if exists else None, "untrained_models": []}


def ingest_sources(items: list[Source], cfg: IngestConfig, dataset_dir: str | None = None,
                   manifest_extra: dict[str, Any] | None = None, skip: set[str] | None = None) -> dict[str, Any]:
    """The body of every ingest flow, once its sources are local files: they go into the dataset at
    `dataset_dir` (default <out>/<dataset>; a partition's part folder in a fan-out), `manifest_extra` into its
    manifest. Recordings whose id or GUID is in `skip` (or already in that dataset) are skipped."""
    logger = get_run_logger()
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    model_info = describe_models(cfg, device)
    dataset_dir = dataset_dir or storage.join(cfg.out, cfg.dataset)
    logger.info("ingest %d files into %s on %s", len(items), dataset_dir, device)
    for name, info in model_info.items():
        logger.info("model %-22s %s [%s]", name, info.get("name"), info.get("weights"))
    if untrained(model_info):
        logger.warning("untrained (random) weights: %s: their outputs are not meaningful",
                       ", ".join(untrained(model_info)))
    writer = shards.DatasetWriter(dataset_dir, cfg.shards, overwrite=cfg.overwrite)
    results: list[RecordingResult] = []
    skipped = 0
    cache = StageCache(cfg.work_dir())
    ahead = None
    try:
        models = load_models(cfg, device)  # once per run: a worker process keeps them for all its files
        logger.info("models loaded on %s for %d files", device, len(items))
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        def known(rec_id: str, guid: str) -> bool:
            return writer.seen(rec_id) or writer.seen(guid) or rec_id in (skip or ()) or guid in (skip or ())

        # One recording ahead: ffmpeg decodes the next file (a subprocess; the thread only waits on its pipe)
        # while the models work on this one, so the GPU does not wait for the CPU between files.
        ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csm-read-ahead")
        pending = ahead.submit(_read_ahead, items[0], cfg, known) if items else None
        for i, item in enumerate(tqdm(items, desc="recordings", unit="file", disable=None)):
            waited = time.perf_counter()
            rec_id, decoded = pending.result()
            waited = time.perf_counter() - waited
            pending = ahead.submit(_read_ahead, items[i + 1], cfg, known) if i + 1 < len(items) else None
            if known(rec_id, item.meta.get("guid", "")):
                skipped += 1
                logger.info("%s: already in the dataset, skipped", item.uri)
                continue
            r = process_recording(item, models, rec_id, cache, writer.dedupe, decoded)
            r.seconds["decode"] = r.seconds.get("decode", 0.0) + waited  # what the read-ahead did not hide
            for window, sample in zip(r.windows, r.samples, strict=True):
                writer.write(window, sample)
            writer.add_recording(r.row(), r.rejects)
            r.samples = []  # written: free the codes
            results.append(r)
            logger.info("%s: %.1f s, %d windows, %d rejects", item.uri, r.duration, len(r.windows), len(r.rejects))
        summary = summarize(results, writer, time.perf_counter() - started, skipped)
        manifest = writer.publish({
            "dataset": cfg.dataset,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": cfg.model_dump(mode="json"),
            "models": model_info,
            "untrained_models": untrained(model_info),
            "device": device,
            "counts_this_run": summary,
            **(manifest_extra or {}),
        })
    except BaseException:
        writer.abort()
        raise
    finally:
        if ahead is not None:
            ahead.shutdown(cancel_futures=True)
    summary["shards"] = len(manifest["new_shards"])
    summary["dataset_shards"] = len(manifest["shards"])
    summary["manifest"] = storage.display(storage.join(dataset_dir, "manifest.json"))
    summary["untrained_models"] = manifest["untrained_models"]
    return summary


def summarize(results: list[RecordingResult], writer: shards.DatasetWriter, wall: float,
              skipped: int) -> dict[str, Any]:
    """This run's figures (the manifest's `counts` are the whole dataset's)."""
    stage_s: dict[str, float] = defaultdict(float)
    for r in results:
        for k, v in r.seconds.items():
            stage_s[k] += v
    seconds_in = sum(r.duration for r in results)
    return {
        "recordings": len(results),
        "recordings_skipped": skipped,
        "recordings_failed": sum(1 for r in results if r.failed),
        "hours_in": seconds_in / 3600,
        "hours_kept": sum(w.duration for r in results for w in r.windows) / 3600,
        "hours_rejected_by_reason": shards.hours_by_reason([r.model_dump() for r in writer.rejects]),
        "windows": sum(len(r.windows) for r in results),
        "turns": sum(len(w.turns) for r in results for w in r.windows),
        "rejects": len(writer.rejects),
        "wall_s": wall,
        "realtime_factor": seconds_in / wall if wall > 0 else math.nan,
        "stage_realtime_factor": {k: seconds_in / v for k, v in stage_s.items() if v > 0},
    }


def _read_ahead(item: Source, cfg: IngestConfig, known: Any) -> tuple[str, Any]:
    """A recording's content id and, unless `known(id, guid)`, its decoded audio or the decode's error."""
    rec_id = _content_id(item.path)
    if known(rec_id, item.meta.get("guid", "")):
        return rec_id, None
    try:
        return rec_id, decode_mod.decode_recording(item.path, cfg.decode)
    except Exception as exc:  # noqa: BLE001 - raised in the decode task, where the error policy records it
        return rec_id, exc


def _content_id(path: str) -> str:
    try:
        return decode_mod.recording_id(path)
    except OSError:  # unreadable: decode will say why, under a name-based id
        return decode_mod.name_slug(path)

