"""Issue 24, "the FUSE request timeout": with fs.fuse.default_request_timeout set (Linux >= 6.14), a request the
kernel sees unanswered that long aborts the whole connection (ENOTCONN for everyone until a remount). hybridfs
answers within --write-timeout (a close() whose upload S3 stalls fails with EIO), so the mount survives the
timeout; and it warns at start when the sysctl is not above --write-timeout.

The sysctl is global: the kernel reads it when a FUSE filesystem is mounted, so it is set only around the mount
(other mounts made meanwhile on this machine get it too) and put back at once."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Mount

from hybridfs.bench.s3proxy import Rule
from hybridfs.commands.preflight import fuse_request_timeout

SYSCTL = Path("/proc/sys/fs/fuse/default_request_timeout")
KERNEL_TIMEOUT = 20  # seconds; the kernel checks every 15 s, so an overdue request aborts within 20-35 s
TIMER = 15

needs_sysctl = pytest.mark.skipif(not SYSCTL.exists() or os.geteuid() != 0,
                                  reason="needs Linux >= 6.14's fs.fuse sysctls and root")


@contextlib.contextmanager
def request_timeout(seconds: int) -> Iterator[None]:
    saved = SYSCTL.read_text().strip()
    SYSCTL.write_text(str(seconds))
    try:
        yield
    finally:
        SYSCTL.write_text(saved)


def mount_with_timeout(mount_factory: Any, seconds: int, extra_args: list[str]) -> Mount:
    with request_timeout(seconds):
        mount: Mount = mount_factory(extra_args=extra_args)
    return mount


@needs_sysctl
def test_a_stalled_write_fails_before_the_kernel_aborts_the_mount(mount_factory: Any, s3_proxy: Any) -> None:
    write_timeout = 5
    mount = mount_with_timeout(mount_factory, KERNEL_TIMEOUT, [
        "--no-events", "--endpoint-url", s3_proxy.url, "--write-timeout", str(write_timeout),
        "--s3-max-attempts", "2", "--s3-connect-timeout", "1", "--s3-read-timeout", "4"])
    mount.allow_log(r"upload of .* did not finish|closed with changes that are not stored|"
                    r"streamed upload of .* failed|could not abort|S3 marked down|S3 unreachable")
    kept = os.urandom(100_000)
    (mount.path / "kept.bin").write_bytes(kept)

    stall = s3_proxy.add(Rule(method="PUT", action="stall"))
    start = time.monotonic()
    with pytest.raises(OSError) as failed:  # the write or the close may report it
        with open(mount.path / "stalled.bin", "wb") as fh:
            fh.write(os.urandom(1024 * 1024))
    took = time.monotonic() - start
    print(f"stalled write: {failed.value!r} after {took:.1f}s (--write-timeout {write_timeout}s)")
    assert failed.value.errno == errno.EIO
    assert took < write_timeout + 1
    assert stall.hits >= 1, "S3 saw the upload (and held it)"

    # Past the kernel's timeout and its 15 s timer, with S3 still holding the upload: nothing was left
    # unanswered that long, so the connection is still up.
    deadline = start + KERNEL_TIMEOUT + TIMER + 2
    while time.monotonic() < deadline:
        os.stat(mount.path / "kept.bin")  # ENOTCONN here: the kernel aborted the mount
        time.sleep(1)  # pacing the checks, not waiting for a condition
    assert (mount.path / "kept.bin").read_bytes() == kept
    assert "kept.bin" in os.listdir(mount.path)
    s3_proxy.remove(stall)


@needs_sysctl
def test_warns_when_the_kernel_timeout_is_below_the_write_timeout(mount_factory: Any) -> None:
    mount = mount_with_timeout(mount_factory, KERNEL_TIMEOUT, ["--no-events", "--write-timeout", "30",
                                                               "--s3-max-attempts", "2", "--s3-read-timeout", "5",
                                                               "--s3-connect-timeout", "1"])
    line = ("fs.fuse.default_request_timeout is 20s, not above what a request may wait for S3 (--write-timeout 30s; "
            "an S3 call that stalls: 2 attempts x (1s connect + 5s read) = 12s): the kernel would abort this mount")
    mount.allow_log(re.escape(line))
    assert line in mount.log_text()
    assert os.listdir(mount.path) == []


@pytest.mark.parametrize(("default", "ceiling", "expected"), [
    ("0", "0", None),
    ("20", "0", ("fs.fuse.default_request_timeout", 20)),
    ("0", "30", ("fs.fuse.max_request_timeout", 30)),  # the ceiling applies to servers that set none, too
    ("40", "30", ("fs.fuse.max_request_timeout", 30)),
    ("20", "30", ("fs.fuse.default_request_timeout", 20)),
    (None, None, None),  # a kernel before 6.14
])
def test_the_timeout_a_new_mount_gets(tmp_path: Path, default: str | None, ceiling: str | None,
                                      expected: tuple[str, int] | None) -> None:
    for name, value in (("default_request_timeout", default), ("max_request_timeout", ceiling)):
        if value is not None:
            (tmp_path / name).write_text(f"{value}\n")
    assert fuse_request_timeout(tmp_path) == expected
