"""The one training config: every knob of `training.train.run`, with its default and what it does.

A pydantic model (not a dataclass) because it is a Prefect flow parameter: Prefect renders it as a form and
validates it on every run. Production defaults fine-tune `sesame/csm-1b`; `configs/train-*.yaml` hold the
other set-ups (tiny CPU runs, 1B and 8B-like from scratch). Invalid values raise ValueError (pydantic's
ValidationError is one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Fields that fix which batch comes next on each rank. A checkpoint's loader positions mean nothing once one
# of them changes, so resume refuses that (world size is checked separately, it is not a config field).
DATA_ORDER_FIELDS = (
    "seed",
    "batch_size",
    "num_workers",
    "shuffle_buffer",
    "bucket_batches",
    "eval_fraction",
    "max_positions",
    "split_by",
)


class TrainConfig(BaseModel):
    """Everything `training.train.run` needs besides the manifest URI."""

    model_config = ConfigDict(extra="forbid")  # a typo in a YAML key must fail, not be silently ignored

    # --- model -------------------------------------------------------------------------------------------
    model: str = Field(
        "sesame/csm-1b",
        description="Hub id or local dir of a CsmForConditionalGeneration checkpoint to fine-tune. "
        "Ignored when model_size is set.",
    )
    model_size: Literal["tiny", "1b", "8b"] | None = Field(
        None,
        description="Train from scratch with a named config instead of loading `model`: tiny (CPU tests), "
        "1b (csm-1b shapes), 8b (Llama-3-8B-like backbone, 300M decoder).",
    )
    model_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="CsmConfig fields to override on a named config, e.g. {num_hidden_layers: 4}; "
        "`depth_decoder_config` takes a dict of decoder fields.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="transformers attention kernel."
    )
    decoder_frame_ratio: float = Field(
        1 / 16,
        gt=0,
        le=1,
        description="Share of audio frames the depth decoder trains on (CSM's compute amortization); "
        "the backbone always trains on codebook 0 of every frame. 1.0 = every frame.",
    )
    decoder_train_eos: bool = Field(
        True,
        description="Always train the depth decoder on end-of-audio frames, as CsmProcessor does: "
        "generation stops only when all 32 codebooks come out 0.",
    )
    decoder_loss_weight: float = Field(1.0, ge=0, description="loss = backbone_loss + weight * decoder_loss.")

    # --- data --------------------------------------------------------------------------------------------
    epochs: int = Field(5, ge=1, description="Passes over the training split; then the run ends.")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch on each rank.")
    grad_accum: int = Field(
        8, ge=1, description="Micro-batches per optimizer step, summed over all ranks (must divide by world size)."
    )
    max_positions: int = Field(2048, ge=16, description="Longest sequence accepted; longer samples are an error.")
    shuffle_buffer: int = Field(1000, ge=1, description="Samples in each worker's shuffle buffer.")
    bucket_batches: int = Field(
        32, ge=1, description="Length bucketing: this many batches' worth of samples are sorted by length together."
    )
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank.")
    split_by: Literal["auto", "shards", "samples"] = Field(
        "auto",
        description="How ranks and workers share data: whole shards (cheap I/O, needs shards >= world size * "
        "workers), every n-th sample (each reader reads every shard), or auto (shards when there are enough).",
    )
    eval_fraction: float = Field(
        0.02, ge=0, lt=1, description="Share of recordings held out for eval (by a hash of recording_id)."
    )
    eval_interval: int = Field(500, ge=1, description="Optimizer steps between eval runs (and one at the end).")
    eval_batches: int = Field(20, ge=1, description="Eval batches per rank and eval run.")
    verify_checksums: bool = Field(False, description="Check every shard's sha256 against the manifest first.")

    # --- optimizer ---------------------------------------------------------------------------------------
    lr: float = Field(3e-5, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at lr * min_lr_ratio.")
    warmup_steps: int = Field(200, ge=0, description="Linear warm-up steps.")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop after this many optimizer steps. None: run out the epochs; the cosine horizon is "
        "then estimated from the manifest's sample counts.",
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay on matrices and embeddings only.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")

    # --- runtime -----------------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU.")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="Multi-process strategy under torchrun.")
    activation_checkpointing: bool = Field(False, description="Recompute decoder layers in backward to save memory.")
    compile: bool = Field(False, description="torch.compile the training module.")
    seed: int = Field(1337, description="Seeds init, data order and the depth decoder's frame sampling.")

    # --- output ------------------------------------------------------------------------------------------
    out_dir: str = Field("runs/csm", description="Local or shared directory: checkpoints/, tb/, metrics.jsonl, final/.")
    resume: bool = Field(True, description="Continue from the latest checkpoint in out_dir when there is one.")
    checkpoint_interval: int = Field(1000, ge=1, description="Optimizer steps between checkpoints (one at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Newest checkpoints kept; older ones are deleted.")
    log_interval: int = Field(10, ge=1, description="Optimizer steps between metric logs.")
    tensorboard: bool = Field(True, description="Write TensorBoard events to out_dir/tb.")
    export_final: bool = Field(True, description="save_pretrained the final model to out_dir/final.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.model_size is None and not self.model:
            raise ValueError("set `model` (hub id or dir) or `model_size` (named config)")
        if self.model_overrides and self.model_size is None:
            raise ValueError("model_overrides only apply to a named config (model_size)")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load a YAML file (keys = field names); keyword overrides that are not None win."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Config from an optional YAML file plus overrides: what the CLI calls for `--config FILE`."""
    if path is None:
        return TrainConfig.model_validate(overrides or {})
    return TrainConfig.from_yaml(path, **(overrides or {}))
