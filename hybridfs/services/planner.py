"""The eviction planner: watches the cache against its limits and publishes evict events for cold files.

Every ``interval`` seconds (and at once when a hydration is waiting for room) it looks at the cache:

* **watermarks** — usage above ``high_watermark x capacity``: evict down to ``low_watermark x capacity``;
* **disk** — less than ``min_free`` of the cache disk free: evict until that much (plus 1% of the disk) is free,
  but only when evicting can restore it: a disk filled by others beyond what the cache holds is not the cache's
  to fix, and emptying the cache for it would only lose the cached files (logged once per episode). Nor does
  the cache give others more than ``min_free`` (plus 1%) of the disk (what they took since the disk first went
  short, until the cache has its files back): beyond that, a file that grows slowly would take the whole cache a
  few MiB at a time;
* **room** — hydrations waiting for space: evict until their bytes fit under the capacity;
* **max age** — files not read for ``max_age`` seconds go, whatever the usage (reason ``max-age``).

Candidates are the least recently used entries that are not pinned and not open. The planner does not purge
anything itself: it publishes evict events (reason ``watermark`` or ``max-age``) on the bus, and the purger
decides again when it consumes them (the file may have been read or opened in between). Evictions already
requested and not yet settled are remembered for ``dedupe_window`` seconds: they count as freed when the next
round projects usage, and are not published again.

**Bounded without Kafka.** The cache's bound must not depend on the bus. With events off (``--no-events``) every
decision is handed straight to the purger (``purge``, the same code the consumer calls). With a bus, decisions
go local when it has been unreachable (producer or evict consumer) for ``local_after`` seconds, or when an
eviction it was given has waited that long without being settled (a consumer that is stuck or far behind):
then the waiting evictions and every new one are purged here too, still published for audit (they wait in the
outbox). When the bus answers again and nothing waits too long, the planner goes back to the bus. A purge
that arrives twice (here, then from Kafka) finds nothing to do the second time.

**Pressure evictions are undone.** Files evicted while the disk was short because others use more of it than
when it last had ``min_free`` free (not because the cache grew: then ``min_free`` is the cache's bound) are
remembered (key, ETag, size, last
access; in memory only, the most recently used ``remember`` of them: a restart forgets them). Once the disk has
``min_free`` (plus the slack) free again and usage is under the low watermark, they are hydrated again, most
recently used first, only as many as fit under both (reason ``pressure-return``; published on the bus, or handed
to the hydrator directly without events). Hydrations asked and not yet cached count as used until they arrive or
``dedupe_window`` passes, so a round does not ask for the same room twice.

State: all of it belongs to the trio thread.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from hybridfs.events.schema import Event
from hybridfs.tiers.cache import CacheEntry, LocalCache

log = logging.getLogger("hybridfs.services.planner")

DISK_SLACK = 0.01  # of the disk, freed beyond min_free so a disk under pressure is not re-planned every round


@dataclass(frozen=True)
class PlannerSettings:
    high_watermark: float = 0.90
    low_watermark: float = 0.75
    min_free: float = 0.05
    max_age: float = 0.0  # 0: off
    interval: float = 2.0
    dedupe_window: float = 60.0
    growth_check: float = 0.02  # seconds between checks for new cache entries (between rounds)
    local_after: float = 30.0  # seconds evictions may wait for the bus before they are purged here
    local_concurrency: int = 4  # purges at once when applied locally
    remember: int = 10_000  # pressure evictions remembered for hydrating them again (the most recently used)


@dataclass(frozen=True)
class DiskSpace:
    free: int
    total: int


@dataclass(frozen=True)
class Evicted:
    """A file evicted while the cache disk was short of space, to hydrate again once the space returns."""

    key: str
    etag: str
    size: int
    last_access: float


@dataclass
class Plan:
    """One round's decision: what to evict and why (for the log line and the tests)."""

    watermark: list[CacheEntry]
    max_age: list[CacheEntry]
    usage: int
    projected: int  # usage minus what is already requested, before this round's evictions
    target: int | None  # usage the watermark evictions aim for (None: no size pressure)
    why: str
    short: bool = False  # not enough evictable files to reach the target (pinned or open)
    pressure: bool = False  # the disk's shortage asked for more than the watermarks would (remembered)
    others: int = 0  # bytes the disk is short that evicting the whole cache could not restore (not evicted)


