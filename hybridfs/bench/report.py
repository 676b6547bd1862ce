"""Results out: JSON (every run kept, medians in ``results``), a Markdown table with ratios, PNG charts."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from hybridfs.bench.machine import one_line
from hybridfs.bench.plan import BASELINES, METRICS, PEER_RATIOS, TARGETS, Metric, Sizes
from hybridfs.bench.runner import MetricResult, Results, fmt

COLORS = {"hybridfs": "#d62728", "disk": "#7f7f7f", "floor": "#9467bd", "boto3": "#1f77b4", "s3fs": "#2ca02c",
          "rclone": "#ff7f0e"}
ACK_MARK = "†"


def ratio(result: MetricResult, baseline: str, system: str = "hybridfs") -> float | None:
    """``system`` relative to ``baseline``; above 1 means ``system`` is better (for times as for throughput). For a
    rate of requests, the baseline's cost per request over the system's."""
    mine, theirs = result.median(system), result.median(baseline)
    if mine is None or theirs is None or mine <= 0 or theirs <= 0:
        return None
    return mine / theirs if result.metric.higher_is_better else theirs / mine


def _title(result: MetricResult, results: Results) -> str:
    return result.metric.title.format(entries=results.sizes.list_count)


def targets(results: Results) -> list[dict[str, Any]]:
    by_name = {r.metric.name: r for r in results.metrics}
    out = []
    for metric, baseline, minimum in TARGETS:
        r = by_name.get(metric)
        value = ratio(r, baseline) if r is not None else None
        out.append({"metric": metric, "baseline": baseline, "min_ratio": minimum,
                    "ratio": None if value is None else round(value, 3),
                    "met": None if value is None else value >= minimum})
    return out


def to_json(results: Results, machine: dict[str, Any], command: str) -> dict[str, Any]:
    workloads = []
    for r in results.metrics:
        systems = results.systems
        workloads.append({
            "name": r.metric.name,
            "title": _title(r, results),
            "unit": r.metric.unit,
            "higher_is_better": r.metric.higher_is_better,
            "description": r.description,
            "results": {s: _round(r.median(s)) for s in systems},
            "runs": {s: [_round(v) for v in r.runs.get(s, [])] for s in systems},
            "acked_before_durable": {s: r.acked_before_durable(s) for s in systems if r.runs.get(s)},
            "durability_lag_seconds": {s: [round(v, 3) for v in lags] for s, lags in r.lags.items()},
            "peak_rss_mib": {s: [round(v, 1) for v in values] for s, values in r.peak_rss.items()},
            "ratios": {b: _round(ratio(r, b)) for b in BASELINES if b in systems and "hybridfs" in systems},
            "peer_ratios": {f"{s} vs {b}": _round(ratio(r, b, s)) for s, b in _peers(systems)},
            "notes": {s: "; ".join(n) for s, n in r.notes.items()},
        })  # fmt: skip
    return {
        "machine": machine,
        "run": {"id": results.run_id, "command": command, "sizes": results.sizes.describe(),
                "elapsed_seconds": round(results.elapsed, 1), "interrupted": results.interrupted,
                "retried_after_stack_restart": results.retried},
        "workloads": workloads,
        "targets": targets(results),
    }


def _peers(systems: list[str]) -> list[tuple[str, str]]:
    """The (system, baseline) pairs besides hybridfs's shown in this run: e.g. s3fs relative to the floor."""
    return [(s, b) for s, b in PEER_RATIOS if s in systems and b in systems]


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    return float(f"{value:.6g}")


