"""S3 event records from Kafka: how changes made by other tools (boto3, aws s3, rclone) reach the mounts.

MinIO and Ceph RGW publish bucket notifications to Kafka natively; AWS S3 does it through EventBridge (a rule
whose target forwards to Kafka). ``--s3-events-topic`` names that topic; every mount reads all of it (a broadcast:
no consumer group, no commits) from shortly before the mount started, and hands each created/removed record
that concerns its bucket to a handler, which invalidates the key (its attributes are then fetched lazily).

Accepted shapes of one Kafka message value (JSON):

* MinIO: ``{"EventName": "s3:ObjectCreated:Put", "Key": "bucket/key", "Records": [RECORD, ...]}``
* S3 notification / Ceph RGW: ``{"Records": [RECORD, ...]}`` where RECORD is
  ``{"eventName": "s3:ObjectCreated:Put" | "ObjectCreated:Put" (Ceph), "s3": {"bucket": {"name": ...},
  "object": {"key": URL-ENCODED, "eTag": ..., "size": ..., "sequencer": ...}}, "source": {"userAgent": ...}}``
* EventBridge: ``{"source": "aws.s3", "detail-type": "Object Created" | "Object Deleted", "detail":
  {"bucket": {"name": ...}, "object": {"key": ..., "etag": ..., "size": ...}}}``

Error boundary (as in :mod:`hybridfs.events.consumer`): a record that cannot be read, of any size, shape or
nesting, is logged once (WARNING, why and where), counted (``bad_records``) and skipped — the topic is not ours,
so there is no dead-letter copy; a handler that raises is a bug, logged with its traceback, and the record is
skipped (the metadata timers still bound how long the change stays unseen). Nothing here ends the mount. Kafka
unreachable: one WARNING, one INFO when it is back. A run that fails anyway (a bug) is started again by the
supervisor: it assigns its partitions again and reads on after the last message handled; meanwhile the feed
is not healthy (``stats().running``), so the namespace is not trusted.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from hybridfs.events.consumer import run_consumer_thread
from hybridfs.events.topics import RdKafkaLogger, client_config, is_unreachable_error
from hybridfs.tasks import describe, failpoint

__all__ = ["BadRecord", "S3Change", "S3EventFeed", "S3FeedStats", "parse_s3_events"]

log = logging.getLogger("hybridfs.events.s3")

START_MARGIN = 5.0  # seconds before the mount's start from which records are read (clock skew, start-up)
_PARTITION_CHECK = 10.0  # seconds between looks for partitions added to the topic
_LAG_INTERVAL = 1.0
_BATCH = 500  # messages per hand-over to trio
# A notification is a few KiB (one record; S3 batches at most a few). Far more is garbage, not worth parsing.
MAX_RECORD_BYTES = 1024 * 1024


class BadRecord(ValueError):
    """A message that is not an S3 event record we can read; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class S3Change:
    """One created/removed object, as a notification tells it."""

    removed: bool
    bucket: str
    key: str  # decoded
    etag: str | None = None
    size: int | None = None
    sequencer: str | None = None
    event_name: str = ""
    user_agent: str = ""  # who made the request (MinIO's and Ceph's ``source.userAgent``)


