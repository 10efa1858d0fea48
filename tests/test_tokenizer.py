"""Tokenization stage on the offline models: a tiny random Mimi and Whisper's BPE standing in for Llama-3's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tokenizer import (
    MIMI_FRAME_RATE,
    MIMI_SAMPLES_PER_FRAME,
    build_offline_mimi,
    build_offline_text_tokenizer,
    encode_audio,
    encode_turn_text,
    load_mimi,
    load_text_tokenizer,
)

SR = 24_000


@pytest.fixture(scope="session")
def mimi(tmp_path_factory: pytest.TempPathFactory):
    path = build_offline_mimi(tmp_path_factory.mktemp("models"))
    assert json.loads((Path(path) / "PROVENANCE.json").read_text())["weights"].startswith("random")
    return load_mimi(path, "cpu")


@pytest.fixture(scope="session")
def text_tok(tmp_path_factory: pytest.TempPathFactory):
    path = build_offline_text_tokenizer(tmp_path_factory.mktemp("models"))
    assert json.loads((Path(path) / "PROVENANCE.json").read_text())["weights"].startswith("real")
    return load_text_tokenizer(path)


@pytest.fixture(scope="session")
def audio() -> np.ndarray:
    # noise under a slow tone: enough structure that codes vary along the recording
    t = np.arange(int(7.3 * SR)) / SR
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t / 7.3)) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def test_offline_mimi_has_real_grid(mimi) -> None:
    cfg = mimi.config
    assert cfg.sampling_rate == SR and cfg.frame_rate == MIMI_FRAME_RATE
    assert cfg.frame_size == MIMI_SAMPLES_PER_FRAME
    assert cfg.num_quantizers == 32 and cfg.codebook_size == 2048


def test_encode_shape_and_range(mimi, audio: np.ndarray) -> None:
    codes = encode_audio(audio, mimi)
    assert codes.shape == (math.ceil(7.3 * MIMI_FRAME_RATE), 32)
    assert codes.dtype == np.int16
    assert codes.min() >= 0 and codes.max() < 2048
    assert len(np.unique(codes[:, 0])) > 1  # codebooks are not degenerate


@pytest.mark.parametrize("n", [0, 1, 1919, 1920, 1921])
def test_frame_count_is_ceil(mimi, n: int) -> None:
    codes = encode_audio(np.zeros(n, dtype=np.float32), mimi, num_codebooks=8)
    assert codes.shape == (math.ceil(n / MIMI_SAMPLES_PER_FRAME), 8)


def test_chunked_encode_is_frame_aligned(mimi, audio: np.ndarray) -> None:
    whole = encode_audio(audio, mimi)
    chunked = encode_audio(audio, mimi, chunk_s=2.4, batch_size=2)
    assert chunked.shape == whole.shape
    per_chunk = round(2.4 * MIMI_FRAME_RATE)
    step = per_chunk * MIMI_SAMPLES_PER_FRAME
    # chunk k's codes are exactly the codes of samples [k*step, (k+1)*step) encoded on their own
    for k in range(math.ceil(len(whole) / per_chunk)):
        alone = encode_audio(audio[k * step : (k + 1) * step], mimi)
        np.testing.assert_array_equal(chunked[k * per_chunk : k * per_chunk + len(alone)], alone)
    # Mimi is causal, so the first chunk matches the whole-recording encode
    np.testing.assert_array_equal(chunked[:per_chunk], whole[:per_chunk])


def test_batch_size_does_not_change_codes(mimi, audio: np.ndarray) -> None:
    one = encode_audio(audio, mimi, chunk_s=1.6, batch_size=1)
    many = encode_audio(audio, mimi, chunk_s=1.6, batch_size=3)
    np.testing.assert_array_equal(one, many)


def test_frame_i_covers_its_samples(mimi, audio: np.ndarray) -> None:
    base = encode_audio(audio, mimi)
    j = 40
    changed = audio.copy()
    changed[j * MIMI_SAMPLES_PER_FRAME : (j + 1) * MIMI_SAMPLES_PER_FRAME] += 0.5
    codes = encode_audio(changed, mimi)
    np.testing.assert_array_equal(codes[:j], base[:j])  # earlier frames never see later samples
    assert (codes[j] != base[j]).any()  # frame j sees its own samples


def test_encode_rejects_bad_input(mimi) -> None:
    with pytest.raises(ValueError):
        encode_audio(np.zeros((2, 1920), dtype=np.float32), mimi)
    with pytest.raises(ValueError):
        encode_audio(np.zeros(1920, dtype=np.float32), mimi, num_codebooks=33)


def test_turn_text_round_trip(text_tok) -> None:
    ids = encode_turn_text(text_tok, 0, "hello world")
    assert ids[0] == text_tok.bos_token_id and ids[-1] == text_tok.eos_token_id
    assert text_tok.decode(ids, skip_special_tokens=True) == "[0]hello world"
    assert all(0 <= i < len(text_tok) for i in ids)
    bare = encode_turn_text(text_tok, 0, "hello world", add_special=False)
    assert bare == ids[1:-1]
    assert text_tok.decode(bare) == "[0]hello world"


def test_turn_text_speakers_and_unicode(text_tok) -> None:
    text = " Ça va? Héllo  wörld, 日本語!"
    for speaker in (0, 1, 7, 12):
        ids = encode_turn_text(text_tok, speaker, text, add_special=False)
        assert text_tok.decode(ids) == f"[{speaker}]{text}"
    assert encode_turn_text(text_tok, 0, "x") != encode_turn_text(text_tok, 1, "x")
