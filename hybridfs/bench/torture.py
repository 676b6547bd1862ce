"""A concurrency torture test with a history checker (issue 21), shared by tests/test_torture.py and
``hybridfs bench torture``.

Two mounts of one prefix and a boto3 writer change a few dozen files at once while the S3 fault proxy delays,
holds, stalls, resets and fails a few percent of the mounts' S3 requests. Every op is recorded with its start, its
end and its outcome; the checker then reads the history.

Self-identifying content. Every file is a whole number of 4 KiB blocks; a block is (magic, version id, block index)
and a filler derived from both, so a read is decoded block by block: zeros, a torn block, a block at the wrong offset
or from another file's history are seen at once, with their offset. A version is the tuple of the version ids of its
blocks (a pwrite version keeps its base's blocks): ops that change part of a file (append, pwrite, ftruncate) first
read the whole base through their own descriptor, so the version they make is known exactly.

Same-mount sharing. Descriptors of one file on one mount share it (POSIX): two writers of one name on one mount
would mix legitimately, and a read beside a writer on the same mount sees its progress. So on each mount the ops
that change a name's data (and renames, on both names) take that name's lock; a read of a name beside a data change
of it on the same mount is counted as overlapped and not checked. Reads beside other mounts and the boto3 writer are
checked in full: they must see one whole version.

The checker (conservative: every anomaly it reports is a violation of the README's contract):
- read: decodes block by block; the bytes read equal the size fstat gave at open; the tuple is a version that was
  written to this name (or renamed to it) by an op that started before the read ended. Errors (ENOENT, ESTALE, EIO)
  are allowed outcomes; other errnos are reported.
- final state: for each name, an op's effect (a version, or absent) may be the final state unless an acknowledged op
  on that name started after it ended (real-time order), or, on the same mount, an acknowledged unlink or rename
  of the name started after the writer's open returned (its bytes then belong to an unlinked or renamed inode).
  Ops that failed with EIO may or may not have landed: they are candidates, but replace nothing.
- no multipart upload is left, no stray object, both mounts answer, the memory budget and the daemons' open cache
  and spool files return to their baseline.
Seeded: every client thread draws its ops from Random(seed, thread); the interleaving (and the fault proxy's
timing) is the machine's, so a seed reproduces the workload, not the schedule.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import stat as stat_mod
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridfs.bench.s3proxy import Rule, S3FaultProxy

BLOCK = 4096
MAGIC = b"HFTORT01"
HEADER = struct.Struct(">8sII")  # magic, version id, block index
ALLOWED_ERRNOS = {errno.ENOENT, errno.ESTALE, errno.EIO, errno.EEXIST}
# Ops that change a name's data, and their weights in the mix.
DATA_OPS = ("overwrite", "create", "append", "pwrite", "truncate", "truncate0")
WEIGHTS = {"read": 24, "stat": 8, "ls": 4, "overwrite": 12, "create": 5, "append": 9, "pwrite": 9, "truncate": 4,
           "truncate0": 2, "rename": 6, "unlink": 6, "chmod": 7}
BIG_BLOCKS = 1400  # 5.5 MiB: a multipart upload with 5M parts, larger than the tiny cache

# The mount options of a torture run: a tiny cache and budget, small reads, short timeouts.
MOUNT_ARGS = ["--cache-size", "4M", "--memory", "24M", "--read-chunk-size", "256K", "--readahead-chunks", "2",
              "--part-size", "5M", "--max-inflight-parts", "2", "--evict-interval", "0.5", "--write-timeout", "8",
              "--s3-read-timeout", "3", "--s3-connect-timeout", "1"]
# What a mount logs at WARNING or above on a loaded machine with a tiny cache: Kafka answering late, a finished
# file the full cache could not take (contract 2: it costs speed only).
LOAD_LOG_LINES = (r"kafka unreachable at|Failed to acquire idempotence PID|could not store the finished file in the "
                  r"cache")
# What a mount logs at WARNING or above about the injected S3 faults (the words of tests/test_model_handles.py's
# S3_FAILURE_LINES, without the FUSE layer's generic "-> EIO"), about writers that lost a race to another writer
# (a conditional commit refused: contract 5; a chmod/rename/truncate whose conditional copy was refused twice
# because the other writers changed the file again in between: docs/semantics.md), and about evictions of copies
# another writer replaced or deleted (contract 4: preserved beside the key).
FAULT_LOG_LINES = (r"injected by the torture test|S3 said|did not finish within|could not abort|S3 marked down|"
                   r"S3 did not list it within|"
                   r"streamed upload of .* failed|upload at release failed|"
                   r"changed in S3 while this file was open|keeps changing in S3; (not renamed|not truncated|its "
                   r"attributes were not changed)|"
                   r"closed with changes that are not stored \(the last flush failed\)|"
                   r"S3 holds another version .* preserving the cached copy|"
                   r"S3 no longer holds it \(deleted elsewhere\); preserving the cached copy")


def now() -> float:
    return time.monotonic()


# -- content


def _filler(vid: int, idx: int) -> bytes:
    return hashlib.shake_128(HEADER.pack(MAGIC, vid, idx)).digest(BLOCK - HEADER.size)


def block(vid: int, idx: int) -> bytes:
    return HEADER.pack(MAGIC, vid, idx) + _filler(vid, idx)


def content(blocks: tuple[int, ...], first: int = 0, count: int | None = None) -> bytes:
    end = len(blocks) if count is None else first + count
    return b"".join(block(blocks[i], i) for i in range(first, end))


def decode(data: bytes) -> tuple[tuple[int, ...], str | None]:
    """The version ids of ``data``'s blocks, and what is wrong with it (None: every block is whole and in place)."""
    vids: list[int] = []
    if len(data) % BLOCK:
        return (), f"{len(data)} bytes, not a whole number of {BLOCK}-byte blocks"
    for idx in range(len(data) // BLOCK):
        chunk = data[idx * BLOCK:(idx + 1) * BLOCK]
        magic, vid, where = HEADER.unpack_from(chunk)
        if magic != MAGIC:
            what = "zeros" if chunk.count(0) == BLOCK else f"garbage {chunk[:16].hex()}"
            return tuple(vids), f"block {idx} (offset {idx * BLOCK}) is {what}"
        if where != idx:
            return tuple(vids), f"block {idx} (offset {idx * BLOCK}) holds block {where} of v{vid}"
        if chunk[HEADER.size:] != _filler(vid, idx):
            return tuple(vids), f"block {idx} (offset {idx * BLOCK}) of v{vid} is torn (header fine, body not)"
        vids.append(vid)
    return tuple(vids), None


def summary(blocks: tuple[int, ...]) -> str:
    """v12x3,v40x5: runs of one version's blocks."""
    if not blocks:
        return "empty"
    runs: list[list[int]] = []
    for vid in blocks:
        if runs and runs[-1][0] == vid:
            runs[-1][1] += 1
        else:
            runs.append([vid, 1])
    text = ",".join(f"v{v}x{n}" for v, n in runs[:8])
    return text + (f",...({len(runs) - 8} more runs)" if len(runs) > 8 else "") + f" [{len(blocks)} blocks]"


# -- the history


@dataclass
class Version:
    vid: int
    name: str
    blocks: tuple[int, ...]
    op: int  # the op that wrote it
    start: float


@dataclass
class Op:
    oid: int
    client: str  # thread name
    kind: str
    mount: str  # "A", "B", ... or "s3" (the boto3 writer)
    name: str
    start: float
    name2: str = ""  # rename's destination
    end: float = 0.0
    open_done: float = 0.0  # data ops: when open() returned (same-mount unlink after that orphans the bytes)
    outcome: str = "ok"  # "ok", an errno name, "aborted" (nothing written), or "error: ..."
    vid: int = 0  # the version a data op or a put writes
    reads: list[Read] = field(default_factory=list)
    note: str = ""

    @property
    def acked(self) -> bool:
        return self.outcome == "ok"

    def describe(self) -> str:
        target = f"{self.name}->{self.name2}" if self.name2 else self.name
        vid = f" v{self.vid}" if self.vid else ""
        opened = f" opened {self.open_done:.3f}" if self.open_done else ""
        return (f"op#{self.oid} {self.kind}{vid} {target} on {self.mount} by {self.client} "
                f"[{self.start:.3f}..{self.end:.3f}]{opened} -> {self.outcome}{(' ' + self.note) if self.note else ''}")


@dataclass
class Read:
    """One whole-file read through a descriptor: what it saw."""
    start: float
    end: float
    size: int  # fstat at open
    got: int  # bytes read
    blocks: tuple[int, ...]
    problem: str | None
    overlapped: bool  # a data op of the same name ran on the same mount meanwhile: not checked


@dataclass
class Anomaly:
    kind: str
    text: str


@dataclass
class Target:
    """One mount under test."""
    label: str
    path: Path
    pid: int
    cache_dir: Path
    state_dir: Path


@dataclass
class Settings:
    seed: int
    seconds: float
    threads: int = 8
    files: int = 24
    fault_rate: float = 0.03  # fraction of the mounts' S3 requests the proxy faults (0: none)
    writer_pause: float = 0.3  # mean seconds between the boto3 writer's changes (0: no boto3 writer)
    big_chance: float = 0.01  # an overwrite of BIG_BLOCKS (a multipart upload)
    settle: float = 90.0  # seconds allowed for the mounts to come back to baseline after the run
    weights: dict[str, int] = field(default_factory=lambda: dict(WEIGHTS))  # the op mix


class History:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: list[Op] = []
        self.versions: dict[int, Version] = {}
        self._next_vid = 1
        self._next_oid = 1

    def op(self, client: str, kind: str, mount: str, name: str, name2: str = "") -> Op:
        with self.lock:
            op = Op(self._next_oid, client, kind, mount, name, now(), name2=name2)
            self._next_oid += 1
            self.ops.append(op)
        return op

    def version(self, op: Op, blocks_of: Callable[[int], tuple[int, ...]]) -> Version:
        with self.lock:
            vid = self._next_vid
            self._next_vid += 1
        v = Version(vid, op.name, blocks_of(vid), op.oid, op.start)
        with self.lock:
            self.versions[vid] = v
        op.vid = vid
        return v


class Activity:
    """Per (mount, name): a lock for data changes, and counters telling a read whether one ran beside it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._started: Counter[tuple[str, str]] = Counter()
        self._active: Counter[tuple[str, str]] = Counter()

    @contextlib.contextmanager
    def changing(self, mount: str, *names: str) -> Iterator[None]:
        keys = sorted({(mount, n) for n in names})  # one order: no deadlock between renames
        with self._guard:
            locks = [self._locks[k] for k in keys]
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            with self._guard:
                for k in keys:
                    self._started[k] += 1
                    self._active[k] += 1
            try:
                yield
            finally:
                with self._guard:
                    for k in keys:
                        self._active[k] -= 1

    def mark(self, mount: str, name: str) -> tuple[int, int]:
        with self._guard:
            return self._started[(mount, name)], self._active[(mount, name)]

    def overlapped(self, mount: str, name: str, mark: tuple[int, int]) -> bool:
        started, active = mark
        with self._guard:
            return active > 0 or self._started[(mount, name)] != started


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


# -- the clients


class Engine:
    def __init__(self, settings: Settings, targets: list[Target], s3: Any, bucket: str, prefix: str,
                 proxy: S3FaultProxy | None, say: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.targets = targets
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.proxy = proxy
        self.say = say
        self.names = [f"f{i:02d}" for i in range(settings.files)]
        self.history = History()
        self.activity = Activity()
        self.stop = threading.Event()
        self.crashes: list[str] = []
        self.fault_rules: list[Rule] = []

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    # -- one whole-file read through fd, decoded

    def read_fd(self, fd: int, mount: str, name: str, mark: tuple[int, int] | None, start: float) -> Read:
        size = os.fstat(fd).st_size
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # as cp does: several reads in flight
        parts = []
        while True:
            chunk = os.read(fd, 256 * 1024)
            if not chunk:
                break
            parts.append(chunk)
        data = b"".join(parts)
        blocks, problem = decode(data)
        overlapped = mark is not None and self.activity.overlapped(mount, name, mark)
        return Read(start, now(), size, len(data), blocks, problem, overlapped)

    # -- ops through a mount

    def run_op(self, rng: random.Random, client: str) -> None:
        mix = self.settings.weights
        kind = rng.choices(list(mix), weights=list(mix.values()))[0]
        target = rng.choice(self.targets)
        name = rng.choice(self.names)
        if kind == "rename":
            other = rng.choice([n for n in self.names if n != name])
            op = self.history.op(client, kind, target.label, name, other)
        else:
            op = self.history.op(client, kind, target.label, name)
        path = target.path / name
        try:
            getattr(self, f"_op_{kind}")(op, rng, target, path)
        except OSError as exc:
            op.outcome = errname(exc)
        except Exception as exc:  # a bug in the harness or a library: recorded, never hidden
            op.outcome = f"error: {type(exc).__name__}: {exc}"
        finally:
            op.end = now()

    def _blocks_count(self, rng: random.Random) -> int:
        if rng.random() < self.settings.big_chance:
            return BIG_BLOCKS
        return rng.choice([0, 1, 2, 3, 5, 8, 13, 21, 34, 64, 100, 160, 256])

    def _write_new(self, op: Op, rng: random.Random, path: Path, flags: int) -> None:
        n = self._blocks_count(rng)
        v = self.history.version(op, lambda vid: (vid,) * n)
        fd = os.open(path, flags, 0o644)
        op.open_done = now()
        try:
            for first in range(0, n, 64):
                _write_all(fd, content(v.blocks, first, min(64, n - first)))
            if rng.random() < 0.2:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _op_overwrite(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        with self.activity.changing(target.label, op.name):
            self._write_new(op, rng, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)

    def _op_create(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        with self.activity.changing(target.label, op.name):
            self._write_new(op, rng, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)

    def _change(self, op: Op, rng: random.Random, target: Target, path: Path, flags: int,
                change: Callable[[int, tuple[int, ...], int], tuple[tuple[int, ...], Callable[[int], None]]]) -> None:
        """Open, read the whole base through the descriptor (a checked read), then change it as ``change`` says."""
        with self.activity.changing(target.label, op.name):
            fd = os.open(path, flags)
            op.open_done = now()
            try:
                read = self.read_fd(fd, target.label, op.name, None, op.open_done)
                op.reads.append(read)
                if read.problem or read.got != read.size:
                    op.outcome = "aborted"
                    op.note = "its base read was bad"
                    return
                holder: dict[str, Callable[[int], None]] = {}

                def blocks_of(vid: int) -> tuple[int, ...]:
                    blocks, apply = change(vid, read.blocks, fd)
                    holder["apply"] = apply
                    return blocks

                self.history.version(op, blocks_of)
                holder["apply"](fd)
                if rng.random() < 0.2:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def _op_append(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        n = rng.choice([1, 2, 3, 8, 30])

        def change(vid: int, base: tuple[int, ...], fd: int) -> tuple[tuple[int, ...], Callable[[int], None]]:
            blocks = base + (vid,) * n
            return blocks, lambda fd: _write_all(fd, content(blocks, len(base), n))

        self._change(op, rng, target, path, os.O_RDWR | os.O_APPEND, change)

    def _op_pwrite(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        n = rng.choice([1, 1, 2, 4, 16])
        at_frac = rng.random()

        def change(vid: int, base: tuple[int, ...], fd: int) -> tuple[tuple[int, ...], Callable[[int], None]]:
            at = int(at_frac * (len(base) + 1))  # within the file, or just at its end: never a hole
            blocks = base[:at] + (vid,) * n + base[at + n:]
            return blocks, lambda fd: _pwrite_all(fd, content(blocks, at, n), at * BLOCK)

        self._change(op, rng, target, path, os.O_RDWR, change)

    def _op_truncate(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        frac = rng.random()

        def change(vid: int, base: tuple[int, ...], fd: int) -> tuple[tuple[int, ...], Callable[[int], None]]:
            keep = int(frac * len(base))
            return base[:keep], lambda fd: os.ftruncate(fd, keep * BLOCK)

        self._change(op, rng, target, path, os.O_RDWR, change)

    def _op_truncate0(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        with self.activity.changing(target.label, op.name):
            self.history.version(op, lambda vid: ())
            op.open_done = now()
            os.truncate(path, 0)

    def _op_read(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        mark = self.activity.mark(target.label, op.name)
        fd = os.open(path, os.O_RDONLY)
        try:
            op.reads.append(self.read_fd(fd, target.label, op.name, mark, op.start))
        finally:
            os.close(fd)

    def _op_stat(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        mark = self.activity.mark(target.label, op.name)
        st = os.stat(path)
        if st.st_size % BLOCK and not self.activity.overlapped(target.label, op.name, mark):
            op.note = f"size {st.st_size} is not a whole number of blocks"
        if not stat_mod.S_ISREG(st.st_mode):
            op.note = f"mode {st.st_mode:o} is not a regular file"

    def _op_ls(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        strays = [n for n in os.listdir(target.path) if not n.startswith(".") and n not in self.names]
        if strays:
            op.note = f"lists names never made: {strays}"

    def _op_rename(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        with self.activity.changing(target.label, op.name, op.name2):
            os.rename(path, target.path / op.name2)

    def _op_unlink(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        os.unlink(path)

    def _op_chmod(self, op: Op, rng: random.Random, target: Target, path: Path) -> None:
        os.chmod(path, rng.choice([0o600, 0o640, 0o644, 0o664]))

    # -- the boto3 writer

    def writer_op(self, rng: random.Random) -> None:
        name = rng.choice(self.names)
        kind = "s3-put" if rng.random() < 0.75 else "s3-delete"
        op = self.history.op("boto3", kind, "s3", name)
        try:
            if kind == "s3-put":
                n = rng.choice([0, 1, 3, 8, 40, 200])
                v = self.history.version(op, lambda vid: (vid,) * n)
                op.open_done = now()
                self.s3.put_object(Bucket=self.bucket, Key=self.key(name), Body=content(v.blocks))
            else:
                op.open_done = now()
                self.s3.delete_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as exc:
            op.outcome = f"error: {type(exc).__name__}: {exc}"
        finally:
            op.end = now()

    # -- faults

    def _fault_rule(self, rng: random.Random) -> tuple[Rule, float]:
        """One fault for one request, after a random number of requests (mean 1 / fault_rate)."""
        after = rng.randint(0, max(1, round(2 / self.settings.fault_rate)))
        action = rng.choices(["error500", "error503", "delay", "late", "stall", "reset"],
                             weights=[25, 15, 25, 15, 10, 10])[0]
        hold = 0.0
        if action == "error500":
            rule = Rule(path=r"^/", after=after, times=1, status=500, code="InternalError",
                        message="injected by the torture test")
        elif action == "error503":
            rule = Rule(path=r"^/", after=after, times=1, status=503, code="SlowDown",
                        message="injected by the torture test")
        elif action == "reset":
            rule = Rule(path=r"^/", after=after, times=1, action="reset")
        else:
            hold = rng.uniform(0.2, 4.0 if action == "stall" else 2.0)
            rule = Rule(path=r"^/", after=after, times=1, action=action, delay=hold)
        return rule, hold

    def faults(self, rng: random.Random) -> None:
        """Keep one armed fault rule at a time; a fired one is removed once its hold is over (removing a rule
        releases what it holds)."""
        assert self.proxy is not None
        fired: list[tuple[float, Rule]] = []
        rule, hold = self._fault_rule(rng)
        self.proxy.add(rule)
        self.fault_rules.append(rule)
        while not self.stop.wait(0.05):
            if rule.hits:
                fired.append((now() + hold + 0.5, rule))
                rule, hold = self._fault_rule(rng)
                self.proxy.add(rule)
                self.fault_rules.append(rule)
            for due, old in [f for f in fired if f[0] <= now()]:
                fired.remove((due, old))
                self.proxy.remove(old)
        for r in self.fault_rules:
            self.proxy.remove(r)

    # -- the run

    def setup(self) -> None:
        """Every name starts with a version, written by boto3 (acknowledged ops in the history)."""
        rng = random.Random(f"{self.settings.seed}-setup")
        for name in self.names:
            op = self.history.op("setup", "s3-put", "s3", name)
            n = rng.choice([1, 4, 16, 64])
            v = self.history.version(op, lambda vid, n=n: (vid,) * n)  # type: ignore[misc]
            op.open_done = now()
            self.s3.put_object(Bucket=self.bucket, Key=self.key(name), Body=content(v.blocks))
            op.end = now()

    def _loop(self, client: str, body: Callable[[random.Random], None], rng: random.Random,
              pause: float = 0.0) -> None:
        try:
            while not self.stop.is_set():
                body(rng)
                if pause:
                    self.stop.wait(rng.expovariate(1 / pause))
        except BaseException as exc:
            self.crashes.append(f"{client}: {type(exc).__name__}: {exc}")
            raise

    def run(self) -> None:
        s = self.settings
        threads = []
        for i in range(s.threads):
            client = f"c{i}"
            rng = random.Random(f"{s.seed}-{client}")
            threads.append(threading.Thread(
                target=self._loop, args=(client, lambda r, c=client: self.run_op(r, c), rng), name=client,
                daemon=True))
        if s.writer_pause > 0:
            threads.append(threading.Thread(target=self._loop, args=("boto3", self.writer_op, random.Random(
                f"{s.seed}-boto3"), s.writer_pause), name="boto3", daemon=True))
        if self.proxy is not None and s.fault_rate > 0:
            threads.append(threading.Thread(target=self.faults, args=(random.Random(f"{s.seed}-faults"),),
                                            name="faults", daemon=True))
        for t in threads:
            t.start()
        deadline = now() + s.seconds
        last = now()
        while now() < deadline and not self.crashes:
            time.sleep(min(1.0, max(0.0, deadline - now())))
            if now() - last >= 30:
                last = now()
                self.say(f"    {len(self.history.ops)} ops, {deadline - now():.0f}s left")
        self.stop.set()
        for t in threads:
            t.join(timeout=300)
            if t.is_alive():
                self.crashes.append(f"{t.name}: still running 300 s after the stop (an op hangs)")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# -- the daemons' resources


def open_files(target: Target) -> list[str]:
    """The daemon's descriptors on cache and spool files (SQLite's own files excluded: connections are lazy)."""
    found = []
    fd_dir = Path(f"/proc/{target.pid}/fd")
    roots = (str(target.cache_dir.resolve()), str(target.state_dir.resolve()))
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            dest = os.readlink(entry)
            if dest.startswith(roots) and ".sqlite" not in dest and not dest.endswith((".db", "-wal", "-shm",
                                                                                         "-journal")):
                found.append(dest)
    return sorted(found)


def mount_status(target: Target) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(os.getxattr(target.path, "user.hybridfs.status"))
    return doc


@dataclass
class Baseline:
    memory_used: int
    files: list[str]


def baseline(target: Target) -> Baseline:
    return Baseline(int(mount_status(target)["memory"]["used_bytes"]), open_files(target))


# -- the checker


@dataclass
class Report:
    seed: int
    seconds: float
    ops: Counter[str] = field(default_factory=Counter)  # "kind outcome"
    reads_checked: int = 0
    reads_overlapped: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    requests_seen: int = 0
    preserved: int = 0
    anomalies: list[Anomaly] = field(default_factory=list)

    def add(self, kind: str, text: str) -> None:
        self.anomalies.append(Anomaly(kind, text))

    def text(self, limit: int = 40) -> str:
        total = sum(self.ops.values())
        lines = [f"torture: seed {self.seed}, {self.seconds:.0f} s, {total} ops, {self.reads_checked} reads checked "
                 f"({self.reads_overlapped} beside a same-mount writer, not checked), "
                 f"{sum(self.faults.values())} S3 faults injected of ~{self.requests_seen} requests "
                 f"({', '.join(f'{k} {v}' for k, v in sorted(self.faults.items()))}), "
                 f"{self.preserved} preserved copies"]
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        for key, n in self.ops.items():
            kind, outcome = key.split(" ", 1)
            by_kind[kind][outcome] = n
        for kind in sorted(by_kind):
            lines.append(f"  {kind:10} " + ", ".join(f"{o} {n}" for o, n in by_kind[kind].most_common()))
        kinds = Counter(a.kind for a in self.anomalies)
        lines.append(f"anomalies: {len(self.anomalies)}" +
                     (" (" + ", ".join(f"{k} {n}" for k, n in kinds.most_common()) + ")" if kinds else ""))
        lines += [f"  [{a.kind}] {a.text}" for a in self.anomalies[:limit]]
        if len(self.anomalies) > limit:
            lines.append(f"  ... {len(self.anomalies) - limit} more")
        return "\n".join(lines)


class Checker:
    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self.h = engine.history
        self.by_tuple: dict[tuple[int, ...], list[Version]] = defaultdict(list)
        for v in self.h.versions.values():
            self.by_tuple[v.blocks].append(v)
        reach = self._renamed_to()
        self.names_of = {vid: reach[v.name] for vid, v in self.h.versions.items()}
        self.vids_at: dict[str, set[int]] = defaultdict(set)  # every version that may have been at a name
        for vid, names in self.names_of.items():
            for name in names:
                self.vids_at[name].add(vid)

    def _renamed_to(self) -> dict[str, set[str]]:
        """For each name, the names its content may have reached through renames (any order: conservative)."""
        edges: dict[str, set[str]] = defaultdict(set)
        for op in self.h.ops:
            if op.kind == "rename" and op.outcome != "ENOENT":
                edges[op.name].add(op.name2)
        reach: dict[str, set[str]] = {}
        for name in {v.name for v in self.h.versions.values()} | set(edges):
            seen, todo = {name}, [name]
            while todo:
                for nxt in edges[todo.pop()]:
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            reach[name] = seen
        return reach

    def version_text(self, vid: int) -> str:
        v = self.h.versions[vid]
        op = self.h.ops[v.op - 1]
        return f"v{vid} ({summary(v.blocks)}, written by {op.describe()})"

    # -- reads

    def check_reads(self, report: Report) -> None:
        for op in self.h.ops:
            for r in op.reads:
                if r.overlapped:
                    report.reads_overlapped += 1
                    continue
                report.reads_checked += 1
                self._check_read(op, r, report)

    def _check_read(self, op: Op, r: Read, report: Report) -> None:
        where = f"{op.describe()}: read of {op.name} [{r.start:.3f}..{r.end:.3f}]"
        if r.problem:
            report.add("bad-block", f"{where}: {r.problem}; blocks before it: {summary(r.blocks)}")
            return
        matches = [v for v in self.by_tuple.get(r.blocks, []) if v.start < r.end]
        if r.got != r.size:
            kind = "short-read" if r.got < r.size else "long-read"
            if matches and r.got:  # whole bytes of a version, but not the size this descriptor's fstat gave
                kind = "size-mismatch"
                seen = f"a whole version: {self.version_text(matches[0].vid)}"
            else:
                seen = f"{summary(r.blocks)}; {self._closest(op.name, r.blocks)}"
            report.add(kind, f"{where}: fstat said {r.size} bytes, read returned {r.got}: {seen}")
            return
        if not r.blocks:
            return  # an empty file: every name has been empty or absent at some point an overwrite could make
        if not matches:
            report.add("mixed", f"{where}: saw {summary(r.blocks)}, which no op wrote; "
                                f"{self._closest(op.name, r.blocks)}")
            return
        if not any(op.name in self.names_of[v.vid] for v in matches):
            report.add("wrong-file", f"{where}: saw {self.version_text(matches[0].vid)}, never at {op.name}")

    def _closest(self, name: str, blocks: tuple[int, ...]) -> str:
        """The written versions of ``name`` that share the most leading blocks with what was seen."""
        def common(v: Version) -> int:
            n = 0
            for a, b in zip(v.blocks, blocks, strict=False):
                if a != b:
                    break
                n += 1
            return n

        candidates = [v for v in self.h.versions.values() if name in self.names_of[v.vid]
                      and blocks and v.blocks and v.blocks[0] == blocks[0]]
        best = sorted(candidates, key=lambda v: (-common(v), abs(len(v.blocks) - len(blocks))))[:2]
        if not best:
            return "no version of this name starts like it"
        return "closest: " + "; ".join(self.version_text(v.vid) for v in best)

    # -- ops that reported what they saw

    def check_notes(self, report: Report) -> None:
        for op in self.h.ops:
            if op.kind in ("stat", "ls") and op.note:
                report.add(f"bad-{op.kind}", f"{op.describe()}")
            if op.mount == "s3":
                continue  # the boto3 writer talks to MinIO directly: its errors are not the mount's
            if op.outcome.startswith("error:") or (op.outcome.startswith("E") and op.outcome not in
                                                   {errno.errorcode[e] for e in ALLOWED_ERRNOS}):
                report.add("errno", f"{op.describe()}: not an allowed outcome (allowed: ENOENT, ESTALE, EIO, "
                                    f"EEXIST)")

    # -- the final state

    def effects(self, name: str) -> list[tuple[Op, str, bool, set[int] | None]]:
        """(op, what it leaves at name: "v" or "absent", acknowledged, the versions it may leave) for every op that
        may have changed ``name``."""
        out: list[tuple[Op, str, bool, set[int] | None]] = []
        for op in self.h.ops:
            if op.outcome in ("ENOENT", "EEXIST", "aborted") or op.kind in ("read", "stat", "ls", "chmod"):
                continue
            acked = op.acked
            if op.kind in DATA_OPS or op.kind == "s3-put":
                if op.name != name:
                    continue
                vids = {op.vid} if op.vid else set()
                if not acked and op.kind in ("overwrite", "create"):
                    vids |= {v.vid for v in self.by_tuple.get((), [])}  # O_TRUNC/O_CREAT may have left it empty
                if vids:
                    out.append((op, "v", acked, vids))
            elif op.kind in ("unlink", "s3-delete"):
                if op.name == name:
                    out.append((op, "absent", acked, None))
            elif op.kind == "rename":
                if op.name == name:
                    out.append((op, "absent", acked, None))
                elif op.name2 == name:
                    out.append((op, "v", acked, self.vids_at[op.name]))
        return out

    def allowed(self, name: str) -> list[tuple[Op, str, bool, set[int] | None]]:
        effects = self.effects(name)
        # The last start of an acknowledged op on the name: whatever ended before it was replaced. (A failed
        # commit may land after its EIO, but never over a newer version: contract 5.)
        last_start = max((op.start for op, _, ok, _ in effects if ok), default=-1.0)
        # ... and of an acknowledged unlink or rename of it, per mount.
        last_removal: dict[str, float] = defaultdict(lambda: -1.0)
        for op, what, ok, _ in effects:
            if ok and what == "absent":
                last_removal[op.mount] = max(last_removal[op.mount], op.start)
        keep = []
        for op, what, ok, vids in effects:
            if last_start > op.end:
                continue
            if what == "v" and op.kind in DATA_OPS and last_removal[op.mount] > op.open_done:
                continue  # unlinked or renamed on this mount while open: its bytes are not at this name
            keep.append((op, what, ok, vids))
        return keep

    def check_final(self, report: Report, objects: dict[str, bytes | None]) -> None:
        for name in self.e.names:
            body = objects.get(name)
            allowed = self.allowed(name)
            # Absent: after a removal, or when no acknowledged op ever made the name (what failed may not land).
            absent_ok = any(what == "absent" for _, what, _, _ in allowed) or not any(ok for _, _, ok, _ in allowed)
            if body is None:
                if not absent_ok:
                    report.add("lost-write", f"{name}: absent from S3 at the end; expected "
                                             f"{self._expected(allowed)}")
                continue
            blocks, problem = decode(body)
            if problem:
                report.add("corrupt-object", f"{name}: S3 holds {len(body)} bytes: {problem}; "
                                             f"expected {self._expected(allowed)}")
                continue
            seen = self.by_tuple.get(blocks, [])
            if any(v.vid in vids for _, what, _, vids in allowed if vids for v in seen):
                continue
            seen_text = self.version_text(seen[0].vid) if seen else f"{summary(blocks)}, which no op wrote"
            kind = "resurrected" if allowed and all(w == "absent" for _, w, _, _ in allowed) else "lost-write"
            report.add(kind, f"{name}: S3 holds {seen_text}; expected {self._expected(allowed)}")

    def _expected(self, allowed: list[tuple[Op, str, bool, set[int] | None]]) -> str:
        texts = []
        for op, what, ok, _ in allowed[-4:]:
            mark = "" if ok else " (unacknowledged)"
            texts.append(f"absent after {op.describe()}{mark}" if what == "absent" else
                         f"the version of {op.describe()}{mark}")
        return " or ".join(texts) or "nothing known"


def s3_state(engine: Engine) -> tuple[dict[str, bytes | None], list[str], int]:
    """What S3 holds for each name, stray keys, and preserved copies."""
    s3, bucket = engine.s3, engine.bucket
    base = engine.key("")
    objects: dict[str, bytes | None] = dict.fromkeys(engine.names)
    strays, preserved = [], 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(base):]
            if rel in objects:
                with contextlib.suppress(s3.exceptions.NoSuchKey):
                    objects[rel] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            elif rel.startswith(".hybridfs/preserved/"):
                preserved += 1
            elif not rel.startswith(".hybridfs/"):
                strays.append(rel)
    return objects, strays, preserved


def _settle_s3(engine: Engine, report: Report, timeout: float) -> dict[str, bytes | None]:
    """S3's final state once it stopped changing (late commits and aborts land after the run)."""
    deadline = now() + timeout
    last = s3_state(engine)
    while now() < deadline:
        time.sleep(2.0)
        current = s3_state(engine)
        if current == last:
            break
        last = current
    objects, strays, preserved = last
    report.preserved = preserved
    for rel in strays:
        report.add("stray-object", f"S3 holds {engine.key(rel)}, a name no op made")
    return objects


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = now() + timeout
    while True:
        if predicate():
            return True
        if now() >= deadline:
            return False
        time.sleep(0.25)


