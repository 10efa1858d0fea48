"""Mimi encode real-time factor at several batch sizes, production-size architecture (random weights cost
the same as trained ones). Target on one H100: >= 1000x real time."""

from __future__ import annotations

import torch

from bench.common import Row, best_of, speech_array


def run(seconds: float = 20.0, batches: tuple[int, ...] = (1, 2, 4)) -> list[Row]:
    from transformers import MimiConfig, MimiModel

    from tokenizer.mimi import encode_audio

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = MimiModel(MimiConfig()).to(device).eval()  # kyutai/mimi's architecture and sizes
    rows = []
    for batch in batches:
        audio = speech_array(seconds * batch, 24_000)
        encode_audio(audio[: 24_000 * 2], model, chunk_s=2.0)  # warm-up
        t = best_of(lambda a=audio, b=batch: encode_audio(a, model, chunk_s=seconds, batch_size=b), repeat=2)
        target = 1000 if device == "cuda" else None
        rows.append(Row("mimi encode", f"x real time, batch {batch} x {seconds:.0f} s chunks ({device})",
                        len(audio) / 24_000 / t, "1000x on one H100" if target else "no CPU target",
                        (len(audio) / 24_000 / t / target) if target else None,
                        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params, fp32"))
    return rows
