"""Prometheus metrics of one mount (``--metrics-address HOST:PORT``); docs/metrics.md lists every metric.

Two kinds of figures, one registry (``REGISTRY``):

- Recorded as they happen, in prometheus_client's own (thread-safe) metric objects: FUSE requests by operation
  and errno with their latency (``record_request``, called by the one error boundary in hybridfs/fuse_ops.py) and
  botocore's HTTP attempts and retries (``watch_client``: a botocore event hook, which runs in S3 worker threads).
- Everything else already exists as plain counters and status figures on the mount's objects (cache, store,
  breaker, bus, consumers, services, write path), all owned by the trio thread. ``MountCollector`` turns them into
  metric families at scrape time. It does not read them from the HTTP server's thread: the scrape hands
  ``figures(mount)`` to the trio thread (``TrioToken.run_sync_soon``) and waits for the result, at most
  ``SCRAPE_TIMEOUT`` seconds. So the figures are as fresh as the scrape, read by the thread that owns them (no
  "dictionary changed size" races, no locks), and cost nothing while nobody scrapes; ``figures`` is synchronous
  and O(cache entries) at worst (``cache.usage()``). A loop too busy to answer in time yields the recorded
  metrics only, and the scrape says so in ``hybridfs_scrape_complete``.

Threads: the exporter's HTTP server runs in prometheus_client's daemon threads (one per scrape).
"""

from __future__ import annotations

import errno as errno_mod
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from hybridfs import __version__
from hybridfs.config import host_and_port

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from hybridfs.daemon import Mount

log = logging.getLogger("hybridfs.metrics")

SCRAPE_TIMEOUT = 5.0

prometheus_client.disable_created_metrics()  # no *_created series next to every counter
REGISTRY = CollectorRegistry()
prometheus_client.ProcessCollector(registry=REGISTRY)
prometheus_client.PlatformCollector(registry=REGISTRY)

FUSE_REQUESTS = Counter("hybridfs_fuse_requests", "FUSE requests answered, by operation and errno (OK: success)",
                        ["op", "errno"], registry=REGISTRY)
