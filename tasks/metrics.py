"""Quality metrics of recordings, turns and windows: computed once at ingest and stored with the data.

Every value the quality gate (tasks/quality.py) compares with a threshold comes from here, and is stored:
per turn in the sample json (`turns[i].metrics`), per window in the json (`metrics`) and as columns of
index.parquet, per recording in recordings.parquet. So a dataset can be filtered again with other thresholds
(`csm-dataprep refilter`) without running any model.

A window's metrics are aggregates of its turns' metrics (`window_metrics`), so a window cut out of another
one (refilter) gets exactly what ingest would have computed for it. A piece of a turn split to fit a window
carries the metrics of the whole turn. SQUIM (optional) is the one window metric measured on the window's
own audio.

Signal metrics work on 20 ms frames of the 16 kHz audio: frame level (dBFS, RMS re full scale 1.0), silent
frames (below `QualityConfig.silence_dbfs`), clipped samples (`clip_level_of`: at or above min(0.99 x the
recording's peak, 0.95), so a resampler's or lossy codec's ringing around a clipped ceiling still counts) and
a blind SNR estimate (the 90th percentile of frame levels over the 10th percentile of the recording's frame
levels).
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from schemas.records import Transcript, Turn

FRAME_S = 0.02
FLOOR_DB = -100.0  # level of digital silence (log of zero)
NGRAM = 3  # word n-grams of the repetition metric
FINGERPRINT_NGRAM = 2  # word n-grams of the transcript fingerprint: one ASR word error breaks only two
COMPRESSION_CHUNK_WORDS = 80  # about one Whisper segment (30 s) of speech
CODE_SHINGLE = 3  # consecutive code-0 frames (240 ms) per shingle of the audio fingerprint
MINHASH_PERMUTATIONS = 128  # similarity estimates within about +-0.04
LSH_BANDS = 32  # 32 bands x 4 rows: a pair at Jaccard 0.7 shares a band with probability 0.9998, at 0.1 with 0.003
SQUIM_FILE = "squim_objective.pt"
SQUIM_HUB = "SQUIM_OBJECTIVE"  # torchaudio.pipelines.SQUIM_OBJECTIVE: weights from download.pytorch.org

# Metrics per turn (the json's turns[i].metrics).
TURN_METRICS = ("duration", "asr_avg_logprob", "asr_no_speech_prob", "compression_ratio", "repeated_ngram_ratio",
                "n_words", "aligned_ratio", "word_score", "chars_per_s", "words_per_s", "level_dbfs",
                "clipping_ratio", "silence_ratio", "snr_db", "overlap_ratio")
# Numeric metrics per window (the json's metrics, and float columns of index.parquet).
WINDOW_METRICS = ("asr_avg_logprob", "asr_no_speech_prob", "compression_ratio", "repeated_ngram_ratio",
                  "aligned_ratio", "word_score", "chars_per_s", "words_per_s", "level_dbfs", "clipping_ratio",
                  "silence_ratio", "snr_db", "overlap_ratio", "language_probability", "squim_stoi", "squim_pesq",
                  "squim_si_sdr", "audio_s")
# Metrics per recording (columns of recordings.parquet).
RECORDING_METRICS = ("level_dbfs", "peak_dbfs", "clipping_ratio", "silence_ratio", "snr_db", "noise_floor_dbfs",
                     "language_probability", "n_speakers")
SQUIM_METRICS = ("squim_stoi", "squim_pesq", "squim_si_sdr")
# Aggregated as the worst turn rather than a duration-weighted mean: one looping turn spoils the window.
_MAX_OVER_TURNS = ("compression_ratio", "repeated_ngram_ratio")


def _db(power: np.ndarray | float) -> np.ndarray | float:
    return 10.0 * np.log10(np.maximum(power, 10 ** (FLOOR_DB / 10)))


def _num(x: Any) -> float | None:
    """A plain float for json and parquet (numpy scalars and NaN out)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


# ---------------------------------------------------------------------------------------------- signal


