"""benchmarks/passthrough.py, the bench's "floor": a baseline must be right before its speed means anything.

It is mounted for real (its own process, the kernel's FUSE) over a scratch directory, and every answer is checked
against the directory it mirrors: bytes read and written, attributes, the kernel-facing settings the bench's
fairness rests on (1 s attribute timeouts, 512 KiB st_blksize, the 4 MiB read-ahead), and a clean stop.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import is_mounted, wait_until

from hybridfs.bench.workloads import statx_sync

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "passthrough.py"
MiB = 1024**2


@dataclass
class Floor:
    src: Path
    mnt: Path
    proc: subprocess.Popen[bytes]
    log: Path


def _stop(floor: Floor) -> None:
    if is_mounted(floor.mnt):
        subprocess.run(["fusermount3", "-u", str(floor.mnt)], capture_output=True, check=False)
    try:
        floor.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        floor.proc.kill()
        floor.proc.wait()
    if is_mounted(floor.mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(floor.mnt)], capture_output=True, check=False)


@pytest.fixture
def floor(tmp_path: Path) -> Iterator[Floor]:
    src, mnt, log = tmp_path / "src", tmp_path / "mnt", tmp_path / "floor.log"
    src.mkdir()
    mnt.mkdir()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(src), str(mnt)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    made = Floor(src, mnt, proc, log)
    try:
        wait_until(lambda: proc.poll() is not None or os.path.ismount(mnt), timeout=30, message="the floor's mount")
        assert proc.poll() is None, log.read_text()
        yield made
    finally:
        _stop(made)


def _read(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as fh:
        return fh.read()


def test_floor_reads_writes_and_stats_what_the_directory_holds(floor: Floor) -> None:
    data = os.urandom(3 * MiB + 123)
    with open(floor.mnt / "big", "wb", buffering=0) as fh:
        for i in range(0, len(data), MiB):
            fh.write(data[i:i + MiB])
    assert _read(floor.mnt / "big") == data
    assert _read(floor.src / "big") == data

    # A second handle, opened for writing while a read-only one is open, writes where it is told (pyfuse3's
    # example shares the first open's descriptor: this write failed with EBADF there).
    reader = os.open(floor.mnt / "big", os.O_RDONLY)
    writer = os.open(floor.mnt / "big", os.O_RDWR)
    try:
        assert os.pwrite(writer, b"0123456789", MiB - 5) == 10
        assert os.pread(reader, 20, MiB - 10) == data[MiB - 10:MiB - 5] + b"0123456789" + data[MiB + 5:MiB + 10]
    finally:
        os.close(reader)
        os.close(writer)
    data = data[:MiB - 5] + b"0123456789" + data[MiB + 5:]
    assert _read(floor.src / "big") == data

    # O_DIRECT: every read reaches the filesystem (the bench's random-read job), and gets the right bytes.
    fd = os.open(floor.mnt / "big", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)  # page-aligned
        assert os.preadv(fd, [buf], 2 * MiB + 8192) == 4096
        assert bytes(buf) == data[2 * MiB + 8192:2 * MiB + 12288]
    finally:
        os.close(fd)

    mine, theirs = os.stat(floor.mnt / "big"), os.stat(floor.src / "big")
    assert (mine.st_size, mine.st_mode, mine.st_mtime_ns, mine.st_uid, mine.st_nlink) == (
        theirs.st_size, theirs.st_mode, theirs.st_mtime_ns, theirs.st_uid, theirs.st_nlink)
    assert mine.st_blksize == 512 * 1024  # as hybridfs reports
    # The bench's per-request stat reaches the filesystem every time: a change made beside the mount, within the
    # 1 s the kernel may keep the attributes it was just given, is seen by statx(AT_STATX_FORCE_SYNC).
    assert os.stat(floor.mnt / "big").st_size == len(data)  # the kernel holds the size now
    with open(floor.src / "big", "ab") as fh:
        fh.write(b"behind the mount")
    assert statx_sync(floor.mnt / "big") == len(data) + 16
    data += b"behind the mount"

    os.truncate(floor.mnt / "big", 5)
    with open(floor.mnt / "big", "ab", buffering=0) as fh:
        fh.write(b"xy")
    assert _read(floor.mnt / "big") == _read(floor.src / "big") == data[:5] + b"xy"


def test_floor_namespace_and_xattrs(floor: Floor) -> None:
    (floor.mnt / "d").mkdir()
    (floor.mnt / "d" / "a").write_bytes(b"alpha")
    os.rename(floor.mnt / "d" / "a", floor.mnt / "b")
    assert sorted(os.listdir(floor.mnt)) == sorted(os.listdir(floor.src)) == ["b", "d"]
    assert _read(floor.mnt / "b") == b"alpha" and not (floor.src / "d" / "a").exists()
    os.rename(floor.mnt / "d", floor.mnt / "e")  # a directory: what is below it moves too
    (floor.mnt / "e" / "c").write_bytes(b"gamma")
    assert _read(floor.src / "e" / "c") == b"gamma"

    # Unlinked while open: the handle still reads and stats the file; the name is gone, and a new file of the
    # same name (ext4 may give it the old inode number) is another file.
    fd = os.open(floor.mnt / "b", os.O_RDONLY)
    try:
        os.unlink(floor.mnt / "b")
        assert not (floor.src / "b").exists() and not (floor.mnt / "b").exists()
        assert os.pread(fd, 10, 0) == b"alpha" and os.fstat(fd).st_size == 5
        (floor.mnt / "b").write_bytes(b"new")
        assert _read(floor.mnt / "b") == b"new" and os.pread(fd, 10, 0) == b"alpha"
    finally:
        os.close(fd)

    with pytest.raises(OSError) as absent:
        os.getxattr(floor.mnt / "b", "security.selinux")  # the bench's per-request getxattr
    assert absent.value.errno == errno.ENODATA
    os.setxattr(floor.mnt / "b", "user.k", b"v")
    assert os.getxattr(floor.mnt / "b", "user.k") == os.getxattr(floor.src / "b", "user.k") == b"v"
    with pytest.raises(OSError) as hard_link:
        os.link(floor.mnt / "b", floor.mnt / "b2")
    assert hard_link.value.errno == errno.EPERM  # as hybridfs
    os.symlink("b", floor.mnt / "s")
    assert os.readlink(floor.mnt / "s") == "b" and _read(floor.mnt / "s") == b"new"
    os.unlink(floor.mnt / "e" / "c")
    os.rmdir(floor.mnt / "e")
    assert sorted(os.listdir(floor.src)) == ["b", "s"]


def test_floor_settings_and_clean_stop(floor: Floor) -> None:
    dev = os.stat(floor.mnt).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    if os.geteuid() == 0:  # hybridfs's --kernel-readahead default, set once the mount answers
        wait_until(lambda: bdi.read_text().strip() == "4096", timeout=10, message=f"{bdi} to read 4096")
    options = next(line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if line.split()[4] == os.path.realpath(floor.mnt))
    assert "noatime" in options[5] and "default_permissions" in options[-1]
    floor.proc.send_signal(signal.SIGTERM)
    assert floor.proc.wait(timeout=30) == 0, floor.log.read_text()
    assert not is_mounted(floor.mnt)
