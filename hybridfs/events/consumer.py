"""Consuming events: one Kafka consumer thread, an async handler on the trio side, commits after the work.

Shape::

    consumer thread   poll() -> message -> trio (memory channel); runs commit requests; pauses the
                      partitions while too many messages wait on the trio side (back-pressure that never
                      stops poll(), so the group membership stays alive during long hydrations)
    trio: dispatch    decode(value, allowed_prefix) -> await handler(event), up to ``concurrency`` at once
                      (never two for the same object key), then ask the thread to commit

Delivery is at least once. A partition's offset is committed only past messages whose handler has returned
(or that were set aside): with concurrent handlers the commit is the lowest offset still in progress.

* Bad input (undecodable, or the handler raises :class:`RejectEvent`/:class:`InvalidEvent`): one WARNING
  saying why, the original bytes go to the dead-letter topic with the reason in headers, then the commit. A
  decoder that raises anything else has a bug: ERROR with the traceback, and the record is set aside the same
  way (decoding it again gives the same answer: retrying would stop its partition for good).
* Any other handler exception: ERROR with the traceback, no commit, and the handler is called again for the
  same event after a backoff (the retry policy, hybridfs/retry.py: up to ``max_backoff``, jittered). The mount
  keeps running.
* Kafka unreachable: one WARNING, one INFO when it is back; librdkafka retries on its own meanwhile.
* ``run`` failed (a bug) and started again: it joins the group again and resumes at the committed offsets;
  ``stats().running`` is False (and ``stopped`` says why) while no run consumes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from hybridfs.events.schema import Event, InvalidEvent, RejectEvent, decode
from hybridfs.events.topics import RdKafkaLogger, client_config, is_unreachable_error
from hybridfs.keylocks import KeyLocks
from hybridfs.retry import Policy, Retrying

__all__ = ["ConsumerStats", "EventConsumer", "Handler", "InvalidEvent", "RejectEvent"]

log = logging.getLogger("hybridfs.events.consumer")

Handler = Callable[[Any], Awaitable[None]]
# Turns one message into what the handler takes; raises InvalidEvent for bad input (the default: an Event).
Decoder = Callable[[Message, str], Any]


def decode_event(msg: Message, allowed_prefix: str) -> Event:
    return decode(msg.value() or b"", allowed_prefix=allowed_prefix)

DEFAULT_MAX_BUFFERED = 1024  # messages handed to trio and not finished: beyond it, the partitions pause
_PROBE_INTERVAL = 5.0  # while unreachable: how often the thread checks whether Kafka is back
_LAG_INTERVAL = 5.0


@dataclass(frozen=True)
class ConsumerStats:
    received: int  # messages handed to the trio side
    handled: int  # events whose handler returned
    dead_lettered: int  # messages set aside as invalid or rejected
    handler_failures: int  # handler exceptions that led to a retry
    in_progress: int  # messages received and not finished yet
    lag: int | None  # messages on the broker not yet finished by this consumer group member
    reachable: bool | None
    lag_age: float | None = None  # seconds since the lag was last measured (None: never)
    running: bool = False  # a run is consuming (between restarts: False)
    stopped: str | None = None  # why not: the last run's failure, or "not started"
    failing: int = 0  # messages held up: their handler, or their dead-letter copy, failed and is retried
    last_failure: str | None = None  # what failed for one of them


class _PartitionTrack:
    """Offsets of one partition (in one assignment epoch) dispatched and not finished yet."""

    __slots__ = ("committed", "highest", "open")

    def __init__(self) -> None:
        self.open: set[int] = set()
        self.highest = -1
        self.committed = -1

    def commit_point(self) -> int:
        """The offset to commit: every offset below it has finished."""
        return min(self.open) if self.open else self.highest + 1


async def run_consumer_thread(main: Callable[[], None], token: trio.lowlevel.TrioToken, stop: threading.Event,
                              close_timeout: float) -> None:
    """Run a consumer's polling loop ``main`` in a thread until cancelled; then set ``stop`` and wait (shielded,
    at most ``close_timeout``) for the thread to close its consumer. Abandoned on cancel, so a thread stuck in
    librdkafka never holds up the mount's shutdown for longer than that."""
    done = trio.Event()

    def body() -> None:
        try:
            main()
        finally:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

    try:
        await trio.to_thread.run_sync(body, abandon_on_cancel=True)
    finally:
        stop.set()
        with trio.move_on_after(close_timeout, shield=True):
            await done.wait()