@dataclass
class Signal:
    """A recording's 20 ms frames: mean power and clipped-sample count per frame, and its noise floor.
    Turn and window signal metrics are slices of it, so the audio is scanned once."""

    sample_rate: int
    frame: int  # samples per frame
    power: np.ndarray  # float64, mean square per frame
    clipped: np.ndarray  # int, samples at the clipping level per frame
    counts: np.ndarray  # int, samples per frame (the last frame may be short)
    peak: float
    clip_level: float
    silence_dbfs: float
    noise_floor_db: float

    @property
    def level_db(self) -> np.ndarray:
        return _db(self.power)

    def frames(self, start: float, end: float) -> slice:
        lo = max(0, int(math.floor(start * self.sample_rate / self.frame)))
        hi = min(len(self.power), int(math.ceil(end * self.sample_rate / self.frame)))
        return slice(lo, max(lo, hi))

    def span_metrics(self, start: float, end: float) -> dict[str, float | None]:
        """Level, clipping, silence and SNR of [start, end) seconds."""
        return self._metrics(self.frames(start, end))

    def _metrics(self, sl: slice) -> dict[str, float | None]:
        power, counts = self.power[sl], self.counts[sl]
        if len(power) == 0:
            return {"level_dbfs": None, "clipping_ratio": None, "silence_ratio": None, "snr_db": None}
        db = _db(power)
        return {
            "level_dbfs": _num(_db(float(np.sum(power * counts) / np.sum(counts)))),
            "clipping_ratio": _num(np.sum(self.clipped[sl]) / np.sum(counts)),
            "silence_ratio": _num(np.mean(db < self.silence_dbfs)),
            "snr_db": _num(np.percentile(db, 90) - self.noise_floor_db),
        }

    def recording_metrics(self) -> dict[str, float | None]:
        m = self._metrics(slice(0, len(self.power)))
        m.update(peak_dbfs=_num(_db(self.peak**2)), noise_floor_dbfs=_num(self.noise_floor_db))
        return m


def clip_level_of(peak: float) -> float:
    """The level at or above which a sample counts as clipped. Audio clipped at full scale piles up at +-1,
    and a resampler or lossy codec rings up to about +4 dB around that ceiling, so for a peak up to 2.0
    everything from 0.95 (or 99% of a lower peak) counts. A decode far above full scale (a multichannel
    downmix, a float source) has no full-scale ceiling: only samples at its own peak count."""
    if peak <= 1e-3:
        return math.inf
    return 0.99 * peak if peak > 2.0 else min(0.99 * peak, 0.95)


def analyse_signal(audio: np.ndarray, sample_rate: int = 16_000, silence_dbfs: float = -50.0,
                   block: int = 1 << 22) -> Signal:
    """Frame powers and clipped-sample counts of mono float audio, in blocks (bounded memory for long files)."""
    frame = max(1, int(round(FRAME_S * sample_rate)))
    n = len(audio)
    peak = 0.0
    for i in range(0, n, block):
        peak = max(peak, float(np.max(np.abs(audio[i : i + block]))) if i < n else 0.0)
    clip_level = clip_level_of(peak)
    block -= block % frame
    powers, clipped, counts = [], [], []
    for i in range(0, n, block):
        x = np.asarray(audio[i : i + block], dtype=np.float64)
        full = len(x) - len(x) % frame
        body = x[:full].reshape(-1, frame)
        powers.append(np.mean(body * body, axis=1))
        clipped.append(np.sum(np.abs(body) >= clip_level, axis=1))
        counts.append(np.full(len(body), frame))
        if full < len(x):  # the recording's last, short frame
            tail = x[full:]
            powers.append(np.array([np.mean(tail * tail)]))
            clipped.append(np.array([np.sum(np.abs(tail) >= clip_level)]))
            counts.append(np.array([len(tail)]))
    power = np.concatenate(powers) if powers else np.zeros(0)
    floor = float(np.percentile(_db(power), 10)) if len(power) else FLOOR_DB
    return Signal(sample_rate, frame, power, np.concatenate(clipped) if clipped else np.zeros(0, int),
                  np.concatenate(counts) if counts else np.zeros(0, int), peak, clip_level, silence_dbfs, floor)


def signal_metrics(audio: np.ndarray, sample_rate: int = 16_000, silence_dbfs: float = -50.0) -> dict:
    """Recording-level signal metrics of a whole waveform: level, peak, clipping, silence, SNR (its own 90th
    over 10th frame-level percentile) and noise floor."""
    return analyse_signal(audio, sample_rate, silence_dbfs).recording_metrics()