def markdown(results: Results, machine: dict[str, Any], command: str, chart: str | None) -> str:
    systems = results.systems
    baselines = [b for b in BASELINES if b in systems] if "hybridfs" in systems else []
    footnotes: list[str] = []

    def footnote(text: str) -> str:
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    lines = [
        f"Command: `{command}` ({results.sizes.mode}; {results.elapsed / 60:.1f} min"
        + (f"; INTERRUPTED: {results.interrupted}" if results.interrupted else "") + ")",
        "",
        f"Machine: {one_line(machine)}.",
        "",
        f"Sizes: {results.sizes.summary()}. Values are medians of the runs; MB/s = 10^6 bytes/s. "
        f"Ratios are hybridfs relative to the baseline (above 1 = hybridfs better, for times too; against the "
        f"floor, a bare pyfuse3 passthrough, it is the floor's cost per request over hybridfs's). "
        f"{ACK_MARK} = close() returned before S3 held the data (write-back).",
        "",
    ]
    rss_systems = [s for s in systems if any(r.peak_rss.get(s) for r in results.metrics)]
    peers = _peers(systems)
    head = ["Workload", "Unit", *systems, *(f"vs {b}" for b in baselines), *(f"{s} vs {b}" for s, b in peers)]
    if rss_systems:
        head.append("peak RSS MiB (" + " / ".join(rss_systems) + ")")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
    for r in results.metrics:
        cells = [_title(r, results), r.metric.unit]
        for s in systems:
            median = r.median(s)
            if median is None:
                why = "; ".join(r.notes.get(s, [])) or "not measured"
                cells.append("n/a " + footnote(f"{s}: {why}"))
            else:
                cells.append(fmt(median) + (f" {ACK_MARK}" if r.acked_before_durable(s) else ""))
        for b in baselines:
            value = ratio(r, b)
            cells.append("" if value is None else f"{value:.2f}x")
        for s, b in peers:
            value = ratio(r, b, s)
            cells.append("" if value is None else f"{value:.2f}x")
        if rss_systems:
            peaks = [r.rss(s) for s in rss_systems]
            cells.append(" / ".join("-" if p is None else f"{p:.0f}" for p in peaks))
        lines.append("| " + " | ".join(cells) + " |")
    extra = [(r, s, n) for r in results.metrics for s, notes in r.notes.items() for n in notes
             if r.median(s) is not None]
    extra += [(r, s, f"close() returned {statistics.median(lags):.2f}s (median) before S3 held the data")
              for r in results.metrics for s, lags in r.lags.items() if r.acked_before_durable(s)]
    if footnotes or extra:
        lines.append("")
        lines += [f"{i + 1}. {text}" for i, text in enumerate(footnotes)]
        lines += [f"- {r.metric.name}, {s}: {n}" for r, s, n in extra]
    if results.retried:
        lines += ["", "Runs repeated because the local stack was restarted under them: "
                  + "; ".join(results.retried) + "."]
    tgt = targets(results)
    if any(t["ratio"] is not None for t in tgt):
        lines += ["", "Targets (issues 14 and 23):", ""]
        for t in tgt:
            if t["ratio"] is None:
                verdict = "not measured"
            else:
                verdict = f"{t['ratio']:.2f}x - {'met' if t['met'] else 'SHORT'}"
            lines.append(f"- {t['metric']} >= {t['min_ratio']:g}x {t['baseline']}: {verdict}")
    if chart:
        lines += ["", f"![benchmark results]({chart})"]
    return "\n".join(lines) + "\n"


