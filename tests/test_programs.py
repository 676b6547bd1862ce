"""Real programs on a real mount (issue 11): tar, rsync, git, sqlite and an appending log with listings beside it.

Each workload runs first on a plain local directory (the control: it proves the check itself is right) and then on
the mount, where the same check must hold after the listing cache has expired and again on a fresh mount with an
empty cache. Wall times of both runs are recorded as test properties (and appended as JSON lines to the file named
by HYBRIDFS_TIMINGS, if set); they are figures, not assertions.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import MountFactory
from helpers import Mount, Stack, wait_until

T = TypeVar("T")
MiB = 1024 * 1024

# Short metadata caches, so that a test sees what a listing from S3 makes of its files within a second.
EXPIRY = 0.5
FAST_EXPIRY = ["--dir-cache-time", str(EXPIRY), "--attr-timeout", str(EXPIRY), "--negative-cache-time", str(EXPIRY)]

RecordProperty = Callable[[str, object], None]


def run(*argv: str | os.PathLike[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a program; fail with its output if it exits non-zero. Returns stdout."""
    result = subprocess.run(
        [os.fspath(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    )
    return result.stdout


def timed(record_property: RecordProperty, name: str, fn: Callable[[], T]) -> T:
    started = time.monotonic()
    result = fn()
    seconds = round(time.monotonic() - started, 3)
    record_property(f"seconds_{name}", seconds)
    if os.environ.get("HYBRIDFS_TIMINGS"):
        with open(os.environ["HYBRIDFS_TIMINGS"], "a") as fh:
            fh.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), name: seconds}) + "\n")
    return result


