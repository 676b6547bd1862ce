"""Poison records through real mounts (issue 22, "Every decoder is total"): one malformed record on a topic the
mount reads is set aside with its reason, and what comes after it is still applied.

Before: a deeply nested S3 event record ended foreign-write processing for the life of the mount (RecursionError
out of the parser, a restarted consumer that never read again), and a change record with ``"attrs": {"type": []}``
crash-looped the change feed on every mount of the prefix (TypeError, never dead-lettered, replayed by every new
mount from the compacted topic).
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, cast

from confluent_kafka import Consumer, Producer
from conftest import MountFactory
from helpers import Mount, Stack, run_hybridfs, wait_until
from test_feed import feed_trusted, read, status, visible_within
from test_foreign_writes import SLOW_TIMERS, feed_status, minio_record, read_or_none, seen_within, wait_feed_reading

from hybridfs.commands.status import render
from hybridfs.events.topics import create_topics

DEEP = b"[" * 100_000 + b"]" * 100_000  # the poison S3 event record of the issue


def _produce(bootstrap: str, topic: str, *records: tuple[bytes | None, bytes | None]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 2_000_000})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(10) == 0


def _s3_events_mount(mount_factory: MountFactory, stack: Stack, topic_prefix: str,
                     env: dict[str, str] | None = None) -> tuple[Mount, str]:
    topic = f"{topic_prefix}.s3-events"
    create_topics(stack.bootstrap, [topic], partitions=1)
    mount = mount_factory(extra_args=["--s3-events-topic", topic, *SLOW_TIMERS], env=env)
    wait_feed_reading(mount)
    return mount, topic


def test_a_deeply_nested_s3_event_record_is_skipped_and_later_records_apply(
    mount_factory: MountFactory, s3: Any, stack: Stack, topic_prefix: str
) -> None:
    mount, topic = _s3_events_mount(mount_factory, stack, topic_prefix)
    mount.allow_log(r"skipping an unreadable S3 event record at .*s3-events\[0\]@0: JSON nested too deeply")
    target = mount.path / "g"
    assert not target.exists()  # remembered as missing for a minute (SLOW_TIMERS)
    etag = s3.put_object(Bucket=stack.bucket, Key=mount.key("g"), Body=b"data")["ETag"].strip('"')

    _produce(stack.bootstrap, topic, (None, DEEP),
             (None, minio_record(stack.bucket, mount.key("g"), "s3:ObjectCreated:Put", etag, 4)))
    seen_within(lambda: read_or_none(target) == b"data", "the record after the poison one to apply")
    feed = feed_status(mount)
    assert (feed["received"], feed["bad_records"], feed["applied"]) == (2, 1, 1), feed
    assert mount.log_text().count("skipping an unreadable S3 event record") == 1
    wait_until(lambda: feed_status(mount)["healthy"], timeout=10, message="the S3 event feed healthy again")
    assert status(mount)["tasks"]["restarts"] == 0


def test_a_restarted_s3_event_consumer_reads_again_from_where_it_was(
    mount_factory: MountFactory, s3: Any, stack: Stack, topic_prefix: str
) -> None:
    """A consumer that fails (a stand-in for any bug: the failpoint fires on the first records handed over, three
    times, so the unhealthy window outlasts the polling whatever the restart delays' jitter) is
    restarted, takes its partitions back and reads on from its position; while it is down, the S3 event feed is
    not healthy and says why. Before: the restarted run kept the old run's set of assigned partitions, so it
    assigned nothing and never read again, while its health stayed true."""
    mount, topic = _s3_events_mount(mount_factory, stack, topic_prefix, env={"HYBRIDFS_FAILPOINTS": "s3-events:3"})
    mount.allow_log(r"S3 event records.* failed.*FailpointError: failpoint s3-events")
    mount.allow_log(r"FailpointError: failpoint s3-events")
    assert not (mount.path / "a").exists() and not (mount.path / "b").exists()  # remembered as missing (SLOW_TIMERS)
    etags = {name: s3.put_object(Bucket=stack.bucket, Key=mount.key(name), Body=name.encode())["ETag"].strip('"')
             for name in ("a", "b")}
    _produce(stack.bootstrap, topic, (None, minio_record(stack.bucket, mount.key("a"), "s3:ObjectCreated:Put",
                                                         etags["a"], 1)))
    seen: list[dict[str, Any]] = []

    def unhealthy() -> bool:  # keeps the status that showed it: the window between two runs is short
        seen.append(feed_status(mount))
        return not seen[-1]["healthy"]

    wait_until(unhealthy, timeout=10, interval=0.01, message="the S3 event feed unhealthy")
    assert "not consuming" in seen[-1]["reason"], seen[-1]
    assert render(status(mount) | {"s3_events": seen[-1]}).count("NOT TRUSTED (not consuming: ") == 1
    wait_until(lambda: read_or_none(mount.path / "a") == b"a", timeout=30,
               message="the record that failed, read again by the restarted consumer")
    _produce(stack.bootstrap, topic, (None, minio_record(stack.bucket, mount.key("b"), "s3:ObjectCreated:Put",
                                                         etags["b"], 1)))
    seen_within(lambda: read_or_none(mount.path / "b") == b"b", "a record after the restart")
    wait_until(lambda: feed_status(mount)["healthy"], timeout=10, message="the S3 event feed healthy again")
    assert f"s3 events  {topic}: caught up (caught up); " in run_hybridfs("status", str(mount.path)).stdout
    assert status(mount)["tasks"]["restarts"] == 3


def _poison_change(mount: Mount, name: str) -> tuple[bytes, bytes]:
    key = mount.key(name)
    return key.encode(), json.dumps({"version": 1, "key": key, "origin": "evil", "time": 1.0,
                                     "attrs": {"type": [], "mode": 0o100644}}).encode()


POISON_LOG = r"invalid event: unknown attrs.type \[\] from .*\.changes\[\d+\]@\d+: sent to the dead-letter topic"


def test_a_change_record_of_a_bad_shape_is_dead_lettered_and_the_feed_goes_on(
    mount_factory: MountFactory, stack: Stack
) -> None:
    a = mount_factory()
    b = mount_factory(extra_args=["--attr-timeout", "60", "--dir-cache-time", "60", "--negative-cache-time", "60"])
    for m in (a, b):
        m.allow_log(POISON_LOG)
        wait_until(functools.partial(feed_trusted, m), timeout=30, message=f"{m.path}: feed caught up")
    _produce(stack.bootstrap, f"{b.topic_prefix}.changes", _poison_change(b, "poison.txt"))
    wait_until(lambda: status(b)["feed"]["consumer"]["dead_lettered"] == 1, timeout=10,
               message="the poison record set aside on B")
    (a.path / "after.txt").write_bytes(b"still applied")
    visible_within(lambda: read(b.path / "after.txt") == b"still applied", "a change after the poison record")
    assert feed_trusted(b)
    assert status(b)["tasks"]["restarts"] == 0

    # The topic is compacted: a new mount on the prefix replays the poison record, sets it aside too, and
    # catches up.
    c = mount_factory()
    c.allow_log(POISON_LOG)
    wait_until(lambda: feed_trusted(c), timeout=30, message="a new mount's feed caught up past the poison record")
    assert read(c.path / "after.txt") == b"still applied"
    assert status(c)["feed"]["consumer"]["dead_lettered"] == 1 and status(c)["tasks"]["restarts"] == 0


def test_a_change_that_fails_to_apply_makes_the_feed_untrusted_until_it_is_applied(mount_factory: MountFactory) -> None:
    """A handler that fails (a stand-in for any bug: the failpoint) is retried, its partition waiting behind it:
    meanwhile the feed is not caught up, so the mount does not trust what it knows, and says why. Before: the
    feed stayed "trusted" through the retries (nothing was being applied, and the lag counted only records not
    yet received)."""
    a = mount_factory()
    b = mount_factory(extra_args=["--attr-timeout", "60", "--dir-cache-time", "60", "--negative-cache-time", "60"],
                      env={"HYBRIDFS_FAILPOINTS": "feed-apply:3"})  # 3 tries: the retries outlast the polling
    b.allow_log(r"handling change for .* failed; not committed.*FailpointError: failpoint feed-apply")
    for m in (a, b):
        wait_until(functools.partial(feed_trusted, m), timeout=30, message=f"{m.path}: feed caught up")
    seen: list[dict[str, Any]] = []

    def untrusted() -> bool:
        seen.append(status(b)["feed"])
        return seen[-1]["mode"] != "trusted"

    (a.path / "f.txt").write_bytes(b"applied on the second try")
    wait_until(untrusted, timeout=10, interval=0.01, message="B's feed untrusted while the change is retried")
    assert "a record is held up, retrying (applying change for " in seen[-1]["reason"], seen[-1]
    assert "FailpointError" in seen[-1]["reason"], seen[-1]
    wait_until(lambda: read(b.path / "f.txt") == b"applied on the second try", timeout=30,
               message="the change applied on B after the retry")
    wait_until(functools.partial(feed_trusted, b), timeout=10, message="B's feed trusted again")


def test_a_restarted_change_feed_resumes_and_is_untrusted_meanwhile(mount_factory: MountFactory) -> None:
    """The feed fails once it is caught up (a stand-in for any bug: the failpoint, three times): the supervisor
    starts it again, its consumer joins the group again and resumes at the committed offsets, and while no run
    consumes the mount falls back to revalidation and says why. Before: the health of the failed run stood
    ("trusted") until the next run's first check."""
    a = mount_factory()
    b = mount_factory(extra_args=["--attr-timeout", "60", "--dir-cache-time", "60", "--negative-cache-time", "60"],
                      env={"HYBRIDFS_FAILPOINTS": "feed-caught-up:3"})
    b.allow_log(r"FeedService.run failed .*FailpointError: failpoint feed-caught-up")
    (a.path / "before.txt").write_bytes(b"made while B's feed fails")
    seen: list[dict[str, Any]] = []

    def failed_run() -> bool:
        seen.append(status(b)["feed"])
        return "the change feed failed" in seen[-1]["reason"]

    wait_until(failed_run, timeout=30, interval=0.01, message="B's feed between two runs")
    assert seen[-1]["mode"] == "fallback" and "FailpointError" in seen[-1]["reason"], seen[-1]
    wait_until(lambda: status(b)["tasks"]["restarts"] == 3 and feed_trusted(b), timeout=60,
               message="B's feed restarted three times and caught up")
    assert read(b.path / "before.txt") == b"made while B's feed fails"
    (a.path / "after.txt").write_bytes(b"made after the restarts")
    visible_within(lambda: read(b.path / "after.txt") == b"made after the restarts", "a change after the restarts")


def test_a_change_record_too_big_to_copy_whole_is_dead_lettered_without_its_value(mount_factory: MountFactory,
                                                                                  stack: Stack) -> None:
    """A record as big as the broker takes (1 MB) cannot be copied whole to the dead-letter topic (the copy adds
    headers): it is set aside with its headers and reason and without its value, and the feed goes on. Before:
    the copy failed ("Message size too large") and was retried forever, so the feed never committed past it and
    applied nothing after it."""
    a = mount_factory()
    b = mount_factory(extra_args=["--attr-timeout", "60", "--dir-cache-time", "60", "--negative-cache-time", "60"])
    for m in (a, b):
        m.allow_log(r"invalid event: value is 1000000 bytes, over the limit of 65536 from .*\.changes\[\d+\]@\d+: "
                    r"sent to the dead-letter topic")
        m.allow_log(r"too large for the dead-letter topic .*: set aside without its value")
        wait_until(functools.partial(feed_trusted, m), timeout=30, message=f"{m.path}: feed caught up")
    _produce(stack.bootstrap, f"{b.topic_prefix}.changes", (b.key("big.txt").encode(), b"x" * 1_000_000))
    wait_until(lambda: status(b)["feed"]["consumer"]["dead_lettered"] == 1, timeout=20,
               message="the big record set aside on B")
    (a.path / "after.txt").write_bytes(b"still applied")
    visible_within(lambda: read(b.path / "after.txt") == b"still applied", "a change after the big record")
    copies = _dead_letters(stack.bootstrap, f"{b.topic_prefix}.dead-letter", count=2)  # one from each mount
    for headers, key, value in copies:
        assert key == b.key("big.txt").encode() and value is None, (key, value)
        assert headers["hybridfs.dlq.dropped"] == b"value of 1000000 bytes, key of %d bytes, headers" % len(key)
        assert headers["hybridfs.dlq.reason"].startswith(b"invalid event: value is 1000000 bytes"), headers


def _dead_letters(bootstrap: str, topic: str, count: int) -> list[tuple[dict[str, bytes], bytes | None, bytes | None]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-dead-letters", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    found: list[tuple[dict[str, bytes], bytes | None, bytes | None]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 20
        while len(found) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                headers = cast(list[tuple[str, bytes]], msg.headers() or [])
                found.append((dict(headers), msg.key(), msg.value()))
    finally:
        consumer.close()
    assert len(found) == count, found
    return found
