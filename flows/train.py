"""Prefect flow `train` (entrypoint flows/train.py:train): CSM training on an ingest dataset.

The work is `training.train.run(manifest, cfg)`, a plain function that also runs under torchrun without
Prefect. The flow adds the config as a validated form, metrics in the run's log, and a summary artifact.
With nproc_per_node > 1 it launches torchrun on this machine and streams the ranks' log into the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = TrainConfig()  # production defaults: fine-tune sesame/csm-1b


def _summary(out_dir: Path) -> dict[str, Any]:
    """Last train and eval records from metrics.jsonl."""
    last: dict[str, Any] = {}
    path = out_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            last[rec["kind"]] = rec
    return last


def _torchrun(manifest: str, cfg: TrainConfig, nproc: int) -> None:
    log = get_run_logger()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "train-config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "training.train", "--manifest", manifest, "--config", str(cfg_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log.info("launching %s", " ".join(cmd))
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        assert p.stdout is not None
        for line in p.stdout:
            log.info(line.rstrip())
    if p.returncode != 0:
        raise RuntimeError(f"torchrun exited with {p.returncode}")


@flow(name="train")
def train(manifest: str, config: TrainConfig = DEFAULT_CONFIG, nproc_per_node: int = 1) -> dict[str, Any]:
    """Train CSM on the dataset behind `manifest` (path or fsspec URI); nproc_per_node > 1 runs torchrun."""
    if nproc_per_node > 1:
        _torchrun(manifest, config, nproc_per_node)
        result: dict[str, Any] = {"out_dir": config.out_dir}
    else:
        from training.train import run  # heavy (torch, transformers): imported when the flow runs

        r = run(manifest, config)
        result = {"out_dir": r.out_dir, "step": r.step, "stopped": r.stopped, "checkpoint": r.checkpoint,
                  "eval_loss": r.eval_loss}  # fmt: skip
    last = _summary(Path(config.out_dir))
    result["last"] = last
    rows = "\n".join(f"| {kind} | {k} | {v:.4g} |" for kind, rec in last.items() for k, v in rec.items()
                     if isinstance(v, float))  # fmt: skip
    header = f"## CSM training\n\nmanifest `{manifest}`, out `{config.out_dir}`\n\n| kind | metric | value |\n|---|---|---|\n"
    create_markdown_artifact(header + rows + "\n", key="csm-train-summary")
    return result
