"""The workloads, one run at a time, against one system ("subject").

A subject is either a directory tree (the bare cache disk, or a FUSE mount over S3) or plain boto3 against
the same MinIO. Each workload method does one run and returns the metrics it measured; a workload a subject
cannot run raises ``NotAvailable`` with the reason the table shows.

Timing rules, the same for every subject of a workload:
- sequential writes use a plain ``open``/``write`` loop of 1 MiB blocks timed through ``close()``, because fio
  stops its clock before the final ``close()`` — exactly where a cloud-first filesystem finishes its upload;
- reads use fio (its own clock; the page cache of the file read is dropped first), boto3 reads are timed
  around the call;
- "durable" runs from the start of the write until S3 holds the object(s) (polled right after close; the
  first poll failing means close() returned before the data was in S3).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridfs.bench import s3 as s3util
from hybridfs.bench.mounts import FuseMount, HybridfsMount
from hybridfs.bench.plan import Sizes
from hybridfs.stack.config import BUCKET

JOBS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
XATTR_STATE = "user.hybridfs.state"
STATE_TIMEOUT = 600.0  # seconds to wait for hydrate/evict to show in the file states


class NotAvailable(Exception):
    """This subject cannot run this workload; the message says why (shown in the table's notes)."""


@dataclass
class Outcome:
    """One run: metric name -> value, and the metrics whose close() returned before S3 held the data."""

    values: dict[str, float]
    acked_early: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    lag: dict[str, float] = field(default_factory=dict)  # metric -> seconds from close() until S3 held the data


@dataclass
class Env:
    """What every run needs: sizes, an S3 client, a scratch directory for fio output, the write buffer."""

    sizes: Sizes
    s3: Any
    scratch: Path
    block_data: bytes = b""
    fio_runs: int = 0
    verbs: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.block_data:
            self.block_data = os.urandom(self.sizes.block)

    def fio(self, job: str, params: dict[str, str], label: str) -> dict[str, Any]:
        """Run ``benchmarks/<job>`` with ``params`` in the environment; the job's JSON result (kept on disk)."""
        self.fio_runs += 1
        job_file = JOBS_DIR / job
        if not job_file.is_file():
            raise NotAvailable(f"fio job {job_file} is missing (run from a source checkout)")
        out = self.scratch / f"{self.fio_runs:03d}-{label}.json"
        cmd = ["fio", "--output-format=json", f"--output={out}", str(job_file)]
        proc = subprocess.run(cmd, env={**os.environ, **params}, capture_output=True, text=True, timeout=3600,
                              check=False)
        if proc.returncode != 0:
            why = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise RuntimeError(f"fio {job} failed (status {proc.returncode}): {why}")
        result = json.loads(out.read_text())["jobs"][0]
        if result.get("error"):
            raise RuntimeError(f"fio {job}: error {result['error']}")
        return dict(result)

    def verb(self, name: str) -> bool:
        """Whether ``hybridfs NAME`` exists in this checkout (hydrate/evict arrive with issue 4)."""
        if name not in self.verbs:
            proc = subprocess.run([sys.executable, "-m", "hybridfs", name, "--help"], capture_output=True,
                                  check=False, timeout=60)
            self.verbs[name] = proc.returncode == 0
        return self.verbs[name]


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / max(seconds, 1e-9) / 1e6


def write_file(path: Path, size: int, block: bytes) -> None:
    """Sequential write of ``size`` bytes in ``len(block)`` writes, then close (where errors surface too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(block)
        left = size
        while left > 0:
            chunk = view[: min(left, len(view))]
            while chunk:
                n = os.write(fd, chunk)
                chunk = chunk[n:]
                left -= n
    finally:
        os.close(fd)


def file_state(path: Path) -> str:
    try:
        return os.getxattr(path, XATTR_STATE).decode()
    except OSError as exc:
        return f"unknown ({exc.strerror})"


class Subject:
    name = ""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.big: str | None = None  # relative path / key suffix of the big file
        self.many: list[str] = []  # relative paths of the many-files set

    def close(self) -> None:
        """Stop what this subject started (mounts); must not raise."""


class FsSubject(Subject):
    """A directory tree: the bare disk (``mount`` None, no S3) or a FUSE mount over ``s3://BUCKET/prefix``."""

    def __init__(self, env: Env, name: str, root: Path, mount: FuseMount | None = None) -> None:
        super().__init__(env)
        self.name = name
        self._root = root
        self.mount = mount
        self.extra_mounts: list[FuseMount] = []  # the coherence workloads' pairs, stopped with the subject
        self._pairs: dict[str, tuple[HybridfsMount, HybridfsMount]] = {}

    @property
    def root(self) -> Path:
        return self.mount.mountpoint if self.mount is not None else self._root

    @property
    def on_s3(self) -> bool:
        return self.mount is not None and self.mount.on_s3

    def key(self, rel: str) -> str:
        assert self.mount is not None
        return self.mount.key(rel)

    def close(self) -> None:
        for extra in self.extra_mounts:
            extra.stop()
        if self.mount is not None:
            self.mount.stop()

    def warm(self) -> None:
        if self.mount is not None:
            self.mount.ensure(cold=False)
        else:
            self._root.mkdir(parents=True, exist_ok=True)

    # -- sequential writes

    def _write_set(self, rel_dir: str, count: int, size: int) -> Outcome:
        self.warm()
        d = self.root / rel_dir
        d.mkdir()
        names = [f"{rel_dir}/f{j}" for j in range(count)]
        start = time.monotonic()
        for name in names:
            write_file(self.root / name, size, self.env.block_data)
        acked = time.monotonic()
        total = count * size
        out = Outcome({"ack": mb_per_s(total, acked - start)})
        if self.on_s3:
            expected = {self.key(n): size for n in names}
            durable, at_once = s3util.wait_durable(self.env.s3, expected, self.key(rel_dir) + "/")
            out.values["durable"] = mb_per_s(total, durable - start)
            out.lag["ack"] = durable - acked
            if not at_once:
                out.acked_early.add("ack")
        return out

    def _keep_only(self, rel_dir: str, previous: str | None) -> None:
        if previous is not None and previous != rel_dir:
            shutil.rmtree(self.root / previous, ignore_errors=True)

    def seq_write_1file(self, run: int) -> Outcome:
        rel = f"w1-r{run}"
        out = self._write_set(rel, 1, self.env.sizes.big_file)
        self._keep_only(rel, self.big.rpartition("/")[0] if self.big else None)
        self.big = f"{rel}/f0"
        return _rename(out, "seq-write-1file")

    def seq_write_many(self, run: int) -> Outcome:
        sizes = self.env.sizes
        rel = f"wm-r{run}"
        out = self._write_set(rel, sizes.many_count, sizes.many_size)
        self._keep_only(rel, self.many[0].rpartition("/")[0] if self.many else None)
        self.many = [f"{rel}/f{j}" for j in range(sizes.many_count)]
        return _rename(out, "seq-write-many")

    def prepare_big(self) -> None:
        if self.big is None:
            self._write_set("big", 1, self.env.sizes.big_file)
            self.big = "big/f0"

    def prepare_many(self) -> None:
        if not self.many:
            sizes = self.env.sizes
            self._write_set("many", sizes.many_count, sizes.many_size)
            self.many = [f"many/f{j}" for j in range(sizes.many_count)]

    # -- reads

    def _fio_read(self, job: str, label: str, extra: dict[str, str]) -> dict[str, Any]:
        assert self.big is not None
        params = {"BENCH_FILE": str(self.root / self.big), "BENCH_SIZE": str(self.env.sizes.big_file),
                  "BENCH_BS": str(self.env.sizes.block), **extra}
        return self.env.fio(job, params, f"{label}-{self.name}")

    def _warm_up(self, run: int, notes: list[str]) -> None:
        """Before the first warm run: make sure the big file is in the local cache."""
        self.warm()
        self.prepare_big()
        assert self.big is not None
        path = self.root / self.big
        if run == 0 and self.mount is None:
            # Written moments ago: flush it, or fio could not drop its (dirty) pages and would read memory.
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if run == 0 and self.mount is not None:
            with open(path, "rb") as fh:  # s3fs and rclone cache what is read; a no-op for a cached file
                while fh.read(8 * 1024**2):
                    pass
        if isinstance(self.mount, HybridfsMount):
            state = file_state(path)
            if state != "cached" and self.env.verb("hydrate"):
                run_verb("hydrate", [str(path)], "--wait")
                state = file_state(path)
            if state != "cached":
                notes.append(f"the file was not cached (state {state}): measured anyway")

    def seq_read_warm(self, run: int) -> Outcome:
        notes: list[str] = []
        self._warm_up(run, notes)
        job = self._fio_read("seq-read.fio", "seq-read-warm", {})
        return Outcome({"seq-read-warm": job["read"]["bw_bytes"] / 1e6}, notes=notes)

    def rand_read_warm(self, run: int) -> Outcome:
        notes: list[str] = []
        self._warm_up(run, notes)
        job = self._fio_read("rand-read.fio", "rand-read-warm",
                             {"BENCH_RUNTIME": str(self.env.sizes.randread_seconds)})
        return Outcome({"rand-read-warm": float(job["read"]["iops"])}, notes=notes)

    def seq_read_cold(self, run: int) -> Outcome:
        if self.mount is None or not self.on_s3:
            raise NotAvailable("the local disk has no cold tier")
        self.warm()
        self.prepare_big()
        assert self.big is not None
        self.mount.ensure(cold=True)
        notes = []
        if isinstance(self.mount, HybridfsMount):
            state = file_state(self.root / self.big)
            if state != "cloud":
                notes.append(f"expected state cloud on a fresh mount, found {state}")
        job = self._fio_read("seq-read.fio", "seq-read-cold", {})
        return Outcome({"seq-read-cold": job["read"]["bw_bytes"] / 1e6}, notes=notes)

    # -- per-request cost

    def requests(self, run: int) -> Outcome:
        """Calls that each reach the filesystem as one request and do no I/O: what a request costs."""
        self.warm()
        path = self.root / "req" / "f"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            write_file(path, self.env.sizes.small_size, self.env.block_data)
        seconds = self.env.sizes.request_seconds
        stats = per_second(lambda: statx_sync(path), seconds)
        notes: list[str] = []

        def getxattr() -> None:
            try:
                os.getxattr(path, XATTR_ABSENT)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    why = f"getxattr {XATTR_ABSENT}: {exc.strerror} (not ENODATA)"
                    if why not in notes:
                        notes.append(why)

        return Outcome({"request-stat": stats, "request-getxattr": per_second(getxattr, seconds)}, notes=notes)

    # -- small files

    def small_files(self, run: int) -> Outcome:
        self.warm()
        sizes = self.env.sizes
        rel = f"small-r{run}"
        d = self.root / rel
        d.mkdir()
        data = os.urandom(sizes.small_size)
        names = [f"s{i:05d}" for i in range(sizes.small_count)]
        n = len(names)
        out = Outcome({})
        start = time.monotonic()
        for name in names:
            with open(d / name, "wb", buffering=0) as fh:
                fh.write(data)
        acked = time.monotonic()
        out.values["small-create"] = n / (acked - start)
        if self.on_s3:
            expected = {self.key(f"{rel}/{name}"): sizes.small_size for name in names}
            durable, at_once = s3util.wait_durable(self.env.s3, expected, self.key(rel) + "/")
            out.values["small-create-durable"] = n / (durable - start)
            out.lag["small-create"] = durable - acked
            if not at_once:
                out.acked_early.add("small-create")
        t = time.monotonic()
        for name in names:
            os.stat(d / name)
        out.values["small-stat"] = n / (time.monotonic() - t)
        t = time.monotonic()
        for name in names:
            with open(d / name, "rb", buffering=0) as fh:
                got = fh.read()
            if got != data:
                raise RuntimeError(f"{rel}/{name}: read {len(got)} bytes that differ from what was written")
        out.values["small-read"] = n / (time.monotonic() - t)
        t = time.monotonic()
        for name in names:
            os.unlink(d / name)
        out.values["small-unlink"] = n / (time.monotonic() - t)
        os.rmdir(d)
        return out

    # -- listing

    def list_dir(self, run: int) -> Outcome:
        count = self.env.sizes.list_count
        self.warm()
        if run == 0:
            if not self.on_s3:  # the disk, or the floor (through the mount)
                d = self.root / "list"
                d.mkdir(exist_ok=True)
                for i in range(count):
                    (d / f"e{i:05d}").touch()
            else:
                prefix = self.key("list")
                s3util.put_many(self.env.s3, [f"{prefix}/", *(f"{prefix}/e{i:05d}" for i in range(count))])
        if self.mount is not None:
            self.mount.ensure(cold=True)
        start = time.monotonic()
        seen = 0
        with os.scandir(self.root / "list") as entries:
            for entry in entries:
                entry.stat(follow_symlinks=False)
                seen += 1
        elapsed = time.monotonic() - start
        if seen != count:
            raise RuntimeError(f"listed {seen} entries, expected {count}")
        return Outcome({"list-dir": elapsed * 1000})

    # -- hydration and eviction

    def hydrate_evict(self, run: int) -> Outcome:
        if not isinstance(self.mount, HybridfsMount):
            raise NotAvailable("no hydrate/evict command" if self.mount is not None else
                               "a local disk has nothing to hydrate or evict")
        missing = [v for v in ("hydrate", "evict") if not self.env.verb(v)]
        if missing:
            raise NotAvailable(f"`hybridfs {' / '.join(missing)}` not available in this checkout (issue 4)")
        self.warm()
        self.prepare_many()
        sizes = self.env.sizes
        paths = [self.root / rel for rel in self.many]
        folder = str(paths[0].parent)  # the set is one directory of its own: the verbs take it recursively
        n, total = len(paths), len(paths) * sizes.many_size
        start = time.monotonic()
        run_verb("evict", [folder], "--wait")
        wait_states(paths, "cloud")  # verify: every file, whatever --wait means
        evicted = time.monotonic()
        run_verb("hydrate", [folder], "--wait")
        wait_states(paths, "cached")
        hydrated = time.monotonic()
        return Outcome({"evict": n / (evicted - start), "hydrate": mb_per_s(total, hydrated - evicted),
                        "hydrate-objects": n / (hydrated - evicted)})


    # -- coherence between two mounts

    def _pair(self, kind: str, extra_args: tuple[str, ...]) -> tuple[HybridfsMount, HybridfsMount]:
        """Mounts A and B of one kind, on a prefix of their own, each with its own cache; started once."""
        if not isinstance(self.mount, HybridfsMount):
            raise NotAvailable("needs two mounts of one system on one prefix (hybridfs only in this harness)")
        pair = self._pairs.get(kind)
        if pair is None:
            base, mount = self.mount.base.parent, self.mount
            made = []
            for side in ("a", "b"):
                made.append(HybridfsMount(base / f"{kind}-{side}", f"{mount.prefix}-{kind}", mount.logs,
                                          topic_prefix=f"{mount.base_topic_prefix}-{kind}",
                                          cache_size=mount.cache_size, extra_args=extra_args))
                made[-1].label = f"hybridfs-{kind}-{side}"
                self.extra_mounts.append(made[-1])
            pair = self._pairs[kind] = (made[0], made[1])
        for started in pair:
            started.ensure(cold=False)
        return pair

    def _shared_folder(self, a: Path, b: Path, folder: str) -> None:
        (a / folder).mkdir()
        wait_for(lambda: (b / folder).is_dir(), f"{folder} made on mount A to show on mount B")

    def coherence(self, run: int) -> Outcome:
        from hybridfs.bench.coherence import Boto3Writer, MountWriter, measure
        from hybridfs.stack.config import S3_EVENTS_TOPIC

        a, b = self._pair("coh", ("--s3-events-topic", S3_EVENTS_TOPIC))
        changes = self.env.sizes.coherence_changes
        self._shared_folder(a.mountpoint, b.mountpoint, f"m{run}")
        mounts = measure(MountWriter(a.mountpoint), b.mountpoint, f"m{run}", changes)
        self._shared_folder(a.mountpoint, b.mountpoint, f"s{run}")
        direct = measure(Boto3Writer(self.env.s3, BUCKET, a.prefix), b.mountpoint, f"s{run}", changes)
        return Outcome({"coherence-mount-p50": mounts.p50() * 1000, "coherence-mount-p99": mounts.p99() * 1000,
                        "coherence-s3-p50": direct.p50() * 1000, "coherence-s3-p99": direct.p99() * 1000},
                       notes=[f"A to B run {run + 1}: {mounts.summary()}", f"boto3 to B run {run + 1}: "
                              f"{direct.summary()}"])

    def coherence_timers(self, run: int) -> Outcome:
        from hybridfs.bench.coherence import MountWriter, measure

        a, b = self._pair("cot", ())
        self._shared_folder(a.mountpoint, b.mountpoint, f"m{run}")
        mounts = measure(MountWriter(a.mountpoint), b.mountpoint, f"m{run}", self.env.sizes.coherence_changes)
        return Outcome({"coherence-timers-p50": mounts.p50() * 1000, "coherence-timers-p99": mounts.p99() * 1000},
                       notes=[f"run {run + 1}: {mounts.summary()}"])


XATTR_ABSENT = "security.selinux"  # what `ls -l` asks of every entry; absent without SELinux
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_STATX_FORCE_SYNC = 0x2000
_STATX_BASIC_STATS = 0x7FF
_libc = ctypes.CDLL(None, use_errno=True)
_statx_buf = ctypes.create_string_buffer(256)  # struct statx is 256 bytes


def statx_sync(path: Path) -> int:
    """stat(2) that the kernel must pass to the filesystem: AT_STATX_FORCE_SYNC bypasses FUSE's attribute cache
    (a plain stat within --attr-timeout would measure the kernel's cache, not the filesystem). Returns the size
    (``stx_size``, at offset 40 of struct statx)."""
    if _libc.statx(_AT_FDCWD, os.fsencode(path), _AT_STATX_FORCE_SYNC | _AT_SYMLINK_NOFOLLOW, _STATX_BASIC_STATS,
                   _statx_buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int.from_bytes(_statx_buf.raw[40:48], "little")


def per_second(call: Callable[[], object], seconds: float) -> float:
    """How many times ``call`` returns per second, called back to back for about ``seconds``."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(32):  # the clock read is not in every call's cost
            call()
        count += 32
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


def run_verb(verb: str, paths: list[str], *flags: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridfs", verb, *paths, *flags], capture_output=True,
                          text=True, timeout=STATE_TIMEOUT, check=False)
    if proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"hybridfs {verb} failed (status {proc.returncode}): {why}")


def wait_states(paths: list[Path], want: str, timeout: float = STATE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    pending = list(paths)
    while pending:
        pending = [p for p in pending if file_state(p) != want]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} file(s) not {want} after {timeout:.0f}s, e.g. {pending[0]}")
        time.sleep(0.02)


def _rename(out: Outcome, metric: str) -> Outcome:
    names = {"ack": metric, "durable": f"{metric}-durable"}
    return Outcome({names[k]: v for k, v in out.values.items()}, {names[k] for k in out.acked_early}, out.notes,
                   {names[k]: v for k, v in out.lag.items()})


class Boto3Subject(Subject):
    """Plain boto3 with the default s3transfer settings, against the same MinIO, under its own prefix."""

    name = "boto3"

    def __init__(self, env: Env, prefix: str, src_dir: Path) -> None:
        super().__init__(env)
        self.prefix = prefix.strip("/")
        self.src_dir = src_dir
        self.big_src = src_dir / "big"
        self.each_src = src_dir / "each"

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def _sources(self) -> None:
        """Local files to upload, written once (random bytes, like the filesystems get)."""
        sizes = self.env.sizes
        self.src_dir.mkdir(parents=True, exist_ok=True)
        for path, size in ((self.big_src, sizes.big_file), (self.each_src, sizes.many_size)):
            if not path.exists() or path.stat().st_size != size:
                write_file(path, size, self.env.block_data)

    def _upload_set(self, rel_dir: str, count: int, src: Path, size: int) -> Outcome:
        self._sources()
        keys = [self.key(f"{rel_dir}/f{j}") for j in range(count)]
        start = time.monotonic()
        for key in keys:
            self.env.s3.upload_file(str(src), BUCKET, key)
        value = mb_per_s(count * size, time.monotonic() - start)
        return Outcome({"ack": value, "durable": value})  # upload_file returns once S3 holds the object

    def seq_write_1file(self, run: int) -> Outcome:
        rel = f"w1-r{run}"
        out = self._upload_set(rel, 1, self.big_src, self.env.sizes.big_file)
        if self.big:
            s3util.delete_prefix(self.env.s3, self.key(self.big.rpartition("/")[0]) + "/")
        self.big = f"{rel}/f0"
        return _rename(out, "seq-write-1file")

    def seq_write_many(self, run: int) -> Outcome:
        sizes = self.env.sizes
        rel = f"wm-r{run}"
        out = self._upload_set(rel, sizes.many_count, self.each_src, sizes.many_size)
        if self.many:
            s3util.delete_prefix(self.env.s3, self.key(self.many[0].rpartition("/")[0]) + "/")
        self.many = [f"{rel}/f{j}" for j in range(sizes.many_count)]
        return _rename(out, "seq-write-many")

    def prepare_big(self) -> None:
        if self.big is None:
            self._upload_set("big", 1, self.big_src, self.env.sizes.big_file)
            self.big = "big/f0"

    def prepare_many(self) -> None:
        if not self.many:
            sizes = self.env.sizes
            self._upload_set("many", sizes.many_count, self.each_src, sizes.many_size)
            self.many = [f"many/f{j}" for j in range(sizes.many_count)]

    def seq_read_warm(self, run: int) -> Outcome:
        raise NotAvailable("no local cache: every read is an S3 request")

    rand_read_warm = seq_read_warm

    def requests(self, run: int) -> Outcome:
        raise NotAvailable("not a filesystem (small-files has its HEAD rate)")

    def seq_read_cold(self, run: int) -> Outcome:
        self.prepare_big()
        assert self.big is not None
        with open(os.devnull, "wb") as sink:
            start = time.monotonic()
            self.env.s3.download_fileobj(BUCKET, self.key(self.big), sink)
            elapsed = time.monotonic() - start
        return Outcome({"seq-read-cold": mb_per_s(self.env.sizes.big_file, elapsed)})

    def small_files(self, run: int) -> Outcome:
        sizes, s3 = self.env.sizes, self.env.s3
        data = os.urandom(sizes.small_size)
        keys = [self.key(f"small-r{run}/s{i:05d}") for i in range(sizes.small_count)]
        n = len(keys)
        out = Outcome({})
        start = time.monotonic()
        for key in keys:
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        elapsed = time.monotonic() - start
        out.values["small-create"] = out.values["small-create-durable"] = n / elapsed
        t = time.monotonic()
        for key in keys:
            s3.head_object(Bucket=BUCKET, Key=key)
        out.values["small-stat"] = n / (time.monotonic() - t)
        t = time.monotonic()
        for key in keys:
            if s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() != data:
                raise RuntimeError(f"{key}: read bytes that differ from what was written")
        out.values["small-read"] = n / (time.monotonic() - t)
        t = time.monotonic()
        for key in keys:
            s3.delete_object(Bucket=BUCKET, Key=key)
        out.values["small-unlink"] = n / (time.monotonic() - t)
        return out

    def list_dir(self, run: int) -> Outcome:
        count = self.env.sizes.list_count
        prefix = self.key("list") + "/"
        if run == 0:
            s3util.put_many(self.env.s3, [prefix, *(f"{prefix}e{i:05d}" for i in range(count))])
        start = time.monotonic()
        seen = 0
        for page in self.env.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix,
                                                                           Delimiter="/"):
            seen += sum(1 for obj in page.get("Contents", []) if obj["Key"] != prefix)
        elapsed = time.monotonic() - start
        if seen != count:
            raise RuntimeError(f"listed {seen} objects, expected {count}")
        return Outcome({"list-dir": elapsed * 1000})

    def coherence(self, run: int) -> Outcome:
        raise NotAvailable("boto3 asks S3 every time: nothing to keep coherent")

    coherence_timers = coherence

    def hydrate_evict(self, run: int) -> Outcome:
        """The hydration baseline: download the many-files set to the local disk (no eviction counterpart)."""
        self.prepare_many()
        sizes = self.env.sizes
        dest = self.src_dir / f"hydrate-r{run}"
        dest.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        for j, rel in enumerate(self.many):
            self.env.s3.download_file(BUCKET, self.key(rel), str(dest / f"f{j}"))
        elapsed = time.monotonic() - start
        shutil.rmtree(dest, ignore_errors=True)
        n = len(self.many)
        return Outcome({"hydrate": mb_per_s(n * sizes.many_size, elapsed), "hydrate-objects": n / elapsed})


# Why a metric is missing although its workload ran (per subject kind).
METRIC_NA = {
    ("disk", "seq-write-1file-durable"): "local disk: no S3 copy",
    ("disk", "seq-write-many-durable"): "local disk: no S3 copy",
    ("disk", "small-create-durable"): "local disk: no S3 copy",
    ("floor", "seq-write-1file-durable"): "passthrough to the local disk: no S3 copy",
    ("floor", "seq-write-many-durable"): "passthrough to the local disk: no S3 copy",
    ("floor", "small-create-durable"): "passthrough to the local disk: no S3 copy",
    ("boto3", "evict"): "nothing cached to evict",
}
