"""An open that finds a version replaced elsewhere drops the attributes the kernel holds of the old one. Before:
fstat after the open said the old size for up to --attr-timeout, and reads stopped there, or came back empty
where the new version was shorter (the torture test: "fstat said 262144 bytes, read returned 0")."""

from __future__ import annotations

import os
import time
from typing import Any

from helpers import Mount


def test_fstat_after_opening_a_version_replaced_elsewhere_says_its_size(mount_factory: Any, s3: Any,
                                                                         stack: Any) -> None:
    # The kernel keeps attributes for 3 s; the mount's own answers expire after 0.5 s, and an open revalidates
    # when its attributes are older than that: the open sees the new version while the kernel still holds the old.
    mount: Mount = mount_factory(extra_args=["--no-events", "--attr-timeout", "3", "--dir-cache-time", "0.5"])
    path = mount.path / "f.bin"
    old, new = os.urandom(256 * 1024), os.urandom(4096)
    s3.put_object(Bucket=stack.bucket, Key=mount.key("f.bin"), Body=old)
    assert os.stat(path).st_size == len(old)  # the kernel now holds the old size for 3 s
    s3.put_object(Bucket=stack.bucket, Key=mount.key("f.bin"), Body=new)
    time.sleep(0.6)  # past the mount's own 0.5 s, well within the kernel's 3 s (the point of the test)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read()
    assert (size, len(data)) == (len(new), len(new)), "fstat and read of the open must agree on the new version"
    assert data == new


def test_fstat_after_opening_a_file_written_here_then_emptied_elsewhere_says_zero(mount_factory: Any, s3: Any,
                                                                                  stack: Any) -> None:
    """The kernel's size of a file this mount wrote came from the writes, not from an answer of ours: an open
    that finds another version must drop it too (the torture test: "fstat said 16384 bytes, read returned 0")."""
    mount: Mount = mount_factory(extra_args=["--no-events", "--attr-timeout", "3", "--dir-cache-time", "0.5"])
    path = mount.path / "f.bin"
    path.write_bytes(os.urandom(16384))
    assert os.stat(path).st_size == 16384
    s3.put_object(Bucket=stack.bucket, Key=mount.key("f.bin"), Body=b"")  # another writer truncates it
    time.sleep(0.6)  # past the mount's own 0.5 s, well within the kernel's 3 s (the point of the test)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read()
    assert (size, data) == (0, b"")
