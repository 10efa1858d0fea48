"""Decoding of every format ffmpeg reads, downmixed to mono and resampled, with clear errors."""

import numpy as np
import pytest

from schemas.config import DecodeConfig
from tasks.decode import DecodeError, decode, decode_recording, recording_id, stream
from tasks.synth import speak, write_audio

FORMATS = ["wav", "flac", "mp3", "m4a", "opus", "ogg", "mp4", "mkv", "webm"]


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speak("Decoding test. One two three four five.", "en-us+m3", 160)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_format(tmp_path, speech, fmt) -> None:
    path = tmp_path / f"speech.{fmt}"
    write_audio(path, speech, 22_050)
    audio = decode_recording(path, DecodeConfig())
    expected = len(speech) / 22_050
    audio24 = np.concatenate(list(stream(path, 24_000, 4800)))
    assert audio.audio16.dtype == np.float32 and audio24.dtype == np.float32
    assert audio.audio16.ndim == 1 and audio24.ndim == 1
    # lossy codecs pad a little at the edges; the length must still match to within 0.1 s at each rate
    assert abs(len(audio.audio16) / 16_000 - expected) < 0.1
    assert abs(len(audio24) / 24_000 - expected) < 0.1
    assert abs(audio.duration - len(audio.audio16) / 16_000) < 1e-9
    assert np.abs(audio.audio16).max() > 0.1  # real signal, not silence


@pytest.mark.parametrize("block", [1, 1920, 4096, 10**7])
def test_stream_is_decode_in_blocks(tmp_path, speech, block) -> None:
    path = tmp_path / "speech.mp3"
    write_audio(path, speech, 22_050)
    whole = decode(path, 24_000)
    blocks = list(stream(path, 24_000, block))
    assert all(len(b) == block for b in blocks[:-1]) and 0 < len(blocks[-1]) <= block
    np.testing.assert_array_equal(np.concatenate(blocks), whole)  # the same samples, bit for bit


def test_decoded_audio_is_writable(tmp_path, speech) -> None:
    # torch.from_numpy warns on read-only arrays, so pyannote would copy a 3-hour array if it were read-only
    path = tmp_path / "speech.wav"
    write_audio(path, speech, 22_050)
    assert decode(path, 16_000).flags.writeable


def test_stream_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    with pytest.raises(DecodeError, match="notes.wav"):
        list(stream(bad, 24_000, 1920))


def test_stream_stopped_early_leaves_no_ffmpeg(tmp_path, speech) -> None:
    path = tmp_path / "speech.wav"
    write_audio(path, speech, 22_050)
    blocks = stream(path, 24_000, 1920)
    next(blocks)
    blocks.close()  # the consumer gives up (an encode failed): ffmpeg is killed and reaped, not left blocked
    assert len(list(stream(path, 24_000, 1920))) > 1


def test_stereo_is_downmixed(tmp_path) -> None:
    import soundfile as sf

    t = np.arange(48_000 * 2) / 48_000
    left, right = np.sin(2 * np.pi * 440 * t), np.zeros_like(t)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], 1).astype(np.float32), 48_000)
    audio = decode_recording(tmp_path / "stereo.wav", DecodeConfig())
    assert audio.audio16.ndim == 1 and len(audio.audio16) == 32_000
    assert 0.4 < np.abs(audio.audio16).max() < 0.75  # both channels mixed (ffmpeg scales by 1/sqrt(2)), not just left


def test_undecodable_file_names_file_and_reason(tmp_path) -> None:
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    with pytest.raises(DecodeError, match="notes.wav"):
        decode_recording(bad, DecodeConfig())


def test_too_short_is_rejected(tmp_path, speech) -> None:
    path = tmp_path / "short.wav"
    write_audio(path, speech[: 22_050 // 2], 22_050)
    with pytest.raises(DecodeError, match="shorter than min_duration_s"):
        decode_recording(path, DecodeConfig(min_duration_s=1.0))


def test_recording_id_is_content_addressed(tmp_path, speech) -> None:
    a, b = tmp_path / "ep 1.wav", tmp_path / "copy.of.ep.wav"
    write_audio(a, speech, 22_050)
    b.write_bytes(a.read_bytes())
    ra, rb = recording_id(a), recording_id(b)
    assert ra.split("-")[-1] == rb.split("-")[-1]
    assert "." not in ra + rb and " " not in ra


def test_nan_samples_are_refused_naming_the_file(tmp_path) -> None:
    import soundfile as sf

    audio = np.zeros(16_000 * 3, dtype=np.float32)
    audio[40_000] = np.nan
    path = tmp_path / "broken float.wav"
    sf.write(path, audio, 16_000, subtype="FLOAT")
    with pytest.raises(DecodeError, match="broken float.wav: audio holds NaN"):
        decode(path, 16_000)
