"""Train CSM (transformers' CsmForConditionalGeneration) on csm-dataprep shards.

One process (CPU or one GPU):
    python -m training.train --manifest data/demo/manifest.json --config configs/train-tiny.yaml
DDP on one node with 8 GPUs:
    torchrun --standalone --nproc_per_node 8 -m training.train --manifest data/ds/manifest.json \
        --config configs/train-1b.yaml
Two nodes (run on each, node_rank 0 and 1), FSDP:
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m training.train --manifest s3://bucket/ds/manifest.json --config configs/train-8b.yaml
`--set key=value` overrides one config field (YAML value syntax), e.g. --set max_steps=100.

From Python the same work is `run(manifest, cfg)`; the Prefect flow flows/train.py:train calls it.
Out of `cfg.out_dir`: checkpoints/step-NNNNNNNN.pt, tb/ (TensorBoard), metrics.jsonl, final/ (save_pretrained).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from training.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.config import DATA_ORDER_FIELDS, TrainConfig, load_config
from training.data import AUDIO, Loader, OutOfData, eval_batches, load_manifest, verify_checksums
from training.model import CsmForTraining, build_model, count_params, decoder_labels, param_groups


@dataclass
class TrainResult:
    """What a run did (the same on every rank)."""

    step: int
    stopped: str  # "max_steps" or "out_of_data"
    out_dir: str
    checkpoint: str | None = None
    eval_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per log step


def get_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow run (metrics show in the UI), else a plain logger."""
    if "prefect" in sys.modules:  # never import Prefect just to find out we are not in a flow (torchrun workers)
        try:
            from prefect import get_run_logger

            return get_run_logger()
        except Exception:  # MissingContextError: not inside a flow or task run
            pass
    return logging.getLogger("training")


def lr_factor(step: int, warmup: int, horizon: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to min_ratio at `horizon`, flat after."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= horizon:
        return min_ratio
    progress = (step - warmup) / max(1, horizon - warmup)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * progress))


