"""The read path: a cache hit reads the local file; a miss reads S3 with ranged GETs.

``CloudReader`` splits the object into chunks fetched with ranged GETs pinned to the ETag the file was opened
with (a changed object answers ESTALE, never a mix of versions). Sequential access widens a read-ahead window
of parallel chunk fetches; random access fetches only the chunks it touches. Fetches run in the mount's
nursery so they overlap with the kernel's next request; memory is bounded by the window.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

import trio

from hybridfs.errors import FsError
from hybridfs.tasks import Spawner, failpoint
from hybridfs.tiers.cache import LocalCache, Sums, verify_blocks
from hybridfs.tiers.s3 import CloudStore

log = logging.getLogger("hybridfs.reader")


@dataclass(frozen=True)
class ReadSettings:
    chunk_size: int = 4 * 1024**2
    max_readahead: int = 8  # chunks fetched ahead of a sequential reader


@dataclass
class Chunk:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes = b""
    error: FsError | None = None


class CloudReader:
    def __init__(self, store: CloudStore, key: str, etag: str, size: int, settings: ReadSettings,
                 spawner: Spawner) -> None:
        self.store = store
        self.key = key
        self.etag = etag
        self.size = size
        self.settings = settings
        self.spawner = spawner
        self.chunks: dict[int, Chunk] = {}
        self.next_expected = 0
        self.window = 0  # current read-ahead, in chunks; grows while access stays sequential

    async def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        cs = self.settings.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        self._adapt_window(offset, last)
        for index in range(first, min(last + self.window, self._chunk_count() - 1) + 1):
            self._start(index)
        pieces = []
        for index in range(first, last + 1):
            chunk = self.chunks[index]
            await chunk.done.wait()
            if chunk.error is not None:
                self.chunks.pop(index, None)
                raise chunk.error
            start = max(offset - index * cs, 0)
            end = min(offset + length - index * cs, cs)
            pieces.append(chunk.data[start:end])
        self.next_expected = offset + length
        self._drop_before(first)
        return b"".join(pieces)

    def _adapt_window(self, offset: int, last: int) -> None:
        if offset == self.next_expected:
            self.window = min(max(1, self.window * 2), self.settings.max_readahead)
        else:
            self.window = 0

    def _chunk_count(self) -> int:
        return (self.size + self.settings.chunk_size - 1) // self.settings.chunk_size

    def _start(self, index: int) -> None:
        if index not in self.chunks:
            chunk = Chunk()
            self.chunks[index] = chunk
            self.spawner.start_soon(self._fetch, index, chunk, name=f"fetch {self.key}@{index}")

    async def _fetch(self, index: int, chunk: Chunk) -> None:
        cs = self.settings.chunk_size
        start = index * cs
        try:
            failpoint("fetch")
            chunk.data = await self.store.get_range(self.key, start, min(cs, self.size - start), self.etag)
        except FsError as exc:
            chunk.error = exc
        except Exception as exc:  # a bug must reach the reader as EIO, never as a silently short chunk
            log.exception("fetching %s chunk %d: internal error", self.key, index)
            chunk.error = FsError(errno.EIO, f"GET {self.key} chunk {index}: internal error {exc!r}",
                                  level=logging.ERROR)
        finally:
            chunk.done.set()

    def _drop_before(self, first: int) -> None:
        for index in [i for i in self.chunks if i < first]:
            del self.chunks[index]

    def close(self) -> None:
        self.chunks.clear()


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
        try:
            return await trio.to_thread.run_sync(lambda: os.pread(fd, length, offset),
                                                 limiter=self.cache.limiter)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO, f"cache read of {self.key}: {exc}",
                          level=logging.WARNING) from exc

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError as exc:
            log.debug("closing cache fd of %s: %s", self.key, exc)
