"""The write path: cloud first, cache second.

Two ways a file's new content reaches S3:

* ``StreamWriter`` — for files written from the start in order (new files, ``O_TRUNC``, ``cp``, ``dd``):
  bytes collect in a part-sized buffer; each full part is teed to the cache and uploaded in the background as
  part of a multipart upload, at most ``max_inflight`` parts at a time, so a writer faster than S3 waits for it
  and memory stays bounded. A file smaller than one part is one PUT at close.
* ``SpoolWriter`` — for everything else (random writes, appends to an existing object, truncation): the file
  is copied to a spool file outside the cache directory (from the cache when it holds that version, else from
  S3), changed there, and uploaded whole at flush.

Either way ``finish()`` returns only when S3 holds the object, and fails with EIO within ``timeout`` seconds,
aborting a multipart upload so no partial object remains. The cache copy is a tee whose failure is reported,
never raised.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import trio

from hybridfs.errors import FsError, io_error
from hybridfs.tiers.cache import LocalCache, TeeFile
from hybridfs.tiers.s3 import MAX_PARTS, CloudStore

log = logging.getLogger("hybridfs.writer")


@dataclass(frozen=True)
class Uploaded:
    etag: str
    size: int
    cached: bool  # the cache holds this version now (False: the tee failed and a hydrate event is due)
    tee_error: str | None = None


class NeedsSpool(Exception):
    """A write the streaming path cannot take (not at the end of what was written)."""


# Background work (part uploads, read-ahead) runs in the mount's nursery, so it is cancelled with the mount.
Spawner = trio.Nursery


@dataclass(frozen=True)
class WriteSettings:
    part_size: int = 8 * 1024**2
    max_inflight: int = 4
    timeout: float = 60.0  # bound on flush/fsync when S3 is down or slow
    spool_dir: Path = Path("/tmp")


def part_size_for(number: int, base: int) -> int:
    """Parts grow every 1,000 so that 10,000 parts reach far beyond 5 TiB without a known file size."""
    return base * (2 ** ((number - 1) // 1000))


class StreamWriter:
    def __init__(self, store: CloudStore, cache: LocalCache, key: str, metadata: dict[str, str],
                 settings: WriteSettings, spawner: Spawner) -> None:
        self.store = store
        self.cache = cache
        self.key = key
        self.metadata = metadata
        self.settings = settings
        self.spawner = spawner
        self.size = 0
        # Incoming writes are kept as they came and joined once per part: one copy per byte, not three.
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.buffer_offset = 0  # file offset of the first buffered byte
        self.upload_id: str | None = None
        self.parts: list[tuple[int, str]] = []
        self.next_part = 1
        self.slots = trio.Semaphore(settings.max_inflight)
        self.error: FsError | None = None
        self.tee = TeeFile(cache)

    async def write(self, offset: int, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if offset != self.size:
            raise NeedsSpool()
        self.chunks.append(data)
        self.buffered += len(data)
        self.size += len(data)
        while self.buffered >= part_size_for(self.next_part, self.settings.part_size):
            await self._cut_part()

    async def _cut_part(self) -> None:
        size = part_size_for(self.next_part, self.settings.part_size)
        if self.next_part > MAX_PARTS:
            raise FsError(errno.EFBIG, f"{self.key}: more than {MAX_PARTS} parts", level=logging.WARNING)
        joined = self._take_buffer()
        data = joined[:size]  # the same object when the part is exactly the buffer
        if len(joined) > size:
            self.chunks, self.buffered = [joined[size:]], len(joined) - size
        offset, self.buffer_offset = self.buffer_offset, self.buffer_offset + size
        if self.upload_id is None:
            self.upload_id = await self.store.create_multipart(self.key, self.metadata)
        number = self.next_part
        self.next_part += 1
        await self.slots.acquire()  # back-pressure: a writer faster than S3 waits here
        self.spawner.start_soon(self._upload_part, number, offset, data, name=f"part {self.key}#{number}")

    async def _upload_part(self, number: int, offset: int, data: bytes) -> None:
        try:
            assert self.upload_id is not None
            upload_id = self.upload_id
            async with trio.open_nursery() as both:  # the local copy and the upload overlap
                both.start_soon(self.tee.write, offset, data)
                etag = await self.store.upload_part(self.key, upload_id, number, data)
            self.parts.append((number, etag))
        except FsError as exc:
            if self.error is None:
                self.error = exc
        finally:
            self.slots.release()

    async def _drain(self) -> None:
        for _ in range(self.settings.max_inflight):
            await self.slots.acquire()
        for _ in range(self.settings.max_inflight):
            self.slots.release()

    def _take_buffer(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks, self.buffered = [], 0
        return data

    @property
    def parts_started(self) -> bool:
        return self.upload_id is not None

    async def finish(self, metadata: dict[str, str]) -> Uploaded:
        """Upload what remains and make the object whole in S3."""
        try:
            with trio.fail_after(self.settings.timeout):
                etag = await self._complete(metadata)
        except trio.TooSlowError:
            await self.abort()
            raise io_error(f"upload of {self.key} did not finish within {self.settings.timeout:.0f}s "
                           "(S3 slow or unreachable); the write is not stored") from None
        except FsError:
            await self.abort()
            raise
        cached = await self.tee.commit(self.key, etag, self.size)
        return Uploaded(etag, self.size, cached, self.tee.failed)

    async def _complete(self, metadata: dict[str, str]) -> str:
        if self.upload_id is None:  # smaller than a part: one PUT
            data = self._take_buffer()
            await self.tee.write(0, data)
            return await self.store.put(self.key, data, metadata)
        if self.buffered:
            data, offset = self._take_buffer(), self.buffer_offset
            await self.slots.acquire()
            number, self.next_part = self.next_part, self.next_part + 1
            self.spawner.start_soon(self._upload_part, number, offset, data)
        await self._drain()
        if self.error is not None:
            raise self.error
        etag = await self.store.complete_multipart(self.key, self.upload_id, self.parts)
        self.upload_id = None
        if metadata != self.metadata:  # attributes changed while streaming (utimens, chmod)
            await self.store.copy(self.key, self.key, metadata)
            info = await self.store.head(self.key)
            etag = info.etag if info else etag
        return etag

    def _parts_in_flight(self) -> bool:
        return self.slots.value < self.settings.max_inflight

    async def abort(self) -> None:
        """Drop the upload now. S3 may still complete a part that was in flight during the abort and keep it,
        so when parts are in flight a background task aborts once more after they have ended."""
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            await self.store.abort_multipart(self.key, upload_id)
            if self._parts_in_flight():
                self.spawner.start_soon(self._abort_after_parts, upload_id, name=f"re-abort {self.key}")
        with trio.CancelScope(shield=True):
            await self.tee.discard()

    async def _abort_after_parts(self, upload_id: str) -> None:
        with trio.move_on_after(self.settings.timeout):
            await self._drain()
        await self.store.abort_multipart(self.key, upload_id)

    async def abandon(self) -> None:
        """At shutdown: wait (bounded) for the parts in flight, then abort, so nothing is left in S3."""
        with trio.move_on_after(self.settings.timeout):
            await self._drain()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            await self.store.abort_multipart(self.key, upload_id)
        with trio.CancelScope(shield=True):
            await self.tee.discard()

    def buffered_bytes(self) -> bytes | None:
        """All content written so far when none of it has left memory yet (the cheap way to spool)."""
        if self.upload_id is not None:
            return None
        data = b"".join(self.chunks)
        return data


class SpoolWriter:
    """A private local copy of the file, changed in place and uploaded whole."""

    def __init__(self, store: CloudStore, cache: LocalCache, key: str, settings: WriteSettings) -> None:
        self.store = store
        self.cache = cache
        self.key = key
        self.settings = settings
        self.path = settings.spool_dir / f"{uuid.uuid4().hex}.spool"
        self.fd: int | None = None
        self.size = 0
        self.dirty = False

    async def _run(self, fn: object) -> object:
        return await trio.to_thread.run_sync(fn, limiter=self.cache.limiter)  # type: ignore[arg-type]

    async def load(self, etag: str | None, size: int, initial: bytes | None = None) -> None:
        """Fill the spool with the current content: ``initial`` bytes, the cached copy, or S3."""
        def create() -> None:
            self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

        try:
            await self._run(create)
        except OSError as exc:
            raise io_error(f"cannot create spool file in {self.settings.spool_dir}: {exc}") from exc
        if initial is not None:
            await self.write(0, initial)
            self.size = len(initial)
            return
        if etag is None or size == 0:
            return
        try:  # only bytes that match their checksums; a corrupt copy is dropped (and logged) by the cache
            if await self.cache.copy_verified(self.key, etag, self.path):
                self.size = size
                return
        except OSError as exc:
            log.warning("cache copy of %s unreadable (%s); fetching from S3", self.key, exc)
        await self.store.download_file(self.key, etag, str(self.path))
        self.size = size

    async def write(self, offset: int, data: bytes) -> None:
        fd = self._fd()
        try:
            await self._run(lambda: os.pwrite(fd, data, offset))
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO, f"spool write for {self.key}: {exc}",
                          level=logging.ERROR) from exc
        self.size = max(self.size, offset + len(data))
        self.dirty = True

    async def truncate(self, size: int) -> None:
        fd = self._fd()
        await self._run(lambda: os.ftruncate(fd, size))
        self.size = size
        self.dirty = True

    async def read(self, offset: int, length: int) -> bytes:
        fd = self._fd()
        return await self._run(lambda: os.pread(fd, length, offset))  # type: ignore[return-value]

    def _fd(self) -> int:
        if self.fd is None:
            raise io_error(f"spool of {self.key} is closed")
        return self.fd

    async def finish(self, metadata: dict[str, str]) -> Uploaded:
        try:
            with trio.fail_after(self.settings.timeout):
                if self.size <= self.settings.part_size:
                    data = await self.read(0, self.size)
                    etag = await self.store.put(self.key, data, metadata)
                else:
                    etag = (await self.store.upload_file(self.key, str(self.path), metadata)).etag
        except trio.TooSlowError:
            raise io_error(f"upload of {self.key} did not finish within {self.settings.timeout:.0f}s "
                           "(S3 slow or unreachable); the write is not stored") from None
        self.dirty = False
        tee_error = await self._tee(etag)
        return Uploaded(etag, self.size, tee_error is None, tee_error)

    async def _tee(self, etag: str) -> str | None:
        """Copy the uploaded spool into the cache; the reason when that failed."""
        if not self.cache.available:
            return f"cache unavailable ({self.cache.unavailable_reason})"
        if self.size > self.cache.capacity:
            return "larger than the cache"
        temp = self.cache.new_temp_path()
        try:
            await self._run(lambda: shutil.copyfile(self.path, temp))
        except OSError as exc:
            with contextlib.suppress(OSError):
                await self._run(lambda: temp.unlink(missing_ok=True))
            return f"{os.strerror(exc.errno or errno.EIO)} writing {temp}"
        if not await self.cache.commit(temp, self.key, etag, self.size):
            return "could not store the finished file in the cache"
        return None

    async def close(self) -> None:
        fd, self.fd = self.fd, None

        def drop() -> None:
            if fd is not None:
                os.close(fd)
            self.path.unlink(missing_ok=True)

        with trio.CancelScope(shield=True), contextlib.suppress(OSError):
            await self._run(drop)
