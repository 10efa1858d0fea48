"""Diarization stage: the real offline pyannote pipeline on a synthetic two-voice dialogue, plus unit tests."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from schemas.config import DiarizeConfig
from schemas.records import Segment, SpeakerSegment, Transcript, Word
from tasks.diarize import (
    assign_speakers,
    build_offline_diarization,
    diarize,
    load_diarization_pipeline,
    overlap_regions,
)
from tasks.synth import make_dialogue


def decode16(path: Path) -> np.ndarray:
    raw = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", "16000", "-f", "f32le", "-"],
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(raw, dtype=np.float32)


def speaker_agreement(script: dict, segments: list[SpeakerSegment], duration: float, step: float = 0.01) -> float:
    """Share of single-speaker ground-truth time labelled with (only) the matching speaker, best label mapping."""
    n = int(duration / step) + 1
    truth = np.zeros((n, 2), bool)
    for turn in script["turns"]:
        truth[int(turn["start"] / step) : int(turn["end"] / step), turn["speaker"]] = True
    labels = sorted({s.speaker for s in segments})
    hyp = np.zeros((n, max(2, len(labels))), bool)
    for s in segments:
        hyp[int(s.start / step) : int(s.end / step), labels.index(s.speaker)] = True
    single = truth.sum(1) == 1
    best = 0.0
    for mapping in ((0, 1), (1, 0)):
        hits = sum(
            (hyp[single & truth[:, g], mapping[g]] & ~hyp[single & truth[:, g], mapping[1 - g]]).sum() for g in (0, 1)
        )
        best = max(best, hits / single.sum())
    return best


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_offline_diarization(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, dict]:
    path = tmp_path_factory.mktemp("audio") / "d.wav"
    make_dialogue(path)
    return decode16(path), json.loads(Path(str(path) + ".script.json").read_text())


def test_offline_set_is_loadable_with_provenance(offline: dict[str, str]) -> None:
    from pyannote.audio import Model

    seg = Model.from_pretrained(offline["segmentation"])
    emb = Model.from_pretrained(offline["embedding"])
    assert seg.specifications.duration == 5.0 and len(seg.specifications.classes) == 3
    assert type(emb).__name__ == "GE2EEmbedding" and emb.dimension == 256
    assert "real weights" in offline["segmentation_source"] and "real weights" in offline["embedding_source"]
    for part in ("segmentation", "embedding"):  # each model folder says what it holds, for the manifest
        saved = json.loads((Path(offline[part]) / "PROVENANCE.json").read_text())
        assert saved == {"weights": "real", "source": offline[f"{part}_source"], "sha256": offline[f"{part}_sha256"]}


def test_ge2e_model_reproduces_resemblyzer(offline: dict[str, str]) -> None:
    """Same front end + weights: our torch model must agree with resemblyzer's own VoiceEncoder."""
    import torch
    from pyannote.audio import Model
    from resemblyzer import VoiceEncoder, preprocess_wav

    from tasks.synth import DIALOGUE, SPEEDS, VOICES, speak

    model = Model.from_pretrained(offline["embedding"]).eval()
    encoder = VoiceEncoder("cpu", verbose=False)
    wavs = [preprocess_wav(speak(text, VOICES[spk], SPEEDS[spk], 16_000)) for spk, text in DIALOGUE[:2]]
    with torch.inference_mode():
        ours = [model(torch.from_numpy(w)[None, None])[0].numpy() for w in wavs]
    for wav, emb in zip(wavs, ours, strict=True):
        assert abs(np.linalg.norm(emb) - 1) < 1e-4
        assert float(emb @ encoder.embed_utterance(wav)) > 0.99

    # a mask picks one voice out of a two-voice waveform; an empty mask gives NaN (pipeline drops it)
    both = torch.from_numpy(np.concatenate(wavs))[None, None].repeat(2, 1, 1)
    frames = 400
    first = torch.zeros(2, frames)
    first[0, : int(frames * len(wavs[0]) / (len(wavs[0]) + len(wavs[1]))) - 5] = 1
    with torch.inference_mode():
        masked = model(both, weights=first).numpy()
    assert float(masked[0] @ ours[0]) > 0.98
    assert np.isnan(masked[1]).all()