def frame_generator(seed: int, *parts: object) -> torch.Generator:
    """A generator seeded from (seed, parts): frame sampling is a function of the step, so resume replays it."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def run(manifest: str, cfg: TrainConfig | None = None) -> TrainResult:
    """Train on the dataset behind `manifest` (local path or fsspec URI). Under torchrun, one call per rank.

    Raises OutOfData if the data ran out before a single step, ValueError for bad configs or data.
    """
    cfg = cfg or TrainConfig()
    log = get_logger()

    # ---- distributed: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; without them this is one process ----------
    ddp = int(os.environ.get("RANK", -1)) != -1
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    else:
        rank, local_rank, world_size, owns_group = 0, 0, 1, False
        device = torch.device("cuda" if use_cuda else "cpu")
    master_process = rank == 0  # the one that logs, writes TensorBoard and checkpoints
    seed_offset = rank  # per-rank randomness beyond the data order (which is seeded per rank already)
    if cfg.grad_accum % world_size != 0:
        raise ValueError(f"grad_accum ({cfg.grad_accum}) must be divisible by the world size ({world_size})")
    grad_accum = cfg.grad_accum // world_size  # micro-batches per rank per step
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    try:
        out_dir = Path(cfg.out_dir)
        ckpt_dir = out_dir / "checkpoints"
        if master_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            log.info("training %s on %s: world %d, %s, %s", cfg.model_size or cfg.model, manifest, world_size,
                     device, "bf16" if bf16 else "fp32")  # fmt: skip

        # ---- data ---------------------------------------------------------------------------------------------
        mf = load_manifest(manifest)
        if cfg.verify_checksums and master_process:
            verify_checksums(mf)
        steps_per_epoch = math.ceil(mf.total_samples * (1 - cfg.eval_fraction) / (cfg.batch_size * cfg.grad_accum))
        horizon = cfg.max_steps or max(1, steps_per_epoch * cfg.epochs)  # cosine horizon

        # ---- model and optimizer: same init on every rank (DDP checks it, FSDP shards it) --------------------
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        text_vocab = model.config.text_vocab_size
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(device)
        if master_process:
            log.info("parameters: %s", {k: f"{v / 1e6:.1f}M" for k, v in count_params(model).items()})
        train_model: torch.nn.Module = CsmForTraining(model, cfg.decoder_loss_weight)
        fsdp = ddp and cfg.parallel == "fsdp"
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            sharded = [*model.backbone_model.layers, *model.depth_decoder.model.layers]
            sharded.append(model.codec_model)  # frozen and never run: its own group, so it is never gathered
            sharded.append(train_model)  # root: embeddings and heads, gathered in the wrapper's forward
            for module in sharded:
                fully_shard(module)
                if not use_cuda:  # gloo has no AVG reduce-scatter (it would sum): sum, and let FSDP divide
                    module.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
        elif ddp:
            # buffers are constants (rotary, codebook offsets): no need to broadcast them every forward
            train_model = DDP(train_model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False)
        if cfg.compile:
            train_model = torch.compile(train_model, dynamic=True)
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
            fused=not fsdp,  # fused kernels on CPU too (torch >= 2.4): 7x faster than the per-parameter loop
        )  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.warmup_steps, horizon, cfg.min_lr_ratio)
        )
        torch.manual_seed(cfg.seed + seed_offset)

        # ---- resume: rank 0 reads the checkpoint and broadcasts; every rank gets its own loader position ------
        meta: dict[str, Any] = {"step": 0, "loader": None, "rng": None, "scheduler": None, "error": None}
        state: dict[str, Any] = {}
        if master_process and cfg.resume and (path := latest_checkpoint(ckpt_dir)) is not None:
            state = load_checkpoint(path)
            changed = [k for k in DATA_ORDER_FIELDS if state["config"].get(k) != getattr(cfg, k)]
            if state["world_size"] != world_size:
                meta["error"] = (f"{path} was written by {state['world_size']} ranks, this run has {world_size}: "
                                 "loader positions are per rank; resume with the same world size")  # fmt: skip
            elif changed:
                meta["error"] = f"{path}: data-order settings changed since the checkpoint: {changed}"
            else:
                meta.update(step=state["step"], loader=state["loader"], rng=state["rng"], scheduler=state["scheduler"])
                log.info("resuming from %s (step %d)", path, state["step"])
        if ddp:
            box = [meta]
            dist.broadcast_object_list(box, src=0)
            meta = box[0]
        if meta["error"]:
            raise ValueError(meta["error"])
        if meta["loader"] is not None:
            # separate calls: with broadcast_from_rank0 the other ranks pass empty dicts, same order everywhere
            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=ddp)
            set_model_state_dict(model, state.get("model", {}), options=opts)
            set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}), options=opts)
            scheduler.load_state_dict(meta["scheduler"])
            set_rng_state(meta["rng"][rank])
        del state
        start_step = step = int(meta["step"])
        loader = Loader(
            mf, cfg, rank=rank, world_size=world_size, text_vocab_size=text_vocab, pin_memory=device.type == "cuda",
            position=meta["loader"][rank] if meta["loader"] else None,
        )  # fmt: skip

        # ---- metrics: Prefect/std logger, TensorBoard and metrics.jsonl on the master ------------------------
        writer = None
        if master_process and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # optional extra: training must not fail for want of a dashboard
                log.warning("tensorboard is not installed; no TensorBoard events")

        def record(kind: str, values: dict[str, float]) -> None:
            if not master_process:
                return
            if writer is not None:
                for k, v in values.items():
                    writer.add_scalar(f"{kind}/{k}", v, step)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
            log.info("%s step %d: %s", kind, step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))

        def to_device(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            keys = ("text", "codes", "kinds", "attention_mask")
            return {k: batch[k].to(device, non_blocking=True) for k in keys}

        eval_cache: list[dict[str, Any]] | None = None

        def evaluate() -> float | None:
            nonlocal eval_cache
            if cfg.eval_fraction == 0:  # nothing held out: don't read every shard looking for it
                return None
            if eval_cache is None:  # the held-out batches are small: read once, keep on the CPU
                eval_cache = eval_batches(mf, cfg, rank=rank, world_size=world_size, text_vocab_size=text_vocab)
            n = torch.tensor([len(eval_cache)], device=device)
            if ddp:  # every rank runs the same number of forwards (FSDP gathers parameters in each)
                dist.all_reduce(n, op=dist.ReduceOp.MIN)
            if int(n) == 0:
                return None
            train_model.eval()
            sums = torch.zeros(3, device=device)
            with torch.no_grad():
                for i, batch in enumerate(eval_cache[: int(n)]):
                    b = to_device(batch)
                    labels, _ = decoder_labels(b["codes"], b["kinds"], cfg.decoder_frame_ratio,
                                               frame_generator(cfg.seed, "eval", rank, i), cfg.decoder_train_eos)  # fmt: skip
                    with amp:
                        losses = train_model(b["text"], b["codes"], b["kinds"], b["attention_mask"], labels)
                    sums += torch.stack([x.detach().float() for x in losses])
            train_model.train()
            if ddp:
                dist.all_reduce(sums)
            mean = (sums / (int(n) * world_size)).tolist()
            record("eval", {"loss": mean[0], "backbone_loss": mean[1], "decoder_loss": mean[2]})
            return mean[0]

        def checkpoint() -> str | None:
            # full state dicts gathered to rank 0 (a collective under FSDP); positions and RNG from every rank
            msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            per_rank = [{"loader": loader.state_dict(), "rng": rng_state()}]
            if ddp:
                per_rank = [None] * world_size
                dist.all_gather_object(per_rank, {"loader": loader.state_dict(), "rng": rng_state()})
            path = None
            if master_process:
                path = str(save_checkpoint(
                    {"step": step, "config": cfg.model_dump(), "world_size": world_size, "manifest": manifest,
                     "model": msd, "optimizer": osd, "scheduler": scheduler.state_dict(),
                     "loader": [r["loader"] for r in per_rank], "rng": [r["rng"] for r in per_rank]},
                    ckpt_dir, cfg.keep_checkpoints,
                ))  # fmt: skip
                log.info("checkpoint %s", path)
            if ddp:
                dist.barrier()
            return path

        # ---- the loop ------------------------------------------------------------------------------------------
        result = TrainResult(step=step, stopped="max_steps", out_dir=str(out_dir))
        train_model.train()
        sums = torch.zeros(3, device=device)  # loss, backbone loss, decoder loss, summed over micro-batches
        counts = torch.zeros(4, device=device)  # micro-batches, positions, audio frames, decoder frames
        t_log = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        while cfg.max_steps is None or step < cfg.max_steps:
            # fetch the whole step first, so that all ranks can agree to stop before anyone starts a forward
            batches, exhausted = [], False
            try:
                for _ in range(grad_accum):
                    batches.append(loader.next())
            except OutOfData:
                exhausted = True
            if ddp:
                flag = torch.tensor([float(exhausted)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                exhausted = bool(flag.item())
            if exhausted:
                result.stopped = "out_of_data"
                break

            for micro, batch in enumerate(batches):
                b = to_device(batch)
                labels, n_dec = decoder_labels(b["codes"], b["kinds"], cfg.decoder_frame_ratio,
                                               frame_generator(cfg.seed, rank, step, micro), cfg.decoder_train_eos)  # fmt: skip
                last = micro == grad_accum - 1
                if fsdp:
                    train_model.set_requires_gradient_sync(last)  # type: ignore[operator]
                # gradients all-reduce only on the last micro-batch of the step
                sync = train_model.no_sync() if isinstance(train_model, DDP) and not last else nullcontext()
                with sync:
                    with amp:
                        loss, backbone_loss, decoder_loss = train_model(
                            b["text"], b["codes"], b["kinds"], b["attention_mask"], labels
                        )
                    (loss / grad_accum).backward()
                sums += torch.stack([loss.detach(), backbone_loss.detach(), decoder_loss.detach()]).float()
                counts += torch.tensor([1.0, float(batch["attention_mask"].sum()),
                                        float((batch["kinds"] >= AUDIO).sum()), float(n_dec)], device=device)  # fmt: skip
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if step % cfg.log_interval == 0:
                if ddp:
                    dist.all_reduce(sums)
                    dist.all_reduce(counts)
                dt = time.time() - t_log
                s, c = sums.tolist(), counts.tolist()
                values = {
                    "loss": s[0] / c[0], "backbone_loss": s[1] / c[0], "decoder_loss": s[2] / c[0],
                    "lr": lr, "grad_norm": float(grad_norm),
                    "tokens_per_s": c[1] / dt, "frames_per_s": c[2] / dt, "decoder_frames": c[3],
                    "step_s": dt / cfg.log_interval,
                }  # fmt: skip
                if device.type == "cuda":
                    values["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                record("train", values)
                result.history.append({"step": step, **values})
                sums.zero_()
                counts.zero_()
                t_log = time.time()
            if step % cfg.eval_interval == 0:
                result.eval_loss = evaluate()
            if step % cfg.checkpoint_interval == 0:
                result.checkpoint = checkpoint()

        # ---- the end: eval, checkpoint, export -------------------------------------------------------------
        result.step = step
        if step == start_step:
            if start_step == 0:
                raise OutOfData(f"{manifest}: no training batch at all (rank {rank}, {cfg.epochs} epochs)")
            if writer is not None:
                writer.close()
            if master_process:
                log.info("nothing left to train: the checkpoint at step %d already finished the data", step)
            return result
        if step % cfg.eval_interval != 0:
            result.eval_loss = evaluate()
        if step % cfg.checkpoint_interval != 0:
            result.checkpoint = checkpoint()
        if cfg.export_final:
            msd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if master_process:
                model.save_pretrained(out_dir / "final", state_dict=msd)
                log.info("exported %s", out_dir / "final")
        if writer is not None:
            writer.close()
        if master_process:
            log.info("done at step %d (%s)", step, result.stopped)
        return result
    finally:
        if owns_group:
            dist.destroy_process_group()


def cli_train(manifest: str, config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> int:
    """`csm-dataprep train --manifest PATH [--config FILE]`: one process here; torchrun + main() for several."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"%(asctime)s [rank {rank}] %(message)s"
    )
    r = run(manifest, load_config(config, overrides))
    if rank == 0:
        last = r.history[-1] if r.history else {}
        print(json.dumps({"step": r.step, "stopped": r.stopped, "checkpoint": r.checkpoint, "eval_loss": r.eval_loss,
                          "loss": last.get("loss"), "out_dir": r.out_dir}))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> None:
    """CLI for torchrun and `python -m training.train`."""
    p = argparse.ArgumentParser(description="Train CSM on csm-dataprep shards (see module docstring).")
    p.add_argument("--manifest", required=True, help="manifest.json: local path or fsspec URI")
    p.add_argument("--config", help="YAML file with TrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set wants KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    cli_train(args.manifest, args.config, overrides)


if __name__ == "__main__":
    main()
