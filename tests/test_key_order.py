"""A key never moves backwards (issue 22): the order of versions of one key, docs/semantics.md "Order of versions".

The core without a kernel over the real MinIO: feed records of one key applied late, duplicated, replayed, retried
out of order by an outbox, or stamped by a host whose clock is 30 s off, never put the mount's view of the key back
on an older version; S3 holds the truth the tests compare with. Then KeyOrder's rules alone.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from hybridfs.core.attrs import Defaults, Stat
from hybridfs.core.changes import ABSENT, NOTHING, Change, KeyOrder, Verdict, version_of
from hybridfs.core.filesystem import Filesystem, FsSettings
from hybridfs.core.namespace import Namespace
from hybridfs.core.paths import KeyMapper
from hybridfs.core.reader import ReadSettings
from hybridfs.core.writer import WriteSettings
from hybridfs.errors import FsError
from hybridfs.tiers.cache import LocalCache
from hybridfs.tiers.s3 import CloudStore, S3Settings

ROOT = 1


class NoHydration:
    def request_hydration(self, key: str, etag: str, size: int, reason: str) -> None:
        return None


def run_fs(stack: Any, prefix: str, tmp_path: Path, body: Callable[[Filesystem], Awaitable[None]]) -> None:
    async def main() -> None:
        store = CloudStore(S3Settings(bucket=stack.bucket, endpoint_url=stack.endpoint))
        cache = LocalCache(tmp_path / "cache", 1024**3)
        await cache.open()
        keys = KeyMapper(prefix)
        defaults = Defaults(uid=os.getuid(), gid=os.getgid())
        # Long timers: only what the records do (or a HEAD they cause) can change what the mount answers.
        ns = Namespace(store, keys, defaults, dir_cache_time=600, negative_cache_time=600)
        settings = FsSettings(defaults=defaults, write=WriteSettings(spool_dir=tmp_path / "spool"),
                              read=ReadSettings(chunk_size=1024 * 1024))
        async with trio.open_nursery() as nursery:
            await body(Filesystem(store, cache, keys, ns, settings, nursery, NoHydration()))
            nursery.cancel_scope.cancel()
        cache.close()

    trio.run(main)


class Feed:
    """Records of one key as the feed delivers them: each with its partition offset and its mount's count."""

    def __init__(self, fs: Filesystem, key: str) -> None:
        self.fs, self.key, self.offset = fs, key, 100

    async def deliver(self, origin: str, count: int, st: Stat | None, *, removed: bool = False,
                      offset: int | None = None, skew: float = 0.0) -> None:
        if offset is None:
            self.offset += 1
            offset = self.offset
        change = Change(self.key, None if removed else st, removed=removed, origin=origin,
                        time=time.time() + skew, position=(0, offset), seq=(f"run{origin}", count))
        await self.fs.apply_change(change)


async def version(fs: Filesystem, s3: Any, bucket: str, key: str, body: bytes) -> Stat:
    """Store ``body`` at ``key`` with boto3 (another writer) and return its attributes as a record carries them."""
    s3.put_object(Bucket=bucket, Key=key, Body=body)
    info = await fs.store.head(key)
    assert info is not None
    return fs.ns.parse(info)


async def etag_seen(fs: Filesystem, path: str) -> str | None:
    try:
        return (await fs.stat_of(path)).etag
    except FsError as exc:
        assert exc.errno == errno.ENOENT
        return None


