"""`python -m bench [NAME ...]` (make bench): run the benchmarks, print one table, append it to
docs/performance.md with the machine's details."""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from pathlib import Path

ALL = ["shards", "decode", "loader", "mimi", "stages", "asr_compute", "diarize_step", "e2e", "amortization", "memory"]


def machine() -> str:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores; GPU: {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main(names: list[str]) -> None:
    rows = []
    for name in names or ALL:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, "run"):
            print(f"running bench.{name} ...", file=sys.stderr, flush=True)
            rows += module.run()
    header = "| stage | figure | value | reference | ratio | note |\n|---|---|---|---|---|---|"
    lines = [f"| {r.stage} | {r.figure} | {r.value:,.1f} | {r.reference} | "
             f"{'' if r.ratio is None else f'{r.ratio:.2f}'} | {r.note} |" for r in rows]
    table = "\n".join([header, *lines])
    print(table)
    doc = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
    if not doc.exists():
        doc.write_text("# Performance\n\nAppended by `make bench`; each run's table with its machine.\n")
    with doc.open("a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{machine()}\n\n{table}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
