"""The mount's background services: hydrator, eviction planner, purger (and the census for the status).

::

    <prefix>.hydrate --EventConsumer(group hybridfs-hydrate-<cache id>-<prefix>)--> Hydrator --S3--> cache
    cache usage --Planner (every evict_interval)--> bus.publish(evict events) --> <prefix>.evict
    <prefix>.evict  --EventConsumer(group hybridfs-evict-<cache id>-<prefix>)--> Purger --(S3 check/upload)--> cache

They sit above the tiers and the core and below the composition root, which calls :func:`start_all` once the
filesystem exists and merges :meth:`Services.status` into the mount's status. Every service runs in the
mount's nursery and ends when it is cancelled.

Without events (``--no-events``) the planner and the purger still run: the planner hands its decisions to the
purger directly (no consumers are started), so the cache keeps its bound; the same happens with a bus that has
been down for ``--local-evict-after`` seconds (see :mod:`hybridfs.services.planner`).
"""

from __future__ import annotations

import dataclasses
import stat as stat_mod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybridfs.events.bus import EventBus
from hybridfs.events.consumer import EventConsumer
from hybridfs.events.schema import topic_names
from hybridfs.keylocks import KeyLocks
from hybridfs.services.antientropy import AntiEntropy
from hybridfs.services.census import Census
from hybridfs.services.common import FilesystemHooks
from hybridfs.services.feed import FeedPublisher, FeedService
from hybridfs.services.hydrator import Hydrator
from hybridfs.services.planner import Planner, PlannerSettings
from hybridfs.services.purger import Purger, PurgerSettings

if TYPE_CHECKING:
    from hybridfs.core.filesystem import Filesystem
    from hybridfs.daemon import Mount
    from hybridfs.tasks import Supervisor

__all__ = ["PURGE_CONCURRENCY", "Services", "hydrate_concurrency", "start_all"]

# Hydrations at once: three quarters of the mount's S3 threads (--s3-threads, default 16 -> 12), so the rest stays
# free for reads and writes. A hydration is latency-bound (one GET per small object), so this sets its throughput.
HYDRATE_SHARE_OF_S3_THREADS = 0.75
# Purges at once: each holds an S3 thread only for its HEAD (a few ms), so half the default 16 leaves reads and
# writes their share; 4 held `hybridfs evict` of a directory to a chain of waits (16 buffered, 4 in progress).
PURGE_CONCURRENCY = 8


@dataclass
class Services:
    planner: Planner
    hydrator: Hydrator
    purger: Purger
    hydrate_consumer: EventConsumer | None  # None: events are off
    evict_consumer: EventConsumer | None
    census: Census
    feed: FeedService | None = None  # None: events are off
    antientropy: AntiEntropy | None = None  # None: events are off, or --max-stale 0

    def status(self) -> dict[str, Any]:
        """Merged into the mount's status (``user.hybridfs.status`` on the mount root)."""
        self.census.poke()
        hydrator, purger = self.hydrator.status(), self.purger.status()
        if self.hydrate_consumer is not None:
            hydrator["consumer"] = dataclasses.asdict(self.hydrate_consumer.stats())
        if self.evict_consumer is not None:
            purger["consumer"] = dataclasses.asdict(self.evict_consumer.stats())
        extra: dict[str, Any] = {"feed": self.feed.status()} if self.feed is not None else {}
        if self.antientropy is not None:
            extra["antientropy"] = self.antientropy.status()
        return {
            **extra,
            "services": {
                "hydrator": hydrator,
                "purger": purger,
                "planner": self.planner.status(),
                "census": self.census.status(),
            }
        }


def hydrate_concurrency(s3_threads: int) -> int:
    return max(1, int(s3_threads * HYDRATE_SHARE_OF_S3_THREADS))


