"""After an ingest run: verify what it published, report it as Prefect artifacts, and announce new shards.

The `shards.ready` event (resource `dataset.<name>`, payload `manifest`) is what the `train/csm` deployment's
trigger listens for (prefect.yaml). It is only emitted once the dataset verified, and only when the run added
shards: a run that kept nothing new trains nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks import report, storage

SHARDS_READY = "shards.ready"


def artifact_key(dataset: str, what: str) -> str:
    """Keys of the run artifacts: `ingest-<dataset>-<what>`."""
    return report.artifact_key(dataset, what, prefix="ingest")


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's summary (flows.ingest.summarize) as metric/value rows for a table artifact."""
    rows: list[dict[str, Any]] = []

    def add(metric: str, value: Any, unit: str = "") -> None:
        if isinstance(value, float):
            value = round(value, 6)
        rows.append({"metric": metric, "value": value, "unit": unit})

    add("recordings processed", summary.get("recordings", 0))
    add("recordings skipped (already in the dataset)", summary.get("recordings_skipped", 0))
    add("recordings failed", summary.get("recordings_failed", 0))
    add("sources not fetched", summary.get("sources_failed", 0))
    add("hours in", summary.get("hours_in", 0.0), "h")
    add("hours kept", summary.get("hours_kept", 0.0), "h")
    for reason, hours in sorted(summary.get("hours_rejected_by_reason", {}).items()):
        add(f"hours rejected: {reason}", hours, "h")
    add("windows", summary.get("windows", 0))
    add("turns", summary.get("turns", 0))
    add("rejects", summary.get("rejects", 0))
    add("new shards", summary.get("shards", 0))
    add("shards in the dataset", summary.get("dataset_shards", 0))
    add("wall time", summary.get("wall_s", 0.0), "s")
    add("real-time factor (whole run)", summary.get("realtime_factor", 0.0), "x")
    for stage, rtf in summary.get("stage_realtime_factor", {}).items():
        add(f"real-time factor: {stage}", rtf, "x")
    add("untrained models", ", ".join(summary.get("untrained_models", [])) or "none")
    return rows


@task(cache_policy=NO_CACHE, persist_result=False)
def verify(dataset_dir: str) -> dict[str, Any]:
    from tasks.verify import verify_dataset

    return verify_dataset(dataset_dir)


def publish_run(summary: dict[str, Any], dataset: str, dataset_dir: str | Path,
                verified: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Verify the dataset if the run added shards (unless its parts were `verified` already: a fan-out),
    publish the artifacts, then emit `shards.ready`. Returns the event's payload, or None when nothing was
    announced."""
    logger = get_run_logger()
    create_table_artifact(table=summary_rows(summary), key=artifact_key(dataset, "summary"),
                          description=f"ingest run into dataset `{dataset}`: this run's figures")
    manifest = summary.get("manifest")
    if manifest and storage.exists(manifest):
        link = manifest if storage.is_remote(manifest) else Path(manifest).resolve().as_uri()
        create_link_artifact(link=link, link_text=f"{dataset}: {manifest}",
                             key=artifact_key(dataset, "manifest"),
                             description=f"manifest.json of dataset `{dataset}` ({summary.get('dataset_shards', 0)} "
                             f"shards, {summary.get('shards', 0)} new in this run)")
        report.publish_report_artifacts(storage.parent(manifest))  # rebuilds <dataset>/report/ (HTML + plots) first
    if not summary.get("shards"):
        logger.info("no new shards: no %s event", SHARDS_READY)
        return None
    counts = verified or verify(str(dataset_dir))
    logger.info("dataset %s verified: %d shards, %d samples", dataset, counts["shards"], counts["samples"])
    payload = {"manifest": str(manifest), "dataset": dataset, "new_shards": summary["shards"],
               "samples": counts["samples"], "hours_kept": summary.get("hours_kept", 0.0)}
    emit_event(event=SHARDS_READY, resource={"prefect.resource.id": f"dataset.{dataset}",
                                             "prefect.resource.name": dataset}, payload=payload)
    logger.info("emitted %s for dataset.%s: %s", SHARDS_READY, dataset, manifest)
    return payload