def check_mounts(engine: Engine, report: Report, baselines: dict[str, Baseline], timeout: float) -> None:
    for t in engine.targets:
        try:
            os.stat(t.path)
            os.listdir(t.path)
            mount_status(t)
        except OSError as exc:
            report.add("mount-dead", f"mount {t.label} at {t.path} does not answer: {exc}")
            continue
        if not Path(f"/proc/{t.pid}").exists():
            report.add("mount-dead", f"mount {t.label}: process {t.pid} is gone")
            continue
        base = baselines[t.label]

        def settled(t: Target = t, base: Baseline = base) -> bool:
            status = mount_status(t)
            return (int(status["memory"]["used_bytes"]) <= base.memory_used and status.get("open_files", 0) == 0
                    and len(open_files(t)) <= len(base.files))

        if not _wait(settled, timeout):
            status = mount_status(t)
            used = int(status["memory"]["used_bytes"])
            if used > base.memory_used:
                report.add("memory-leak", f"mount {t.label}: memory budget {used} bytes used {timeout:.0f} s after "
                                          f"the run, {base.memory_used} before it ({status['memory']})")
            if status.get("open_files", 0):
                report.add("open-files", f"mount {t.label}: {status['open_files']} files still open with no "
                                         f"descriptor left")
            files = open_files(t)
            if len(files) > len(base.files):
                report.add("fd-leak", f"mount {t.label} (pid {t.pid}): {len(files)} descriptors on cache/spool "
                                      f"files {timeout:.0f} s after the run with no file open, {len(base.files)} "
                                      f"before it; now {files[:10]}, before {base.files[:10]}")


