"""The directory tree as the bucket defines it, with the metadata caches in front of it.

Answers "what is at this path" and "what is in this directory" from S3 (HEAD and delimited listings), through
TTL caches (cachetools) so that a burst of lookups costs one request. Our own changes are written into the
caches as they happen, so they are visible at once; other writers' changes show after ``dir_cache_time``.
Files created here but not uploaded yet live in ``pending`` until their first upload.
"""

from __future__ import annotations

import errno
import logging
import math
import stat as stat_mod
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio
from cachetools import LRUCache, TTLCache

from hybridfs.core.attrs import PATH_MAX, Defaults, Stat, implicit_dir, stat_from_object
from hybridfs.core.paths import KeyMapper, name_of, parent_of
from hybridfs.errors import FsError, not_found
from hybridfs.tasks import Spawner, failpoint
from hybridfs.tiers.breaker import Breaker
from hybridfs.tiers.cache import LocalCache
from hybridfs.tiers.s3 import CloudStore, ObjectInfo

log = logging.getLogger("hybridfs.namespace")

CACHE_ENTRIES = 200_000
REPORTED_ENTRIES = 10_000  # object versions whose unusable metadata was logged (one line per version)
PREFETCH_MAX = 10_000  # entries of one listing whose metadata is fetched ahead (ls -l, find -ls)
PREFETCH_PARALLEL = 20  # as s3fs; the s3-meta limiter (as many threads as --s3-threads) bounds it too
# How long a revalidation of attributes we could serve anyway may wait for S3 before the last known ones are
# served (a few round trips to a healthy S3; well under what a program waiting on stat or open tolerates).
REVALIDATE_WITHIN = 1.0
# How long `ls` waits for S3's listing of a directory the mount has listed before (or holds cached files of)
# before it answers with what it knows; the listing goes on in the background and is kept when it lands.
LIST_WITHIN = 1.0
# How long attributes served because S3 did not answer in time are served again without waiting (a lookup then an
# open of a cached file must not wait twice); they are never stored as an answer of S3.
FALLBACK_STANDS = REVALIDATE_WITHIN
KNOWN_LISTINGS = 4096


@dataclass(frozen=True)
class CachedStat:
    stat: Stat
    fetched: float  # monotonic time of the S3 answer, for open-time revalidation


