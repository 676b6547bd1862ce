"""The read path: a cache hit reads the local file; a miss reads S3 with ranged GETs.

``CloudReader`` splits the object into chunks fetched with ranged GETs pinned to the ETag the file was opened
with (a changed object answers ESTALE, never a mix of versions). Sequential access widens a read-ahead window
of parallel chunk fetches; random access fetches only the chunks it touches. Fetches run in the mount's
nursery so they overlap with the kernel's next request.

Memory: every chunk, fetching or fetched, is charged to the mount's one :class:`MemoryBudget` (shared with the
write buffers) before its GET starts, and released when the chunk is dropped. A chunk a read needs waits for
budget (back-pressure); read-ahead is only started when the budget has room. A reader keeps at most
``max_readahead + 2`` chunks (least recently used dropped first, so a backward scan keeps a few chunks, not the
whole file), and gives back its idle chunks when another read waits for budget.

State: a reader and its chunks belong to the trio thread; only the GET runs in a worker thread (in the store),
and its result is stored by the trio task that awaited it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from hybridfs.core.budget import MemoryBudget
from hybridfs.errors import FsError
from hybridfs.tasks import Spawner, failpoint
from hybridfs.tiers.cache import LocalCache, Sums, verify_blocks
from hybridfs.tiers.s3 import CloudStore

log = logging.getLogger("hybridfs.reader")

PREFETCH_WINDOW = 8 * 1024**2  # a cache read that missed memory has the kernel read this much around it
KEEP_EXTRA = 2  # chunks a reader keeps beyond its read-ahead window (the one being read, one behind it)


@dataclass(frozen=True)
class ReadSettings:
    chunk_size: int = 4 * 1024**2
    max_readahead: int = 8  # chunks fetched ahead of a sequential reader
    # The mount's memory budget (shared with the write buffers); None: a budget of this reader's own.
    budget: MemoryBudget | None = field(default=None, compare=False)


@dataclass
class Chunk:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes = b""
    error: FsError | None = None
    charged: int = 0  # bytes of the budget this chunk holds
    users: int = 0  # reads waiting on or copying from it: never dropped meanwhile
    dropped: bool = False  # dropped while its GET was in flight: the fetch releases the charge


class CloudReader:
    def __init__(self, store: CloudStore, key: str, etag: str, size: int, settings: ReadSettings,
                 spawner: Spawner) -> None:
        self.store = store
        self.key = key
        self.etag = etag
        self.size = size
        self.settings = settings
        self.spawner = spawner
        self.budget = settings.budget or MemoryBudget(settings.chunk_size * (settings.max_readahead + KEEP_EXTRA))
        self.chunks: OrderedDict[int, Chunk] = OrderedDict()  # least recently used first
        self.next_expected = 0
        self.window = 0  # current read-ahead, in chunks; grows while access stays sequential
        self.keep = settings.max_readahead + KEEP_EXTRA
        self.budget.add_reclaimer(self)

    async def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        cs = self.settings.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        self._adapt_window(offset, last)
        needed = range(first, last + 1)
        held = await self._needed(needed)
        try:
            self._read_ahead(last)
            pieces = []
            for index, chunk in zip(needed, held, strict=True):
                await chunk.done.wait()
                if chunk.error is not None:
                    self._drop(index)
                    raise chunk.error
                start = max(offset - index * cs, 0)
                end = min(offset + length - index * cs, cs)
                pieces.append(chunk.data[start:end])
        finally:
            for chunk in held:
                chunk.users -= 1
        self.next_expected = offset + length
        self._trim(first)
        return b"".join(pieces)

    def _adapt_window(self, offset: int, last: int) -> None:
        if offset == self.next_expected:
            self.window = min(max(1, self.window * 2), self.settings.max_readahead)
        else:
            self.window = 0

    def _chunk_count(self) -> int:
        return (self.size + self.settings.chunk_size - 1) // self.settings.chunk_size

    def _length(self, index: int) -> int:
        cs = self.settings.chunk_size
        return min(cs, self.size - index * cs)

    async def _needed(self, needed: range) -> list[Chunk]:
        """The chunks of one read, started if need be, each marked in use. Their memory is asked for at once
        (two reads each holding one chunk and waiting for a second could otherwise wait for each other); when
        the budget is spent this waits (back-pressure), after idle chunks of every reader were given back."""
        # Awaiting the budget lets other reads run, which may drop chunks of this one: check again after it.
        while missing := [i for i in needed if i not in self.chunks]:
            want = sum(self._length(i) for i in missing)
            if want > self.budget.free:
                self.budget.reclaim(want - self.budget.free)
            charged = await self.budget.acquire(want)
            for index in missing:  # another read of this file may have started some meanwhile
                if index not in self.chunks:
                    share = min(self._length(index), charged)
                    charged -= share
                    self._start(index, share)
            self.budget.release(charged)
        held = []
        for index in needed:
            chunk = self.chunks[index]
            chunk.users += 1
            self.chunks.move_to_end(index)
            held.append(chunk)
        return held

    def _read_ahead(self, last: int) -> None:
        """Start the window's chunks while the budget has room for them (speculation never waits)."""
        for index in range(last + 1, min(last + self.window, self._chunk_count() - 1) + 1):
            if index in self.chunks:
                continue
            charged = self.budget.try_acquire(self._length(index))
            if charged is None:
                break
            self._start(index, charged)

    def _start(self, index: int, charged: int) -> Chunk:
        chunk = Chunk(charged=charged)
        self.chunks[index] = chunk
        self.spawner.start_soon(self._fetch, index, chunk, name=f"fetch {self.key}@{index}")
        return chunk

    async def _fetch(self, index: int, chunk: Chunk) -> None:
        start = index * self.settings.chunk_size
        try:
            failpoint("fetch")
            chunk.data = await self.store.get_range(self.key, start, self._length(index), self.etag)
        except FsError as exc:
            chunk.error = exc
        except Exception as exc:  # a bug must reach the reader as EIO, never as a silently short chunk
            log.exception("fetching %s chunk %d: internal error", self.key, index)
            chunk.error = FsError(errno.EIO, f"GET {self.key} chunk {index}: internal error {exc!r}",
                                  level=logging.ERROR)
        finally:
            chunk.done.set()
            if chunk.dropped:  # nobody will read it: its memory goes back now
                self._release(chunk)
            elif self.budget.shortfall:
                # Reads wait for memory that idle chunks hold (this reader's or another's, perhaps of a file
                # nobody reads now): a chunk landing is when they may become reclaimable, so ask now.
                self.budget.reclaim(self.budget.shortfall)

    def _release(self, chunk: Chunk) -> None:
        chunk.data = b""
        charged, chunk.charged = chunk.charged, 0
        self.budget.release(charged)

    def _drop(self, index: int) -> None:
        chunk = self.chunks.pop(index, None)
        if chunk is None:
            return
        if chunk.done.is_set():
            self._release(chunk)
        else:
            chunk.dropped = True

    def _trim(self, first: int) -> None:
        """After a read at chunk ``first``: drop what a forward reader has passed, then the least recently used
        beyond ``keep`` chunks (a backward or random reader never passes anything)."""
        if self.window:
            for index in [i for i in self.chunks if i < first - 1]:
                self._drop(index)
        for index in list(self.chunks):
            if len(self.chunks) <= self.keep:
                break
            if self.chunks[index].users == 0:
                self._drop(index)
        if self.budget.shortfall:  # others wait for memory: what this reader keeps "just in case" goes first
            self.give_back(self.budget.shortfall)

    def give_back(self, nbytes: int) -> int:
        """Drop idle fetched chunks, least recently used first, until ``nbytes`` are freed; returns the bytes."""
        freed = 0
        for index in list(self.chunks):
            if freed >= nbytes:
                break
            chunk = self.chunks[index]
            if chunk.users == 0 and chunk.done.is_set():
                freed += chunk.charged
                self._drop(index)
        return freed

    def close(self) -> None:
        self.budget.remove_reclaimer(self)
        for index in list(self.chunks):
            self._drop(index)


