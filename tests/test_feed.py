"""The change feed (issue 13): a change closed on mount A is seen by a new open or stat on mount B within 1 s.

Two real mounts on one prefix with separate caches and one topic prefix. B runs with timers far longer than the
bound (--attr-timeout and --dir-cache-time 60 s), so only the feed can make A's changes visible to B in time:
the kernel's cached entries and attributes, B's namespace caches and its cache tier must all follow the feed.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from helpers import Mount, Stack, wait_until
from s3proxy import Rule, S3FaultProxy

from hybridfs.core.attrs import NS

LONG_TIMERS = ["--attr-timeout", "60", "--dir-cache-time", "60", "--negative-cache-time", "60"]
BOUND = 1.0  # seconds: the visibility goal the issue sets, a p99: test_visibility_latency_over_200_changes
# One change that takes longer than this is a stuck feed, not a slow percentile (one sample cannot test a p99);
# still far below B's 60 s timers (LONG_TIMERS), so a change seen in time was delivered by the feed.
STUCK = 10.0


def status(mount: Mount) -> dict[str, Any]:
    return json.loads(os.getxattr(mount.path, "user.hybridfs.status"))


def feed_trusted(mount: Mount) -> bool:
    return status(mount).get("feed", {}).get("mode") == "trusted"


def visible_within(predicate: Any, what: str, bound: float = STUCK) -> float:
    """Poll ``predicate`` (with a deadline well past the bound, so a miss reports how late it was) and
    assert it held within ``bound`` seconds; return the time it took. The p99 goal (BOUND) is asserted over
    enough samples by test_visibility_latency_over_200_changes, not here on each one."""
    start = time.monotonic()
    wait_until(predicate, timeout=bound * 3, interval=0.01, message=what)
    took = time.monotonic() - start
    assert took < bound, f"{what}: visible after {took:.2f}s, bound {bound:g}s"
    return took


def read(path: Path) -> bytes | None:
    """The file's bytes; None when it is not there, or when it was replaced in S3 between our open and our
    read (ESTALE: an open that raced the change, before the feed told this mount of it)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ESTALE:
            return None
        raise


@pytest.fixture
def pair(mount_factory: Any) -> tuple[Mount, Mount]:
    a = mount_factory()
    b = mount_factory(extra_args=LONG_TIMERS)
    for m in (a, b):
        wait_until(lambda m=m: feed_trusted(m), timeout=30, message=f"{m.path}: feed caught up")
    return a, b


def test_changes_on_one_mount_reach_the_other_within_a_second(pair: tuple[Mount, Mount]) -> None:
    a, b = pair
    (a.path / "f.txt").write_bytes(b"version 1")
    visible_within(lambda: read(b.path / "f.txt") == b"version 1", "create")
    os.stat(b.path / "f.txt")  # the kernel caches entry and attributes for 60 s on B

    (a.path / "f.txt").write_bytes(b"version 2, longer")
    visible_within(lambda: read(b.path / "f.txt") == b"version 2, longer", "overwrite (new open on B)")

    os.chmod(a.path / "f.txt", 0o600)
    visible_within(lambda: os.stat(b.path / "f.txt").st_mode & 0o777 == 0o600, "chmod")

    os.utime(a.path / "f.txt", ns=(1_600_000_000 * NS, 1_600_000_000 * NS))
    visible_within(lambda: os.stat(b.path / "f.txt").st_mtime_ns == 1_600_000_000 * NS, "utime")

    os.rename(a.path / "f.txt", a.path / "g.txt")
    visible_within(lambda: not (b.path / "f.txt").exists() and read(b.path / "g.txt") == b"version 2, longer",
                   "rename")

    (a.path / "g.txt").unlink()
    visible_within(lambda: not (b.path / "g.txt").exists(), "delete")

    (a.path / "d").mkdir()
    visible_within(lambda: (b.path / "d").is_dir(), "mkdir")
    os.symlink("target-name", a.path / "d" / "link")
    visible_within(lambda: os.path.islink(b.path / "d" / "link")
                   and os.readlink(b.path / "d" / "link") == "target-name", "symlink")
    (a.path / "d" / "link").unlink()
    (a.path / "d").rmdir()
    visible_within(lambda: not (b.path / "d").exists(), "rmdir")

    # Each mount applied the other's changes and skipped its own.
    sa, sb = status(a)["feed"], status(b)["feed"]
    assert sb["applied"] >= 9, sb
    assert sa["own_skipped"] >= 9 and sa["applied"] == 0, sa
    assert sb["mode"] == "trusted", sb


