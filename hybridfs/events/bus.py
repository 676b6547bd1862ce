"""The event bus: how the mount publishes hydrate/evict events without ever waiting for Kafka.

Path of one event::

    publish(event)         FUSE handler, trio thread: append to an in-memory queue, wake the relay; O(1)
      -> relay task        batches the queue into the SQLite outbox (one transaction, in a thread): ~ms
      -> producer.produce  idempotent producer (acks=all); the outbox row id rides in the delivery callback
      -> poll task         serves delivery reports (in a thread); delivered rows are deleted from the outbox
    every retry_interval:  rows still in the outbox and not in flight are produced again

So an event is lost only if the process dies in the few milliseconds between ``publish()`` and the outbox
commit. Rows leave the outbox only on a successful delivery report; a message librdkafka gives up on (it
times out after ``message_timeout`` while Kafka is down) comes back as an error and is produced again later.
Delivery is therefore at least once; consumers are idempotent. librdkafka's own queue is bounded and the rows
in flight are capped, so a long outage costs disk (the outbox), never memory or a blocked caller.

Threads: SQLite calls run behind ``outbox_limiter`` and the blocking ``poll``/``flush`` calls behind
``kafka_limiter`` (one thread each at a time). ``produce`` itself never blocks (a full local queue raises
BufferError at once), so the relay calls it on the trio thread. Delivery reports and error callbacks run in
the polling thread; they only append to deques that the trio side drains, so all bookkeeping happens on the
trio thread (atomic between awaits).

Logging: an outage is one WARNING ("kafka unreachable at X: events wait in outbox (N)") and its end one INFO;
every retry and reconnect in between is DEBUG. Messages that time out while the broker acknowledged others
within ``message_timeout`` mean a slow broker (a loaded machine, a burst of thousands of events), not an outage:
one INFO, and they are produced again from the outbox like any other failed delivery.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from hybridfs.events.outbox import Outbox, OutboxRow
from hybridfs.events.schema import Event, Topics, encode, topic_names
from hybridfs.events.topics import (
    KafkaUnavailable,
    RdKafkaLogger,
    TopicCreator,
    client_config,
    create_topics,
    is_unreachable_error,
)
from hybridfs.retry import Policy, Retrying

__all__ = ["BusStats", "EventBus", "KafkaUnavailable", "producer_config", "publish_now"]

log = logging.getLogger("hybridfs.events.bus")

# (topic, key, value, headers); value b"" is a tombstone.
_Item = tuple[str, bytes, bytes, tuple[tuple[str, bytes], ...]]

_TOPIC_MISSING = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})

# What our delivery guarantee depends on; a user's kafka_config cannot turn these off.
_FORCED_PRODUCER = {"enable.idempotence": True, "acks": "all"}
_FORCED_ONE_SHOT_PRODUCER = {"enable.idempotence": False, "acks": "all", "max.in.flight.requests.per.connection": 1}


def producer_config(
    bootstrap: str,
    kafka_config: Mapping[str, Any] | None,
    *,
    client_id: str,
    message_timeout: float,
    error_cb: Any = None,
    idempotent: bool = True,
) -> dict[str, Any]:
    """``idempotent=False`` for a producer that lives for one batch: an idempotent producer's first message
    waits for its producer id, which librdkafka asks for on a 500 ms timer once the broker connection is up
    (0.5 s of every ``hybridfs evict``). Without it, a retried batch can be written twice or, with more than
    one request in flight, out of order; one request in flight keeps the order, and every event is
    idempotent to handle."""
    defaults: dict[str, Any] = {
        "linger.ms": 5,
        # Bounded: a message not delivered in this time comes back as an error (and stays in the outbox).
        "message.timeout.ms": int(message_timeout * 1000),
        # Bounded local queue: produce() raises BufferError instead of blocking or growing without limit.
        "queue.buffering.max.messages": 20000,
        "queue.buffering.max.kbytes": 32768,
        "socket.connection.setup.timeout.ms": 10000,
    }
    if error_cb is not None:
        defaults["error_cb"] = error_cb
    return client_config(
        bootstrap,
        kafka_config,
        client_id=client_id,
        logger=RdKafkaLogger(),
        defaults=defaults,
        forced=_FORCED_PRODUCER if idempotent else _FORCED_ONE_SHOT_PRODUCER,
    )


@dataclass(frozen=True)
class BusStats:
    """Counters for ``hybridfs status``."""

    published: int  # publish() calls accepted since start
    produced: int  # events Kafka acknowledged (delivery report: success)
    failed: int  # failed delivery attempts (each is retried from the outbox)
    outbox: int  # events waiting: rows in the outbox plus events not yet written to it
    in_flight: int  # outbox rows handed to librdkafka and not yet reported
    reachable: bool | None  # None until the first delivery report or outage


class EventBus:
    """Publishes events to Kafka through a durable outbox. Start with ``await nursery.start(bus.run)``.

    ``publish()`` may be called before ``run`` starts (events wait in memory and are stored when it starts)
    and after it ends (they are then written straight to the outbox, synchronously, for the next run).
    """

    def __init__(
        self,
        bootstrap: str,
        topic_prefix: str,
        outbox_path: str | Path,
        kafka_config: Mapping[str, Any] | None = None,
        origin: str = "",
        *,
        retry_interval: float = 1.5,
        message_timeout: float = 10.0,
        flush_timeout: float = 3.0,
        batch_size: int = 500,
        max_in_flight: int = 5000,
        create_topics: bool = True,
        partitions: int = 3,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics: Topics = topic_names(topic_prefix)
        self.outbox_path = Path(outbox_path)
        self.kafka_config = dict(kafka_config or {})
        self.origin = origin
        self.retry_interval = retry_interval
        self.message_timeout = message_timeout
        self.flush_timeout = flush_timeout
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.create_topics = create_topics
        self.partitions = partitions

        self.outbox_limiter = trio.CapacityLimiter(1)
        self.kafka_limiter = trio.CapacityLimiter(1)
        # Failures of the bus's own loops (a bug, a failing state directory): retried from retry_interval up to
        # 10 times that. A failing outbox says its ERROR once and "writable again" once: its retries are DEBUG.
        self._policy = Policy(first=retry_interval, cap=10 * retry_interval)
        self._outbox_retry = Retrying(dataclasses.replace(self._policy, info_at=None, warn_at=None), log,
                                      "cannot store events in the outbox")

        self._state = "new"  # new -> running -> closed
        self._queue: deque[_Item] = deque()  # published, not yet in the outbox
        self._wake = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._outbox: Outbox | None = None
        self._producer: Producer | None = None
        self._generation = 0  # bumped when the producer is replaced after a fatal error
        self._in_flight: dict[int, int] = {}  # outbox row id -> producer generation
        # Filled by librdkafka callbacks in the polling thread, drained on the trio thread.
        self._reports: deque[tuple[int, int, KafkaError | None]] = deque()
        self._errors: deque[KafkaError] = deque()

        self._outbox_count = 0
        # Events taken from the queue whose outbox write has not returned yet: without them, every count of the
        # waiting events (status, the outbox gauge, the outage log lines) misses a batch during each commit.
        self._storing = 0
        self._published = 0
        self._produced = 0
        self._failed = 0
        self._reachable: bool | None = None
        self._last_delivery = -math.inf  # time.monotonic() of the last acknowledged event
        self._slow_reported = False
        self._warned_codes: set[int] = set()  # delivery error codes already logged at WARNING in this streak
        self._warned_state: set[str] = set()
        self._fatal = False  # the producer hit a fatal error and must be replaced
        self._creator: TopicCreator | None = None

    # --- the synchronous face -------------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Hand ``event`` to the bus. Synchronous, O(1), never blocks, never raises."""
        try:
            item: _Item = (self.topics.for_event(event), event.kafka_key, encode(event), ())
        except Exception as exc:
            log.error(
                "cannot publish %s event for %r: %s",
                getattr(event, "type", "?"),
                getattr(event, "key", "?"),
                exc,
            )
            return
        self._enqueue(item)

    def publish_record(self, topic: str, key: bytes, value: bytes | None,
                       headers: Sequence[tuple[str, bytes]] = ()) -> None:
        """Hand one record of any topic to the bus (the change feed); ``value`` None is a tombstone.
        Synchronous, O(1), never blocks, never raises; delivered through the outbox like every event."""
        if value == b"":
            log.error("cannot publish an empty record for %r: an empty value means a tombstone", key)
            return
        self._enqueue((topic, bytes(key), value or b"", tuple(headers)))

    def _enqueue(self, item: _Item) -> None:
        self._published += 1
        if self._state == "closed":
            self._store_after_close(item)
            return
        self._queue.append(item)
        self._poke()

    def stats(self) -> BusStats:
        return BusStats(
            published=self._published,
            produced=self._produced,
            failed=self._failed,
            outbox=self._waiting(),
            in_flight=len(self._in_flight),
            reachable=self._reachable,
        )

    def _poke(self) -> None:
        if self._state != "running":
            return
        if threading.get_ident() == self._trio_thread:
            self._wake.set()
            return
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._wake_from_other_thread)
        except trio.RunFinishedError:
            pass  # the relay's final drain (or the next run) stores what is queued

    def _wake_from_other_thread(self) -> None:
        self._wake.set()

    def _store_after_close(self, item: _Item) -> None:
        # Only during teardown (the composition root stops the bus after the filesystem): a brief blocking
        # write is better than a lost event.
        try:
            with Outbox(self.outbox_path) as outbox:
                outbox.add(*item)
            self._outbox_count += 1
            log.debug("event published after the bus stopped: stored in the outbox for the next run")
        except Exception as exc:
            log.error("event published after the bus stopped could not be stored in %s: %s", self.outbox_path, exc)

    # --- the service ----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the outbox, start the producer (and create the topics in the background when missing), relay
        events until cancelled; then flush briefly and stop."""
        if self._state != "new":
            raise RuntimeError("an EventBus runs once")
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        outbox = await trio.to_thread.run_sync(Outbox, self.outbox_path, limiter=self.outbox_limiter)
        try:
            self._outbox = outbox
            self._outbox_count = await trio.to_thread.run_sync(outbox.count, limiter=self.outbox_limiter)
            self._producer = self._new_producer()  # bad settings fail here, before started()
            if self._outbox_count:
                log.info("%d events from an earlier run wait in the outbox; delivering", self._outbox_count)
            self._state = "running"
            try:
                async with trio.open_nursery() as nursery:
                    if self.create_topics:
                        # An outage is the bus's own WARNING; the creator only adds an INFO line.
                        creator = self._creator = TopicCreator(
                            self.bootstrap,
                            self.topics,
                            self.kafka_config,
                            partitions=self.partitions,
                            unreachable_level=logging.INFO,
                        )
                        await nursery.start(creator.run)
                    nursery.start_soon(self._poll_loop)
                    nursery.start_soon(self._relay_loop)
                    task_status.started()
            finally:
                with trio.move_on_after(self.flush_timeout, shield=True) as scope:
                    await self._shutdown()
                if scope.cancelled_caught:
                    log.debug("event bus flush cut short after %.1fs", self.flush_timeout)
        finally:
            self._state = "closed"
            with trio.CancelScope(shield=True):
                if self._queue:  # start-up failed, or the flush deadline passed: one last try
                    await self._store_leftovers(outbox)
                await trio.to_thread.run_sync(outbox.close, limiter=self.outbox_limiter)
            producer, self._producer = self._producer, None
            if producer is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._dispose_producer, producer)
            self._outbox = None

    async def _store_leftovers(self, outbox: Outbox) -> None:
        batch = list(self._queue)
        self._queue.clear()
        try:
            with self._being_stored(batch):
                await trio.to_thread.run_sync(outbox.add_many, batch, limiter=self.outbox_limiter)
            self._outbox_count += len(batch)  # no await since the batch left _storing: never counted 0 or twice
        except Exception as exc:
            log.error("%d events could not be written to the outbox %s and are lost: %s", len(batch), outbox.path, exc)

    def _new_producer(self) -> Producer:
        client = re.sub(r"[^A-Za-z0-9._-]+", "_", self.origin).strip("_")
        conf = producer_config(
            self.bootstrap,
            self.kafka_config,
            client_id=f"hybridfs-{client}" if client else "hybridfs",
            message_timeout=self.message_timeout,
            error_cb=self._on_error,
        )
        return Producer(conf)

    @staticmethod
    def _dispose_producer(producer: Producer) -> None:
        try:
            producer.purge(in_queue=True, in_flight=True, blocking=False)
            producer.flush(0)
        except Exception as exc:  # pragma: no cover - best effort
            log.debug("disposing of the kafka producer: %s", exc)

    async def _shutdown(self) -> None:
        """Store every queued event, then give in-flight messages a short chance to be acknowledged."""
        while self._queue:
            await self._store_and_send()
        self._state = "closed"  # no await since the queue was seen empty: later publishes go straight to disk
        producer = self._producer
        if producer is not None and self._in_flight:
            await trio.to_thread.run_sync(
                producer.flush, max(0.0, self.flush_timeout - 0.5), limiter=self.kafka_limiter
            )
            await self._handle_reports()
        if self._outbox_count:
            log.info("event bus stopped: %d events wait in the outbox for the next start", self._outbox_count)

    # --- relay: memory -> outbox -> producer ----------------------------------------------------------------

    async def _relay_loop(self) -> None:
        next_resend = 0.0
        failures = Retrying(self._policy, log, "event relay failed")
        while True:
            try:
                if self._queue:
                    await self._store_and_send()
                if time.monotonic() >= next_resend:
                    next_resend = time.monotonic() + self.retry_interval
                    await self._resend()
                failures.succeeded()
            except Exception as exc:
                # A bug or a failing state directory must not take the mount down; the outbox keeps events.
                await failures.wait(exc)
            if self._queue:
                continue  # more than one batch was waiting
            with trio.move_on_after(self.retry_interval):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _store_and_send(self) -> None:
        assert self._outbox is not None
        batch: list[_Item] = []
        while self._queue and len(batch) < self.batch_size:
            batch.append(self._queue.popleft())
        if not batch:
            return
        try:
            with self._being_stored(batch):
                ids = await trio.to_thread.run_sync(self._outbox.add_many, batch, limiter=self.outbox_limiter)
        except Exception as exc:
            # The state directory is failing. Keep the events in memory (in order) and try again shortly.
            self._queue.extendleft(reversed(batch))
            if "outbox" not in self._warned_state:
                log.error("%s; keeping %d events in memory only, NOT durable (lost if the mount stops) until the "
                          "outbox can be written", exc, len(self._queue))
                self._warned_state.add("outbox")
            await self._outbox_retry.wait(f"{exc}; {len(self._queue)} events in memory")
            return
        self._outbox_retry.succeeded()
        if "outbox" in self._warned_state:
            self._warned_state.discard("outbox")
            log.info("outbox %s is writable again", self.outbox_path)
        self._outbox_count += len(ids)
        now = time.time()
        self._send([OutboxRow(i, t, k, v, now, h) for i, (t, k, v, h) in zip(ids, batch, strict=True)])

    @contextlib.contextmanager
    def _being_stored(self, batch: Sequence[_Item]) -> Iterator[None]:
        """Count ``batch`` as waiting while its outbox write runs in a thread. The caller moves it to
        ``_outbox_count`` (or back to the queue) with no await in between, so stats never miss it."""
        self._storing += len(batch)
        try:
            yield
        finally:
            self._storing -= len(batch)

    async def _resend(self) -> None:
        """Produce again the outbox rows not in flight (left from an earlier run or a failed attempt)."""
        if self._fatal:
            await self._replace_producer()
        waiting = self._outbox_count - len(self._in_flight)
        room = self.max_in_flight - len(self._in_flight)
        if waiting <= 0 or room <= 0 or self._outbox is None:
            return
        rows = await trio.to_thread.run_sync(
            self._outbox.pending,
            len(self._in_flight) + min(room, self.batch_size),
            limiter=self.outbox_limiter,
        )
        fresh = [r for r in rows if r.id not in self._in_flight]
        if fresh:
            log.debug("re-producing %d events from the outbox", len(fresh))
            self._send(fresh)

    def _send(self, rows: Iterable[OutboxRow]) -> None:
        producer = self._producer
        if producer is None:
            return
        gen = self._generation
        for row in rows:
            if row.id in self._in_flight:
                continue
            if len(self._in_flight) >= self.max_in_flight:
                break
            self._in_flight[row.id] = gen
            try:
                producer.produce(
                    row.topic,
                    value=row.value or None,  # an empty row is a tombstone (publish_record)
                    key=row.key,
                    headers=list(row.headers) or None,
                    on_delivery=functools.partial(self._on_delivery, row.id, gen),
                )
            except BufferError:
                del self._in_flight[row.id]
                log.debug("librdkafka's queue is full; %s waits in the outbox", row.id)
                break
            except (KafkaException, ValueError, TypeError) as exc:
                del self._in_flight[row.id]
                self._failed += 1
                self._warn_once(-1, f"cannot hand an event to librdkafka: {exc} (it stays in the outbox)")
                break

    # --- poll: delivery reports -> outbox deletes, outage state ---------------------------------------------

    def _on_delivery(self, row_id: int, gen: int, err: KafkaError | None, msg: Message) -> None:
        self._reports.append((row_id, gen, err))  # polling thread: just record it

    def _on_error(self, err: KafkaError) -> None:
        self._errors.append(err)  # polling thread: just record it

    async def _poll_loop(self) -> None:
        failures = Retrying(self._policy, log, "handling kafka delivery reports failed; the events stay in the outbox")
        while True:
            producer = self._producer
            if producer is not None:
                await trio.to_thread.run_sync(producer.poll, 0.2, limiter=self.kafka_limiter)
            else:  # pragma: no cover - only between a fatal error and the replacement
                await trio.sleep(0.2)
            try:
                await self._handle_reports()
                failures.succeeded()
            except Exception as exc:
                await failures.wait(exc)

    async def _handle_reports(self) -> None:
        while self._errors:
            client_err = self._errors.popleft()
            if client_err.fatal():
                log.error("kafka producer hit a fatal error: %s; replacing the producer", client_err.str())
                self._fatal = True
            elif client_err.code() == KafkaError._ALL_BROKERS_DOWN and self._waiting():
                self._mark_unreachable(client_err)
            else:
                log.debug("kafka producer: %s", client_err.str())
        if not self._reports:
            return
        delivered: list[int] = []
        failures: dict[str, int] = {}
        unreachable: KafkaError | None = None
        while self._reports:
            row_id, gen, err = self._reports.popleft()
            if err is None:
                delivered.append(row_id)
                continue
            self._failed += 1
            failures[err.str()] = failures.get(err.str(), 0) + 1
            if self._in_flight.get(row_id) == gen:
                del self._in_flight[row_id]
            if is_unreachable_error(err):
                unreachable = err
            elif err.code() in _TOPIC_MISSING and self._creator is not None and not self._creator.done.is_set():
                pass  # the topics are being created right now
            elif err.code() not in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
                self._warn_once(err.code(), f"kafka refused an event: {err.str()} (it stays in the outbox)")
        if failures:
            summary = ", ".join(f"{n} x {text}" for text, n in failures.items())
            log.debug("deliveries failed (%s); the events stay in the outbox and are retried", summary)
        if delivered:
            self._last_delivery = time.monotonic()
        if unreachable is not None:
            if self._acknowledging_others(unreachable):
                self._report_slow(failures)
            else:
                self._mark_unreachable(unreachable)
        if delivered:
            if not failures:  # a clean batch ends a slow episode: the next one is reported again
                self._slow_reported = False
            self._produced += len(delivered)
            self._mark_reachable()
            assert self._outbox is not None
            try:
                deleted = await trio.to_thread.run_sync(self._outbox.delete, delivered, limiter=self.outbox_limiter)
                self._outbox_count = max(0, self._outbox_count - deleted)
            finally:
                # Only now, so the resend tick cannot pick up a delivered row between report and delete.
                for row_id in delivered:
                    self._in_flight.pop(row_id, None)

    async def _replace_producer(self) -> None:
        old = self._producer
        self._fatal = False
        self._generation += 1
        self._in_flight.clear()  # whatever the old producer held is still in the outbox
        self._producer = self._new_producer()
        if old is not None:
            await trio.to_thread.run_sync(self._dispose_producer, old, limiter=self.kafka_limiter)

    def _waiting(self) -> int:
        """Events not yet delivered: in the outbox, being written to it, or still in memory."""
        return self._outbox_count + self._storing + len(self._queue)

    def _acknowledging_others(self, err: KafkaError) -> bool:
        """A message time-out while the broker acknowledged other events within the time-out: slow, not gone."""
        return (err.code() == KafkaError._MSG_TIMED_OUT
                and time.monotonic() - self._last_delivery < self.message_timeout)

    def _report_slow(self, failures: dict[str, int]) -> None:
        level = logging.DEBUG if self._slow_reported or self._reachable is False else logging.INFO
        self._slow_reported = True
        log.log(level, "kafka at %s is slow: %d events not acknowledged within %gs while others were; they are "
                "produced again from the outbox (%d waiting)", self.bootstrap, sum(failures.values()),
                self.message_timeout, self._waiting())

    def _mark_unreachable(self, err: KafkaError) -> None:
        if self._reachable is False:
            return
        self._reachable = False
        log.warning(
            "kafka unreachable at %s: events wait in outbox (%d) [%s]",
            self.bootstrap,
            self._waiting(),
            err.str(),
        )

    def _mark_reachable(self) -> None:
        if self._reachable is False:
            log.info(
                "kafka reachable again at %s: delivering the events in the outbox (%d)",
                self.bootstrap,
                self._waiting(),
            )
        self._reachable = True
        self._warned_codes.clear()

    def _warn_once(self, code: int, text: str) -> None:
        if code in self._warned_codes:
            log.debug("%s", text)
            return
        self._warned_codes.add(code)
        log.warning("%s", text)


# --- the CLI's direct path ---------------------------------------------------------------------------


def publish_now(
    events: Iterable[Event],
    timeout: float = 10.0,
    *,
    bootstrap: str,
    topic_prefix: str,
    kafka_config: Mapping[str, Any] | None = None,
    ensure_topics: bool = True,
) -> int:
    """Produce ``events`` directly (no outbox), wait for Kafka's acknowledgements, return how many arrived.

    For ``hybridfs hydrate|evict|pin|unpin`` on any host. Blocking. Raises :class:`KafkaUnavailable` with a
    one-line reason when not every event was acknowledged within ``timeout`` seconds.
    """
    items = list(events)
    if not items:
        return 0
    topics = topic_names(topic_prefix)
    deadline = time.monotonic() + timeout
    if ensure_topics:
        try:
            create_topics(bootstrap, topics, kafka_config, timeout=max(1.0, min(5.0, timeout / 2)))
        except KafkaUnavailable:
            raise KafkaUnavailable(f"kafka unreachable at {bootstrap} (no answer within {timeout:g}s)") from None
        except KafkaException as exc:
            log.debug("could not create topics (producing anyway): %s", exc)
    errors: list[KafkaError] = []
    delivered = 0

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1
        else:
            errors.append(err)

    remaining = max(1.0, deadline - time.monotonic())
    producer = Producer(
        producer_config(
            bootstrap,
            kafka_config,
            client_id="hybridfs-cli",
            message_timeout=remaining,
            error_cb=errors.append,
            idempotent=False,
        )
    )
    try:
        for event in items:
            while True:
                try:
                    producer.produce(
                        topics.for_event(event),
                        value=encode(event),
                        key=event.kafka_key,
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    if time.monotonic() >= deadline:
                        break
                    producer.poll(0.1)
        producer.flush(max(0.0, deadline - time.monotonic()))
    finally:
        EventBus._dispose_producer(producer)
    if delivered < len(items):
        why = errors[-1].str() if errors else "no acknowledgement"
        raise KafkaUnavailable(
            f"kafka unreachable at {bootstrap}: {delivered} of {len(items)} events delivered"
            f" within {timeout:g}s ({why})"
        )
    return delivered