class Namespace:
    def __init__(self, store: CloudStore, keys: KeyMapper, defaults: Defaults, *,
                 dir_cache_time: float = 5.0, negative_cache_time: float = 1.0) -> None:
        self.store = store
        # Says when S3 keeps reads waiting: a stat or `ls` with an answer at hand stops waiting then (None: a
        # store without one, in core tests).
        self.breaker: Breaker | None = store.breaker if isinstance(store, CloudStore) else None
        self.keys = keys
        self.defaults = defaults
        self.stats: TTLCache[str, CachedStat] = TTLCache(CACHE_ENTRIES, dir_cache_time)
        self.missing: TTLCache[str, bool] = TTLCache(CACHE_ENTRIES, negative_cache_time)
        self.listings: TTLCache[str, dict[str, Stat]] = TTLCache(KNOWN_LISTINGS, dir_cache_time)
        # The last listing of each directory, kept after ``listings`` expires and updated by our own changes: what
        # `ls` answers while S3 is down or does not answer (docs/semantics.md, "While S3 is down").
        self.known_listings: LRUCache[str, dict[str, Stat]] = LRUCache(KNOWN_LISTINGS)
        self._listing: dict[str, _ListingFetch] = {}  # listings being fetched, shared by concurrent `ls`
        self._listings_degraded = False  # said once per outage: listings are answered from what we know
        self.known_listing_answers = 0
        self.pending: dict[str, Stat] = {}
        # The last attributes a HEAD (or our own change) gave for a path, kept after the TTL caches expire:
        # they keep cached files readable while S3 is down, and keep a listing from changing an entry's type.
        self.last_known: LRUCache[str, Stat] = LRUCache(CACHE_ENTRIES)
        self._reported: LRUCache[tuple[str, str | None], bool] = LRUCache(REPORTED_ENTRIES)
        # key -> (ETag, Last-Modified, attributes) of versions a settled HEAD described (ObjectInfo.settled): a
        # listing that shows the same ETag and Last-Modified lists that version, so its entry needs no HEAD again.
        self._versions: LRUCache[str, tuple[str, int, Stat]] = LRUCache(CACHE_ENTRIES)
        # Set by the filesystem: where background metadata prefetches run (None: no prefetching).
        self.spawner: Spawner | None = None
        self.cache: LocalCache | None = None  # set by the mount: its index keeps cached files' attributes
        self._prefetching: dict[str, trio.Event] = {}
        self._s3_down = False
        self.root_stat = implicit_dir(defaults, time.time_ns())
        # Set by the mount: True while the change feed is caught up (hybridfs.services.feed). Then what we
        # know is kept up to date by the feed, so opens do not revalidate after --attr-timeout, and a listing's
        # entry whose ETag matches what we know is complete (docs/semantics.md, "Trust while the feed is healthy").
        self.trusted: Callable[[], bool] = _never
        # Set by the mount when it also consumes the bucket's S3 event records: True while both consumers are
        # caught up. Then every change, by a mount or another tool, reaches us as an event, and attributes we
        # know stand until one arrives (``standing``), past --dir-cache-time.
        self.lasting: Callable[[], bool] = _never
        self.standing: LRUCache[str, Stat] = LRUCache(CACHE_ENTRIES)
        self.slow_revalidations = 0  # stats answered from the last known attributes because S3 was slow
        self.slow_negative_answers = 0  # lookups answered ENOENT from a directory's last listing (S3 slow)
        # Revalidations under way, shared by the stats of a path meanwhile; they go on after a stat stops waiting.
        self._revalidating: dict[str, _HeadFetch] = {}
        # Paths whose last stat stopped waiting for S3 and served these last known attributes, until S3's answer
        # lands or a change arrives (at most FALLBACK_STANDS): the next stat serves them too, without waiting.
        self._fell_back: TTLCache[str, Stat] = TTLCache(CACHE_ENTRIES, FALLBACK_STANDS)
        # Fetches under way, path -> [how many, changes to the path since the first began]: an answer S3 gave
        # before a change arrived (from the feed, a record, or our own) is not stored (see ``_Watch``).
        self._watched: dict[str, list[int]] = {}
        self.stale_answers = 0  # S3 answers not stored because the path changed while they were on their way

    # -- queries --------------------------------------------------------------------------------------------

    async def stat(self, path: str, *, max_age: float | None = None) -> Stat:
        """Attributes of ``path``; ENOENT when nothing is there. ``max_age`` forces a fresher S3 answer."""
        if path == "":
            return self.root_stat
        if path in self.pending:
            return self.pending[path]
        if max_age is not None and self.trusted():
            max_age = None  # the feed tells us of every change: no need to ask S3 again before dir_cache_time
        cached = self.stats.get(path)
        if cached is not None and cached.stat.complete and (
                max_age is None or time.monotonic() - cached.fetched <= max_age):
            return cached.stat
        if max_age is None and path in self.standing and self.lasting():
            return self.standing[path]
        if max_age is None and path in self.missing:
            raise not_found(path)
        known = self.last_known.get(path) or self._cached_stat(path)
        if known is None and max_age is None and self._absent_from_known_listing(path):
            return await self._ask_s3_unless_slow(path)
        if known is None:  # nothing to fall back on: wait for S3's answer
            return await self._ask_s3(path, max_age)
        if path in self._fell_back:
            # The stat just before gave up waiting and served these; an open right after it (or a lookup, then
            # an open) does not wait for S3 a second time. S3's answer, when it lands, replaces them.
            return known
        return await self._revalidate(path, max_age, known)

    async def _revalidate(self, path: str, max_age: float | None, known: Stat) -> Stat:
        """S3's answer for a path whose last known attributes could be served: waited for REVALIDATE_WITHIN at
        most (a stalled or slow S3 must not hold up a stat or open of a cached file for the S3 read timeout,
        contract 5). The question goes on in the background and its answer is kept when it lands; until then
        the last known attributes are served, but never stored as an answer: a later revalidation asks again."""
        now = time.monotonic()
        fetch = self._revalidating.get(path)
        # One under way answers this stat too, unless this one needs an answer fresher than it can give (an
        # open's --attr-timeout: asked no earlier than ``max_age`` ago, by a HEAD, not from a listing).
        inline = False
        if fetch is None or (max_age is not None and (fetch.max_age is None or now - fetch.started > max_age)):
            fetch = self._revalidating[path] = _HeadFetch(now, max_age)
            if self.spawner is not None:
                self.spawner.start_soon(self._revalidate_in_background, path, fetch, name=f"revalidate {path!r}")
            else:  # no background (unit tests): the question ends with this stat's wait
                inline = True
        if inline:
            with trio.move_on_after(REVALIDATE_WITHIN):
                await self._revalidate_in_background(path, fetch)
        else:
            await self._wait(fetch.done, REVALIDATE_WITHIN)
        slow = self._s3_slow()
        if fetch.stat is not None:
            return fetch.stat
        if fetch.error is not None:
            fallback = self._fallback(path, fetch.error)
            if fallback is None:
                raise fetch.error
            return fallback
        self._fell_back[path] = known
        self.slow_revalidations += 1
        if slow:
            self._serving("slow", f"{path!r}: S3 keeps reads waiting for their answers")
        else:  # S3 only busy (a large `ls -l` queues its HEADs): not an outage to warn about
            log.debug("%s: S3 did not answer a revalidation within %gs; serving the last known attributes", path,
                      REVALIDATE_WITHIN)
        return known

    def _s3_slow(self) -> bool:
        return self.breaker is not None and self.breaker.slow

    def _in_time(self, asked: float) -> bool:
        """S3 answered a question asked at ``asked`` (monotonic) as a healthy S3 does: the outage is over."""
        return self.breaker is None or time.monotonic() - asked < self.breaker.slow_after

    async def _wait(self, done: trio.Event, within: float) -> None:
        """Wait for ``done`` for ``within`` seconds at most, and not at all once the breaker finds S3 slow (reads
        waiting for their answers: a stall, a crawl, botocore backing off from 503s): the caller has an answer
        at hand, and S3's goes on in the background."""
        breaker = self.breaker
        with trio.move_on_after(within):
            if breaker is None:
                await done.wait()
                return
            async with trio.open_nursery() as nursery:
                async def first(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(first, done)
                nursery.start_soon(first, breaker.slowed)

    async def _ask_s3_unless_slow(self, path: str) -> Stat:
        """A path the mount knows nothing of, absent from its directory's last listing (a create's lookup, most
        often): S3's answer, or, once S3 is found slow (a stall, a crawl, 503s backed off), ENOENT as that listing
        says. The kernel holds the directory's lock through a create's lookup, so a lookup that waits for a
        stalled S3 there holds up every lookup in the directory, those of cached files too. The question goes on
        in the background and its answer is kept. While the breaker is open it fails at once (EIO), as before."""
        if self.breaker is None or self.spawner is None:
            return await self._ask_s3(path, None)
        fetch = self._revalidating.get(path)
        if fetch is None:
            fetch = self._revalidating[path] = _HeadFetch(time.monotonic(), None)
            self.spawner.start_soon(self._revalidate_in_background, path, fetch, name=f"lookup {path!r}")
        await self._wait(fetch.done, math.inf)
        if fetch.stat is not None:
            return fetch.stat
        if fetch.error is not None:
            raise fetch.error
        self.slow_negative_answers += 1
        log.debug("%s: S3 slow; not in its directory's last listing, so not there as far as the mount knows", path)
        raise not_found(path)

    def _absent_from_known_listing(self, path: str) -> bool:
        listing = self.known_listings.get(parent_of(path))
        return listing is not None and name_of(path) not in listing

    async def _revalidate_in_background(self, path: str, fetch: _HeadFetch) -> None:
        try:
            fetch.stat = await self._ask_s3(path, fetch.max_age)  # kept unless the path changed meanwhile
        except FsError as exc:
            fetch.error = exc
        except Exception as exc:  # a bug: this stat fails with EIO and a log line, the mount goes on
            log.exception("revalidating %r: internal error", path)
            fetch.error = FsError(errno.EIO, f"revalidating {path!r}: internal error {exc!r}", level=logging.ERROR)
        finally:
            fetch.done.set()
            if self._revalidating.get(path) is fetch:
                del self._revalidating[path]
                self._fell_back.pop(path, None)  # S3 answered (or failed): the next stat goes by that

    async def _ask_s3(self, path: str, max_age: float | None) -> Stat:
        prefetch = self._prefetching.get(path)
        if prefetch is not None:  # a HEAD for it is already under way: wait for that one
            await prefetch.wait()
            cached = self.stats.get(path)
            if cached is not None and cached.stat.complete and max_age is None:
                return cached.stat
        if max_age is None and self._absent_from_listing(path):
            raise not_found(path)
        asked = time.monotonic()
        with self._watch(path) as watch:
            st = await self._fetch(path)
        if self._s3_down and self._in_time(asked):  # a slow answer is no end of the outage
            self._s3_down = False
            log.info("S3 answers again")
        if watch.changed:  # true for this caller, which asked before the change; not for later ones
            self._stale(path)
        elif st is None:
            self.vanished(path)
        else:
            self._store(path, st)
        if st is None:
            raise not_found(path)
        return st

    def _fallback(self, path: str, exc: FsError) -> Stat | None:
        """While S3 is unreachable, the last attributes we saw keep cached files readable (contract 5)."""
        known = self.last_known.get(path) or self._cached_stat(path)
        if exc.errno != errno.EIO or known is None:
            return None
        self._serving("unreachable", exc.message)
        return known

    def _serving(self, how: str, why: str) -> None:
        """Once per outage, one line that says what is served from where (or the listing's line, if first)."""
        if self._s3_down:
            return
        self._s3_down = True
        log.warning("S3 %s (%s); serving last known attributes and cached data until it answers: %s", how, why,
                    self._served_from())

    def _served_from(self) -> str:
        cache = f" in {self.cache.root}" if self.cache is not None else ""
        return (f"attributes and listings as this mount last saw them (after a restart, the cache index's), file "
                f"contents from the cache{cache}; what the mount does not hold waits for S3 or fails with EIO")

    def _cached_stat(self, path: str) -> Stat | None:
        """After a restart nothing is in ``last_known``: the cache index kept the attributes of cached files,
        and a directory with cached files below it exists."""
        if self.cache is None:
            return None
        info = self.cache.known_object(self.keys.key(path))
        if info is not None:
            return stat_from_object(info, self.defaults)
        if self.cache.has_below(self.keys.dir_prefix(path)):
            return implicit_dir(self.defaults, self.root_stat.mtime_ns)
        return None

    def _absent_from_listing(self, path: str) -> bool:
        listing = self.listings.get(parent_of(path))
        return listing is not None and name_of(path) not in listing

    async def _fetch(self, path: str) -> Stat | None:
        """A file (HEAD key) or a directory (keys under key/) — asked at once, so a missing path, the common
        case before every create, costs one round trip instead of three. A path known as a file is asked with
        the HEAD alone (a file wins over keys below its name): the revalidation of a known file, e.g. the lookup
        before an unlink, costs one request instead of two; the keys below are asked only when it is gone."""
        key, marker = self.keys.key(path), self.keys.dir_prefix(path)
        known = self.last_known.get(path)
        if known is not None and not known.is_dir:
            info = await self.store.head(key)
            if info is not None:
                return self.parse(info)
            return await self._directory(path, await self.store.first_keys(marker, 1))
        found: dict[str, object] = {}

        errors: list[FsError] = []

        async def ask(name: str, request: Callable[[], Awaitable[object]]) -> None:
            try:
                found[name] = await request()
            except FsError as exc:  # raised below as itself, not wrapped in an exception group
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "file", lambda: self.store.head(key))
            nursery.start_soon(ask, "below", lambda: self.store.first_keys(marker, 1))
        if errors:
            raise errors[0]
        answer = found["file"]
        if isinstance(answer, ObjectInfo):
            return self.parse(answer)
        below = found["below"]
        assert isinstance(below, list)
        return await self._directory(path, below)

    async def _directory(self, path: str, below_keys: list[str]) -> Stat | None:
        """No object at ``path``: a directory when keys are below it (its marker's attributes, or defaults)."""
        marker = self.keys.dir_prefix(path)
        if not below_keys:
            return None
        if below_keys == [marker]:  # a marker object, which carries the directory's attributes
            info = await self.store.head(marker)
            if info is not None:
                return self.parse(info, is_dir=True)
        return implicit_dir(self.defaults, self.root_stat.mtime_ns)

    def parse(self, info: ObjectInfo, *, is_dir: bool = False) -> Stat:
        """Attributes of an object; unusable metadata gives defaults and one log line per object version."""
        problems: list[str] = []
        st = stat_from_object(info, self.defaults, is_dir=is_dir, problems=problems)
        if problems and (info.key, info.etag) not in self._reported:
            self._reported[(info.key, info.etag)] = True
            log.warning("object %s has unusable metadata, using defaults for: %s", info.key, "; ".join(problems))
        if info.settled and not is_dir and st.complete:
            self._versions[info.key] = (info.etag, info.mtime_ns, st)
        return st

    def _proven(self, info: ObjectInfo) -> Stat | None:
        """The attributes of the version a listing shows, when a settled HEAD described that very version."""
        version = self._versions.get(info.key)
        if version is None or version[:2] != (info.etag, info.mtime_ns):
            return None
        return version[2]

    async def list(self, path: str) -> dict[str, Stat]:
        """Children of a directory, name -> attributes (possibly incomplete: a listing has no metadata)."""
        listing = self.listings.get(path)
        if listing is None:
            listing = await self._listing_from_s3(path)
        elif self.known_listings.get(path) is not listing:
            self.known_listings[path] = listing  # one made here (mkdir) or before a restart of the LRU
        merged = dict(listing)
        prefix = f"{path}/" if path else ""
        for p, st in self.pending.items():
            if parent_of(p) == path and p.startswith(prefix):
                merged[name_of(p)] = st
        return merged

    async def _listing_from_s3(self, path: str) -> dict[str, Stat]:
        """S3's listing of ``path``; when S3 is down or does not answer within LIST_WITHIN, what the mount knows
        of the directory (its last listing, or its cached files) if it knows anything (contract 5: what the
        mount holds stays usable). A listing that is only slow keeps going in the background and is kept."""
        known = self._known_listing(path)
        if known is None or self.spawner is None:
            return await self._fetch_and_keep(path)
        fetch = self._listing.get(path)
        if fetch is None:
            fetch = self._listing[path] = _ListingFetch()
            self.spawner.start_soon(self._fetch_in_background, path, fetch, name=f"list {path!r}")
        while True:
            await self._wait(fetch.done, LIST_WITHIN)
            slow = self._s3_slow()
            if fetch.done.is_set() or slow or time.monotonic() - fetch.page_at >= LIST_WITHIN:
                break
            # S3 answers page after page (a directory of thousands): a healthy S3's listing is on its way.
        if fetch.listing is not None:
            return fetch.listing
        if fetch.error is not None and fetch.error.errno != errno.EIO:
            raise fetch.error  # S3 answered (ENOENT, EACCES): not an outage
        why = (fetch.error.message if fetch.error is not None else "S3 keeps reads waiting for their answers"
               if slow else f"S3 did not list it within {LIST_WITHIN:g}s")
        self.known_listing_answers += 1
        if not self._listings_degraded:
            self._listings_degraded = True
            # The outage's one line, unless a stat's fallback has said it already (then only INFO).
            first = not self._s3_down
            self._s3_down = self._s3_down or fetch.error is not None or slow
            log.log(logging.WARNING if first else logging.INFO,
                    "listing %r: %s; listings are answered with what this mount knows (its last listing of "
                    "each directory, its cached files) until S3 lists again%s", path, why,
                    f"; serving last known attributes and cached data meanwhile: {self._served_from()}"
                    if first else "")
        return known

    async def _fetch_and_keep(self, path: str, fetch: _ListingFetch | None = None) -> dict[str, Stat]:
        proven: dict[str, Stat] = {}
        fetch = fetch or _ListingFetch()
        with self._watch(path) as watch:
            listing = await self._fetch_listing(path, proven, fetch.page)
        # A slow answer is no end of the outage (its last page is what counts: a long listing takes its time).
        if self._listings_degraded and self._in_time(fetch.page_at):
            self._listings_degraded = False
            log.info("S3 lists again; listings come from S3")
        if watch.changed:
            self._stale(path)
        else:
            self.listings[path] = listing
            self.known_listings[path] = listing  # the same dict: our own changes update both
            for child, st in proven.items():  # S3's answer for each, as a HEAD's: a lookup of it asks S3 no more
                if child not in self.pending:
                    self._store(child, st)
        self._prefetch(path, listing)
        return listing

    async def _fetch_in_background(self, path: str, fetch: _ListingFetch) -> None:
        try:
            fetch.listing = await self._fetch_and_keep(path, fetch)
        except FsError as exc:
            fetch.error = exc
        except Exception as exc:  # a bug: this `ls` fails with EIO and a log line, the mount goes on
            log.exception("listing %r: internal error", path)
            fetch.error = FsError(errno.EIO, f"listing {path!r}: internal error {exc!r}", level=logging.ERROR)
        finally:
            fetch.done.set()
            if self._listing.get(path) is fetch:
                del self._listing[path]

    def _known_listing(self, path: str) -> dict[str, Stat] | None:
        """What the mount knows of a directory's entries without S3: its last listing, else (after a restart) the
        cached files and directories below it. None: it knows nothing, and only S3 can answer."""
        known = self.known_listings.get(path)
        if known is not None:
            return known
        if self.cache is None:
            return None
        prefix = self.keys.dir_prefix(path)
        if not self.cache.has_below(prefix):
            return None
        children: dict[str, Stat] = {}
        for key in list(self.cache.entries):  # after a restart, in an outage: once per directory listed
            if not key.startswith(prefix):
                continue
            name, below, _rest = key[len(prefix):].partition("/")
            if not name or name in children:
                continue
            child = f"{path}/{name}" if path else name
            if below:
                children[name] = implicit_dir(self.defaults, self.root_stat.mtime_ns, complete=False)
            else:
                children[name] = self.last_known.get(child) or self._cached_stat(child) or \
                    self._cached_file(key)
        return children

    def _cached_file(self, key: str) -> Stat:
        """A cached object whose attributes the index did not keep: a file of unknown type for a listing (no type
        bits reach the kernel, so an inode it has of another type is never made bad; a lookup tells)."""
        entry = self.cache.entries[key] if self.cache is not None else None
        size, etag = (entry.size, entry.etag) if entry is not None else (0, None)
        return Stat(mode=stat_mod.S_IFREG | self.defaults.file_mode, uid=self.defaults.uid, gid=self.defaults.gid,
                    size=size, mtime_ns=self.root_stat.mtime_ns, etag=etag, complete=False, kind_known=False)

    def _prefetch(self, path: str, listing: dict[str, Stat]) -> None:
        """A listing has no metadata; `ls -l` then stats every entry one by one. Fetch the attributes of
        the entries in parallel in the background, so those stats find them cached."""
        if self.spawner is None:
            return
        todo = [(f"{path}/{name}" if path else name, st.is_dir) for name, st in listing.items()
                if not st.complete]
        todo = [(p, is_dir) for p, is_dir in todo[:PREFETCH_MAX] if p not in self._prefetching]
        if not todo:
            return
        for child, _ in todo:
            self._prefetching[child] = trio.Event()
        self.spawner.start_soon(self._prefetch_all, todo, name=f"prefetch attributes of {path!r}")

    async def _prefetch_all(self, paths: Sequence[tuple[str, bool]]) -> None:
        limiter = trio.CapacityLimiter(PREFETCH_PARALLEL)
        try:
            async with trio.open_nursery() as nursery:
                for child, is_dir in paths:
                    nursery.start_soon(self._prefetch_one, child, is_dir, limiter)
        finally:
            for child, _ in paths:  # also when cancelled: nobody may wait forever
                event = self._prefetching.pop(child, None)
                if event is not None:
                    event.set()

    async def _prefetch_one(self, path: str, is_dir: bool, limiter: trio.CapacityLimiter) -> None:
        try:
            failpoint("prefetch")
            async with limiter:
                key = self.keys.dir_prefix(path) if is_dir else self.keys.key(path)
                with self._watch(path) as watch:
                    info = await self.store.head(key)
                    st = None if info is None else self.parse(info, is_dir=is_dir)
                    if st is None and is_dir:
                        # No marker: only the listing's prefix says a directory is here, and a prefix can be
                        # gone by now (the keys below deleted elsewhere, a file of that name written) or never
                        # have been one (MinIO lists "name/" for a moment while the object "name" is written or
                        # deleted). Asked as a stat asks: the object, else the keys below; never the defaults
                        # of a directory nothing proves (a chmod of it would PUT a stray marker).
                        st = await self._fetch(path)
            if path in self.pending:
                return
            if watch.changed:
                self._stale(path)
            elif st is not None:
                self._store(path, st)
        except FsError as exc:
            log.debug("prefetching attributes of %s: %s", path, exc)
        except Exception:  # a bug: this entry is just not prefetched; its stat asks S3 itself
            log.exception("prefetching attributes of %s: internal error", path)
        finally:
            event = self._prefetching.pop(path, None)
            if event is not None:
                event.set()

    async def _fetch_listing(self, path: str, proven: dict[str, Stat],
                             on_page: Callable[[], None] | None = None) -> dict[str, Stat]:
        """A listing has names, sizes and ETags, and on MinIO the user metadata too (final attributes, as a
        HEAD's). What a plain one lacks comes from what a HEAD told (of the same version: final; fresh: shown as
        final; older: shown as incomplete, with its type kept), else from defaults (incomplete, and of unknown
        type for objects, which may be symlinks or FIFOs). The entries S3 described in full go to ``proven``."""
        result = await self.store.list_dir(self.keys.dir_prefix(path), on_page)
        children: dict[str, Stat] = {}
        for name in result.subdirs:
            child = f"{path}/{name}" if path else name
            children[name] = self._listed_dir(child)
        for info in result.files:
            name = info.key[len(self.keys.dir_prefix(path)):]
            if not name or name in children:  # a file and a directory of one name: the directory wins
                continue
            child = f"{path}/{name}" if path else name
            st = self.parse(info) if info.metadata is not None else self._proven(info)
            if st is not None:
                proven[child] = st
            children[name] = st or self._listed_object(child, info)
        return children

    def _listed_dir(self, path: str) -> Stat:
        fresh = self.stats.get(path)
        if fresh is not None and fresh.stat.is_dir:
            return fresh.stat
        known = self.last_known.get(path)
        if known is not None and known.is_dir:
            return known if self.trusted() else known.with_(complete=False)
        return implicit_dir(self.defaults, self.root_stat.mtime_ns, complete=False)

    def _listed_object(self, path: str, info: ObjectInfo) -> Stat:
        fresh = self.stats.get(path)
        if fresh is not None and fresh.stat.etag == info.etag:
            return fresh.stat
        known = self.last_known.get(path)
        if known is not None and not known.is_dir and known.etag == info.etag and self.trusted():
            return known  # the feed would have told us of a change of its attributes
        if known is not None and not known.is_dir:  # a listing never changes a known type; a HEAD will
            return known.with_(size=info.size, etag=info.etag, complete=False)
        # Never seen, or a directory we knew (nothing is below it any more): the type is for a HEAD to say,
        # unless the size leaves only a regular file.
        return stat_from_object(info, self.defaults).with_(complete=False, kind_known=info.size >= PATH_MAX)

    async def require_dir(self, path: str) -> Stat:
        st = await self.stat(path)
        if not st.is_dir:
            raise FsError(errno.ENOTDIR, f"{path!r} is not a directory")
        return st

    # -- our own changes, made visible at once --------------------------------------------------------------

    def remember(self, path: str, st: Stat) -> None:
        """``path`` has the attributes ``st`` now (our own change, or one the feed told of)."""
        self._changed(path)
        self._store(path, st)

    def _store(self, path: str, st: Stat) -> None:
        """What S3 answered for ``path`` (or a change made): cached, and shown in the parent's listing."""
        self.stats[path] = CachedStat(st, time.monotonic())
        self.last_known[path] = st
        if st.complete:
            self.standing[path] = st
        else:
            self.standing.pop(path, None)
        self.missing.pop(path, None)
        if st.is_dir:  # things we remembered as missing below it may exist now (a directory moved here)
            for p in [p for p in list(self.missing.keys()) if p.startswith(path + "/")]:
                self.missing.pop(p, None)
        if path:
            for listing in self._parent_listings(path):
                listing[name_of(path)] = st

    def _parent_listings(self, path: str) -> tuple[dict[str, Stat], ...]:
        """The current and the last known listing of ``path``'s parent (often one dict, kept in both)."""
        parent = parent_of(path)
        found = [self.listings.get(parent), self.known_listings.get(parent)]
        unique = {id(listing): listing for listing in found if listing is not None}
        return tuple(unique.values())

    def vanished(self, path: str) -> None:
        """A HEAD found nothing at ``path``: every later stat, lookup and listing says so too (stat and open
        agree)."""
        if path not in self.pending:
            self._drop(path)

    def forget(self, path: str) -> None:
        """``path`` no longer exists (we deleted or renamed it, or the feed told of its removal)."""
        self._changed(path)
        self._drop(path)

    def _drop(self, path: str) -> None:
        """Nothing is at ``path`` (S3 said so, or a change made it so)."""
        self.stats.pop(path, None)
        self.standing.pop(path, None)
        self.last_known.pop(path, None)
        self.pending.pop(path, None)
        self.listings.pop(path, None)
        self.known_listings.pop(path, None)
        self.missing[path] = True
        for listing in self._parent_listings(path):
            listing.pop(name_of(path), None)

    def invalidate(self, path: str) -> None:
        """Someone else changed ``path``: the next stat asks S3, the next listing of its parent lists again.
        What a HEAD last told (``last_known``) stays, for while S3 is down."""
        self._changed(path)
        self.stats.pop(path, None)
        self.standing.pop(path, None)
        self.missing.pop(path, None)
        self.listings.pop(path, None)
        self.listings.pop(parent_of(path), None)

    def forget_tree(self, path: str) -> None:
        for watched in [p for p in self._watched if p.startswith(path + "/")]:
            self._changed(watched)
        for cache in (self.stats, self.listings, self.standing, self.known_listings):
            for p in [p for p in list(cache.keys()) if p.startswith(path + "/")]:
                cache.pop(p, None)
        self.forget(path)

    def set_pending(self, path: str, st: Stat) -> None:
        self._changed(path)
        self.pending[path] = st
        self.missing.pop(path, None)
        for listing in self._parent_listings(path):
            listing[name_of(path)] = st

    def settle(self, path: str, st: Stat) -> None:
        """The file at ``path`` is now in S3 with attributes ``st``."""
        self.pending.pop(path, None)
        self.remember(path, st)


    # -- answers that arrive after a change ----------------------------------------------------------------

    def watch(self, path: str) -> _Watch:
        """For fetches made outside the namespace (the anti-entropy pass's listings): see ``_watch``."""
        return self._watch(path)

    def _watch(self, path: str) -> _Watch:
        """Around a fetch of ``path`` (a HEAD, or the listing of a directory): ``.changed`` afterwards says
        whether a change to it arrived meanwhile."""
        return _Watch(self._watched, path)

    def _changed(self, path: str) -> None:
        """A change to ``path``, which is also one to its parent's listing: answers under way for either are
        older than it."""
        # What we served without S3's answer is older than this change, and so is an answer under way: a later
        # stat asks S3 anew rather than share it (that answer itself is not stored, see ``_Watch``).
        self._fell_back.pop(path, None)
        self._revalidating.pop(path, None)
        for p in (path, parent_of(path)) if path else (path,):
            counts = self._watched.get(p)
            if counts is not None:
                counts[1] += 1

    def _stale(self, path: str) -> None:
        self.stale_answers += 1
        log.debug("%s changed while S3's answer was on its way: the answer is not kept", path)


