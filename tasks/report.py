"""The dataset report: `report/` next to the manifest, a static HTML page with PNG plots, rebuilt from the
dataset's tables alone (index.parquet, rejects.parquet, recordings.parquet, manifest.json), and the same
figures as Prefect artifacts.

Its seconds add up: every second of input is in a kept window (index `audio_s`: the recording time its
turns cover, overlapping turns counted once) or in exactly one reject (`seconds`), see tasks/quality.settle.
Datasets written before `audio_s` existed fall back to the window's `duration`.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tasks import quality, storage
from tasks.metrics import WINDOW_METRICS

REPORT_DIR = "report"
# Metrics plotted, with a readable name; each is drawn with the thresholds of every rule on it.
METRIC_LABELS = {
    "asr_avg_logprob": "ASR mean log-probability", "asr_no_speech_prob": "ASR no-speech probability",
    "compression_ratio": "text compression ratio (worst turn)", "repeated_ngram_ratio": "repeated 3-gram share (worst turn)",
    "aligned_ratio": "share of words aligned", "word_score": "mean word alignment score",
    "chars_per_s": "speaking rate (chars/s)", "words_per_s": "speaking rate (words/s)", "level_dbfs": "level (dBFS)",
    "clipping_ratio": "clipped share of samples", "silence_ratio": "silent share", "snr_db": "estimated SNR (dB)",
    "overlap_ratio": "overlapped share", "language_probability": "language probability",
    "squim_stoi": "SQUIM STOI", "squim_pesq": "SQUIM PESQ", "squim_si_sdr": "SQUIM SI-SDR (dB)",
}


def load_tables(dataset_dir: str | Path) -> dict[str, Any]:
    """The manifest and the three tables of a dataset (a local folder or an fsspec URL)."""
    manifest_url = storage.join(dataset_dir, "manifest.json")
    manifest = storage.read_json(manifest_url) if storage.exists(manifest_url) else {}
    return {"manifest": manifest, **{t: storage.read_parquet(storage.join(dataset_dir, f"{t}.parquet"))
                                     for t in ("index", "rejects", "recordings")}}


def kept_seconds(row: dict[str, Any]) -> float:
    """A window's share of the recording time: `audio_s`, or its duration for datasets from before it."""
    value = row.get("audio_s")
    return float(row["duration"] if value is None else value)


def summarize(tables: dict[str, Any]) -> dict[str, Any]:
    """Seconds in, kept and rejected by reason (stage:rule), and whether they add up."""
    index, rejects, recordings = tables["index"], tables["rejects"], tables["recordings"]
    seconds_in = sum(r.get("duration") or 0.0 for r in recordings)
    kept = sum(kept_seconds(r) for r in index)
    by_reason: dict[str, float] = defaultdict(float)
    rows_by_reason: Counter[str] = Counter()
    level_of: dict[str, str] = {}
    for r in rejects:
        key = f"{r['stage']}:{r['rule'] or 'error'}"
        by_reason[key] += r.get("seconds") or 0.0
        rows_by_reason[key] += 1
        level_of.setdefault(key, r.get("level") or "")
    rejected = sum(by_reason.values())
    status = Counter(r.get("status") for r in recordings)
    return {
        "seconds_in": seconds_in,
        "seconds_kept": kept,
        "seconds_kept_audio": sum(r["duration"] for r in index),  # overlapped speech counted per speaker
        "seconds_rejected": rejected,
        "seconds_unaccounted": seconds_in - kept - rejected,
        "rejected_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        "rejects_by_reason": dict(rows_by_reason),
        "level_by_reason": level_of,
        "recordings": len(recordings),
        "recordings_kept": status.get("kept", 0),
        "recordings_rejected": status.get("rejected", 0),
        "recordings_failed": status.get("failed", 0),
        "windows": len(index),
        "turns": sum(r["n_turns"] for r in index),
        "speakers_per_window": dict(sorted(Counter(r["n_speakers"] for r in index).items())),
    }


def thresholds(config: dict[str, Any]) -> dict[str, list[tuple[str, str, float]]]:
    """metric -> [(rule, level, threshold)] of the rules that are on in a (manifest) config."""
    from schemas.config import QualityConfig

    q = QualityConfig.model_validate((config or {}).get("quality", {}))
    levels: dict[tuple[str, str, float], list[str]] = defaultdict(list)
    for level, rules in quality.RULES_BY_LEVEL.items():
        for rule in rules:
            limit = rule.limit(q)
            if limit is not None:
                levels[(rule.metric, rule.name, limit)].append(level)
    out: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
    for (metric, name, limit), where in levels.items():
        out[metric].append((name, ", ".join(where), limit))
    return out


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 3600:.4f} h ({seconds:.1f} s)"


# ---------------------------------------------------------------------------------------------- plots


