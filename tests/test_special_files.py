"""FIFOs, sockets, device nodes and mknod'ed files as s3fs stores them (issue 11 item 8), through real mounts.

Each is an empty object whose ``x-amz-meta-mode`` holds its type (and ``x-amz-meta-rdev`` its device number),
so a bucket moves between s3fs and hybridfs with its special files. The kernel serves FIFOs, sockets and
devices itself; the mount only stores their attributes.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import threading
from typing import Any

import pytest
from conftest import MountFactory
from helpers import Mount, wait_until


def head(s3: Any, mount: Mount, rel: str) -> dict[str, Any]:
    return s3.head_object(Bucket=mount.bucket, Key=mount.key(rel))  # type: ignore[no-any-return]


def test_mkfifo_stores_an_empty_object_and_the_fifo_works(mount_factory: MountFactory, s3: Any) -> None:
    mount = mount_factory()
    fifo = mount.path / "fifo"
    os.mkfifo(fifo, 0o640)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_IMODE(os.lstat(fifo).st_mode) == 0o640
    h = head(s3, mount, "fifo")
    assert h["ContentLength"] == 0 and int(h["Metadata"]["mode"]) == stat.S_IFIFO | 0o640
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    fifo.write_bytes(b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"]
    with pytest.raises(FileExistsError):
        os.mkfifo(fifo)
    os.chmod(fifo, 0o600)
    os.rename(fifo, mount.path / "moved")
    assert int(head(s3, mount, "moved")["Metadata"]["mode"]) == stat.S_IFIFO | 0o600
    mount.unmount()
    fresh = mount_factory()  # nothing known: the listing comes first, the type from the object
    assert [(e.name, e.is_file(follow_symlinks=False)) for e in os.scandir(fresh.path)] == [("moved", False)]
    st = os.lstat(fresh.path / "moved")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    os.unlink(fresh.path / "moved")
    assert os.listdir(fresh.path) == []


def test_mknod_of_regular_files_and_devices(mounted: Mount, s3: Any) -> None:
    regular = mounted.path / "regular"
    os.mknod(regular, stat.S_IFREG | 0o600)
    st = os.lstat(regular)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 0
    assert head(s3, mounted, "regular")["ContentLength"] == 0
    regular.write_bytes(b"now with data")
    assert regular.read_bytes() == b"now with data"
    for name, kind in (("chr", stat.S_IFCHR), ("blk", stat.S_IFBLK)):
        os.mknod(mounted.path / name, kind | 0o644, os.makedev(8, 17))
        st = os.lstat(mounted.path / name)
        assert stat.S_IFMT(st.st_mode) == kind and st.st_rdev == os.makedev(8, 17)
        meta = head(s3, mounted, name)["Metadata"]
        assert (int(meta["mode"]), int(meta["rdev"])) == (kind | 0o644, os.makedev(8, 17))
    listing = subprocess.run(["ls", "-l", str(mounted.path)], capture_output=True, text=True, check=True,
                             timeout=30).stdout
    kinds = {line.split()[-1]: line[0] for line in listing.splitlines()[1:]}
    assert kinds == {"regular": "-", "chr": "c", "blk": "b"}


def test_a_unix_socket_can_be_bound_and_connected(mounted: Mount, s3: Any) -> None:
    path = str(mounted.path / "sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IFMT(int(head(s3, mounted, "sock")["Metadata"]["mode"])) == stat.S_IFSOCK
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            conn, _ = server.accept()
            with conn:
                client.sendall(b"hello")
                assert conn.recv(5) == b"hello"
    finally:
        server.close()
    os.unlink(path)


def test_a_fifo_made_by_s3fs_shows_as_a_fifo(mounted: Mount, s3: Any) -> None:
    # What s3fs's mknod stores: an empty object with uid, gid, mode and the times in its metadata.
    s3.put_object(Bucket=mounted.bucket, Key=mounted.key("from-s3fs"), Body=b"",
                  Metadata={"mode": str(stat.S_IFIFO | 0o644), "uid": "0", "gid": "0",
                            "mtime": "1600000000", "ctime": "1600000000", "atime": "1600000000"})
    listing = subprocess.run(["ls", "-l", str(mounted.path)], capture_output=True, text=True, check=True,
                             timeout=30).stdout
    assert listing.splitlines()[1].startswith("prw-r--r--")
    st = os.lstat(mounted.path / "from-s3fs")
    assert stat.S_ISFIFO(st.st_mode) and int(st.st_mtime) == 1_600_000_000


@pytest.mark.parametrize("written", [True, False], ids=["being-written", "closed-before"])
def test_an_unlinked_open_file_has_nlink_0(mounted: Mount, written: bool) -> None:
    path = mounted.path / "doomed"
    if not written:
        path.write_bytes(b"content")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        if written:
            os.write(fd, b"content")
        assert os.fstat(fd).st_nlink == 1
        os.unlink(path)
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == len(b"content")
        with pytest.raises(FileNotFoundError):
            os.stat(path)
    finally:
        os.close(fd)


def test_mknod_refuses_what_is_not_a_node(mounted: Mount) -> None:
    with pytest.raises(OSError) as err:
        os.mknod(mounted.path / "d", stat.S_IFDIR | 0o755)  # the kernel sends no mkdir through mknod
    assert err.value.errno in (errno.EPERM, errno.EINVAL)


def test_truncate_past_what_the_spool_can_hold_is_efbig(mounted: Mount) -> None:
    f = mounted.path / "f"
    f.write_bytes(b"x")
    with pytest.raises(OSError) as err:
        os.truncate(f, 20 * 2**40)  # beyond the largest file the spool's filesystem holds (ext4: 16 TiB)
    assert err.value.errno == errno.EFBIG
    with open(f, "r+b") as fh, pytest.raises(OSError) as err:
        os.ftruncate(fh.fileno(), 20 * 2**40)
    assert err.value.errno == errno.EFBIG
    assert f.read_bytes() == b"x"
    # RELEASE is asynchronous and this one closes a spool: let it finish before the unmount, which would
    # otherwise make pyfuse3 log that its reply found no request.
    wait_until(lambda: json.loads(os.getxattr(mounted.path, "user.hybridfs.status"))["open_files"] == 0,
               timeout=10, message="the handles to be released")


def test_ftruncate_of_an_open_file_moves_its_mtime_at_once(mounted: Mount) -> None:
    f = mounted.path / "f"
    f.write_bytes(b"0123456789")
    os.utime(f, (1_500_000_000, 1_500_000_000))
    with open(f, "r+b") as fh:
        os.ftruncate(fh.fileno(), 4)
        st = os.fstat(fh.fileno())
        assert st.st_size == 4 and st.st_mtime > 1_500_000_000 and st.st_ctime > 1_500_000_000
    assert f.read_bytes() == b"0123"
