"""Mimi audio codes: the whole recording, encoded in long frame-aligned chunks by transformers' MimiModel;
the chunks can be streamed from ffmpeg (`encode_stream`), so memory does not grow with the recording.

Production loads "kyutai/mimi". Offline runs load a small random-initialised model of the same architecture
(same rate, strides and 32 x 2048 codebooks), written by `build_offline_mimi` and loaded the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import MimiModel

MIMI_SAMPLE_RATE = 24_000
MIMI_FRAME_RATE = 12.5
MIMI_SAMPLES_PER_FRAME = 1920  # 24 kHz / 12.5 Hz
OFFLINE_MIMI_NAME = "mimi-tiny-random"


def load_mimi(name_or_path: str, device: str = "cpu") -> MimiModel:
    """MimiModel from a hub id or local dir, in eval mode on `device`; rejects a codec with another frame grid."""
    from transformers import MimiModel

    model = MimiModel.from_pretrained(name_or_path).to(device).eval()
    cfg = model.config
    # frame i must mean samples [i*1920, (i+1)*1920) at 24 kHz everywhere downstream (windows, shards)
    if cfg.sampling_rate != MIMI_SAMPLE_RATE or cfg.frame_size != MIMI_SAMPLES_PER_FRAME:
        raise ValueError(
            f"{name_or_path}: expected {MIMI_SAMPLE_RATE} Hz and {MIMI_SAMPLES_PER_FRAME} samples per frame, "
            f"got {cfg.sampling_rate} Hz and {cfg.frame_size}"
        )
    return model


def chunk_samples(chunk_s: float) -> int:
    """Samples at 24 kHz in one encode chunk: `chunk_s` rounded to a whole number of frames (at least one)."""
    return max(1, round(chunk_s * MIMI_FRAME_RATE)) * MIMI_SAMPLES_PER_FRAME


def encode_audio(
    audio24: np.ndarray,
    model: MimiModel,
    num_codebooks: int = 32,
    chunk_s: float = 300.0,
    batch_size: int = 1,
) -> np.ndarray:
    """Mimi codes of a whole 24 kHz mono recording held in memory; see `encode_stream`."""
    if audio24.ndim != 1:
        raise ValueError(f"expected mono audio, got shape {audio24.shape}")
    step = chunk_samples(chunk_s)
    chunks = (audio24[s : s + step] for s in range(0, len(audio24), step))  # views, no copy
    return encode_stream(chunks, model, num_codebooks, chunk_s, batch_size)


def encode_stream(
    chunks: Iterable[np.ndarray],
    model: MimiModel,
    num_codebooks: int = 32,
    chunk_s: float = 300.0,
    batch_size: int = 1,
) -> np.ndarray:
    """Mimi codes of a 24 kHz mono recording given as consecutive chunks of exactly `chunk_samples(chunk_s)`
    samples (the last may be shorter), e.g. `tasks.decode.stream`: int16 array of shape
    (ceil(samples / 1920), num_codebooks).

    Chunks are a whole number of frames, so frame i always covers samples [i*1920, (i+1)*1920) whatever the
    chunk size; the tail is zero-padded to a full frame. Full chunks are encoded `batch_size` at a time on
    the model's device, each from a fresh codec state. Memory (host and device) is batch_size chunks, not
    the recording: a 3-hour file costs what a 10-minute one does.
    """
    import torch

    if not 1 <= num_codebooks <= model.config.num_quantizers:
        raise ValueError(f"num_codebooks must be in 1..{model.config.num_quantizers}, got {num_codebooks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk_len = chunk_samples(chunk_s)
    device = model.device
    out: list[np.ndarray] = []

    def encode(batch: list[np.ndarray]) -> None:
        x = torch.from_numpy(np.stack(batch))[:, None, :].to(device)
        with torch.inference_mode():
            codes = model.encode(x, num_quantizers=num_codebooks, return_dict=True).audio_codes  # (B, K, T)
        codes = codes.transpose(1, 2).to("cpu", torch.int16).numpy()
        n = x.shape[-1] // MIMI_SAMPLES_PER_FRAME
        if codes.shape[1] != n:  # guard the frame grid against codec padding changes
            raise RuntimeError(f"Mimi returned {codes.shape[1]} frames for {n} frames of audio")
        out.extend(codes)

    full: list[np.ndarray] = []
    tail: np.ndarray | None = None
    for chunk in chunks:
        if chunk.ndim != 1:
            raise ValueError(f"expected mono audio, got shape {chunk.shape}")
        if tail is not None:
            raise ValueError(f"only the last chunk may be shorter than {chunk_len} samples, got {len(tail)}")
        if len(chunk) == chunk_len:
            full.append(np.asarray(chunk, dtype=np.float32))
            if len(full) == batch_size:
                encode(full)
                full = []
        elif len(chunk) < chunk_len:
            tail = chunk
        else:
            raise ValueError(f"chunk of {len(chunk)} samples is longer than {chunk_len}")
    if tail is not None and len(tail):
        # pad to whole frames ourselves, so the last frame's padding is explicit zeros and the count exact
        padded = np.zeros(math.ceil(len(tail) / MIMI_SAMPLES_PER_FRAME) * MIMI_SAMPLES_PER_FRAME, np.float32)
        padded[: len(tail)] = tail
        if len(padded) == chunk_len:  # a tail padded to a full chunk batches with the full ones
            full.append(padded)
            tail = None
        else:
            tail = padded
    if full:
        encode(full)
    # the encoder ignores padding masks, so only equal-length chunks share a batch; a short tail goes alone
    if tail is not None and len(tail):
        encode([tail])
    if not out:
        return np.zeros((0, num_codebooks), dtype=np.int16)
    return np.concatenate(out)


def _init_codebooks(model: MimiModel, seed: int) -> None:
    """Give a random-initialised Mimi non-degenerate codebooks.

    transformers initialises every codebook to zeros (real ones come from training), which would make
    every code 0. Each level gets 2048 Gaussian centroids scaled like the residual it quantizes, measured
    on noise, so the offline codes vary with the audio like real ones do.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 1, 8 * MIMI_SAMPLE_RATE, generator=gen) * 0.1
    with torch.inference_mode():
        emb = model.encoder(noise)
        emb = model.encoder_transformer(emb.transpose(1, 2))[0].transpose(1, 2)
        emb = model.downsample(emb)
    quantizer = model.quantizer
    for rvq in (quantizer.semantic_residual_vector_quantizer, quantizer.acoustic_residual_vector_quantizer):
        with torch.inference_mode():
            residual = rvq.input_proj(emb) if rvq.input_proj is not None else emb
        for layer in rvq.layers:
            book = layer.codebook
            scale = residual.transpose(1, 2).reshape(-1, residual.shape[1]).std(dim=0)
            with torch.no_grad():
                book.embed_sum.copy_(torch.randn(book.embed_sum.shape, generator=gen) * scale)
                book.cluster_usage.fill_(1.0)
            book._embed = None  # drop the cached centroids derived from the old buffers
            with torch.inference_mode():
                residual = residual - layer.decode(layer.encode(residual))


