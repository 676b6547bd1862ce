"""What a benchmark run measures: the sizes of each mode, the workloads, the metrics they report, the systems.

Pure data (no I/O), so the CLI, the runner, the report and the tests share one description.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

MiB = 1024**2
GiB = 1024**3

SYSTEMS = ("hybridfs", "disk", "floor", "boto3", "s3fs", "rclone")
FUSE_SYSTEMS = ("hybridfs", "floor", "s3fs", "rclone")
BASELINES = ("disk", "floor", "boto3", "s3fs", "rclone")
# "floor" is benchmarks/passthrough.py: a bare pyfuse3 + trio passthrough to the local disk, the least a FUSE
# request served in Python costs (issue 23). Besides hybridfs, other systems are also shown relative to it.
PEER_RATIOS: tuple[tuple[str, str], ...] = (("s3fs", "floor"),)


@dataclass(frozen=True)
class Sizes:
    mode: str
    runs: int
    big_file: int  # the one large file: written sequentially, then read cold, warm and at random
    many_count: int  # the "many files" set (also what hydration and eviction move)
    many_size: int
    small_count: int  # small-file create/stat/read/unlink
    small_size: int
    list_count: int  # entries in the listed directory
    randread_seconds: int  # fio runtime of one random-read run
    block: int = MiB  # sequential I/O size
    coherence_changes: int = 200  # changes timed per writer in the coherence workloads
    request_seconds: float = 5.0  # how long each per-request loop (stat, getxattr) runs

    def describe(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "runs": self.runs,
            "big_file_bytes": self.big_file,
            "many_files": self.many_count,
            "many_file_bytes": self.many_size,
            "small_files": self.small_count,
            "small_file_bytes": self.small_size,
            "list_entries": self.list_count,
            "randread_seconds": self.randread_seconds,
            "block_bytes": self.block,
            "coherence_changes": self.coherence_changes,
            "request_seconds": self.request_seconds,
        }

    def summary(self) -> str:
        return (f"{self.mode}: {self.runs} runs each; big file {human_bytes(self.big_file)}; "
                f"{self.many_count} x {human_bytes(self.many_size)} files; {self.small_count} small files of "
                f"{human_bytes(self.small_size)}; listing {self.list_count} entries; random reads "
                f"{self.randread_seconds}s per run; {human_bytes(self.block)} blocks; {self.coherence_changes} "
                f"coherence changes; stat/getxattr loops {self.request_seconds:g}s each")


FULL = Sizes(mode="full", runs=5, big_file=GiB, many_count=128, many_size=8 * MiB, small_count=2000,
             small_size=4096, list_count=10000, randread_seconds=15)
QUICK = Sizes(mode="quick", runs=3, big_file=256 * MiB, many_count=32, many_size=8 * MiB, small_count=500,
              small_size=4096, list_count=2000, randread_seconds=5, coherence_changes=100, request_seconds=2.0)
# For the smoke test only (`--tiny`): proves the harness end to end in seconds.
TINY = Sizes(mode="tiny", runs=2, big_file=8 * MiB, many_count=3, many_size=8 * MiB, small_count=20,
             small_size=4096, list_count=50, randread_seconds=1, coherence_changes=10, request_seconds=0.3)


@dataclass(frozen=True)
class Metric:
    """One row of the table: a number per system, in ``unit``."""

    name: str
    unit: str  # "MB/s" | "ops/s" | "ms"
    title: str

    @property
    def higher_is_better(self) -> bool:
        return self.unit != "ms"


@dataclass(frozen=True)
class Workload:
    """Something the runner does per system; it reports one or more metrics. ``--only`` selects these."""

    name: str
    metrics: tuple[Metric, ...]
    describe: str  # format string over Sizes fields

    def description(self, sizes: Sizes) -> str:
        return self.describe.format(
            big=human_bytes(sizes.big_file), n=sizes.many_count, each=human_bytes(sizes.many_size),
            small=sizes.small_count, small_size=human_bytes(sizes.small_size), entries=sizes.list_count,
            secs=sizes.randread_seconds, block=human_bytes(sizes.block), changes=sizes.coherence_changes,
            req_secs=f"{sizes.request_seconds:g}",
            many_total=human_bytes(sizes.many_count * sizes.many_size))


def _m(name: str, unit: str, title: str) -> Metric:
    return Metric(name, unit, title)


WORKLOADS: tuple[Workload, ...] = (
    Workload("seq-write-1file", (
        _m("seq-write-1file", "MB/s", "seq write, 1 file (close returned)"),
        _m("seq-write-1file-durable", "MB/s", "seq write, 1 file (until in S3)"),
    ), "sequential write of {block} blocks into one {big} file, timed through close(); durable = from the "
       "start of the write until S3 holds the object"),
    Workload("seq-write-many", (
        _m("seq-write-many", "MB/s", "seq write, many files (close returned)"),
        _m("seq-write-many-durable", "MB/s", "seq write, many files (until in S3)"),
    ), "sequential write of {block} blocks into {n} files of {each} ({many_total}), one after the other, "
       "timed through the last close(); durable = until S3 holds every object"),
    Workload("seq-read-warm", (
        _m("seq-read-warm", "MB/s", "seq read, warm (cached)"),
    ), "sequential read of the {big} file in {block} blocks while it is in the local cache (fio; the page "
       "cache of the file read is dropped first)"),
    Workload("rand-read-warm", (
        _m("rand-read-warm", "ops/s", "random 4 KiB reads, warm"),
    ), "random 4 KiB reads of the cached {big} file, one thread, queue depth 1, O_DIRECT (every read reaches "
       "the filesystem), {secs}s (fio)"),
    Workload("requests", (
        _m("request-stat", "ops/s", "stat, every call a request"),
        _m("request-getxattr", "ops/s", "getxattr, every call a request"),
    ), "one small file, stat for {req_secs}s with statx(AT_STATX_FORCE_SYNC) (the kernel asks the filesystem "
       "every time, its attribute cache bypassed), then getxattr of security.selinux (absent: what `ls -l` asks "
       "of every entry, and FUSE caches no extended attribute) for {req_secs}s; one thread"),
    Workload("small-files", (
        _m("small-create", "ops/s", "small files: create+write+close"),
        _m("small-create-durable", "ops/s", "small files: create (until in S3)"),
        _m("small-stat", "ops/s", "small files: stat"),
        _m("small-read", "ops/s", "small files: open+read+close"),
        _m("small-unlink", "ops/s", "small files: unlink"),
    ), "{small} files: create + write {small_size} + close, then stat, read and unlink each (one thread)"),
    Workload("seq-read-cold", (
        _m("seq-read-cold", "MB/s", "seq read, cold (from S3)"),
    ), "sequential read of the {big} file in {block} blocks from a fresh mount with an empty cache (fio)"),
    Workload("list-dir", (
        _m("list-dir", "ms", "list {entries} entries (ls -l), cold"),
    ), "readdir + stat of every entry (ls -l) of a directory of {entries} files, on a fresh mount"),
    Workload("hydrate-evict", (
        _m("evict", "ops/s", "evict (files/s)"),
        _m("hydrate", "MB/s", "hydrate (MB/s)"),
        _m("hydrate-objects", "ops/s", "hydrate (objects/s)"),
    ), "`hybridfs evict --wait` of the {n} x {each} files (verified cloud-only), then `hybridfs hydrate "
       "--wait` of them (verified cached), each timed from the command's start; baseline: boto3 download of "
       "the same objects to the local disk"),
    Workload("coherence", (
        _m("coherence-mount-p50", "ms", "change on mount A seen on mount B, p50"),
        _m("coherence-mount-p99", "ms", "change on mount A seen on mount B, p99"),
        _m("coherence-s3-p50", "ms", "boto3 change seen on mount B, p50"),
        _m("coherence-s3-p99", "ms", "boto3 change seen on mount B, p99"),
    ), "two mounts with separate caches on one prefix, both reading the bucket's S3 event records "
       "(--s3-events-topic); {changes} changes (create, overwrite, chmod, rename, delete in turn) closed on A, "
       "then {changes} made with boto3: per change the time from its return until a new open+read or stat on B "
       "shows it"),
    Workload("coherence-timers", (
        _m("coherence-timers-p50", "ms", "change on A seen on B, no S3 event records, p50"),
        _m("coherence-timers-p99", "ms", "change on A seen on B, no S3 event records, p99"),
    ), "as coherence (mount A to mount B only), with the mounts' default options: what the metadata timers "
       "alone give"),
)

WORKLOAD_NAMES = tuple(w.name for w in WORKLOADS)
METRICS: tuple[Metric, ...] = tuple(m for w in WORKLOADS for m in w.metrics)


def select(patterns: list[str] | None) -> list[Workload]:
    """Workloads matching any of ``patterns`` (names or shell globs; metric names select their workload)."""
    if not patterns:
        return list(WORKLOADS)
    chosen: list[Workload] = []
    unknown = []
    for pattern in patterns:
        hits = [w for w in WORKLOADS
                if fnmatch.fnmatchcase(w.name, pattern) or any(fnmatch.fnmatchcase(m.name, pattern)
                                                               for m in w.metrics)]
        if not hits:
            unknown.append(pattern)
        chosen += [w for w in hits if w not in chosen]
    if unknown:
        raise ValueError(f"unknown workload {', '.join(unknown)}; choose from {', '.join(WORKLOAD_NAMES)}")
    return [w for w in WORKLOADS if w in chosen]  # keep the run order


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# The targets of issues 14 and 23: (metric, baseline, minimum ratio). Ratio = hybridfs relative to the baseline,
# > 1 better. (Issue 14's eviction target, 200 files/s through one CLI call, is absolute: the table's evict row shows
# it.) Against the floor, the ratio is the floor's cost per request over hybridfs's.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("seq-write-1file", "boto3", 0.8),
    ("seq-write-1file", "s3fs", 1.2),
    ("seq-write-many", "boto3", 0.9),
    ("seq-read-cold", "boto3", 0.9),
    ("seq-read-warm", "s3fs", 1.0),
    ("rand-read-warm", "s3fs", 1.0),
    ("hydrate", "boto3", 0.8),
    ("small-create", "s3fs", 2.0),
    ("seq-read-warm", "floor", 0.9),
    ("rand-read-warm", "floor", 0.9),
    ("request-stat", "floor", 0.9),
    ("request-getxattr", "floor", 0.9),
)