def _figure(width: float = 6.0, height: float = 3.2) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=90)
    return fig, ax


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _plot_hours(s: dict[str, Any], path: Path) -> str:
    labels = ["kept", *s["rejected_by_reason"]]
    values = [s["seconds_kept"] / 3600, *(v / 3600 for v in s["rejected_by_reason"].values())]
    fig, ax = _figure(7, 0.9 + 0.32 * len(labels))
    ax.barh(labels, values, color=["tab:green"] + ["tab:red"] * (len(labels) - 1))
    ax.invert_yaxis()
    ax.set_xlabel("hours")
    ax.set_title(f"{s['seconds_in'] / 3600:.3f} h in: kept vs rejected by stage:rule")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v * 3600:.1f} s", va="center", fontsize=8)
    return _save(fig, path)


def _plot_metric(metric: str, kept: list[float], rejected: dict[str, list[float]],
                 limits: list[tuple[str, str, float]], path: Path) -> str:
    import numpy as np

    fig, ax = _figure()
    every = kept + [v for vs in rejected.values() for v in vs]
    finite = [v for v in every if v is not None and math.isfinite(v)]
    bins = np.histogram_bin_edges(finite or [0.0, 1.0], bins=30)
    if kept:
        ax.hist(kept, bins=bins, color="tab:green", alpha=0.7, label=f"kept windows ({len(kept)})")
    for rule, values in rejected.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"rejected: {rule} ({len(values)})")
    for rule, level, limit in limits:
        ax.axvline(limit, color="black", linestyle="--", linewidth=1)
        ax.text(limit, ax.get_ylim()[1] * 0.95, f" {rule} ({level}) {limit:g}", fontsize=7, va="top", rotation=90)
    ax.set_title(METRIC_LABELS.get(metric, metric))
    ax.set_ylabel("count")
    if kept or rejected:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_hist(values: list[float], title: str, xlabel: str, path: Path, line: float | None = None,
               discrete: bool = False) -> str:
    fig, ax = _figure()
    if discrete:
        counts = Counter(values)
        ax.bar([str(k) for k in sorted(counts)], [counts[k] for k in sorted(counts)], color="tab:blue")
    elif values:
        ax.hist(values, bins=30, color="tab:blue")
    if line is not None:
        ax.axvline(line, color="black", linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- build


def build_report(dataset_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `report/index.html` and its PNGs for a dataset, from its tables alone; returns the page's path."""
    tables = load_tables(dataset_dir)
    if out_dir is None and storage.is_remote(dataset_dir):
        raise ValueError(f"{dataset_dir}: give a local out_dir for the report of a dataset on an object store")
    out = Path(out_dir) if out_dir else storage.local_path(dataset_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    s = summarize(tables)
    manifest, index, rejects = tables["manifest"], tables["index"], tables["rejects"]
    config = manifest.get("config", {})
    limits = thresholds(config)
    plots: list[tuple[str, str]] = [("Hours kept and rejected", _plot_hours(s, out / "hours.png"))]
    for metric in WINDOW_METRICS:
        if metric == "audio_s":
            continue
        kept = [r[metric] for r in index if r.get(metric) is not None and math.isfinite(r[metric])]
        rules = {rule for rule, _, _ in limits.get(metric, [])} | {
            r.name for rs in quality.RULES_BY_LEVEL.values() for r in rs if r.metric == metric}
        rejected: dict[str, list[float]] = defaultdict(list)
        for r in rejects:
            if r["rule"] in rules and r.get("value") is not None and math.isfinite(r["value"]):
                rejected[r["rule"]].append(r["value"])
        if not kept and not rejected:
            continue
        plots.append((METRIC_LABELS.get(metric, metric),
                      _plot_metric(metric, kept, dict(rejected), limits.get(metric, []), out / f"metric-{metric}.png")))
    max_positions = config.get("windows", {}).get("max_positions", 2048)
    plots.append(("Positions per window", _plot_hist([r["n_positions"] for r in index], "CSM positions per window",
                                                     "positions", out / "positions.png", line=max_positions)))
    plots.append(("Speakers per window", _plot_hist([r["n_speakers"] for r in index], "speakers per window",
                                                    "speakers", out / "speakers.png", discrete=True)))
    turn_lengths = [t for r in index for t in (r.get("turn_seconds") or [r["duration"] / max(1, r["n_turns"])])]
    plots.append(("Turn length", _plot_hist(turn_lengths, "turn length", "seconds", out / "turns.png")))
    plots.append(("Window length", _plot_hist([r["duration"] for r in index], "window audio", "seconds",
                                              out / "windows.png")))
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    page = out / "index.html"
    page.write_text(_html(manifest, s, limits, plots))
    return page


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_rows(s: dict[str, Any]) -> list[list[Any]]:
    share = (lambda x: f"{100 * x / s['seconds_in']:.2f}%") if s["seconds_in"] > 0 else (lambda x: "")
    rows = [["in", "", _fmt_s(s["seconds_in"]), "100%" if s["seconds_in"] else "", ""],
            ["kept", "", _fmt_s(s["seconds_kept"]), share(s["seconds_kept"]), s["windows"]]]
    for reason, seconds in s["rejected_by_reason"].items():
        rows.append([f"rejected {reason}", s["level_by_reason"].get(reason, ""), _fmt_s(seconds), share(seconds),
                     s["rejects_by_reason"][reason]])
    rows.append(["kept + rejected - in", "", f"{s['seconds_unaccounted']:+.6f} s", "", ""])
    return rows


def _html(manifest: dict[str, Any], s: dict[str, Any], limits: dict[str, list], plots: list[tuple[str, str]]) -> str:
    name = manifest.get("dataset", "")
    counts = [["recordings", f"{s['recordings']} ({s['recordings_kept']} kept, {s['recordings_rejected']} rejected, "
               f"{s['recordings_failed']} failed)"], ["windows", s["windows"]], ["turns", s["turns"]],
              ["kept audio in the samples (overlapped speech counted in each overlapping turn)",
               _fmt_s(s["seconds_kept_audio"])],
              ["speakers per window", ", ".join(f"{k}: {v}" for k, v in s["speakers_per_window"].items())],
              ["untrained models", ", ".join(manifest.get("untrained_models", [])) or "none"]]
    rules = [[m, rule, level, value] for m, items in sorted(limits.items()) for rule, level, value in items]
    q = manifest.get("config", {}).get("quality", {})
    rules += [["transcript similarity (word-bigram MinHash)", "duplicate", "window", q.get("duplicate_text_similarity")],
              ["audio similarity (code-0 MinHash)", "duplicate", "window", q.get("duplicate_audio_similarity")],
              ["language", "language", "recording", q.get("allowed_languages") or "all"],
              ["SQUIM model", "", "window", q.get("squim_model") or "off"]]
    images = "".join(f'<figure><img src="{html.escape(png)}" alt="{html.escape(title)}">'
                     f"<figcaption>{html.escape(title)}</figcaption></figure>" for title, png in plots)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Dataset report: {html.escape(name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 640px; }}
</style></head><body>
<h1>Dataset report: {html.escape(name)}</h1>
<p>Built from index.parquet, rejects.parquet, recordings.parquet and manifest.json ({html.escape(str(manifest.get("created", "")))}).
Every second of input is kept or rejected once: kept + rejected = in.</p>
<h2>Hours</h2>
{_table(summary_rows(s), ["", "level", "hours (seconds)", "share", "windows / rejects"])}
{_table(counts, ["", ""])}
<h2>Thresholds</h2>
{_table(rules, ["metric", "rule", "level", "threshold"])}
<h2>Plots</h2>
{images}
</body></html>
"""


# ---------------------------------------------------------------------------------------------- Prefect


def artifact_key(dataset: str, what: str, prefix: str = "dataset") -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{dataset}-{what}".lower()).strip("-")


def markdown(s: dict[str, Any], name: str) -> str:
    lines = [f"# Dataset report: {name}", "", "| | level | hours (seconds) | share | windows / rejects |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in summary_rows(s)]
    lines += ["", f"{s['recordings']} recordings ({s['recordings_kept']} kept, {s['recordings_rejected']} rejected, "
              f"{s['recordings_failed']} failed), {s['windows']} windows, {s['turns']} turns."]
    return "\n".join(lines)


def publish_report_artifacts(dataset_dir: str | Path, build: bool = True) -> dict[str, Any]:
    """Publish the report as Prefect artifacts: a markdown summary, a table of seconds by reason, and a link
    to report/index.html (rebuilt first unless `build` is False and it exists). Call it inside a flow run;
    returns the summary."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    tables = load_tables(dataset_dir)
    s = summarize(tables)
    name = tables["manifest"].get("dataset", str(dataset_dir).rstrip("/").rsplit("/", 1)[-1])
    if storage.is_remote(dataset_dir):  # built on local disk, then uploaded next to the dataset
        import tempfile

        local = Path(tempfile.mkdtemp(prefix="csm-report-"))
        build_report(dataset_dir, local)
        for f in sorted(local.iterdir()):
            storage.put(f, storage.join(dataset_dir, REPORT_DIR, f.name))
        link = storage.join(dataset_dir, REPORT_DIR, "index.html")
    else:
        page = storage.local_path(dataset_dir) / REPORT_DIR / "index.html"
        if build or not page.exists():
            page = build_report(dataset_dir)
        link = page.resolve().as_uri()
    create_markdown_artifact(markdown=markdown(s, name), key=artifact_key(name, "report"),
                             description=f"dataset `{name}`: hours kept and rejected by rule")
    create_table_artifact(
        table=[{"reason": "kept", "level": "", "seconds": round(s["seconds_kept"], 3), "rows": s["windows"]}]
        + [{"reason": k, "level": s["level_by_reason"].get(k, ""), "seconds": round(v, 3),
            "rows": s["rejects_by_reason"][k]} for k, v in s["rejected_by_reason"].items()],
        key=artifact_key(name, "hours-by-rule"), description=f"dataset `{name}`: seconds kept and rejected by rule")
    create_link_artifact(link=link, link_text=f"{name}: report/index.html",
                         key=artifact_key(name, "report-page"), description=f"dataset `{name}`: the HTML report")
    return s