def parse_s3_events(value: bytes | None) -> list[S3Change]:
    """The created/removed changes in one message value; other events (tagging, ACLs, restores) give nothing.

    Total: raises :class:`BadRecord` (never anything else) when the value is not one of the accepted shapes,
    whatever its size, nesting or types.
    """
    if not value:
        raise BadRecord("empty message")
    if len(value) > MAX_RECORD_BYTES:
        raise BadRecord(f"{len(value)} bytes, over the limit of {MAX_RECORD_BYTES}")
    try:
        doc = json.loads(value)
    except RecursionError:  # json's C scanner nests on the C stack: bounded by the recursion limit
        raise BadRecord("JSON nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError, and integers of more than 4300 digits, are ValueErrors
        raise BadRecord(f"not JSON ({exc})"[:300]) from None
    if not isinstance(doc, dict):
        raise BadRecord(f"a JSON {type(doc).__name__}, not an object")
    if "Records" in doc:
        records = doc["Records"]
        if not isinstance(records, list):
            raise BadRecord("'Records' is not a list")
        return [change for record in records if (change := _from_record(record)) is not None]
    if doc.get("source") == "aws.s3" and isinstance(doc.get("detail"), dict):
        change = _from_eventbridge(doc)
        return [] if change is None else [change]
    if doc.get("Event") == "s3:TestEvent" or doc.get("EventName") == "s3:TestEvent":
        return []
    raise BadRecord("neither 'Records' nor an EventBridge 'aws.s3' event")


def _kind(event_name: str) -> bool | None:
    """True for a removal, False for a creation, None for anything else."""
    name = event_name.removeprefix("s3:")
    if name.startswith("ObjectCreated:"):
        return False
    if name.startswith("ObjectRemoved:"):
        return True
    return None


def _from_record(record: object) -> S3Change | None:
    if not isinstance(record, dict):
        raise BadRecord("a record is not an object")
    event_name = record.get("eventName")
    if not isinstance(event_name, str):
        raise BadRecord("a record has no 'eventName'")
    removed = _kind(event_name)
    if removed is None:
        return None
    s3 = _table(record, "s3")
    bucket = _text(_table(s3, "bucket"), "name", "s3.bucket.name")
    obj = _table(s3, "object")
    key = _object_key(obj, "s3.object.key")
    source = record.get("source")
    agent = source.get("userAgent") if isinstance(source, dict) else None
    return S3Change(removed=removed, bucket=bucket, key=key, etag=_etag(obj.get("eTag")), size=_size(obj.get("size")),
                    sequencer=_optional_text(obj.get("sequencer")), event_name=event_name,
                    user_agent=agent if isinstance(agent, str) else "")


def _from_eventbridge(doc: dict[str, Any]) -> S3Change | None:
    kind = doc.get("detail-type")
    if kind not in ("Object Created", "Object Deleted"):
        return None
    detail = doc["detail"]
    bucket = _text(_table(detail, "bucket"), "name", "detail.bucket.name")
    obj = _table(detail, "object")
    key = _object_key(obj, "detail.object.key")
    reason = _optional_text(detail.get("reason")) or ""  # never formatted unless text: repr of any shape may fail
    return S3Change(removed=kind == "Object Deleted", bucket=bucket, key=key, etag=_etag(obj.get("etag")),
                    size=_size(obj.get("size")), sequencer=_optional_text(obj.get("sequencer")),
                    event_name=f"EventBridge:{kind}:{reason}")


def _table(parent: dict[str, Any], name: str) -> dict[str, Any]:
    table = parent.get(name)
    if not isinstance(table, dict):
        raise BadRecord(f"a record has no '{name}' object")
    return table


def _text(parent: dict[str, Any], name: str, where: str) -> str:
    text = parent.get(name)
    if not isinstance(text, str) or not text:
        raise BadRecord(f"a record has no '{where}'")
    return text


def _object_key(obj: dict[str, Any], where: str) -> str:
    # S3 (and MinIO, Ceph, EventBridge) URL-encode the key in records, spaces as '+'.
    key = urllib.parse.unquote_plus(_text(obj, "key", where))
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\udXXX" escape: no S3 key is that
        raise BadRecord(f"'{where}' is not valid UTF-8") from None
    return key


def _optional_text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _etag(value: object) -> str | None:
    return value.strip('"') if isinstance(value, str) and value else None


def _size(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class S3FeedStats:
    topic: str
    received: int  # messages read
    changes: int  # created/removed changes of this bucket handed to the handler
    bad_records: int  # messages skipped as unreadable
    handler_failures: int
    lag: int | None  # messages on the broker not yet read
    last_poll_age: float | None  # seconds since the consumer thread last polled
    reachable: bool | None
    running: bool = False  # a consumer thread of this feed is reading now
    assigned: int = 0  # partitions it reads
    stopped: str | None = None  # why it does not run: the last run's failure, or "not started"


ChangeHandler = Callable[[S3Change], Awaitable[None]]


class S3EventFeed:
    """Reads the S3 event records of one topic; ``await nursery.start(feed.run)``.

    Only records of ``bucket`` reach ``handler``, one at a time, in the order of each partition (MinIO keys
    its messages by object, so one object's records stay in order).
    """

    def __init__(self, bootstrap: str, topic: str, bucket: str, handler: ChangeHandler, *,
                 kafka_config: Mapping[str, Any] | None = None, client_id: str = "hybridfs-s3-events",
                 start_time: float | None = None, poll_timeout: float = 0.05, close_timeout: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.bucket = bucket
        self.handler = handler
        self.kafka_config = dict(kafka_config or {})
        self.client_id = client_id
        self.start_time = time.time() if start_time is None else start_time
        self.poll_timeout = poll_timeout
        self.close_timeout = close_timeout
        self._stop = threading.Event()  # of the current run; each run has its own
        self._token: trio.lowlevel.TrioToken | None = None
        self._assigned: set[int] = set()  # partitions of the current run's consumer (thread-owned)
        self._assigned_at: dict[int, int] = {}  # partition -> the offset it was first assigned at (thread-owned)
        # partition -> the offset after the last message handled (trio-owned): where a restarted run resumes.
        self._positions: dict[int, int] = {}
        self._running = False
        self._stopped: str | None = "not started"
        self._received = 0
        self._changes = 0
        self._bad = 0
        self._handler_failures = 0
        self._lag: int | None = None
        self._last_poll: float | None = None
        self._reachable: bool | None = None
        self._missing_said = False

    def stats(self) -> S3FeedStats:
        age = None if self._last_poll is None else round(time.monotonic() - self._last_poll, 3)
        return S3FeedStats(topic=self.topic, received=self._received, changes=self._changes, bad_records=self._bad,
                           handler_failures=self._handler_failures, lag=self._lag, last_poll_age=age,
                           reachable=self._reachable, running=self._running, assigned=len(self._assigned),
                           stopped=self._stopped)

    # -- trio side

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read until cancelled. Run again after a failure (the supervisor does), it takes its partitions back
        and reads on from the position of each: after the last message handled, so a record that was handed
        over when the run failed is read again, and one handled is not."""
        self._token = trio.lowlevel.current_trio_token()
        consumer = self._new_consumer()  # bad settings fail here, before started()
        # A stop event of this run's own: a thread of an earlier run, abandoned while stuck in librdkafka,
        # keeps the one that told it to stop.
        stop = self._stop = threading.Event()
        self._lag = None  # measured anew by this run's consumer
        self._running, self._stopped = True, None
        task_status.started()
        try:
            await run_consumer_thread(functools.partial(self._thread_main, consumer, stop), self._token, stop,
                                      self.close_timeout)
        except Exception as exc:
            self._stopped = f"the consumer failed ({describe(exc)})"[:300]
            raise
        finally:
            self._running = False
            self._stopped = self._stopped or "stopped"

    def _new_consumer(self) -> Consumer:
        conf = client_config(
            self.bootstrap, self.kafka_config, client_id=self.client_id, logger=RdKafkaLogger(),
            defaults={"error_cb": self._on_error, "fetch.wait.max.ms": 100},
            # assign(), never subscribe(): every mount reads every partition. The group id is only a name
            # librdkafka insists on; nothing is ever committed to it.
            forced={"group.id": self.client_id, "enable.auto.commit": False, "enable.auto.offset.store": False},
        )
        return Consumer(conf)

    async def _deliver(self, messages: list[Message]) -> None:
        failpoint("s3-events")
        for msg in messages:
            await self._handle(msg)
            # Handled (or skipped): a restarted run starts after it, so no record is logged or applied twice.
            self._positions[msg.partition() or 0] = (msg.offset() or 0) + 1

    async def _handle(self, msg: Message) -> None:
        """Apply one message; never raises for its content (the S3 event topic is not ours: no dead-letter
        copy, so a record that cannot be read is logged once, counted and skipped)."""
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        try:
            changes = parse_s3_events(msg.value())
        except BadRecord as exc:
            self._bad += 1
            log.warning("skipping an unreadable S3 event record at %s: %s", where, exc.reason)
            return
        except Exception:  # a bug in the parser: skip the record, never stop reading for it
            self._bad += 1
            log.exception("skipping an S3 event record at %s that the parser failed on", where)
            return
        for change in changes:
            if change.bucket != self.bucket:
                continue
            self._changes += 1
            try:
                await self.handler(change)
            except Exception:
                self._handler_failures += 1
                log.exception("applying %s of %r (%s) failed; skipped", change.event_name, change.key, where)

    # -- the consumer thread

    def _thread_main(self, consumer: Consumer, stop: threading.Event) -> None:
        next_partition_check = 0.0
        next_lag = 0.0
        self._assigned = set()  # a new consumer has nothing assigned: every partition is assigned again
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_partition_check:
                    next_partition_check = now + (_PARTITION_CHECK if self._assigned else 1.0)
                    self._assign_new_partitions(consumer)
                if now >= next_lag:
                    next_lag = now + _LAG_INTERVAL
                    self._update_lag(consumer)
                if not self._assigned:
                    self._last_poll = time.monotonic()
                    consumer.poll(self.poll_timeout)  # serves callbacks (errors, logs) while waiting
                    continue
                messages = consumer.consume(_BATCH, self.poll_timeout)
                self._last_poll = time.monotonic()
                good = []
                for msg in messages:
                    err = msg.error()
                    if err is None:
                        good.append(msg)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        self._on_consume_error(err)
                if not good:
                    continue
                self._mark_reachable()
                self._received += len(good)
                try:
                    trio.from_thread.run(self._deliver, good, trio_token=self._token)
                except (trio.RunFinishedError, trio.Cancelled):
                    return
        finally:
            try:
                consumer.close()
            except Exception as exc:
                log.debug("closing the S3 event consumer: %s", exc)

    def _assign_new_partitions(self, consumer: Consumer) -> None:
        try:
            meta = consumer.list_topics(self.topic, timeout=5.0)
        except Exception as exc:
            log.debug("S3 events: no metadata for %s: %s", self.topic, exc)
            return
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            if not self._missing_said:
                self._missing_said = True
                log.info("S3 event topic %s does not exist yet; waiting for it", self.topic)
            return
        self._mark_reachable()
        new = sorted(set(topic.partitions) - self._assigned)
        if not new:
            return
        first = not self._assigned_at  # this feed's first assignment ever (not a restarted run's)
        start_ms = int((self.start_time - START_MARGIN) * 1000)
        # Partitions known at start: from just before the mount started (what happened before, the mount
        # learns from S3). Partitions added later: from their beginning. A restarted run: where each was.
        resumed = [TopicPartition(self.topic, p, self._resume_offset(p)) for p in new]
        wanted = [TopicPartition(self.topic, tp.partition, start_ms if first else OFFSET_BEGINNING)
                  for tp in resumed if tp.offset < 0]
        if first and wanted:
            try:
                wanted = [self._at_end_if_none(consumer, tp) for tp in consumer.offsets_for_times(wanted, timeout=5.0)]
            except Exception as exc:
                log.debug("S3 events: offsets_for_times failed (%s); retrying", exc)
                return
        wanted += [tp for tp in resumed if tp.offset >= 0]
        consumer.incremental_assign(wanted)
        self._assigned.update(new)
        for tp in wanted:
            self._assigned_at.setdefault(tp.partition, tp.offset)
        log.info("reading S3 event records from %s (partitions %s)", self.topic,
                 ", ".join(f"{tp.partition}@{tp.offset}" for tp in wanted))

    def _resume_offset(self, partition: int) -> int:
        """Where a restarted run reads ``partition`` from (-1: nowhere yet, the partition is new to this feed):
        after the last message handled, else where the first run was assigned it (nothing read since)."""
        handled = self._positions.get(partition)
        if handled is not None:
            return handled
        return self._assigned_at.get(partition, -1)

    def _at_end_if_none(self, consumer: Consumer, tp: TopicPartition) -> TopicPartition:
        """No record since the start time comes back as -1 (the end): assign the end's own offset instead, so
        the lag has a start before the first record is read. Read as the log's start, -1 made the whole topic
        count as lag on a mount of a quiet bucket, which then never trusted its metadata (1.6 million records
        on this machine's topic: every `ls -l` a HEAD and a LIST per entry)."""
        if tp.offset >= 0:
            return tp
        _, high = consumer.get_watermark_offsets(TopicPartition(self.topic, tp.partition), timeout=5.0)
        return TopicPartition(self.topic, tp.partition, max(0, high))

    def _update_lag(self, consumer: Consumer) -> None:
        if not self._assigned:
            return
        try:
            total = 0
            for tp in consumer.position([TopicPartition(self.topic, p) for p in self._assigned]):
                low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    continue
                if tp.offset >= 0:
                    position = tp.offset
                else:  # nothing read yet: where it was assigned (OFFSET_BEGINNING for a partition added later)
                    start = self._resume_offset(tp.partition)
                    position = start if start >= 0 else low
                total += max(0, high - position)
            self._lag = total
        except Exception as exc:
            log.debug("S3 events: lag unknown: %s", exc)

    def _on_consume_error(self, err: KafkaError) -> None:
        if is_unreachable_error(err):
            self._mark_unreachable(err)
        else:
            log.debug("S3 events: consumer error: %s", err.str())

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("S3 events: kafka consumer fatal error: %s", err.str())
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._mark_unreachable(err)
        else:
            log.debug("S3 events: kafka: %s", err.str())

    def _mark_unreachable(self, err: KafkaError) -> None:
        if self._reachable is False:
            return
        self._reachable = False
        log.warning("kafka unreachable at %s: changes made with other tools are seen only when the metadata "
                    "timers run out until it is back [%s]", self.bootstrap, err.str())

    def _mark_reachable(self) -> None:
        if self._reachable is False:
            log.info("kafka reachable again at %s: reading S3 event records from %s", self.bootstrap, self.topic)
        self._reachable = True
