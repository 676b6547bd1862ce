"""Issue 21, the interleavings the concurrency torture (hybridfs/bench/torture.py) found last, each forced through a
real mount with the S3 fault proxy holding the request that keeps the first operation inside its await.

- A truncate by path that waits for the file's lock behind its last release: the release drops the writer and the
  open file, and the truncate made a spool on that dead file (a 0-byte ``*.spool`` descriptor left open for the
  mount's life, and the truncate acknowledged but never stored).
- A chmod of a file above the part size (a multipart copy, UploadPartCopy) whose source another writer replaces
  after the copy's HEAD: s3transfer's S3CopyFailedError reached the FUSE layer as a BUG (EIO).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from helpers import Mount, object_path, s3_bytes, wait_until
from s3proxy import Rule, S3FaultProxy


def spool_descriptors(mount: Mount) -> list[str]:
    """The daemon's open descriptors on spool files."""
    found = []
    fd_dir = Path(f"/proc/{mount.proc.pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            dest = os.readlink(entry)
        except OSError:
            continue
        if dest.endswith(".spool"):
            found.append(dest)
    return found


class Attempt(threading.Thread):
    """A blocking call in a thread: its outcome, and whether it is waiting for the daemon's answer."""

    def __init__(self, fn: Any, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.fn = fn
        self.outcome: object = "running"
        self.tid = 0

    def run(self) -> None:
        self.tid = threading.get_native_id()
        try:
            self.fn()
            self.outcome = None
        except OSError as exc:
            self.outcome = exc

    def in_fuse_request(self) -> bool:
        """Blocked in the kernel waiting for the FUSE daemon's answer."""
        if not self.tid:
            return False
        try:
            wchan = Path(f"/proc/self/task/{self.tid}/wchan").read_text()
        except OSError:
            return False
        return "fuse" in wchan or "request_wait_answer" in wchan


def test_truncate_behind_the_last_release_is_stored_and_leaves_no_spool(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """A read-only descriptor's file is truncated by path (its changes live in a spool); its close makes the last
    release upload them, and the proxy holds S3's answer while the release holds the file's lock; `truncate F 0`
    meanwhile waits for that lock. Before: the truncate found the released file, made a spool on it and returned 0
    — S3 kept the 4 KiB version and a 0-byte spool descriptor stayed open in the daemon. After: the truncate
    applies to the closed file: S3 holds 0 bytes and no spool is left open."""
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--write-timeout", "30"])
    name = "f.bin"
    path = mount.path / name
    path.write_bytes(b"a" * 8192)
    fd = os.open(path, os.O_RDONLY)
    os.truncate(path, 4096)  # the open file is changed: the last release stores it
    commit = s3_proxy.add(Rule(method="PUT", path=object_path(mount, name), action="late"))
    os.close(fd)  # FUSE's release is asynchronous: it runs in the daemon after close() returned
    wait_until(lambda: commit.held >= 1, 30, message="the release's upload to be held at the proxy")
    truncator = Attempt(lambda: os.truncate(path, 0), "truncate")
    truncator.start()
    wait_until(truncator.in_fuse_request, 10, message="the truncate to wait for the daemon")
    os.getxattr(mount.path, "user.hybridfs.status")  # a later request answered: the setattr has been taken in
    s3_proxy.remove(commit)
    truncator.join(30)
    assert truncator.outcome is None, truncator.outcome
    wait_until(lambda: s3_bytes(s3, mount, name) == b"", 10,
               message=f"S3 to hold the truncated file (holds {len(s3_bytes(s3, mount, name) or b'')} bytes)")
    assert path.stat().st_size == 0
    wait_until(lambda: not spool_descriptors(mount), 10,
               message=f"no spool descriptor left open (open: {spool_descriptors(mount)})")


def test_chmod_multipart_copy_whose_source_changes_midway_applies_to_the_new_version(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """chmod of a 6 MiB file (5 MiB parts: the copy onto itself is multipart, CopySourceIfMatch on each
    UploadPartCopy). The proxy delays the first UploadPartCopy; boto3 replaces the object meanwhile, so S3 refuses
    the part (412). Before: s3transfer's S3CopyFailedError was not an S3 error the mount knew: "setattr: BUG:
    unexpected S3CopyFailedError", chmod failed with EIO. After: a write conflict, like a refused single copy:
    chmod applies to the new version (S3 holds boto3's bytes with mode 600)."""
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--part-size", "5M",
                                      "--dir-cache-time", "120", "--attr-timeout", "60"])
    name = "big.bin"
    old, new = os.urandom(6 * 1024 * 1024), os.urandom(6 * 1024 * 1024 + 1)
    s3.put_object(Bucket=mount.bucket, Key=mount.key(name), Body=old)
    assert (mount.path / name).stat().st_size == len(old)  # the mount knows the old version
    part = s3_proxy.add(Rule(method="PUT", path=object_path(mount, name), query=r"partNumber=", action="delay",
                             delay=3.0, times=1))
    chmod = Attempt(lambda: os.chmod(mount.path / name, 0o600), "chmod")
    chmod.start()
    wait_until(lambda: part.hits >= 1, 30, message="the first UploadPartCopy to reach the proxy")
    s3.put_object(Bucket=mount.bucket, Key=mount.key(name), Body=new)  # replaced while the part is delayed
    chmod.join(60)
    assert chmod.outcome is None, chmod.outcome
    assert s3_bytes(s3, mount, name) == new
    assert (mount.path / name).stat().st_mode & 0o777 == 0o600
    assert int(s3.head_object(Bucket=mount.bucket, Key=mount.key(name))["Metadata"]["mode"]) & 0o777 == 0o600
