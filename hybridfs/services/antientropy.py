"""Anti-entropy: while local metadata is trusted, nothing a mount's consumers missed stands longer than --max-stale.

::

    every max_stale/2 s, while trusted:  the directories in use --LIST (metadata lane)--> names and ETags
        -> compared with what the mount may serve without asking S3 (coherence.disagrees)
        -> a difference: coherence.invalidate_key (namespace, listing, kernel entry and inode, older cached copy)

Trusted mode (docs/semantics.md, "Trusted mode") rests on every change reaching the mount as a record. A record
can be lost for good: a mount cut off Kafka while the others stay caught up publishes nothing until it comes back
(or ever, if it is killed before its outbox), a bucket may drop notifications, a request whose answer was lost
publishes only "ask S3". Without a bound, what the mount knows would then stand until the next change of the key.
This pass bounds it: each directory the mount serves something of without asking S3 (its attributes, standing or
fresh, its listing, the entries and attributes the kernel was given) is listed again, and every entry whose ETag
(or presence) differs from what the mount holds is invalidated, so the next access asks S3.

A change made just after a directory's LIST is seen by the next pass's LIST: at most ``interval`` plus one pass
later, so a pass starts every ``max_stale / 2`` s and the bound holds while a pass takes at most as long (logged
once when one takes longer). A listing that a change from the feed or this mount overtook is not used (the next
pass lists again). Not seen by a listing: a metadata-only change that keeps the ETag (a copy onto itself).

Outside trusted mode no pass runs: the mount revalidates with the timers (--attr-timeout, --dir-cache-time) then.
Nor does one run while every timer is within --max-stale and no attributes stand (without S3 event records, with
the default timers): what the mount serves expires within the bound by itself.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import trio

from hybridfs.core.coherence import disagrees, invalidate_key
from hybridfs.core.paths import name_of, parent_of
from hybridfs.errors import FsError

if TYPE_CHECKING:
    from hybridfs.core.filesystem import Filesystem

__all__ = ["AntiEntropy"]

log = logging.getLogger("hybridfs.services.antientropy")

LISTS_AT_ONCE = 4  # of the metadata lane's threads (--s3-threads): stats and listings keep the rest


class AntiEntropy:
    def __init__(self, fs: Filesystem, max_stale: float) -> None:
        self.fs = fs
        self.max_stale = max_stale
        self.interval = max_stale / 2
        self.passes = 0
        self.listed = 0  # directories listed, all passes
        self.invalidated = 0  # entries found to differ from S3, all passes
        self.overtaken = 0  # listings not used: a change to the directory arrived while it was on its way
        self.failed = 0  # listings S3 did not answer
        self.last_pass_seconds: float | None = None
        self.last_dirs = 0
        self._slow_said = False
        self._limiter = trio.CapacityLimiter(LISTS_AT_ONCE)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_start = trio.current_time() + self.interval
        while True:
            await trio.sleep_until(next_start)
            # A fixed schedule: a change just missed by one pass is seen by the next one, interval later.
            next_start = max(next_start + self.interval, trio.current_time())
            if self.needed():
                await self.one_pass()

    def needed(self) -> bool:
        """Only while trusted, and only when something can stand longer than --max-stale: attributes standing until
        a record arrives (with S3 event records), or timers set longer than it (the default 5 s and 1 s are not:
        what the mount serves then expires within the bound by itself, and no LIST is spent)."""
        ns = self.fs.ns
        if not ns.trusted():
            return False
        timers = max(ns.stats.ttl, ns.listings.ttl, ns.missing.ttl, self.fs.settings.attr_timeout)
        return ns.lasting() or timers > self.max_stale

    async def one_pass(self) -> int:
        """List every directory in use and invalidate what differs; the number of entries invalidated."""
        began = time.monotonic()
        known = self._in_use()
        found = 0

        async def check(directory: str, names: set[str]) -> None:
            nonlocal found
            async with self._limiter:
                differed = await self._check(directory, names)
            found += differed
            self.invalidated += differed  # as it goes: the status says so while a slow pass is still listing

        async with trio.open_nursery() as nursery:
            for directory, names in known.items():
                nursery.start_soon(check, directory, names)
        took = time.monotonic() - began
        self.passes += 1
        self.last_pass_seconds, self.last_dirs = took, len(known)
        if took > self.interval and not self._slow_said:
            self._slow_said = True
            log.info("an anti-entropy pass over %d directories took %.1fs, more than --max-stale/2 (%.1fs): changes "
                     "whose records were lost may stand longer than --max-stale", len(known), took, self.interval)
        if found:
            log.info("anti-entropy: %d entries differed from S3 (their records never reached this mount); "
                     "invalidated", found)
        return found

    def _in_use(self) -> dict[str, set[str]]:
        """Directory -> names in it that the mount may answer for without asking S3 (attributes, "missing")."""
        ns, fs = self.fs.ns, self.fs
        known: dict[str, set[str]] = defaultdict(set)
        for path in [*ns.stats.keys(), *ns.standing.keys(), *ns.missing.keys()]:
            if path:
                known[parent_of(path)].add(name_of(path))
        for directory, listing in list(ns.listings.items()):
            known[directory].update(listing)
        for node in list(fs.inodes.by_ino.values()):
            if node.path and not node.unlinked and (node.attr_etag is not None or node.kernel_etag is not None):
                known[parent_of(node.path)].add(name_of(node.path))
        return known

    async def _check(self, directory: str, names: set[str]) -> int:
        fs = self.fs
        prefix = fs.keys.dir_prefix(directory)
        try:
            with fs.ns.watch(directory) as watch:
                listing = await fs.store.list_dir(prefix)
        except FsError as exc:
            self.failed += 1
            log.debug("anti-entropy: listing %r failed: %s", directory, exc.message)
            return 0
        self.listed += 1
        if watch.changed:  # older than a change applied meanwhile: the next pass lists again
            self.overtaken += 1
            return 0
        files = {info.key[len(prefix):]: info for info in listing.files}
        subdirs = set(listing.subdirs)
        # Judged all at once, with no await since S3's answer (nothing can change meanwhile); applied one by one,
        # each only if nothing told the mount anew of the path since (a commit of ours, a record, a HEAD: what
        # the mount holds is then newer than this listing, and the next pass judges it).
        differing: list[tuple[str, str | None, int | None, tuple[object, ...]]] = []
        for name in names | files.keys():
            if name in subdirs:
                continue
            info = files.get(name)
            path = f"{directory}/{name}" if directory else name
            etag = info.etag if info is not None else None
            if disagrees(fs, path, etag):
                differing.append((name, etag, info.size if info is not None else None, self._view(path)))
        gone = self._gone_dirs(directory, names - subdirs - files.keys())
        found = self._check_listing(directory, subdirs)
        for name, etag, size, seen in differing:
            path = f"{directory}/{name}" if directory else name
            if self._view(path) != seen:
                continue
            if await invalidate_key(fs, prefix + name, removed=etag is None, etag=etag, size=size):
                found += 1
        for path, seen in gone:
            # Asked of S3 again; its kernel entry stays (dropping a directory's entry unhashes the working
            # directory of every process inside it): a lookup finds it gone.
            if self._view(path) == seen:
                await fs.invalidate_key(fs.keys.dir_prefix(path), removed=True)
                found += 1
        return found

    def _check_listing(self, directory: str, subdirs: set[str]) -> int:
        """A listing of ``directory`` that lacks a subdirectory S3 has is dropped: the next readdir lists again."""
        listing = self.fs.ns.listings.get(directory)
        if listing is not None and any(name not in listing for name in subdirs):
            self.fs.ns.listings.pop(directory, None)
            return 1
        return 0

    def _gone_dirs(self, directory: str, absent: set[str]) -> list[tuple[str, tuple[object, ...]]]:
        """The directories among ``absent`` (names S3 no longer lists) that the mount holds as existing."""
        ns = self.fs.ns
        gone = []
        for name in absent:
            path = f"{directory}/{name}" if directory else name
            cached = ns.stats.get(path)
            st = cached.stat if cached is not None else ns.standing.get(path)
            if st is not None and st.is_dir:
                gone.append((path, self._view(path)))
        return gone

    def _view(self, path: str) -> tuple[object, ...]:
        """What the mount holds of ``path`` (compared before and after an await: changed means told anew). Not
        the parent's listing: the invalidation of a sibling drops it, and that tells nothing of this path."""
        ns = self.fs.ns
        node = self.fs.inodes.existing(path)
        return (ns.stats.get(path), ns.standing.get(path), path in ns.missing,
                (node.ino, node.attr_etag, node.kernel_etag) if node is not None else None)

    def status(self) -> dict[str, Any]:
        return {"max_stale": self.max_stale, "passes": self.passes, "directories_last_pass": self.last_dirs,
                "last_pass_seconds": None if self.last_pass_seconds is None else round(self.last_pass_seconds, 3),
                "listed": self.listed, "invalidated": self.invalidated, "overtaken": self.overtaken,
                "failed": self.failed}
