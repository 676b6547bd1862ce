"""Issue 21 item 7, the writer's parts, each through a real mount."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from helpers import Mount


def stored(s3: Any, mount: Mount, name: str) -> bytes | None:
    try:
        return bytes(s3.get_object(Bucket=mount.bucket, Key=mount.key(name))["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def test_fsync_on_a_read_only_descriptor_stores_another_descriptors_writes(mounted: Mount, s3: Any) -> None:
    """fsync() through a read-only descriptor (what ``sync FILE`` does) stores the writes made through another
    descriptor of the same file (before: it returned 0 and S3 held nothing)."""
    path = mounted.path / "synced.txt"
    writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(writer, b"first version\n")
        reader = os.open(path, os.O_RDONLY)
        try:
            os.fsync(reader)
            assert stored(s3, mounted, "synced.txt") == b"first version\n"
        finally:
            os.close(reader)
        os.write(writer, b"second line\n")
        subprocess.run(["sync", str(path)], check=True)
        assert stored(s3, mounted, "synced.txt") == b"first version\nsecond line\n"
    finally:
        os.close(writer)
