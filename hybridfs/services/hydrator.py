"""The hydrator: handles hydrate events by copying objects from S3 into the local cache.

For one event (the consumer calls :meth:`Hydrator.handle`, at most one at a time per object key, several keys
at once, and commits the offset once it returns):

1. ``pin`` true/false: pin or unpin the key first (a pinned file is hydrated and never evicted).
2. Already cached with the event's ETag: done (the common case for repeated events: no S3 request).
3. Which version: an event naming the ETag and size of a small object (up to ``small_object``, 8 MiB) is
   checked by the download itself: one GET pinned to the ETag, for one byte more than the size. Otherwise, or
   when that GET says the version is gone, HEAD the object. Gone: done. Another ETag than the event's: the
   event is stale — the *current* version is hydrated instead (the reason for the event, "this file is wanted
   here", still holds). The same ETag with another size than the event says: the event is inconsistent and is
   rejected (dead-lettered).
4. Room: an object larger than the cache is never hydrated. Otherwise the hydration needs
   ``usage + in-flight hydrations + size <= capacity`` and the cache disk keeping ``min_free`` free; if not,
   it asks the eviction planner for room and waits up to ``room_timeout`` for the purger to make it, then
   gives up (INFO). Waiting holds one consumer slot, not the key.
5. Download to a temp file in the cache directory (small objects: that one GET; large ones: s3transfer's
   parallel ranged download), pinned to the ETag (a concurrent change answers ESTALE and the new version is
   tried, at most three times), check its size, commit it to the cache index — unless the
   cache meanwhile got another version of the key from a write through the mount, which then wins, or the key
   was removed from the cache after the download started (an unlink, a rename, a change seen: ``removed``).

Every step is idempotent: an event handled twice finds the file cached and returns. S3 being unreachable
makes a hydration wait (quietly; the event is not committed), a failing cache disk makes it give up (the
cache reports its disk once); neither is an error of the event.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio

from hybridfs.errors import FsError
from hybridfs.events.schema import Event, RejectEvent
from hybridfs.keylocks import KeyLocks
from hybridfs.services.common import S3Waiter, Store, clean_etag
from hybridfs.services.planner import Planner, PlannerSettings
from hybridfs.tiers.cache import LocalCache, Sums
from hybridfs.tiers.s3 import ObjectInfo

log = logging.getLogger("hybridfs.services.hydrator")

MAX_VERSION_CHASES = 3


@dataclass(frozen=True)
class HydratorSettings:
    room_timeout: float = 30.0  # how long a hydration waits for the purger to make room
    small_object: int = 8 * 1024**2  # up to this size: one ranged GET into memory; above, a parallel download


class Hydrator:
    def __init__(
        self,
        store: Store,
        cache: LocalCache,
        planner: Planner,
        locks: KeyLocks,
        settings: HydratorSettings | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.planner = planner
        self.locks = locks
        self.settings = settings or HydratorSettings()
        self.s3 = S3Waiter(log, "hydrations")
        self.outcomes: Counter[str] = Counter()
        self.bytes_hydrated = 0
        self.seconds_hydrating = 0.0

    @property
    def limits(self) -> PlannerSettings:
        return self.planner.settings

    async def handle(self, event: Event) -> None:
        if event.type != "hydrate":
            raise RejectEvent(f"a {event.type} event on the hydrate topic")
        if event.bucket is not None and event.bucket != self.store.bucket:
            raise RejectEvent(f"event for bucket {event.bucket!r}; this mount serves {self.store.bucket!r}")
        key = event.key
        if event.pin is not None and (key in self.cache.pins) != event.pin:
            await self.cache.set_pinned(key, event.pin)
            log.info("%s %s", "pinned" if event.pin else "unpinned", key)
        outcome = await self._hydrate(event)
        self.outcomes[outcome] += 1

    async def _hydrate(self, event: Event) -> str:
        key, etag = event.key, clean_etag(event.etag)
        if not self.cache.available:
            log.debug("not hydrating %s: the cache is unavailable (%s)", key, self.cache.unavailable_reason)
            return "cache-unavailable"
        if etag is not None and self.cache.lookup(key, etag) is not None:
            return "already-cached"
        claimed: ObjectInfo | None = None
        if etag is not None and event.size is not None and event.size <= self.settings.small_object:
            # Small and fully described: one GET pinned to the ETag checks the claim and fetches the bytes.
            info = claimed = ObjectInfo(key, event.size, etag, 0)
        else:
            found = await self._current(key)
            if found is None:
                log.debug("not hydrating %s: no such object (any more)", key)
                return "gone"
            info = found
            if etag is not None and info.etag != etag:
                log.debug("hydrate event for %s names version %s; S3 holds %s now: hydrating that", key, etag,
                          info.etag)
            elif event.size is not None and info.size != event.size:
                raise RejectEvent(f"size {event.size} does not match the object's {info.size} bytes (same ETag)")
        for _ in range(MAX_VERSION_CHASES):
            if self.cache.lookup(key, info.etag) is not None:
                return "already-cached"
            if info.size > self.cache.capacity:
                log.info("not hydrating %s: %s bytes do not fit in a cache of %s", key, info.size,
                         self.cache.capacity)
                return "too-large"
            async with self._room(key, info.size) as granted:
                if not granted:
                    return "no-room"
                async with self.locks(key):
                    result = await self._download(key, info, claimed=info is claimed)
            if not isinstance(result, ObjectInfo):
                return result
            if etag is not None and result.etag == etag and result.size != info.size:
                raise RejectEvent(f"size {info.size} does not match the object's {result.size} bytes (same ETag)")
            info = result  # another version than we tried: chase it
        log.info("not hydrating %s: it keeps changing while being downloaded", key)
        return "changing"

    async def _current(self, key: str) -> ObjectInfo | None:
        try:
            return await self.s3.call(lambda: self.store.head(key))
        except FsError as exc:
            log.warning("cannot hydrate %s: %s", key, exc.message)
            return None

    # -- room -----------------------------------------------------------------------------------------------

    def _fits(self, size: int) -> bool:
        cache, planner = self.cache, self.planner
        if cache.usage() + planner.reserved + size > cache.capacity:
            return False
        disk = planner.disk
        if disk is not None and disk.total > 0:
            # The disk may have changed since the planner looked; the next round sees it. Here: keep min_free.
            if disk.free - planner.reserved - size < self.limits.min_free * disk.total:
                return False
        return True

    @contextlib.asynccontextmanager
    async def _room(self, key: str, size: int) -> AsyncIterator[bool]:
        """Reserve ``size`` bytes of the cache for one download; yields whether room was found in time."""
        planner = self.planner
        if not self._fits(size):
            token = planner.want_room(size)
            log.debug("hydration of %s (%d bytes) waits for room", key, size)
            try:
                with trio.move_on_after(self.settings.room_timeout):
                    while not self._fits(size):
                        with trio.move_on_after(0.5):  # purges wake us; the poll catches other changes
                            await planner.wait_changed()
            finally:
                planner.drop_want(token)
            if not self._fits(size):
                log.info("not hydrating %s: no room for %d bytes within %.0fs (cache %d of %d bytes; pinned or "
                         "open files cannot be evicted)", key, size, self.settings.room_timeout,
                         self.cache.usage(), self.cache.capacity)
                yield False
                return
        planner.reserved += size
        try:
            yield True
        finally:
            planner.reserved -= size

    # -- the copy -------------------------------------------------------------------------------------------

    async def _download(self, key: str, info: ObjectInfo, *, claimed: bool = False) -> ObjectInfo | str:
        """Copy one version into the cache. Returns the outcome, or the version to try instead (it changed, or
        a ``claimed`` version - from the event, not seen in S3 yet - turned out not to be there as described).
        """
        if self.cache.lookup(key, info.etag) is not None:
            return "already-cached"
        # Taken before the first request: an unlink or rename of the key while the bytes are on their way
        # removes it from the cache, and that removal must win over this commit (contract 4: a file deleted
        # through the mount never comes back, not even as a cached copy an eviction would preserve).
        with self.cache.fetching(key) as since:
            return await self._download_since(key, info, since, claimed=claimed)

    async def _download_since(self, key: str, info: ObjectInfo, since: int, *, claimed: bool) -> ObjectInfo | str:
        before = self.cache.entries.get(key)
        temp = self.cache.new_temp_path()
        started = time.monotonic()
        committed = False
        try:
            try:
                size, sums = await self._fetch(key, info, temp)
            except FsError as exc:
                if exc.errno in (errno.ESTALE, errno.ENOENT):
                    current = await self._current(key)
                    if current is None:
                        return "gone"
                    if current.etag != info.etag or claimed:
                        return current
                log.warning("hydration of %s failed: %s", key, exc.message)
                return "failed"
            except OSError as exc:
                # The cache disk (full, read-only, gone): the cache itself reports it; a hydration just stops.
                log.info("not hydrating %s: cannot write the cache: %s", key, exc)
                return "cache-error"
            if size != info.size:
                if claimed:  # the event's size was wrong: learn the truth (and reject a lie about one ETag)
                    current = await self._current(key)
                    return "gone" if current is None else current
                log.warning("hydration of %s: downloaded %d bytes, the object has %d; dropped", key, size,
                            info.size)
                return "failed"
            now = self.cache.entries.get(key)
            if now is not None and now.etag != info.etag and (before is None or now.etag != before.etag):
                log.debug("not hydrating %s version %s: the cache got version %s meanwhile", key, info.etag,
                          now.etag)
                return "superseded"
            if not self.cache.removed_since(key, since):
                committed = await self.cache.commit(temp, key, info.etag, info.size, sums, since=since)
        finally:
            if not committed:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_unlink, temp)
        if not committed:
            if self.cache.removed_since(key, since):
                log.debug("not caching %s: removed through the mount while it was downloaded", key)
                return "removed"
            return "cache-error"
        elapsed = time.monotonic() - started
        self.bytes_hydrated += info.size
        self.seconds_hydrating += elapsed
        self.planner.wake_if_over()
        log.debug("hydrated %s (%d bytes) in %.3fs", key, info.size, elapsed)
        return "hydrated"

    async def _fetch(self, key: str, info: ObjectInfo, temp: Path) -> tuple[int, Sums | None]:
        """Download ``info``'s version of ``key`` to ``temp``; returns the bytes the object had (for a small
        object the range asks for one byte more than expected, so a larger object shows) and, for a small
        object, the checksums of the bytes received (the commit need not read the file back for them)."""
        if info.size <= self.settings.small_object:
            data = await self.s3.call(lambda: self.store.get_range(key, 0, info.size + 1, info.etag))
            block = self.cache.block_size

            def write() -> Sums | None:
                _write(temp, data)
                return Sums.of_bytes(key, info.etag, data, block) if len(data) == info.size else None

            return len(data), await trio.to_thread.run_sync(write, limiter=self.cache.limiter)
        await self.s3.call(lambda: self.store.download_file(key, info.etag, str(temp)))
        return await trio.to_thread.run_sync(_size_of, temp, limiter=self.cache.limiter), None

    def status(self) -> dict[str, object]:
        return {
            "outcomes": dict(self.outcomes),
            "bytes_hydrated": self.bytes_hydrated,
            "reserved_bytes": self.planner.reserved,
            "s3_waits": self.s3.waits,
        }


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def _size_of(path: Path) -> int:
    return path.stat().st_size


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
