"""Issue 24, one test per kind of S3 fault through a real mount: reads, stats and listings of files cached before
the outage are served within the availability bench's deadline (2 s each), on a mount whose every timer has
expired (--attr-timeout, --dir-cache-time, --negative-cache-time all short, so each operation would ask S3) and
right after a restart during the outage; writes fail with EIO within --write-timeout (+1 s).

The kinds: connections refused (reset before the request is read; after a restart, a port nobody listens on),
connections reset after the request (a TLS or load-balancer reset), stalls (the request is taken, no answer),
503 SlowDown, slow answers (every request answered after 20 s), and, after a restart, an endpoint whose name does
not resolve. Before the stall detection in hybridfs/tiers/breaker.py, a stalled or slow S3 cost a listing about
2 s (1 s for the directory's revalidation, 1 s for the listing) and the breaker never opened within a test's
length (each request waited 4 x 30 s); a restart during 503s did not mount at all."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Mount, wait_until

from hybridfs.bench.s3proxy import Rule, S3FaultProxy

DEADLINE = 2.0  # the availability bench's deadline per operation
WRITE_TIMEOUT = 3.0
TIMERS = ["--attr-timeout", "0.2", "--dir-cache-time", "0.5", "--negative-cache-time", "0.2"]
AGED = 0.6  # longer than every timer above
RUNNING_KINDS = ["refuse", "reset", "stall", "503", "slow"]
RESTART_KINDS = [*RUNNING_KINDS, "dns"]
OUTAGE_LOG = (
    r"S3 marked down",
    r"S3 (unreachable|slow) .*; serving last known attributes and cached data",
    r"listing '(d)?': .*; listings are answered with what this mount knows",
    r"S3 endpoint .* (unreachable|unavailable|did not answer).*; mounting anyway",
    r"upload of .* (did not finish|failed)|could not abort|S3 is down|S3 unreachable|did not finish within|"
    r"closed with changes that are not stored|S3 said SlowDown",
)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


def break_s3(proxy: S3FaultProxy, kind: str) -> None:
    if kind == "reset":  # the request is read, then the connection is reset before any answer
        proxy.add(Rule(action="reset"))
    else:
        proxy.down(kind, delay=20.0)  # "slow": every request answered after 20 s


def cache_some_files(mount: Mount) -> dict[str, bytes]:
    d = mount.path / "d"
    d.mkdir()
    data = {name: os.urandom(40_000) for name in ("a", "b")}
    for name, body in data.items():
        (d / name).write_bytes(body)
    wait_until(lambda: all(os.getxattr(d / n, "user.hybridfs.state") == b"cached" for n in data), 15,
               message="the written files to be cached")
    assert sorted(os.listdir(d)) == sorted(data)
    return data


def assert_served(d: Path, data: dict[str, bytes], rounds: int = 2) -> list[str]:
    """Stat, read and list the cached files, each within DEADLINE, ``rounds`` times with every timer expired
    before each round. Returns what took long, for the message."""
    slow: list[str] = []
    for _ in range(rounds):
        time.sleep(AGED)  # every attribute and listing older than its timer: the point of the test, not a sync
        names, took = timed(lambda: sorted(os.listdir(d)))
        assert set(data) <= set(names) <= {*data, "new"}, names  # "new": a file being created meanwhile
        slow += [f"ls {took:.2f}s"] if took >= DEADLINE else []
        for name, body in data.items():
            st, took = timed(lambda: os.stat(d / name))  # noqa: B023 (called at once)
            assert st.st_size == len(body)
            slow += [f"stat {name} {took:.2f}s"] if took >= DEADLINE else []
            got, took = timed((d / name).read_bytes)
            assert got == body
            slow += [f"read {name} {took:.2f}s"] if took >= DEADLINE else []
    return slow


class Writer(threading.Thread):
    """Creates and writes one file; how long its open took, and its write and close (or 0 when the open failed)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.error: OSError | None = None
        self.opened = self.closed = 0.0

    def run(self) -> None:
        start = time.monotonic()
        try:
            with open(self.path, "wb") as fh:
                self.opened = time.monotonic() - start
                start = time.monotonic()
                fh.write(b"written during the outage")
        except OSError as exc:
            self.error = exc
        if self.opened:
            self.closed = time.monotonic() - start
        else:
            self.opened = time.monotonic() - start


def serving_lines(mount: Mount) -> list[str]:
    return [line for line in mount.log_text().splitlines() if "serving last known attributes" in line]


@pytest.mark.parametrize("kind", RUNNING_KINDS)
def test_cached_files_are_served_in_every_kind_of_s3_fault(s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any,
                                                           stack: Any, kind: str) -> None:
    mount: Mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--no-events", *TIMERS,
                                             "--write-timeout", str(WRITE_TIMEOUT)])
    for pattern in OUTAGE_LOG:
        mount.allow_log(pattern)
    data = cache_some_files(mount)
    break_s3(s3_proxy, kind)
    try:
        # A create in the same directory meanwhile: the kernel holds the directory's lock through its lookup, so
        # a lookup waiting for S3 there would hold up every lookup of the cached files too.
        time.sleep(AGED)  # the directory's listing expires: the create's lookup asks S3 (not a sync)
        writer = Writer(mount.path / "d" / "new")
        writer.start()
        slow = assert_served(mount.path / "d", data, rounds=3)
        assert not slow, f"not served within {DEADLINE:g}s: {slow}"
        writer.join(30)
        assert writer.error is not None and writer.error.errno == errno.EIO, writer.error
        assert writer.opened < DEADLINE and writer.closed < WRITE_TIMEOUT + 1, (writer.opened, writer.closed)
        assert len(serving_lines(mount)) == 1, f"said once per outage: {serving_lines(mount)}"
    finally:
        s3_proxy.clear()
    s3.put_object(Bucket=stack.bucket, Key=mount.key("d/c"), Body=b"written by another tool after the outage")
    wait_until(lambda: sorted(os.listdir(mount.path / "d")) == ["a", "b", "c"], 30,
               message="listings to come from S3 again")


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("kind", RESTART_KINDS)
def test_cached_files_are_served_right_after_a_restart_in_every_kind_of_s3_fault(
        s3_proxy: S3FaultProxy, mount_factory: Any, kind: str) -> None:
    first = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--no-events"])
    data = cache_some_files(first)
    first.unmount()  # the cache index keeps what is cached and its attributes

    endpoint = s3_proxy.url
    if kind == "dns":
        endpoint = f"http://s3.hybridfs-test.invalid:{s3_proxy.url.rsplit(':', 1)[1]}"  # .invalid never resolves
    elif kind == "refuse":
        endpoint = f"http://127.0.0.1:{unused_port()}"  # nobody listens: connections refused
    else:
        break_s3(s3_proxy, kind)
    try:
        second = mount_factory(cache_dir=first.cache_dir, extra_args=["--endpoint-url", endpoint, "--no-events",
                                                                      *TIMERS])
        for pattern in OUTAGE_LOG:
            second.allow_log(pattern)
        slow = assert_served(second.path / "d", data)
        assert not slow, f"not served within {DEADLINE:g}s: {slow}"
    finally:
        s3_proxy.clear()
