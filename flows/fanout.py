"""One ingest spread over a work pool's workers: `ingest` given `fanout`, and the `ingest/partition` flow.

The parent (an `ingest` run) lists its sources and new feed episodes (nothing downloaded), splits them into partitions (tasks/partitions.py) and
starts one `ingest/partition` run per partition with `run_deployment`, at most `max_parallel` at a time. Each
child ingests its partition into `<dataset>/parts/<id>/` with models loaded once for all its files; the parent
retries partitions that ended without their part manifest, then writes the dataset's tables and manifest from
the part manifests (no shard is copied) and announces `shards.ready` once for the whole fan-out. A rerun over
the same sources skips the partitions already done.
"""

from __future__ import annotations

import os
import time
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger

from flows.ingest import ingest_sources, resolve_config
from schemas.config import FanoutConfig, IngestConfig
from tasks import partitions, storage
from tasks.sources import FetchConfig

SUM_FIELDS = ("recordings", "recordings_skipped", "recordings_failed", "hours_in", "hours_kept", "windows", "turns",
              "rejects", "shards")


@flow(name="ingest", log_prints=True)  # deployment ingest/partition: one flow, many entry points
def ingest_partition(
    sources: list[str],
    part: str,
    meta: dict[str, dict[str, str]] | None = None,
    config: IngestConfig | None = None,
    dataset: str | None = None,
    fetch: FetchConfig | None = None,
) -> dict[str, Any]:
    """Ingest one partition of a fan-out into `<out>/<dataset>/parts/<part>/` (started by `ingest` runs given
    `fanout`; its shards are announced by that parent run).

    Args:
        sources: The partition's files and URIs (anything `ingest` takes, already expanded).
        part: The partition's id (its folder under parts/).
        meta: Metadata per source (feed, title, published, guid, url of podcast episodes).
        config: The fan-out's ingest config.
        dataset: Dataset name, replacing the config's.
        fetch: Download bounds. None: the defaults.
    """
    from flows import inputs
    from tasks.feeds import ingested_keys
    from tasks.sources import remove_downloads

    logger = get_run_logger()
    cfg = resolve_config(config, dataset)
    fetch = fetch or FetchConfig()
    dataset_url = storage.join(cfg.out, cfg.dataset)
    part_url = storage.join(dataset_url, partitions.PARTS_DIR, part)
    logger.info("partition %s: %d sources on worker process %s (CUDA_VISIBLE_DEVICES=%s)", part, len(sources),
                os.environ.get("CSM_WORKER", "-"), os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    got = inputs.gather(sources, [], part_url, cfg.work_dir() / "downloads", fetch)
    for src in got.sources:
        src.meta.update((meta or {}).get(src.uri) or (meta or {}).get(src.path) or {})
    if not got.sources:
        raise RuntimeError(f"partition {part}: no source could be fetched:"
                           + "".join(f"\n{u}: {r}" for u, r in got.failures))
    try:
        # recordings that earlier fan-outs already merged into the dataset are not ingested again
        summary = ingest_sources(got.sources, cfg, part_url, manifest_extra={"partition": part},
                                 skip=ingested_keys(dataset_url))
    finally:
        if not fetch.keep_downloads:
            remove_downloads(got.downloaded)
    summary["sources_failed"] = len(got.failures)
    if summary["shards"]:
        from tasks.verify import verify_dataset

        counts = verify_dataset(part_url)
        logger.info("part %s verified: %d shards, %d samples", part, counts["shards"], counts["samples"])
    return summary


def fan_out(sources: list[str], feeds: list[str], cfg: IngestConfig, fan: FanoutConfig,
            fetch: FetchConfig) -> dict[str, Any]:
    """The body of `ingest` when it is given `fanout`: list, partition, run the partitions on the work pool,
    merge, announce. Returns the run's summary; raises once the rest is done if partitions failed."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows import publish
    from tasks import feeds as feeds_mod

    logger = get_run_logger()
    started = time.perf_counter()
    dataset_url = storage.join(cfg.out, cfg.dataset)
    rows = partitions.list_sources(sources, probe_local=fan.hours is not None)
    seen = feeds_mod.ingested_keys(dataset_url) if feeds else set()
    for url in feeds:  # episodes become URLs with their metadata: the partitions download them
        new = feeds_mod.new_episodes(feeds_mod.fetch_feed(url, fetch), seen, fetch.max_episodes)
        rows += [{"uri": ep.url, **ep.meta()} for ep in new]
        logger.info("%s: %d new episodes", url, len(new))
    if not rows:
        raise ValueError(f"nothing new to ingest from sources {sources} and feeds {feeds}")
    parts = partitions.plan_partitions(rows, fan.files, fan.hours, fan.assumed_hours)
    logger.info("%d sources -> %d partitions of at most %s into %s", len(rows), len(parts),
                f"{fan.files} files" if fan.files else f"{fan.hours} h", dataset_url)
    params = {"config": cfg.model_dump(mode="json"), "dataset": cfg.dataset, "fetch": fetch.model_dump(mode="json")}

    def submit(p: partitions.Partition) -> str:
        run = run_deployment(fan.deployment, timeout=0, flow_run_name=f"{cfg.dataset}-{p.id}", tags=["partition"],
                             parameters={**params, "sources": p.sources, "meta": p.meta, "part": p.id})
        return str(run.id)

    def state_of(run_id: str) -> str | None:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(run_id)).state
        return state.name if state is not None and state.is_final() else None

    outcome = partitions.run_partitions(parts, submit, state_of, lambda p: partitions.part_done(dataset_url, p),
                                        fan.max_parallel, fan.retries, fan.poll_s, logger.info)
    manifest = partitions.merge_parts(dataset_url, parts, {
        "dataset": cfg.dataset,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.model_dump(mode="json"),
        "fanout": {**fan.model_dump(mode="json"), "partitions": len(parts), "done": len(outcome.done),
                   "failed": outcome.failed},
    })
    new_parts = [p for p in parts if p.id in outcome.done and p.id in outcome.runs]  # finished by this run
    summary = aggregate([_part_summary(p.url(dataset_url)) for p in new_parts])
    summary.update(
        wall_s=time.perf_counter() - started, partitions=len(parts),
        partitions_skipped=len([i for i in outcome.done if i not in outcome.runs]),
        partitions_failed=len(outcome.failed), dataset_shards=len(manifest["shards"]),
        manifest=storage.display(storage.join(dataset_url, "manifest.json")),
        untrained_models=manifest["untrained_models"])
    summary["realtime_factor"] = summary["hours_in"] * 3600 / summary["wall_s"]
    # each partition verified its own part (ingest_partition): the parent does not reread every shard
    publish.publish_run(summary, cfg.dataset, dataset_url,
                        verified={"shards": len(manifest["shards"]), "samples": manifest["counts"]["windows"]})
    if outcome.failed:
        raise RuntimeError(f"{len(outcome.failed)} of {len(parts)} partitions failed ({outcome.failed}); the "
                           f"{len(outcome.done)} done are in the dataset; rerun to retry the others")
    return summary


def _part_summary(part_url: str) -> dict[str, Any]:
    """The figures of the run that wrote a part (its manifest's last run), with its shard count."""
    pm = storage.read_json(storage.join(part_url, "manifest.json"))
    counts = dict(pm["runs"][-1].get("counts_this_run", {})) if pm.get("runs") else {}
    counts["shards"] = len(pm.get("new_shards", []))
    return counts


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Partition summaries added up: totals, and hours rejected by reason."""
    # a summary also holds figures that do not add up (wall_s, manifest...): only SUM_FIELDS go in, None as 0
    picked = [{**{k: s.get(k) or 0 for k in SUM_FIELDS},
               "hours_rejected_by_reason": s.get("hours_rejected_by_reason", {})} for s in summaries]
    totals = partitions.add_counts(picked)
    # every SUM_FIELD, in its order (0 when no partition ran), then the reasons
    return {**{k: totals.get(k, 0) for k in SUM_FIELDS}, "hours_rejected_by_reason": totals["hours_rejected_by_reason"]}
