"""Quality metrics, filters, the seconds accounting, the report and refilter.

Fast tests call the metric and rule functions directly (duplicates against an earlier run: through the
DatasetWriter and index.parquet). The slow ones share one real ingest run (offline models) over short
generated files: each bad file must be rejected for its own reason, the dialogue kept and a re-encoded copy
of it rejected as a duplicate; then the report and refilter run on that dataset.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from schemas.config import QualityConfig, ShardConfig
from schemas.records import Reject, Segment, Transcript, Turn, Window, WindowTurn, Word
from tasks import metrics as m
from tasks import quality

ROOT = Path(__file__).resolve().parents[1]
SR = 16_000


# ---------------------------------------------------------------------------------------------- signal


def speechlike(seconds: float = 6.0, seed: int = 0) -> np.ndarray:
    """Syllable-like bursts of noise (phrases with pauses) over faint room noise, peak 0.9."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    envelope = (np.sin(2 * np.pi * 3 * t) > 0.2) * (np.sin(2 * np.pi * 0.4 * t) > -0.3)
    x = envelope * rng.normal(0, 1, len(t)) * (0.3 + np.sin(2 * np.pi * 5 * t) ** 2)
    x = x + rng.normal(0, 1e-4, len(t))
    return (0.9 * x / np.abs(x).max()).astype(np.float32)


def test_signal_metrics_tell_noise_silence_clipping_from_speech() -> None:
    clean = m.signal_metrics(speechlike())
    assert clean["snr_db"] > 30 and clean["clipping_ratio"] < 1e-4 and 0.1 < clean["silence_ratio"] < 0.8
    noise = m.signal_metrics(np.random.default_rng(1).normal(0, 0.1, 4 * SR).astype(np.float32))
    assert noise["snr_db"] < 3 and noise["silence_ratio"] == 0
    silence = m.signal_metrics(np.zeros(4 * SR, np.float32))
    assert silence["silence_ratio"] == 1.0 and silence["level_dbfs"] == m.FLOOR_DB
    clipped = m.signal_metrics(np.clip(speechlike() * 8, -1, 1))
    assert clipped["clipping_ratio"] > 0.05
    # each rule fires on its own file, in the order the gate checks them
    q = QualityConfig()
    assert quality.check_signal("r", "s", clean, 6.0, q) == []
    assert [r.rule for r in quality.check_signal("r", "s", noise, 4.0, q)] == ["too_noisy"]
    assert [r.rule for r in quality.check_signal("r", "s", silence, 4.0, q)] == ["mostly_silence"]
    (r,) = quality.check_signal("r", "s", clipped, 6.0, q)
    assert (r.rule, r.level, r.threshold, r.seconds) == ("clipped", "recording", 0.001, 6.0)


def test_span_metrics_are_slices_of_one_scan() -> None:
    x = speechlike(8.0)
    x[4 * SR : 6 * SR] = 0  # two seconds of digital silence
    sig = m.analyse_signal(x, SR, -50.0)
    assert sig.span_metrics(4.0, 6.0)["silence_ratio"] == 1.0
    assert sig.span_metrics(0.0, 2.0)["silence_ratio"] < 0.8
    assert sig.span_metrics(3.0, 3.0)["level_dbfs"] is None
    # blocks of any size give the same frames
    small = m.analyse_signal(x, SR, -50.0, block=10_000)
    np.testing.assert_allclose(small.power, sig.power)


# ---------------------------------------------------------------------------------------------- text

NATURAL = ("So where does one even start? Do you begin with the audio or with the transcripts? You start with "
           "the audio. Podcasts are a great source, because people talk to each other naturally. And then you "
           "need to know who is speaking, and when. Exactly. Speaker diarization tells you that. Then you align "
           "every word to the audio. That sounds like a lot of computation for a million hours. It is, but "
           "modern graphics cards make it affordable. You batch everything you can.")
LOOP = " ".join(["I think that is right."] * 10)
NATO = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa "
        "quebec romeo sierra tango uniform victor whiskey xray yankee zulu")


