"""Issue 21, items 3, 4 and 7: deletes, metadata copies and commits of one key are ordered.

Through real mounts. A metadata change (chmod, touch, rename) copies the object onto itself or a new key: the copy
is conditional on the version its attributes were read from, and what the mount shows after it is S3's answer. An
unlink of a key whose commit is on its way waits for the commit, or fences it: what lands afterwards is deleted.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from typing import Any

import pytest
from helpers import Mount

MiB = 1024 * 1024
# Long attribute caches: the mount keeps the 10-byte version's attributes while boto3 replaces it.
STALE_ATTRS = ["--dir-cache-time", "120", "--attr-timeout", "60", "--negative-cache-time", "60"]


def s3_bytes(s3: Any, mount: Mount, name: str) -> bytes | None:
    try:
        return bytes(s3.get_object(Bucket=mount.bucket, Key=mount.key(name))["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def object_path(mount: Mount, name: str) -> str:
    return re.escape(f"/{mount.bucket}/{mount.key(name)}") + "$"


# -- item 4: a metadata copy never pairs a newer version with stale attributes ------------------------------


def _chmod(mount: Mount, name: str) -> str:
    os.chmod(mount.path / name, 0o600)
    return name


def _touch(mount: Mount, name: str) -> str:
    os.utime(mount.path / name)
    return name


def _rename(mount: Mount, name: str) -> str:
    os.rename(mount.path / name, mount.path / "moved.txt")
    return "moved.txt"


@pytest.mark.parametrize(("change", "size"), [(_chmod, MiB), (_touch, MiB), (_rename, MiB), (_chmod, 24 * MiB)],
                         ids=["chmod", "touch", "rename", "chmod-multipart-copy"])
def test_metadata_change_after_a_foreign_overwrite_keeps_the_new_version(
        mount_factory: Any, s3: Any, change: Callable[[Mount, str], str], size: int) -> None:
    """boto3 replaces a 10-byte file with a bigger one; chmod/touch/rename on the mount while it still knows the
    10-byte version; then `echo x >> F`. Before: S3 ended with 12 bytes (the copy took the new object, the mount
    kept size 10 with the new ETag, so the append's If-Match matched). 24 MiB: the copy is multipart
    (UploadPartCopy, above the part size). After: the change applies to the new version, the append follows it."""
    mount = mount_factory(extra_args=STALE_ATTRS)
    (mount.path / "f.txt").write_bytes(b"0123456789")
    assert (mount.path / "f.txt").stat().st_size == 10
    new = os.urandom(size)
    s3.put_object(Bucket=mount.bucket, Key=mount.key("f.txt"), Body=new)
    name = change(mount, "f.txt")
    with open(mount.path / name, "ab") as fh:
        fh.write(b"x\n")
    stored = s3_bytes(s3, mount, name)
    assert stored is not None
    assert len(stored) == size + 2, f"S3 holds {len(stored)} bytes"
    assert stored == new + b"x\n"
    assert (mount.path / name).stat().st_size == size + 2
    if change is _chmod:
        assert stat.S_IMODE((mount.path / name).stat().st_mode) == 0o600
    assert "expected 12" not in mount.log_text()  # the cache was not marked unavailable
    assert "changed in S3 since its attributes were read" in mount.log_text()  # the conditional copy was refused