def build_offline_mimi(dest: Path, seed: int = 0) -> str:
    """Write a small random-initialised MimiModel of the real architecture to dest/mimi-tiny-random.

    Same sampling rate, strides (12.5 Hz frames), causal convs and 32 x 2048 codebooks as kyutai/mimi;
    only the widths and depths shrink so CPU encoding is fast. Returns the path for `load_mimi`.
    """
    import torch
    from transformers import MimiConfig, MimiModel

    out = Path(dest) / OFFLINE_MIMI_NAME
    config = MimiConfig(
        sampling_rate=MIMI_SAMPLE_RATE,
        upsampling_ratios=[8, 6, 5, 4],
        num_quantizers=32,
        num_semantic_quantizers=1,
        codebook_size=2048,
        hidden_size=64,
        num_filters=8,
        codebook_dim=32,
        vector_quantization_hidden_dimension=32,
        upsample_groups=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    with torch.random.fork_rng(devices=[]):  # deterministic weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = MimiModel(config).eval()
    _init_codebooks(model, seed)
    model.save_pretrained(out)
    provenance = {
        "weights": "random-initialised, real architecture",
        "architecture": "transformers.MimiModel, kyutai/mimi rates and codebooks, reduced widths and depths",
        "seed": seed,
        "note": "codes are deterministic but meaningless; for pipeline tests only",
    }
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return str(out)
