"""``hybridfs bench availability``: one steady workload per system while a fault schedule runs, then durability.

For each (system, repetition), in random order: a tmpfs of its own holds the system's cache (and hybridfs's state
unless ``--state-on-safe-disk``), an S3 fault proxy of its own sits between it and MinIO, and hybridfs talks to a
private Kafka broker (hybridfs/bench/avail_faults.py). The workload starts ops at a steady rate, each in a thread of
its own with a deadline, so a hung op is counted as unavailable without holding up the schedule: writes of new files,
verified reads and stats of files written earlier, listings. After the schedule, every fault is ended, the system
is given ``--settle`` seconds, and every acknowledged write is checked in S3 (through no proxy); writes that failed
are checked too (an object left behind by a failed write is reported).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridfs.bench import s3 as s3util
from hybridfs.bench.avail_faults import FaultDisk, Faults, PrivateKafka
from hybridfs.bench.avail_schedule import Phase
from hybridfs.bench.mounts import FuseMount, HybridfsMount, RcloneMount, S3fsMount
from hybridfs.bench.s3proxy import S3FaultProxy
from hybridfs.stack.config import BUCKET, S3_ENDPOINT

log = logging.getLogger("hybridfs.bench")

SYSTEMS = ("hybridfs", "rclone", "s3fs", "disk")
S3_SYSTEMS = ("hybridfs", "rclone", "s3fs")
TITLES = {
    "hybridfs": "hybridfs",
    "rclone": "rclone `--vfs-cache-mode full` (write-back)",
    "s3fs": "s3fs `use_cache`",
    "disk": "local disk alone",
}
OP_MIX = (("write", 0.4), ("read", 0.3), ("stat", 0.2), ("list", 0.1))
DIRS = [f"d{i:02d}" for i in range(10)]
FILE_SIZE = 32 * 1024
WARMUP_FILES = 20
MAX_IN_FLIGHT = 2000  # hung ops keep their threads; past this many, new ops are counted as not started


@dataclass
class Settings:
    rate: float = 10.0
    deadline: float = 2.0
    settle: float = 30.0
    disk_size: int = 256 * 1024 * 1024
    cache_size: int = 128 * 1024 * 1024
    state_on_safe_disk: bool = False
    hybridfs_args: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class Op:
    kind: str
    start: float  # seconds since the schedule started
    phase: int
    path: str
    latency: float | None = None  # None: not finished
    error: str = ""  # errno name, "wrong-data" or "wrong-size"; "" when it succeeded

    def to_json(self) -> list[Any]:
        return [self.kind, round(self.start, 3), self.phase,
                None if self.latency is None else round(self.latency, 4), self.error, self.path]  # fmt: skip


@dataclass
class Written:
    path: str
    sha256: str
    size: int


@dataclass
class RunResult:
    system: str
    repetition: int
    ops: list[Op]
    durability: dict[str, Any]
    log_lines: dict[str, int]
    notes: list[str]
    started: str


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


class Workload:
    """The ops against ``root``; ``written`` are the acknowledged writes (reads and stats pick among them)."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.lock = threading.Lock()
        self.written: list[Written] = []
        self.attempted: dict[str, Written] = {}  # every write started: what it meant to store
        self.counter = 0

    def setup(self) -> None:
        for d in DIRS:
            (self.root / d).mkdir(exist_ok=True)
        for _ in range(WARMUP_FILES):
            self.write(self.new_path())

    def new_path(self) -> str:
        with self.lock:
            self.counter += 1
            return f"{DIRS[self.counter % len(DIRS)]}/f{self.counter:06d}"

    def pick(self) -> Written | None:
        with self.lock:
            return self.rng.choice(self.written) if self.written else None

    def forget_all(self) -> None:
        """The disk alone after 'disk-removed': the files are gone; later reads pick among new ones."""
        with self.lock:
            self.written = []

    def write(self, path: str) -> str:
        data = os.urandom(FILE_SIZE)
        entry = Written(path, hashlib.sha256(data).hexdigest(), len(data))
        with self.lock:
            self.attempted[path] = entry
        with open(self.root / path, "wb") as fh:
            fh.write(data)
        with self.lock:
            self.written.append(entry)
        return ""

    def read(self, entry: Written) -> str:
        data = (self.root / entry.path).read_bytes()
        return "" if hashlib.sha256(data).hexdigest() == entry.sha256 else "wrong-data"

    def stat(self, entry: Written) -> str:
        return "" if os.stat(self.root / entry.path).st_size == entry.size else "wrong-size"

    def listing(self, directory: str) -> str:
        os.listdir(self.root / directory)
        return ""

    def plan(self, kind: str) -> tuple[str, Callable[[], str]] | None:
        """The path an op of ``kind`` works on and the call that does it (None: nothing to read yet)."""
        if kind == "write":
            path = self.new_path()
            return path, lambda: self.write(path)
        if kind == "list":
            directory = self.rng.choice(DIRS)
            return directory, lambda: self.listing(directory)
        entry = self.pick()
        if entry is None:
            return None
        call = self.read if kind == "read" else self.stat
        return entry.path, lambda: call(entry)