class Planner:
    def __init__(
        self,
        cache: LocalCache,
        settings: PlannerSettings,
        publish: Callable[[Event], None] | None,
        origin: str,
        is_open: Callable[[str], bool],
        *,
        clock: Callable[[], float] = time.time,
        bus_reachable: Callable[[], bool | None] | None = None,
    ) -> None:
        self.cache = cache
        self.settings = settings
        self.publish = publish  # None: events are off, every decision is purged here
        # Whether the bus delivers evictions (None: not known yet); watched to decide when to purge locally.
        self.bus_reachable = bus_reachable
        # The purger's handler, for decisions taken locally (set by whoever builds the purger).
        self.purge: Callable[[Event], Awaitable[None]] | None = None
        # The hydrator's handler, for pressure evictions undone without a bus (set by whoever builds it).
        self.hydrate: Callable[[Event], Awaitable[None]] | None = None
        self.pressure_evicted: dict[str, Evicted] = {}  # evicted under disk pressure, not hydrated again yet
        self.returning: dict[str, tuple[str, int, float]] = {}  # hydrations asked: key -> (etag, size, when)
        self.returned = 0  # pressure evictions asked to hydrate again
        self._others_logged = False  # "others fill the disk" said for this episode
        # What others use of the cache disk (total - free - cache usage) when it last had min_free free, and
        # whether they use more now: a shortage they caused is pressure; one the cache caused is its bound.
        self._others_before: int | None = None
        self._others_grew = False
        self._others_now = 0
        self._given_from: int | None = None  # others' use when the disk first went short (None: nothing given)
        self.unsent: dict[str, Event] = {}  # requested through the bus and not purged locally (yet)
        self.local_purges = 0
        self.local_since: float | None = None  # trio time the planner went local (None: the bus carries them)
        self._down_since: float | None = None
        self._local_limiter = trio.CapacityLimiter(settings.local_concurrency)
        self._nursery: trio.Nursery | None = None
        self.origin = origin
        self.is_open = is_open
        self.clock = clock
        self.requested: dict[str, tuple[str, int, float]] = {}  # key -> (etag, size, trio time requested)
        self.wanted: dict[int, int] = {}  # hydrations waiting for room: token -> bytes
        self.reserved = 0  # bytes of hydrations granted room and still downloading (kept by the hydrator)
        self.disk: DiskSpace | None = None
        self._usage_at_disk = 0  # cache usage when ``disk`` was measured
        self._next_token = 0
        self._wake = trio.Event()
        self._changed = trio.Event()
        self.rounds = 0
        self.published = {"watermark": 0, "max-age": 0}
        self.pressure_rounds = 0
        self.unsatisfied_rounds = 0  # rounds that could not find enough to evict (all pinned or open)
        self._episode = 0  # evictions asked since usage went over a limit (0: within limits)

    # -- the service ----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if self.publish is None:
                log.info("events are off: the eviction planner's decisions are purged locally")
            nursery.start_soon(self._watch_growth)
            while True:
                try:
                    await self.round()
                except Exception:
                    log.exception("eviction planning failed; trying again in %.1fs", self.settings.interval)
                with trio.move_on_after(self.settings.interval):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _watch_growth(self) -> None:
        """Between rounds, react within ``growth_check`` seconds to new files taking the cache over the high
        watermark (writes tee into the cache much faster than a 2 s round): the number of entries is an O(1)
        hint, usage is summed only when it changed."""
        seen = len(self.cache.entries)
        while True:
            await trio.sleep(min(self.settings.growth_check, self.settings.interval))
            count = len(self.cache.entries)
            if count > seen:
                self.wake_if_over()
            seen = count

    def wake(self) -> None:
        """Plan now rather than at the next tick."""
        self._wake.set()

    def wake_if_over(self) -> None:
        """Something was added to the cache: plan now if that took it over the high watermark, or (estimated
        from the last statvfs and what was added since, without a system call) the disk under ``min_free``."""
        usage = self.cache.usage()
        disk = self.disk
        if usage > self.settings.high_watermark * self.cache.capacity or (
                disk is not None and disk.total > 0
                and disk.free - (usage - self._usage_at_disk) < self.settings.min_free * disk.total):
            self.wake()

    # -- room for hydrations --------------------------------------------------------------------------------

    def want_room(self, size: int) -> int:
        """A hydration of ``size`` bytes waits for room; returns a token for :meth:`drop_want`."""
        self._next_token += 1
        self.wanted[self._next_token] = size
        self.wake()
        return self._next_token

    def drop_want(self, token: int) -> None:
        self.wanted.pop(token, None)

    def settled(self, key: str) -> None:
        """The purger is done with an evict event for ``key`` (purged or not): plan it again if need be."""
        self.requested.pop(key, None)
        self.unsent.pop(key, None)
        self.notify_changed()

    def notify_changed(self) -> None:
        """Cache usage changed (a purge): wake whoever waits in :meth:`wait_changed`."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Until the next purge (callers bound it with a cancel scope)."""
        await self._changed.wait()

    # -- one round ------------------------------------------------------------------------------------------

    async def round(self) -> Plan | None:
        self.rounds += 1
        self._forget_settled()
        if not self.cache.available:
            return None
        self.disk = await self._disk_space()
        self._usage_at_disk = self.cache.usage()
        self._watch_others()
        if self._go_local():
            for event in list(self.unsent.values()):  # waited for the bus long enough
                self._purge_locally(event)
        plan = self.plan()
        if plan.short:
            self.unsatisfied_rounds += 1
        if self._episode and plan.target is None:
            log.info("cache usage %s of %s is within its limits again (%d evictions asked)", _size(plan.usage),
                     _size(self.cache.capacity), self._episode)
            self._episode = 0
        self._log_others(plan)
        if plan.watermark or plan.max_age:
            self._publish(plan)
        if plan.pressure:
            self._remember(plan.watermark)
        elif plan.target is None and not plan.others:
            self._give_back()
        return plan

    def _forget_settled(self) -> None:
        """Requests whose entry went away (or changed version), and requests older than the dedupe window."""
        now = trio.current_time()
        for key, (etag, _size, when) in list(self.requested.items()):
            entry = self.cache.entries.get(key)
            if entry is None or entry.etag != etag or now - when > self.settings.dedupe_window:
                del self.requested[key]
                self.unsent.pop(key, None)

    async def _disk_space(self) -> DiskSpace | None:
        root = self.cache.root
        try:
            st = await trio.to_thread.run_sync(os.statvfs, root, limiter=self.cache.limiter)
        except OSError as exc:
            log.debug("statvfs %s: %s", root, exc)
            return None
        return DiskSpace(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)

    def plan(self) -> Plan:
        """What to evict now (pure: no I/O, no publishing)."""
        s = self.settings
        cap = self.cache.capacity
        usage = self.cache.usage()
        pending = sum(size for key, (etag, size, _) in self.requested.items()
                      if (e := self.cache.entries.get(key)) is not None and e.etag == etag)
        projected = usage - pending
        wanted = sum(self.wanted.values())

        to_free = 0
        reasons = []
        if usage > s.high_watermark * cap:
            to_free = max(to_free, projected - math.floor(s.low_watermark * cap))
            reasons.append(f"usage {usage / cap:.0%} of {_size(cap)} is above the high watermark "
                           f"{s.high_watermark:.0%}")
        if wanted and projected + self.reserved + wanted > cap:
            to_free = max(to_free, projected + self.reserved + wanted - math.floor(s.low_watermark * cap))
            reasons.append(f"{_size(wanted)} of hydrations wait for room")
        disk = self.disk
        busy = self._busy
        pressure = False
        others = 0
        if disk is not None and disk.total > 0 and disk.free < s.min_free * disk.total:
            # Requested evictions have not freed their bytes yet: count them as freed here too.
            short = int((s.min_free + DISK_SLACK) * disk.total) - disk.free - pending
            if short > projected or (self._others_grew
                                     and self._given() + short > (s.min_free + DISK_SLACK) * disk.total):
                # Others fill the disk: emptying the cache would not restore min_free, or the cache has already
                # given others' growth what min_free promises them (a file growing slowly would otherwise take
                # the whole cache a few MiB at a time).
                others = short
            else:
                pressure = short > to_free and self._others_grew
                to_free = max(to_free, short)
                reasons.append(f"the cache disk has {disk.free / disk.total:.1%} free, under {s.min_free:.0%}")
        target = projected - to_free if reasons else None

        watermark: list[CacheEntry] = []
        short = False
        if to_free > 0:
            freed = 0
            for entry in self.cache.coldest(busy):
                if freed >= to_free:
                    break
                watermark.append(entry)
                freed += entry.size
            short = freed < to_free
        max_age: list[CacheEntry] = []
        if s.max_age > 0:
            oldest = self.clock() - s.max_age
            chosen = {e.key for e in watermark}
            for entry in self.cache.coldest(busy):
                if entry.last_access >= oldest:
                    break  # coldest first: the rest are younger
                if entry.key not in chosen:
                    max_age.append(entry)
        return Plan(watermark=watermark, max_age=max_age, usage=usage, projected=projected, target=target,
                    why="; ".join(reasons), short=short, pressure=pressure, others=others)

    def _busy(self, key: str) -> bool:
        return key in self.requested or self.is_open(key)

    # -- pressure evictions, undone -------------------------------------------------------------------------

    def _watch_others(self) -> None:
        disk = self.disk
        if disk is None or disk.total <= 0:
            return
        others = disk.total - disk.free - self._usage_at_disk
        short = disk.free < self.settings.min_free * disk.total
        if not short:
            self._others_before = others
        self._others_now = others
        if short and self._given_from is None:
            self._given_from = others
        elif not short and not self.pressure_evicted and not self.returning:
            self._given_from = None  # nothing owed any more: the next shortage starts afresh
        elif self._given_from is not None:
            self._given_from = min(self._given_from, others)  # others shrank: what they took shrank too
        # Files round up to blocks on disk: a little growth of "others" is the cache's own; 1% of the disk is not.
        self._others_grew = self._others_before is None or others > self._others_before + DISK_SLACK * disk.total

    def _given(self) -> int:
        """What others have taken of the disk since it first went short of min_free (and the cache began to
        give way), while the cache has not got its files back. Measured on the disk, not summed from
        evictions: the cache's own files being written count as others for a moment, and a sum of evictions
        would keep them."""
        return 0 if self._given_from is None else max(0, self._others_now - self._given_from)

    def _log_others(self, plan: Plan) -> None:
        """Once per episode: the disk is short, and not because of the cache."""
        if not plan.others:
            self._others_logged = False
            return
        if self._others_logged or self.disk is None:
            return
        self._others_logged = True
        log.info("the cache disk has %s free, under --min-free %.0f%%, short by %s: more than the cache could "
                 "free (%s cached) or than it gives others (--min-free, %s given), so others fill it; not evicting "
                 "for it", _size(self.disk.free), 100 * self.settings.min_free, _size(plan.others),
                 _size(plan.usage), _size(self._given()))

    def _remember(self, entries: list[CacheEntry]) -> None:
        """Evicted under disk pressure: hydrate them again once the space returns (the most recent only)."""
        for entry in entries:
            self.pressure_evicted[entry.key] = Evicted(entry.key, entry.etag, entry.size, entry.last_access)
            self.returning.pop(entry.key, None)
        excess = len(self.pressure_evicted) - self.settings.remember
        if excess > 0:
            for old in sorted(self.pressure_evicted.values(), key=lambda e: e.last_access)[:excess]:
                del self.pressure_evicted[old.key]

    def _give_back(self) -> None:
        """The disk has room again: hydrate files evicted under pressure, most recently used first, as many as
        fit above min_free (plus the slack) and under the low watermark."""
        disk, s = self.disk, self.settings
        if not self.pressure_evicted or disk is None or disk.total <= 0 or (self.publish is None
                                                                            and self.hydrate is None):
            return
        now = trio.current_time()
        for key, (etag, _bytes, when) in list(self.returning.items()):
            if self.cache.lookup(key, etag) is not None or now - when > s.dedupe_window:
                del self.returning[key]
        coming = self.reserved + sum(size for _etag, size, _when in self.returning.values())
        usage = self.cache.usage()
        disk_room = disk.free - (usage - self._usage_at_disk) - int((s.min_free + DISK_SLACK) * disk.total)
        room = min(disk_room, math.floor(s.low_watermark * self.cache.capacity) - usage) - coming
        asked: list[Evicted] = []
        for evicted in sorted(self.pressure_evicted.values(), key=lambda e: e.last_access, reverse=True):
            if self.cache.lookup(evicted.key) is not None:  # read (or written) again since: cached already
                del self.pressure_evicted[evicted.key]
            elif evicted.size <= room:
                room -= evicted.size
                asked.append(evicted)
                del self.pressure_evicted[evicted.key]
        if not asked:
            return
        for evicted in asked:
            self._ask_hydration(Event.hydrate(evicted.key, evicted.etag, evicted.size, "pressure-return",
                                              self.origin))
            self.returning[evicted.key] = (evicted.etag, evicted.size, now)
        self.returned += len(asked)
        log.info("the cache disk has room again: hydrating %d files evicted under pressure (%s), most recently "
                 "used first (%d still wait for room)", len(asked), _size(sum(e.size for e in asked)),
                 len(self.pressure_evicted))

    def _ask_hydration(self, event: Event) -> None:
        if self.publish is not None:
            self.publish(event)
        elif self.hydrate is not None and self._nursery is not None:
            self._nursery.start_soon(self._run_hydrate, event, self.hydrate)

    async def _run_hydrate(self, event: Event, hydrate: Callable[[Event], Awaitable[None]]) -> None:
        async with self._local_limiter:
            try:
                await hydrate(event)
            except Exception:
                log.exception("hydrating %s again after pressure failed", event.key)

    # -- local purges ---------------------------------------------------------------------------------------

    def _go_local(self) -> bool:
        """Whether decisions are purged here now: no bus, the bus unreachable for ``local_after`` seconds, or
        an eviction waiting that long for it. Logs the switches."""
        now = trio.current_time()
        if self.publish is None:
            self.local_since = self.local_since if self.local_since is not None else now
            return True
        reachable = self.bus_reachable() if self.bus_reachable is not None else None
        if reachable is False:
            self._down_since = self._down_since if self._down_since is not None else now
        elif reachable is True:
            self._down_since = None
        after = self.settings.local_after
        down = self._down_since is not None and now - self._down_since >= after
        waiting = [k for k, (_, _, when) in self.requested.items() if k in self.unsent and now - when >= after]
        local = down or bool(waiting)
        if local and self.local_since is None:
            self.local_since = now
            why = (f"Kafka unreachable for {now - self._down_since:.0f}s" if down and self._down_since is not None
                   else f"{len(waiting)} evictions not consumed within {after:g}s")
            log.warning("%s: purging the eviction planner's decisions locally (still published for audit)", why)
        elif not local and self.local_since is not None:
            log.info("Kafka carries evictions again (after %.0fs of local purges)", now - self.local_since)
            self.local_since = None
        return local

    def _purge_locally(self, event: Event) -> None:
        self.unsent.pop(event.key, None)
        if self.purge is None or self._nursery is None:
            return
        self._nursery.start_soon(self._run_purge, event, self.purge)

    async def _run_purge(self, event: Event, purge: Callable[[Event], Awaitable[None]]) -> None:
        async with self._local_limiter:
            try:
                await purge(event)
            except Exception:
                log.exception("local purge of %s failed", event.key)
                self.settled(event.key)
            else:
                self.local_purges += 1

    def _publish(self, plan: Plan) -> None:
        now = trio.current_time()
        local = self.publish is None or self.local_since is not None
        for reason, entries in (("watermark", plan.watermark), ("max-age", plan.max_age)):
            for entry in entries:
                event = Event.evict(entry.key, entry.etag, entry.size, reason, self.origin)
                if self.publish is not None:
                    self.publish(event)  # with a bus: recorded there (the outbox) even when purged here
                self.requested[entry.key] = (entry.etag, entry.size, now)
                self.published[reason] += 1
                if local:
                    self._purge_locally(event)
                else:
                    self.unsent[entry.key] = event
        if plan.watermark:
            self.pressure_rounds += 1
            level = logging.DEBUG if self._episode else logging.INFO  # INFO once per episode of pressure
            self._episode += len(plan.watermark)
            log.log(level, "%s: asking to evict %d files (%s), coldest first", plan.why, len(plan.watermark),
                    _size(sum(e.size for e in plan.watermark)))
        if plan.max_age:
            log.info("asking to evict %d files not read for %.0fs (%s)", len(plan.max_age), self.settings.max_age,
                     _size(sum(e.size for e in plan.max_age)))

    def status(self) -> dict[str, object]:
        s = self.settings
        return {
            "high_watermark": s.high_watermark,
            "low_watermark": s.low_watermark,
            "min_free": s.min_free,
            "max_age": s.max_age,
            "interval": s.interval,
            "disk_free_bytes": self.disk.free if self.disk else None,
            "disk_total_bytes": self.disk.total if self.disk else None,
            "rounds": self.rounds,
            "evictions_requested": dict(self.published),
            "evictions_pending": len(self.requested),
            "room_wanted_bytes": sum(self.wanted.values()),
            "unsatisfied_rounds": self.unsatisfied_rounds,
            "local": self.local_since is not None,
            "local_after": s.local_after,
            "local_purges": self.local_purges,
            "pressure_evicted": len(self.pressure_evicted),  # waiting to be hydrated again
            "pressure_returned": self.returned,
        }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
