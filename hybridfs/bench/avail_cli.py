"""``hybridfs bench availability``: the command line of hybridfs/bench/availability.py."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hybridfs.cli import CliError


def register(subparsers: Any) -> None:
    from hybridfs.bench.avail_schedule import DEFAULT, FAULTS, summary
    from hybridfs.bench.availability import SYSTEMS

    parser = subparsers.add_parser(
        "availability", help="availability and durability of each system under a fault schedule",
        description="Run one steady workload (writes of new files, verified reads, stats, listings; each op with "
                    "a deadline) on hybridfs, rclone (--vfs-cache-mode full), s3fs (use_cache) and the local disk "
                    "alone while a fault schedule runs on each system's own cache disk (tmpfs), S3 fault proxy and "
                    "Kafka broker, one system after another; then check every acknowledged write in S3. Writes "
                    "availability.json, availability.md and availability.png. Needs root (tmpfs and bind mounts). "
                    f"Default schedule: {summary(DEFAULT)}. Faults: " + "; ".join(f"{k}: {v}" for k, v in
                                                                             FAULTS.items()) + ".")
    parser.add_argument("--systems", metavar="NAMES", default=",".join(SYSTEMS),
                        help=f"comma-separated systems (default {','.join(SYSTEMS)})")
    parser.add_argument("--schedule", metavar="FILE", help="TOML schedule of [[phase]] tables (fault, seconds, "
                        "delay); see docs/availability.md")
    parser.add_argument("--duration", type=float, metavar="S",
                        help="stretch or shrink the schedule to S seconds (default: as written, 336 s by default)")
    parser.add_argument("--rate", type=float, default=10.0, metavar="N", help="ops started per second (default 10)")
    parser.add_argument("--deadline", type=float, default=2.0, metavar="S", help="each op's deadline (default 2)")
    parser.add_argument("--settle", type=float, default=30.0, metavar="S",
                        help="seconds between the end of the schedule and the durability check (default 30)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="repetitions per system, all runs in random order (default 1)")
    parser.add_argument("--disk-size", default="256M", metavar="SIZE", help="each system's cache disk (tmpfs)")
    parser.add_argument("--state-on-safe-disk", action="store_true",
                        help="keep hybridfs's state directory off the faulted disk (default: on it, beside the "
                             "cache, as the peers keep their metadata in their cache directories)")
    parser.add_argument("--hybridfs-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `hybridfs mount` (repeatable), e.g. --hybridfs-arg=--write-timeout=10")
    parser.add_argument("--sla", metavar="C=PCT,...",
                        help="component availabilities for the figure over a year (default local=99.9,s3=99.99,"
                             "kafka=99.9; with --report: the run's own); see docs/availability.md")
    parser.add_argument("--seed", type=int, default=0, help="seed of the op mix (the run order is random)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default ./bench-results/avail-<time>)")
    parser.add_argument("--report", metavar="JSON", help="only re-render availability.md and the chart")
    parser.add_argument("--no-stack", action="store_true", help="do not run `hybridfs stack up` (already running)")
    parser.set_defaults(func=run)


def _size(text: str) -> int:
    from hybridfs.config import parse_size

    return int(parse_size(text))


def run(args: argparse.Namespace) -> int:
    from hybridfs.bench import avail_report, avail_schedule, avail_sla
    from hybridfs.bench.availability import SYSTEMS, Settings, run_all
    from hybridfs.bench.cli import _log_to_file, _split, _stack_up
    from hybridfs.bench.machine import describe

    try:
        sla = avail_sla.parse_sla(args.sla) if args.sla else None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.report:
        return _rerender(Path(args.report), Path(args.out) if args.out else None, sla)
    if os.geteuid() != 0:
        raise CliError("bench availability needs root: it mounts a tmpfs per system and bind-mounts it read-only")
    systems = _split(args.systems)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise CliError(f"unknown system {', '.join(unknown) or '(none)'}; choose from {', '.join(SYSTEMS)}")
    for tool in ("rclone", "s3fs"):
        if tool in systems and shutil.which(tool) is None:
            raise CliError(f"{tool} is not installed (scripts/bootstrap installs it from Debian)")
    try:
        phases = avail_schedule.load(Path(args.schedule)) if args.schedule else avail_schedule.DEFAULT
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.duration:
        phases = avail_schedule.scaled(phases, args.duration)
    if args.repeat < 1 or args.rate <= 0 or args.deadline <= 0:
        raise CliError("--repeat, --rate and --deadline must be positive")
    disk = _size(args.disk_size)
    settings = Settings(rate=args.rate, deadline=args.deadline, settle=args.settle, disk_size=disk,
                        cache_size=disk // 2, state_on_safe_disk=args.state_on_safe_disk,
                        hybridfs_args=list(args.hybridfs_arg), seed=args.seed)
    out_dir = Path(args.out or Path("bench-results") / time.strftime("avail-%Y%m%d-%H%M%S")).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    _log_to_file(out_dir / "bench.log")
    if not args.no_stack:
        _stack_up()
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    machine = describe(work)
    command = "hybridfs " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "hybridfs bench"
    print(f"==> bench availability: {', '.join(systems)} x {args.repeat}; schedule "
          f"{avail_schedule.summary(phases)}; output {out_dir}", flush=True)
    started = time.monotonic()
    results, run_id = run_all(systems, args.repeat, phases, settings, work, out_dir / "logs",
                              lambda text: print(text, flush=True))
    machine["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    data = avail_report.to_json(results, phases, settings, machine, command, run_id, time.monotonic() - started,
                                sla)
    written = avail_report.write_all(data, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    print("==> done: " + ", ".join(str(p) for p in written.values()))
    print(written["markdown"].read_text(), end="")
    return 0


def _rerender(json_path: Path, out_dir: Path | None, sla: dict[str, float] | None) -> int:
    import json

    from hybridfs.bench import avail_report, avail_sla

    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {json_path}: {exc}") from None
    # the figure over a year is computed again from the ops (a JSON written before it existed gets it too)
    avail_report.add_yearly(data, sla or data["run"].get("sla_pct") or avail_sla.DEFAULT_SLA)
    target = (out_dir or json_path.parent).absolute()
    target.mkdir(parents=True, exist_ok=True)
    png = avail_report.chart(data, target)
    md = target / "availability.md"
    md.write_text(avail_report.markdown(data, png.name if png else None))
    print(f"wrote {md}" + (f", {png}" if png else ""))
    return 0
