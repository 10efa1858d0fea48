"""Synthetic two-speaker dialogue from espeak-ng: the demo input and the tests' speech.

Generated at set-up time (never committed as a binary): two voices, pauses between turns, one overlap.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

DIALOGUE: list[tuple[int, str]] = [
    (0, "Welcome back to the show. Today we are talking about how to build a large speech dataset."),
    (1, "Thanks for having me. It is a topic I have been thinking about for a long time."),
    (0, "So where does one even start? Do you begin with the audio or with the transcripts?"),
    (1, "You start with the audio. Podcasts are a great source, because people talk to each other naturally."),
    (0, "And then you need to know who is speaking, and when."),
    (1, "Exactly. Speaker diarization tells you that. Then you align every word to the audio."),
    (0, "That sounds like a lot of computation for a million hours."),
    (1, "It is, but modern graphics cards make it affordable. You batch everything you can."),
    (0, "What about the quality of the recordings?"),
    (1, "You filter out noisy segments and bad transcripts. Keep only clean conversational speech."),
    (0, "Right, right. And how long should each training example be?"),
    (1, "About two minutes of dialogue, so the model learns how a conversation flows over many turns."),
    (0, "Fascinating. Thank you so much for joining us today."),
    (1, "It was a pleasure. Thanks for having me on the show."),
]
VOICES = ("en-us+m3", "en-gb+f4")
SPEEDS = (165, 150)


def speak(text: str, voice: str, speed: int, sample_rate: int = 22_050) -> np.ndarray:
    """One utterance from espeak-ng as float32 mono at `sample_rate`."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "u.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True, capture_output=True)
        audio, sr = sf.read(wav, dtype="float32")
    if sr != sample_rate:  # espeak-ng speaks at 22.05 kHz; resample only if asked for another rate
        idx = np.linspace(0, len(audio) - 1, int(len(audio) * sample_rate / sr))
        audio = np.interp(idx, np.arange(len(audio)), audio).astype(np.float32)
    return audio


def make_dialogue(
    path: str | Path,
    lines: list[tuple[int, str]] = DIALOGUE,
    repeat: int = 1,
    pause_s: float = 0.6,
    overlap_at: int = 3,
    sample_rate: int = 22_050,
    seed: int = 0,
    voices: tuple[str, str] = VOICES,
    speeds: tuple[int, int] = SPEEDS,
) -> dict:
    """Write a two-voice dialogue to `path` (format from its suffix, via ffmpeg) and return its script.

    The script (speaker, text, start, end per line) is the ground truth the tests compare against. The line
    at index `overlap_at` starts 0.8 s before the previous one ends, so the recording holds one overlap.
    """
    rng = np.random.default_rng(seed)
    turns, pieces, t = [], [], 0.0
    for r in range(repeat):
        for i, (spk, text) in enumerate(lines):
            audio = speak(text, voices[spk], speeds[spk], sample_rate)
            start = t if not (r == 0 and i == overlap_at) else max(0.0, t - pause_s - 0.8)
            pieces.append((int(start * sample_rate), audio))
            end = start + len(audio) / sample_rate
            turns.append({"speaker": spk, "text": text, "start": round(start, 3), "end": round(end, 3)})
            t = max(t, end) + pause_s + float(rng.uniform(0, 0.4))
    mix = np.zeros(int(t * sample_rate) + 1, dtype=np.float32)
    for offset, audio in pieces:
        mix[offset : offset + len(audio)] += audio
    mix += rng.normal(0, 1e-3, len(mix)).astype(np.float32)  # a little room noise, as real recordings have
    mix = 0.9 * mix / max(1e-6, float(np.abs(mix).max()))
    write_audio(path, mix, sample_rate)
    script = {"sample_rate": sample_rate, "duration": len(mix) / sample_rate, "turns": turns}
    Path(str(path) + ".script.json").write_text(json.dumps(script, indent=1))
    return script


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write float32 mono audio in the format the suffix names (wav, flac, mp3, m4a, opus, ogg, mkv, mp4...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "a.wav"
        sf.write(wav, audio, sample_rate, subtype="FLOAT")
        cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav)]
        if path.suffix in (".mp4", ".mkv", ".webm", ".mov"):  # video containers: add a tiny black video track
            cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "color=c=black:s=32x32:r=5",
                   "-i", str(wav), "-shortest", "-map", "0:v", "-map", "1:a"]
            if path.suffix == ".webm":
                cmd += ["-c:v", "libvpx", "-c:a", "libopus"]
            else:
                cmd += ["-c:v", "mpeg4", "-c:a", "aac"]
        subprocess.run([*cmd, str(path)], check=True)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    print(json.dumps(make_dialogue(a.out, repeat=a.repeat)["duration"]))
