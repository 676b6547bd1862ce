"""Results of ``hybridfs bench availability``: JSON (every op kept), a Markdown table and a timeline chart."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from hybridfs.bench.avail_schedule import GROUPS, Phase, describe, summary
from hybridfs.bench.availability import TITLES, RunResult, Settings
from hybridfs.bench.machine import one_line
from hybridfs.bench.report import COLORS

READ_KINDS = ("read", "stat", "list")
BIN_SECONDS = 5.0


def cause(op: list[Any], deadline: float) -> str:
    """Why an op was unavailable ("" when it was served within the deadline). op = [kind, start, phase, lat, err]."""
    latency, error = op[3], op[4]
    if latency is None:
        return error or "hung"
    if latency > deadline:
        return f"late ({error})" if error else "late"
    return error


def _pct(good: int, total: int) -> float | None:
    return None if total == 0 else round(100.0 * good / total, 3)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def stats(ops: list[list[Any]], deadline: float) -> dict[str, Any]:
    causes = Counter(c for op in ops if (c := cause(op, deadline)))
    good = len(ops) - sum(causes.values())
    reads = [op for op in ops if op[0] in READ_KINDS]
    writes = [op for op in ops if op[0] == "write"]
    latencies = [op[3] for op in ops if op[3] is not None]
    p50, p99 = _quantile(latencies, 0.5), _quantile(latencies, 0.99)
    return {
        "ops": len(ops), "within_deadline": good, "availability_pct": _pct(good, len(ops)),
        "read_availability_pct": _pct(sum(not cause(op, deadline) for op in reads), len(reads)),
        "write_availability_pct": _pct(sum(not cause(op, deadline) for op in writes), len(writes)),
        "p50_ms": None if p50 is None else round(p50 * 1000, 1),
        "p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "unavailable_by_cause": dict(causes.most_common()),
        "unavailable_by_op": dict(Counter(op[0] for op in ops if cause(op, deadline)).most_common()),
    }  # fmt: skip


def _select(run: dict[str, Any], phases: list[dict[str, Any]], group: str | None = None,
            phase: int | None = None) -> list[list[Any]]:
    return [op for op in run["ops"]
            if (group is None or phases[op[2]]["group"] == group) and (phase is None or op[2] == phase)]


def summarise(runs: list[dict[str, Any]], phases: list[dict[str, Any]], deadline: float) -> dict[str, Any]:
    """Per system: each group and phase over all repetitions, the spread of the repetitions, durability."""
    systems: dict[str, Any] = {}
    for name in dict.fromkeys(r["system"] for r in runs):
        mine = [r for r in runs if r["system"] == name]
        entry: dict[str, Any] = {"groups": {}, "phases": [], "durability": {}}
        for group in (*GROUPS, None):
            label = group or "all"
            ops = [op for r in mine for op in _select(r, phases, group=group)]
            figures = stats(ops, deadline)
            per_rep = [stats(_select(r, phases, group=group), deadline)["availability_pct"] for r in mine]
            figures["repetitions_pct"] = per_rep
            entry["groups"][label] = figures
        for index, phase in enumerate(phases):
            ops = [op for r in mine for op in _select(r, phases, phase=index)]
            entry["phases"].append({"fault": phase["fault"], "start": phase["start"], **stats(ops, deadline)})
        keys = ("acked", "missing", "wrong", "failed_writes", "unfinished_writes", "failed_left_whole_object",
                "failed_left_wrong_object", "lost_with_removed_disk")
        entry["durability"] = {k: sum(r["durability"].get(k, 0) for r in mine) for k in keys
                               if any(k in r["durability"] for r in mine)}
        entry["durability"]["checked_in"] = mine[0]["durability"].get("checked_in")
        systems[name] = entry
    return systems


def to_json(results: list[RunResult], phases: tuple[Phase, ...], settings: Settings, machine: dict[str, Any],
            command: str, run_id: str, elapsed: float) -> dict[str, Any]:
    described = describe(phases)
    runs = [{"system": r.system, "repetition": r.repetition, "started": r.started, "durability": r.durability,
             "log_warnings": r.log_lines, "notes": r.notes, "ops": [op.to_json() for op in r.ops]}
            for r in results]  # fmt: skip
    return {
        "machine": machine,
        "run": {"id": run_id, "command": command, "elapsed_seconds": round(elapsed, 1),
                "schedule": described, "schedule_summary": summary(phases),
                "settings": {k: v for k, v in settings.__dict__.items()},
                "op_fields": ["kind", "start_s", "phase", "latency_s", "error", "path"]},
        "systems": summarise(runs, described, settings.deadline),
        "runs": runs,
    }  # fmt: skip


def _fmt_pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "100 %" if value == 100 else f"{value:.2f} %"


def _spread(figures: dict[str, Any]) -> str:
    reps = [v for v in figures.get("repetitions_pct", []) if v is not None]
    text = _fmt_pct(figures["availability_pct"])
    if len(reps) > 1:
        text += f" ({min(reps):.1f} to {max(reps):.1f})"
    return text


def _durability_cell(d: dict[str, Any]) -> str:
    if d.get("checked_in") != "s3":
        lost = d.get("lost_with_removed_disk", 0)
        return f"{d.get('missing', 0):,} of {d.get('acked', 0):,} (local; {lost:,} with the removed disk)"
    text = f"{d.get('missing', 0) + d.get('wrong', 0):,} of {d.get('acked', 0):,}"
    if d.get("wrong"):
        text += f" ({d['wrong']} wrong)"
    return text


def markdown(data: dict[str, Any], chart: str | None) -> str:
    run, systems = data["run"], data["systems"]
    deadline = run["settings"]["deadline"]
    lines = [
        f"Command: `{run['command']}` ({run['elapsed_seconds'] / 60:.1f} min)", "",
        f"Machine: {one_line(data['machine'])}.", "",
        f"Schedule: {run['schedule_summary']}. Workload: {run['settings']['rate']:g} ops/s (40 % writes of new "
        f"32 KiB files, 30 % verified reads and 20 % stats of earlier files, 10 % listings), each op's deadline "
        f"{deadline:g} s. hybridfs's state directory: "
        + ("on an unfaulted disk." if run["settings"]["state_on_safe_disk"] else "on the faulted cache disk."),
        "",
        "Availability = ops served correctly within the deadline (all repetitions; the range of the repetitions in "
        "brackets).", "",
        "| system | " + " | ".join(GROUPS) + " | all | reads / writes | acked writes missing or wrong | "
        "failed writes that left objects |",
        "|---|" + "---:|" * (len(GROUPS) + 4),
    ]  # fmt: skip
    for name, s in systems.items():
        g = s["groups"]
        d = s["durability"]
        left = (f"{d.get('failed_left_whole_object', 0)} whole, {d.get('failed_left_wrong_object', 0)} wrong "
                f"(of {d.get('failed_writes', 0) + d.get('unfinished_writes', 0)})" if d.get("checked_in") == "s3"
                else "n/a")
        cells = [TITLES.get(name, name), *(_spread(g[grp]) for grp in GROUPS), _spread(g["all"]),
                 f"{_fmt_pct(g['all']['read_availability_pct'])} / {_fmt_pct(g['all']['write_availability_pct'])}",
                 _durability_cell(d), left]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per phase (availability; p50 / p99 latency in ms of the ops that finished):", "",
              "| # | fault | s | " + " | ".join(systems) + " |", "|---:|---|---:|" + "---:|" * len(systems)]
    for index, phase in enumerate(run["schedule"]):
        cells = [str(index + 1), phase["fault"], f"{phase['seconds']:g}"]
        for s in systems.values():
            p = s["phases"][index]
            cells.append(f"{_fmt_pct(p['availability_pct'])} ({p['p50_ms']} / {p['p99_ms']})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Unavailable ops by cause (late = finished after the deadline; hung = never finished):", ""]
    for name, s in systems.items():
        parts = []
        for grp in (*GROUPS,):
            causes = s["groups"][grp]["unavailable_by_cause"]
            if causes:
                parts.append(f"{grp}: " + ", ".join(f"{k} {v}" for k, v in causes.items()))
        lines.append(f"- {name}: " + ("; ".join(parts) if parts else "none"))
    notes = [(r["system"], r["repetition"], n) for r in data["runs"] for n in r["notes"]]
    if notes:
        lines += ["", *(f"- {s} r{rep}: {n}" for s, rep, n in notes)]
    if chart:
        lines += ["", f"![availability timeline]({chart})"]
    return "\n".join(lines) + "\n"


def chart(data: dict[str, Any], out_dir: Path) -> Path | None:
    """avail.png: per system, the share of ops served within the deadline per 5 s, fault phases shaded."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = data["run"]
    deadline = run["settings"]["deadline"]
    total = sum(p["seconds"] for p in run["schedule"])
    bins = int(total // BIN_SECONDS) + 1
    fig, ax = plt.subplots(figsize=(11, 4))
    shades = {"local faults": "#fdd0a2", "S3 outage": "#c6dbef", "Kafka outage": "#d9d9d9"}
    for phase in run["schedule"]:
        if phase["group"] in shades:
            ax.axvspan(phase["start"], phase["start"] + phase["seconds"], color=shades[phase["group"]], alpha=0.8,
                       linewidth=0)
    for name in data["systems"]:
        good, count = [0] * bins, [0] * bins
        for r in data["runs"]:
            if r["system"] != name:
                continue
            for op in r["ops"]:
                b = min(bins - 1, int(op[1] // BIN_SECONDS))
                count[b] += 1
                good[b] += not cause(op, deadline)
        xs = [i * BIN_SECONDS + BIN_SECONDS / 2 for i in range(bins) if count[i]]
        ys = [100.0 * good[i] / count[i] for i in range(bins) if count[i]]
        ax.plot(xs, ys, label=name, color=COLORS.get(name, "#333"), linewidth=1.4)
    ax.set_ylim(-3, 103)
    ax.set_xlim(0, total)
    ax.set_xlabel("seconds into the schedule (orange: local-disk faults, blue: S3, grey: Kafka)", fontsize=8)
    ax.set_ylabel(f"% of ops served within {deadline:g} s", fontsize=8)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("hybridfs bench availability: ops served per 5 s under the fault schedule", fontsize=9)
    fig.tight_layout()
    path = out_dir / "availability.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(data: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / "availability.json"}
    written["json"].write_text(json.dumps(data, separators=(",", ":")) + "\n")  # every op: keep it compact
    png = chart(data, out_dir)
    if png is not None:
        written["chart"] = png
    written["markdown"] = out_dir / "availability.md"
    written["markdown"].write_text(markdown(data, png.name if png else None))
    return written
