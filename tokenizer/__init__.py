"""Tokenization stage: Mimi audio codes and CSM text tokens for each turn.

Heavy libraries (torch, transformers) load inside the functions, so importing this package is cheap.
"""

from tokenizer.mimi import (
    MIMI_FRAME_RATE,
    MIMI_SAMPLES_PER_FRAME,
    build_offline_mimi,
    encode_audio,
    load_mimi,
)
from tokenizer.text import build_offline_text_tokenizer, encode_turn_text, load_text_tokenizer

__all__ = [
    "MIMI_FRAME_RATE",
    "MIMI_SAMPLES_PER_FRAME",
    "build_offline_mimi",
    "build_offline_text_tokenizer",
    "encode_audio",
    "encode_turn_text",
    "load_mimi",
    "load_text_tokenizer",
]