async def start_all(nursery: Supervisor, mount: Mount, fs: Filesystem) -> Services:
    """Build the services of ``mount`` and start them in ``nursery``; returns them for the status."""
    cfg = mount.cfg
    bus = mount.bus
    topics = topic_names(cfg.topic_prefix)
    hooks = FilesystemHooks(fs)
    locks: KeyLocks[str] = KeyLocks()
    consumers: list[EventConsumer] = []  # set below, read by the planner's bus_reachable
    planner = Planner(
        mount.cache,
        PlannerSettings(high_watermark=cfg.high_watermark, low_watermark=cfg.low_watermark, min_free=cfg.min_free,
                        max_age=cfg.max_age, interval=cfg.evict_interval,
                        dedupe_window=max(30.0, 10 * cfg.evict_interval), local_after=cfg.local_evict_after,
                        local_concurrency=PURGE_CONCURRENCY),
        bus.publish if bus is not None else None, mount.origin, hooks.is_open,
        bus_reachable=(lambda: evictions_reachable(bus, consumers)) if bus is not None else None,
    )
    hydrator = Hydrator(mount.store, mount.cache, planner, locks)
    purger = Purger(mount.store, mount.cache, hooks, planner, locks, mount.origin, mount.keys.prefix,
                    PurgerSettings(default_mode=stat_mod.S_IFREG | cfg.file_mode, default_uid=cfg.uid,
                                   default_gid=cfg.gid, preserved_size=cfg.preserved_size,
                                   preserved_age=cfg.preserved_age))
    planner.purge, planner.hydrate = purger.handle, hydrator.handle
    census = Census(mount.store, mount.keys.prefix)
    if bus is None:
        await nursery.start(planner.run)
        await nursery.start(purger.run)
        await nursery.start(census.run)
        return Services(planner, hydrator, purger, None, None, census)
    common: dict[str, Any] = {"allowed_prefix": mount.keys.prefix, "dead_letter_topic": topics.dead_letter,
                              "kafka_config": cfg.kafka_options}
    # One group per cache and topic prefix: a static member (group.instance.id) that comes back with another
    # subscription keeps its old assignment until the coordinator rebalances (about a minute), so a remount of
    # the same cache under another --topic-prefix would consume nothing for that long.
    hydrate_group = f"hybridfs-hydrate-{cfg.cache_id}-{cfg.topic_prefix}"
    evict_group = f"hybridfs-evict-{cfg.cache_id}-{cfg.topic_prefix}"
    hydrate_consumer = EventConsumer(cfg.kafka, topics.hydrate, hydrate_group, hydrator.handle,
                                            instance_id=hydrate_group, concurrency=hydrate_concurrency(cfg.s3_threads),
                                            name="hydrator", **common)
    evict_consumer = EventConsumer(cfg.kafka, topics.evict, evict_group, purger.handle,
                                          instance_id=evict_group, concurrency=PURGE_CONCURRENCY, name="purger",
                                          **common)
    consumers.append(evict_consumer)
    await nursery.start(planner.run)
    await nursery.start(purger.run)
    await nursery.start(hydrate_consumer.run)
    await nursery.start(evict_consumer.run)
    await nursery.start(census.run)
    feed_group = f"hybridfs-changes-{cfg.cache_id}-{cfg.topic_prefix}"
    feed = FeedService(fs, bootstrap=cfg.kafka, topic_prefix=cfg.topic_prefix, group=feed_group,
                       origin=mount.origin, dead_letter_topic=topics.dead_letter, kafka_config=cfg.kafka_options,
                       publisher=fs.changes if isinstance(fs.changes, FeedPublisher) else None,
                       index_path=mount.state_dir / "feed-index.sqlite")
    fs.ns.trusted = feed.trusted
    await nursery.start(feed.run)
    # Trusted mode's bound (--max-stale): it reads fs.ns.trusted at each pass, so the S3 event records' health,
    # added to it later by the mount, counts too.
    antientropy = AntiEntropy(fs, cfg.max_stale) if cfg.max_stale > 0 else None
    if antientropy is not None:
        await nursery.start(antientropy.run, name="anti-entropy")
    return Services(planner, hydrator, purger, hydrate_consumer, evict_consumer, census, feed, antientropy)


def evictions_reachable(bus: EventBus, consumers: list[EventConsumer]) -> bool | None:
    """Whether evictions travel through Kafka: the producer and the evict consumer both reach it (False when
    either does not; None while not known)."""
    states = [bus.stats().reachable, *(c.stats().reachable for c in consumers)]
    if False in states:
        return False
    return True if all(states) else None
