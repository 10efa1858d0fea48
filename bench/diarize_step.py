"""Diarization speed and accuracy against pyannote's `segmentation_step` (the slowest CPU stage's knob).

The offline pipeline (real pyannote segmentation + GE2E embeddings) on espeak-ng dialogues of several voice
pairs (two same-gender pairs among them), each scored with pyannote.metrics' diarization error rate (no
collar, overlap included) against the script's ground truth. A step of 0.1 (pyannote's default) embeds
each second of audio about ten times; larger steps embed it less often.

    python bench/diarize_step.py --steps 0.1 0.2 0.3 0.5 --minutes 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import Row

PAIRS = [("en-us+m3", "en-gb+f4"), ("en-us+m1", "en-gb+m3"), ("en-gb+f2", "en-us+f4"), ("en-us+m7", "en-gb-x-rp+f3")]


def evaluate(steps: list[float], minutes: float = 2.0, pairs: list[tuple[str, str]] = PAIRS) -> dict[float, dict]:
    """Per step: real-time factor and DER, per dialogue and in total."""
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    from schemas.config import DiarizeConfig
    from tasks.decode import decode
    from tasks.diarize import build_offline_diarization, diarize, load_diarization_pipeline
    from tasks.synth import make_dialogue

    root = Path("/tmp/csm-bench/diarize-step")
    models = build_offline_diarization(Path(tempfile.mkdtemp(prefix="csm-bench-models-")))
    dialogues = []
    for i, pair in enumerate(pairs):
        path = root / f"{'_'.join(pair)}-{minutes:g}min.wav"
        if not path.exists():
            make_dialogue(path, repeat=max(1, round(minutes * 60 / 78.5)), seed=i, voices=pair, speeds=(165, 150))
        script = json.loads(Path(f"{path}.script.json").read_text())
        truth = Annotation()
        for turn in script["turns"]:
            truth[Segment(turn["start"], turn["end"]), len(truth)] = f"S{turn['speaker']}"
        dialogues.append((pair, decode(path, 16_000), truth))

    results: dict[float, dict] = {}
    for step in steps:
        cfg = DiarizeConfig(segmentation=models["segmentation"], embedding=models["embedding"], segmentation_step=step,
                            min_speakers=2, max_speakers=2)  # the count is known: scores the boundaries
        pipeline = load_diarization_pipeline(cfg, "cpu")
        metric = DiarizationErrorRate()  # accumulates over the dialogues: abs(metric) is the total DER
        seconds = wall = 0.0
        per = {}
        for pair, audio, truth in dialogues:
            t = time.perf_counter()
            segments = diarize(audio, pipeline, cfg)
            wall += time.perf_counter() - t
            seconds += len(audio) / 16_000
            hyp = Annotation()
            for k, s in enumerate(segments):
                hyp[Segment(s.start, s.end), k] = s.speaker
            per["/".join(pair)] = metric(truth, hyp)
        results[step] = {"x_real_time": seconds / wall, "der": abs(metric), "der_by_pair": per}
    return results


def run() -> list[Row]:
    res = evaluate([0.1, 0.3])
    base = res[0.1]
    return [Row("diarize", f"x real time at segmentation_step {step} (DER {r['der']:.3f}; at 0.1: {base['der']:.3f})",
                r["x_real_time"], f"step 0.1: {base['x_real_time']:.1f}x", r["x_real_time"] / base["x_real_time"],
                f"offline pyannote + GE2E, {len(PAIRS)} espeak-ng dialogues of 2 min")
            for step, r in res.items() if step != 0.1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--minutes", type=float, default=2.0, help="length of each dialogue")
    a = p.parse_args()
    res = evaluate(a.steps, a.minutes)
    print(f"{'step':>5}{'x real time':>13}{'DER':>8}  DER per voice pair")
    for step, r in res.items():
        pairs = "  ".join(f"{v:.3f}" for v in r["der_by_pair"].values())
        print(f"{step:>5}{r['x_real_time']:>13.1f}{r['der']:>8.3f}  {pairs}")
    print("pairs: " + ", ".join(r for r in next(iter(res.values()))["der_by_pair"]))


if __name__ == "__main__":
    main()
