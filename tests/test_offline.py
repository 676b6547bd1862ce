"""Issue 12 item 3 through a real mount and the S3 fault proxy: a restarted mount serves its cached files while S3
is down (last-known attributes persist in the cache index), and the circuit breaker makes lookups fail or fall
back at once instead of after botocore's retry cycle."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from typing import Any

import pytest
from helpers import Mount, wait_until

OUTAGE_LOG = (r"S3 marked down after \d+ failed calls in a row",
              r"S3 unreachable .*; serving last known attributes and cached data",
              r"S3 is down|S3 unreachable|Could not connect|Connection was closed|connection")


def breaker(mount: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))["s3"]["breaker"]
    return doc


def test_cached_files_stay_readable_after_a_restart_while_s3_is_down(mount_factory: Any, s3_proxy: Any) -> None:
    via_proxy = ["--endpoint-url", s3_proxy.url]
    first = mount_factory(extra_args=via_proxy)
    data = os.urandom(700_000)
    (first.path / "d").mkdir()
    (first.path / "d" / "f.bin").write_bytes(data)
    os.chmod(first.path / "d" / "f.bin", 0o640)
    first.unmount()  # the index keeps the attributes it knew

    second = mount_factory(cache_dir=first.cache_dir, extra_args=via_proxy)
    for pattern in OUTAGE_LOG:
        second.allow_log(pattern)
    s3_proxy.down("refuse")
    started = time.monotonic()
    assert (second.path / "d" / "f.bin").read_bytes() == data
    first_read = time.monotonic() - started
    assert first_read < 15, f"the first read during the outage took {first_read:.1f}s"
    st = os.stat(second.path / "d" / "f.bin")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == len(data)
    assert breaker(second)["state"] == "open"

    started = time.monotonic()
    with pytest.raises(OSError) as info:
        os.stat(second.path / "d" / "not-cached.bin")
    assert info.value.errno == errno.EIO
    assert time.monotonic() - started < 1.0, "a lookup with S3 marked down must fail at once"

    s3_proxy.up()
    wait_until(lambda: breaker(second)["state"] == "closed", timeout=15, message="a probe to close the breaker")
    (second.path / "d" / "g.bin").write_bytes(b"S3 is back")
    second.unmount()