FUSE_SECONDS = Histogram("hybridfs_fuse_request_duration_seconds", "Time to answer a FUSE request, by operation",
                         ["op"], registry=REGISTRY,
                         buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                  1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
S3_ATTEMPTS = Counter("hybridfs_s3_http_requests", "HTTP requests sent to S3 (retries included), by S3 API operation",
                      ["operation"], registry=REGISTRY)
S3_RETRIES = Counter("hybridfs_s3_retries", "HTTP requests to S3 that were botocore retries, by S3 API operation",
                     ["operation"], registry=REGISTRY)

# Label children by (op, errno): record_request runs on the trio thread only, so a plain dict is enough.
_requests: dict[tuple[str, int], Any] = {}
_durations: dict[str, Any] = {}


def record_request(op: str, code: int, seconds: float) -> None:
    """One answered FUSE request (``code`` 0: success). Cheap: two dict lookups and two locked updates."""
    counter = _requests.get((op, code))
    if counter is None:
        name = "OK" if code == 0 else errno_mod.errorcode.get(code, str(code))
        counter = _requests[(op, code)] = FUSE_REQUESTS.labels(op=op, errno=name)
    counter.inc()
    duration = _durations.get(op)
    if duration is None:
        duration = _durations[op] = FUSE_SECONDS.labels(op=op)
    duration.observe(seconds)


def watch_client(client: Any) -> None:
    """Count every HTTP attempt a boto3 S3 client makes (retries too). The hook runs in the calling thread."""

    def created(request: Any, operation_name: str, **_: Any) -> None:
        S3_ATTEMPTS.labels(operation=operation_name).inc()
        if (request.context.get("retries") or {}).get("attempt", 1) > 1:
            S3_RETRIES.labels(operation=operation_name).inc()
        # None: botocore must not take the return value for anything.

    client.meta.events.register("request-created.s3", created, unique_id="hybridfs-metrics")


# -- the mount's own figures, read on the trio thread ----------------------------------------------------------


class Families:
    """Builds metric families by name; the label names of a family are those of its first sample."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}

    def _add(self, kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str,
             value: float | None, labels: Mapping[str, str]) -> None:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = kind(name, doc, labels=list(labels))
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        if value is not None:
            family.add_metric(list(labels.values()), float(value))

    def counter(self, name: str, doc: str, value: float | None, **labels: str) -> None:
        self._add(CounterMetricFamily, name, doc, value, labels)

    def gauge(self, name: str, doc: str, value: float | bool | None, **labels: str) -> None:
        self._add(GaugeMetricFamily, name, doc, value, labels)

    def counters(self, name: str, doc: str, label: str, values: Mapping[str, float]) -> None:
        if not values:
            self.families.setdefault(name, CounterMetricFamily(name, doc, labels=[label]))
        for key, value in sorted(values.items()):
            self.counter(name, doc, value, **{label: key})

    def info(self, name: str, doc: str, values: dict[str, str]) -> None:
        self.families[name] = InfoMetricFamily(name, doc, value=values)


def figures(mount: Mount) -> list[Metric]:
    """Every figure of ``mount`` as metric families. Trio thread only (it reads the mount's live objects)."""
    out = Families()
    cfg = mount.cfg
    out.info("hybridfs_mount", "The mount: its source (s3://BUCKET/PREFIX), mount point, cache id, version",
             {"source": cfg.source, "mountpoint": cfg.mountpoint, "cache_id": cfg.cache_id, "version": __version__})
    _cache(out, mount)
    _s3(out, mount)
    _data(out, mount)
    _events(out, mount)
    _services(out, mount)
    out.gauge("hybridfs_scrape_complete", "1: the mount's figures are in this scrape (0: its loop did not answer)",
              1)
    return list(out.families.values())


def _cache(out: Families, mount: Mount) -> None:
    cache = mount.cache
    out.gauge("hybridfs_cache_available", "1 while the cache disk works; 0: degraded to S3 only", cache.available)
    out.gauge("hybridfs_cache_used_bytes", "Bytes on the cache disk (cached files and files being removed)",
              cache.usage())
    out.gauge("hybridfs_cache_capacity_bytes", "The cache size limit (--cache-size)", cache.capacity)
    out.gauge("hybridfs_cache_files", "Files held in the cache", len(cache.entries))
    out.gauge("hybridfs_cache_pinned_files", "Files pinned in the cache (never evicted)", len(cache.pins))
    out.counter("hybridfs_cache_lookups", "Opens for reading that found the file cached (hit) or not (miss)",
                cache.hits, result="hit")
    out.counter("hybridfs_cache_lookups", "", cache.misses, result="miss")
    out.counter("hybridfs_cache_checksum_failures", "Cached blocks that failed their checksum (copy dropped)",
                cache.checksum_failures)
    out.counter("hybridfs_cache_index_rebuilds", "Times the cache index was rebuilt from the disk", cache.rebuilds)
    out.counter("hybridfs_cache_recoveries", "Times the cache came back after its disk failed", cache.recoveries)


def _s3(out: Families, mount: Mount) -> None:
    store = mount.store
    breaker = store.breaker
    out.counters("hybridfs_s3_requests", "S3 calls made by the mount (after botocore's retries: one per call), by "
                 "operation", "operation", store.calls)
    errors_doc = "S3 calls that failed (after botocore's retries), by operation and errno (ENOENT: not found)"
    out.families.setdefault("hybridfs_s3_errors", CounterMetricFamily("hybridfs_s3_errors", errors_doc,
                                                                      labels=["operation", "errno"]))
    for (operation, code), count in sorted(store.call_errors.items()):
        out.counter("hybridfs_s3_errors", errors_doc, count, operation=operation, errno=code)
    out.counter("hybridfs_s3_read_bytes", "Object bytes received from S3 (reads, read-ahead, hydrations)",
                store.bytes_read)
    out.counter("hybridfs_s3_written_bytes", "Object bytes S3 acknowledged (PUTs, parts, uploads)",
                store.bytes_written)
    out.gauge("hybridfs_s3_breaker_open", "1 while the circuit breaker holds S3 for down (calls fail at once)",
              breaker.is_open)
    out.counter("hybridfs_s3_breaker_trips", "Times the circuit breaker opened", breaker.trips)
    out.counter("hybridfs_s3_breaker_refused_calls", "Calls failed at once because the breaker was open",
                breaker.refused)
    out.gauge("hybridfs_s3_slow", "1 while S3 keeps reads waiting (stats and listings answer what the mount knows "
                                  "without waiting)", breaker.slow)
    out.counter("hybridfs_s3_breaker_released_calls", "Reads released with EIO because the breaker opened while "
                                                      "they waited for S3", breaker.released)
    out.gauge("hybridfs_s3_multipart_aborts_pending", "Multipart uploads waiting to be aborted",
              len(store.pending_aborts))
    for lane, limiter in (("bulk", store.limiter), ("metadata", store.meta_limiter)):
        out.gauge("hybridfs_s3_threads_busy", "S3 calls running, by lane (metadata: HEAD and LIST; bulk: the rest)",
                  limiter.borrowed_tokens, lane=lane)
        out.gauge("hybridfs_s3_calls_waiting", "S3 calls waiting for a thread of their lane, by lane",
                  limiter.statistics().tasks_waiting, lane=lane)


def _data(out: Families, mount: Mount) -> None:
    fs = mount.fs
    out.gauge("hybridfs_memory_budget_bytes", "The memory budget of read-ahead and write buffers",
              mount.memory.total)
    out.gauge("hybridfs_memory_used_bytes", "Bytes of the memory budget in use", mount.memory.used)
    if fs is None:
        return
    read_doc = "Bytes returned by read(), by source: cache, s3 (a miss), local (a file with unstored changes)"
    for source, count in sorted(fs.read_bytes.items()):
        out.counter("hybridfs_read_bytes", read_doc, count, source=source)
    out.counter("hybridfs_cache_teed_bytes", "Bytes of stored files that the write path also put in the cache",
                fs.writes.teed_bytes)
    out.counter("hybridfs_cache_tee_failures", "Stored files the cache could not keep a copy of (a hydrate event "
                "follows unless the file is larger than the cache)", fs.writes.tee_failures)
    out.gauge("hybridfs_open_files", "Files open through the mount", len(fs.open_files))
    out.gauge("hybridfs_uploads_in_flight", "Open files with changes that S3 does not hold yet",
              sum(1 for of in fs.open_files.values() if of.dirty))
    supervisor = getattr(mount, "supervisor", None)
    if supervisor is not None:
        out.counter("hybridfs_task_failures", "Background task failures (each logged; the mount goes on)",
                    supervisor.failures)
        out.counter("hybridfs_task_restarts", "Background services restarted after a failure", supervisor.restarts)


def _events(out: Families, mount: Mount) -> None:
    bus = mount.bus
    out.gauge("hybridfs_events_enabled", "1 when the mount uses Kafka (0: --no-events)", bus is not None)
    if bus is not None:
        stats = bus.stats()
        out.counter("hybridfs_events_published", "Events handed to the bus", stats.published)
        out.counter("hybridfs_events_produced", "Events Kafka acknowledged", stats.produced)
        out.counter("hybridfs_events_delivery_failures", "Failed delivery attempts (retried from the outbox)",
                    stats.failed)
        out.gauge("hybridfs_events_outbox", "Events waiting to be delivered (outbox and memory)", stats.outbox)
        out.gauge("hybridfs_events_in_flight", "Events handed to librdkafka, not yet acknowledged", stats.in_flight)
        _reachable(out, "producer", stats.reachable)
    services = getattr(mount, "services", None)
    for consumer in (services.hydrate_consumer, services.evict_consumer) if services is not None else ():
        if consumer is None:
            continue
        c = consumer.stats()
        labels = {"consumer": consumer.name, "topic": consumer.topic}
        out.counter("hybridfs_events_received", "Events received from Kafka", c.received, **labels)
        out.counter("hybridfs_events_consumed", "Events handled (their offsets may be committed)", c.handled,
                    **labels)
        out.counter("hybridfs_events_dead_lettered", "Events set aside on the dead-letter topic", c.dead_lettered,
                    **labels)
        out.counter("hybridfs_events_handler_failures", "Handler failures (the event is retried)",
                    c.handler_failures, **labels)
        out.gauge("hybridfs_events_in_progress", "Events received and not finished", c.in_progress, **labels)
        out.gauge("hybridfs_consumer_lag_messages", "Messages on the topic this consumer group has not consumed",
                  c.lag, **labels)
        _reachable(out, consumer.name, c.reachable)


def _reachable(out: Families, client: str, reachable: bool | None) -> None:
    out.gauge("hybridfs_kafka_reachable", "1 while this Kafka client reaches the brokers (absent: not known yet)",
              reachable, client=client)


def _services(out: Families, mount: Mount) -> None:
    services = getattr(mount, "services", None)
    if services is None:
        return
    hydrator, purger, planner = services.hydrator, services.purger, services.planner
    out.counters("hybridfs_hydrations", "Hydrate events handled, by outcome", "outcome", hydrator.outcomes)
    out.counter("hybridfs_hydrated_bytes", "Bytes copied from S3 into the cache by the hydrator",
                hydrator.bytes_hydrated)
    out.counters("hybridfs_purges", "Evict events handled, by outcome", "outcome", purger.outcomes)
    out.counter("hybridfs_purged_bytes", "Bytes freed in the cache by the purger", purger.bytes_freed)
    out.counter("hybridfs_purge_uploads", "Files uploaded before their eviction (S3 did not hold the same bytes)",
                purger.uploads)
    out.counters("hybridfs_evictions_requested", "Evictions the planner asked for, by reason", "reason",
                 planner.published)
    out.gauge("hybridfs_evictions_pending", "Evictions asked for and not yet settled", len(planner.requested))
    out.counter("hybridfs_local_purges", "Evictions applied locally (Kafka down or --no-events)",
                planner.local_purges)
    if planner.disk is not None:
        out.gauge("hybridfs_cache_disk_free_bytes", "Free bytes on the cache's file system", planner.disk.free)
        out.gauge("hybridfs_cache_disk_size_bytes", "Size of the cache's file system", planner.disk.total)
    last = services.census.last
    if last is not None:  # counted in the background by the census (every 10 min, or when the status is asked)
        out.gauge("hybridfs_census_age_seconds", "Age of the last census of the bucket (the figures below)",
                  trio.current_time() - last.at)
        out.gauge("hybridfs_bucket_files", "Files under the mount's prefix in S3 (last census)", last.files)
        out.gauge("hybridfs_bucket_bytes", "Bytes under the mount's prefix in S3 (last census)", last.bytes)
        out.gauge("hybridfs_cloud_only_files", "Files in S3 that the cache does not hold (last census)",
                  max(0, last.files - len(mount.cache.entries)))


# -- the exporter -------------------------------------------------------------------------------------------------


class MountCollector(Collector):
    """Collects ``figures(mount)`` on the mount's trio thread at each scrape (see the module docstring)."""

    def __init__(self, mount: Mount) -> None:
        self.mount = mount
        self.token: trio.lowlevel.TrioToken | None = None  # set once the mount's trio loop runs

    def describe(self) -> list[Metric]:
        return []  # the families depend on the mount's state; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        token = self.token
        if token is None:
            yield from _incomplete()
            return
        try:
            yield from on_trio_thread(token, lambda: figures(self.mount), SCRAPE_TIMEOUT)
        except (trio.RunFinishedError, TimeoutError) as exc:
            log.debug("scrape without the mount's figures: %s", exc or type(exc).__name__)
            yield from _incomplete()
        except Exception:  # a bug in figures(): logged, and the scrape still answers
            log.exception("collecting the mount's figures failed")
            yield from _incomplete()


def _incomplete() -> Iterable[Metric]:
    return [GaugeMetricFamily("hybridfs_scrape_complete", "1: the mount's figures are in this scrape (0: its "
                              "loop did not answer)", value=0)]


def on_trio_thread(token: trio.lowlevel.TrioToken, fn: Callable[[], list[Metric]], timeout: float) -> list[Metric]:
    """Run synchronous ``fn`` on the trio thread of ``token`` and return its result; TimeoutError after
    ``timeout`` seconds (the job then still runs once, later, and its result is dropped)."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def job() -> None:
        try:
            box["value"] = fn()
        except Exception as exc:  # a bug in figures(): the scrape fails with it, the mount goes on
            box["error"] = exc
        finally:
            done.set()

    token.run_sync_soon(job)
    if not done.wait(timeout):
        raise TimeoutError(f"the mount's loop did not answer within {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


class Exporter:
    """The HTTP endpoint: ``start`` binds it (OSError when the address cannot be used), ``run`` runs the mount
    with the collector attached to its trio loop, ``close`` stops it."""

    def __init__(self, mount: Mount, server: WSGIServer, thread: threading.Thread) -> None:
        self.collector = MountCollector(mount)
        self.server = server
        self.thread = thread
        REGISTRY.register(self.collector)

    @classmethod
    def start(cls, address: str, mount: Mount) -> Exporter:
        host, port = host_and_port(address, "metrics_address")
        server, thread = prometheus_client.start_http_server(port, host, registry=REGISTRY)
        watch_client(mount.store.client)
        log.info("serving Prometheus metrics on http://%s/metrics", address)
        return cls(mount, server, thread)

    async def run(self, main: Callable[[], Any]) -> None:
        self.collector.token = trio.lowlevel.current_trio_token()
        await main()

    def close(self) -> None:
        REGISTRY.unregister(self.collector)
        self.server.shutdown()
        self.server.server_close()
