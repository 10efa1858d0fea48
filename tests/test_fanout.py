"""Fan-out on a real Prefect server: `ingest/files` given `fanout` starts one `ingest/partition` run per partition
on the csm-gpu pool's two workers, retries the failed one, merges the parts, and a rerun does only what is left.
Plus the plain functions behind it: planning, the retry loop, the merge."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tasks import partitions
from tasks.verify import verify_dataset
from tests.test_shards import write_dataset


def test_plan_by_files_and_by_hours_is_stable() -> None:
    rows = [{"uri": f"s3://b/{c}.mp3", "duration": d} for c, d in zip("dcba", [1800, 3600, 5400, None], strict=True)]
    by_files = partitions.plan_partitions(rows, files=3)
    assert [p.sources for p in by_files] == [["s3://b/a.mp3", "s3://b/b.mp3", "s3://b/c.mp3"], ["s3://b/d.mp3"]]
    assert [p.id for p in partitions.plan_partitions(rows[::-1], files=3)] == [p.id for p in by_files]
    by_hours = partitions.plan_partitions(rows, hours=2.0, assumed_hours=1.0)  # a: unknown -> 1 h
    assert [p.sources for p in by_hours] == [["s3://b/a.mp3"], ["s3://b/b.mp3"], ["s3://b/c.mp3", "s3://b/d.mp3"]]
    assert [p.hours for p in by_hours] == [None, 1.5, 1.5]


def test_run_partitions_limits_retries_and_skips() -> None:
    parts = [partitions.Partition(id=f"p{i}", sources=[f"f{i}"]) for i in range(4)]
    done = {"p0"}  # finished by an earlier run
    fails_left = {"p2": 1, "p3": 5}  # p2 fails once then works; p3 never works
    running: dict[str, str] = {}
    peak = 0

    def submit(p: partitions.Partition) -> str:
        nonlocal peak
        run_id = f"{p.id}-run{len([r for r in running.values() if r == p.id])}-{len(running)}"
        running[run_id] = p.id
        peak = max(peak, sum(1 for r in running if not r.startswith("ended")))
        return run_id

    def state_of(run_id: str) -> str:
        pid = running.pop(run_id)
        running[f"ended-{run_id}"] = pid
        if fails_left.get(pid, 0) > 0:
            fails_left[pid] -= 1
            return "Crashed"
        done.add(pid)
        return "Completed"

    out = partitions.run_partitions(parts, submit, state_of, lambda p: p.id in done, max_parallel=2, retries=2,
                                    poll_s=0, log=lambda _: None)
    assert sorted(out.done) == ["p0", "p1", "p2"] and out.failed == {"p3": "Crashed"}
    assert "p0" not in out.runs and len(out.runs["p2"]) == 2 and len(out.runs["p3"]) == 3
    assert peak <= 2


def test_merge_lists_part_shards_without_copying(tmp_path) -> None:
    root = tmp_path / "ds"
    parts = [partitions.Partition(id=f"part-{i}", sources=[f"s{i}"]) for i in range(3)]
    written = {}
    for i, p in enumerate(parts[:2]):  # part 2 never finished
        written[p.id], _ = write_dataset(p.url(str(root)), n_recordings=2, prefix=f"r{i}-")
    manifest = partitions.merge_parts(str(root), parts, {"dataset": "ds"})
    assert [m["id"] for m in manifest["parts"]] == ["part-0", "part-1"]
    assert manifest["shards"] == [{**e, "path": f"parts/{pid}/{e['path']}"} for pid, m in written.items() for e in m["shards"]]
    assert not list(root.glob("shards")) and not list(root.glob("*.tar"))  # nothing copied up
    assert verify_dataset(root)["samples"] == sum(m["counts"]["windows"] for m in written.values())
    assert manifest["counts"]["recordings"] == 4


@pytest.mark.slow
def test_fanout_over_two_workers_retry_and_rerun(prefect_stack, tmp_path) -> None:
    from tasks.synth import DIALOGUE, make_dialogue

    stack = prefect_stack
    src = tmp_path / "talks"
    make_dialogue(src / "a1-good.mp3", lines=DIALOGUE[:2], seed=5)
    make_dialogue(src / "a2-good.mp3", lines=DIALOGUE[4:6], seed=7)
    (src / "b-broken.wav").write_text("not audio")  # sorted: partitions [a1, a2] and [b]
    cfg = yaml.safe_load(Path(stack.env["CSM_INGEST_CONFIG"]).read_text())
    cfg["on_error"] = "raise"  # a broken file fails its partition (the default would record it and go on)
    fanout = {"files": 2, "max_parallel": 2, "retries": 1, "poll_s": 1}
    run_id = stack.run_deployment("ingest/files", sources=[str(src)], dataset="fan", config=cfg, fanout=fanout)
    first = stack.wait_run(run_id, timeout=600)
    assert first["state_type"] == "FAILED", stack.run_logs(run_id)[-3000:]  # one partition never worked ...
    root = stack.out / "fan"
    manifest = json.loads((root / "manifest.json").read_text())
    assert len(manifest["parts"]) == 1 and manifest["fanout"]["failed"]  # ... the good one is in the dataset
    assert all(e["path"].startswith(f"parts/{manifest['parts'][0]['id']}/shards/") for e in manifest["shards"])
    assert verify_dataset(root)["samples"] == manifest["counts"]["windows"] >= 1

    children = stack.runs_of("ingest/partition")
    by_part: dict[str, list[dict]] = {}
    for r in children:
        by_part.setdefault(r["parameters"]["part"], []).append(r)
    assert sorted(len(v) for v in by_part.values()) == [1, 2]  # the broken partition was retried once
    assert sorted(len(r["parameters"]["sources"]) for r in children) == [1, 1, 2]
    workers, spans = set(), []
    for r in children:
        logs = stack.wait_logs(r["id"], "worker process", "models loaded on")
        line = next(ln for ln in logs.splitlines() if "worker process" in ln)
        workers.add(line.split("worker process ")[1].split(" ")[0])
        assert line.endswith("(CUDA_VISIBLE_DEVICES=)")  # its worker's GPU: none on this machine
        n_files = len(r["parameters"]["sources"])
        if r["state_type"] == "COMPLETED":  # models loaded once for all the partition's files, not per file
            assert logs.count("models loaded on") == 1 and f"models loaded on cpu for {n_files} files" in logs
        spans.append((datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"])))
    assert workers == {"test-gpu-0", "test-gpu-1"}  # both worker processes took partitions
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap <= 2  # never more than max_parallel at once

    # Fix the broken file and rerun: only its partition runs; the dataset then has both.
    make_dialogue(src / "b-broken.wav", lines=DIALOGUE[2:4], seed=6)
    again = stack.run_deployment("ingest/files", sources=[str(src)], dataset="fan", config=cfg, fanout=fanout)
    second = stack.wait_run(again, timeout=600)
    assert second["state_type"] == "COMPLETED", stack.run_logs(again)[-3000:]
    rerun_children = [r for r in stack.runs_of("ingest/partition") if r["id"] not in {c["id"] for c in children}]
    assert [r["parameters"]["part"] for r in rerun_children] == [p for p, v in by_part.items() if len(v) == 2]
    merged = json.loads((root / "manifest.json").read_text())
    assert len(merged["parts"]) == 2 and not merged["fanout"]["failed"]
    assert merged["shards"][: len(manifest["shards"])] == manifest["shards"]  # the first part untouched
    assert verify_dataset(root)["samples"] == merged["counts"]["windows"] > manifest["counts"]["windows"]
