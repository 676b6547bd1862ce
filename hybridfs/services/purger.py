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
4. **S3 holds the same bytes?** HEAD the object: same ETag and size as the cached entry, fine. Otherwise the
   cached copy is uploaded first (contract 4):

   * the object is **missing**: the cached copy is put back under its key, with the attributes the namespace
     last knew for that version (mode, owner, mtime), else the cached file's mtime and the mount's defaults;
   * the object has **another ETag**: when it has the same size and the same bytes (a copy in place changes a
     multipart ETag, not the data), nothing is uploaded. Otherwise S3 holds a *different version*, written
     after ours (every cached version was in S3 once: the cache only takes what S3 acknowledged or served).
     Overwriting it would destroy that newer data, so the cached bytes are preserved beside it, under
     ``<prefix>.hybridfs/preserved/<path>.<etag>`` with the current object's attributes, and the key keeps
     the newer version.

5. Re-check (awaits happened: the file may have been opened, read, pinned or replaced), remove the cached copy
   and its index entry, drop the kernel's pages of the inode.

S3 unreachable: the purge waits (quietly; not committed), so a purge never runs on a guess.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import re
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class PurgerSettings:
    default_mode: int = 0o100644
    default_uid: int = 0
    default_gid: int = 0


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
        """True once S3 holds the entry's bytes (uploading them if need be); False when it cannot."""
        key = entry.key
        info = await self.s3.call(lambda: self.store.head(key))
        if info is not None and info.etag == entry.etag and info.size == entry.size:
            return True
        path = self.cache.data_path(key, entry.etag)
        try:
            st = await trio.to_thread.run_sync(os.stat, path, limiter=self.cache.limiter)
        except OSError as exc:
            log.warning("not evicting %s: S3 does not hold the cached version and its cached file is unreadable "
                        "(%s)", key, exc)
            return False
        if st.st_size != entry.size:
            log.warning("not evicting %s: S3 does not hold the cached version and its cached file has %d bytes, "
                        "not %d", key, st.st_size, entry.size)
            return False
        if not self._still_ours(entry):
            return False
        if not await self.cache.verify(key, entry.etag):  # never upload bytes that fail their checksums
            return False  # the corrupt copy is dropped (logged once): nothing is left to evict
        if info is None:
            metadata = self._metadata(entry, st.st_mtime)
            log.warning("evicting %s: S3 does not hold it (any more); uploading the cached copy first", key)
            await self._upload(key, path, metadata, entry.size)
            return True
        if info.size == entry.size and await self._same_bytes(key, info, path):
            log.debug("%s: S3 holds the same bytes under ETag %s (cached as %s)", key, info.etag, entry.etag)
            return True
        spare = self.preserved_key(key, entry.etag)
        metadata = {**(info.metadata or {}), "hybridfs-original-key": urllib.parse.quote(key, safe="/"),
                    "hybridfs-original-etag": entry.etag}
        log.warning("evicting %s: S3 holds another version (ETag %s, %d bytes) than the cached one (%s, %d bytes); "
                    "preserving the cached copy as %s first", key, info.etag, info.size, entry.etag, entry.size,
                    spare)
        await self._upload(spare, path, metadata, entry.size, remember=False)
        return True

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
        return {
            "outcomes": dict(self.outcomes),
            "bytes_freed": self.bytes_freed,
            "uploads_before_evict": self.uploads,
            "s3_waits": self.s3.waits,
        }
