"""The model side: transformers' CsmForConditionalGeneration, inputs and labels built from shard batches.

We follow modeling_csm.py rather than re-implementing CSM:
- inputs_embeds: text positions go through `embed_text_tokens`, audio frames (and end-of-audio frames, all-zero
  codes) through `backbone_model.embed_tokens`, which sums the 32 codebook embeddings; this is what
  `_merge_input_ids_with_input_values` builds from input_ids with audio_token_id placeholders.
- labels (B, T, 32): the frame's codes at audio and end-of-audio positions, -100 elsewhere. The backbone loss
  takes codebook 0 of every labelled position (shifted inside `loss_function`); the depth decoder trains only
  on positions whose codebooks 1-31 are not all -100, so the frames it should skip get -100 there (what the
  processor's -101 label expands to).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from transformers import CsmConfig, CsmForConditionalGeneration, MimiConfig

from training.config import TrainConfig
from training.data import AUDIO, EOS, NUM_CODEBOOKS

# Depth decoder and codec for the tiny config: small enough that building the model takes well under a second.
_TINY_CODEC = MimiConfig(
    hidden_size=16, num_filters=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
    head_dim=8, intermediate_size=32, codebook_dim=16, upsample_groups=16, num_quantizers=NUM_CODEBOOKS,
)  # fmt: skip

# Named configs. Codebook vocab 2051 as csm-1b (2048 Mimi codes plus the reference's reserved ids).
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # CPU tests and smoke runs; the text vocab holds the offline Whisper BPE tokenizer (51865 ids).
    "tiny": dict(
        text_vocab_size=51866, vocab_size=2051, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        depth_decoder_config=dict(
            backbone_hidden_size=64, vocab_size=2051, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        ),
        codec_config=_TINY_CODEC.to_dict(),
    ),
    # sesame/csm-1b's shapes: Llama-3.2-1B-like backbone, 100M depth decoder, Llama-3 text vocab.
    "1b": dict(
        text_vocab_size=128256, vocab_size=2051, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
        depth_decoder_config=dict(
            backbone_hidden_size=2048, vocab_size=2051, hidden_size=1024, intermediate_size=8192,
            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        ),
    ),
    # CSM-Medium-like: Llama-3-8B backbone, ~300M depth decoder.
    "8b": dict(
        text_vocab_size=128256, vocab_size=2051, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
        depth_decoder_config=dict(
            backbone_hidden_size=4096, vocab_size=2051, hidden_size=1536, intermediate_size=6144,
            num_hidden_layers=6, num_attention_heads=12, num_key_value_heads=4,
        ),
    ),
}  # fmt: skip


def named_config(size: str, overrides: dict[str, Any] | None = None, attn_implementation: str = "sdpa") -> CsmConfig:
    """A CsmConfig from NAMED_CONFIGS, with overrides; `depth_decoder_config` overrides merge field by field."""
    if size not in NAMED_CONFIGS:
        raise ValueError(f"unknown model_size {size!r}; known: {sorted(NAMED_CONFIGS)}")
    fields = copy.deepcopy(NAMED_CONFIGS[size])
    for k, v in (overrides or {}).items():
        if k == "depth_decoder_config":
            fields[k].update(v)
        else:
            fields[k] = v
    if "hidden_size" in (overrides or {}):  # the depth decoder reads the backbone's hidden states
        fields["depth_decoder_config"]["backbone_hidden_size"] = fields["hidden_size"]
    fields["depth_decoder_config"]["num_codebooks"] = fields["num_codebooks"] = NUM_CODEBOOKS
    return CsmConfig(**fields, attn_implementation=attn_implementation)


def build_model(cfg: TrainConfig) -> CsmForConditionalGeneration:
    """Load `cfg.model` or build `cfg.model_size` from scratch, fp32, codec frozen (training never runs Mimi)."""
    if cfg.model_size is not None:
        model = CsmForConditionalGeneration(named_config(cfg.model_size, cfg.model_overrides, cfg.attn_implementation))
    else:
        model = CsmForConditionalGeneration.from_pretrained(
            cfg.model, attn_implementation=cfg.attn_implementation, dtype=torch.float32
        )
    # the codec only matters for generation/export; frozen, so DDP and the optimizer leave it alone
    model.codec_model.requires_grad_(False)
    return model


def decoder_labels(
    codes: torch.Tensor, kinds: torch.Tensor, ratio: float, generator: torch.Generator, train_eos: bool = True
) -> tuple[torch.Tensor, int]:
    """Labels (B, T, 32) and how many frames the depth decoder trains on.

    Every audio and end-of-audio position is labelled with its codes, so the backbone learns codebook 0 of all
    of them. Of the audio frames, ceil(ratio * n) drawn uniformly from the batch keep codebooks 1-31 for the
    depth decoder (CsmProcessor's depth_decoder_labels_ratio); the rest get -100 there and are skipped.
    End-of-audio frames always keep them when `train_eos`, as in the processor.
    """
    labelled = (kinds == AUDIO) | (kinds == EOS)
    labels = torch.where(labelled.unsqueeze(-1), codes.long(), torch.full_like(codes, -100, dtype=torch.long))
    labels[:, 0] = -100  # position 0 has no previous hidden state to predict it from (it is text anyway)
    audio = (kinds == AUDIO).clone()
    audio[:, 0] = False
    frames = audio.flatten().nonzero().squeeze(1)
    n_keep = min(len(frames), math.ceil(len(frames) * ratio - 1e-9))
    keep = torch.zeros(audio.numel(), dtype=torch.bool, device=codes.device)
    pick = torch.randperm(len(frames), generator=generator)[:n_keep].to(codes.device)
    keep[frames[pick]] = True
    keep = keep.view_as(audio)
    if train_eos:
        keep |= kinds == EOS
        keep[:, 0] = False
    labels[..., 1:][~keep] = -100
    return labels, int(keep.sum())


class CsmForTraining(nn.Module):
    """CsmForConditionalGeneration behind a forward that takes batch tensors.

    Embedding inside forward (not before it) so that DDP/FSDP see every parameter used in their own forward.
    """

    def __init__(self, model: CsmForConditionalGeneration, decoder_loss_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.decoder_loss_weight = decoder_loss_weight
        batch_codebooks_head(model.depth_decoder.codebooks_head)

    def embed(self, text: torch.Tensor, codes: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """inputs_embeds (B, T, H) as CsmForConditionalGeneration builds them from input_ids and audio codes."""
        m = self.model
        embeds = m.embed_text_tokens(text)
        audio = (kinds == AUDIO) | (kinds == EOS)
        # (1, N, 32) -> the backbone's summed codebook embeddings for the N frames
        embeds[audio] = m.backbone_model.embed_tokens(codes[audio].long().unsqueeze(0))[0].to(embeds.dtype)
        return embeds

    def forward(
        self,
        text: torch.Tensor,
        codes: torch.Tensor,
        kinds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, backbone_loss, decoder_loss); loss = backbone + decoder_loss_weight * decoder."""
        out = self.model(
            inputs_embeds=self.embed(text, codes, kinds), attention_mask=attention_mask, labels=labels, use_cache=False
        )
        return out.backbone_loss + self.decoder_loss_weight * out.depth_decoder_loss, out.backbone_loss, out.depth_decoder_loss


def batch_codebooks_head(head: nn.Module) -> None:
    """Give transformers' CsmCodebooksHead one batched matmul instead of a Python loop over 31 codebooks.

    Same weights, same result. Its loop slices `weight[i]` 31 times, and every slice's backward writes a zero
    tensor the size of the whole weight (31 x hidden x 2051): a fixed cost per step, whatever the number of
    trained frames, that ate most of compute amortization's saving (bench/amortization.py).
    """

    def forward(hidden_states: torch.Tensor, cache_position: torch.Tensor | None = None) -> torch.Tensor:
        if cache_position is None:
            idx = torch.arange(hidden_states.shape[1], device=hidden_states.device)
        else:
            idx = cache_position - 1
        return torch.einsum("bsh,shv->bsv", hidden_states, head.weight[idx])

    head.forward = forward


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and embeddings, not norms and biases (nanoGPT's rule: dim >= 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    unique = [p for p in params if not (id(p) in seen or seen.add(id(p)))]  # tied embeddings once
    return [
        {"params": [p for p in unique if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in unique if p.dim() < 2], "weight_decay": 0.0},
    ]


def count_params(model: CsmForConditionalGeneration) -> dict[str, int]:
    """Trainable parameter counts: backbone (with text/audio embeddings and lm_head) and depth decoder."""
    dec = sum(p.numel() for p in model.depth_decoder.parameters())
    tied = model.depth_decoder.model.embed_tokens.weight is model.backbone_model.embed_tokens.embed_audio_tokens.weight
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() yields a tied one once
    if tied:
        dec -= model.depth_decoder.model.embed_tokens.weight.numel()
    return {"total": total, "backbone": total - dec, "depth_decoder": dec}
