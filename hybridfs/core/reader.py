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
import enum
import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
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
    users: int = 0  # reads waiting on or copying from it: its bytes stay until the last of them is done
    dropped: bool = False  # no longer in the reader's table: freed once its GET landed and no read uses it


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
        self.closed = False
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
                piece = chunk.data[start:end]
                if len(piece) != end - start:  # the kernel takes a short read as EOF: never answer one
                    raise FsError(errno.EIO, f"GET {self.key} (ETag {self.etag}) chunk {index}: {len(chunk.data)} "
                                  f"bytes where the size it was opened with ({self.size}) needs "
                                  f"{self._length(index)}: that size and that ETag disagree",
                                  level=logging.ERROR)
                pieces.append(piece)
        finally:
            for chunk in held:
                chunk.users -= 1
                self._free_if_unused(chunk)
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
            if self.closed:  # closed while we waited: nothing may be started, nor the charge kept for good
                self.budget.release(charged)
                raise FsError(errno.EBADF, f"reader of {self.key} closed while a read waited for memory",
                              level=logging.ERROR)
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
        if self.closed:
            return
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
            if chunk.dropped:  # no longer wanted: its memory goes back now, or when its last read is done
                self._free_if_unused(chunk)
            elif self.budget.shortfall:
                # Reads wait for memory that idle chunks hold (this reader's or another's, perhaps of a file
                # nobody reads now): a chunk landing is when they may become reclaimable, so ask now.
                self.budget.reclaim(self.budget.shortfall)

    def _release(self, chunk: Chunk) -> None:
        chunk.data = b""
        charged, chunk.charged = chunk.charged, 0
        self.budget.release(charged)

    def _drop(self, index: int) -> None:
        """Take a chunk out of the table. Its bytes are freed only when its GET has landed and no read uses it:
        a read waiting on a chunk that a trim, a give-back or a close dropped still gets every byte."""
        chunk = self.chunks.pop(index, None)
        if chunk is None:
            return
        chunk.dropped = True
        self._free_if_unused(chunk)

    def _free_if_unused(self, chunk: Chunk) -> None:
        if chunk.dropped and chunk.users == 0 and chunk.done.is_set():
            self._release(chunk)

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
        """Drop every chunk (those in use are freed by their last read). Closing twice is harmless."""
        self.closed = True
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
        """Close the descriptor once: a second close must never close a number the process reused since."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            os.close(fd)
        except OSError as exc:
            log.debug("closing cache fd of %s: %s", self.key, exc)


Reader = CacheReader | CloudReader


class ReaderState(enum.Enum):
    NONE = "none"
    CLOUD = "cloud"
    SWITCHING = "switching"
    CACHE = "cache"
    CLOSED = "closed"


@dataclass(eq=False)
class _Lease:
    """One reader and the reads using it. A retired reader is closed by whoever finishes with it last."""

    reader: Reader
    users: int = 0
    retired: bool = False

    def retire(self) -> None:
        self.retired = True
        self.close_if_done()

    def close_if_done(self) -> None:
        if self.retired and self.users == 0:
            self.reader.close()


class HandleReader:
    """The reader of one open handle, as a state machine (``state``)::

        NONE ──── first read ──> CACHE (the handle's version is cached)   or   CLOUD (ranged GETs, hydration asked)
        CLOUD ─── a read finds the same version cached ──> SWITCHING ──> CACHE  (or back to CLOUD if it won't open)
        CACHE ─── a cache read fails (checksum, disk error) ──> CLOUD, for good for that version (logged once)
        any ───── the open file now holds another version (a write here was stored) ──> that version's reader
        any ───── release ──> CLOSED

    Why it is written this way (cp of a cold file while the hydrator committed it returned short files): several
    reads of one handle are in flight at once (the kernel's read-ahead), and every ``await`` lets another of them
    swap the reader. So:

    * swaps happen one at a time under the handle's lock, and re-check after taking it; a read that finds a swap
      under way keeps using the current reader instead of waiting;
    * a reader that was replaced is *retired*, and closed by the last read using it: no read loses its chunks or
      its file descriptor under it (``_Lease``); closes are idempotent;
    * a failed cache read falls back once, whichever of the concurrent reads saw it first; the others retry on the
      reader that replaced it.
    """

    def __init__(self, version: Callable[[], tuple[str, str]], open_best: Callable[[], Awaitable[Reader]],
                 open_cloud: Callable[[], CloudReader], cache: LocalCache) -> None:
        self._version = version  # (key, ETag) the open file holds now
        self._open_best = open_best  # the cached copy when there is a good one, else S3 (asks for a hydration)
        self._open_cloud = open_cloud
        self._cache = cache
        self._lease: _Lease | None = None
        self._lock = trio.Lock()
        self._cache_failed: tuple[str, str] | None = None  # a version whose cached copy failed this handle
        self.state = ReaderState.NONE

    @property
    def reader(self) -> Reader | None:
        return self._lease.reader if self._lease is not None else None

    async def read(self, offset: int, length: int) -> tuple[bytes, str]:
        """``length`` bytes at ``offset`` and where they came from ("cache" or "s3")."""
        for _attempt in range(3):  # a cache failure falls back to S3; only a race could need a third try
            lease = await self._current()
            lease.users += 1
            try:
                data = await lease.reader.read(offset, length)
                return data, "cache" if isinstance(lease.reader, CacheReader) else "s3"
            except FsError as exc:
                if not isinstance(lease.reader, CacheReader):
                    raise
                await self._fall_back(lease, exc)
            finally:
                lease.users -= 1
                lease.close_if_done()
        raise FsError(errno.EIO, "the cached copy kept failing and no S3 reader took over (internal error)",
                      level=logging.ERROR)

    def close(self) -> None:
        """Release: the current reader is closed once the reads still using it are done. Idempotent."""
        if self.state is ReaderState.CLOSED:
            return
        self.state = ReaderState.CLOSED
        if self._lease is not None:
            self._lease.retire()

    def _check_open(self) -> None:
        if self.state is ReaderState.CLOSED:
            raise FsError(errno.EBADF, "read on a released handle", level=logging.ERROR)

    async def _current(self) -> _Lease:
        self._check_open()
        lease = self._lease
        if lease is not None and (self._lock.locked() or not self._wants_swap(lease)):
            return lease
        async with self._lock:
            self._check_open()
            if self._lease is None or self._wants_swap(self._lease):  # re-check: a swap may have just happened
                await self._swap()
        assert self._lease is not None
        return self._lease

    def _wants_swap(self, lease: _Lease) -> bool:
        version = self._version()
        reader = lease.reader
        if (reader.key, reader.etag) != version:
            return True
        return (isinstance(reader, CloudReader) and version != self._cache_failed
                and self._cache.lookup(*version) is not None)

    async def _swap(self) -> None:
        """Under the lock: install the best reader for the open file's version now."""
        version = self._version()
        old = self._lease
        switching = old is not None and isinstance(old.reader, CloudReader) and \
            (old.reader.key, old.reader.etag) == version
        if switching:
            self.state = ReaderState.SWITCHING
        new: Reader = self._open_cloud() if version == self._cache_failed else await self._open_best()
        if self.state is ReaderState.CLOSED:  # released while the cache copy was being opened
            new.close()
            self._check_open()
        if switching and isinstance(new, CloudReader):
            # The copy is indexed but would not open (dropped or failing its checks): keep the reader we have,
            # with its chunks, and stop trying that copy from this handle.
            new.close()
            self._cache_failed = version
            self.state = ReaderState.CLOUD
            return
        self._install(new)

    def _install(self, reader: Reader) -> None:
        if self._lease is not None:
            self._lease.retire()
        self._lease = _Lease(reader)
        self.state = ReaderState.CACHE if isinstance(reader, CacheReader) else ReaderState.CLOUD

    async def _fall_back(self, failed: _Lease, exc: FsError) -> None:
        async with self._lock:
            if self._lease is not failed or self.state is ReaderState.CLOSED:
                return  # another read of this handle fell back already (or the handle was released)
            reader = failed.reader
            log.warning("%s; reading from S3 instead", exc.message)
            self._cache_failed = (reader.key, reader.etag)
            self._install(self._open_cloud())
            await self._cache.remove(reader.key)
