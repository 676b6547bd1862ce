"""The change feed: every mount publishes its changes to ``<topic-prefix>.changes`` and applies the others'.

::

    Filesystem._publish(change) --FeedPublisher--> bus.publish_record --outbox--> <prefix>.changes (compacted)
    <prefix>.changes --EventConsumer(group hybridfs-changes-<cache id>)--> FeedService.handle
        -> own origin: skipped (its position noted);  else Filesystem.apply_change (namespace, kernel, cache tier):
           news, "ask S3", or a duplicate (hybridfs.core.changes.KeyOrder)

Publishing goes through the durable outbox, after S3 acknowledged the change: a Kafka outage delays the feed,
never a write. Each mount consumes the whole topic in its own group, from the beginning the first time (a
compacted topic is the latest record of every key), so a new mount learns the namespace's metadata as it goes.

Health (docs/semantics.md, "Trust while the feed is healthy"): the feed is *healthy* while all of these hold:

* the consumer reaches Kafka, and measured its lag against the broker's high watermarks (a round trip, once a
  second) no more than ``MAX_LAG_AGE`` (3 s) ago — so a Kafka outage is noticed within 3 s;
* that lag (records on the broker not yet applied here) is at most ``MAX_LAG`` (100);
* no change has been in the middle of being applied for more than ``MAX_APPLY_SECONDS`` (2 s): not stuck.

While healthy the namespace is *trusted* (``Namespace.trusted``): opens do not revalidate with a HEAD after
--attr-timeout, and listings complete their entries from what the mount knows. When not, the mount falls back
to the timers and HEAD revalidation; each switch is one INFO line and shows in ``hybridfs status`` (``feed``).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from hybridfs.core.changes import Change, Verdict
from hybridfs.events.bus import EventBus
from hybridfs.events.consumer import EventConsumer
from hybridfs.events.schema import InvalidEvent
from hybridfs.events.topics import TopicCreator
from hybridfs.services.feed_index import FeedIndex
from hybridfs.services.feed_schema import (
    TOPIC_CONFIG,
    attrs_json,
    changes_topic,
    decode_change,
    encode_change,
    stat_from_attrs_json,
)
from hybridfs.tasks import describe, failpoint

if TYPE_CHECKING:
    from hybridfs.core.filesystem import Filesystem

__all__ = ["MAX_APPLY_SECONDS", "MAX_LAG", "MAX_LAG_AGE", "FeedPublisher", "FeedService"]

log = logging.getLogger("hybridfs.services.feed")

MAX_LAG = 100  # records not yet applied
MAX_LAG_AGE = 3.0  # seconds since the lag was last measured against the broker
MAX_APPLY_SECONDS = 2.0  # one change being applied for longer: the consumer is stuck
LAG_INTERVAL = 1.0
CHECK_INTERVAL = 0.25
MAX_BUFFERED = 20_000  # records received and not applied yet (a few hundred bytes each)


class FeedPublisher:
    """:class:`hybridfs.core.changes.ChangeSink` over the event bus."""

    def __init__(self, bus: EventBus, topic: str, origin: str) -> None:
        self.bus = bus
        self.topic = topic
        self.origin = origin
        self.published = 0
        # New at each start: a count that starts again at 0 must not look older than the last run's records.
        self.run = uuid.uuid4().hex[:16]

    def publish_change(self, change: Change) -> None:
        """Called in the order S3 acknowledged the changes: the count orders this mount's records of a key
        whatever order the outbox delivers them in (a failed delivery is produced again later)."""
        key, value, headers = encode_change(change, self.origin, (self.run, self.published))
        self.bus.publish_record(self.topic, key, value, headers)
        self.published += 1


def decode_record(msg: Message, allowed_prefix: str) -> Change:
    """The consumer's decoder. Keys are checked to be clean, not to be under this mount's prefix: mounts of
    other prefixes may share the topic, and their records are not garbage (apply_change ignores them)."""
    kind, millis = msg.timestamp()
    when = millis / 1000 if kind != TIMESTAMP_NOT_AVAILABLE and millis > 0 else time.time()
    partition, offset = msg.partition(), msg.offset()
    position = (partition, offset) if partition is not None and offset is not None and offset >= 0 else None
    return decode_change(msg.key(), msg.value(), msg.headers(), allowed_prefix="", timestamp=when,
                         position=position)


class FeedService:
    def __init__(self, fs: Filesystem, *, bootstrap: str, topic_prefix: str, group: str, origin: str,
                 dead_letter_topic: str, kafka_config: dict[str, Any] | None = None,
                 publisher: FeedPublisher | None = None, index_path: Path | None = None) -> None:
        self.fs = fs
        self.origin = origin
        self.topic = changes_topic(topic_prefix)
        self.publisher = publisher
        self.creator = TopicCreator(bootstrap, [self.topic], kafka_config, configs={self.topic: TOPIC_CONFIG},
                                    unreachable_level=logging.INFO)
        self.consumer = EventConsumer(bootstrap, self.topic, group, self.handle, allowed_prefix="",
                                      dead_letter_topic=dead_letter_topic, kafka_config=kafka_config,
                                      instance_id=group, name="feed", decoder=decode_record,
                                      # Applying a change takes microseconds: no back-pressure (pausing
                                      # the partitions drops librdkafka's prefetched records: a round trip
                                      # per pause), and one at a time keeps every key's order.
                                      concurrency=1, max_buffered=MAX_BUFFERED, commit_interval=0.5,
                                      lag_interval=LAG_INTERVAL, fresh_lag=True)
        self.healthy = False
        self.reason = "starting"
        self.since = time.monotonic()
        self.applied = 0
        self.own_skipped = 0
        self._applying: dict[int, float] = {}  # id of a change being applied -> monotonic start
        self._delays: deque[float] = deque(maxlen=1000)  # seconds from a change being made to applied here
        self.index_path = index_path
        self.index: FeedIndex | None = None
        self.index_loaded = 0
        self._index_due: dict[str, str | None] = {}  # key -> attrs JSON (None: delete the row), not written yet
        self._index_limiter = trio.CapacityLimiter(1)

    def trusted(self) -> bool:
        # Between two checks, a consumer that stopped, or a change that failed, ends trust at once.
        return self.healthy and self.consumer.consuming()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled; run again after a failure (the supervisor does), the consumer resumes at its group's
        committed offsets. Between runs nothing applies the feed: the namespace is not trusted then."""
        if self.index is None:
            await self._load_index()
        failure = None
        try:
            async with trio.open_nursery() as nursery:
                if self.index is not None:
                    nursery.start_soon(self._write_index)
                await nursery.start(self.creator.run)
                await nursery.start(self.consumer.run)
                nursery.start_soon(self._watch)
                task_status.started()
        except Exception as exc:
            failure = f"the change feed failed ({describe(exc)})"[:300]
            raise
        finally:
            self._set_health(f"not consuming: {failure or self.consumer.stats().stopped or 'stopped'}")

    async def handle(self, change: Change) -> None:
        if self._own(change):
            self.own_skipped += 1  # applied here when it was made
            self.fs.order.own_record(change, self.origin)  # its position orders replays of older records
            self._index(change)
            return
        token = id(change)
        self._applying[token] = time.monotonic()
        try:
            failpoint("feed-apply")
            verdict = await self.fs.apply_change(change)
        finally:
            del self._applying[token]
        if verdict is not Verdict.STALE:  # a duplicate or a replay must not put an older row back in the index
            self._index(change)
        self.applied += 1
        delay = max(0.0, time.time() - change.time) if change.time > 0 else 0.0
        self._delays.append(delay)
        log.debug("applied the change of %s from %s, made %.0f ms ago", change.key, change.origin, delay * 1000)

    def _index(self, change: Change) -> None:
        if self.index is not None:
            self._index_due[change.key] = attrs_json(change)

    def _own(self, change: Change) -> bool:
        """Made by this run of this mount. The origin (host name and mount point) alone is not enough: two hosts
        of one name mounting at one path would skip each other's records, and a restarted mount would skip the
        changes its earlier run made, which it no longer knows."""
        if change.origin != self.origin:
            return False
        return change.seq is None or self.publisher is None or change.seq[0] == self.publisher.run

    # -- the metadata index --------------------------------------------------------------------------------------

    async def _load_index(self) -> None:
        """What the feed told earlier runs becomes what the namespace knows (never over something it knows)."""
        if self.index_path is None:
            return
        try:
            self.index = await trio.to_thread.run_sync(FeedIndex, self.index_path, limiter=self._index_limiter)
            rows = await trio.to_thread.run_sync(self.index.rows, limiter=self._index_limiter)
        except Exception as exc:  # sqlite3.Error, OSError: a cache of the feed, never worth failing the mount
            log.info("metadata index %s unusable (%s); going without it", self.index_path, exc)
            self.index = None
            return
        known = self.fs.ns.last_known
        for key, attrs in rows:
            path = self.fs.keys.path(key)
            if not path or path in known:
                continue
            try:
                known[path] = stat_from_attrs_json(attrs, key)
            except InvalidEvent as exc:
                log.debug("metadata index row of %s skipped: %s", key, exc.reason)
                continue
            self.index_loaded += 1
        if self.index_loaded:
            log.info("metadata index: attributes of %d keys known from earlier runs", self.index_loaded)

    async def _write_index(self) -> None:
        index = self.index
        assert index is not None
        try:
            while True:
                await trio.sleep(1.0)
                await self._flush_index(index)
        finally:
            with trio.CancelScope(shield=True):
                await self._flush_index(index)
                await trio.to_thread.run_sync(index.close, limiter=self._index_limiter)
                self.index = None  # a restarted run opens it again

    async def _flush_index(self, index: FeedIndex) -> None:
        if not self._index_due:
            return
        batch, self._index_due = list(self._index_due.items()), {}
        try:
            await trio.to_thread.run_sync(index.write, batch, limiter=self._index_limiter)
        except Exception as exc:  # the next restart asks S3 for these: no harm beyond the time
            log.info("metadata index %s: %d rows not written: %s", self.index_path, len(batch), exc)

    # -- health ------------------------------------------------------------------------------------------------

    def _unhealthy_reason(self) -> str | None:
        stats = self.consumer.stats()
        if not stats.running:
            return f"not consuming: {stats.stopped or 'stopped'}"
        if stats.reachable is False:
            return "kafka unreachable"
        if stats.lag_age is None:
            return "not caught up yet (lag not measured)"
        if stats.lag_age > MAX_LAG_AGE:
            return f"no answer from kafka for {stats.lag_age:.1f}s"
        if stats.lag is not None and stats.lag > MAX_LAG:
            return f"lag {stats.lag} > {MAX_LAG} records"
        if stats.failing:
            return f"not consuming: a record is held up, retrying ({stats.last_failure})"
        oldest = min(self._applying.values(), default=None)
        if oldest is not None and time.monotonic() - oldest > MAX_APPLY_SECONDS:
            return f"a change has been applying for {time.monotonic() - oldest:.1f}s"
        return None

    async def _watch(self) -> None:
        while True:
            self.check()
            if self.healthy:
                failpoint("feed-caught-up")  # tests: a bug that ends a running feed (its restart)
            await trio.sleep(CHECK_INTERVAL)

    def check(self) -> None:
        self._set_health(self._unhealthy_reason())

    def _set_health(self, reason: str | None) -> None:
        healthy = reason is None
        if healthy != self.healthy:
            self.since = time.monotonic()
            if healthy:
                log.info("change feed %s is caught up: trusting local metadata (no revalidation with S3 until "
                         "a change arrives or --dir-cache-time passes)", self.topic)
            else:
                log.info("change feed %s unhealthy (%s): falling back to --attr-timeout revalidation and "
                         "--dir-cache-time", self.topic, reason)
        self.healthy = healthy
        self.reason = reason or "caught up"

    def status(self) -> dict[str, Any]:
        if self.healthy and not self.consumer.consuming():
            self.check()  # what trusted() already says: the status says it too, with the reason
        delays = sorted(self._delays)
        return {
            "topic": self.topic,
            "mode": "trusted" if self.healthy else "fallback",
            "reason": self.reason,
            "for_seconds": round(time.monotonic() - self.since, 1),
            "applied": self.applied,
            "applying": len(self._applying),  # begun, not done (waiting for the kernel, or for S3)
            "index_loaded": self.index_loaded,
            "own_skipped": self.own_skipped,
            "order": dict(self.fs.order.counts),  # news / ask-s3 / stale (docs/semantics.md, "Order of versions")
            "published": self.publisher.published if self.publisher is not None else 0,
            "delay_p50_ms": round(statistics.median(delays) * 1000, 1) if delays else None,
            "consumer": dataclasses.asdict(self.consumer.stats()),
        }