class Phases:
    """Checks of several phases (after expiry, after a remount...): each phase's failure is kept and the test
    fails at the end with all of them, so that one run tells everything the mount got wrong."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    @contextmanager
    def check(self, when: str) -> Iterator[None]:
        try:
            yield
        except AssertionError as exc:
            self.failures.append(f"--- {when}:\n{exc}")

    def assert_all_passed(self) -> None:
        if self.failures:
            pytest.fail("\n".join(self.failures), pytrace=False)


def let_metadata_caches_expire() -> None:
    # The thing under test is what the mount shows once its cached listing and attributes are too old (a TTL),
    # so time itself has to pass here; there is nothing to poll for.
    time.sleep(3 * EXPIRY)


# -- a source tree with what tar and rsync must carry: sizes, modes, symlinks, mtimes

BASE_MTIME = 1_600_000_000


def build_tree(root: Path) -> None:
    rng = random.Random(11)
    files = {
        "empty": b"",
        "one": b"x",
        "page-minus-one": rng.randbytes(4095),
        "page": rng.randbytes(4096),
        "exec.sh": b"#!/bin/sh\necho hello\n",
        "space name.txt": b"a name with a space\n",
        "unicod\u00e9.txt": "caf\u00e9\n".encode(),
        "a/small.txt": b"small\n" * 10,
        "a/b/medium.bin": rng.randbytes(1 * MiB + 3),
        "a/b/c/deep.bin": rng.randbytes(100_000),
        "big.bin": rng.randbytes(9 * MiB + 5),  # more than one 8 MiB part
        "private/secret.txt": b"secret\n",
    }
    modes = {"exec.sh": 0o755, "a/small.txt": 0o640, "private/secret.txt": 0o600, "one": 0o444}
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(modes.get(rel, 0o644))
    (root / "emptydir").mkdir()
    (root / "links").mkdir()
    (root / "links" / "relative").symlink_to("../a/small.txt")
    (root / "links" / "absolute").symlink_to("/etc/hostname")
    (root / "links" / "dangling").symlink_to("no/such/target")
    (root / "links" / "to-dir").symlink_to("../a")
    (root / "private").chmod(0o700)
    (root / "a" / "b").chmod(0o750)
    # Distinct whole-second mtimes, directories after their contents (writing into a directory changes its mtime).
    paths = sorted((p for p in root.rglob("*") if not p.is_symlink()), key=lambda p: (-len(p.parts), str(p)))
    for i, path in enumerate(paths):
        os.utime(path, (BASE_MTIME + i * 3607, BASE_MTIME + i * 3607))


def listing(root: Path) -> list[str]:
    """type, mode, mtime (whole seconds) and size of everything below ``root``, as find prints them.

    Not compared: a directory's size (each file system has its own) and a symlink's mtime (not set in the source).
    """
    out = run("find", ".", "-mindepth", "1", "-printf", r"%y %m %T@ %s %p\n", cwd=root)
    lines = []
    for line in out.splitlines():
        kind, mode, mtime, size, path = line.split(" ", 4)
        mtime = "-" if kind == "l" else str(int(float(mtime)))
        size = "-" if kind == "d" else size
        lines.append(f"{kind} {mode} {mtime} {size} {path}")
    return sorted(lines)


def assert_same_tree(src: Path, dst: Path) -> None:
    """``diff -r`` finds no difference and find lists the same types, modes, mtimes and sizes."""
    problems = []
    diff = subprocess.run(
        ["diff", "-r", "--no-dereference", str(src), str(dst)], capture_output=True, text=True, timeout=300
    )
    if diff.returncode != 0 or diff.stdout or diff.stderr:
        problems.append(f"diff -r exited {diff.returncode}:\n{diff.stdout}{diff.stderr}")
    try:
        expected, found = listing(src), listing(dst)
    except AssertionError as exc:
        problems.append(str(exc))
    else:
        if found != expected:
            lines = difflib.unified_diff(expected, found, "source", "mount", lineterm="", n=0)
            problems.append("find -printf '%y %m %T@ %s %p' differs:\n" + "\n".join(lines))
    if problems:
        raise AssertionError("\n".join(problems))


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    build_tree(src)
    return src


# -- tar


def test_tar_extract_keeps_contents_types_modes_and_mtimes(
    mount_factory: MountFactory, source_tree: Path, tmp_path: Path, record_property: RecordProperty
) -> None:
    tarball = tmp_path / "tree.tar"
    run("tar", "-C", source_tree, "-cf", tarball, ".")

    def extract(dst: Path) -> None:
        dst.mkdir()
        run("tar", "-C", dst, "-xpf", tarball)

    timed(record_property, "local", lambda: extract(tmp_path / "local"))
    assert_same_tree(source_tree, tmp_path / "local")  # the control

    phases = Phases()
    mount = mount_factory(extra_args=FAST_EXPIRY)
    timed(record_property, "mount", lambda: extract(mount.path / "tree"))
    with phases.check("right after tar x"):
        assert_same_tree(source_tree, mount.path / "tree")
    let_metadata_caches_expire()
    with phases.check("after the listing cache expired"):
        assert_same_tree(source_tree, mount.path / "tree")
    mount.unmount()

    fresh = mount_factory()
    with phases.check("on a fresh mount with an empty cache"):
        assert_same_tree(source_tree, fresh.path / "tree")
    phases.assert_all_passed()


# -- rsync


def test_rsync_archive_then_checksum_dry_run_finds_nothing_to_do(
    mount_factory: MountFactory, source_tree: Path, tmp_path: Path, record_property: RecordProperty
) -> None:
    def sync(dst: Path) -> None:
        run("rsync", "-a", f"{source_tree}/", f"{dst}/")

    def changes(dst: Path) -> str:
        return run("rsync", "-a", "-c", "--dry-run", "--itemize-changes", f"{source_tree}/", f"{dst}/")

    timed(record_property, "local", lambda: sync(tmp_path / "local"))
    assert changes(tmp_path / "local") == ""

    phases = Phases()
    mount = mount_factory(extra_args=FAST_EXPIRY)
    timed(record_property, "mount", lambda: sync(mount.path / "dst"))
    with phases.check("right after rsync -a"):
        assert changes(mount.path / "dst") == ""
    let_metadata_caches_expire()
    with phases.check("after the listing cache expired"):
        assert changes(mount.path / "dst") == ""
    mount.unmount()

    fresh = mount_factory()
    with phases.check("on a fresh mount with an empty cache"):
        assert changes(fresh.path / "dst") == ""
    phases.assert_all_passed()


# -- git

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
}  # fmt: skip


def git(repo: Path, *args: str) -> str:
    return run("git", "-C", repo, *args, env=GIT_ENV)


def make_origin(origin: Path) -> None:
    rng = random.Random(7)
    run("git", "init", "-q", "-b", "main", origin, env=GIT_ENV)
    for n in range(3):
        (origin / "src").mkdir(exist_ok=True)
        (origin / "src" / f"module{n}.py").write_text(f"VALUE = {n}\n" * (50 + n))
        (origin / "data.bin").write_bytes(rng.randbytes(200_000))
        (origin / "run.sh").write_text(f"#!/bin/sh\necho {n}\n")
        (origin / "run.sh").chmod(0o755)
        git(origin, "add", "-A")
        git(origin, "commit", "-q", "-m", f"commit {n}")


def git_workload(origin: Path, where: Path) -> None:
    """clone + commit, and init + commit, each checked with fsck."""
    clone = where / "clone"
    run("git", "clone", "-q", f"file://{origin}", clone, env=GIT_ENV)
    (clone / "src" / "module0.py").write_text("VALUE = 'changed'\n")
    (clone / "new.txt").write_text("new\n")
    git(clone, "add", "-A")
    git(clone, "commit", "-q", "-m", "a change in the clone")
    git(clone, "gc", "-q")  # repacks: rewrites packs, deletes loose objects, renames over refs
    fresh = where / "fresh"
    run("git", "init", "-q", "-b", "main", fresh, env=GIT_ENV)
    (fresh / "README").write_text("hello\n")
    git(fresh, "add", "-A")
    git(fresh, "commit", "-q", "-m", "first")


def assert_git_repos_sound(where: Path, when: str) -> None:
    for repo, commits in (("clone", 4), ("fresh", 1)):
        git(where / repo, "fsck", "--full", "--strict")
        assert git(where / repo, "status", "--porcelain") == "", f"{repo}: worktree differs from HEAD {when}"
        assert len(git(where / repo, "log", "--oneline").splitlines()) == commits, f"{repo}: commits {when}"


@pytest.mark.slow  # about a minute: every git file operation is an S3 request or more
def test_git_clone_commit_and_fsck(
    mount_factory: MountFactory, tmp_path: Path, record_property: RecordProperty
) -> None:
    origin = tmp_path / "origin"
    make_origin(origin)
    (tmp_path / "local").mkdir()
    timed(record_property, "local", lambda: git_workload(origin, tmp_path / "local"))
    assert_git_repos_sound(tmp_path / "local", "on a local directory (control)")

    phases = Phases()
    mount = mount_factory(extra_args=FAST_EXPIRY)
    timed(record_property, "mount", lambda: git_workload(origin, mount.path))
    for when in ("right after the commits", "after the listing cache expired"):
        if when.startswith("after"):
            let_metadata_caches_expire()
        with phases.check(when):
            assert_git_repos_sound(mount.path, when)
    mount.unmount()

    fresh = mount_factory()
    with phases.check("on a fresh mount with an empty cache"):
        assert_git_repos_sound(fresh.path, "on a fresh mount with an empty cache")
    phases.assert_all_passed()


# -- sqlite: in subprocesses, because a SIGBUS from a shrunk -shm mapping must fail the test, not kill pytest

SQLITE_SETUP = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
assert db.execute(f"PRAGMA journal_mode={sys.argv[2]}").fetchone()[0] == sys.argv[2].lower()
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, who TEXT, n INTEGER, pad BLOB)")
db.execute("CREATE INDEX t_who_n ON t (who, n)")
db.close()
"""