def test_hallucination_metrics() -> None:
    assert m.compression_ratio(NATURAL) < 2.4 < m.compression_ratio(LOOP)
    assert m.compression_ratio(" ".join([NATURAL] * 6)) < 2.4 * 1.2  # long natural text is measured in pieces
    assert m.repeated_ngram_ratio(NATURAL) < 0.1 < 0.5 < m.repeated_ngram_ratio(LOOP)
    assert m.compression_ratio("") is None and m.repeated_ngram_ratio("Yes.") == 0.0


def _turn(text: str, start: float, end: float, speaker: str = "A", scored: bool = True) -> Turn:
    words = text.split()
    step = (end - start) / len(words)
    return Turn(speaker=speaker, start=start, end=end, text=text,
                words=[Word(text=w, start=start + i * step, end=start + (i + 1) * step, score=0.9 if scored else None,
                            speaker=speaker) for i, w in enumerate(words)])


def test_turn_rules_name_the_rule_value_and_threshold() -> None:
    turns = [
        _turn("So where does one even start with all of this", 0.0, 3.0),  # kept
        _turn(LOOP, 3.5, 16.0),  # hallucination
        _turn(NATO, 17.0, 18.0),  # 130 letters in 1 s: too fast
        _turn("Well", 19.0, 24.0),  # 4 letters in 5 s: too slow
        _turn("these words were never timed by the aligner", 25.0, 28.0, scored=False),
        _turn("and a short one", 29.0, 29.1),
    ]
    transcript = Transcript(language="en", segments=[Segment(start=0, end=30, text="", avg_logprob=-0.2,
                                                             no_speech_prob=0.01)])
    sig = m.analyse_signal(speechlike(30.0), SR, -50.0)
    kept, rejects = quality.filter_turns("rec", "file:///rec.wav", turns, transcript, QualityConfig(), sig, [])
    assert [t.start for t in kept] == [0.0]
    assert set(kept[0].extra["metrics"]) == set(m.TURN_METRICS)
    got = {r.start: (r.rule, r.level) for r in rejects}
    assert got == {3.5: ("compression_ratio", "turn"), 17.0: ("too_fast", "turn"), 19.0: ("too_slow", "turn"),
                   25.0: ("low_alignment", "turn"), 29.0: ("too_short", "turn")}
    fast = next(r for r in rejects if r.rule == "too_fast")
    assert fast.value == pytest.approx(sum(c.isalnum() for c in NATO)) and fast.threshold == 30.0 and "max_chars_per_s" in fast.reason
    # a threshold of None turns its rule off
    kept, _ = quality.filter_turns("rec", "s", turns, transcript, QualityConfig(max_chars_per_s=None), sig, [])
    assert 17.0 in [t.start for t in kept]


def _window(turns: list[tuple[int, float, float]], rec: str = "rec", overlap: float = 0.0) -> Window:
    wturns = [WindowTurn(speaker=s, text=f"turn number {i} of the window", start=a, end=b, text_tokens=3,
                         frames=max(1, int(np.ceil((b - a) * 12.5))), source_speaker=f"S{s}",
                         metrics={"duration": b - a, "snr_db": 40.0, "clipping_ratio": 0.0, "overlap_ratio": overlap})
              for i, (s, a, b) in enumerate(turns)]
    return Window(recording_id=rec, window=0, source="file:///rec.wav", turns=wturns,
                  n_positions=sum(t.text_tokens + t.frames + 1 for t in wturns))


def test_window_rules_dialogue_and_overlap() -> None:
    mono, duo, busy = _window([(0, 0, 3), (0, 4, 6)]), _window([(0, 0, 3), (1, 4, 6)]), \
        _window([(0, 0, 3), (1, 2, 6)], overlap=0.5)
    kept, rejects = quality.filter_windows([mono, duo, busy], QualityConfig(require_dialogue=True))
    assert [r.rule for r in rejects] == ["single_speaker", "overlap"]
    assert rejects[0].value == 1.0 and rejects[0].threshold == 2.0
    assert len(kept) == 1 and kept[0].window == 0  # renumbered
    assert len(quality.filter_windows([mono], QualityConfig())[0]) == 1  # monologue is fine by default
    assert quality.check_speakers("r", "s", 1, 10.0, QualityConfig(require_dialogue=True))[0].rule == "single_speaker"


