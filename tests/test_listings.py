"""What a listing may and may not change (docs/semantics.md, issue 11 items 1, 2, 5 and 7), through real mounts.

A directory listing in S3 carries names, sizes and ETags, nothing else. These tests check the rules that keep
it from overriding better knowledge: the state of open files, the types and modes learned from HEADs, and the
answers an open just got.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MountFactory
from helpers import Mount, wait_until

MB = 1_000_000


def s3_bytes(s3: Any, mount: Mount, rel: str) -> bytes:
    return s3.get_object(Bucket=mount.bucket, Key=mount.key(rel))["Body"].read()  # type: ignore[no-any-return]


def ls_l(path: Path) -> str:
    return subprocess.run(["ls", "-l", "--full-time", str(path)], capture_output=True, text=True,
                          check=True, timeout=30).stdout


def outlive(seconds: float) -> None:
    """Let a cache TTL of ``seconds`` run out. Expiry is a matter of time, not an event to poll for."""
    time.sleep(seconds + 0.3)


# -- item 1: local state of open, dirty files wins over listings ------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "existing-file"])
def test_listing_keeps_the_size_of_a_file_being_written(mounted: Mount, s3: Any, existing: bool) -> None:
    target = mounted.path / "d" / "big.bin"
    target.parent.mkdir()
    if existing:
        target.write_bytes(b"old")  # S3 and the listing know 3 bytes
        os.listdir(target.parent)
    data = os.urandom(MB)
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, data) == MB
        assert sorted(os.listdir(target.parent)) == ["big.bin"]
        entries = {e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(target.parent)}
        assert entries == {"big.bin": MB}
        assert " 1000000 " in ls_l(target.parent)
        assert os.fstat(fd).st_size == MB
        assert os.pread(fd, MB + 10, 0) == data
        afd = os.open(target, os.O_WRONLY | os.O_APPEND)
        try:
            os.listdir(target.parent)
            os.write(afd, b"tail")
        finally:
            os.close(afd)
        assert os.fstat(fd).st_size == MB + 4
    finally:
        os.close(fd)
    assert s3_bytes(s3, mounted, "d/big.bin") == data + b"tail"


def test_appender_with_concurrent_listings_keeps_every_line(mounted: Mount, s3: Any) -> None:
    logs = mounted.path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("line 0\n")
    script = "for i in $(seq 1 12); do echo line $i; sleep 0.1; done >> logs/app.log"
    writer = subprocess.Popen(["bash", "-c", script], cwd=mounted.path)
    listings = 0
    while writer.poll() is None:
        ls_l(logs)
        listings += 1
    assert writer.wait(30) == 0
    assert listings > 5
    expected = "".join(f"line {i}\n" for i in range(13))
    assert s3_bytes(s3, mounted, "logs/app.log").decode() == expected
    assert (logs / "app.log").read_text() == expected


# -- item 2: a listing never changes an entry's type, and never shows missing metadata as final ------------


def _make_tree(root: Path) -> None:
    (root / "t").mkdir()
    (root / "t" / "file").write_bytes(b"12345")
    os.symlink("file", root / "t" / "rel")
    os.symlink("/nowhere/at/all", root / "t" / "dangling")
    (root / "t" / "private").mkdir(mode=0o700)
    os.chmod(root / "t" / "private", 0o700)
    os.chmod(root / "t" / "file", 0o600)
    os.utime(root / "t" / "file", (1_500_000_000, 1_500_000_000))


def _check_tree(root: Path) -> None:
    t = root / "t"
    entries = list(os.scandir(t))
    kinds = {e.name: (e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in entries}
    assert {e.name: e.inode() for e in entries} == {e.name: os.lstat(e.path).st_ino for e in entries}
    assert kinds == {"file": (False, False), "rel": (True, False), "dangling": (True, False),
                     "private": (False, True)}
    assert stat.S_ISLNK(os.lstat(t / "rel").st_mode) and os.readlink(t / "rel") == "file"
    assert stat.S_ISLNK(os.lstat(t / "dangling").st_mode) and os.readlink(t / "dangling") == "/nowhere/at/all"
    assert (t / "rel").read_bytes() == b"12345"
    private = os.lstat(t / "private")
    assert stat.S_ISDIR(private.st_mode) and stat.S_IMODE(private.st_mode) == 0o700
    st = os.lstat(t / "file")
    assert (stat.S_IMODE(st.st_mode), int(st.st_mtime), st.st_size) == (0o600, 1_500_000_000, 5)
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line.split()[0]
             for line in ls_l(t).splitlines()[1:]}
    assert lines == {"file": "-rw-------", "rel": "lrwxrwxrwx", "dangling": "lrwxrwxrwx",
                     "private": "drwx------"}
    found = subprocess.run(["find", str(t), "-printf", r"%y %m %s %P\n"], capture_output=True, text=True,
                           check=True, timeout=30).stdout.splitlines()
    assert sorted(found) == sorted(["d 755 0 ", "f 600 5 file", "l 777 4 rel", "l 777 15 dangling",
                                    "d 700 0 private"])


def test_listing_after_the_cache_expired_keeps_types_and_modes(mount_factory: MountFactory) -> None:
    mount = mount_factory(extra_args=["--dir-cache-time", "1", "--attr-timeout", "0.5"])
    _make_tree(mount.path)
    _check_tree(mount.path)
    outlive(1)
    os.listdir(mount.path / "t")  # a fresh listing comes first, before any stat
    _check_tree(mount.path)
    outlive(1)
    _check_tree(mount.path)


def test_listing_on_a_fresh_mount_shows_types_and_modes(mount_factory: MountFactory) -> None:
    first = mount_factory()
    _make_tree(first.path)
    first.unmount()
    fresh = mount_factory()  # empty cache, nothing known: the listing is the first thing it sees
    _check_tree(fresh.path)


# -- item 5: revalidation on open while another handle is open ---------------------------------------------


def test_new_open_sees_a_new_version_while_an_old_handle_is_open(mount_factory: MountFactory, s3: Any) -> None:
    mount = mount_factory(extra_args=["--attr-timeout", "0.5"])
    key = mount.key("log.txt")
    s3.put_object(Bucket=mount.bucket, Key=key, Body=b"version one\n")
    path = mount.path / "log.txt"
    with open(path, "rb") as old:  # tail -f: held open across the change
        assert old.read() == b"version one\n"
        s3.put_object(Bucket=mount.bucket, Key=key, Body=b"version two, longer\n")

        def new_open_reads() -> bytes:
            with open(path, "rb") as new:
                return new.read()

        assert wait_until(lambda: new_open_reads() == b"version two, longer\n", timeout=10,
                          message="a new open to read the new version")
        # A new version is a new file (S3 replaces objects whole): the old handle keeps the old one, with
        # its size and its bytes, and nlink 0 like a file replaced by rename.
        # (nlink shows once the kernel's copy of the old attributes expires, after --attr-timeout)
        old_st = wait_until(lambda: (st := os.fstat(old.fileno())).st_nlink == 0 and st, timeout=5,
                            message="nlink 0 on the old handle")
        assert old_st.st_size == len(b"version one\n")
        assert os.stat(path).st_ino != old_st.st_ino
        assert os.pread(old.fileno(), 100, 0) == b"version one\n"


def test_a_file_being_written_is_not_revalidated_on_open(mount_factory: MountFactory, s3: Any) -> None:
    mount = mount_factory(extra_args=["--attr-timeout", "0.2"])
    path = mount.path / "w.bin"
    with open(path, "wb") as writer:
        writer.write(b"local bytes")
        writer.flush()
        outlive(0.2)  # past --attr-timeout: an open would revalidate a clean file now
        with open(path, "rb") as reader:  # not in S3 yet: must not be ENOENT, must see the local bytes
            assert reader.read() == b"local bytes"
        assert os.stat(path).st_size == len(b"local bytes")
    assert s3_bytes(s3, mount, "w.bin") == b"local bytes"


# -- item 7: a delete seen by open is seen by stat ----------------------------------------------------------


def test_a_delete_seen_by_open_is_seen_by_stat(mount_factory: MountFactory, s3: Any) -> None:
    mount = mount_factory(extra_args=["--attr-timeout", "0.3", "--dir-cache-time", "30"])
    path = mount.path / "gone.txt"
    path.write_bytes(b"x")
    assert path.stat().st_size == 1
    s3.delete_object(Bucket=mount.bucket, Key=mount.key("gone.txt"))
    outlive(0.3)
    with pytest.raises(FileNotFoundError):
        open(path, "rb")
    with pytest.raises(FileNotFoundError):
        os.stat(path)
    assert "gone.txt" not in os.listdir(mount.path)
