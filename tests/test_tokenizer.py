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


def _encode_whole(audio24: np.ndarray, model, chunk_s: float, batch_size: int) -> np.ndarray:
    """The encode as it was before streaming (whole 24 kHz array, one padded copy, chunks sliced from it and
    batched the same way): the reference the streamed encode must match code for code."""
    import torch

    n_frames = math.ceil(len(audio24) / MIMI_SAMPLES_PER_FRAME)
    out = np.zeros((n_frames, 32), dtype=np.int16)
    chunk_len = max(1, round(chunk_s * MIMI_FRAME_RATE)) * MIMI_SAMPLES_PER_FRAME
    audio = np.zeros(n_frames * MIMI_SAMPLES_PER_FRAME, dtype=np.float32)
    audio[: len(audio24)] = audio24
    starts = list(range(0, len(audio), chunk_len))
    full = [s for s in starts if s + chunk_len <= len(audio)]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts if s + chunk_len > len(audio)]
    with torch.inference_mode():
        for batch in batches:
            length = min(chunk_len, len(audio) - batch[0])
            x = torch.from_numpy(np.stack([audio[s : s + length] for s in batch]))[:, None, :]
            codes = model.encode(x, num_quantizers=32, return_dict=True).audio_codes
            for s, c in zip(batch, codes.transpose(1, 2).to(torch.int16).numpy(), strict=True):
                out[s // MIMI_SAMPLES_PER_FRAME : s // MIMI_SAMPLES_PER_FRAME + length // MIMI_SAMPLES_PER_FRAME] = c
    return out


@pytest.fixture(scope="module")
def speech_mp3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.synth import speak, write_audio

    path = tmp_path_factory.mktemp("audio") / "speech.mp3"
    write_audio(path, speak("Streaming test. The codes must not change when the audio is streamed.", "en-us+f3",
                            150), 22_050)
    return path


@pytest.mark.parametrize(("chunk_s", "batch_size"), [(300.0, 1), (0.8, 1), (0.8, 3), (1.6, 2)])
def test_streamed_encode_matches_whole_file_encode(mimi, speech_mp3: Path, chunk_s: float, batch_size: int) -> None:
    from tasks.decode import decode, stream
    from tokenizer.mimi import chunk_samples, encode_stream

    whole = _encode_whole(decode(speech_mp3, SR), mimi, chunk_s, batch_size)
    streamed = encode_stream(stream(speech_mp3, SR, chunk_samples(chunk_s)), mimi, chunk_s=chunk_s,
                             batch_size=batch_size)
    np.testing.assert_array_equal(streamed, whole)


@pytest.mark.parametrize("n", [2 * 19_200 - 100, 2 * 19_200, 2 * 19_200 + 1, 19_200 + 1920 * 3])
def test_encode_tail_batching_matches_whole_file_encode(mimi, audio: np.ndarray, n: int) -> None:
    # tails that pad to a full chunk (first case) batch with the full chunks, as before streaming
    np.testing.assert_array_equal(encode_audio(audio[:n], mimi, chunk_s=0.8, batch_size=2),
                                  _encode_whole(audio[:n], mimi, 0.8, 2))


def test_encode_stream_rejects_misaligned_chunks(mimi) -> None:
    from tokenizer.mimi import encode_stream

    with pytest.raises(ValueError, match="only the last chunk"):
        encode_stream(iter([np.zeros(1920, np.float32), np.zeros(19_200, np.float32)]), mimi, chunk_s=0.8)
    with pytest.raises(ValueError, match="longer than"):
        encode_stream(iter([np.zeros(19_201, np.float32)]), mimi, chunk_s=0.8)


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
