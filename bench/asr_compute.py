"""ASR on CPU: faster-whisper's compute type and whisperX's VAD, speed and word error rate side by side.

Production runs on a GPU at float16; a CPU run (the offline set, users without a GPU) defaults to int8,
on this benchmark's evidence. It measures int8 (CTranslate2's quantized CPU kernels) and silero VAD against
float32 with pyannote's VAD, on the offline Whisper base and an espeak-ng dialogue whose script is the
reference text.

    python bench/asr_compute.py --minutes 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import Row, speech_file
from bench.memory import offline_config

VARIANTS = [("float32", "pyannote"), ("int8", "pyannote"), ("int8", "silero")]


def evaluate(minutes: float = 5.0, variants: list[tuple[str, str]] = VARIANTS) -> list[dict]:
    import json

    from schemas.config import IngestConfig
    from tasks.asr import load_asr, transcribe
    from tasks.decode import decode
    from tests.test_asr import wer

    cfg = IngestConfig.from_yaml(offline_config())
    path = speech_file(Path(f"/tmp/csm-bench/dialogue-{minutes:g}min.mp3"), minutes)
    script = json.loads(Path(f"{path}.script.json").read_text())
    audio = decode(path, 16_000)
    seconds = len(audio) / 16_000
    out = []
    for compute_type, vad in variants:
        asr_cfg = cfg.asr.model_copy(update={"compute_type": compute_type, "vad_method": vad})
        model = load_asr(asr_cfg, "cpu")
        transcribe(audio[: 30 * 16_000], model, asr_cfg)  # warm-up
        t = time.perf_counter()
        transcript = transcribe(audio, model, asr_cfg)
        wall = time.perf_counter() - t
        out.append({"compute_type": compute_type, "vad": vad, "model": asr_cfg.model,
                    "x_real_time": seconds / wall, "wer": wer(script, transcript)})
    return out


def run() -> list[Row]:
    res = evaluate()
    base = res[0]
    return [Row("asr", f"x real time, {r['compute_type']} + {r['vad']} VAD (WER {r['wer']:.3f}; float32: "
                f"{base['wer']:.3f})", r["x_real_time"], f"float32 + pyannote: {base['x_real_time']:.1f}x",
                r["x_real_time"] / base["x_real_time"], "offline Whisper base on cpu, 5 min espeak-ng dialogue")
            for r in res[1:]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0)
    a = p.parse_args()
    print(f"{'compute type':<14}{'VAD':<10}{'x real time':>12}{'WER':>8}")
    for r in evaluate(a.minutes):
        print(f"{r['compute_type']:<14}{r['vad']:<10}{r['x_real_time']:>12.1f}{r['wer']:>8.3f}")


if __name__ == "__main__":
    main()
