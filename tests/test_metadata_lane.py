"""Metadata never waits behind bulk transfers (issue 22): through a real mount whose whole-object downloads are
held at the S3 fault proxy (a wave of cold reads and their hydrations, every S3 thread busy with a GET), a stat
of another file is answered at once, and an open after a foreign overwrite reads the new bytes.

Before the metadata lane, HEAD and LIST queued behind the downloads on the one ``s3`` limiter: a stat of a new
file waited for the wave to drain, and a revalidation of a cached file gave up after a second and stored the
last known attributes as a fresh answer, so the open served the old cached bytes with S3 healthy.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from conftest import MountFactory
from helpers import Mount, wait_until
from s3proxy import Rule, S3FaultProxy

THREADS = 8  # --s3-threads: the wave needs this many downloads held to occupy every bulk thread
WAVE = 2 * THREADS  # cold files read at once (each a GET, and a hydration's GET after it)
ANSWER_WITHIN = 1.5  # a HEAD and a LIST to a healthy S3, with room for a loaded machine; the wave is held 10 s
HELD_FOR = 10.0  # the proxy releases the wave's answers after this at the latest (below the 30 s read timeout)
TIMERS = ["--attr-timeout", "0.2", "--dir-cache-time", "1"]


def namespace_status(mount: Mount) -> dict[str, int]:
    found: dict[str, int] = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))["namespace"]
    return found


def timed(fn: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


@contextmanager
def download_wave(mount: Mount, s3: Any, proxy: S3FaultProxy) -> Iterator[Rule]:
    """WAVE cold files read through the mount at once, their GETs (the readers' and the hydrations') answered by
    S3 but held at the proxy until the block ends: every S3 thread of the mount is busy with a download."""
    for i in range(WAVE):
        s3.put_object(Bucket=mount.bucket, Key=mount.key(f"wave/f{i}"), Body=os.urandom(64 * 1024))
    rule = proxy.add(Rule(method="GET", path=re.escape(f"/{mount.bucket}/{mount.key('wave/')}"), action="late",
                          delay=HELD_FOR))
    pool = concurrent.futures.ThreadPoolExecutor(WAVE)
    readers = [pool.submit((mount.path / "wave" / f"f{i}").read_bytes) for i in range(WAVE)]
    try:
        wait_until(lambda: rule.hits >= THREADS, timeout=60, message=f"{THREADS} downloads held at the proxy")
        yield rule
    finally:
        proxy.remove(rule)
        for reader in readers:
            reader.result(timeout=120)
        pool.shutdown()


def test_stat_is_answered_while_downloads_fill_every_s3_thread(mount_factory: MountFactory, s3: Any,
                                                                s3_proxy: S3FaultProxy) -> None:
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--s3-threads", str(THREADS), *TIMERS])
    known = mount.path / "known.txt"
    known.write_bytes(b"known")
    s3.put_object(Bucket=mount.bucket, Key=mount.key("other/new.txt"), Body=b"new file")
    with download_wave(mount, s3, s3_proxy):
        # A path the mount has never seen: nothing to fall back on, so the stat waits for S3's answer.
        st, took_new = timed(lambda: os.stat(mount.path / "other" / "new.txt"))
        assert st.st_size == len(b"new file")
        # A known file past --dir-cache-time: its revalidation is answered, not given up on after a second.
        before = namespace_status(mount)["slow_revalidations"]
        time.sleep(1.2)  # let the known attributes age past --dir-cache-time (the point of the test, not a sync)
        st, took_known = timed(lambda: os.stat(known))
        assert st.st_size == len(b"known")
        fell_back = namespace_status(mount)["slow_revalidations"] - before
    print(f"stat of a new file {took_new:.3f}s, of a known file {took_known:.3f}s ({fell_back} fallbacks) "
          f"while {THREADS} downloads held every bulk S3 thread")
    assert took_new < ANSWER_WITHIN, f"stat of a new file waited {took_new:.1f}s behind the downloads"
    assert took_known < ANSWER_WITHIN and fell_back == 0, (took_known, fell_back)


def test_open_after_foreign_overwrite_reads_new_bytes_during_a_download_wave(
        mount_factory: MountFactory, s3: Any, s3_proxy: S3FaultProxy) -> None:
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--s3-threads", str(THREADS), *TIMERS])
    path = mount.path / "hot.bin"
    old, new = os.urandom(100_000), os.urandom(100_000)
    path.write_bytes(old)
    wait_until(lambda: os.getxattr(path, "user.hybridfs.state") == b"cached", timeout=15,
               message="the written file to be cached")
    assert path.read_bytes() == old
    with download_wave(mount, s3, s3_proxy):
        s3.put_object(Bucket=mount.bucket, Key=mount.key("hot.bin"), Body=new)  # a foreign overwrite
        time.sleep(1.2)  # past --dir-cache-time and --attr-timeout: the next open must ask S3 (not a sync)
        # The open decides which version it reads (the ETag its revalidation returned); the bytes of a new
        # version then come from S3, behind the held downloads: read them once the wave is released.
        fd, took = timed(lambda: os.open(path, os.O_RDONLY))
    try:
        body = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    finally:
        os.close(fd)
    print(f"open after a foreign overwrite: {took:.3f}s; read the {'new' if body == new else 'OLD'} bytes")
    assert body == new, "the open served the old cached bytes although S3 held the new version"
    assert took < ANSWER_WITHIN, took



def test_a_revalidation_that_lands_late_is_kept_and_the_fallback_is_not(
        mount_factory: MountFactory, s3: Any, s3_proxy: S3FaultProxy) -> None:
    """An open whose revalidation S3 answers late serves the last known attributes after a second; S3's answer is
    kept when it lands, so the next stat shows the new version. Before: the HEAD was abandoned and the fallback
    stored as a fresh answer, which stats then served for --dir-cache-time (here 30 s)."""
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--no-events", "--attr-timeout", "0.2",
                                      "--dir-cache-time", "30"])
    path = mount.path / "known.bin"
    path.write_bytes(b"old")
    s3.put_object(Bucket=mount.bucket, Key=mount.key("known.bin"), Body=b"new version")  # a foreign overwrite
    held = s3_proxy.add(Rule(method="HEAD", path=re.escape(f"/{mount.bucket}/{mount.key('known.bin')}") + "$",
                             action="late", delay=3.0, times=1))
    time.sleep(0.3)  # past --attr-timeout: the open revalidates (the point of the test, not a sync)
    body, took = timed(path.read_bytes)
    assert held.hits == 1, "the open's revalidation was not the held HEAD"
    assert body == b"old" and took < 3.0, (body, took)  # served from what the mount knows (contract 5)
    start = time.monotonic()
    wait_until(lambda: os.stat(path).st_size == len(b"new version"), timeout=10,
               message="the stat to show the version S3's late answer named")
    print(f"open fell back in {took:.2f}s; the new size shown {time.monotonic() - start:.2f}s later")
    assert path.read_bytes() == b"new version"