def dump(history: History, path: Path) -> None:
    """The history, one op per line (its reads included), for reading an anomaly against the mount logs."""
    with open(path, "w") as out:
        for op in history.ops:
            line = op.describe()
            if op.vid:
                line += f" = {summary(history.versions[op.vid].blocks)}"
            for r in op.reads:
                line += (f"\n    read [{r.start:.3f}..{r.end:.3f}] fstat {r.size} got {r.got} {summary(r.blocks)}"
                         f"{' ' + r.problem if r.problem else ''}{' (overlapped)' if r.overlapped else ''}")
            out.write(line + "\n")


def run(settings: Settings, targets: list[Target], s3: Any, bucket: str, prefix: str,
        proxy: S3FaultProxy | None, say: Callable[[str], None] = print, history_path: Path | None = None) -> Report:
    """Set up, run the clients for ``settings.seconds``, then check the history and the mounts."""
    engine = Engine(settings, targets, s3, bucket, prefix, proxy, say)
    say(f"==> torture: seed {settings.seed} (HYBRIDFS_TORTURE_SEED={settings.seed} or --seed {settings.seed} "
        f"replays the workload), {settings.seconds:.0f} s, {settings.threads} threads, {settings.files} files, "
        f"mounts {', '.join(t.label for t in targets)}")
    engine.setup()
    for t in targets:  # every mount has seen every name once: the baseline includes what that opens
        for name in engine.names:
            with contextlib.suppress(OSError):
                os.stat(t.path / name)
    baselines = {t.label: baseline(t) for t in targets}
    engine.run()
    report = Report(settings.seed, settings.seconds)
    for rule in engine.fault_rules:
        if rule.hits:
            report.faults[rule.action if rule.action != "error" else f"error{rule.status}"] += rule.hits
        report.requests_seen += rule.matched
    if proxy is not None:
        proxy.clear()  # release anything still held: the end state is S3's, not the proxy's
    for op in engine.history.ops:
        report.ops[f"{op.kind} {op.outcome.split(':')[0]}"] += 1
    for crash in engine.crashes:
        report.add("harness", crash)
    say("==> torture: checking")
    if history_path is not None:
        dump(engine.history, history_path)
    checker = Checker(engine)
    checker.check_reads(report)
    checker.check_notes(report)
    check_mounts(engine, report, baselines, settings.settle)
    checker.check_final(report, _settle_s3(engine, report, 60.0))
    if not _wait(lambda: not _uploads(engine), 60.0):
        report.add("multipart-left", f"multipart uploads left under {engine.key('')}: {_uploads(engine)[:5]}")
    return report


