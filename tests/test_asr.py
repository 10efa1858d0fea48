"""ASR + word alignment on a real espeak-ng dialogue with real Whisper weights (offline model set).

The wav2vec2 aligner is random (no package ships a trained one): its test checks the real whisperx.align path
runs and keeps every word, not the times. Word times are checked with method=whisper.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from schemas.config import AlignConfig, AsrConfig
from schemas.records import Segment, Transcript
from tasks.asr import align, build_offline_asr, fill_times, load_aligner, load_asr, transcribe
from tasks.synth import make_dialogue

TIMINGS: dict[str, float] = {}


def decode16(path: Path) -> np.ndarray:
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", "16000", "-f", "f32le", "-"]
    return np.frombuffer(subprocess.run(cmd, check=True, capture_output=True).stdout, np.float32).copy()


def normalize(text: str) -> list[str]:
    text = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " "))
    return text.split()


def edit_alignment(ref: list[str], hyp: list[str]) -> tuple[int, list[tuple[int, int]]]:
    """Word edit distance, and the (ref, hyp) index pairs it matches exactly."""
    d = np.zeros((len(ref) + 1, len(hyp) + 1), dtype=int)
    d[:, 0] = np.arange(len(ref) + 1)
    d[0, :] = np.arange(len(hyp) + 1)
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]))
    pairs, i, j = [], len(ref), len(hyp)
    while i > 0 and j > 0:
        if d[i, j] == d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            if ref[i - 1] == hyp[j - 1]:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif d[i, j] == d[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return int(d[-1, -1]), pairs[::-1]


def wer(script: dict, transcript: Transcript) -> float:
    ref = [w for t in script["turns"] for w in normalize(t["text"])]
    hyp = [w for s in transcript.segments for w in normalize(s.text)]
    return edit_alignment(ref, hyp)[0] / len(ref)


@pytest.fixture(scope="session")
def offline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    t = time.perf_counter()
    models = build_offline_asr(tmp_path_factory.mktemp("asr_models"))
    TIMINGS["build_offline_asr_s"] = time.perf_counter() - t
    return models


@pytest.fixture(scope="session")
def dialogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, dict]:
    path = tmp_path_factory.mktemp("dialogue") / "dialogue.wav"
    script = make_dialogue(path)
    return decode16(path), script


@pytest.fixture(scope="session")
def asr_cfg(offline: dict[str, str]) -> AsrConfig:
    # int8 + greedy keeps the 2-core CPU run short; VAD stays on (greedy without VAD loops on long audio).
    return AsrConfig(model=offline["asr"], compute_type="int8", batch_size=8, beam_size=1)


@pytest.fixture(scope="session")
def asr_model(asr_cfg: AsrConfig):
    t = time.perf_counter()
    model = load_asr(asr_cfg, "cpu")
    TIMINGS["load_asr_s"] = time.perf_counter() - t
    return model


@pytest.fixture(scope="session")
def transcript(dialogue, asr_model, asr_cfg: AsrConfig) -> Transcript:
    audio, _ = dialogue
    t = time.perf_counter()
    result = transcribe(audio, asr_model, asr_cfg)
    TIMINGS["transcribe_rtf"] = (time.perf_counter() - t) / (len(audio) / 16_000)
    return result


@pytest.fixture(scope="session", autouse=True)
def report_timings():
    yield
    if TIMINGS:
        print("\nASR timings:", json.dumps({k: round(v, 3) for k, v in TIMINGS.items()}))


@pytest.mark.slow
def test_offline_set_provenance(offline: dict[str, str]) -> None:
    asr = Path(offline["asr"])
    assert {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"} <= {p.name for p in asr.iterdir()}
    assert offline["asr_provenance"].startswith("real")
    assert offline["align_provenance"].startswith("random")
    assert json.loads((Path(offline["align"]) / "PROVENANCE.json").read_text())["weights"].startswith("random")
    assert build_offline_asr(asr.parent)["asr"] == offline["asr"]  # idempotent: a second build reuses the files


@pytest.mark.slow
def test_transcribe_whisper_base(transcript: Transcript, dialogue) -> None:
    audio, script = dialogue
    duration = len(audio) / 16_000
    assert transcript.language == "en"
    assert transcript.language_probability is not None and transcript.language_probability > 0.5
    assert transcript.segments
    for seg in transcript.segments:
        assert 0 <= seg.start < seg.end <= duration + 0.05
        assert seg.avg_logprob is not None and seg.avg_logprob < 0
        assert seg.no_speech_prob is not None and 0 <= seg.no_speech_prob <= 1
        assert not seg.words  # words come from align
    TIMINGS["wer_base"] = wer(script, transcript)
    assert TIMINGS["wer_base"] < 0.35


@pytest.mark.slow
def test_align_whisper_word_times(transcript: Transcript, dialogue, asr_model) -> None:
    audio, script = dialogue
    cfg = AlignConfig(method="whisper", batch_size=4)
    t = time.perf_counter()
    aligned = align(audio, transcript, load_aligner(cfg, transcript.language, "cpu", asr_model=asr_model), cfg, "cpu")
    TIMINGS["align_whisper_rtf"] = (time.perf_counter() - t) / (len(audio) / 16_000)
    words = aligned.words
    assert [s.text for s in aligned.segments] == [s.text for s in transcript.segments]
    assert all(0 <= w.start <= w.end <= len(audio) / 16_000 + 0.05 for w in words)
    assert sum(w.score is not None for w in words) >= 0.9 * len(words)

    # Each hypothesis word that matches a script word must lie in that word's line (a little slack).
    ref, line_of = [], []
    for k, turn in enumerate(script["turns"]):
        for w in normalize(turn["text"]):
            ref.append(w)
            line_of.append(k)
    hyp, word_of = [], []
    for j, w in enumerate(words):
        for piece in normalize(w.text):
            hyp.append(piece)
            word_of.append(j)
    _, pairs = edit_alignment(ref, hyp)
    assert len(pairs) > 0.7 * len(ref)
    slack = 0.3
    inside = 0
    for i, j in pairs:
        turn, word = script["turns"][line_of[i]], words[word_of[j]]
        inside += turn["start"] - slack <= word.start and word.end <= turn["end"] + slack
    TIMINGS["whisper_words_in_line"] = inside / len(pairs)
    assert inside >= 0.8 * len(pairs)


@pytest.mark.slow
def test_align_wav2vec2_random_aligner(transcript: Transcript, dialogue, offline: dict[str, str]) -> None:
    audio, _ = dialogue
    duration = len(audio) / 16_000
    cfg = AlignConfig(method="wav2vec2", model=offline["align"], nltk_data=offline["nltk_data"])
    aligner = load_aligner(cfg, transcript.language, "cpu")
    assert aligner.metadata["type"] == "huggingface"  # whisperx's own loader took the local dir
    # One more segment past the end of the audio: whisperx cannot align it, its words must still come back.
    extra = Segment(start=duration + 1, end=duration + 2, text="beyond the end")
    source = transcript.model_copy(update={"segments": [*transcript.segments, extra]})
    t = time.perf_counter()
    aligned = align(audio, source, aligner, cfg, "cpu")
    TIMINGS["align_wav2vec2_tiny_rtf"] = (time.perf_counter() - t) / duration
    for before, after in zip(source.segments, aligned.segments, strict=True):
        assert [w.text for w in after.words] == before.text.split()  # every word kept, in order
        for w in after.words:
            assert 0 <= w.start <= w.end <= duration
    assert all(w.score is not None for s in aligned.segments[:-1] for w in s.words)
    assert all(w.score is None for w in aligned.segments[-1].words)  # interpolated, not aligned


@pytest.mark.slow
def test_tiny_en_with_silero_vad(dialogue, offline: dict[str, str]) -> None:
    audio, script = dialogue
    cfg = AsrConfig(model=offline["asr_tiny_en"], compute_type="int8", batch_size=8, beam_size=1, vad_method="silero")
    model = load_asr(cfg, "cpu")
    t = time.perf_counter()
    result = transcribe(audio, model, cfg)
    TIMINGS["transcribe_tiny_en_silero_rtf"] = (time.perf_counter() - t) / (len(audio) / 16_000)
    assert result.language == "en"  # English-only model: no detection
    assert all(s.no_speech_prob is not None for s in result.segments)
    TIMINGS["wer_tiny_en"] = wer(script, result)
    assert TIMINGS["wer_tiny_en"] < 0.35


def test_fill_times_interpolates_untimed_words() -> None:
    words = [
        {"word": "one", "start": 1.0, "end": 1.2, "score": 0.9},
        {"word": "two"},
        {"word": "three", "start": float("nan"), "end": float("nan")},
        {"word": "four", "start": 2.0, "end": 2.4, "score": 0.8},
        {"word": "five"},
    ]
    out = fill_times(words, 0.5, 3.0)
    assert [w.text for w in out] == ["one", "two", "three", "four", "five"]
    assert out[1].start == 1.2 and out[2].end == 2.0 and out[1].end == out[2].start
    assert out[1].score is None and out[3].score == 0.8
    assert out[4].start == 2.4 and out[4].end == 3.0
    spread = fill_times([{"word": "a"}, {"word": "bb"}], 0.0, 5.0)  # nothing timed: share the segment by length
    assert spread[0].start == 0.0 and spread[-1].end == 5.0 and spread[0].end == 2.0