def test_a_changed_file_is_not_served_from_the_older_cached_copy(pair: tuple[Mount, Mount]) -> None:
    a, b = pair
    (a.path / "c.bin").write_bytes(b"a" * 10_000)
    wait_until(lambda: read(b.path / "c.bin") == b"a" * 10_000, timeout=10, message="first version on B")
    wait_until(lambda: os.getxattr(b.path / "c.bin", "user.hybridfs.state") == b"cached", timeout=10,
               message="B caches the first version")
    (a.path / "c.bin").write_bytes(b"b" * 10_000)
    visible_within(lambda: read(b.path / "c.bin") == b"b" * 10_000, "overwrite of a cached file")


def test_a_garbage_record_is_skipped_and_the_mount_keeps_serving(pair: tuple[Mount, Mount], stack: Stack) -> None:
    a, b = pair
    for m in (a, b):  # both mounts consume the topic
        m.allow_log(r"invalid event: .* sent to the dead-letter topic")
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    topic = f"{b.topic_prefix}.changes"
    producer.produce(topic, key=b.key("x.txt").encode(), value=b"\xff not json")
    producer.produce(topic, key=b"../escape", value=b"{}")
    producer.produce(topic, key=b.key("y.txt").encode(), value=json.dumps(
        {"version": 1, "key": b.key("y.txt"), "origin": "evil", "time": 1.0,
         "attrs": {"type": "file", "mode": -1}}).encode())
    assert producer.flush(10) == 0
    wait_until(lambda: b.log_text().count("sent to the dead-letter topic") >= 3, timeout=10,
               message="three bad records set aside on B")
    assert "invalid event: malformed JSON" in b.log_text()
    (a.path / "after.txt").write_bytes(b"still served")
    visible_within(lambda: read(b.path / "after.txt") == b"still served", "a change after the garbage")
    assert feed_trusted(b)


# getcwd in a loop until a file outside the mount appears: a lookup of the directory (a stat from the test) would
# rehash the dentry the feed unhashed, so only a process that asks for its cwd alone sees the window.
GETCWD_UNTIL_STOPPED = """
import os, sys
while not os.path.exists(sys.argv[1]):
    os.getcwd()
print(os.getcwd(), flush=True)
"""


