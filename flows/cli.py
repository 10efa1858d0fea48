"""`csm-dataprep` command line: ingest, verify, report, refilter, models, workers, train.

Heavy imports stay inside the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    # The embedded (ephemeral) Prefect server's telemetry heartbeat races the first flow run for the fresh
    # SQLite file ("database is locked"); it sends nothing we need. Users can turn it back on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = argparse.ArgumentParser(prog="csm-dataprep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="audio files, folders or globs -> CSM WebDataset shards")
    p.add_argument("sources", nargs="+", help="audio file, folder or glob")
    p.add_argument("--out", help="output root, a folder or an fsspec URL such as s3://bucket/datasets "
                   "(default: config's out)")
    p.add_argument("--dataset", help="dataset name (default: config's dataset)")
    p.add_argument("--config", type=Path, help="ingest config YAML (e.g. DIR/config.yaml from `models offline`)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    p.set_defaults(run=_ingest)

    v = sub.add_parser("verify", help="check a dataset's shards against its manifest and the sample contract")
    v.add_argument("dataset_dir", help="dataset folder or fsspec URL (s3://bucket/datasets/NAME)")
    v.set_defaults(run=_verify)

    rp = sub.add_parser("report", help="rebuild DATASET_DIR/report/ (HTML page, PNG plots) from the dataset's tables")
    rp.add_argument("dataset_dir", type=Path)
    rp.add_argument("--out", type=Path, help="report folder (default: DATASET_DIR/report)")
    rp.set_defaults(run=_report)

    rf = sub.add_parser("refilter", help="apply new quality thresholds to a dataset's stored metrics -> a new "
                        "dataset (no model runs)")
    rf.add_argument("dataset_dir", type=Path)
    rf.add_argument("--config", type=Path, required=True,
                    help="YAML: an ingest config subset (quality: {...}) or QualityConfig fields, laid over the "
                    "source dataset's config")
    rf.add_argument("--out", type=Path, required=True, help="the new dataset's directory")
    rf.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    rf.add_argument("--no-report", action="store_true", help="do not build the new dataset's report/")
    rf.set_defaults(run=_refilter)

    m = sub.add_parser("models", help="model sets")
    msub = m.add_subparsers(dest="models_command", required=True)
    off = msub.add_parser("offline", help="assemble the offline model set in DIR and write DIR/config.yaml")
    off.add_argument("dir", type=Path)
    off.set_defaults(run=_models_offline)
    hub = msub.add_parser("hub", help="exit 0 if the model hub is reachable, 1 if not")
    hub.set_defaults(run=_models_hub)

    wk = sub.add_parser("workers", help="this node's Prefect workers for POOL: one process per GPU, each running "
                        "one flow run at a time on its own GPU")
    wk.add_argument("--pool", required=True, help="work pool (prefect.yaml: csm-gpu for partitions)")
    wk.add_argument("--gpus", default="auto", help="comma-separated GPU indices, `auto` (nvidia-smi) or `none`")
    wk.add_argument("--processes", type=int, help="worker processes (default: one per GPU; GPUs are shared "
                    "round-robin if more)")
    wk.add_argument("--name", help="worker name prefix (default: the host name)")
    wk.set_defaults(run=_workers)

    t = sub.add_parser("train", help="train CSM on a dataset's shards")
    t.add_argument("--manifest", required=True, help="manifest.json path or fsspec URI")
    t.add_argument("--config", type=Path, help="training config YAML (configs/train-*.yaml)")
    t.set_defaults(run=_train)

    args = parser.parse_args(argv)
    if args.run in (_ingest, _refilter):
        _exit_on_sigterm()
    return args.run(args) or 0


def _exit_on_sigterm() -> None:
    """`kill` (SIGTERM) unwinds like Ctrl+C: the dataset writer aborts (nothing half-written stays) and Prefect's
    atexit stops the embedded server it started. Python's default for SIGTERM ends the process on the spot
    and would leave that server running, orphaned."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _ingest(args: argparse.Namespace) -> int:
    from flows.ingest import ingest
    from schemas.config import IngestConfig

    overrides = {"out": args.out, "dataset": args.dataset, "device": args.device,
                 "overwrite": True if args.overwrite else None}
    if args.config:
        cfg = IngestConfig.from_yaml(args.config, **overrides)
    else:
        cfg = IngestConfig.model_validate({k: v for k, v in overrides.items() if v is not None})
    summary = ingest(sources=args.sources, config=cfg)
    print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ingest summary", show_header=False)
    table.add_row("recordings", f"{s['recordings']} ({s['recordings_failed']} failed, "
                  f"{s['recordings_skipped']} already in the dataset)")
    table.add_row("hours in", f"{s['hours_in']:.4f} ({s['hours_in'] * 3600:.1f} s)")
    table.add_row("hours kept", f"{s['hours_kept']:.4f} ({s['hours_kept'] * 3600:.1f} s)")
    for reason, hours in sorted(s["hours_rejected_by_reason"].items()):
        table.add_row(f"rejected {reason}", f"{hours * 3600:.1f} s")
    table.add_row("windows / turns", f"{s['windows']} / {s['turns']}")
    table.add_row("shards", f"{s['shards']} new, {s['dataset_shards']} in the dataset")
    table.add_row("wall time", f"{s['wall_s']:.1f} s")
    table.add_row("real-time factor", f"{s['realtime_factor']:.2f}x")
    for stage, rtf in s["stage_realtime_factor"].items():
        table.add_row(f"  {stage}", f"{rtf:.1f}x real time")
    table.add_row("untrained models", ", ".join(s["untrained_models"]) or "none: all weights real")
    table.add_row("manifest", s["manifest"])
    Console(stderr=False).print(table)


