"""Kafka plumbing shared by the producer, the consumers and the admin client: client settings, librdkafka's
log lines routed to Python logging, what counts as "Kafka unreachable", and the creation of the three topics.

Topic creation never stops a mount: :class:`TopicCreator` is a service that tries in a thread, retries with
the retry policy (hybridfs/retry.py) while Kafka cannot be reached, and ends once the topics exist — or, when
Kafka refuses for good (authorization, policy), with one WARNING.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import trio
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from hybridfs.events.schema import Topics
from hybridfs.retry import Policy, Retrying, is_temporary

__all__ = [
    "KafkaUnavailable",
    "RdKafkaLogger",
    "TopicCreator",
    "client_config",
    "create_topics",
    "is_unreachable_error",
]

log = logging.getLogger("hybridfs.events.topics")
rdkafka_log = logging.getLogger("hybridfs.events.rdkafka")


class KafkaUnavailable(Exception):
    """Kafka could not be reached (or did not answer) within the time allowed."""


# Error codes that mean "cannot talk to Kafka right now" rather than "Kafka said no".
_UNREACHABLE_CODES = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._TIMED_OUT,
        KafkaError._MSG_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    }
)


def is_unreachable_error(err: KafkaError | None) -> bool:
    return err is not None and err.code() in _UNREACHABLE_CODES


# librdkafka log lines about things that come and go on their own. Our own code reports an outage once (and
# its end once), so these are DEBUG: a log line per reconnect attempt is noise.
_TRANSIENT_MARKERS = (
    "coordinator load in progress",
    "not found in cache",  # "new leader-1 not found in cache" right after a broker restart
    "coordinator_load_in_progress",
    "coordinator is loading",
    "not coordinator",
    "connection refused",
    "connect to ",
    "disconnected",
    "timed out",
    "all broker connections are down",
    "brokers are down",
    "broker transport failure",
    "failed to resolve",
    "no route to host",
    "connection reset",
    "network is unreachable",
    "leader not available",
    "identical to last error",
)
_TRANSIENT_FACILITIES = frozenset({"FAIL", "BROKERFAIL", "REQTMOUT", "FETCHERR", "COORDERR"})


class RdKafkaLogger:
    """Receives librdkafka's log lines (the ``logger`` client setting) and passes them to Python logging.

    confluent-kafka calls ``log(level, "%s [%s] %s", facility, client_name, text)`` from the thread that polls
    the client. Transient connection and coordinator chatter goes down to DEBUG; the rest keeps its level.
    It must never raise: an exception here would surface inside ``poll()``.
    """

    def __init__(self, logger: logging.Logger = rdkafka_log) -> None:
        self._logger = logger

    def log(self, level: int, fmt: str, *args: Any) -> None:
        try:
            facility = str(args[0]) if args else ""
            text = str(args[-1]).lower() if args else fmt.lower()
            if level >= logging.WARNING and (
                facility in _TRANSIENT_FACILITIES or any(m in text for m in _TRANSIENT_MARKERS)
            ):
                level = logging.DEBUG
            if self._logger.isEnabledFor(level):
                self._logger.log(level, fmt, *args)
        except Exception:  # pragma: no cover - logging must not break the client
            pass


def client_config(
    bootstrap: str,
    kafka_config: Mapping[str, Any] | None,
    *,
    client_id: str,
    logger: RdKafkaLogger | None = None,
    defaults: Mapping[str, Any] | None = None,
    forced: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Settings for one librdkafka client: ``defaults`` < the user's ``kafka_config`` (TLS, SASL, tuning) <
    ``forced`` (what our guarantees depend on). A user setting that ``forced`` overrides is logged (WARNING).
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        # Idle connections closed by the broker are routine; don't log them.
        "log.connection.close": False,
        # Reconnect quickly once Kafka is back (librdkafka's default backs off up to 10 s).
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 2000,
        "logger": logger or RdKafkaLogger(),
    }
    conf.update(defaults or {})
    for k, v in (kafka_config or {}).items():
        conf[k] = v
    for k, v in (forced or {}).items():
        if k in (kafka_config or {}) and str((kafka_config or {})[k]).lower() != str(v).lower():
            log.warning("kafka setting %s=%s ignored: hybridfs needs %s=%s", k, (kafka_config or {})[k], k, v)
        conf[k] = v
    return conf


def _error_of(exc: BaseException) -> KafkaError | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def create_topics(
    bootstrap: str,
    topics: Topics | Iterable[str],
    kafka_config: Mapping[str, Any] | None = None,
    *,
    partitions: int = 3,
    timeout: float = 10.0,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet (blocking; run it in a thread from trio code).

    Returns the names it created. A topic that already exists is fine. Raises :class:`KafkaUnavailable` when
    Kafka cannot be reached within ``timeout`` seconds, :class:`KafkaException` when Kafka refuses.
    """
    names = list(topics)
    conf = client_config(bootstrap, kafka_config, client_id="hybridfs-admin")
    admin = AdminClient(conf)
    new = [NewTopic(name, num_partitions=partitions, replication_factor=-1, config=dict((configs or {}).get(name, {})))
           for name in names]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    created: list[str] = []
    first_error: BaseException | None = None
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout + 5)
            created.append(name)
        except KafkaException as exc:
            err = _error_of(exc)
            if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            if err is not None and is_unreachable_error(err):
                first_error = first_error or KafkaUnavailable(f"kafka unreachable at {bootstrap}: {err.str()}")
            else:
                first_error = first_error or exc
        except TimeoutError:
            first_error = first_error or KafkaUnavailable(
                f"kafka unreachable at {bootstrap}: no answer within {timeout:g}s"
            )
    admin.poll(0)  # serve queued log lines
    if first_error is not None:
        raise first_error
    for name in created:
        log.info("created kafka topic %s", name)
    return created


