"""Compute amortization: a training step with the depth decoder on every frame vs on 1/16 of them.

Same model, same batch, same optimizer; only the labels differ (codebooks 1-31 of unsampled frames -> -100).
Prints step time and peak memory for both, their ratio, and the ratio a FLOP count predicts.

    python bench/amortization.py                      # small config on CPU (a couple of minutes on 2 cores)
    python bench/amortization.py --size 1b --batch 2  # csm-1b shapes on a GPU, bf16 autocast

Each variant runs in its own subprocess, so CPU peak memory (max RSS) is that variant's alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from training.data import AUDIO, EOS, collate, sequence_from_sample
from training.model import CsmForTraining, decoder_labels, named_config

if TYPE_CHECKING:
    from bench.common import Row

SIZES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("tiny", {}),
    # default CPU size: big enough that the transformer, not the embeddings, dominates a step
    "small": ("tiny", dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                           depth_decoder_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                                     num_attention_heads=8))),
    "1b": ("1b", {}),
    "8b": ("8b", {}),
}  # fmt: skip


def make_batch(batch: int, positions: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Conversation-like sequences: turns of ~20 text tokens and 4-16 s of audio, filling `positions`."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(batch):
        turns, used = [], 0
        while True:
            nt, nf = int(rng.integers(10, 30)), int(rng.integers(50, 200))
            if used + nt + nf + 1 > positions:
                break
            turns.append({"text_tokens": nt, "frames": nf})
            used += nt + nf + 1
        meta = {"turns": turns, "n_positions": used}
        text = rng.integers(0, 1000, sum(t["text_tokens"] for t in turns))
        codes = rng.integers(0, 2048, (sum(t["frames"] for t in turns), 32))
        seqs.append(sequence_from_sample(meta, text, codes, max_positions=positions, text_vocab_size=1000))
    return collate(seqs)


def _matmul_params(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, head_dim: int) -> int:
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    return layers * (attn + 3 * hidden * ffn)


def step_flops(config: Any, positions: int, decoder_frames: int, seq_len: float) -> float:
    """Training FLOPs (3x forward: forward + backward) of one step, matmuls and attention only.

    Backbone: every position, plus its codebook-0 head. Depth decoder: per trained frame a 32-position sequence
    (backbone state + codebooks 0-30) through its layers, the input projection and 31 codebook heads.
    Causal attention costs 4 * layers * heads * head_dim * (context / 2) per position.
    """
    c, d = config, config.depth_decoder_config
    bb = _matmul_params(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                        c.num_key_value_heads, c.head_dim)  # fmt: skip
    dec = _matmul_params(d.hidden_size, d.intermediate_size, d.num_hidden_layers, d.num_attention_heads,
                         d.num_key_value_heads, d.head_dim)  # fmt: skip
    backbone = positions * (2 * bb + 2 * c.hidden_size * c.vocab_size
                            + 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len)  # fmt: skip
    per_frame = 32 * (2 * dec + 2 * d.backbone_hidden_size * d.hidden_size
                      + 2 * d.num_hidden_layers * d.num_attention_heads * d.head_dim * 32)  # fmt: skip
    per_frame += 31 * 2 * d.hidden_size * d.vocab_size
    return 3.0 * (backbone + decoder_frames * per_frame)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant: build, warm up, time `steps` optimizer steps; report time, memory, frames."""
    torch.manual_seed(0)
    base, overrides = SIZES[args.size]
    config = named_config(base, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    from transformers import CsmForConditionalGeneration

    model = CsmForConditionalGeneration(config)
    model.codec_model.requires_grad_(False)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    tm = CsmForTraining(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    b = {k: v.to(device) for k, v in make_batch(args.batch, args.positions).items()}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    labels, n_dec = decoder_labels(b["codes"], b["kinds"], args.ratio, torch.Generator().manual_seed(0))

    def step() -> None:
        with amp:
            loss, _, _ = tm(b["text"], b["codes"], b["kinds"], b["attention_mask"], labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB: model, batch, no grads yet
    if device.type == "cuda":
        base = torch.cuda.memory_allocated() / 2**20
    step()  # warm-up (kernels, allocator); its memory counts: max RSS cannot be reset
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB, whole process
    seq_len = float(b["attention_mask"].sum(1).float().mean())
    positions = int(b["attention_mask"].sum())
    frames = int(((b["kinds"] == AUDIO) | (b["kinds"] == EOS)).sum())
    return {
        "ratio": args.ratio, "step_s": min(times), "peak_mib": peak, "step_mib": peak - base,
        "positions": positions, "frames": frames, "decoder_frames": n_dec,
        "flops": step_flops(config, positions, n_dec, seq_len), "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }  # fmt: skip


def compare(size: str = "small", batch: int = 2, positions: int | None = None, steps: int = 3,
            ratio: float = 1 / 16, device: str = "auto", checkpointing: bool = False) -> tuple[dict, dict]:
    """(full decoder, amortized) results, each variant measured in its own subprocess."""
    positions = positions or (2048 if size in ("1b", "8b") else 512)
    results = {}
    for r in (1.0, ratio):
        cmd = [sys.executable, __file__, "--child", "--size", size, "--batch", str(batch), "--positions",
               str(positions), "--steps", str(steps), "--ratio", repr(r), "--device", device]
        cmd += ["--checkpointing"] if checkpointing else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[r] = json.loads(out.stdout.strip().splitlines()[-1])
    return results[1.0], results[ratio]


def run() -> list[Row]:
    """Rows for `python -m bench` (default small config)."""
    from bench.common import Row

    full, amort = compare()
    where = full["gpu"] or "cpu"
    measured, flops = full["step_s"] / amort["step_s"], full["flops"] / amort["flops"]
    mem = "GPU max allocated" if full["gpu"] else "max RSS"
    return [
        Row("amortization", f"step time, full decoder / 1/16 frames (small config, {where})", measured,
            f"FLOP count {flops:.2f}x", measured / flops,
            f"{full['step_s']:.2f} s vs {amort['step_s']:.2f} s; decoder frames {full['decoder_frames']} vs "
            f"{amort['decoder_frames']}"),
        Row("amortization", f"peak memory, full decoder / 1/16 frames ({mem})", full["peak_mib"] / amort["peak_mib"],
            "", None, f"{full['peak_mib']:.0f} MiB vs {amort['peak_mib']:.0f} MiB"),
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--positions", type=int, default=None, help="positions per sequence (default 512; 1b/8b: 2048)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (fastest reported)")
    p.add_argument("--ratio", type=float, default=1 / 16, help="the amortized variant's decoder_frame_ratio")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (for big sizes)")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.positions = args.positions or (2048 if args.size in ("1b", "8b") else 512)
        print(json.dumps(child(args)))
        return

    full, amort = compare(args.size, args.batch, args.positions, args.steps, args.ratio, args.device,
                          args.checkpointing)  # fmt: skip
    print(f"size {args.size}, {args.batch} sequences on {full['gpu'] or full['device']}: {full['positions']} "
          f"positions, {full['frames']} of them audio frames")  # fmt: skip
    print(f"{'variant':<16}{'decoder frames':>15}{'step s':>9}{'peak MiB':>10}{'step MiB':>10}{'TFLOP/step':>12}")
    for name, r in (("full decoder", full), (f"1/{round(1 / args.ratio)} frames", amort)):
        print(f"{name:<16}{r['decoder_frames']:>15}{r['step_s']:>9.3f}{r['peak_mib']:>10.0f}{r['step_mib']:>10.0f}"
              f"{r['flops'] / 1e12:>12.4f}")  # fmt: skip
    print(f"step time  full / amortized: measured {full['step_s'] / amort['step_s']:.2f}x, "
          f"FLOP count {full['flops'] / amort['flops']:.2f}x")  # fmt: skip
    what = "GPU max allocated" if full["gpu"] else "CPU max RSS of the process"
    print(f"memory     full / amortized: peak {full['peak_mib'] / amort['peak_mib']:.2f}x, "
          f"above the built model {full['step_mib'] / max(1.0, amort['step_mib']):.2f}x ({what})")  # fmt: skip
    if args.json:
        print(json.dumps({"full": full, "amortized": amort}))


if __name__ == "__main__":
    main()