class _Watch:
    """A fetch under way for ``path``. S3 may answer before a change (a close on another mount, a record of a
    foreign writer, our own unlink) and the answer be read after the change was applied: stored, it would undo
    the change, and while the feed is trusted nothing would ask S3 again before --dir-cache-time (or, with
    standing attributes, ever). So an answer is stored only when no change to its path arrived meanwhile.
    The counts live only while a fetch of the path is under way, so the map stays as small as the fetches."""

    def __init__(self, watched: dict[str, list[int]], path: str) -> None:
        self.watched, self.path = watched, path
        self.changed = False
        self._seen = 0

    def __enter__(self) -> _Watch:
        counts = self.watched.setdefault(self.path, [0, 0])
        counts[0] += 1
        self._seen = counts[1]
        return self

    def __exit__(self, *exc: object) -> None:
        counts = self.watched[self.path]
        self.changed = counts[1] != self._seen
        counts[0] -= 1
        if counts[0] == 0:
            del self.watched[self.path]


class _HeadFetch:
    """One revalidation of a path under way (``Namespace._revalidate``), started at ``started`` (monotonic) for a
    stat that asked for an answer no older than ``max_age``."""

    def __init__(self, started: float, max_age: float | None) -> None:
        self.started, self.max_age = started, max_age
        self.done = trio.Event()
        self.stat: Stat | None = None
        self.error: FsError | None = None


class _ListingFetch:
    """One listing of a directory under way; every `ls` of it meanwhile waits on the same one."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.listing: dict[str, Stat] | None = None
        self.error: FsError | None = None
        # When it was asked for, then when its last page came in: stamped by the listing's worker thread (a float
        # assignment), only read on the trio side.
        self.page_at = time.monotonic()

    def page(self) -> None:
        self.page_at = time.monotonic()


def _never() -> bool:
    return False