def _uploads(engine: Engine) -> list[str]:
    answer = engine.s3.list_multipart_uploads(Bucket=engine.bucket, Prefix=engine.key(""))
    return [u["Key"] for u in answer.get("Uploads", [])]


# -- `hybridfs bench torture`


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "torture", help="concurrency torture test with a history checker (two mounts, a boto3 writer, S3 faults)",
        description="Run the torture workload of tests/test_torture.py for longer: two hybridfs mounts of one "
                    "prefix (tiny cache, both through the S3 fault proxy) and a boto3 writer, client threads doing "
                    "random create/overwrite/append/pwrite/truncate/rename/unlink/chmod/read/stat/ls; then check "
                    "the recorded history and print the figures (ops, reads checked, anomalies by kind). Exit 1 "
                    "when an anomaly was found.")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the clients run (default 10)")
    parser.add_argument("--seed", type=int, help="seed of the workload (default: random, printed)")
    parser.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--files", type=int, default=24, help="file names (default 24)")
    parser.add_argument("--mounts", type=int, default=2, help="mounts of the prefix (default 2)")
    parser.add_argument("--fault-rate", type=float, default=0.03,
                        help="fraction of the mounts' S3 requests the proxy faults (default 0.03; 0: none)")
    parser.add_argument("--no-writer", action="store_true", help="no boto3 writer")
    parser.add_argument("--weights", metavar="OP=N,...", default="",
                        help="change the op mix, e.g. chmod=0,rename=0 (ops: " + ", ".join(WEIGHTS) + ")")
    parser.add_argument("--out", metavar="DIR",
                        help="mount logs and the report (default ./bench-results/torture-TIME)")
    parser.add_argument("--keep", action="store_true", help="keep the S3 objects afterwards")
    parser.add_argument("--debug-logs", action="store_true", help="mounts log at DEBUG (large logs)")
    parser.add_argument("--no-stack", action="store_true", help="do not run `hybridfs stack up` (already running)")
    parser.set_defaults(func=run_cli)