# ---------------------------------------------------------------------------------------------- text


def words_of(text: str) -> list[str]:
    """Lowercase word tokens (letters and digits of any script) for repetition and fingerprints."""
    return re.findall(r"\w+", text.lower())


def compression_ratio(text: str) -> float | None:
    """zlib compression ratio of the text (bytes / compressed bytes), as Whisper's hallucination check; a long
    text is measured in pieces of COMPRESSION_CHUNK_WORDS words (a Whisper segment's worth) and the highest
    piece counts, because natural text compresses better the longer it gets."""
    words = text.split()
    if not words:
        return None
    ratios = []
    for i in range(0, len(words), COMPRESSION_CHUNK_WORDS):
        data = " ".join(words[i : i + COMPRESSION_CHUNK_WORDS]).encode("utf-8")
        ratios.append(len(data) / len(zlib.compress(data)))
    return max(ratios)


def repeated_ngram_ratio(text: str, n: int = NGRAM) -> float:
    """Share of the text's word n-grams that repeat an earlier one (0: none; near 1: one phrase looping)."""
    words = words_of(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def turn_confidence(turn: Turn, transcript: Transcript) -> tuple[float | None, float | None]:
    """Duration-weighted ASR mean log-probability and no-speech probability of the segments under a turn."""
    weights, logprob, no_speech, ns_weights = 0.0, 0.0, 0.0, 0.0
    for seg in transcript.segments:
        overlap = min(seg.end, turn.end) - max(seg.start, turn.start)
        if overlap <= 0 and not (seg.start <= turn.start and turn.end <= seg.end):
            continue
        overlap = max(overlap, 1e-6)  # a zero-length turn inside a segment still takes the segment's values
        if seg.avg_logprob is not None:
            weights += overlap
            logprob += overlap * seg.avg_logprob
        if seg.no_speech_prob is not None:
            ns_weights += overlap
            no_speech += overlap * seg.no_speech_prob
    return (logprob / weights if weights else None), (no_speech / ns_weights if ns_weights else None)


def overlap_seconds(start: float, end: float, regions: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, e) - max(start, s)) for s, e in regions)


def turn_metrics(turn: Turn, transcript: Transcript, sig: Signal | None,
                 overlaps: list[tuple[float, float]]) -> dict[str, float | None]:
    """Every metric of one turn (see TURN_METRICS)."""
    duration = max(0.0, turn.end - turn.start)
    logprob, no_speech = turn_confidence(turn, transcript)
    words = [w for w in turn.words if w.text.strip()]
    scored = [w.score for w in words if w.score is not None]
    chars = sum(1 for c in turn.text if c.isalnum())
    m: dict[str, float | None] = {
        "duration": duration,
        "asr_avg_logprob": _num(logprob),
        "asr_no_speech_prob": _num(no_speech),
        "compression_ratio": _num(compression_ratio(turn.text)),
        "repeated_ngram_ratio": repeated_ngram_ratio(turn.text),
        "n_words": float(len(words) if words else len(turn.text.split())),
        "aligned_ratio": len(scored) / len(words) if words else None,
        "word_score": _num(np.mean(scored)) if scored else None,
        "chars_per_s": chars / duration if duration > 0 else None,
        "words_per_s": len(turn.text.split()) / duration if duration > 0 else None,
        "overlap_ratio": overlap_seconds(turn.start, turn.end, overlaps) / duration if duration > 0 else 0.0,
    }
    m.update(sig.span_metrics(turn.start, turn.end) if sig is not None else
             {"level_dbfs": None, "clipping_ratio": None, "silence_ratio": None, "snr_db": None})
    return m


def count_speakers(transcript: Transcript) -> int:
    """Speakers diarization attributed words to."""
    return len({w.speaker for w in transcript.words if w.speaker})


# ---------------------------------------------------------------------------------------------- windows


