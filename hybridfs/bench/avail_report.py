"""Results of ``hybridfs bench availability``: JSON (every op kept), a Markdown table and a timeline chart."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridfs.bench import avail_sla
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


def _yearly_of_run(run: dict[str, Any], phases: list[dict[str, Any]], deadline: float,
                   sla: dict[str, float]) -> dict[str, Any] | None:
    """One repetition's modelled year (avail_sla), and its p99 latency in the no-fault phases."""
    served: dict[str, float | None] = {}
    for group in GROUPS:
        figures = stats(_select(run, phases, group=group), deadline)
        served[group] = None if figures["ops"] == 0 else figures["within_deadline"] / figures["ops"]
    if served[avail_sla.NO_FAULT] is None:
        return None
    year = avail_sla.yearly(served, sla)
    return {"repetition": run["repetition"], "availability_pct": 100.0 * year.availability,
            "nines": None if year.nines is None else round(year.nines, 3),
            "minutes_down": round(year.minutes_down, 2), "unmeasured": list(year.unmeasured),
            "p99_no_fault_ms": stats(_select(run, phases, group=avail_sla.NO_FAULT), deadline)["p99_ms"]}


def add_yearly(data: dict[str, Any], sla: dict[str, float]) -> None:
    """Per system, ``yearly``: the figure over a year at ``sla`` per repetition, and their median, min and max."""
    phases, deadline = data["run"]["schedule"], data["run"]["settings"]["deadline"]
    data["run"]["sla_pct"] = dict(sla)
    for name, entry in data["systems"].items():
        reps = [y for r in data["runs"] if r["system"] == name
                if (y := _yearly_of_run(r, phases, deadline, sla)) is not None]
        if not reps:
            entry["yearly"] = None
            continue
        p99s = [y["p99_no_fault_ms"] for y in reps if y["p99_no_fault_ms"] is not None]
        entry["yearly"] = {
            "availability_pct": avail_sla.spread([y["availability_pct"] for y in reps]),
            "minutes_down": avail_sla.spread([y["minutes_down"] for y in reps]),
            "p99_no_fault_ms": avail_sla.spread(p99s) if p99s else None,
            "unmeasured": reps[0]["unmeasured"],
            "repetitions": reps,
        }  # fmt: skip


def to_json(results: list[RunResult], phases: tuple[Phase, ...], settings: Settings, machine: dict[str, Any],
            command: str, run_id: str, elapsed: float, sla: dict[str, float] | None = None) -> dict[str, Any]:
    described = describe(phases)
    runs = [{"system": r.system, "repetition": r.repetition, "started": r.started, "durability": r.durability,
             "log_warnings": r.log_lines, "notes": r.notes, "ops": [op.to_json() for op in r.ops]}
            for r in results]  # fmt: skip
    data = {
        "machine": machine,
        "run": {"id": run_id, "command": command, "elapsed_seconds": round(elapsed, 1),
                "schedule": described, "schedule_summary": summary(phases),
                "settings": {k: v for k, v in settings.__dict__.items()},
                "op_fields": ["kind", "start_s", "phase", "latency_s", "error", "path"]},
        "systems": summarise(runs, described, settings.deadline),
        "runs": runs,
    }  # fmt: skip
    add_yearly(data, sla or avail_sla.DEFAULT_SLA)
    return data


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


def _ranged(spread: dict[str, float] | None, fmt: Callable[[float], str], unit: str = "") -> str:
    """``median unit [min-max]``, or the one value when the repetitions agree (or there is one)."""
    if spread is None:
        return "n/a"
    if spread["min"] == spread["max"]:
        return fmt(spread["median"]) + unit
    return f"{fmt(spread['median'])}{unit} [{fmt(spread['min'])}-{fmt(spread['max'])}]"


def _year_pct(value: float) -> str:
    """Four decimals (half a minute a year), more when that would round a shortfall up to 100."""
    digits = 4
    while digits < 8 and value < 100 and round(value, digits) >= 100:
        digits += 1
    return f"{value:.{digits}f}"


def _nines(pct: float) -> str:
    return "∞" if pct >= 100 else f"{-math.log10(1 - pct / 100):.2f}"


def _yearly_lines(data: dict[str, Any]) -> list[str]:
    """The figure users quote: each system's availability over a year at the run's --sla (avail_sla)."""
    sla = data["run"].get("sla_pct") or avail_sla.DEFAULT_SLA
    systems = data["systems"]
    repeats = max((len(s["yearly"]["repetitions"]) for s in systems.values() if s.get("yearly")), default=0)
    lines = [
        "", f"Over a year at {avail_sla.describe_sla(sla)}: each phase group's measured availability weighted by "
        "how long that component is down in a year, the no-fault phases' for the rest; outages of different "
        "components assumed not to overlap (the formula: docs/availability.md)"
        + (f"; median [min-max] of {repeats} repetitions" if repeats > 1 else "") + ".", "",
        "| system | availability over a year | nines | unavailable a year | p99 latency, no-fault phases |",
        "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    unmeasured: set[str] = set()
    for name, s in systems.items():
        year = s.get("yearly")
        if not year:
            lines.append(f"| {TITLES.get(name, name)} | n/a (no op in a no-fault phase) | | | |")
            continue
        unmeasured.update(year["unmeasured"])
        pct = year["availability_pct"]
        cells = [TITLES.get(name, name), _ranged(pct, _year_pct, " %"), _ranged(pct, _nines),
                 _ranged(year["minutes_down"], lambda v: f"{v:,.1f}", " min"),
                 _ranged(year["p99_no_fault_ms"], lambda v: f"{v:,.1f}", " ms")]
        lines.append("| " + " | ".join(cells) + " |")
    if unmeasured:
        names = [avail_sla.COMPONENTS[c] for c in avail_sla.COMPONENTS if c in unmeasured]
        lines += ["", f"Not in this schedule: {', '.join(names)}. The model counts that time as fault-free, so "
                      "the figures above leave those outages out."]
    return lines


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
    lines += _yearly_lines(data)
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
