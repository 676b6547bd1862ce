"""Contracts 2 and 5 through a real mount: a failing cache disk costs speed only; S3 down keeps cached files
readable and fails writes with EIO in bounded time, leaving no partial object (issue 3)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from eventlog import read_events
from helpers import Mount, run_hybridfs, tmpfs, wait_until


def fill(directory: Path) -> None:
    """Write until the filesystem says ENOSPC."""
    with open(directory / "filler", "wb", buffering=0) as fh:  # unbuffered: close() has nothing left to flush
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()


def write_and_check(mount: Mount, s3: Any, stack: Any, name: str) -> None:
    data = os.urandom(1024 * 1024 + 5)
    (mount.path / name).write_bytes(data)
    assert s3.get_object(Bucket=mount.bucket, Key=mount.key(name))["Body"].read() == data
    assert (mount.path / name).read_bytes() == data
    event = read_events(stack.bootstrap, f"{mount.topic_prefix}.hydrate",
                        lambda e: e["key"] == mount.key(name) and e["reason"] == "tee-failed")
    assert event["size"] == len(data)
    assert os.getxattr(mount.path / name, "user.hybridfs.state") == b"cloud"


@pytest.mark.allow_log(r"cache copy of .* failed", r"cache: could not store")
def test_full_cache_disk(mount_factory: Any, s3: Any, stack: Any, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "4m") as cache_dir:
        mount = mount_factory(cache_dir=cache_dir)
        mount.allow_log(r"cache copy of .* failed|No space left|could not store")
        fill(cache_dir)
        write_and_check(mount, s3, stack, "on-full-disk.bin")
        mount.unmount()


def test_read_only_cache_disk(mount_factory: Any, s3: Any, stack: Any, tmp_path: Path) -> None:
    """The cache directory on a read-only mount (a read-only bind of a disk that holds an old cache)."""
    with tmpfs(tmp_path / "rw", "64m") as disk:
        (disk / "cache" / "objects").mkdir(parents=True)
        ro = tmp_path / "ro"
        ro.mkdir()
        subprocess.run(["mount", "--bind", "-o", "ro", str(disk), str(ro)], check=True)
        try:
            mount = mount_factory(cache_dir=ro / "cache")
            mount.allow_log(r"cannot open cache directory .*Read-only file system|cache copy of .* failed")
            write_and_check(mount, s3, stack, "on-ro-disk.bin")
            mount.unmount()
        finally:
            subprocess.run(["umount", "-l", str(ro)], check=False)


def test_cache_dir_removed_while_mounted(mount_factory: Any, s3: Any, stack: Any) -> None:
    mount = mount_factory()
    mount.allow_log(r"cache copy of .* failed|could not store|No such file or directory")
    shutil.rmtree(mount.cache_dir)
    write_and_check(mount, s3, stack, "no-cache.bin")


def test_s3_down(mount_factory: Any, s3: Any) -> None:
    # Caches of attributes off, so every open revalidates against S3 and must fall back while it is down.
    mount = mount_factory(extra_args=["--write-timeout", "10", "--s3-max-attempts", "2",
                                      "--s3-connect-timeout", "1", "--dir-cache-time", "0", "--attr-timeout", "0"])
    mount.allow_log(r"S3 unreachable|upload of .* did not finish|could not abort|S3 marked down|"
                    r"closed with changes that are not stored|streamed upload of .* failed")
    cached = os.urandom(300_000)
    (mount.path / "cached.bin").write_bytes(cached)
    (mount.path / "d").mkdir()
    run_hybridfs("stack", "down", "s3")
    try:
        # Cached data stays readable.
        assert (mount.path / "cached.bin").read_bytes() == cached
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            with open(mount.path / "d" / "new.bin", "wb") as fh:
                for _ in range(3):
                    fh.write(os.urandom(4 * 1024 * 1024))
        elapsed = time.monotonic() - started
        assert err.value.errno == errno.EIO
        assert elapsed < 10 + 5, f"the failed write took {elapsed:.1f}s"
        assert "serving last known attributes and cached data" in mount.log_text()
    finally:
        run_hybridfs("stack", "up", "s3")
    # Once S3 is back: nothing partial, not even an incomplete multipart upload (aborts are retried).
    assert "Contents" not in s3.list_objects_v2(Bucket=mount.bucket, Prefix=mount.key("d/new.bin"))
    # MinIO lists uploads for an exact key only (a directory prefix would list nothing and prove nothing).
    wait_until(lambda: not s3.list_multipart_uploads(Bucket=mount.bucket, Prefix=mount.key("d/new.bin")).get("Uploads"),
               timeout=30, message="no incomplete multipart uploads")
    assert (mount.path / "cached.bin").read_bytes() == cached