def charts(results: Results, out_dir: Path) -> list[Path]:
    """bench.png: one panel per metric, a bar per system; ratios.png: hybridfs / each baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    metrics = [r for r in results.metrics if any(r.median(s) is not None for s in results.systems)]
    if metrics:
        cols = min(4, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, r in zip(axes.flat, metrics, strict=False):
            values = [r.median(s) for s in results.systems]
            present = [v for v in values if v]
            top = max(present, default=1.0)
            log_scale = bool(present) and top / min(present) > 30  # e.g. the bare disk next to S3
            if log_scale:
                ax.set_yscale("log")
                floor = min(present) / 3
                ax.set_ylim(floor, top * 5)
            else:
                floor = 0.0
                ax.set_ylim(0, top * 1.18)
            bars = ax.bar(results.systems, [(v or floor) - floor for v in values], bottom=floor,
                          color=[COLORS.get(s, "#333") for s in results.systems])
            for bar, value, system in zip(bars, values, results.systems, strict=True):
                label = "n/a" if value is None else fmt(value)
                if value is not None and r.acked_before_durable(system):
                    label += ACK_MARK
                y = (value or floor) * 1.15 if log_scale else (value or 0) + top * 0.02
                ax.text(bar.get_x() + bar.get_width() / 2, y, label, ha="center", va="bottom", fontsize=7)
            better = "higher" if r.metric.higher_is_better else "lower"
            scale = ", log scale" if log_scale else ""
            ax.set_title(f"{_title(r, results)}\n[{r.metric.unit}, {better} is better{scale}]", fontsize=8)
            ax.tick_params(axis="x", labelsize=7, rotation=30)
            ax.tick_params(axis="y", labelsize=7)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.suptitle(f"hybridfs bench ({results.sizes.mode}): medians of {results.sizes.runs} runs", fontsize=10)
        fig.tight_layout()
        path = out_dir / "bench.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    baselines = [b for b in BASELINES if b in results.systems] if "hybridfs" in results.systems else []
    rows_r = [(r, {b: ratio(r, b) for b in baselines}) for r in results.metrics]
    rows_r = [(r, v) for r, v in rows_r if any(x is not None for x in v.values())]
    if rows_r:
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows_r) + 1.3))
        height = 0.8 / max(1, len(baselines))
        for i, b in enumerate(baselines):
            ys = [k + i * height for k in range(len(rows_r))]
            xs = [v[b] or 0.0 for _, v in rows_r]
            ax.barh(ys, xs, height=height, color=COLORS[b], label=f"vs {b}")
        ax.set_yticks([k + (len(baselines) - 1) * height / 2 for k in range(len(rows_r))])
        ax.set_yticklabels([r.metric.name for r, _ in rows_r], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("hybridfs relative to baseline (log scale; right of 1 = hybridfs better)", fontsize=8)
        ax.legend(fontsize=7)
        ax.set_title(f"hybridfs relative to each baseline ({results.sizes.mode}, medians of {results.sizes.runs} "
                     "runs)", fontsize=9)
        fig.tight_layout()
        path = out_dir / "ratios.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def write_all(results: Results, machine: dict[str, Any], command: str, out_dir: Path,
              json_path: Path | None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    json_path = json_path or out_dir / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(to_json(results, machine, command), indent=2) + "\n")
    written["json"] = json_path
    try:
        pngs = charts(results, out_dir)
    except ImportError:
        pngs = []  # matplotlib is in the `bench` extra
    for p in pngs:
        written[p.stem] = p
    md = out_dir / "results.md"
    md.write_text(markdown(results, machine, command, "bench.png" if pngs else None))
    written["markdown"] = md
    return written



def from_json(data: dict[str, Any]) -> tuple[Results, dict[str, Any], str]:
    """Rebuild what ``to_json`` wrote (for ``hybridfs bench --report FILE``: re-render without re-running)."""
    run = data["run"]
    sz = run["sizes"]
    sizes = Sizes(mode=sz["mode"], runs=sz["runs"], big_file=sz["big_file_bytes"], many_count=sz["many_files"],
                  many_size=sz["many_file_bytes"], small_count=sz["small_files"], small_size=sz["small_file_bytes"],
                  list_count=sz["list_entries"], randread_seconds=sz["randread_seconds"], block=sz["block_bytes"],
                  request_seconds=sz.get("request_seconds", 5.0))
    known = {m.name: m for m in METRICS}
    metrics = []
    systems: list[str] = []
    for w in data["workloads"]:
        metric = known.get(w["name"]) or Metric(w["name"], w["unit"], w.get("title", w["name"]))
        r = MetricResult(metric, w.get("description", ""))
        r.runs = {s: list(v) for s, v in w.get("runs", {}).items() if v}
        r.notes = {s: [n] for s, n in w.get("notes", {}).items() if n}
        r.lags = {s: list(v) for s, v in w.get("durability_lag_seconds", {}).items()}
        r.peak_rss = {s: list(v) for s, v in w.get("peak_rss_mib", {}).items()}
        r.acked_early = {s: [bool(flag)] for s, flag in w.get("acked_before_durable", {}).items()}
        systems += [s for s in w.get("results", {}) if s not in systems]
        metrics.append(r)
    results = Results(sizes, systems, metrics, started=0.0, elapsed=run.get("elapsed_seconds", 0.0),
                      interrupted=run.get("interrupted"), run_id=run.get("id", ""),
                      retried=list(run.get("retried_after_stack_restart", [])))
    return results, data["machine"], run.get("command", "hybridfs bench")