SQLITE_WRITER = r"""
import sqlite3, sys
path, who, transactions = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = sqlite3.connect(path, timeout=60, isolation_level=None)
for i in range(transactions):
    db.execute("BEGIN IMMEDIATE")
    db.executemany("INSERT INTO t (who, n, pad) VALUES (?, ?, randomblob(700))",
                   [(who, i * 10 + j) for j in range(10)])
    db.execute("UPDATE t SET pad = randomblob(300) WHERE who = ? AND n % 3 = 0", (who,))
    db.execute("COMMIT")
db.execute("DELETE FROM t WHERE who = ? AND n % 7 = 0", (who,))
db.close()
"""

SQLITE_CHECK = r"""
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
print(json.dumps({
    "integrity": [row[0] for row in db.execute("PRAGMA integrity_check")],
    "journal_mode": db.execute("PRAGMA journal_mode").fetchone()[0],
    "rows": dict(db.execute("SELECT who, count(*) FROM t GROUP BY who").fetchall()),
}))
db.close()
"""

TRANSACTIONS = 30
ROWS_PER_WRITER = sum(1 for n in range(TRANSACTIONS * 10) if n % 7 != 0)


def python(script: str, *args: str | os.PathLike[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *(os.fspath(a) for a in args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], what: str) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} exited {proc.returncode} (-7 is SIGBUS)\n{err}"
    return out


class Lister:
    """A thread listing a directory (readdir + lstat of each entry, and now and then `ls -l`) until stopped.

    ``rounds`` and ``errors`` are written by the thread and read by the test thread (ints and list appends).
    """

    def __init__(self, directory: Path, *, stat: bool = True) -> None:
        self.directory = directory
        self.stat = stat  # False: readdir only, so that nothing but the listing tells the kernel the attributes
        self.rounds = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lister", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                names = os.listdir(self.directory)
                for name in names if self.stat else ():
                    try:
                        os.lstat(self.directory / name)
                    except FileNotFoundError:
                        pass  # sqlite's journal comes and goes
                if self.stat and self.rounds % 5 == 0:
                    subprocess.run(["ls", "-l", str(self.directory)], capture_output=True, check=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as exc:
                self.errors.append(repr(exc))
            self.rounds += 1

    def wait_rounds(self, count: int) -> None:
        target = self.rounds + count
        wait_until(lambda: self.rounds >= target, timeout=30, message=f"{count} listings of {self.directory}")

    @contextmanager
    def running(self) -> Iterator[Lister]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=30)