def _perform(op: Op, call: Callable[[], str], t0: float) -> None:
    began = time.monotonic()
    try:
        op.error = call()
    except OSError as exc:
        op.error = _errname(exc)
    except Exception as exc:  # a bug in the bench must not be counted as the system's
        op.error = f"bench:{type(exc).__name__}"
    op.latency = time.monotonic() - began


class Scheduler:
    """Starts ops at ``rate`` per second and applies each phase's fault at its boundary."""

    def __init__(self, workload: Workload, faults: Faults, phases: tuple[Phase, ...], settings: Settings,
                 rng: random.Random, on_phase_end: Callable[[Phase], None]) -> None:
        self.workload = workload
        self.faults = faults
        self.phases = phases
        self.settings = settings
        self.rng = rng
        self.on_phase_end = on_phase_end
        self.ops: list[Op] = []
        self.threads: list[threading.Thread] = []

    def _kind(self) -> str:
        return self.rng.choices([k for k, _ in OP_MIX], [w for _, w in OP_MIX])[0]

    def run(self, say: Callable[[str], None]) -> None:
        t0 = time.monotonic()
        interval = 1.0 / self.settings.rate
        n = 0
        boundary = 0.0
        for index, phase in enumerate(self.phases):
            self.faults.begin(phase.fault, phase.delay)
            boundary += phase.seconds
            say(f"      {time.monotonic() - t0:6.1f}s phase {index + 1}/{len(self.phases)}: {phase.fault} "
                f"{phase.seconds:g}s")
            try:
                while (due := n * interval) < boundary:
                    delay = t0 + due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    self._start(index, due)
                    n += 1
            finally:
                self.faults.end(phase.fault)
                self.on_phase_end(phase)
        # the last ops get their deadline (plus a little) before the schedule is over
        end = time.monotonic() + self.settings.deadline + 1
        for thread in self.threads[-int(self.settings.rate * 10):]:
            thread.join(max(0.0, end - time.monotonic()))

    def _start(self, phase: int, due: float) -> None:
        kind = self._kind()
        planned = self.workload.plan(kind)
        if planned is None:
            kind, planned = "list", self.workload.plan("list")
        assert planned is not None
        path, call = planned
        op = Op(kind, due, phase, path)
        self.ops.append(op)
        if sum(t.is_alive() for t in self.threads[-MAX_IN_FLIGHT:]) >= MAX_IN_FLIGHT:
            op.error = "not-started"
            op.latency = None
            return
        thread = threading.Thread(target=_perform, args=(op, call, due), daemon=True, name=f"op-{kind}")
        thread.start()
        self.threads.append(thread)


# -- systems