def test_language_rule() -> None:
    q = QualityConfig(allowed_languages=["en"], min_language_probability=0.5)
    assert quality.check_language("r", "s", "en", 0.9, 5.0, q) == []
    assert quality.check_language("r", "s", "de", 0.9, 5.0, q)[0].rule == "language"
    assert quality.check_language("r", "s", "en", 0.3, 5.0, q)[0].rule == "low_language_probability"
    assert quality.check_language("r", "s", "de", 0.3, 5.0, QualityConfig()) == []  # None = every language


# ---------------------------------------------------------------------------------------------- duplicates


def test_fingerprints_and_duplicate_index() -> None:
    words = NATURAL.split()
    edited = " ".join(w if i != 20 else "podcasting" for i, w in enumerate(words))
    a, b = m.text_fingerprint([NATURAL]), m.text_fingerprint([edited])
    other = m.text_fingerprint(["Fascinating. Thank you so much for joining us today, it was a pleasure to be "
                                "on the show and talk about conversational speech models"])
    assert m.similarity(a, a) == 1.0 and m.similarity(a, b) > 0.8 and m.similarity(a, other) < 0.2
    codes = np.random.default_rng(0).integers(0, 2048, (300, 32))
    assert m.similarity(m.codes_fingerprint(codes), m.codes_fingerprint(codes.copy())) == 1.0
    index = m.DuplicateIndex()
    index.add("x_w00000", "x", a, m.codes_fingerprint(codes), m.audio_hash(codes))
    assert index.query("x", b) == {}  # never a duplicate of itself
    found = index.query("y", b, None, m.audio_hash(codes))
    assert found["exact"] == (1.0, "x_w00000") and found["text"][0] > 0.8
    assert index.query("y", other).get("text", (0, ""))[0] < 0.5


def test_duplicates_are_found_across_runs(tmp_path) -> None:
    """The writer loads earlier runs' fingerprints from index.parquet; windows written this run count too."""
    from tasks.shards import DatasetWriter, window_sample

    def window(rec: str, text: str) -> tuple[Window, np.ndarray]:
        w = _window([(0, 0.0, 2.0), (1, 2.5, 4.0)], rec)
        w.turns[0].text, w.turns[1].text = text, "and that is the end of it"
        w.turns[0].tokens, w.turns[1].tokens = [1, 2, 3], [4, 5, 6]
        codes = np.random.default_rng(len(rec)).integers(0, 2048, (100, 32))
        w.extra["fingerprint"] = quality.fingerprint(w, window_sample(w, codes)["codes.npy"])
        return w, codes

    root = tmp_path / "ds"
    writer = DatasetWriter(root, ShardConfig())
    w, codes = window("first", NATURAL)
    writer.write(w, window_sample(w, codes))
    # a second recording in the same run already sees the first
    dup, _ = window("second", NATURAL)
    assert quality.duplicate_of(dup.extra["fingerprint"], "second", writer.dedupe, QualityConfig())[1] > 0.8
    writer.add_recording({"recording_id": "first", "source": "s", "status": "kept", "duration": 4.0, "windows": 1}, [])
    writer.publish({"dataset": "t"})
    row = pq.read_table(root / "index.parquet").to_pylist()[0]
    assert len(row["fp_text"]) == 4 * m.MINHASH_PERMUTATIONS and row["audio_hash"]  # uint32 as bytes
    later = DatasetWriter(root, ShardConfig())  # a later run
    kept, rejects = quality.drop_duplicates([dup], lambda w: codes, later.dedupe, QualityConfig())
    assert kept == [] and rejects[0].rule == "duplicate" and rejects[0].level == "window"
    new, _ = window("third", "Something else entirely: a recipe for bread with flour, water, salt and time")
    kept, rejects = quality.drop_duplicates([new], lambda w: np.zeros((100, 32), int), later.dedupe, QualityConfig())
    assert len(kept) == 1 and rejects == []
    later.abort()


# ---------------------------------------------------------------------------------------------- seconds