class CacheReader:
    """Reads one cached version through a file descriptor opened at ``open()``, verifying every block it
    returns against the checksums stored with it. A block that fails raises FsError (the filesystem then reads
    from S3 instead and logs why) after the copy was dropped and a new hydration asked for.

    Only whole blocks are read (a 128 KiB FUSE read is four), so every byte served was verified."""

    def __init__(self, cache: LocalCache, key: str, etag: str, fd: int, sums: Sums) -> None:
        self.cache = cache
        self.key = key
        self.etag = etag
        self.fd = fd
        self.sums = sums

    @classmethod
    async def open(cls, cache: LocalCache, key: str, etag: str) -> CacheReader | None:
        opened = await cache.open_verified(key, etag)
        if opened is None:
            return None
        return cls(cache, key, etag, *opened)

    async def read(self, offset: int, length: int) -> bytes:
        blocks = self.sums.blocks(offset, length)
        if not blocks:
            return b""
        start = blocks.start * self.sums.block
        end = min(blocks.stop * self.sums.block, self.sums.size)
        data = await self._pread(start, end - start)
        bad = verify_blocks(self.sums, blocks.start, data)
        if bad is not None:
            why = f"block {bad} fails its checksum" if len(data) == end - start else "file shorter than indexed"
            await self.cache.corrupt(self.key, self.etag, why)
            raise FsError(errno.EIO, f"cache copy of {self.key} is corrupt ({why}); dropped it",
                          level=logging.WARNING)
        return data[offset - start:offset - start + length]

    async def _pread(self, offset: int, length: int) -> bytes:
        fd = self.fd
        try:
            # Pages already in memory are read inline: a thread hop costs ~60x the copy. RWF_NOWAIT makes the
            # kernel refuse (EAGAIN) instead of blocking the trio loop on the disk; only then use a thread.
            buf = bytearray(length)
            n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
            if n == length:
                return bytes(buf)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EAGAIN):
                raise FsError(exc.errno or errno.EIO, f"cache read of {self.key}: {exc}",
                              level=logging.WARNING) from exc
        def read_and_prefetch() -> bytes:
            data = os.pread(fd, length, offset)
            # The pages were not in memory (never read, or reclaimed: this VM's kernel reclaims idle page cache
            # within seconds). Ask the kernel to read the region around them in the background, so that the
            # next reads nearby - sequential or random - are served inline again instead of by a thread each.
            start = offset - offset % PREFETCH_WINDOW
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, start, PREFETCH_WINDOW, os.POSIX_FADV_WILLNEED)
            return data

        try:
            return await trio.to_thread.run_sync(read_and_prefetch, limiter=self.cache.limiter)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO, f"cache read of {self.key}: {exc}",
                          level=logging.WARNING) from exc

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError as exc:
            log.debug("closing cache fd of %s: %s", self.key, exc)