def test_a_working_directory_survives_changes_to_its_directory(pair: tuple[Mount, Mount], tmp_path: Path) -> None:
    """A process on B with its cwd in d/ keeps it while A changes d/ and what is in it: the feed invalidates
    the directory's attributes, never its entry (that unhashes the dentry, and getcwd fails with ENOENT: git
    on a fresh mount replaying the feed said "unable to get current working directory")."""
    a, b = pair
    (a.path / "d").mkdir()
    wait_until(lambda: (b.path / "d").is_dir(), timeout=10, message="d on B")
    applied = status(b)["feed"]["applied"]
    stop = tmp_path / "stop"
    inside = subprocess.Popen([sys.executable, "-c", GETCWD_UNTIL_STOPPED, str(stop)], cwd=b.path / "d",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        os.chmod(a.path / "d", 0o750)
        (a.path / "d" / "f").write_bytes(b"new")
        wait_until(lambda: status(b)["feed"]["applied"] >= applied + 2, timeout=10,
                   message="B to apply the chmod and the create")
        stop.touch()
        out, err = inside.communicate(timeout=30)
    finally:
        inside.kill()
    assert inside.returncode == 0, err
    assert out.strip() == str(b.path / "d")
    assert os.stat(b.path / "d").st_mode & 0o777 == 0o750


@pytest.mark.slow
def test_visibility_latency_over_200_changes(pair: tuple[Mount, Mount]) -> None:
    """p50/p99 of "closed on A" -> "a new stat on B sees it", over 200 overwrites (printed; p99 < 1 s)."""
    a, b = pair
    (a.path / "v.txt").write_bytes(b"0")
    wait_until(lambda: (b.path / "v.txt").exists(), timeout=10, message="v.txt on B")
    delays = []
    for i in range(1, 201):
        body = b"x" * i
        (a.path / "v.txt").write_bytes(body)  # returns once S3 holds it
        start = time.monotonic()
        wait_until(lambda body=body: os.stat(b.path / "v.txt").st_size == len(body), timeout=10, interval=0.002,
                   message=f"change {i} on B")
        delays.append(time.monotonic() - start)
    delays.sort()
    p50, p99 = statistics.median(delays), delays[int(len(delays) * 0.99) - 1]
    print(f"\nfeed visibility A->B over {len(delays)} changes: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {delays[-1] * 1000:.0f} ms")
    assert p99 < BOUND


def test_kafka_outage_falls_back_to_the_timers(mount_factory: Any) -> None:
    """Kafka stopped (the shared broker: run it rarely): B notices within the health bound, says so once, and
    serves no version staler than its timers; writes on A keep working; trust comes back with Kafka."""
    from test_hydration import KAFKA_BACK_TIMEOUT, KAFKA_OUTAGE_LOG, kafka_stopped

    a = mount_factory()
    b = mount_factory(extra_args=["--attr-timeout", "1", "--dir-cache-time", "2"])
    for m in (a, b):
        m.allow_log(KAFKA_OUTAGE_LOG)
        wait_until(lambda m=m: feed_trusted(m), timeout=30, message=f"{m.path}: feed caught up")
    (a.path / "o.txt").write_bytes(b"before the outage")
    visible_within(lambda: read(b.path / "o.txt") == b"before the outage", "a change before the outage")
    with kafka_stopped():
        # 3 s without a lag measurement, plus one measurement interval and the status check.
        wait_until(lambda: not feed_trusted(b), timeout=6, message="B to fall back")
        assert "falling back to --attr-timeout revalidation" in b.log_text()
        (a.path / "o.txt").write_bytes(b"during the outage")  # writes never wait for Kafka
        # Fallback: an open revalidates after --attr-timeout (1 s): no stale read past the timer.
        visible_within(lambda: read(b.path / "o.txt") == b"during the outage", "a change during the outage",
                       bound=1.0 + 0.5)
        # A status is a snapshot of a moving bus (a CI run once read 0 mid-commit, now counted): poll it.
        wait_until(lambda: status(a)["bus"]["outbox"] >= 1, timeout=5, message="A's event to wait in its outbox")
    wait_until(lambda: feed_trusted(b), timeout=KAFKA_BACK_TIMEOUT, message="B to trust the feed again")
    assert b.log_text().count("falling back to --attr-timeout revalidation") == 1
    wait_until(lambda: status(a)["bus"]["outbox"] == 0, timeout=KAFKA_BACK_TIMEOUT, message="A's outbox drains")


def _timed_ls(path: Path) -> float:
    start = time.monotonic()
    out = subprocess.run(["ls", "-l", str(path)], capture_output=True, text=True, check=True).stdout
    took = time.monotonic() - start
    assert out.count("\n") >= 2000
    return took


@pytest.mark.slow
def test_ls_l_of_a_directory_the_feed_described(s3_proxy: S3FaultProxy, mount_factory: Any,
                                                tmp_path: Path) -> None:
    """`ls -l` of 2,000 files written through another mount: a fresh mount that replayed the feed, the same
    without events (the behaviour before the feed), and s3fs (times printed). Neither hybridfs mount asks a HEAD
    per entry: the feed described them, and MinIO's listing carries their metadata (issue 23; before it, the
    mount without events sent 2,000 HEADs, and this test compared the two mounts' times)."""
    from hybridfs.bench.mounts import S3fsMount

    a = mount_factory()
    # 2,000 changes at once, right after another test restarted the shared broker: seen twice (CI and here) that
    # Kafka acknowledged nothing for the 10 s message time-out. Not what this test measures; the bus's outage
    # handling has its own tests (test_events_kafka.py).
    a.allow_log(r"kafka unreachable at .*: events wait in outbox \(\d+\) \[Local: Message timed out\]")
    (a.path / "many").mkdir()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: (a.path / "many" / f"f{i:04d}").write_bytes(b"x" * (i % 100)), range(2000)))
    proxied = ["--endpoint-url", s3_proxy.url, "--dir-cache-time", "2"]
    fed = mount_factory(extra_args=proxied)
    wait_until(lambda: feed_trusted(fed) and status(fed)["feed"]["applied"] >= 2001, timeout=60,
               message="the fresh mount to replay the feed")
    plain = mount_factory(extra_args=["--no-events", *proxied])
    s3fs = S3fsMount(tmp_path / "s3fs", a.prefix, tmp_path)
    if s3fs.available() is not None:
        pytest.fail(f"s3fs: {s3fs.available()}")
    s3fs.start()
    heads: dict[str, int] = {}
    try:
        times = {}
        for name, root in (("feed", fed.path), ("no feed", plain.path), ("s3fs", s3fs.mountpoint)):
            before = s3_proxy.seen("HEAD", path=rf"/{a.prefix}/many/.")
            first = _timed_ls(root / "many")
            time.sleep(2.5)  # measuring the listing after --dir-cache-time expired: a timer, not synchronisation
            again = _timed_ls(root / "many")
            times[name] = (first, again)
            heads[name] = s3_proxy.seen("HEAD", path=rf"/{a.prefix}/many/.") - before
    finally:
        s3fs.stop()
    print("\nls -l of 2,000 entries (first, after --dir-cache-time): " + ", ".join(
        f"{name} {f:.2f}s/{g:.2f}s" for name, (f, g) in times.items()))
    assert heads["feed"] == heads["no feed"] == 0, heads


