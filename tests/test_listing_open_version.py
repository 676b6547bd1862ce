"""The torture's zero-filled version (issue 21): a file open on one version while a listing of its directory shows
another. The listing (a READDIRPLUS) carries the attributes of every entry to the kernel, also for an inode that
is open: its size became the kernel's i_size of the open file. An O_APPEND write is placed at the kernel's i_size,
so an append through a descriptor opened on the old, shorter version landed past that version's end, and the spool
filled the gap with zeros — stored by the next successful flush. A read through such a descriptor ends at the
listed size instead (the torture's short reads): the second test.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
from helpers import Mount, wait_until


def s3_bytes(s3: Any, mount: Mount, name: str) -> bytes:
    return bytes(s3.get_object(Bucket=mount.bucket, Key=mount.key(name))["Body"].read())


def read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 65536):
        parts.append(chunk)
    return b"".join(parts)


def test_append_after_a_listing_of_a_newer_version_lands_at_the_open_versions_end(
        mount_factory: Any, s3: Any, allow_log: Any) -> None:
    """Open 8 KiB with O_RDWR|O_APPEND and read it (as the torture's append does); boto3 replaces the file with
    16 KiB; `ls` of the directory; append 4 KiB. Before: the append landed at 16 KiB — the descriptor read back
    8 KiB of the old version, 8 KiB of zeros, then the 4 KiB, and after the fsync refused by the conditional
    commit, the close stored those zeros in S3. After: the append lands at 8 KiB, the end of the version the
    descriptor has open, and that is what the close stores."""
    allow_log(r"changed in S3 while this file was open")
    mount = mount_factory(extra_args=["--dir-cache-time", "0"])
    name = "f.bin"
    s3.put_object(Bucket=mount.bucket, Key=mount.key(name), Body=b"a" * 8192)
    path = mount.path / name
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        assert read_all(fd) == b"a" * 8192
        # The read asked for the version to be cached: the spool of the append is then made from that copy (from
        # S3, which holds another version by then, it would fail with ESTALE instead).
        wait_until(lambda: os.getxattr(path, "user.hybridfs.state") == b"cached", 30,
                   message="the version read to be cached")
        s3.put_object(Bucket=mount.bucket, Key=mount.key(name), Body=b"b" * 16384)  # another writer
        assert name in os.listdir(mount.path)  # READDIRPLUS: the listing's attributes go to the kernel
        os.write(fd, b"c" * 4096)
        seen = os.pread(fd, 65536, 0)
        with pytest.raises(OSError) as refused:  # conditional on the version opened: S3 holds another
            os.fsync(fd)
        assert refused.value.errno == errno.EIO
    finally:
        os.close(fd)  # after a refused flush, the close stores the file over the other writer's (deliberately)
    stored = s3_bytes(s3, mount, name)
    assert stored == b"a" * 8192 + b"c" * 4096, f"S3 holds {len(stored)} bytes, {stored.count(0)} of them zeros"
    assert seen == b"a" * 8192 + b"c" * 4096, f"read back {len(seen)} bytes, {seen.count(0)} of them zeros"


def test_read_after_a_listing_of_a_shorter_version_reads_the_whole_open_version(mount_factory: Any, s3: Any) -> None:
    """Open 16 KiB and read its first 4 KiB; boto3 replaces the file with 8 KiB; `ls`; read on. Before: the read
    ended at 8 KiB, the listed size (a short read of the version open, as the torture saw). After: all 16 KiB of
    the version the descriptor has open."""
    mount = mount_factory(extra_args=["--dir-cache-time", "0"])
    name = "f.bin"
    s3.put_object(Bucket=mount.bucket, Key=mount.key(name), Body=b"a" * 16384)
    fd = os.open(mount.path / name, os.O_RDONLY)
    try:
        first = os.read(fd, 4096)
        s3.put_object(Bucket=mount.bucket, Key=mount.key(name), Body=b"b" * 8192)  # another writer
        assert name in os.listdir(mount.path)  # READDIRPLUS: the listing's attributes go to the kernel
        seen = first + read_all(fd)
    finally:
        os.close(fd)
    assert seen == b"a" * 16384, f"read {len(seen)} bytes of the 16384 open"