def run_cli(args: Any) -> int:
    import secrets

    from hybridfs.bench import s3 as bench_s3
    from hybridfs.bench.cli import _stack_up
    from hybridfs.bench.mounts import HybridfsMount
    from hybridfs.cli import CliError
    from hybridfs.stack.config import BUCKET, S3_ENDPOINT

    if not args.no_stack:
        _stack_up()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    weights = dict(WEIGHTS)
    for item in filter(None, args.weights.split(",")):
        op, _, n = item.partition("=")
        if op not in WEIGHTS or not n.isdigit():
            raise CliError(f"--weights: {item!r} is not OP=N with OP one of {', '.join(WEIGHTS)}")
        weights[op] = int(n)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or Path("bench-results") / f"torture-{stamp}").absolute()
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"torture-{stamp}-{secrets.token_hex(3)}"
    s3 = bench_s3.client()
    mounts: list[HybridfsMount] = []
    with S3FaultProxy(upstream=S3_ENDPOINT) as proxy:
        try:
            for i in range(args.mounts):
                extra = (*MOUNT_ARGS, *(["--log-level", "DEBUG"] if args.debug_logs else []))
                mount = HybridfsMount(out / f"mount{i}", prefix, out, prefix, 4 * 1024**2, extra)
                mount.label = f"mount-{'ABCDEFGH'[i]}"
                mount.endpoint = proxy.url
                mount.start()
                mounts.append(mount)
            _wait(lambda: all("hybridfs.daemon: ready: " in m.log_path.read_text(errors="replace")
                              for m in mounts), 60.0)
            targets = [Target("ABCDEFGH"[i], m.mountpoint, m.proc.pid if m.proc else 0, m.cache_dir, m.state_dir)
                       for i, m in enumerate(mounts)]
            settings = Settings(seed=seed, seconds=args.minutes * 60, threads=args.threads, files=args.files,
                                fault_rate=args.fault_rate, writer_pause=0.0 if args.no_writer else 0.3,
                                weights=weights)
            report = run(settings, targets, s3, BUCKET, prefix, proxy if args.fault_rate > 0 else None,
                         history_path=out / "history.txt")
        finally:
            proxy.clear()
            for mount in mounts:
                mount.stop()
            if not args.keep:
                bench_s3.delete_prefix(s3, prefix + "/")
    text = report.text(limit=500) + _log_summary([m.log_path for m in mounts])
    (out / "torture.txt").write_text(text + "\n")
    print(text)
    print(f"==> mount logs and torture.txt in {out}")
    return 1 if report.anomalies else 0


def _log_summary(paths: list[Path]) -> str:
    """The mounts' WARNING+ lines that neither the injected faults nor the load explain (the test fails on them)."""
    import re

    bad = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (WARNING|ERROR|CRITICAL) ")
    expected = re.compile(f"{FAULT_LOG_LINES}|{LOAD_LOG_LINES}")
    lines = [f"{p.name}: {line}" for p in paths for line in p.read_text(errors="replace").splitlines()
             if bad.match(line) and not expected.search(line)]
    head = f"\nmount log lines at WARNING+ not explained by the faults: {len(lines)}"
    return head + "".join(f"\n  {line[:400]}" for line in lines[:30])