class TopicCreator:
    """A service that makes sure the topics exist. Never fatal: Kafka being down is retried, a refusal logged.

    ``await nursery.start(TopicCreator(...).run)`` returns at once; the task ends (``done``) when the topics exist
    or Kafka refused to create them.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Topics | Iterable[str],
        kafka_config: Mapping[str, Any] | None = None,
        *,
        partitions: int = 3,
        configs: Mapping[str, Mapping[str, str]] | None = None,
        attempt_timeout: float = 10.0,
        max_backoff: float = 60.0,
        limiter: trio.CapacityLimiter | None = None,
        unreachable_level: int = logging.WARNING,
    ) -> None:
        self.bootstrap = bootstrap
        # Kafka unreachable: INFO at once, then WARNING when it persists; with ``unreachable_level`` INFO (the bus
        # reports the outage itself), never WARNING.
        self.policy = Policy(first=1.0, cap=max_backoff, info_at=1,
                             warn_at=4 if unreachable_level >= logging.WARNING else None)
        self.topics = list(topics)
        self.configs = dict(configs or {})  # topic name -> its topic settings (cleanup.policy=compact)
        self.kafka_config = dict(kafka_config or {})
        self.partitions = partitions
        self.attempt_timeout = attempt_timeout
        self.limiter = limiter or trio.CapacityLimiter(1)
        self.done = trio.Event()

    def _attempt(self) -> list[str]:
        return create_topics(
            self.bootstrap,
            self.topics,
            self.kafka_config,
            partitions=self.partitions,
            timeout=self.attempt_timeout,
            configs=self.configs,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        names = ", ".join(self.topics)
        retry = Retrying(self.policy, log, f"cannot create kafka topics {names} at {self.bootstrap}",
                         recovered=f"kafka topics {names} exist now")
        while True:
            try:
                # Abandoned on cancel: an admin request can take attempt_timeout, and its outcome no longer
                # matters once we stop.
                await trio.to_thread.run_sync(self._attempt, limiter=self.limiter, abandon_on_cancel=True)
            except (KafkaUnavailable, KafkaException) as exc:
                if not is_temporary(exc):  # refused (authorization, policy, replication factor): say it once, stop
                    log.warning("cannot create kafka topics %s at %s: %s (not retrying; create them, or let the "
                                "broker create them on first use)", names, self.bootstrap, exc)
                    self.done.set()  # done trying: a missing topic is now worth a warning of the producer
                    return
                await retry.wait(exc)
                continue
            retry.succeeded()
            log.debug("kafka topics %s exist", names)
            self.done.set()
            return
