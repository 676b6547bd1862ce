"""Issue 21 item 6: a stream larger than the cache, or written while the cache disk fails, keeps every byte
written since open, so a random write, a read-back, an ftruncate or a refused part after it still stores the
whole file (before: the tee dropped its copy past the cache's capacity and the hand-over to a spool had nothing
to hand over — pwrite, fsync and close failed with EIO and nothing was stored).

The bytes the cache cannot hold go to a spill file in the state directory from the first such byte; a
hand-over joins it with what the cache's tee holds.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import Mount, tmpfs, wait_until
from s3proxy import Rule, S3FaultProxy
from test_degraded import fill
from test_faults_write import through_proxy, uploads

MiB = 1024 * 1024
CACHE = ["--cache-size", "16M", "--part-size", "5M"]
BLOCKS = 40  # 40 MiB through a 16 MiB cache


def block(n: int) -> bytes:
    return n.to_bytes(8, "little") * (MiB // 8)


def stream(fd: int, blocks: int = BLOCKS) -> bytearray:
    expected = bytearray()
    for n in range(blocks):
        assert os.write(fd, block(n)) == MiB
        expected += block(n)
    return expected


def stored(s3: Any, mount: Mount, name: str) -> bytes:
    return bytes(s3.get_object(Bucket=mount.bucket, Key=mount.key(name))["Body"].read())


def same(got: bytes, expected: bytes | bytearray) -> None:
    assert len(got) == len(expected)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()


def spill_files(mount: Mount) -> list[Path]:
    return list((mount.state_dir / "spool").glob("*")) if (mount.state_dir / "spool").exists() else []


def test_random_write_after_a_stream_larger_than_the_cache(mount_factory: Any, s3: Any) -> None:
    mount = mount_factory(extra_args=CACHE)
    fd = os.open(mount.path / "big.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        expected = stream(fd)
        assert os.pwrite(fd, b"Z" * 10, 0) == 10
        expected[0:10] = b"Z" * 10
        os.fsync(fd)
    finally:
        os.close(fd)
    same(stored(s3, mount, "big.bin"), expected)
    wait_until(lambda: uploads(s3, mount, "big.bin") == [], 15, message="the stream's upload to be aborted")
    wait_until(lambda: spill_files(mount) == [], 10, message="the spool to be removed after close")


def test_read_back_and_ftruncate_after_a_stream_larger_than_the_cache(mount_factory: Any, s3: Any) -> None:
    mount = mount_factory(extra_args=CACHE)
    fd = os.open(mount.path / "back.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        expected = stream(fd)
        assert os.pread(fd, MiB, 3 * MiB) == block(3)  # a read-back: the stream hands over to a spool
        os.ftruncate(fd, 30 * MiB + 5)
        del expected[30 * MiB + 5:]
    finally:
        os.close(fd)
    same(stored(s3, mount, "back.bin"), expected)


def test_stream_larger_than_the_cache_without_a_hand_over_stores_and_leaves_no_spill(
        mount_factory: Any, s3: Any) -> None:
    """The plain case stays a plain stream: stored once, nothing left in the state directory, not cached."""
    mount = mount_factory(extra_args=CACHE)
    fd = os.open(mount.path / "plain.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        expected = stream(fd)
    finally:
        os.close(fd)
    same(stored(s3, mount, "plain.bin"), expected)
    assert spill_files(mount) == []
    assert os.getxattr(mount.path / "plain.bin", "user.hybridfs.state") == b"cloud"


def test_refused_part_after_the_cache_is_full(s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """A part past the cache's capacity refused after botocore's retries: the close stores the whole file."""
    mount = through_proxy(mount_factory, s3_proxy, "--cache-size", "16M")  # its FAST_S3 has --part-size 5M
    s3_proxy.add(Rule(method="PUT", query=r"partNumber=6(&|$)", status=500, code="InternalError", times=2))
    fd = os.open(mount.path / "refused.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        expected = stream(fd)
    finally:
        os.close(fd)
    same(stored(s3, mount, "refused.bin"), expected)
    wait_until(lambda: uploads(s3, mount, "refused.bin") == [], 15, message="the failed upload to be aborted")


@pytest.mark.allow_log(r"cache copy of .* failed")
def test_random_write_after_a_stream_on_a_read_only_cache_disk(
        mount_factory: Any, s3: Any, tmp_path: Path) -> None:
    """The cache disk fails from the start (read-only): every byte of the stream goes to the spill file."""
    with tmpfs(tmp_path / "rw", "64m") as disk:
        (disk / "cache" / "objects").mkdir(parents=True)
        ro = tmp_path / "ro"
        ro.mkdir()
        subprocess.run(["mount", "--bind", "-o", "ro", str(disk), str(ro)], check=True)
        try:
            mount = mount_factory(cache_dir=ro / "cache", extra_args=["--part-size", "5M"])
            mount.allow_log(r"cannot open cache directory .*Read-only file system|cache copy of .* failed")
            fd = os.open(mount.path / "ro.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                expected = stream(fd, 12)
                assert os.pwrite(fd, b"Z" * 10, 7 * MiB) == 10
                expected[7 * MiB:7 * MiB + 10] = b"Z" * 10
            finally:
                os.close(fd)
            same(stored(s3, mount, "ro.bin"), expected)
            mount.unmount()
        finally:
            subprocess.run(["umount", "-l", str(ro)], check=False)


@pytest.mark.allow_log(r"streamed upload of .* failed", r"spill file|No space left|cannot be stored",
                       r"closed with changes that are not stored")
def test_full_state_disk_is_a_clear_enospc(mount_factory: Any, s3: Any) -> None:
    """The spill file is bounded by the state disk: when it is full, the hand-over fails with ENOSPC (not a
    generic EIO), and nothing is stored for a new file."""
    mount = mount_factory(extra_args=CACHE)
    with tmpfs(mount.state_dir / "spool", "8m"):
        fd = os.open(mount.path / "full.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            stream(fd)
            with pytest.raises(OSError) as failure:
                os.pwrite(fd, b"Z" * 10, 0)
            assert failure.value.errno == errno.ENOSPC
        finally:
            with pytest.raises(OSError) as closing:
                os.close(fd)
        assert closing.value.errno == errno.ENOSPC
        assert s3.list_objects_v2(Bucket=mount.bucket, Prefix=mount.key("full.bin")).get("KeyCount") == 0
        mount.unmount()


@pytest.mark.allow_log(r"cache copy of .* failed", r"No space left", r"cache: could not store")
def test_random_write_after_the_cache_disk_filled_up_mid_stream(
        mount_factory: Any, s3: Any, tmp_path: Path) -> None:
    """The cache disk fills up while a stream is teed to it: the tee drops its file, but the bytes it held stay
    readable for the hand-over (the stream's own descriptor of that file), the rest went to the spill file."""
    with tmpfs(tmp_path / "small", "64m") as cache_dir:
        mount = mount_factory(cache_dir=cache_dir, extra_args=["--cache-size", "48M", "--part-size", "5M"])
        fd = os.open(mount.path / "filled.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            expected = stream(fd, 12)  # parts 1-2 (10 MiB) go to the cache's tee
            wait_until(lambda: shutil.disk_usage(cache_dir).used >= 10 * MiB, 10,
                       message="parts 1-2 to be teed to the cache disk")
            fill(cache_dir)
            for n in range(12, 24):
                assert os.write(fd, block(n)) == MiB
                expected += block(n)
            assert os.pwrite(fd, b"Z" * 10, MiB) == 10
            expected[MiB:MiB + 10] = b"Z" * 10
        finally:
            os.close(fd)
        same(stored(s3, mount, "filled.bin"), expected)
        mount.unmount()
