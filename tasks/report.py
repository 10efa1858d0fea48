"""The dataset report: `report/` next to the manifest, a static HTML page with PNG plots, rebuilt from the
dataset's tables alone (index.parquet, rejects.parquet, recordings.parquet, manifest.json), and the same
figures as Prefect artifacts.

Its seconds add up: every second of input is in a kept window (index `audio_s`: the recording time its
turns cover, overlapping turns counted once) or in exactly one reject (`seconds`), see tasks/quality.settle.
Datasets written before `audio_s` existed fall back to the window's `duration`.

It reads only the columns it uses, as arrow columns and numpy arrays: a million-hour index has ~25M rows,
far too many to hold as Python dicts (and its fingerprint columns are never needed here).
"""

from __future__ import annotations

import html
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


# The columns the report reads (WINDOW_METRICS includes audio_s); those a table lacks are read as absent.
COLUMNS = {
    "index": ["duration", "n_turns", "n_speakers", "n_positions", "turn_seconds", *WINDOW_METRICS],
    "rejects": ["stage", "rule", "level", "seconds", "value"],
    "recordings": ["duration", "status"],
}


def load_tables(dataset_dir: str | Path) -> dict[str, Any]:
    """The manifest and the three tables of a dataset (a local folder or an fsspec URL): each an arrow Table
    of the COLUMNS it has, with no columns and no rows where the file is missing."""
    manifest_url = storage.join(dataset_dir, "manifest.json")
    manifest = storage.read_json(manifest_url) if storage.exists(manifest_url) else {}
    tables = {t: storage.read_table(storage.join(dataset_dir, f"{t}.parquet"), columns)
              for t, columns in COLUMNS.items()}
    return {"manifest": manifest, **{t: pa.table({}) if table is None else table for t, table in tables.items()}}