def window_metrics(turn_metrics: list[dict[str, Any]], durations: list[float],
                   recording: dict[str, Any] | None = None) -> dict[str, float | None]:
    """A window's metrics from its turns': duration-weighted means (levels in the power domain), the worst
    turn for the hallucination metrics; language probability from the recording."""
    out: dict[str, float | None] = {}
    for key in WINDOW_METRICS:
        if key in SQUIM_METRICS or key in ("language_probability", "audio_s"):
            continue
        pairs = [(m.get(key), d) for m, d in zip(turn_metrics, durations, strict=True) if m.get(key) is not None]
        if not pairs:
            out[key] = None
        elif key in _MAX_OVER_TURNS:
            out[key] = max(v for v, _ in pairs)
        else:
            weight = sum(d for _, d in pairs)
            if key == "level_dbfs":
                power = sum(10 ** (v / 10) * d for v, d in pairs) / weight if weight > 0 else 0.0
                out[key] = _num(_db(power))
            else:
                out[key] = sum(v * d for v, d in pairs) / weight if weight > 0 else _num(np.mean([v for v, _ in pairs]))
    out["language_probability"] = (recording or {}).get("language_probability")
    return out


# ---------------------------------------------------------------------------------------------- fingerprints

_rng = np.random.default_rng(0x5EED)
_PERM_A = _rng.integers(1, 2**63, MINHASH_PERMUTATIONS, dtype=np.uint64) | np.uint64(1)
_PERM_B = _rng.integers(0, 2**63, MINHASH_PERMUTATIONS, dtype=np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads shingle ids over 64 bits."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def minhash(shingles: np.ndarray) -> np.ndarray | None:
    """MinHash signature (MINHASH_PERMUTATIONS uint32) of a set of 64-bit shingle ids; None if empty."""
    if len(shingles) == 0:
        return None
    x = _mix64(np.unique(np.asarray(shingles, dtype=np.uint64)))
    with np.errstate(over="ignore"):
        h = (_PERM_A[:, None] * x[None, :] + _PERM_B[:, None]) >> np.uint64(32)
    return h.min(axis=1).astype(np.uint32)


def signature(value: Any) -> np.ndarray | None:
    """A stored signature (index.parquet keeps 128 little-endian uint32 as bytes) as a uint32 array."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        sig = np.frombuffer(value, dtype="<u4").astype(np.uint32)
    else:
        sig = np.asarray(value, dtype=np.uint32)
    return sig if len(sig) == MINHASH_PERMUTATIONS else None


def signature_bytes(value: Any) -> bytes | None:
    sig = signature(value)
    return None if sig is None else sig.astype("<u4").tobytes()


def text_fingerprint(texts: list[str]) -> np.ndarray | None:
    """MinHash of the word FINGERPRINT_NGRAM-grams of a window's transcript (all its turns, in order)."""
    words = words_of(" ".join(texts))
    if not words:
        return None
    n = FINGERPRINT_NGRAM
    grams = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))]
    ids = np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams],
                   dtype=np.uint64)
    return minhash(ids)


def codes_fingerprint(codes: np.ndarray) -> np.ndarray | None:
    """MinHash of the shingles of CODE_SHINGLE consecutive codebook-0 codes of a window's frames."""
    c0 = np.asarray(codes)[:, 0].astype(np.uint64) if len(codes) else np.zeros(0, np.uint64)
    if len(c0) < CODE_SHINGLE:
        return None
    ids = np.zeros(len(c0) - CODE_SHINGLE + 1, dtype=np.uint64)
    for k in range(CODE_SHINGLE):
        ids = (ids << np.uint64(11)) | c0[k : len(c0) - CODE_SHINGLE + 1 + k]
    return minhash(ids)


def audio_hash(codes: np.ndarray) -> str:
    """Exact identity of a window's audio: sha256 (first 32 hex digits) of its Mimi codes."""
    return hashlib.sha256(np.ascontiguousarray(codes, dtype=np.int16).tobytes()).hexdigest()[:32]


def similarity(a: list[int] | np.ndarray | None, b: list[int] | np.ndarray | None) -> float:
    """Estimated Jaccard similarity of two MinHash signatures (0 if either is missing)."""
    if a is None or b is None or len(a) != len(b) or len(a) == 0:
        return 0.0
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def _band_hashes(sig: np.ndarray) -> np.ndarray:
    """One 64-bit hash per LSH band (band number mixed in), so all bands share one lookup table; for a stack
    of signatures (n, MINHASH_PERMUTATIONS), an (n, LSH_BANDS) array."""
    rows = sig.reshape(*sig.shape[:-1], LSH_BANDS, -1).astype(np.uint64)
    h = np.broadcast_to(np.arange(LSH_BANDS, dtype=np.uint64), rows.shape[:-1])
    for r in range(rows.shape[-1]):
        h = _mix64(h ^ (rows[..., r] << np.uint64(32 - r)))  # a row value moved by its position in the band
    return h


