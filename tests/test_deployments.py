"""prefect.yaml on a real Prefect server: deploy, ingest a podcast feed through a worker, artifacts, the
`shards.ready` event, and the training run its trigger starts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flows.publish import artifact_key
from tasks.verify import iter_samples, verify_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_declares_the_deployments() -> None:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert set(deps) == {"podcasts", "files", "partition", "csm"}
    for d in deps.values():  # every entrypoint names a real flow function
        path, func = d["entrypoint"].split(":")
        assert f"def {func}(" in (ROOT / path).read_text()
    assert deps["podcasts"]["entrypoint"] == deps["files"]["entrypoint"] == "flows/ingest.py:ingest"
    assert deps["csm"]["entrypoint"] == "flows/train.py:train"
    assert deps["partition"]["entrypoint"] == "flows/fanout.py:ingest_partition"
    pools = {p["name"] for p in doc["definitions"]["work_pools"].values()}
    assert deps["podcasts"]["work_pool"]["name"] in pools and deps["csm"]["work_pool"]["name"] in pools
    (schedule,) = deps["podcasts"]["schedules"]
    assert schedule["active"] is False and schedule["cron"]
    (trigger,) = deps["csm"]["triggers"]
    assert trigger["expect"] == ["shards.ready"]
    assert trigger["match"] == {"prefect.resource.id": "dataset.*"}
    assert trigger["parameters"] == {"manifest": "{{ event.payload.manifest }}"}


@pytest.mark.slow
def test_podcast_feed_ingested_announced_and_trained(prefect_stack, podcast_run) -> None:
    stack = prefect_stack
    root = stack.out / "podcasts"
    # Shards published and valid.
    counts = verify_dataset(root)
    assert counts["samples"] >= 2
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["new_shards"] and manifest["dataset"] == "podcasts"
    # Episode metadata kept in the recordings table, the index and every sample's json.
    recs = {r["guid"]: r for r in pq.read_table(root / "recordings.parquet").to_pylist()}
    assert set(recs) == set(stack.episodes)
    for guid, ep in stack.episodes.items():
        r = recs[guid]
        assert r["status"] == "kept" and r["title"] == ep["title"] and r["feed"] == stack.feed_url
        assert r["url"].endswith(ep["file"]) and r["source"] == r["url"] and r["published"].startswith("2025-01-0")
    index = pq.read_table(root / "index.parquet").to_pylist()
    assert {row["guid"] for row in index} == set(stack.episodes)
    for s in iter_samples([str(root / e["path"]) for e in manifest["shards"]]):
        meta = s["json"]["source_meta"]
        assert meta["title"] == stack.episodes[meta["guid"]]["title"] and meta["feed"] == stack.feed_url
    assert not any((stack.out / ".cache" / "downloads").iterdir())  # downloads removed after the run

    # Artifacts: the summary table and the link to the manifest.
    (table,) = stack.artifacts(artifact_key("podcasts", "summary"), podcast_run["id"])
    rows = {r["metric"]: r["value"] for r in json.loads(table["data"])}
    assert table["type"] == "table" and rows["recordings processed"] == 2 and rows["new shards"] >= 1
    assert rows["hours in"] > 0 and any(k.startswith("real-time factor: asr") for k in rows)
    (link,) = stack.artifacts(artifact_key("podcasts", "manifest"), podcast_run["id"])
    assert link["type"] == "markdown" and (root / "manifest.json").resolve().as_uri() in link["data"]

    # The event, once, about dataset.podcasts, with the manifest.
    (event,) = stack.events("shards.ready", at_least=1)
    assert event["resource"]["prefect.resource.id"] == "dataset.podcasts"
    assert event["payload"]["manifest"] == str((root / "manifest.json").resolve())
    assert any(r["prefect.resource.id"] == f"prefect.flow-run.{podcast_run['id']}" for r in event["related"])

    # The trigger started train/csm with that manifest, and it trained on the offline stack.
    deadline = time.monotonic() + 120
    while not (runs := stack.runs_of("train/csm")) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(runs) == 1, "the shards.ready trigger did not start train/csm\n" + stack.log_tail()
    assert runs[0]["parameters"]["manifest"] == event["payload"]["manifest"]
    run = stack.wait_run(runs[0]["id"], timeout=420)
    assert run["state_type"] == "COMPLETED", stack.run_logs(run["id"])[-5000:]
    assert list((stack.train_out / "checkpoints").glob("step-*.pt"))


@pytest.mark.slow
def test_second_run_ingests_nothing_new(prefect_stack, podcast_run) -> None:
    stack = prefect_stack
    manifest_path = stack.out / "podcasts" / "manifest.json"
    before = manifest_path.read_text()
    run = stack.wait_run(stack.run_deployment("ingest/podcasts", feeds=[stack.feed_url]), timeout=240)
    assert run["state_type"] == "COMPLETED", stack.run_logs(run["id"])[-5000:]
    logs = stack.wait_logs(run["id"], "2 episodes, 0 new", "no shards.ready event")
    assert "2 episodes, 0 new" in logs and "no shards.ready event" in logs
    assert manifest_path.read_text() == before  # nothing written
    assert len(stack.events("shards.ready", at_least=2, timeout=5)) == 1  # no second announcement, so no second training run
    (table,) = stack.artifacts(artifact_key("podcasts", "summary"), run["id"])
    rows = {r["metric"]: r["value"] for r in json.loads(table["data"])}
    assert rows["recordings processed"] == 0 and rows["recordings skipped (already in the dataset)"] == 2