def test_late_duplicated_replayed_and_retried_records_never_move_a_key_back(
        stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    async def body(fs: Filesystem) -> None:
        key = f"{prefix}/k"
        feed = Feed(fs, key)
        v1 = await version(fs, s3, stack.bucket, key, b"one")  # mount A's first version
        v2 = await version(fs, s3, stack.bucket, key, b"two, by B")  # mount B's, after it
        await feed.deliver("B", 1, v2)
        assert await etag_seen(fs, "k") == v2.etag

        # A's record of v1 arrives late (its outbox retried it): after B's newer one.
        await feed.deliver("A", 1, v1)
        assert await etag_seen(fs, "k") == v2.etag, "a late record of another mount put the key back"

        # B's next versions: news. Then B's record of v2 is produced again by its outbox, after v3's.
        v3 = await version(fs, s3, stack.bucket, key, b"three, by B")
        await feed.deliver("B", 2, v3)  # after A's record: asked of S3 (A's may be the newer)
        assert await etag_seen(fs, "k") == v3.etag
        v4 = await version(fs, s3, stack.bucket, key, b"four, by B")
        await feed.deliver("B", 3, v4)
        assert await etag_seen(fs, "k") == v4.etag
        heads = fs.order.counts["news"]
        await feed.deliver("B", 2, v3)  # an outbox retry of an older record of B, at a later offset
        await feed.deliver("B", 3, v4, offset=feed.offset - 1)  # a duplicate, at its own offset
        await feed.deliver("A", 1, v1, offset=feed.offset - 3)  # the topic read again from an earlier offset
        assert await etag_seen(fs, "k") == v4.etag, "a retried, duplicated or replayed record moved the key back"
        assert fs.order.counts["news"] == heads and fs.order.counts["stale"] == 3, fs.order.counts

        # B deletes the key: the tombstone is news. A's late record of v1 must not bring it back.
        s3.delete_object(Bucket=stack.bucket, Key=key)
        await feed.deliver("B", 4, None, removed=True)
        assert await etag_seen(fs, "k") is None
        await feed.deliver("A", 1, v1)
        assert await etag_seen(fs, "k") is None, "a late record resurrected a deleted key"

    run_fs(stack, prefix, tmp_path, body)


def test_a_newer_record_from_a_host_whose_clock_is_behind_is_not_dropped(
        stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    """This mount changed the key; then B, whose clock is 30 s behind, stored a newer version: its record says it
    was made 30 s before this mount's change (main compared the two clocks and dropped it)."""
    async def body(fs: Filesystem) -> None:
        key = f"{prefix}/k"
        fh, _node, _ = await fs.create(ROOT, b"k", 0o644, os.O_WRONLY, os.getuid(), os.getgid())
        await fs.write(fh, 0, b"written here")
        await fs.flush(fh)
        await fs.release(fh)
        ours = (await fs.stat_of("k")).etag
        newer = await version(fs, s3, stack.bucket, key, b"newer, by B")
        assert newer.etag != ours
        await Feed(fs, key).deliver("B", 1, newer, skew=-30.0)
        assert await etag_seen(fs, "k") == newer.etag, "a record from a host with a slow clock was dropped"

        # And one from a host 30 s ahead after it, of an older version: its clock makes it look newest.
        feed = Feed(fs, key)
        feed.offset = 200
        await feed.deliver("C", 1, newer.with_(etag="0" * 32, size=5), skew=+30.0)
        assert await etag_seen(fs, "k") == newer.etag, "a record from a host with a fast clock won"

    run_fs(stack, prefix, tmp_path, body)


# -- KeyOrder's rules alone (the examples of docs/semantics.md, "Order of versions") ------------------------------

def _st(etag: str, mode: int = 0o100644) -> Stat:
    return Stat(mode=mode, uid=0, gid=0, size=3, mtime_ns=0, etag=etag)


def _rec(origin: str, count: int, offset: int, st: Stat | None, removed: bool = False) -> Change:
    return Change("p/k", st, removed=removed, origin=origin, position=(0, offset), seq=(origin, count))


@pytest.mark.parametrize(("history", "expected"), [
    # A first record: nothing to order it against.
    ([], Verdict.ASK_S3),
    # The next change of the same mount, while the mount holds what its last record said: news.
    ([("A", 1, 1, "e1", True)], Verdict.NEWS),
    # After another mount's record: the two mounts' records are in no order S3 vouches for.
    ([("B", 1, 1, "e1", True)], Verdict.ASK_S3),
    # A HEAD told of another version since the last record: the record may be older than it.
    ([("A", 1, 1, "e1", False)], Verdict.ASK_S3),
])
def test_key_order_rules(history: list[tuple[str, int, int, str, bool]], expected: Verdict) -> None:
    order = KeyOrder()
    known: Any = NOTHING
    for origin, count, offset, etag, holds in history:
        order.judge(_rec(origin, count, offset, _st(etag)), NOTHING)
        known = version_of(_st(etag)) if holds else version_of(_st("other"))
    assert order.judge(_rec("A", 2, 5, _st("e2")), known) is expected


def test_key_order_duplicates_retries_and_tombstones() -> None:
    order = KeyOrder()
    assert order.judge(_rec("A", 1, 1, _st("e1")), NOTHING) is Verdict.ASK_S3
    assert order.judge(_rec("A", 2, 2, _st("e2")), version_of(_st("e1"))) is Verdict.NEWS
    assert order.judge(_rec("A", 2, 2, _st("e2")), version_of(_st("e2"))) is Verdict.STALE  # duplicate
    assert order.judge(_rec("A", 1, 3, _st("e1")), version_of(_st("e2"))) is Verdict.STALE  # outbox retry
    assert order.judge(_rec("A", 3, 4, None, removed=True), version_of(_st("e2"))) is Verdict.NEWS
    # The namespace's negative entry expired: nothing heard of the key since the tombstone.
    assert order.judge(_rec("A", 4, 5, _st("e4")), NOTHING) is Verdict.NEWS
    # Our own change: no other mount's record is news after it until S3 was asked.
    order.own(Change("p/k", _st("mine")))
    assert order.judge(_rec("A", 5, 6, _st("e5")), version_of(_st("mine"))) is Verdict.ASK_S3
    # A removal asked of S3 (not news) and nothing known since: the next record asks S3 too.
    order2 = KeyOrder()
    order2.judge(_rec("B", 1, 1, None, removed=True), NOTHING)
    assert order2.judge(_rec("B", 2, 2, _st("e")), NOTHING) is Verdict.ASK_S3
    assert order2.judge(_rec("B", 3, 3, _st("f")), ABSENT) is Verdict.ASK_S3


def test_a_record_of_another_host_with_the_same_origin_is_not_skipped_as_ours() -> None:
    """Origins are ``host:mountpoint``: two hosts of one name mounting at one path share it. The run in
    ``hybridfs.seq`` tells this mount's records from theirs (and from its own earlier run's)."""
    from hybridfs.services.feed import FeedPublisher, FeedService

    class Bus:
        def publish_record(self, *args: object) -> None:
            return None

    applied: list[Change] = []

    class Fs:
        order = KeyOrder()

        async def apply_change(self, change: Change) -> None:
            applied.append(change)

    publisher = FeedPublisher(Bus(), "t.changes", "host:/mnt")  # type: ignore[arg-type]
    feed = FeedService(Fs(), bootstrap="127.0.0.1:1", topic_prefix="t", group="g",  # type: ignore[arg-type]
                       origin="host:/mnt", dead_letter_topic="t.dead-letter", publisher=publisher)
    ours = Change("p/k", _st("e1"), origin="host:/mnt", seq=(publisher.run, 0))
    theirs = Change("p/k", _st("e2"), origin="host:/mnt", seq=("0123456789abcdef", 0))
    trio.run(feed.handle, ours)
    trio.run(feed.handle, theirs)
    assert applied == [theirs] and feed.own_skipped == 1