class DuplicateIndex:
    """Near-duplicate lookup of windows by their fingerprints (MinHash + LSH bands), across the dataset.

    Fed with the dataset's earlier windows (index.parquet) and each window written since, so a recording is
    compared with every other recording of the dataset, earlier runs included (never with itself). What was
    loaded is frozen into sorted numpy arrays (a few hundred bytes a window); windows added during the run go
    into a dict until the next `freeze`.
    """

    KINDS = ("text", "codes")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.recordings: list[str] = []
        self.sigs: dict[str, list[np.ndarray | None]] = {k: [] for k in self.KINDS}
        self.exact: dict[str, int] = {}
        empty = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
        self._frozen = dict.fromkeys(self.KINDS, empty)  # band hash -> window, sorted by hash
        self._recent = dict.fromkeys(self.KINDS, empty)  # the same for windows added since `freeze`, smaller
        self._unhashed: list[int] = []  # windows whose bands are not in a table yet

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, recording_id: str, fp_text: Any = None, fp_codes: Any = None,
            hash_: str | None = None) -> None:
        """Add a window. Its bands are hashed with the others' at the next query or freeze: numpy over all
        of them at once costs a few microseconds a window, one at a time a hundred."""
        i = len(self.keys)
        self.keys.append(key)
        self.recordings.append(recording_id)
        self.sigs["text"].append(signature(fp_text))
        self.sigs["codes"].append(signature(fp_codes))
        self._unhashed.append(i)
        if hash_:
            self.exact.setdefault(hash_, i)

    def add_row(self, row: dict[str, Any]) -> None:
        """An index.parquet row (rows written before fingerprints existed add nothing)."""
        if row.get("fp_text") is not None or row.get("fp_codes") is not None or row.get("audio_hash"):
            self.add(row["key"], row["recording_id"], row.get("fp_text"), row.get("fp_codes"), row.get("audio_hash"))

    def freeze(self) -> None:
        """Merge every table into the sorted arrays (after loading a dataset's index)."""
        self._hash_bands()
        for kind in self.KINDS:
            self._frozen[kind] = _merge(self._frozen[kind], self._recent[kind])
            self._recent[kind] = (np.zeros(0, np.uint64), np.zeros(0, np.int64))

    def _hash_bands(self) -> None:
        """Put the bands of the windows added since the last call into the `recent` tables; those move into
        the frozen ones once they are a quarter of their size, so each band is re-sorted a few times at most."""
        if not self._unhashed:
            return
        for kind in self.KINDS:
            ids = [i for i in self._unhashed if self.sigs[kind][i] is not None]
            if not ids:
                continue
            bands = _band_hashes(np.stack([self.sigs[kind][i] for i in ids]))
            new = (bands.ravel(), np.repeat(np.asarray(ids, np.int64), bands.shape[1]))
            recent = _merge(self._recent[kind], new)
            if len(recent[0]) > len(self._frozen[kind][0]) // 4:
                self._frozen[kind], recent = _merge(self._frozen[kind], recent), (new[0][:0], new[1][:0])
            self._recent[kind] = recent
        self._unhashed = []

    def _candidates(self, kind: str, sig: np.ndarray) -> set[int]:
        self._hash_bands()
        bands = _band_hashes(sig)
        found: set[int] = set()
        for hashes, owners in (self._frozen[kind], self._recent[kind]):
            if len(hashes):
                lo, hi = np.searchsorted(hashes, bands, "left"), np.searchsorted(hashes, bands, "right")
                for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
                    found.update(owners[a:b].tolist())
        return found

    def query(self, recording_id: str, fp_text: Any = None, fp_codes: Any = None,
              hash_: str | None = None) -> dict[str, tuple[float, str]]:
        """The most similar window of another recording, per kind: {"exact"|"text"|"codes": (similarity, key)}."""
        found: dict[str, tuple[float, str]] = {}
        if hash_ and hash_ in self.exact and self.recordings[self.exact[hash_]] != recording_id:
            found["exact"] = (1.0, self.keys[self.exact[hash_]])
        for kind, fp in (("text", fp_text), ("codes", fp_codes)):
            sig = signature(fp)
            if sig is None:
                continue
            best: tuple[float, str] | None = None
            for i in self._candidates(kind, sig):
                if self.recordings[i] == recording_id:
                    continue
                s = similarity(sig, self.sigs[kind][i])
                if best is None or s > best[0]:
                    best = (s, self.keys[i])
            if best is not None:
                found[kind] = best
        return found


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two (hashes, owners) tables as one, sorted by hash (owners in insertion order within a hash)."""
    if not len(b[0]):
        return a
    hashes, owners = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])
    order = np.argsort(hashes, kind="stable")
    return hashes[order], owners[order]


# ---------------------------------------------------------------------------------------------- SQUIM

_SQUIM: dict[tuple[str, str], Any] = {}


def build_offline_squim(dest: str | Path, seed: int = 0) -> str:
    """A random-initialised SQUIM objective model (torchaudio.models.squim_objective_base, the architecture of
    torchaudio.pipelines.SQUIM_OBJECTIVE, whose weights download from a hub): its state_dict in
    dest/squim-objective-random/squim_objective.pt, with a PROVENANCE.json saying it is untrained."""
    import json

    import torch
    import torchaudio
    from torchaudio.models import squim_objective_base

    out = Path(dest) / "squim-objective-random"
    if (out / SQUIM_FILE).exists() and (out / "PROVENANCE.json").exists():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tmp = out / f".{SQUIM_FILE}.tmp"
    torch.save(squim_objective_base().state_dict(), tmp)
    tmp.replace(out / SQUIM_FILE)
    (out / "PROVENANCE.json").write_text(json.dumps({
        "weights": "random (untrained): torchaudio squim_objective_base(); STOI/PESQ/SI-SDR estimates are meaningless",
        "source": f"built by tasks.metrics.build_offline_squim(seed={seed}), torchaudio {torchaudio.__version__}",
        "stands_in_for": "torchaudio.pipelines.SQUIM_OBJECTIVE (trained on DNS 2020; weights from download.pytorch.org)",
    }, indent=1) + "\n")
    return str(out)


def load_squim(name: str, device: str = "cpu") -> Any:
    """The SQUIM objective model: `SQUIM_OBJECTIVE` for torchaudio's trained pipeline (downloads its weights),
    else a local state_dict file (or a folder holding squim_objective.pt) for squim_objective_base()."""
    import torch

    key = (name, device)
    if key not in _SQUIM:
        if name == SQUIM_HUB:
            import torchaudio

            model = torchaudio.pipelines.SQUIM_OBJECTIVE.get_model()
        else:
            from torchaudio.models import squim_objective_base

            path = Path(name)
            path = path / SQUIM_FILE if path.is_dir() else path
            model = squim_objective_base()
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        _SQUIM.clear()
        _SQUIM[key] = model.to(device).eval()
    return _SQUIM[key]


def squim_scores(model: Any, audio16: np.ndarray, device: str = "cpu") -> dict[str, float | None]:
    """SQUIM's non-intrusive STOI, PESQ and SI-SDR estimates of 16 kHz speech (None for under 0.5 s)."""
    import torch

    if len(audio16) < 8000:
        return dict.fromkeys(SQUIM_METRICS)
    wave = torch.from_numpy(np.ascontiguousarray(audio16, dtype=np.float32)).reshape(1, -1).to(device)
    with torch.inference_mode():
        stoi, pesq, si_sdr = model(wave)
    return {"squim_stoi": _num(stoi.item()), "squim_pesq": _num(pesq.item()), "squim_si_sdr": _num(si_sdr.item())}


def window_audio(audio16: np.ndarray, spans: list[tuple[float, float]], max_s: float,
                 sample_rate: int = 16_000) -> np.ndarray:
    """The window's turns' audio, concatenated, at most `max_s` seconds (from its start)."""
    parts, left = [], int(max_s * sample_rate)
    for start, end in spans:
        if left <= 0:
            break
        piece = audio16[max(0, int(start * sample_rate)) : max(0, int(end * sample_rate))][:left]
        parts.append(piece)
        left -= len(piece)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