@pytest.mark.parametrize("seed", range(10))
def test_settle_accounts_every_second_once(seed: int) -> None:
    rng = random.Random(seed)
    duration = 120.0
    spans, t = [], rng.uniform(0, 3)
    while t < duration - 2:
        d = rng.uniform(0.2, 8)
        spans.append((t, min(duration + 1, t + d)))  # the last may run past the end
        t += d + rng.uniform(-1.0, 2.0)  # negative: overlapping turns
    windows, rejects, current = [], [], []
    for s, e in spans:
        fate = rng.random()
        if fate < 0.6:
            current.append((rng.randint(0, 1), s, e))
            continue
        if current:
            windows.append(_window(current))
            current = []
        r = Reject(recording_id="rec", source="s", stage="quality", level="turn", reason="x", rule="r", start=s, end=e)
        rejects.append(r)
    if current:
        windows.append(_window(current))
    rejects = quality.settle("rec", "s", duration, windows, rejects)
    kept = sum(w.extra["metrics"]["audio_s"] for w in windows)
    assert kept + sum(r.seconds for r in rejects) == pytest.approx(duration, abs=1e-9)
    assert all(r.seconds >= 0 for r in rejects) and sum(r.rule == "untranscribed" for r in rejects) <= 1
    # overlapping turns count once: kept time never exceeds the union of the kept turns
    assert kept <= sum(w.duration for w in windows) + 1e-9


def test_settle_leaves_a_whole_recording_reject_alone() -> None:
    (r,) = quality.check_signal("r", "s", {"snr_db": 1.0}, 9.5, QualityConfig())
    assert quality.settle("r", "s", 9.5, [], [r]) == [r] and r.seconds == 9.5


def test_every_threshold_documents_its_default() -> None:
    for name, field in QualityConfig.model_fields.items():
        assert field.description and len(field.description) > 30, name
    rules = {r.threshold for rs in quality.RULES_BY_LEVEL.values() for r in rs}
    assert rules - {"require_dialogue"} <= set(QualityConfig.model_fields)


# ---------------------------------------------------------------------------------------------- end to end