class EventConsumer:
    """Consumes one topic with one consumer group; ``await nursery.start(consumer.run)``.

    ``handler(event)`` must be idempotent. Raise :class:`RejectEvent` to set an event aside.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str,
        handler: Handler,
        *,
        allowed_prefix: str,
        dead_letter_topic: str,
        kafka_config: Mapping[str, Any] | None = None,
        concurrency: int = 1,
        max_buffered: int | None = None,
        max_backoff: float = 60.0,
        poll_timeout: float = 0.1,
        close_timeout: float = 10.0,
        name: str | None = None,
        instance_id: str | None = None,
        decoder: Decoder = decode_event,
        lag_interval: float = _LAG_INTERVAL,
        fresh_lag: bool = False,
        commit_interval: float = 0.0,
    ) -> None:
        self.bootstrap = bootstrap
        # Static group membership (KIP-345): a restarted member takes its partitions back at once instead of
        # waiting out the dead member's session. Given to the consumer only (the dead-letter producer shares
        # kafka_config and would warn about it); a group.instance.id in kafka_config wins.
        self.instance_id = instance_id
        self.topic = topic
        self.group_id = group_id
        self.handler = handler
        self.allowed_prefix = allowed_prefix
        self.dead_letter_topic = dead_letter_topic
        self.kafka_config = dict(kafka_config or {})
        self.concurrency = max(1, concurrency)
        # Events are a few hundred bytes: buffer a burst (one `hybridfs evict` over a tree) whole. Pausing costs
        # more than memory: after resume() the next fetch waited up to fetch.wait.max.ms (0.5 s) every 16
        # messages, which held evictions to 30 files/s.
        self.max_buffered = max_buffered or max(DEFAULT_MAX_BUFFERED, 4 * self.concurrency)
        self.max_backoff = max_backoff
        self._policy = Policy(first=1.0, cap=max_backoff)
        self.poll_timeout = poll_timeout
        self.close_timeout = close_timeout
        self.name = name or topic
        self.decoder = decoder
        # fresh_lag: ask the broker for the high watermarks (a round trip each lag_interval) instead of reading
        # librdkafka's cached statistics, so a measured lag also proves Kafka answered (the change feed's health).
        self.lag_interval = lag_interval
        self.fresh_lag = fresh_lag
        self._lag_at: float | None = None  # monotonic time of the last successful lag measurement
        self._lag_done = threading.Event()
        # Seconds between commits (0: after every message). A busy topic of quick handlers commits in batches:
        # a commit is a broker request, and a lost one only means records are handled again (idempotently).
        self.commit_interval = commit_interval
        self._assigned = 0  # partitions assigned to this member now (set by the consumer thread)
        self._next_offsets: dict[int, int] = {}  # partition -> offset after the last message received

        self.dead_letter_limiter = trio.CapacityLimiter(1)
        self._commands: queue.SimpleQueue[TopicPartition] = queue.SimpleQueue()  # commits for the thread
        self._stop = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._send: trio.MemorySendChannel[tuple[Message, int]] | None = None
        self._outstanding = 0  # received and not finished; shared with the thread
        self._outstanding_lock = threading.Lock()
        self._epoch = 0  # bumped by every rebalance (thread); tags messages
        self._tracks: dict[tuple[str, int, int], _PartitionTrack] = {}
        self._key_locks: KeyLocks[bytes] = KeyLocks()
        self._dlq_producer: Producer | None = None

        self._received = 0
        self._handled = 0
        self._dead_lettered = 0
        self._handler_failures = 0
        self._lag: int | None = None
        self._reachable: bool | None = None
        self._warned: set[int] = set()
        self._running = False
        self._stopped: str | None = "not started"
        self._failing: dict[str, str] = {}  # where -> what failed for a message held up (handler, dead letter)

    def stats(self) -> ConsumerStats:
        return ConsumerStats(
            received=self._received,
            handled=self._handled,
            dead_lettered=self._dead_lettered,
            handler_failures=self._handler_failures,
            in_progress=self._outstanding,
            lag=self._lag,
            reachable=self._reachable,
            lag_age=None if self._lag_at is None else time.monotonic() - self._lag_at,
            running=self._running,
            stopped=self._stopped,
            failing=len(self._failing),
            last_failure=next(iter(self._failing.values()), None),
        )

    def consuming(self) -> bool:
        """A run consumes and no message is held up by a retry (cheap: for every trust decision)."""
        return self._running and not self._failing

    # --- trio side ------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Consume until cancelled. Run again after a failure, it joins the group again and resumes at the
        committed offsets (what was handed over and not finished is delivered again: at least once)."""
        self._token = trio.lowlevel.current_trio_token()
        consumer = self._new_consumer()  # bad settings fail here, before started()
        self._reset_run_state()
        try:
            await self._run(consumer, task_status)
        except Exception as exc:
            self._stopped = f"the consumer failed ({type(exc).__name__}: {exc})"[:300]
            raise
        finally:
            self._running = False
            self._stopped = self._stopped or "stopped"

    def _reset_run_state(self) -> None:
        """What an earlier run left is not this run's: messages it had queued for its dispatcher were dropped
        with it (never committed: delivered again), so they count neither as outstanding nor as lag."""
        with self._outstanding_lock:
            self._outstanding = 0
        self._tracks.clear()
        self._next_offsets.clear()
        self._lag, self._lag_at, self._assigned = None, None, 0
        self._running, self._stopped = True, None

    async def _run(self, consumer: Consumer, task_status: trio.TaskStatus[None]) -> None:
        self._dlq_producer = Producer(
            client_config(
                self.bootstrap,
                self.kafka_config,
                client_id=f"hybridfs-{self.name}-dead-letter",
                logger=RdKafkaLogger(),
                defaults={"linger.ms": 0, "message.timeout.ms": 10000},
                forced={"acks": "all"},
            )
        )
        send, receive = trio.open_memory_channel[tuple[Message, int]](math.inf)
        self._send = send
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dispatch, receive)
                task_status.started()
                restarts = Retrying(self._policy, log, f"kafka consumer for {self.topic} failed; starting a new one")
                while True:
                    try:
                        await self._run_thread(consumer)
                        send.close()  # the thread ended without being cancelled: let the dispatcher finish
                        return
                    except Exception as exc:
                        self._running, self._stopped = False, f"the kafka consumer failed ({exc}); restarting"[:300]
                        await restarts.wait(exc)
                    consumer = self._new_consumer()
                    self._running, self._stopped = True, None
        finally:
            self._stop.set()
            send.close()
            producer, self._dlq_producer = self._dlq_producer, None
            if producer is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_dispose_producer, producer)

    def _new_consumer(self) -> Consumer:
        settings = dict(self.kafka_config)
        if self.instance_id:
            settings = {"group.instance.id": self.instance_id, **settings}
        conf = client_config(
            self.bootstrap,
            settings,
            client_id=f"hybridfs-{self.name}",
            logger=RdKafkaLogger(),
            defaults={
                # Notice topics created after we subscribed within seconds, not librdkafka's 5 minutes.
                "topic.metadata.refresh.interval.ms": 10000,
                "error_cb": self._on_error,
            },
            forced={
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            },
        )
        return Consumer(conf)

    async def _run_thread(self, consumer: Consumer) -> None:
        """Run the consumer thread until cancelled; then stop it and wait (shielded) for it to close."""
        self._stop.clear()
        assert self._token is not None
        await run_consumer_thread(functools.partial(self._thread_main, consumer), self._token, self._stop,
                                  self.close_timeout)

    async def _dispatch(self, receive: trio.MemoryReceiveChannel[tuple[Message, int]]) -> None:
        slots = trio.Semaphore(self.concurrency)
        async with receive, trio.open_nursery() as nursery:
            async for msg, epoch in receive:
                await slots.acquire()
                track = self._track(msg, epoch)
                offset = msg.offset() or 0
                track.open.add(offset)
                track.highest = max(track.highest, offset)
                nursery.start_soon(self._process, msg, epoch, slots)

    def _track(self, msg: Message, epoch: int) -> _PartitionTrack:
        key = (msg.topic() or "", msg.partition() or 0, epoch)
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _PartitionTrack()
            # Forget the bookkeeping of earlier assignments once nothing of theirs is in progress.
            for old in [k for k, t in self._tracks.items() if k[2] < epoch and not t.open]:
                del self._tracks[old]
        return track

    async def _process(self, msg: Message, epoch: int, slots: trio.Semaphore) -> None:
        try:
            key = msg.key() or b""
            async with self._key_lock(key):
                finished = await self._handle(msg)
            if finished:
                self._finish(msg, epoch)
        finally:
            slots.release()
            with self._outstanding_lock:
                self._outstanding -= 1

    def _key_lock(self, key: bytes) -> Any:
        return self._key_locks(key)

    async def _handle(self, msg: Message) -> bool:
        """Decode and handle one message; True when it may be committed."""
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        try:
            event = self.decoder(msg, self.allowed_prefix)
        except InvalidEvent as exc:
            await self._set_aside(msg, f"invalid event: {exc.reason}", where)
            return True
        except Exception as exc:
            # A bug in the decoder. Decoding again gives the same answer, so retrying would stop the partition
            # for good (and a compacted topic replays the record to every new mount): set it aside too.
            log.error("decoding %s failed (a bug in the decoder)", where, exc_info=True)
            await self._set_aside(msg, f"undecodable: {type(exc).__name__}: {exc}"[:300], where)
            return True
        what = f"{_kind(event)} for {getattr(event, 'key', '?')!r}"
        retry = Retrying(self._policy, log, f"handling {what} ({where}) failed; not committed")
        try:
            while True:
                try:
                    await self.handler(event)
                except Exception as exc:
                    rejected = _rejection(exc)
                    if rejected is not None:
                        await self._set_aside(
                            msg, f"rejected {_kind(event)} for {getattr(event, 'key', '?')!r}: {rejected.reason}",
                            where,
                        )
                        return True
                    self._handler_failures += 1
                    # Until it succeeds, this key (and with concurrency 1, the partition) waits: say so in stats.
                    self._failing[where] = f"applying {what}: {type(exc).__name__}: {exc}"[:300]
                    await retry.wait(exc)  # a handler waits out outages itself: what reaches here is an ERROR
                    continue
                self._handled += 1
                return True
        finally:
            self._failing.pop(where, None)

    async def _set_aside(self, msg: Message, reason: str, where: str) -> None:
        log.warning("%s from %s: sent to the dead-letter topic %s", reason, where, self.dead_letter_topic)
        # Committing without the copy would lose the message: keep trying until Kafka takes it (quietly: an
        # outage is the consumer's own WARNING).
        retry = Retrying(dataclasses.replace(self._policy, info_at=5, warn_at=None), log,
                         f"dead-lettering {where} failed")
        whole = True
        try:
            while True:
                failed = await trio.to_thread.run_sync(self._dead_letter_sync, msg, reason, whole,
                                                       limiter=self.dead_letter_limiter)
                if failed is None:
                    retry.succeeded()
                    self._dead_lettered += 1
                    return
                error, too_large = failed
                if too_large and whole:
                    # The copy adds headers to a record as big as the broker takes: it can never be sent whole,
                    # and retrying it would hold up the partition for good. The reason and where it was still go.
                    log.warning("%s is too large for the dead-letter topic %s (%s): set aside without its value",
                                where, self.dead_letter_topic, error)
                    whole = False
                    continue
                self._failing[where] = f"dead-lettering {where}: {error}"[:300]  # held up until Kafka takes it
                await retry.wait(error)
        finally:
            self._failing.pop(where, None)

    def _dead_letter_sync(self, msg: Message, reason: str, whole: bool = True) -> tuple[str, bool] | None:
        """Copy ``msg`` to the dead-letter topic (``whole``: with its value, key and headers; else with only its
        key, when short, and where it came from). None when Kafka took it; else (error, the copy is too large)."""
        producer = self._dlq_producer
        if producer is None:
            return "consumer stopping", False
        result: list[KafkaError | None] = []
        headers: list[tuple[str, str | bytes | None]] = []
        original = msg.headers()
        key, value = msg.key(), msg.value()
        if not whole:
            headers.append(("hybridfs.dlq.dropped", f"value of {len(value or b'')} bytes, key of "
                            f"{len(key or b'')} bytes, headers".encode()))
            key, value, original = (key if key is not None and len(key) <= 1024 else None), None, None
        if isinstance(original, dict):
            headers.extend(original.items())
        elif original:
            headers.extend(original)
        headers += [
            ("hybridfs.dlq.reason", reason[:1000].encode("utf-8", "replace")),
            ("hybridfs.dlq.topic", (msg.topic() or "").encode()),
            ("hybridfs.dlq.partition", str(msg.partition()).encode()),
            ("hybridfs.dlq.offset", str(msg.offset()).encode()),
            ("hybridfs.dlq.group", self.group_id.encode()),
            ("hybridfs.dlq.time", repr(time.time()).encode()),
        ]
        try:
            producer.produce(
                self.dead_letter_topic,
                value=value,
                key=key,
                headers=headers,
                on_delivery=lambda err, _m: result.append(err),
            )
            producer.flush(5)
        except KafkaException as exc:  # retried by the caller
            return str(exc), _too_large(exc.args[0] if exc.args else None)
        except Exception as exc:  # BufferError: retried by the caller
            return str(exc), False
        if not result:
            return "no delivery report", False
        err = result[0]
        return None if err is None else (err.str(), _too_large(err))

    def _finish(self, msg: Message, epoch: int) -> None:
        key = (msg.topic() or "", msg.partition() or 0, epoch)
        track = self._tracks.get(key)
        if track is None:
            return
        track.open.discard(msg.offset() or 0)
        point = track.commit_point()
        if point > track.committed:
            track.committed = point
            self._commands.put(TopicPartition(key[0], key[1], point))

    # --- the consumer thread --------------------------------------------------------------------------------

    def _thread_main(self, consumer: Consumer) -> None:
        paused = False
        next_probe = 0.0
        next_lag = time.monotonic() + min(self.lag_interval, _LAG_INTERVAL)

        def on_assign(c: Consumer, partitions: list[TopicPartition]) -> None:
            self._epoch += 1
            self._assigned = len(partitions)
            log.debug("%s: assigned %s", self.name, [f"{p.topic}[{p.partition}]" for p in partitions])
            self._mark_reachable()

        def on_revoke(c: Consumer, partitions: list[TopicPartition]) -> None:
            self._epoch += 1
            self._assigned = 0
            log.debug("%s: revoked %s", self.name, [f"{p.topic}[{p.partition}]" for p in partitions])

        if self.fresh_lag:
            # Broker round trips: in a thread of their own, so that they never hold up poll() (and delivery).
            threading.Thread(target=self._lag_loop, args=(consumer,), name=f"{self.name}-lag", daemon=True).start()
        try:
            consumer.subscribe([self.topic], on_assign=on_assign, on_revoke=on_revoke)
            next_commit = 0.0
            while not self._stop.is_set():
                if time.monotonic() >= next_commit:
                    next_commit = time.monotonic() + self.commit_interval
                    self._run_commits(consumer, asynchronous=True)
                with self._outstanding_lock:
                    outstanding = self._outstanding
                if not paused and outstanding >= self.max_buffered:
                    consumer.pause(consumer.assignment())
                    paused = True
                elif paused and outstanding <= self.max_buffered // 2:
                    consumer.resume(consumer.assignment())
                    paused = False
                now = time.monotonic()
                if self._reachable is False and now >= next_probe:
                    next_probe = now + _PROBE_INTERVAL
                    self._probe(consumer)
                if now >= next_lag and not self.fresh_lag:
                    next_lag = now + self.lag_interval
                    self._update_lag(consumer)
                msg = consumer.poll(self.poll_timeout)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    self._on_consume_error(err)
                    continue
                self._mark_reachable()
                with self._outstanding_lock:
                    self._outstanding += 1
                self._received += 1
                self._next_offsets[msg.partition() or 0] = (msg.offset() or 0) + 1
                if not self._hand_over(msg, self._epoch):
                    with self._outstanding_lock:
                        self._outstanding -= 1
                    return
        finally:
            if self.fresh_lag:
                self._stop.set()
                self._lag_done.wait(5.0)  # never close the consumer under a lag query
                self._lag_done.clear()
            try:
                self._run_commits(consumer, asynchronous=False)
            except Exception as exc:
                log.debug("%s: final commit failed: %s", self.name, exc)
            try:
                consumer.close()
            except Exception as exc:
                log.debug("%s: closing the consumer: %s", self.name, exc)

    def _hand_over(self, msg: Message, epoch: int) -> bool:
        token, send = self._token, self._send
        if token is None or send is None:
            return False

        def deliver() -> None:
            try:
                send.send_nowait((msg, epoch))
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.WouldBlock):
                with self._outstanding_lock:
                    self._outstanding -= 1  # not committed: Kafka delivers it again next time

        try:
            token.run_sync_soon(deliver)
        except trio.RunFinishedError:
            return False
        return True

    def _run_commits(self, consumer: Consumer, *, asynchronous: bool) -> None:
        latest: dict[tuple[str, int], TopicPartition] = {}
        while True:
            try:
                tp = self._commands.get_nowait()
            except queue.Empty:
                break
            latest[(tp.topic, tp.partition)] = tp
        if not latest:
            return
        offsets = list(latest.values())
        try:
            if asynchronous:
                consumer.commit(offsets=offsets, asynchronous=True)
            else:
                consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:
            # A lost commit only means the events are handled again (idempotently) after a restart.
            log.debug("%s: commit of %s failed: %s", self.name, offsets, exc)

    def _on_consume_error(self, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            return
        if is_unreachable_error(err):
            self._mark_unreachable(err)
        elif code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
            if code not in self._warned:
                self._warned.add(code)
                log.info("%s: topic %s does not exist yet; waiting for it", self.name, self.topic)
        elif code not in self._warned:
            self._warned.add(code)
            log.warning("%s: kafka consumer error: %s", self.name, err.str())
        else:
            log.debug("%s: kafka consumer error: %s", self.name, err.str())

    def _on_error(self, err: KafkaError) -> None:
        # librdkafka's error callback, served from poll() in the consumer thread.
        if err.fatal():
            log.error("%s: kafka consumer fatal error: %s", self.name, err.str())
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._mark_unreachable(err)
        else:
            log.debug("%s: kafka: %s", self.name, err.str())

    def _probe(self, consumer: Consumer) -> None:
        try:
            consumer.list_topics(self.topic, timeout=2.0)
        except Exception as exc:
            log.debug("%s: kafka still unreachable: %s", self.name, exc)
            return
        self._mark_reachable()

    def _lag_loop(self, consumer: Consumer) -> None:
        """``fresh_lag``: every ``lag_interval``, the broker's high watermarks against the offsets this member
        has received (``_next_offsets``), until the consumer thread stops. A client of its own (same group, never
        subscribed): the consumer's own methods block while another thread polls it."""
        conf = client_config(self.bootstrap, self.kafka_config, client_id=f"hybridfs-{self.name}-lag",
                             logger=RdKafkaLogger(), forced={"group.id": self.group_id, "enable.auto.commit": False})
        conf.pop("group.instance.id", None)
        probe = Consumer(conf)
        committed: dict[int, int] = {}
        try:
            while not self._stop.wait(self.lag_interval):
                try:
                    self._measure_lag(probe, committed)
                except Exception as exc:
                    log.debug("%s: lag unknown: %s", self.name, exc)
        finally:
            try:
                probe.close()
            finally:
                self._lag_done.set()

    def _measure_lag(self, probe: Consumer, committed: dict[int, int]) -> None:
        if not self._assigned:  # not consuming (yet): no lag that means "caught up"
            return
        meta = probe.list_topics(self.topic, timeout=1.0).topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return
        missing = [p for p in meta.partitions if p not in self._next_offsets and p not in committed]
        if missing:
            for tp in probe.committed([TopicPartition(self.topic, p) for p in missing], timeout=1.0):
                committed[tp.partition] = tp.offset
        total = 0
        for p in meta.partitions:
            low, high = probe.get_watermark_offsets(TopicPartition(self.topic, p), timeout=1.0, cached=False)
            position = self._next_offsets.get(p, committed.get(p, -1))
            total += max(0, high - (position if position >= 0 else low))
        self._lag = total + self._outstanding
        self._lag_at = time.monotonic()

    def _update_lag(self, consumer: Consumer) -> None:
        try:
            assignment = consumer.assignment()
            if not assignment:
                return
            total = 0
            for tp in consumer.position(assignment):
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0 and tp.offset >= 0:
                    total += max(0, high - tp.offset)
            self._lag = total + self._outstanding
            self._lag_at = time.monotonic()
        except Exception as exc:
            log.debug("%s: lag unknown: %s", self.name, exc)

    def _mark_unreachable(self, err: KafkaError) -> None:
        if self._reachable is False:
            return
        self._reachable = False
        log.warning(
            "kafka unreachable at %s: not consuming %s until it is back [%s]",
            self.bootstrap,
            self.topic,
            err.str(),
        )

    def _mark_reachable(self) -> None:
        if self._reachable is False:
            log.info("kafka reachable again at %s: consuming %s", self.bootstrap, self.topic)
        self._reachable = True
        self._warned.clear()


def _kind(item: object) -> str:
    kind = getattr(item, "type", None)
    return f"{kind} event" if isinstance(kind, str) else type(item).__name__.lower()


def _too_large(err: object) -> bool:
    """A copy that no retry can send: larger than the producer's or the broker's message limit."""
    return isinstance(err, KafkaError) and err.code() in (KafkaError.MSG_SIZE_TOO_LARGE,
                                                          KafkaError.RECORD_LIST_TOO_LARGE)


def _rejection(exc: BaseException) -> RejectEvent | None:
    """The RejectEvent behind ``exc``: itself, or an exception group made only of RejectEvents (a handler that
    runs a nursery reports its errors as a group)."""
    if isinstance(exc, RejectEvent):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        rejects, rest = exc.split(RejectEvent)
        if rejects is not None and rest is None:
            leaf: BaseException = rejects
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, RejectEvent) else None
    return None


def _dispose_producer(producer: Producer) -> None:
    try:
        producer.flush(2)
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.flush(0)
    except Exception as exc:  # pragma: no cover - best effort
        log.debug("disposing of the dead-letter producer: %s", exc)