class LocalDisk:
    """The local disk alone: the workload's files straight on the fault disk."""

    name = "disk"

    def __init__(self, root: Path) -> None:
        self.mountpoint = root

    def start(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        pass


def make_system(name: str, base: Path, disk: Path, prefix: str, logs: Path, topic_prefix: str,
                settings: Settings, endpoint: str, kafka: str) -> FuseMount | LocalDisk:
    if name == "disk":
        return LocalDisk(disk / "data")
    mount: FuseMount
    if name == "hybridfs":
        hfs = HybridfsMount(base, prefix, logs, topic_prefix, settings.cache_size, tuple(settings.hybridfs_args))
        hfs.kafka = kafka
        hfs.state_override = base / "state" if settings.state_on_safe_disk else disk / "state"
        mount = hfs
    elif name == "rclone":
        mount = RcloneMount(base, prefix, logs)
    else:
        mount = S3fsMount(base, prefix, logs)
    mount.endpoint = endpoint
    mount.cache_override = disk / "cache"
    return mount


def disk_dirs(name: str, settings: Settings) -> list[str]:
    if name == "disk":
        return ["data", *(f"data/{d}" for d in DIRS)]
    if name == "hybridfs" and not settings.state_on_safe_disk:
        return ["cache", "state"]
    return ["cache"]


# -- durability


def check_durability(s3: Any, workload: Workload, ops: list[Op], key_of: Callable[[str], str]) -> dict[str, Any]:
    """Every acknowledged write in S3 with its bytes; failed and unfinished writes: did they leave objects?"""
    writes = [op for op in ops if op.kind == "write"]
    acked = {w.path for w in workload.written}
    failed = [op.path for op in writes if op.latency is not None and op.error]
    unfinished = [op.path for op in writes if op.latency is None]

    def fetch(path: str) -> str | None:
        """The object's SHA-256, or None when there is none."""
        try:
            body = s3.get_object(Bucket=BUCKET, Key=key_of(path))["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
        except s3.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return hashlib.sha256(body).hexdigest()

    with ThreadPoolExecutor(8) as pool:
        acked_list = [w for w in workload.attempted.values() if w.path in acked]
        acked_found = list(pool.map(lambda w: fetch(w.path), acked_list))
        failed_found = list(pool.map(fetch, failed))
        unfinished_found = list(pool.map(fetch, unfinished))
    missing = [w.path for w, sha in zip(acked_list, acked_found, strict=True) if sha is None]
    wrong = [w.path for w, sha in zip(acked_list, acked_found, strict=True) if sha not in (None, w.sha256)]
    left = {"whole": [], "wrong": []}  # type: dict[str, list[str]]
    for path, sha in zip(failed + unfinished, failed_found + unfinished_found, strict=True):
        if sha is not None:
            left["whole" if sha == workload.attempted[path].sha256 else "wrong"].append(path)
    return {
        "checked_in": "s3",
        "acked": len(acked_list), "missing": len(missing), "wrong": len(wrong),
        "failed_writes": len(failed), "unfinished_writes": len(unfinished),
        "failed_left_whole_object": len(left["whole"]), "failed_left_wrong_object": len(left["wrong"]),
        "examples": {"missing": missing[:5], "wrong": wrong[:5], "failed_left_wrong_object": left["wrong"][:5],
                     "failed_left_whole_object": left["whole"][:5]},
    }  # fmt: skip


def check_local(workload: Workload, lost_with_disk: int) -> dict[str, Any]:
    """The disk alone: the acknowledged writes still on it (the ones the removed disk took are counted apart)."""
    missing, wrong = [], []
    for w in workload.written:
        try:
            data = (workload.root / w.path).read_bytes()
        except OSError:
            missing.append(w.path)
            continue
        if hashlib.sha256(data).hexdigest() != w.sha256:
            wrong.append(w.path)
    return {"checked_in": "local disk", "acked": len(workload.written) + lost_with_disk,
            "missing": len(missing) + lost_with_disk, "wrong": len(wrong), "lost_with_removed_disk": lost_with_disk,
            "examples": {"missing": missing[:5], "wrong": wrong[:5]}}  # fmt: skip


LOG_LEVEL = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b\s+(\S+?):?\s+(.*)")


def log_summary(path: Path | None) -> dict[str, int]:
    """hybridfs's WARNING/ERROR lines, grouped by their text with numbers and paths blanked out."""
    if path is None or not path.is_file():
        return {}
    counts: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        match = LOG_LEVEL.search(line)
        if match is None:
            continue
        text = re.sub(r"'[^']*'|\"[^\"]*\"|\S*/\S*|\b[0-9a-f]{8,}\b|\d+(\.\d+)?", "_", match.group(3))[:160]
        key = f"{match.group(1)} {match.group(2)}: {text}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:40])


# -- one (system, repetition)


class SystemRun:
    def __init__(self, name: str, repetition: int, phases: tuple[Phase, ...], settings: Settings, work: Path,
                 logs: Path, run_id: str, kafka: PrivateKafka | None, s3: Any, say: Callable[[str], None]) -> None:
        self.name = name
        self.repetition = repetition
        self.phases = phases
        self.settings = settings
        self.base = work / f"{name}-r{repetition}"
        self.logs = logs / f"{name}-r{repetition}"
        self.prefix = f"bench-avail/{run_id}/{name}-r{repetition}"
        self.topic_prefix = f"bench-avail-{run_id}-r{repetition}"
        self.kafka = kafka if name == "hybridfs" else None
        self.s3 = s3
        self.say = say
        self.notes: list[str] = []
        self.lost_with_disk = 0
        self.scheduler: Scheduler | None = None

    def run(self) -> RunResult:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        rng = random.Random(f"{self.settings.seed}-{self.name}-{self.repetition}")
        disk = FaultDisk(self.base / "disk", self.settings.disk_size, disk_dirs(self.name, self.settings))
        proxy = S3FaultProxy(upstream=S3_ENDPOINT).start() if self.name in S3_SYSTEMS else None
        self.logs.mkdir(parents=True, exist_ok=True)
        disk.mount()
        system = make_system(self.name, self.base, disk.root, self.prefix, self.logs, self.topic_prefix,
                             self.settings, proxy.url if proxy else S3_ENDPOINT,
                             self.kafka.bootstrap if self.kafka else "")
        try:
            system.start()
            workload = Workload(system.mountpoint, rng)
            workload.setup()
            faults = Faults(disk, proxy, self.kafka)
            scheduler = Scheduler(workload, faults, self.phases, self.settings, rng,
                                  lambda phase: self._phase_ended(phase, workload))
            self.scheduler = scheduler
            scheduler.run(self.say)
            if self.kafka is not None and self.kafka.proc is None:
                self.kafka.start()
            self.say(f"      settling {self.settings.settle:g}s, then checking every acknowledged write")
            time.sleep(self.settings.settle)  # the system's own background work (uploads) runs meanwhile
            if isinstance(system, LocalDisk):
                durability = check_local(workload, self.lost_with_disk)
            else:
                durability = check_durability(self.s3, workload, scheduler.ops, system.key)
            hung = sum(op.latency is None for op in scheduler.ops)
            if hung:
                self.notes.append(f"{hung} ops had not finished when the run ended")
            return RunResult(self.name, self.repetition, scheduler.ops, durability,
                             log_summary(getattr(system, "log_path", None)), self.notes, started)
        finally:
            self._cleanup(system, disk, proxy)

    def _phase_ended(self, phase: Phase, workload: Workload) -> None:
        if phase.fault == "disk-removed" and self.name == "disk":
            self.lost_with_disk += len(workload.written)
            workload.forget_all()
            for d in DIRS:
                (workload.root / d).mkdir(parents=True, exist_ok=True)

    def _cleanup(self, system: FuseMount | LocalDisk, disk: FaultDisk, proxy: S3FaultProxy | None) -> None:
        with contextlib.suppress(Exception):
            disk.clear()
        if proxy is not None:
            proxy.clear()
        hung = self.scheduler is not None and any(t.is_alive() for t in self.scheduler.threads)
        if hung and isinstance(system, FuseMount) and system.proc is not None:
            # An op still hanging in the mount keeps it busy: detach it and ask the process to finish (SIGTERM
            # is a clean unmount for all three), instead of waiting minutes for fusermount3 -u to be possible.
            log.info("%s: ops still hanging at the end; lazy unmount and SIGTERM", self.name)
            subprocess.run(["fusermount3", "-u", "-z", str(system.mountpoint)], capture_output=True, check=False)
            with contextlib.suppress(ProcessLookupError):
                system.proc.send_signal(signal.SIGTERM)
        system.stop()
        if proxy is not None:
            proxy.close()
        disk.unmount()
        if self.name in S3_SYSTEMS:
            try:
                s3util.delete_prefix(self.s3, self.prefix + "/")
            except Exception as exc:
                log.warning("could not delete s3://%s/%s/: %s", BUCKET, self.prefix, exc)
        shutil.rmtree(self.base, ignore_errors=True)


def run_all(systems: list[str], repeat: int, phases: tuple[Phase, ...], settings: Settings, work: Path,
            logs: Path, say: Callable[[str], None]) -> tuple[list[RunResult], str]:
    run_id = time.strftime("%Y%m%d-%H%M%S")
    order = [(s, r) for r in range(1, repeat + 1) for s in systems]
    random.Random(f"{settings.seed}-order-{run_id}").shuffle(order)
    s3 = s3util.client()
    kafka: PrivateKafka | None = None
    results: list[RunResult] = []
    try:
        if "hybridfs" in systems:
            say("==> starting a private Kafka broker for the run (its outages must not touch the shared one)")
            kafka = PrivateKafka(work / "kafka")
            kafka.prepare()
            kafka.start()
        for i, (name, rep) in enumerate(order, 1):
            say(f"==> [{i}/{len(order)}] {name}, repetition {rep}")
            results.append(SystemRun(name, rep, phases, settings, work, logs, run_id, kafka, s3, say).run())
    finally:
        if kafka is not None:
            kafka.stop()
    return results, run_id