def sqlite_workload(directory: Path, mode: str) -> None:
    """Two writer processes at once on one database, while the directory is listed."""
    db = directory / "test.db"
    finish(python(SQLITE_SETUP, db, mode), "setup")
    with Lister(directory).running() as lister:
        writers = {who: python(SQLITE_WRITER, db, who, str(TRANSACTIONS)) for who in ("a", "b")}
        failures = []
        for who, proc in writers.items():
            try:
                finish(proc, f"writer {who}")
            except AssertionError as exc:
                failures.append(str(exc).splitlines()[0])
        lister.wait_rounds(1)
    assert failures == []
    assert lister.errors == []


def sqlite_check(directory: Path, mode: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(finish(python(SQLITE_CHECK, directory / "test.db"), "check"))
    assert found == {
        "integrity": ["ok"], "journal_mode": mode.lower(), "rows": {"a": ROWS_PER_WRITER, "b": ROWS_PER_WRITER},
    }  # fmt: skip
    return found


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["DELETE", "WAL"])
def test_sqlite_two_writers_then_integrity_check_after_remount(
    mode: str, mount_factory: MountFactory, tmp_path: Path, record_property: RecordProperty
) -> None:
    (tmp_path / "local").mkdir()
    timed(record_property, "local", lambda: sqlite_workload(tmp_path / "local", mode))
    sqlite_check(tmp_path / "local", mode)

    phases = Phases()
    mount = mount_factory(extra_args=FAST_EXPIRY)
    (mount.path / "db").mkdir()
    with phases.check("the workload"):
        timed(record_property, "mount", lambda: sqlite_workload(mount.path / "db", mode))
    with phases.check("right after the workload"):
        sqlite_check(mount.path / "db", mode)
    mount.unmount()

    fresh = mount_factory()
    with phases.check("on a fresh mount with an empty cache"):
        sqlite_check(fresh.path / "db", mode)
        assert sorted(os.listdir(fresh.path / "db")) == ["test.db"]  # no journal, -wal or -shm left behind
    phases.assert_all_passed()


# -- an appending log with listings beside it


LINES = [f"line {i} of the log\n" for i in range(1, 13)]


def wait_past(moment: float) -> None:
    """Until time.monotonic() passes ``moment`` (a cache's expiry: time itself is what is waited for)."""
    wait_until(lambda: time.monotonic() > moment, timeout=EXPIRY + 5, message="the listing cache to expire")


def append_with_listings(directory: Path) -> None:
    """The log exists (one line, closed: it is in S3); one handle in append mode adds the other lines, and after
    each line, flushed, listings of the directory happen once its cached listing is older than the cache time."""
    (directory / "other.txt").write_text("x\n")
    (directory / "app.log").write_text(LINES[0])
    with Lister(directory, stat=False).running() as lister, open(directory / "app.log", "a") as fh:
        written = len(LINES[0])
        for line in LINES[1:]:
            fh.write(line)
            fh.flush()
            written += len(line)
            expired = time.monotonic() + EXPIRY
            lister.wait_rounds(2)
            wait_past(expired)
            lister.wait_rounds(1)
            # The next write appends at the size the kernel now believes; fstat would refresh it, so it comes after.
    assert lister.errors == []


def shell_appends_with_listings(directory: Path) -> None:
    """`echo ... >> app.log` twelve times (open, append, close each time), a pause between, while listing."""
    script = f'for i in $(seq 1 12); do echo "line $i of the log" >> app.log; sleep {EXPIRY}; done'
    with Lister(directory).running() as lister:
        run("bash", "-c", script, cwd=directory)
    assert lister.errors == []


@pytest.mark.parametrize("writer", [append_with_listings, shell_appends_with_listings], ids=["one-handle", "shell"])
def test_appended_lines_all_reach_s3_while_the_directory_is_listed(
    writer: Callable[[Path], None],
    mount_factory: MountFactory,
    stack: Stack,
    s3: Any,
    tmp_path: Path,
    record_property: RecordProperty,
) -> None:
    expected = "".join(LINES)
    (tmp_path / "local").mkdir()
    timed(record_property, "local", lambda: writer(tmp_path / "local"))
    assert (tmp_path / "local" / "app.log").read_text() == expected

    mount: Mount = mount_factory(extra_args=FAST_EXPIRY)
    (mount.path / "logs").mkdir()
    timed(record_property, "mount", lambda: writer(mount.path / "logs"))
    # close() returned: the object is in S3 (contract 1), no waiting.
    body = s3.get_object(Bucket=stack.bucket, Key=mount.key("logs/app.log"))["Body"].read().decode()
    seen = (mount.path / "logs" / "app.log").read_text()
    assert (body, seen) == (expected, expected)