def _column(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    """A column, or None where the table lacks it (an older dataset, a missing file)."""
    return table[name] if name in table.column_names else None


def _values(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy, nulls as NaN; all NaN where the table lacks it (what `row.get(name)` gave)."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table[name].to_numpy()


def _sum(column: pa.ChunkedArray | None) -> Any:
    """A column's sum, nulls skipped (a NaN stays NaN, as in `row.get(name) or 0.0`); 0.0 without the column."""
    return 0.0 if column is None else pc.sum(column, min_count=0).as_py()


def _codes(column: pa.ChunkedArray) -> tuple[list[Any], np.ndarray]:
    """The column's distinct values in the order of their first row, and each row's number among them."""
    encoded = pc.dictionary_encode(column.combine_chunks())  # one dictionary, not one per chunk
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy()


def _by_reason(rejects: pa.Table) -> dict[str, tuple[float, int, str]]:
    """stage:rule -> (seconds, rows, level of its first row), reasons in the order of their first row."""
    if not rejects.num_rows:
        return {}
    rule = pc.if_else(pc.fill_null(pc.equal(rejects["rule"], ""), True), "error", rejects["rule"])
    reasons, codes = _codes(pc.binary_join_element_wise(rejects["stage"], rule, ":"))
    seconds = _column(rejects, "seconds")
    seconds = np.zeros(len(codes)) if seconds is None else pc.fill_null(seconds, 0.0).to_numpy()
    # bincount adds each reason's seconds in row order, the running sum the per-row loop made
    sums = np.bincount(codes, weights=seconds, minlength=len(reasons)).tolist()
    rows = np.bincount(codes, minlength=len(reasons)).tolist()
    first = pa.array(np.unique(codes, return_index=True)[1])
    level = _column(rejects, "level")
    levels = [""] * len(reasons) if level is None else pc.fill_null(level.take(first), "").to_pylist()
    return {reason: (sums[i], rows[i], levels[i]) for i, reason in enumerate(reasons)}


def kept_seconds(row: dict[str, Any]) -> float:
    """A window's share of the recording time: `audio_s`, or its duration for datasets from before it."""
    value = row.get("audio_s")
    return float(row["duration"] if value is None else value)


def summarize(tables: dict[str, Any]) -> dict[str, Any]:
    """Seconds in, kept and rejected by reason (stage:rule), and whether they add up (tables: load_tables)."""
    index, rejects, recordings = tables["index"], tables["rejects"], tables["recordings"]
    seconds_in = _sum(_column(recordings, "duration"))
    audio_s, duration = _column(index, "audio_s"), _column(index, "duration")
    kept = _sum(duration if audio_s is None else pc.coalesce(audio_s, duration))  # per row, as kept_seconds
    reasons = _by_reason(rejects)
    by_reason = {reason: seconds for reason, (seconds, _, _) in reasons.items()}
    rejected = sum(by_reason.values())
    status: dict[str, int] = {}
    if _column(recordings, "status") is not None:
        values, counts = pc.value_counts(recordings["status"]).flatten()
        status = dict(zip(values.to_pylist(), counts.to_pylist(), strict=True))
    speakers, windows = np.unique(_values(index, "n_speakers"), return_counts=True)
    return {
        "seconds_in": seconds_in,
        "seconds_kept": kept,
        "seconds_kept_audio": _sum(duration),  # overlapped speech counted per speaker
        "seconds_rejected": rejected,
        "seconds_unaccounted": seconds_in - kept - rejected,
        "rejected_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        "rejects_by_reason": {reason: rows for reason, (_, rows, _) in reasons.items()},
        "level_by_reason": {reason: level for reason, (_, _, level) in reasons.items()},
        "recordings": recordings.num_rows,
        "recordings_kept": status.get("kept", 0),
        "recordings_rejected": status.get("rejected", 0),
        "recordings_failed": status.get("failed", 0),
        "windows": index.num_rows,
        "turns": int(_sum(_column(index, "n_turns"))),
        "speakers_per_window": dict(zip(speakers.tolist(), windows.tolist(), strict=True)),
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


def _plot_metric(metric: str, kept: np.ndarray, rejected: dict[str, np.ndarray],
                 limits: list[tuple[str, str, float]], path: Path) -> str:
    fig, ax = _figure()
    every = np.concatenate([kept, *rejected.values()])  # all finite (build_report drops the rest)
    bins = np.histogram_bin_edges(every if len(every) else [0.0, 1.0], bins=30)
    if len(kept):
        ax.hist(kept, bins=bins, color="tab:green", alpha=0.7, label=f"kept windows ({len(kept)})")
    for rule, values in rejected.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"rejected: {rule} ({len(values)})")
    for rule, level, limit in limits:
        ax.axvline(limit, color="black", linestyle="--", linewidth=1)
        ax.text(limit, ax.get_ylim()[1] * 0.95, f" {rule} ({level}) {limit:g}", fontsize=7, va="top", rotation=90)
    ax.set_title(METRIC_LABELS.get(metric, metric))
    ax.set_ylabel("count")
    if len(kept) or rejected:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_hist(values: np.ndarray, title: str, xlabel: str, path: Path, line: float | None = None,
               discrete: bool = False) -> str:
    fig, ax = _figure()
    if discrete:
        keys, counts = np.unique(values, return_counts=True)
        ax.bar([str(k) for k in keys.tolist()], counts.tolist(), color="tab:blue")
    elif len(values):
        ax.hist(values, bins=30, color="tab:blue")
    if line is not None:
        ax.axvline(line, color="black", linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- build


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _rejected_values(rejects: pa.Table, rules: set[str]) -> dict[str, np.ndarray]:
    """rule -> the finite `value`s of its rejects, for those of `rules` that have any, in the order of each
    rule's first such reject (the order the plot draws and lists them in)."""
    if not rejects.num_rows or "value" not in rejects.column_names:
        return {}
    names, codes = _codes(pc.fill_null(rejects["rule"], ""))
    value = _values(rejects, "value")
    finite = np.isfinite(value)
    found = []
    for code, name in enumerate(names):
        if name in rules and (rows := finite & (codes == code)).any():
            found.append((int(rows.argmax()), name, value[rows]))
    return {name: values for _, name, values in sorted(found, key=lambda f: f[0])}


def _turn_lengths(index: pa.Table) -> np.ndarray:
    """Every turn's length: a window's `turn_seconds`, or its mean turn length where it has none (older
    datasets). Not in row order, which a histogram does not need."""
    fallback = _values(index, "duration") / np.maximum(1, _values(index, "n_turns"))
    turns = _column(index, "turn_seconds")
    if turns is None:
        return fallback
    listed = pc.fill_null(pc.list_value_length(turns), 0).to_numpy() > 0
    return np.concatenate([pc.list_flatten(turns).to_numpy(), fallback[~listed]])


def build_report(dataset_dir: str | Path, out_dir: str | Path | None = None,
                 tables: dict[str, Any] | None = None) -> Path:
    """Write `report/index.html` and its PNGs for a dataset, from its tables alone (`tables`: load_tables's,
    if the caller has them); returns the page's path."""
    if tables is None:
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
        kept = _finite(_values(index, metric))
        rules = {rule for rule, _, _ in limits.get(metric, [])} | {
            r.name for rs in quality.RULES_BY_LEVEL.values() for r in rs if r.metric == metric}
        rejected = _rejected_values(rejects, rules)
        if not len(kept) and not rejected:
            continue
        plots.append((METRIC_LABELS.get(metric, metric),
                      _plot_metric(metric, kept, rejected, limits.get(metric, []), out / f"metric-{metric}.png")))
    max_positions = config.get("windows", {}).get("max_positions", 2048)
    plots.append(("Positions per window", _plot_hist(_values(index, "n_positions"), "CSM positions per window",
                                                     "positions", out / "positions.png", line=max_positions)))
    plots.append(("Speakers per window", _plot_hist(_values(index, "n_speakers"), "speakers per window",
                                                    "speakers", out / "speakers.png", discrete=True)))
    plots.append(("Turn length", _plot_hist(_turn_lengths(index), "turn length", "seconds", out / "turns.png")))
    plots.append(("Window length", _plot_hist(_values(index, "duration"), "window audio", "seconds",
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
        build_report(dataset_dir, local, tables)
        for f in sorted(local.iterdir()):
            storage.put(f, storage.join(dataset_dir, REPORT_DIR, f.name))
        link = storage.join(dataset_dir, REPORT_DIR, "index.html")
    else:
        page = storage.local_path(dataset_dir) / REPORT_DIR / "index.html"
        if build or not page.exists():
            page = build_report(dataset_dir, tables=tables)
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