def test_a_restarted_mount_knows_what_the_feed_told_it(mount_factory: Any) -> None:
    """The metadata index: B's attributes from the feed survive B's restart (SQLite in its state directory)."""
    a = mount_factory()
    b = mount_factory(extra_args=LONG_TIMERS)
    for m in (a, b):
        wait_until(lambda m=m: feed_trusted(m), timeout=30, message=f"{m.path}: feed caught up")
    (a.path / "known").mkdir()
    for i in range(5):
        (a.path / "known" / f"f{i}").write_bytes(b"x" * i)
        os.chmod(a.path / "known" / f"f{i}", 0o640)
    wait_until(lambda: status(b)["feed"]["applied"] >= 11, timeout=10, message="B to apply A's changes")
    b.unmount()  # its last batch of index rows is written on the way out
    with sqlite3.connect(b.state_dir / "feed-index.sqlite") as db:
        rows = dict(db.execute("SELECT key, attrs FROM attrs").fetchall())
    assert json.loads(rows[a.key("known/f3")])["mode"] == 0o100640
    again = mount_factory(cache_dir=b.cache_dir, extra_args=[*LONG_TIMERS, "--state-dir", str(b.state_dir)])
    assert status(again)["feed"]["index_loaded"] >= 6
    assert "metadata index: attributes of" in again.log_text()
    wait_until(lambda: feed_trusted(again), timeout=30, message="the restarted mount to catch up")
    modes = {e.name: e.stat(follow_symlinks=False).st_mode for e in os.scandir(again.path / "known")}
    assert modes == {f"f{i}": 0o100640 for i in range(5)}


def test_an_s3_answer_older_than_a_change_from_the_feed_is_not_kept(
    mount_factory: Any, s3: Any, s3_proxy: S3FaultProxy
) -> None:
    """B looks up a file (made with boto3); S3 answers its HEAD at once, but the answer is still on its way when
    A's overwrite of the file reaches B through the feed. The old answer is right for the lookup that asked before
    the change, and for nobody after: kept, it stood over the feed's news for --dir-cache-time, since a trusted
    feed makes B ask S3 no more (before: B showed the old size for the whole 120 s)."""
    a = mount_factory()
    b = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--attr-timeout", "0.2", "--dir-cache-time",
                                  "120", "--negative-cache-time", "120"])
    for m in (a, b):
        wait_until(lambda m=m: feed_trusted(m), timeout=30, message=f"{m.path}: feed caught up")
    s3.put_object(Bucket=a.bucket, Key=a.key("f"), Body=b"one")  # not through a mount: no record on the feed
    late = s3_proxy.add(Rule(method="HEAD", path=re.escape(b.key("f")) + "$", action="late", times=1))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(os.stat, b.path / "f")
        wait_until(lambda: late.held == 1, timeout=10, message="S3's answer to B's HEAD, held back")
        applied = status(b)["feed"]["applied"]
        (a.path / "f").write_bytes(b"two, from A")
        # Begun is enough: B's namespace has it at once; the kernel's invalidation of f then waits for the lookup
        # (the kernel holds the directory's lock for it), so "applied" comes only after the release below.
        wait_until(lambda: status(b)["feed"]["applied"] > applied or status(b)["feed"]["applying"] > 0,
                   timeout=10, message="A's change being applied on B")
        s3_proxy.remove(late)  # the old answer reaches B now
        assert first.result(timeout=30).st_size == 3  # asked before A's close: the old version is right for it
    wait_until(lambda: os.stat(b.path / "f").st_size == 11, timeout=5, message="A's overwrite on B")
    assert read(b.path / "f") == b"two, from A"
    assert status(b)["namespace"]["stale_answers"] >= 1