def _workers(args: argparse.Namespace) -> int:
    from flows.workers import run_workers

    return run_workers(args.pool, args.processes, args.gpus, args.name)


def _verify(args: argparse.Namespace) -> int:
    from tasks.verify import InvalidDataset, verify_dataset

    try:
        counts = verify_dataset(args.dataset_dir)
    except InvalidDataset as exc:
        print(f"INVALID: {exc}", file=sys.stderr)
        return 1
    print(f"OK: {counts['samples']} samples in {counts['shards']} shards match the manifest and contract v1")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tasks.report import build_report, load_tables, summarize

    if not (args.dataset_dir / "index.parquet").exists():
        print(f"{args.dataset_dir}: no index.parquet (not a dataset)", file=sys.stderr)
        return 1
    tables = load_tables(args.dataset_dir)  # read once, for the page and the summary line
    page = build_report(args.dataset_dir, args.out, tables)
    s = summarize(tables)
    print(f"in {s['seconds_in']:.1f} s, kept {s['seconds_kept']:.1f} s, rejected {s['seconds_rejected']:.1f} s "
          f"({s['windows']} windows)")
    print(f"wrote {page}")
    return 0


def _refilter(args: argparse.Namespace) -> int:
    from tasks.refilter import main_summary, refilter
    from tasks.verify import InvalidDataset

    try:
        manifest = refilter(args.dataset_dir, args.config, args.out, overwrite=args.overwrite,
                            report=not args.no_report)
    except (InvalidDataset, FileExistsError, ValueError) as exc:
        print(f"refilter: {exc}", file=sys.stderr)
        return 1
    print(main_summary(manifest))
    print(f"wrote {args.out / 'manifest.json'}")
    return 0


def _models_offline(args: argparse.Namespace) -> int:
    from schemas.config import IngestConfig
    from tasks.models import build_offline_set, describe_models

    path = build_offline_set(args.dir)
    print(json.dumps(describe_models(IngestConfig.from_yaml(path)), indent=1))
    print(f"wrote {path}")
    return 0


def _models_hub(args: argparse.Namespace) -> int:
    from tasks.models import hub_reachable

    ok = hub_reachable()
    print("reachable" if ok else "unreachable")
    return 0 if ok else 1


def _train(args: argparse.Namespace) -> int:
    from training.train import cli_train

    return cli_train(args.manifest, args.config)


if __name__ == "__main__":
    sys.exit(main())