FILES = {  # name -> (level, rule) it must be rejected with; None: kept
    "a-dialogue.wav": None,
    "b-noise.wav": ("recording", "too_noisy"),
    "c-silence.wav": ("recording", "mostly_silence"),
    "d-clipped.wav": ("recording", "clipped"),
    "e-loop.wav": ("turn", {"compression_ratio", "repeated_ngrams"}),
    "f-copy.opus": ("window", "duplicate"),  # the dialogue re-encoded (lossy, quieter): a duplicate
}


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="session")
def quality_run(tmp_path_factory, offline_models, prefect_home) -> dict:
    from tasks.synth import DIALOGUE, make_dialogue, speak, write_audio

    inputs = tmp_path_factory.mktemp("quality-inputs")
    script = make_dialogue(inputs / "a-dialogue.wav", lines=DIALOGUE[:4], seed=1)
    rng = np.random.default_rng(0)
    write_audio(inputs / "b-noise.wav", rng.normal(0, 0.1, 4 * SR).astype(np.float32), SR)
    write_audio(inputs / "c-silence.wav", np.zeros(4 * SR, np.float32), SR)
    loud = speak("This recording is far too loud. Every word hits the ceiling.", "en-us+m3", 165)
    write_audio(inputs / "d-clipped.wav", np.clip(loud * 12, -1, 1), 22_050)
    write_audio(inputs / "e-loop.wav", speak(LOOP, "en-gb+f4", 170), 22_050)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(inputs / "a-dialogue.wav"), "-af",
                    "volume=0.8", str(inputs / "f-copy.opus")], check=True)
    out = tmp_path_factory.mktemp("quality-out")
    env = {**prefect_home, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    run = _cli(["ingest", str(inputs), "--out", str(out), "--dataset", "q", "--config", str(offline_models)], env)
    root = out / "q"
    return {"dir": root, "inputs": inputs, "script": script, "stdout": run.stdout,
            "manifest": json.loads((root / "manifest.json").read_text()),
            **{t: pq.read_table(root / f"{t}.parquet").to_pylist() for t in ("index", "rejects", "recordings")}}


def _rec_id(run: dict, name: str) -> str:
    (rid,) = {r["recording_id"] for r in run["recordings"] if r["source"].endswith("/" + name)}
    return rid


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_each_file_kept_or_rejected_for_its_reason(quality_run, name) -> None:
    rid = _rec_id(quality_run, name)
    windows = [r for r in quality_run["index"] if r["recording_id"] == rid]
    rejects = [r for r in quality_run["rejects"] if r["recording_id"] == rid]
    expected = FILES[name]
    if expected is None:
        assert windows, rejects
        assert {r["rule"] for r in rejects} <= {"untranscribed"}
        return
    assert windows == []
    level, rule = expected
    rules = rule if isinstance(rule, set) else {rule}
    hits = [r for r in rejects if r["rule"] in rules and r["level"] == level]
    assert hits, rejects
    assert all(r["stage"] == "quality" and r["seconds"] > 0 and r["reason"] for r in hits)
    if level != "window":  # measured values and thresholds are recorded (duplicate: similarity and threshold)
        assert all(r["value"] is not None and r["threshold"] is not None for r in hits)
    if level == "recording":
        (rec,) = [r for r in quality_run["recordings"] if r["recording_id"] == rid]
        assert hits[0]["seconds"] == rec["duration"] and rec["status"] == "rejected"
    if rule == "duplicate":
        dialogue = [r["key"] for r in quality_run["index"] if r["recording_id"] == _rec_id(quality_run, "a-dialogue.wav")]
        assert all(any(k in r["reason"] for k in dialogue) for r in hits)
        assert all(r["value"] >= r["threshold"] for r in hits)


@pytest.mark.slow
def test_metrics_are_stored_per_turn_window_and_recording(quality_run) -> None:
    from tasks.verify import iter_samples, verify_dataset

    root = quality_run["dir"]
    assert verify_dataset(root)["samples"] == len(quality_run["index"])
    rid = _rec_id(quality_run, "a-dialogue.wav")
    (row,) = [r for r in quality_run["index"] if r["recording_id"] == rid][:1]
    for key in ("asr_avg_logprob", "asr_no_speech_prob", "compression_ratio", "aligned_ratio", "word_score",
                "chars_per_s", "words_per_s", "level_dbfs", "clipping_ratio", "snr_db", "silence_ratio",
                "overlap_ratio", "language_probability", "squim_stoi", "squim_pesq", "squim_si_sdr", "audio_s"):
        assert row[key] is not None, key
    assert row["language"] == "en" and row["n_speakers"] == 2 and row["snr_db"] > 20
    assert len(row["fp_text"]) == len(row["fp_codes"]) == 4 * m.MINHASH_PERMUTATIONS
    assert len(row["turn_seconds"]) == row["n_turns"] and sum(row["turn_seconds"]) == pytest.approx(row["duration"])
    sample = next(s for s in iter_samples([str(root / row["shard"])]) if s["__key__"] == row["key"])
    assert all(set(t["metrics"]) == set(m.TURN_METRICS) for t in sample["json"]["turns"])
    assert {k: sample["json"]["metrics"][k] for k in m.WINDOW_METRICS} == {k: row[k] for k in m.WINDOW_METRICS}
    assert "fingerprint" not in sample["json"]
    (rec,) = [r for r in quality_run["recordings"] if r["recording_id"] == rid]
    assert rec["n_speakers"] == 2 and rec["snr_db"] > 20 and rec["language_probability"] > 0.5
    # SQUIM ran on the offline set's random model, and the manifest says so
    models = quality_run["manifest"]["models"]
    assert "random" in models["squim"]["weights"] and "squim" in quality_run["manifest"]["untrained_models"]


@pytest.mark.slow
def test_seconds_add_up_per_recording_and_in_total(quality_run) -> None:
    for rec in quality_run["recordings"]:
        kept = sum(r["audio_s"] for r in quality_run["index"] if r["recording_id"] == rec["recording_id"])
        rejected = sum(r["seconds"] for r in quality_run["rejects"] if r["recording_id"] == rec["recording_id"])
        assert kept + rejected == pytest.approx(rec["duration"], abs=1e-6), rec["source"]
    counts = quality_run["manifest"]["counts"]
    total = counts["hours_kept"] + sum(counts["hours_rejected_by_reason"].values())
    assert total * 3600 == pytest.approx(counts["hours_in"] * 3600, abs=1e-3)  # no overlapped speech kept here


@pytest.mark.slow
def test_report_renders_and_adds_up(quality_run, tmp_path) -> None:
    from flows.cli import main
    from tasks.report import load_tables, summarize

    root = quality_run["dir"]
    assert main(["report", str(root)]) == 0
    page = (root / "report" / "index.html").read_text()
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(summarize(load_tables(root))))
    assert abs(summary["seconds_unaccounted"]) < 1e-6
    assert summary["seconds_in"] == pytest.approx(sum(r["duration"] for r in quality_run["recordings"]))
    for rule in ("too_noisy", "mostly_silence", "clipped", "duplicate", "untranscribed"):
        assert f"quality:{rule}" in summary["rejected_by_reason"] and f"quality:{rule}" in page
    assert summary["windows"] == len(quality_run["index"]) and summary["speakers_per_window"] == {"2": 1}
    pngs = {p.name for p in (root / "report").glob("*.png")}
    assert {"hours.png", "positions.png", "speakers.png", "turns.png", "metric-snr_db.png",
            "metric-chars_per_s.png", "metric-compression_ratio.png"} <= pngs
    assert all(f'src="{p}"' in page for p in pngs)
    for p in pngs:
        assert (root / "report" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _refilter(src: Path, cfg: dict, out: Path) -> dict:
    from tasks.refilter import refilter

    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return refilter(src, path, out, report=False)


@pytest.mark.slow
def test_refilter_with_the_same_thresholds_reproduces_the_dataset(quality_run, tmp_path, monkeypatch) -> None:
    from tasks.verify import verify_dataset

    def no_model(*args, **kwargs):
        pytest.fail("refilter must run no model")

    for target in ("tasks.models.load_models", "tasks.asr.load_asr", "tasks.diarize.load_diarization_pipeline",
                   "tokenizer.mimi.load_mimi", "tasks.metrics.load_squim"):
        monkeypatch.setattr(target, no_model)

    manifest = _refilter(quality_run["dir"], {}, tmp_path / "same")
    assert verify_dataset(tmp_path / "same")["samples"] == len(quality_run["index"])
    index = pq.read_table(tmp_path / "same" / "index.parquet").to_pylist()
    skip = {"shard"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in index] == \
        [{k: v for k, v in r.items() if k not in skip} for r in quality_run["index"]]
    assert manifest["counts"]["hours_rejected_by_reason"] == pytest.approx(
        quality_run["manifest"]["counts"]["hours_rejected_by_reason"])
    assert not manifest["refilter"]["text_tokenizer_loaded"]


@pytest.mark.slow
def test_refilter_applies_stricter_thresholds_without_models(quality_run, tmp_path) -> None:
    from tasks.report import load_tables, summarize
    from tasks.verify import iter_samples, verify_dataset
    from tokenizer.text import encode_turn_text, load_text_tokenizer

    root = quality_run["dir"]
    source = [s for e in quality_run["manifest"]["shards"] for s in iter_samples([str(root / e["path"])])]
    turns = [t for s in source for t in s["json"]["turns"]]
    rates = sorted(t["metrics"]["chars_per_s"] for t in turns)
    limit = (rates[-1] + rates[-2]) / 2  # the fastest turn goes
    out = tmp_path / "strict"
    manifest = _refilter(root, {"quality": {"max_chars_per_s": limit}}, out)
    assert verify_dataset(out)["samples"] == manifest["counts"]["windows"]
    # the fastest turn is rejected with its value; the others stay, in windows split around it
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    fast = [r for r in rejects if r["rule"] == "too_fast"]
    assert len(fast) == 1 and fast[0]["value"] == pytest.approx(rates[-1]) and fast[0]["threshold"] == limit
    assert "(refilter)" in fast[0]["reason"]
    new = list(iter_samples([str(out / e["path"]) for e in manifest["shards"]]))
    kept_turns = [t for s in new for t in s["json"]["turns"]]
    assert len(kept_turns) == len(turns) - 1 and max(t["metrics"]["chars_per_s"] for t in kept_turns) <= limit
    tok = load_text_tokenizer(manifest["config"]["tokenize"]["text"])
    for s in new:  # speakers renumbered from 0 in each new window, text ids re-encoded to match
        assert s["json"]["turns"][0]["speaker"] == 0
        ids = [i for t in s["json"]["turns"] for i in encode_turn_text(tok, t["speaker"], t["text"])]
        np.testing.assert_array_equal(s["text"], np.array(ids, dtype=np.int32))
    # the seconds still add up, and the old rejects are all still there
    s = summarize(load_tables(out))
    assert abs(s["seconds_unaccounted"]) < 1e-6
    assert s["seconds_in"] == pytest.approx(summarize(load_tables(root))["seconds_in"])
    assert len(rejects) > len(quality_run["rejects"])
    # require_dialogue on top: one-speaker windows go too
    out2 = tmp_path / "dialogue"
    manifest = _refilter(root, {"max_chars_per_s": limit, "require_dialogue": True}, out2)
    assert all(r["n_speakers"] >= 2 for r in pq.read_table(out2 / "index.parquet").to_pylist())
    assert abs(summarize(load_tables(out2))["seconds_unaccounted"]) < 1e-6


@pytest.mark.slow
def test_refilter_cli_refuses_to_overwrite(quality_run, tmp_path) -> None:
    from flows.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("min_snr_db: 60\n")
    assert main(["refilter", str(quality_run["dir"]), "--config", str(cfg), "--out", str(tmp_path / "n"),
                 "--no-report"]) == 0
    index = pq.read_table(tmp_path / "n" / "index.parquet").to_pylist()
    assert index == []  # every recording is under 60 dB: rejected whole, with its kept seconds
    rejects = pq.read_table(tmp_path / "n" / "rejects.parquet").to_pylist()
    assert any(r["rule"] == "too_noisy" and r["level"] == "recording" and "refilter" in r["reason"] for r in rejects)
    assert main(["refilter", str(quality_run["dir"]), "--config", str(cfg), "--out", str(tmp_path / "n")]) == 1
    assert os.path.exists(tmp_path / "n" / "manifest.json")


def test_report_renders_a_dataset_without_quality_columns(tmp_path) -> None:
    """Datasets written before the metrics existed: the report falls back to window durations."""
    from tasks.report import build_report
    from tests.test_shards import write_dataset

    root = tmp_path / "old"
    write_dataset(root, n_recordings=2)
    page = build_report(root)
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert summary["seconds_kept"] == pytest.approx(sum(r["duration"] for r in pq.read_table(root / "index.parquet")
                                                        .to_pylist()))
    assert "positions.png" in page.read_text() and (root / "report" / "turns.png").exists()


@pytest.mark.slow
def test_report_is_published_as_artifacts(quality_run, monkeypatch) -> None:
    import prefect.artifacts

    from tasks.report import publish_report_artifacts

    calls: dict[str, dict] = {}
    for name in ("create_markdown_artifact", "create_table_artifact", "create_link_artifact"):
        monkeypatch.setattr(prefect.artifacts, name, lambda _n=name, **kw: calls.setdefault(_n, kw))
    summary = publish_report_artifacts(quality_run["dir"])
    assert "kept + rejected - in" in calls["create_markdown_artifact"]["markdown"]
    table = calls["create_table_artifact"]["table"]
    assert sum(r["seconds"] for r in table) == pytest.approx(summary["seconds_in"], abs=1e-2)
    assert calls["create_link_artifact"]["link"].endswith("report/index.html")
    assert all(c["key"].startswith("dataset-q-") for c in calls.values())


def test_loud_float_audio_is_not_clipping() -> None:
    """A multichannel downmix decodes far above full scale without a ceiling: only its peak counts."""
    loud = speechlike() * 4.0
    assert m.signal_metrics(loud)["clipping_ratio"] < 1e-4
    assert m.signal_metrics(np.clip(loud * 10, -3.0, 3.0))["clipping_ratio"] > 0.01  # a plateau at its peak is
