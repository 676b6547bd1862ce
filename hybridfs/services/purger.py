"""The purger: handles evict events by removing files from the local cache — never the only copy.

For one event (the consumer calls :meth:`Purger.handle`; one at a time per key; commit after it returns):

1. ``pin: false`` unpins the key first (``hybridfs evict --unpin``); ``pin: true`` on an evict event is
   contradictory and is rejected (dead-lettered).
2. Planner evictions (reason ``watermark`` / ``max-age``) are one cache's decisions: another cache consuming
   the same topic ignores them (by ``origin``). Explicit evictions (``hybridfs evict``, any other reason) apply
   to every cache that consumes the topic.
3. Nothing to do unless the key is cached, in the version the event names (an event without an ETag names
   whatever version is cached). Then it must be still **unpinned** (an explicit evict of a pinned file is
   refused with an INFO line: ``hybridfs evict --unpin`` or ``hybridfs unpin`` first), **closed** (not open
   through the mount), and for planner events still **cold** (not read since the event was planned).
4. **S3 holds the same bytes?** HEAD the object: same ETag and size as the cached entry, fine. Otherwise S3 is
   the truth for what exists (contract 4), and an eviction never writes the key back:

   * the object is **missing** (deleted by another host or tool): the cached copy is not uploaded to its key.
     A deletion made through this mount removed the cache entry already (nothing to evict then; a copy
     preserved while such a deletion raced with the purge is removed again). Otherwise the cached bytes are
     kept beside it, under ``<prefix>.hybridfs/preserved/<path>.<etag>`` with the attributes the namespace
     last knew for that version (or the cached file's mtime and the mount's defaults);
   * the object has **another ETag**: when it has the same size and the same bytes (a copy in place changes a
     multipart ETag, not the data), nothing is uploaded. Otherwise S3 holds a *different version*, written
     after ours (every cached version was in S3 once: the cache only takes what S3 acknowledged or served).
     Overwriting it would destroy that newer data, so the cached bytes are preserved beside it the same way,
     with the current object's attributes, and the key keeps the newer version.

   Preserved copies are bounded: at most ``preserved_size`` bytes in all (the oldest dropped first; a copy
   larger than that is not kept) and ``preserved_age`` seconds each. The bound is checked against a listing
   of ``.hybridfs/preserved/`` after every preservation and every ``PRUNE_INTERVAL`` seconds, so copies made by
   other hosts sharing the prefix count too; ``status()`` lists them.

5. Re-check (awaits happened: the file may have been opened, read, pinned or replaced), remove the cached copy
   and its index entry, drop the kernel's pages of the inode.

S3 unreachable: the purge waits (quietly; not committed), so a purge never runs on a guess.

State: all of it belongs to the trio thread (S3 and disk calls run in threads and return results).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import re
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hybridfs.core.attrs import metadata_for
from hybridfs.core.paths import KEY_MAX
from hybridfs.errors import FsError
from hybridfs.events.schema import MAX_SEGMENT_BYTES, Event, RejectEvent
from hybridfs.keylocks import KeyLocks
from hybridfs.services.common import PLANNER_REASONS, FsHooks, S3Waiter, Store, clean_etag
from hybridfs.services.planner import Planner
from hybridfs.tiers.cache import CacheEntry, LocalCache
from hybridfs.tiers.s3 import ObjectInfo

log = logging.getLogger("hybridfs.services.purger")

PRESERVED_DIR = ".hybridfs/preserved"
COMPARE_CHUNK = 8 * 1024**2
PRUNE_INTERVAL = 600.0  # seconds between checks of the preserved copies' age bound
PRESERVED_LISTED = 20  # preserved copies named in the status (the newest)


@dataclass(frozen=True)
class PurgerSettings:
    default_mode: int = 0o100644
    default_uid: int = 0
    default_gid: int = 0
    preserved_size: int = 1024**3  # bytes of preserved copies in all (the oldest are dropped first)
    preserved_age: float = 7 * 86400.0  # seconds a preserved copy is kept (0: no age limit)


@dataclass(frozen=True)
class Preserved:
    key: str
    size: int
    mtime: float  # Unix time S3 stored it


class Purger:
    def __init__(
        self,
        store: Store,
        cache: LocalCache,
        hooks: FsHooks,
        planner: Planner,
        locks: KeyLocks,
        origin: str,
        key_prefix: str,
        settings: PurgerSettings | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.hooks = hooks
        self.planner = planner
        self.locks = locks
        self.origin = origin
        self.key_prefix = key_prefix  # the mount's prefix inside the bucket ("" or ending in "/")
        self.settings = settings or PurgerSettings()
        self.s3 = S3Waiter(log, "evictions")
        self.outcomes: Counter[str] = Counter()
        self.bytes_freed = 0
        self.uploads = 0
        self.preserved: list[Preserved] | None = None  # oldest first, as last listed (None: not listed yet)
        self.preserved_dropped = 0
        self.deleted_dropped = 0  # cached copies dropped because S3 no longer holds them (not preserved)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keeps the preserved copies within their bounds (their age passes without any purge)."""
        task_status.started()
        while True:
            try:
                await self.prune()
            except FsError as exc:
                log.debug("could not check the preserved copies: %s", exc.message)
            await trio.sleep(PRUNE_INTERVAL)

    async def handle(self, event: Event) -> None:
        if event.type != "evict":
            raise RejectEvent(f"a {event.type} event on the evict topic")
        if event.bucket is not None and event.bucket != self.store.bucket:
            raise RejectEvent(f"event for bucket {event.bucket!r}; this mount serves {self.store.bucket!r}")
        if event.pin is True:
            raise RejectEvent("pin=true on an evict event (pin with a hydrate event: hybridfs pin)")
        key = event.key
        planned = event.reason in PLANNER_REASONS
        if planned and event.origin != self.origin:
            log.debug("ignoring %s eviction of %s planned by %s", event.reason, key, event.origin)
            self.outcomes["other-cache"] += 1
            return
        if event.pin is False and key in self.cache.pins:
            await self.cache.set_pinned(key, False)
            log.info("unpinned %s", key)
        try:
            async with self.locks(key):
                outcome = await self._purge(event, planned)
        finally:
            if planned:
                self.planner.settled(key)
        self.outcomes[outcome] += 1

    def _refusal(self, event: Event, entry: CacheEntry, planned: bool) -> str | None:
        """Why ``entry`` must stay cached now, or None."""
        key = event.key
        explicit = logging.DEBUG if planned else logging.INFO
        if key in self.cache.pins or entry.pinned:
            log.log(explicit, "not evicting %s: it is pinned (hybridfs unpin, or evict --unpin)", key)
            return "pinned"
        if self.hooks.is_open(key):
            log.log(explicit, "not evicting %s: it is open", key)
            return "open"
        if planned and entry.last_access > event.time:
            log.debug("not evicting %s: read since the eviction was planned", key)
            return "hot"
        return None

    async def _purge(self, event: Event, planned: bool) -> str:
        key = event.key
        entry = self.cache.lookup(key)
        if entry is None:
            return "not-cached"
        etag = clean_etag(event.etag)
        if etag is not None and entry.etag != etag:
            log.debug("not evicting %s: the event names version %s, the cache holds %s", key, etag, entry.etag)
            return "other-version"
        refusal = self._refusal(event, entry, planned)
        if refusal is not None:
            return refusal
        try:
            safe = await self._ensure_in_s3(entry)
        except FsError as exc:
            log.warning("not evicting %s: could not make sure S3 holds its bytes: %s", key, exc.message)
            return "unsafe"
        except FileNotFoundError as exc:
            # The copy was removed while we checked (an unlink, a change from the feed, a corrupt copy dropped):
            # nothing is left to evict. A file gone under an entry still indexed is a real fault: raised.
            now = self.cache.lookup(key)
            if now is None or now.etag != entry.etag:
                log.debug("not evicting %s: its cached copy went away meanwhile (%s)", key, exc)
                return "not-cached"
            raise
        if not safe:
            return "unsafe"
        # Awaits happened: re-check everything against the entry as it is now.
        now = self.cache.lookup(key)
        if now is None:
            return "not-cached"
        if now.etag != entry.etag:
            return "other-version"
        refusal = self._refusal(event, now, planned)
        if refusal is not None:
            return refusal
        freed = await self.cache.remove(key)  # leaves the index before its first await
        await self.hooks.forget_kernel_cache(key)
        self.bytes_freed += freed
        self.planner.notify_changed()
        log.debug("evicted %s (%d bytes, %s)", key, freed, event.reason)
        return "evicted"

    # -- contract 4 -----------------------------------------------------------------------------------------

    async def _ensure_in_s3(self, entry: CacheEntry) -> bool:
        """True once the cached copy may go: S3 holds its bytes, or S3 holds another version or none and the
        cached bytes were preserved beside it (or dropped, over the bounds); False when that cannot be made
        sure."""
        key = entry.key
        info = await self.s3.call(lambda: self.store.head(key))
        if info is not None and info.etag == entry.etag and info.size == entry.size:
            return True
        path = self.cache.data_path(key, entry.etag)
        try:
            st = await trio.to_thread.run_sync(os.stat, path, limiter=self.cache.limiter)
        except FileNotFoundError:
            raise  # removed meanwhile, or lost under its entry: _purge tells which
        except OSError as exc:
            log.warning("not evicting %s: S3 does not hold the cached version and its cached file is unreadable "
                        "(%s)", key, exc)
            return False
        if st.st_size != entry.size:
            log.warning("not evicting %s: S3 does not hold the cached version and its cached file has %d bytes, "
                        "not %d", key, st.st_size, entry.size)
            return False
        if not self._still_ours(entry):
            return True  # deleted, replaced or opened through the mount meanwhile: the re-check decides
        if not await self.cache.verify(key, entry.etag):  # never upload bytes that fail their checksums
            return False  # the corrupt copy is dropped (logged once): nothing is left to evict
        if info is None:
            return await self._keep_deleted(entry, path, self._metadata(entry, st.st_mtime))
        if info.size == entry.size and await self._same_bytes(key, info, path):
            log.debug("%s: S3 holds the same bytes under ETag %s (cached as %s)", key, info.etag, entry.etag)
            return True
        why = (f"S3 holds another version (ETag {info.etag}, {info.size} bytes) than the cached one ({entry.etag}, "
               f"{entry.size} bytes)")
        await self._preserve(entry, path, dict(info.metadata or {}), why)
        return True

    async def _keep_deleted(self, entry: CacheEntry, path: Path, metadata: dict[str, str]) -> bool:
        """The object is gone from S3: never write it back to its key (S3 is the truth for deletes); keep the
        bytes beside it unless the deletion was made here."""
        key = entry.key
        preserved = await self._preserve(entry, path, metadata, "S3 no longer holds it (deleted elsewhere)")
        now = self.cache.lookup(key)
        if preserved is not None and (now is None or now.etag != entry.etag):
            # Deleted (or replaced) through this mount while we uploaded: an unlink removes S3's object, then
            # the cache entry. A known deletion, so the copy goes again.
            await self.s3.call(functools.partial(self.store.delete, preserved))
            self._forget_preserved(preserved)
            log.info("%s was deleted through the mount meanwhile; removed its preserved copy again", key)
        return True

    async def _preserve(self, entry: CacheEntry, path: Path, metadata: dict[str, str], why: str) -> str | None:
        """Upload the cached bytes to the preserved key, within the bounds; returns that key (None: dropped)."""
        key = entry.key
        bound = self.settings.preserved_size
        if entry.size > bound:
            self.deleted_dropped += 1
            log.warning("evicting %s: %s; the cached copy (%d bytes) is larger than the preserved copies may be "
                        "(--preserved-size %d): dropped", key, why, entry.size, bound)
            return None
        spare = self.preserved_key(key, entry.etag)
        metadata = {**metadata, "hybridfs-original-key": urllib.parse.quote(key, safe="/"),
                    "hybridfs-original-etag": entry.etag}
        log.warning("evicting %s: %s; preserving the cached copy as %s first", key, why, spare)
        await self._upload(spare, path, metadata, entry.size, remember=False)
        try:
            await self.prune(keep=spare)
        except FsError as exc:
            log.info("could not check the preserved copies' bounds (will try again): %s", exc.message)
        return spare

    async def prune(self, keep: str | None = None) -> None:
        """List the preserved copies and drop what is over the age bound, then the oldest while the total is
        over the size bound (never ``keep``, the copy just made)."""
        root = f"{self.key_prefix}{PRESERVED_DIR}/"
        listed = await self.s3.call(lambda: self.store.list_keys(root))
        copies = sorted((Preserved(o.key, o.size, o.mtime_ns / 1e9) for o in listed), key=lambda p: p.mtime)
        s = self.settings
        now = time.time()
        drop = [p for p in copies if s.preserved_age > 0 and now - p.mtime > s.preserved_age and p.key != keep]
        left = [p for p in copies if p not in drop]
        total = sum(p.size for p in left)
        for p in list(left):
            if total <= s.preserved_size:
                break
            if p.key != keep:
                drop.append(p)
                left.remove(p)
                total -= p.size
        for p in drop:
            await self.s3.call(functools.partial(self.store.delete, p.key))
            self.preserved_dropped += 1
            log.info("dropped preserved copy %s (%d bytes, %.0fs old): over the --preserved-size/-age bounds",
                     p.key, p.size, now - p.mtime)
        self.preserved = left

    def _forget_preserved(self, key: str) -> None:
        if self.preserved is not None:
            self.preserved = [p for p in self.preserved if p.key != key]

    def _still_ours(self, entry: CacheEntry) -> bool:
        """Right before an upload: the entry is still cached and the file still closed. (A file deleted through
        the mount leaves the cache right after S3; no upload must bring it back.)"""
        now = self.cache.lookup(entry.key)
        return now is not None and now.etag == entry.etag and not self.hooks.is_open(entry.key)

    async def _upload(self, key: str, path: Path, metadata: dict[str, str], size: int, *,
                      remember: bool = True) -> None:
        new = await self.s3.call(lambda: self.store.upload_file(key, str(path), metadata))
        if new.size != size:
            raise FsError(errno.EIO, f"PUT {key}: S3 holds {new.size} bytes after uploading {size}")
        self.uploads += 1
        if remember:
            self.hooks.uploaded(key, new)

    def _metadata(self, entry: CacheEntry, mtime: float) -> dict[str, str]:
        """The attributes of the cached version: as the namespace last saw them, or the defaults."""
        known = self.hooks.known_stat(entry.key)
        if known is not None and clean_etag(known.etag) == entry.etag:
            return metadata_for(known)
        s = self.settings
        return {"mode": str(s.default_mode), "uid": str(s.default_uid), "gid": str(s.default_gid),
                "mtime": str(int(mtime))}

    async def _same_bytes(self, key: str, info: ObjectInfo, path: Path) -> bool:
        """Compare the object (pinned to its ETag) with the cached file, chunk by chunk."""
        fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY, limiter=self.cache.limiter)
        try:
            offset = 0
            while offset < info.size:
                length = min(COMPARE_CHUNK, info.size - offset)
                remote = await self.s3.call(functools.partial(self.store.get_range, key, offset, length, info.etag))
                local = await trio.to_thread.run_sync(os.pread, fd, length, offset, limiter=self.cache.limiter)
                if hashlib.sha256(remote).digest() != hashlib.sha256(local).digest():
                    return False
                offset += length
            return True
        except FsError as exc:
            log.debug("comparing %s with S3: %s", key, exc.message)
            return False
        finally:
            os.close(fd)

    def preserved_key(self, key: str, etag: str) -> str:
        """Where a cached version that S3 no longer holds is kept: ``<prefix>.hybridfs/preserved/<path>.<etag>``
        (a short hash of the key instead of the path when that would be too long for S3 or a file name)."""
        rel = key[len(self.key_prefix):] if key.startswith(self.key_prefix) else key
        tag = re.sub(r"[^A-Za-z0-9-]", "", etag)[:40] or "unknown"
        candidate = f"{self.key_prefix}{PRESERVED_DIR}/{rel}.{tag}"
        last = candidate.rsplit("/", 1)[-1]
        if len(candidate.encode()) > KEY_MAX or len(last.encode()) > MAX_SEGMENT_BYTES:
            digest = hashlib.sha256(key.encode()).hexdigest()[:32]
            candidate = f"{self.key_prefix}{PRESERVED_DIR}/{digest}.{tag}"
        return candidate

    def status(self) -> dict[str, object]:
        preserved: dict[str, Any] = {"listed": self.preserved is not None, "dropped": self.preserved_dropped,
                                     "max_bytes": self.settings.preserved_size,
                                     "max_age": self.settings.preserved_age,
                                     "deleted_not_preserved": self.deleted_dropped}
        if self.preserved is not None:
            now = time.time()
            preserved.update(count=len(self.preserved), bytes=sum(p.size for p in self.preserved),
                             newest=[{"key": p.key, "size": p.size, "age": round(now - p.mtime, 1)}
                                     for p in reversed(self.preserved[-PRESERVED_LISTED:])])
        return {
            "outcomes": dict(self.outcomes),
            "bytes_freed": self.bytes_freed,
            "uploads_before_evict": self.uploads,
            "s3_waits": self.s3.waits,
            "preserved": preserved,
        }
