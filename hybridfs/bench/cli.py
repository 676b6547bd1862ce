"""``hybridfs bench``: fio and friends against hybridfs and its baselines, in one run, as ratios.

Starts the local stack, mounts hybridfs, s3fs-fuse (use_cache) and rclone (--vfs-cache-mode full) on their own
prefixes of the same bucket, and the floor (benchmarks/passthrough.py, a bare pyfuse3 passthrough of a directory on
the cache disk), runs every workload several times on each system and on the baselines (the bare cache disk, plain
boto3), and writes results.json, results.md and PNG charts to the output directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hybridfs.bench import plan
from hybridfs.cli import CliError

log = logging.getLogger("hybridfs.bench")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark hybridfs against the bare disk, the Python floor, boto3, s3fs and rclone",
        description="Run the benchmark workloads on hybridfs and its baselines (the bare cache disk, the "
                    "floor: a bare pyfuse3 passthrough to it, plain boto3, s3fs-fuse, rclone mount) in one run "
                    "against the local stack, and write JSON, a Markdown table and PNG charts. Workloads: "
                    + ", ".join(plan.WORKLOAD_NAMES) + ".")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and 3 runs (finishes in under 10 minutes on 2 cores): "
                             + plan.QUICK.summary())
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test's size
    parser.add_argument("--only", action="append", metavar="NAMES",
                        help="comma-separated workloads (globs allowed), e.g. seq-read-warm,small-files")
    parser.add_argument("--systems", metavar="NAMES", default=",".join(plan.SYSTEMS),
                        help=f"comma-separated systems (default {','.join(plan.SYSTEMS)})")
    parser.add_argument("--runs", type=int, metavar="N", help="runs per workload and system (default 5, quick 3)")
    parser.add_argument("--json", metavar="FILE", help="where to write the JSON results (default OUT/results.json)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default ./bench-results/<time>)")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="scratch space on the cache disk: caches and baseline files (default OUT/work; "
                             "removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the S3 objects and scratch data afterwards")
    parser.add_argument("--report", metavar="JSON",
                        help="only re-render results.md and the charts from an earlier JSON (into --out or its dir)")
    parser.add_argument("--no-stack", action="store_true", help="do not run `hybridfs stack up` (already running)")
    parser.set_defaults(func=run)
    verbs = parser.add_subparsers(dest="bench_verb", metavar="VERB", required=False)
    from hybridfs.bench.avail_cli import register as register_availability

    register_availability(verbs)
    from hybridfs.bench.torture import register as register_torture

    register_torture(verbs)


def _split(values: list[str] | str | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _check_tools(systems: list[str]) -> None:
    if shutil.which("fio") is None:
        raise CliError("fio is not installed (scripts/bootstrap installs it: apt-get install fio)")
    if any(s in plan.FUSE_SYSTEMS for s in systems):
        if not os.path.exists("/dev/fuse"):
            raise CliError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
        if shutil.which("fusermount3") is None:
            raise CliError("fusermount3 is not installed (apt-get install fuse3)")


def _stack_up() -> None:
    print("==> hybridfs stack up", flush=True)
    proc = subprocess.run([sys.executable, "-m", "hybridfs", "stack", "up"], check=False)
    if proc.returncode != 0:
        raise CliError(f"`hybridfs stack up` failed (status {proc.returncode}); see its output above")


def run(args: argparse.Namespace) -> int:
    from hybridfs.bench.machine import describe
    from hybridfs.bench.report import write_all
    from hybridfs.bench.runner import Runner

    if args.report:
        return rerender(Path(args.report), Path(args.out) if args.out else None)
    sizes = plan.TINY if args.tiny else plan.QUICK if args.quick else plan.FULL
    if args.runs is not None:
        if args.runs < 1:
            raise CliError("--runs must be at least 1")
        sizes = plan.Sizes(**{**sizes.__dict__, "runs": args.runs})
    try:
        workloads = plan.select(_split(args.only))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    systems = _split(args.systems)
    unknown = [s for s in systems if s not in plan.SYSTEMS]
    if unknown or not systems:
        raise CliError(f"unknown system {', '.join(unknown) or '(none)'}; choose from {', '.join(plan.SYSTEMS)}")
    systems = [s for s in plan.SYSTEMS if s in systems]
    out_dir = Path(args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")).absolute()
    work_dir = Path(args.work_dir).absolute() if args.work_dir else out_dir / "work"
    _check_tools(systems)
    out_dir.mkdir(parents=True, exist_ok=True)
    _log_to_file(out_dir / "bench.log")
    if not args.no_stack:
        _stack_up()
    command = "hybridfs " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "hybridfs bench"
    work_dir.mkdir(parents=True, exist_ok=True)
    machine = describe(work_dir)
    print(f"==> hybridfs bench: {len(workloads)} workloads x {len(systems)} systems; {sizes.summary()}")
    print(f"    output {out_dir}; scratch {work_dir}", flush=True)
    runner = Runner(sizes, workloads, systems, out_dir, work_dir, keep=args.keep)
    results = runner.run()
    machine["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    written = write_all(results, machine, command, out_dir, Path(args.json).absolute() if args.json else None)
    print(f"==> done in {results.elapsed / 60:.1f} min: " + ", ".join(str(p) for p in written.values()))
    print(written["markdown"].read_text(), end="")
    if results.interrupted:
        return 130
    return 0


def _log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("hybridfs.bench")
    logger.handlers[:] = [handler, console]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the progress lines are the console output; details go to bench.log
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def rerender(json_path: Path, out_dir: Path | None) -> int:
    import json

    from hybridfs.bench.report import charts, from_json, markdown

    try:
        data = json.loads(json_path.read_text())
        results, machine, command = from_json(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"cannot read results from {json_path}: {exc}") from None
    out_dir = (out_dir or json_path.parent).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = charts(results, out_dir)
    md = out_dir / "results.md"
    md.write_text(markdown(results, machine, command, "bench.png" if pngs else None))
    print(f"wrote {md}" + "".join(f", {p}" for p in pngs))
    return 0