@pytest.mark.slow
def test_diarize_two_voice_dialogue(offline: dict[str, str], dialogue: tuple[np.ndarray, dict]) -> None:
    audio, script = dialogue
    cfg = DiarizeConfig(
        segmentation=offline["segmentation"], embedding=offline["embedding"], min_speakers=2, max_speakers=2
    )
    pipeline = load_diarization_pipeline(cfg, "cpu")
    t0 = time.perf_counter()
    segments = diarize(audio, pipeline, cfg)
    elapsed = time.perf_counter() - t0
    duration = len(audio) / 16_000
    agreement = speaker_agreement(script, segments, duration)
    print(f"diarized {duration:.1f} s in {elapsed:.1f} s; agreement {agreement:.3f}; {len(segments)} turns")

    assert {s.speaker for s in segments} == {"SPEAKER_00", "SPEAKER_01"}
    assert segments == sorted(segments, key=lambda s: s.start)
    assert all(0 <= s.start < s.end <= duration + 0.1 for s in segments)
    assert agreement >= 0.8  # speed is bench/stages.py's and bench/diarize_step.py's to report


def test_load_needs_a_source() -> None:
    with pytest.raises(ValueError):
        load_diarization_pipeline(DiarizeConfig(pipeline=None), "cpu")
    with pytest.raises(ValueError):
        load_diarization_pipeline(DiarizeConfig(pipeline=None, segmentation="x"), "cpu")


def _transcript(*words: tuple[str, float, float]) -> Transcript:
    ws = [Word(text=t, start=s, end=e) for t, s, e in words]
    return Transcript(language="en", segments=[Segment(start=ws[0].start, end=ws[-1].end, text="", words=ws)])


def test_assign_speakers_by_overlap_and_nearest() -> None:
    segments = [
        SpeakerSegment(start=0.0, end=2.0, speaker="SPEAKER_00"),
        SpeakerSegment(start=1.8, end=4.0, speaker="SPEAKER_01"),
        SpeakerSegment(start=10.0, end=11.0, speaker="SPEAKER_00"),
    ]
    transcript = _transcript(
        ("hello", 0.2, 0.6),  # inside SPEAKER_00
        ("there", 1.7, 2.3),  # 0.3 s with 00, 0.5 s with 01 -> most overlap wins
        ("how", 3.0, 3.4),  # inside SPEAKER_01
        ("are", 4.5, 4.8),  # in no turn: nearest turn (by midpoint) is SPEAKER_01's
        ("you", 9.0, 9.4),  # in no turn: nearest is SPEAKER_00's at 10-11 s
    )
    out = assign_speakers(transcript, segments)
    assert [w.speaker for w in out.words] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_01", "SPEAKER_01", "SPEAKER_00"]
    assert [w.text for w in out.words] == ["hello", "there", "how", "are", "you"]
    assert all(w.speaker is None for w in transcript.words)  # input left untouched


def test_assign_speakers_without_segments_keeps_transcript() -> None:
    transcript = _transcript(("hi", 0.0, 0.5))
    assert assign_speakers(transcript, []) == transcript


def test_overlap_regions() -> None:
    def seg(start: float, end: float, speaker: str) -> SpeakerSegment:
        return SpeakerSegment(start=start, end=end, speaker=speaker)

    assert overlap_regions([]) == []
    assert overlap_regions([seg(0, 2, "A"), seg(2, 4, "B")]) == []  # touching is not overlapping
    assert overlap_regions([seg(2, 5, "B"), seg(0, 3, "A")]) == [(2, 3)]  # input order does not matter
    # three speakers: A+B 1-2, A+B+C 2-3, B+C 3-4 -> one merged region; then A+C 6-7
    segments = [seg(0, 3, "A"), seg(1, 4, "B"), seg(2, 5, "C"), seg(6, 8, "A"), seg(5.5, 7, "C")]
    assert overlap_regions(segments) == [(1, 4), (6, 7)]
    # speaker change inside an overlap keeps one region: A 0-4, B 1-2, C 2-3
    assert overlap_regions([seg(0, 4, "A"), seg(1, 2, "B"), seg(2, 3, "C")]) == [(1, 3)]
