"""A file over 1 GiB written and read back through the mount, from the cache and from S3 (issue 3)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import Mount

SIZE = 1024**3 + 1024**2 + 7  # just over 1 GiB, not a multiple of the part size
BLOCK = 1024**2


def write_file(path: Path, size: int = SIZE) -> str:
    digest = hashlib.sha256()
    seed = os.urandom(BLOCK)
    with open(path, "wb") as fh:
        written = 0
        counter = 0
        while written < size:
            # Different bytes in every block, cheaply: a counter prefix on a random block.
            block = (counter.to_bytes(8, "little") + seed)[: min(BLOCK, size - written)]
            fh.write(block)
            digest.update(block)
            written += len(block)
            counter += 1
    return digest.hexdigest()


def read_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 * BLOCK):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.slow
def test_gigabyte_file_round_trip(mount_factory: Any, s3: Any) -> None:
    mount: Mount = mount_factory(extra_args=["--cache-size", "2G"])
    expected = write_file(mount.path / "big.bin")
    head = s3.head_object(Bucket=mount.bucket, Key=mount.key("big.bin"))
    assert head["ContentLength"] == SIZE
    assert (mount.path / "big.bin").stat().st_size == SIZE
    assert os.getxattr(mount.path / "big.bin", "user.hybridfs.state") == b"cached"
    assert read_digest(mount.path / "big.bin") == expected  # from the cache
    mount.unmount()
    # A second mount with an empty cache reads it from S3 (ranged GETs, read-ahead).
    cold: Mount = mount_factory(extra_args=["--no-events"])
    assert os.getxattr(cold.path / "big.bin", "user.hybridfs.state") == b"cloud"
    assert read_digest(cold.path / "big.bin") == expected


@pytest.mark.slow
def test_file_over_5_gib(mount_factory: Any, s3: Any) -> None:
    """Above S3's single-PUT and CopyObject limit: multipart upload, ranged reads, multipart copy on rename."""
    size = 5 * 1024**3 + 3 * 1024**2 + 1
    mount: Mount = mount_factory(extra_args=["--cache-size", "1G", "--no-events"])  # too big to cache
    expected = write_file(mount.path / "huge.bin", size)
    assert s3.head_object(Bucket=mount.bucket, Key=mount.key("huge.bin"))["ContentLength"] == size
    os.rename(mount.path / "huge.bin", mount.path / "moved.bin")
    assert s3.head_object(Bucket=mount.bucket, Key=mount.key("moved.bin"))["ContentLength"] == size
    assert os.getxattr(mount.path / "moved.bin", "user.hybridfs.state") == b"cloud"
    assert read_digest(mount.path / "moved.bin") == expected
