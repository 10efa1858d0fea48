"""Fan-out of one ingest over many workers: split the sources into partitions, run them, merge the parts.

Each partition is ingested by its own flow run into `<dataset>/parts/<partition id>/`, which is a complete
dataset of its own (shards, tables, manifest written last). The dataset's manifest and tables are then merged
from the part manifests: shard entries are listed under their part's path, so no shard is copied or re-read.
A partition's id is a digest of its sources, so a rerun over the same list finds the parts already done.
Plain functions: flows/fanout.py drives them on Prefect.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks import storage
from tasks.shards import INDEX_SCHEMA, RECORDING_SCHEMA, REJECT_SCHEMA, SCHEMA_VERSION
from tasks.sources import META_COLUMNS

PARTS_DIR = "parts"


@dataclass
class Partition:
    id: str  # part-<digest of its sources>
    sources: list[str]
    hours: float | None = None  # when every source's duration is known
    meta: dict[str, dict[str, str]] = field(default_factory=dict)  # uri -> feed, title, guid... where known

    def url(self, dataset_url: str) -> str:
        return storage.join(dataset_url, PARTS_DIR, self.id)


def list_sources(sources: list[str], probe_local: bool = False) -> list[dict[str, Any]]:
    """Every source as `{"uri", "duration"?}` without downloading anything: folders and globs (local or
    fsspec) expanded, .csv/.parquet lists read (their `duration` column, in seconds, is kept), URLs as they
    are. `probe_local` asks ffprobe for the duration of local files that have none."""
    from tasks.decode import probe_duration
    from tasks.sources import HTTP_SCHEMES, expand_fsspec, expand_local, is_manifest, read_manifest, scheme_of

    rows: list[dict[str, Any]] = []
    for src in sources:
        rows += read_manifest(src, keep_duration=True) if is_manifest(src) else [{"uri": src}]
    out: list[dict[str, Any]] = []
    for row in rows:
        uri, scheme = row["uri"], scheme_of(row["uri"])
        if scheme in ("", "file"):
            found = [s.path for s in expand_local([uri.removeprefix("file://")])]
            if not found:
                raise FileNotFoundError(f"no audio files at {uri}")
            for path in found:
                duration = row.get("duration") if len(found) == 1 else None
                if duration is None and probe_local:
                    duration = probe_duration(path)
                out.append({**row, "uri": path, "duration": duration})
        elif scheme in HTTP_SCHEMES:
            out.append(row)
        else:
            out += [{**row, "uri": u} for u in expand_fsspec(uri)]
    return list({r["uri"]: r for r in out}.values())


def plan_partitions(rows: list[dict[str, Any]], files: int | None = None, hours: float | None = None,
                    assumed_hours: float = 1.0) -> list[Partition]:
    """Consecutive runs of sources (in sorted order, so the plan does not depend on the listing's order) of at
    most `files` files or about `hours` hours each (a source of unknown duration counts `assumed_hours`)."""
    if not files and not hours:
        raise ValueError("give partitions by `files` or by `hours`")
    rows = sorted(rows, key=lambda r: r["uri"])
    groups: list[list[dict[str, Any]]] = []
    size = 0.0
    for row in rows:
        weight = 1.0 if files else (row.get("duration") or assumed_hours * 3600) / 3600
        limit = files or hours
        if not groups or size + weight > limit + 1e-9 and groups[-1]:
            groups.append([])
            size = 0.0
        groups[-1].append(row)
        size += weight
    parts = []
    for g in groups:
        uris = [r["uri"] for r in g]
        digest = hashlib.sha256("\n".join(uris).encode()).hexdigest()[:16]
        known = [r.get("duration") for r in g]
        meta = {r["uri"]: {k: str(r[k]) for k in META_COLUMNS if r.get(k)} for r in g}
        parts.append(Partition(id=f"part-{digest}", sources=uris, meta={u: m for u, m in meta.items() if m},
                               hours=sum(known) / 3600 if all(d is not None for d in known) else None))
    return parts


def part_done(dataset_url: str, part: Partition) -> bool:
    """A part is done once its manifest exists: DatasetWriter writes it last."""
    return storage.exists(storage.join(part.url(dataset_url), "manifest.json"))


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)  # partition ids whose part manifest exists
    failed: dict[str, str] = field(default_factory=dict)  # partition id -> the last run's final state
    runs: dict[str, list[str]] = field(default_factory=dict)  # partition id -> its flow run ids, in order


def run_partitions(parts: list[Partition], submit: Callable[[Partition], str],
                   state_of: Callable[[str], str | None], is_done: Callable[[Partition], bool],
                   max_parallel: int, retries: int, poll_s: float = 2.0,
                   log: Callable[[str], None] = print) -> Outcome:
    """Keep at most `max_parallel` partitions running; a run that ends without its part manifest is started
    again, up to `retries` more times. `submit` starts a run and returns its id; `state_of` gives a run's
    final state name, or None while it is still going."""
    out = Outcome()
    queue = []
    for p in parts:
        if is_done(p):
            out.done.append(p.id)
        else:
            queue.append(p)
    if out.done:
        log(f"{len(out.done)} of {len(parts)} partitions already done: skipped")
    attempts: dict[str, int] = {}
    running: dict[str, Partition] = {}  # run id -> partition
    while queue or running:
        while queue and len(running) < max_parallel:
            p = queue.pop(0)
            attempts[p.id] = attempts.get(p.id, 0) + 1
            run_id = submit(p)
            out.runs.setdefault(p.id, []).append(run_id)
            running[run_id] = p
            log(f"{p.id}: {len(p.sources)} sources, run {run_id} (attempt {attempts[p.id]})")
        time.sleep(poll_s)
        for run_id, p in list(running.items()):
            state = state_of(run_id)
            if state is None:
                continue
            del running[run_id]
            if is_done(p):  # the manifest is the proof, whatever the run's state says (a crash after it)
                out.done.append(p.id)
                out.failed.pop(p.id, None)
                log(f"{p.id}: done ({state})")
            elif attempts[p.id] <= retries:
                log(f"{p.id}: run {run_id} ended {state} without its part manifest: retrying")
                queue.append(p)
            else:
                out.failed[p.id] = state
                log(f"{p.id}: failed {attempts[p.id]} times (last: {state}); rerun the fan-out to try again")
    return out


def merge_parts(dataset_url: str, parts: list[Partition], meta: dict[str, Any]) -> dict[str, Any]:
    """Write the dataset's tables and manifest from its finished parts' manifests and tables (manifest last).

    Shard paths become `parts/<id>/shards/...` in the manifest and the index; sha256, sample and byte counts
    come from the part manifests, so no shard is copied or re-read. Tables are streamed one part at a time
    (memory bounded by the largest part, not the dataset). `parts` that are not done are left out.
    """
    import tempfile
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tasks.shards import publish_table

    top = storage.join(dataset_url, "manifest.json")
    if storage.exists(top) and "parts" not in storage.read_json(top):
        raise ValueError(f"{dataset_url}: written by a single-machine ingest; fan out into a new dataset name")
    schemas = {"index": INDEX_SCHEMA, "rejects": REJECT_SCHEMA, "recordings": RECORDING_SCHEMA}
    staging = Path(tempfile.mkdtemp(prefix="csm-merge-"))
    writers = {t: pq.ParquetWriter(staging / f"{t}.parquet", schema) for t, schema in schemas.items()}
    rows = dict.fromkeys(schemas, 0)
    shards: list[dict[str, Any]] = []
    merged: list[dict[str, Any]] = []
    counts: list[dict[str, Any]] = []
    untrained: set[str] = set()
    try:
        for p in parts:
            base = p.url(dataset_url)
            if not storage.exists(storage.join(base, "manifest.json")):
                continue
            pm = storage.read_json(storage.join(base, "manifest.json"))
            prefix = f"{PARTS_DIR}/{p.id}/"
            shards += [{**e, "path": prefix + e["path"]} for e in pm["shards"]]
            for t, schema in schemas.items():
                with storage.open_read(storage.join(base, f"{t}.parquet")) as f:
                    table = pq.read_table(f).select(schema.names).cast(schema)
                if t == "index":
                    table = table.set_column(schema.get_field_index("shard"), "shard",
                                             pc.binary_join_element_wise(pa.scalar(prefix), table["shard"], ""))
                writers[t].write_table(table)
                rows[t] += table.num_rows
            counts.append(pm["counts"])
            untrained |= set(pm.get("untrained_models", []))
            merged.append({"id": p.id, "path": prefix + "manifest.json", "sources": len(p.sources),
                           "shards": len(pm["shards"]), "windows": pm["counts"]["windows"],
                           "created": pm.get("created"), "models": pm.get("models")})
    finally:
        for w in writers.values():
            w.close()
    tables = {t: publish_table(staging / f"{t}.parquet", dataset_url, rows[t]) for t in schemas}
    staging.rmdir()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        **meta,
        "untrained_models": sorted(untrained),
        "counts": add_counts(counts),
        "shards": shards,
        "parts": merged,
        **tables,
    }
    storage.write_json(top, manifest)
    return manifest


def add_counts(counts: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of disjoint parts added up: dataset counts (tasks.shards.dataset_counts), or run summaries'
    totals (flows/fanout.py:aggregate). Numbers are summed, `hours_rejected_by_reason` merged by reason."""
    out: dict[str, Any] = {"hours_rejected_by_reason": {}}
    for c in counts:
        for k, v in c.items():
            if isinstance(v, dict):
                for reason, hours in v.items():
                    out[k][reason] = out[k].get(reason, 0.0) + hours
            else:
                out[k] = out.get(k, 0) + v
    return out
