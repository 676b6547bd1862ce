"""The write path's two writers: how a file's new content reaches S3, cloud first and cache second.

* ``StreamWriter`` — for files written from the start in order (new files, ``O_TRUNC``, ``cp``, ``dd``):
  bytes collect in a part-sized buffer; each full part is teed to the cache and uploaded in the background as
  part of a multipart upload, at most ``max_inflight`` parts at a time, so a writer faster than S3 waits for it
  and memory stays bounded. A file smaller than one part is one PUT at close.
* ``SpoolWriter`` — for everything else (random writes, appends to an existing object, truncation, and any
  file whose streamed upload failed): the whole file lives in a spool file in the state directory (never the
  cache directory), is changed there, and is uploaded whole at flush (multipart above one part).

A stream never loses bytes when S3 fails: a failed part or a failed/timed-out finish hands every byte written so
far over to a spool (``StreamWriter.hand_over``: the local copy of the parts already sent, plus what is still in
memory), the multipart upload is aborted in the background, and the next flush uploads the whole file again. The
same hand-over serves a write not at the end, a read-back and a truncate. The local copy of a part is the cache's
tee while the cache can hold it; from the first byte it cannot (past the cache's capacity, or the cache disk
failing) parts go to a spill file in the state directory (``Spill``), and the hand-over joins the two. Bytes are
lost only when neither can keep them: the state disk is full (ENOSPC) or the cache disk fails after holding some
(its copy of them is gone); the open file then refuses every write and flush with that error
(``hybridfs.core.openfile`` documents the states).

Commits are fenced: the PUT or CompleteMultipartUpload that makes a version visible is conditional on S3 still
holding the version the content was based on (``Condition``), and runs in a task of its own that outlives a
timed-out flush (``WriteFence``). A flush that gave up therefore either lands before anything newer (harmless:
the next flush of the file waits for it and replaces it) or is refused by S3 — it can never overwrite a newer
version. ``finish()`` returns within its deadline: aborts run in the background.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from hybridfs.core.budget import MemoryBudget
from hybridfs.errors import FsError, io_error
from hybridfs.tasks import Spawner, failpoint
from hybridfs.tiers.cache import LocalCache, TeeFile
from hybridfs.tiers.s3 import MAX_PARTS, WRITE_TOKEN, CloudStore, Condition, Part, WriteConflict

log = logging.getLogger("hybridfs.writer")
T = TypeVar("T")

__all__ = ["Condition", "NeedsSpool", "Spawner", "SpoolWriter", "StreamWriter", "Uploaded", "WriteFence",
           "WriteSettings"]


@dataclass(frozen=True)
class Uploaded:
    etag: str
    size: int
    cached: bool  # the cache holds this version now (False: the tee failed and a hydrate event is due)
    tee_error: str | None = None


class NeedsSpool(Exception):
    """The stream cannot take this (a write not at its end, or its upload failed): hand it over to a spool."""


@dataclass(frozen=True)
class WriteSettings:
    part_size: int = 8 * 1024**2
    max_inflight: int = 4
    timeout: float = 60.0  # bound on flush/fsync when S3 is down or slow
    spool_dir: Path = Path("/tmp")
    # The mount's memory budget, shared with read-ahead: every buffered byte is charged to it from write() until
    # its part has been uploaded, so many writers wait for memory instead of exceeding it. Writers that each
    # hold a partial part could wait for each other forever; after OVERDRAFT_AFTER a write goes on uncharged.
    budget: MemoryBudget | None = field(default=None, compare=False)


OVERDRAFT_AFTER = 1.0


def part_size_for(number: int, base: int) -> int:
    """Parts grow every 1,000 so that 10,000 parts reach far beyond 5 TiB without a known file size."""
    return base * (2 ** ((number - 1) // 1000))


def timeout_error(key: str, timeout: float) -> FsError:
    return io_error(f"upload of {key} did not finish within {timeout:.0f}s (S3 slow or unreachable); "
                    "this version is not stored")


# -- fenced commits -------------------------------------------------------------------------------------------


@dataclass
class _Send:
    key: str
    token: str
    done: trio.Event = field(default_factory=trio.Event)
    etag: str | None = None
    error: BaseException | None = None
    abandoned: bool = False  # the flush that started it gave up (timeout): nobody waits for the answer
    removed: bool = False  # the key was unlinked while this was on its way: what it stores is deleted on landing


Send = Callable[[Condition], Awaitable[str]]


class WriteFence:
    """The commit requests (PUT, CompleteMultipartUpload) of each key that may still be on their way to S3.

    A commit runs in a task of its own, so a flush that times out stops waiting without cancelling it (a
    cancelled boto3 call goes on in its thread anyway, unseen). The next flush of the same key first waits for it
    (``settle``). A commit that S3 refuses because the object is no longer the version it was based on is
    recognised as ours when the object carries the token of this commit (a botocore retry whose first attempt
    did land: success) or of an earlier commit of ours that failed or gave up (it landed late: this commit
    replaces it). Any other refusal is a conflict with another writer, reported to the caller.

    Deletes of a key are ordered with its commits (issue 21): an unlink waits for the commits on their way
    (``drain``), its DELETE is fenced like a commit (``delete``: the next close of the key waits for it), and a
    commit still on its way when the key is removed deletes what it stores once it lands (``removing``,
    ``discard``). Owned by the trio thread.
    """

    def __init__(self, store: CloudStore) -> None:
        self.store = store
        self._open: dict[str, list[_Send]] = {}
        self._landed: dict[str, str] = {}
        self._unacknowledged: dict[str, set[str]] = {}  # key -> tokens of commits whose caller heard "failed"
        self._removing: dict[str, int] = {}  # key -> unlinks of it under way (``removing``)
        # Set by the filesystem: told of a version S3 holds that nobody was told was stored (a commit that landed
        # after its caller heard "failed", or one whose delete after an unlink failed). The other mounts must hear
        # of it: the fence publishes nothing itself.
        # ETag None: a commit that failed without a clear answer (EIO), which S3 may hold or not.
        self.landed_late: Callable[[str, str | None], Awaitable[None]] | None = None

    async def commit(self, spawner: Spawner, key: str, condition: Condition, token: str, send: Send) -> str:
        pending = _Send(key, token, removed=key in self._removing)
        self._open.setdefault(key, []).append(pending)
        spawner.start_soon(self._run, pending, condition, send, name=f"commit {key}")
        try:
            await pending.done.wait()
        except trio.Cancelled:
            pending.abandoned = True
            self._unacknowledged.setdefault(key, set()).add(token)
            raise
        if pending.error is not None:
            self._unacknowledged.setdefault(key, set()).add(token)
            raise pending.error
        if pending.etag is None:
            raise io_error(f"commit of {key} was cancelled (shutting down)")
        self._unacknowledged.pop(key, None)  # anything earlier of ours is replaced now
        return pending.etag

    async def _run(self, pending: _Send, condition: Condition, send: Send) -> None:
        try:
            failpoint("commit")
            pending.etag = await self._attempt(pending, condition, send)
            if pending.removed:  # checked with no await since the answer: an unlink cannot slip in between
                await self._delete_landed(pending)
        except FsError as exc:
            pending.error = exc
        except Exception as exc:  # a bug: the caller hears EIO, the log has the traceback
            log.exception("commit of %s: internal error", pending.key)
            pending.error = io_error(f"commit of {pending.key}: internal error {exc!r}")
        finally:
            self._done(pending)
        error = pending.error
        if isinstance(error, FsError) and error.errno == errno.EIO and not isinstance(error, WriteConflict) \
                and not pending.removed:
            await self._tell_late(pending.key, None)  # its answer may be what was lost: S3 may hold it
        if pending.abandoned and not pending.removed:
            if pending.etag is not None:
                self._landed[pending.key] = pending.etag
                log.info("an upload of %s whose caller was told it failed landed later (ETag %s); the next "
                         "flush of the file replaces it", pending.key, pending.etag)
                await self._tell_late(pending.key, pending.etag)
            else:
                log.info("an upload of %s whose caller was told it failed ended without storing anything: %s",
                         pending.key, pending.error)

    async def _tell_late(self, key: str, etag: str | None) -> None:
        if self.landed_late is not None:
            await self.landed_late(key, etag)

    def _done(self, pending: _Send) -> None:
        pending.done.set()
        sends = self._open.get(pending.key, [])
        with contextlib.suppress(ValueError):
            sends.remove(pending)
        if not sends:
            self._open.pop(pending.key, None)

    async def _attempt(self, pending: _Send, condition: Condition, send: Send) -> str:
        try:
            return await send(condition)
        except WriteConflict:
            info = await self.store.head(pending.key)
            found = (info.metadata or {}).get(WRITE_TOKEN) if info is not None else None
            if info is not None and found == pending.token:
                return info.etag  # our own retried attempt had landed
            if info is not None and found in self._unacknowledged.get(pending.key, ()):
                log.info("%s: an earlier upload of ours that was reported failed landed late (ETag %s); "
                         "replacing it", pending.key, info.etag)
                try:
                    return await send(Condition(info.etag))
                except WriteConflict:
                    info = await self.store.head(pending.key)
            now = f"ETag {info.etag}" if info is not None else "no object"
            raise WriteConflict(errno.EIO, f"{pending.key} changed in S3 while this file was open (expected "
                                f"{condition}, found {now}); not overwritten — the changes stay open for "
                                "another fsync/close", level=logging.WARNING) from None

    async def settle(self, key: str) -> str | None:
        """Wait for the key's earlier commits; the ETag of one that landed after its caller gave up, if any."""
        if self._open.get(key):
            log.debug("%s: the flush waits for what is on its way to S3 for this key (a commit or a delete)", key)
        while sends := self._open.get(key):
            await sends[0].done.wait()
        return self._landed.pop(key, None)

    # -- deletes of a key with commits on their way (issue 21: an unlink must not be undone by a late commit) --

    def busy(self, key: str) -> bool:
        """A commit of ``key`` is on its way, or one whose caller heard "failed" may have stored something."""
        return bool(self._open.get(key)) or key in self._landed or key in self._unacknowledged

    async def drain(self, key: str, deadline: float) -> bool:
        """Wait until ``deadline`` (trio time) for the key's commits on their way; True when none is left."""
        with trio.move_on_at(deadline):
            while sends := self._open.get(key):
                await sends[0].done.wait()
            return True
        return False

    async def delete(self, spawner: Spawner, key: str, send: Callable[[], Awaitable[None]],
                     deleted: Callable[[], None]) -> None:
        """A DELETE of ``key`` in line with its commits. It runs in a task of its own, so a caller that stops
        waiting (--write-timeout) does not leave it running unseen: until S3 has answered it, the next close of the
        key waits for it (``settle``) before committing, so a DELETE that S3 processes late cannot remove a version
        made here after it. ``deleted`` (synchronous) runs once S3 has deleted it, before any waiter resumes: a
        close waiting in ``settle`` then finds its file unlinked."""
        pending = _Send(key, "")
        self._open.setdefault(key, []).append(pending)
        spawner.start_soon(self._run_delete, pending, send, deleted, name=f"delete {key}")
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error

    async def _run_delete(self, pending: _Send, send: Callable[[], Awaitable[None]],
                          deleted: Callable[[], None]) -> None:
        try:
            await send()
            deleted()
        except FsError as exc:
            pending.error = exc
        except Exception as exc:  # a bug: the caller hears EIO, the log has the traceback
            log.exception("delete of %s: internal error", pending.key)
            pending.error = io_error(f"delete of {pending.key}: internal error {exc!r}")
        finally:
            self._done(pending)

    @contextlib.contextmanager
    def removing(self, key: str) -> Iterator[None]:
        """While an unlink of ``key`` deletes it: every commit of the key still on its way, or starting before the
        block ends, deletes what it stores once it lands (so the name cannot come back after the delete). When the
        delete fails, the marks are taken back: the file is still there, and so may its next version be."""
        self._removing[key] = self._removing.get(key, 0) + 1
        for pending in self._open.get(key, []):
            pending.removed = True
        try:
            yield
        except BaseException:
            if self._removing.get(key, 0) <= 1:
                for pending in self._open.get(key, []):
                    pending.removed = False
            raise
        else:
            self._landed.pop(key, None)  # deleted now: nothing for a next flush to base itself on
            self._unacknowledged.pop(key, None)
        finally:
            self._removing[key] -= 1
            if not self._removing[key]:
                del self._removing[key]

    def discard(self, key: str) -> None:
        """The file at ``key`` was forgotten as never stored (its uploads failed, its caller heard so): a commit of
        it that lands later is deleted, not left to appear as a file nobody was told was stored."""
        for pending in self._open.get(key, []):
            pending.removed = True

    async def _delete_landed(self, pending: _Send) -> None:
        """``pending`` stored a version of a key unlinked meanwhile: delete it, if it is still the one there.

        Only a version carrying this commit's token is deleted: a newer one (a new file made at the name since)
        is not ours to remove. A version landing between this HEAD and the DELETE would be removed with it: a
        conditional DELETE (If-Match) would close that window, but not every S3 implementation has one."""
        try:
            info = await self.store.head(pending.key)
            if info is None or (info.metadata or {}).get(WRITE_TOKEN) != pending.token:
                return
            await self.store.delete(pending.key)
        except FsError as exc:  # the commit itself did land: its caller is not told otherwise
            log.warning("%s was removed while its upload was on its way; the upload landed later (ETag %s) and "
                        "could not be deleted: %s", pending.key, pending.etag, exc.message)
            if pending.etag is not None:
                await self._tell_late(pending.key, pending.etag)
            return
        log.info("%s was removed while its upload was on its way; the upload landed later (ETag %s) and was "
                 "deleted", pending.key, pending.etag)


_TIME_KEYS = frozenset({"mtime", "ctime", "atime"})


def without_times(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata without the file's times: an object without them shows S3's LastModified (attrs.stat_from_object)."""
    return {name: value for name, value in metadata.items() if name not in _TIME_KEYS}


def with_token(metadata: dict[str, str], token: str) -> dict[str, str]:
    return {**metadata, WRITE_TOKEN: token}


def new_token() -> str:
    return uuid.uuid4().hex


# -- the spill file: a stream's bytes that the cache cannot hold -----------------------------------------------


class Spill:
    """The bytes of a stream that its tee to the cache cannot hold (past the cache's capacity, or once the cache
    disk failed), kept at their own offsets in a sparse file in the state directory, so that a hand-over to a
    spool finds every byte written since open. Nothing is written here while the tee copes. Bounded by the state
    disk: a write that does not fit is recorded in ``failed`` (ENOSPC) and reported by the hand-over that needs
    the bytes; the upload itself goes on. Owned by the trio thread; the file is written from worker threads,
    which only return results."""

    def __init__(self, key: str, settings: WriteSettings, limiter: trio.CapacityLimiter) -> None:
        self.key = key
        self.path = settings.spool_dir / f"{uuid.uuid4().hex}.spill"
        self.settings = settings
        self.limiter = limiter
        self.fd: int | None = None
        self.used = False  # a part was given to it (kept or not)
        self.failed: FsError | None = None
        self._writers = 0
        self._closed = False
        self._opening = trio.Lock()

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.limiter)

    async def write(self, offset: int, data: bytes) -> bool:
        """Keep ``data`` at ``offset``; False when it could not be kept (``failed`` says why)."""
        self.used = True
        if self.failed is not None or self._closed:
            return False
        self._writers += 1
        try:
            fd = await self._open()
            await self._run(lambda: _pwrite_all(fd, data, offset))
            return True
        except OSError as exc:
            code = exc.errno or errno.EIO
            if self.failed is None and not self._closed:
                self.failed = FsError(code, f"the spill file of {self.key} in {self.settings.spool_dir}: "
                                      f"{os.strerror(code)} (the state disk holds the bytes the cache cannot)",
                                      level=logging.WARNING)
                log.warning("%s; a random write, read-back or failed upload of it will fail", self.failed.message)
            return False
        finally:
            self._writers -= 1
            if self._closed and self._writers == 0:
                await self._close()

    async def _open(self) -> int:
        async with self._opening:
            if self._closed:
                raise OSError(errno.ECANCELED, "spill discarded")
            if self.fd is None:
                path, directory = self.path, self.settings.spool_dir

                def create() -> int:
                    directory.mkdir(parents=True, exist_ok=True)
                    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

                self.fd = await self._run(create)
            return self.fd

    async def take(self, tee_view: int | None, teed: list[tuple[int, int]]) -> Path:
        """The spill file, completed with the ``teed`` ranges (offset, length) read from ``tee_view`` (a
        descriptor of the tee's file), for a spool to adopt."""
        if self.failed is not None:
            raise self.failed
        fd = await self._open()
        self._closed = True  # from here the file is the spool's

        def join() -> None:
            for offset, length in teed:
                assert tee_view is not None
                _copy_range(tee_view, fd, offset, length)

        try:
            await self._run(join)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise FsError(code, f"joining the cached and spilled bytes of {self.key}: {os.strerror(code)}",
                          level=logging.ERROR) from exc
        finally:
            await self._close(unlink=False)
        return self.path

    async def discard(self) -> None:
        self._closed = True
        if self._writers == 0:
            await self._close()

    async def _close(self, *, unlink: bool = True) -> None:
        fd, self.fd = self.fd, None
        path = self.path

        def drop() -> None:
            if fd is not None:
                os.close(fd)
            if unlink:
                path.unlink(missing_ok=True)

        with trio.CancelScope(shield=True), contextlib.suppress(OSError):
            await self._run(drop)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.ENOSPC, "short write")
        view, offset = view[written:], offset + written


def _copy_range(source: int, fd: int, offset: int, length: int, chunk: int = 1024**2) -> None:
    """Copy ``length`` bytes at ``offset`` from descriptor ``source`` into ``fd`` at the same offset."""
    end = offset + length
    while offset < end:
        data = os.pread(source, min(chunk, end - offset), offset)
        if not data:
            raise OSError(errno.EIO, f"the cache's copy ends at {offset}, before {end}")
        _pwrite_all(fd, data, offset)
        offset += len(data)


# -- the streamed multipart upload ----------------------------------------------------------------------------


class StreamWriter:
    """Sequential writes streamed into a multipart upload. Owned by the trio thread; parts run as tasks."""

    def __init__(self, store: CloudStore, cache: LocalCache, key: str, metadata: dict[str, str],
                 settings: WriteSettings, spawner: Spawner, fence: WriteFence) -> None:
        self.store = store
        self.cache = cache
        self.key = key
        self.metadata = metadata
        self.settings = settings
        self.spawner = spawner
        self.fence = fence
        self.size = 0
        # Incoming writes are kept as they came and joined once per part: one copy per byte, not three.
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.buffer_offset = 0  # file offset of the first buffered byte
        self.upload_id: str | None = None
        self.token = new_token()
        self.parts: list[Part] = []
        self.next_part = 1
        self.slots = trio.Semaphore(settings.max_inflight)
        self.failed: FsError | None = None  # the upload cannot be completed: hand over to a spool
        self.tee = TeeFile(cache)
        self.spill = Spill(key, settings, cache.limiter)  # what the tee cannot hold, from its first such byte
        self.teed_any = False  # a part's only local copy is the tee's
        self.teed: list[tuple[int, int]] = []  # (offset, length) of the parts the tee holds
        # Our own descriptor of the tee's file, opened before its first byte: when the cache disk fails later
        # the tee removes its file, and the bytes it held stay readable here for a hand-over.
        self._tee_view: int | None = None
        self._viewing = trio.Lock()
        self._view_closed = False
        self._teed: list[trio.Event] = []  # one per part sent: set once its local copy is written (or failed)
        self.charged = 0  # budget bytes held by the buffered (not yet sent) bytes
        self.overdrafts = 0

    async def write(self, offset: int, data: bytes) -> None:
        if self.failed is not None or offset != self.size:
            raise NeedsSpool()
        await self._charge(len(data))
        self.chunks.append(data)
        self.buffered += len(data)
        self.size += len(data)
        # From here the bytes are ours: a failure below marks the stream failed, it never loses them.
        # A part is cut once a byte beyond it arrives, so a file of exactly one part is one PUT at close (not
        # CreateMultipartUpload + UploadPart + CompleteMultipartUpload: two round trips and MinIO's merge).
        while self.failed is None and self.buffered > part_size_for(self.next_part, self.settings.part_size):
            await self._cut_part()

    def _fail(self, exc: FsError) -> None:
        if self.failed is None:
            self.failed = exc
            log.warning("streamed upload of %s failed (%s); its bytes go to a spool and the whole file is "
                        "uploaded again at the next flush", self.key, exc.message)

    async def _cut_part(self) -> None:
        size = part_size_for(self.next_part, self.settings.part_size)
        if self.next_part > MAX_PARTS:
            self._fail(FsError(errno.EFBIG, f"{self.key}: more than {MAX_PARTS} parts", level=logging.WARNING))
            return
        slot = False
        with trio.move_on_after(self.settings.timeout) as scope:
            if self.upload_id is None:
                try:
                    self.upload_id = await self.store.create_multipart(
                        self.key, with_token(without_times(self.metadata), self.token))
                except FsError as exc:
                    self._fail(exc)
                    return
            await self.slots.acquire()  # back-pressure: a writer faster than S3 waits here
            slot = True
        if scope.cancelled_caught:
            if slot:
                self.slots.release()
            self._fail(timeout_error(self.key, self.settings.timeout))
            return
        data = self._take_part(size)
        offset, self.buffer_offset = self.buffer_offset, self.buffer_offset + size
        self._send_part(offset, data, self._take_charge(size))

    async def _charge(self, nbytes: int) -> None:
        """Charge buffered bytes to the budget; waits while it is spent (bounded: see OVERDRAFT_AFTER)."""
        budget = self.settings.budget
        if budget is None:
            return
        with trio.move_on_after(OVERDRAFT_AFTER):
            self.charged += await budget.acquire(nbytes)
            return
        self.overdrafts += 1
        log.debug("%s: no memory budget for %d bytes after %.0fs; buffering them uncharged", self.key, nbytes,
                  OVERDRAFT_AFTER)

    def _take_charge(self, nbytes: int) -> int:
        """Move up to ``nbytes`` of the buffer's charge to a part being sent (released when it is done)."""
        moved = min(self.charged, nbytes)
        self.charged -= moved
        return moved

    def _release_charge(self) -> None:
        if self.charged and self.settings.budget is not None:
            self.settings.budget.release(self.charged)
        self.charged = 0

    def _send_part(self, offset: int, data: bytes, charged: int) -> None:
        """Start one part (a slot and ``charged`` bytes of the budget are held); its local copy and its
        upload overlap."""
        number, self.next_part = self.next_part, self.next_part + 1
        teed = trio.Event()
        self._teed.append(teed)
        self.spawner.start_soon(self._upload_part, number, offset, data, teed, charged,
                                name=f"part {self.key}#{number}")

    async def _upload_part(self, number: int, offset: int, data: bytes, teed: trio.Event, charged: int) -> None:
        upload_id = self.upload_id
        try:
            async with trio.open_nursery() as both:
                both.start_soon(self._keep_part, offset, data, teed)
                if upload_id is None:  # handed over meanwhile
                    return
                try:  # caught here, so that a failing upload never cancels the local copy beside it
                    failpoint("part")
                    part = await self.store.upload_part(self.key, upload_id, number, data)
                except FsError as exc:
                    if self.upload_id != upload_id:  # handed over or aborted meanwhile: nobody needs this part
                        log.debug("part %d of %s after its upload was dropped: %s", number, self.key, exc)
                    else:
                        self._fail(exc)
                except Exception as exc:  # a bug: the part is not stored, the stream fails, the mount goes on
                    log.exception("part %d of %s: internal error", number, self.key)
                    self._fail(io_error(f"part {number} of {self.key}: internal error {exc!r}"))
                else:
                    self.parts.append(part)
        except Exception as exc:  # a bug in the local copy: the stream can no longer be handed over safely
            log.exception("local copy of part %d of %s: internal error", number, self.key)
            await self.tee.discard(f"internal error {exc!r}")
            self._fail(io_error(f"part {number} of {self.key}: internal error {exc!r}"))
        finally:
            teed.set()
            self.slots.release()
            if charged and self.settings.budget is not None:
                self.settings.budget.release(charged)

    async def _keep_part(self, offset: int, data: bytes, teed: trio.Event) -> None:
        """The part's local copy: in the cache's tee while it can hold it, else in the spill file, so that a
        hand-over finds every byte (the tee alone drops everything past the cache's capacity)."""
        try:
            if self.tee.failed is None and offset + len(data) <= self.cache.capacity:
                await self._watch_tee()
                await self.tee.write(offset, data)
                if self.tee.failed is None:
                    self.teed_any = True
                    self.teed.append((offset, len(data)))
                    return
            await self.spill.write(offset, data)
        finally:
            teed.set()

    async def _watch_tee(self) -> None:
        """Open our descriptor of the tee's file (created here, before the tee's first write opens it)."""
        async with self._viewing:
            if self._tee_view is not None or self._view_closed or self.tee.failed is not None:
                return
            if self.tee.path is None:
                self.tee.path = self.cache.new_temp_path()
            path = self.tee.path
            try:
                view = await trio.to_thread.run_sync(
                    lambda: os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), limiter=self.cache.limiter)
            except OSError:
                return  # the tee fails on the same disk: its parts go to the spill file
            if self._view_closed:  # dropped meanwhile
                await self._close_fd(view)
            else:
                self._tee_view = view

    async def _close_view(self) -> None:
        self._view_closed = True
        view, self._tee_view = self._tee_view, None
        if view is not None:
            await self._close_fd(view)

    async def _close_fd(self, fd: int) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(OSError):
            await trio.to_thread.run_sync(os.close, fd, limiter=self.cache.limiter)

    async def _drain(self) -> None:
        for _ in range(self.settings.max_inflight):
            await self.slots.acquire()
        for _ in range(self.settings.max_inflight):
            self.slots.release()

    def _take_part(self, size: int) -> bytes:
        """The first ``size`` buffered bytes as one object, copied once: only the write that straddles the part's
        end is split (its tail stays buffered)."""
        taken, count = 0, 0
        while taken + len(self.chunks[count]) <= size:
            taken += len(self.chunks[count])
            count += 1
            if taken == size:
                break
        pieces: list[bytes | memoryview] = list(self.chunks[:count])
        rest = self.chunks[count:]
        if taken < size:
            straddling = memoryview(rest[0])
            pieces.append(straddling[:size - taken])
            rest[0] = bytes(straddling[size - taken:])
        data = pieces[0] if len(pieces) == 1 and isinstance(pieces[0], bytes) else b"".join(pieces)
        self.chunks, self.buffered = rest, self.buffered - size
        return data

    def _take_buffer(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks, self.buffered = [], 0
        return data

    @property
    def parts_started(self) -> bool:
        return self.upload_id is not None

    async def finish(self, metadata: dict[str, str], condition: Condition, deadline: float, *,
                     times_set: bool = False) -> Uploaded:
        """Upload what remains and make the object whole in S3, by ``deadline`` (trio time). ``times_set``: the
        file's times were set explicitly (utime) while it streamed, so they must be stored, not S3's own.

        Raises NeedsSpool when the upload had already failed, FsError when it fails now; either way every byte
        is still here for ``hand_over``.
        """
        if self.failed is not None:
            raise NeedsSpool()
        with trio.move_on_at(deadline) as scope:
            etag = await self._complete(metadata, condition, times_set)
        if scope.cancelled_caught:
            self._fail(timeout_error(self.key, self.settings.timeout))
            raise self.failed or timeout_error(self.key, self.settings.timeout)
        self._release_charge()  # a single PUT's buffer: S3 holds it now
        await self._close_view()
        if self.spill.used:  # the cache could not hold the whole file: it is not cached
            await self.tee.discard("larger than the cache")
            await self.spill.discard()
        cached = await self.tee.commit(self.key, etag, self.size)
        return Uploaded(etag, self.size, cached, self.tee.failed)

    async def _complete(self, metadata: dict[str, str], condition: Condition, times_set: bool) -> str:
        if self.upload_id is None:  # smaller than a part: one PUT; the buffer stays until S3 has it
            data = b"".join(self.chunks)
            self.chunks, self.buffered = [data], len(data)
            token = new_token()
            meta = with_token(metadata, token)
            outcome: list[str | FsError] = []

            async def put() -> None:
                try:
                    outcome.append(await self.fence.commit(
                        self.spawner, self.key, condition, token,
                        lambda cond: self.store.put(self.key, data, meta, condition=cond)))
                except FsError as exc:  # raised below, once the local copy beside it is written
                    outcome.append(exc)

            # The local copy never raises (a failure is recorded in the tee), so it runs beside the PUT.
            async with trio.open_nursery() as both:
                both.start_soon(self.tee.write, 0, data)
                await put()
            if isinstance(outcome[0], FsError):
                raise outcome[0]
            return outcome[0]
        if self.buffered:
            await self.slots.acquire()
            data, offset = self._take_buffer(), self.buffer_offset
            self.buffer_offset += len(data)
            self._send_part(offset, data, self._take_charge(len(data)))
        await self._drain()
        if self.failed is not None:
            raise NeedsSpool()
        upload_id, parts = self.upload_id, list(self.parts)
        etag = await self.fence.commit(
            self.spawner, self.key, condition, self.token,
            lambda cond: self.store.complete_multipart(self.key, upload_id, parts, condition=cond))
        self.upload_id = None
        # The multipart upload was created without times: S3's LastModified (its completion, i.e. this close) is
        # the mtime, as it should be. Only attributes changed while streaming (chmod, chown, utime) cost a copy;
        # comparing the times too copied every upload that spanned a second boundary (the whole object again,
        # without its part checksums).
        if times_set or without_times(metadata) != without_times(self.metadata):
            await self.store.copy(self.key, self.key, metadata)
            info = await self.store.head(self.key)
            etag = info.etag if info else etag
        return etag

    def _parts_in_flight(self) -> bool:
        return self.slots.value < self.settings.max_inflight

    async def hand_over(self, spool: SpoolWriter) -> bool:
        """Move every byte written so far into ``spool`` and drop the upload (aborted in the background).

        False when the bytes that already left memory cannot be recovered (their local copy failed): the
        caller must then refuse the file's writes and flushes, since nothing complete can be stored.
        """
        for teed in self._teed:  # local copies are disk-bound: wait for them, not for S3
            await teed.wait()
        if self.buffer_offset == 0:  # nothing left memory yet (at most a multipart upload was created)
            await spool.load(None, 0, initial=b"".join(self.chunks))
        else:
            if self.local_loss() is not None:
                return False
            path = await self._local_copy()
            await spool.adopt(path, self.buffer_offset)
            if self.chunks:
                await spool.write(self.buffer_offset, b"".join(self.chunks))
        self._drop_upload()
        self.chunks, self.buffered = [], 0
        self._release_charge()
        await self._close_view()
        await self.tee.discard()
        await self.spill.discard()
        return True

    def local_loss(self) -> FsError | None:
        """Why bytes that already left memory have no local copy any more (None: every byte is kept)."""
        if self.spill.failed is not None:
            return self.spill.failed
        if self.teed_any and self.tee.failed is not None and self._tee_view is None:
            return io_error(f"the cache's copy of {self.key} is gone ({self.tee.failed})")
        if not self.teed_any and not self.spill.used:
            return io_error(f"no local copy of {self.key} was written")
        return None

    async def _local_copy(self) -> Path:
        """The file of every byte sent so far: the tee's copy, the spill file, or both joined in the spill."""
        try:
            if not self.spill.used and self.tee.failed is None:
                return await self.tee.detach()
            return await self.spill.take(self._tee_view, self.teed)
        except OSError as exc:
            raise io_error(f"cannot take the local copy of {self.key}: {exc}") from exc

    def _drop_upload(self) -> None:
        if self.upload_id is None:
            return
        upload_id, self.upload_id = self.upload_id, None
        self.store.schedule_abort(self.key, upload_id)
        if self._parts_in_flight():  # a part landing after the abort could keep storage: abort once more
            self.spawner.start_soon(self._abort_after_parts, upload_id, name=f"re-abort {self.key}")

    async def _abort_after_parts(self, upload_id: str) -> None:
        with trio.move_on_after(max(self.settings.timeout, 60)):
            await self._drain()
        self.store.schedule_abort(self.key, upload_id)

    async def _journal_again(self, upload_id: str) -> None:
        journal = self.store.journal
        if journal is None:
            return
        log.info("%s: a part was still on its way when its upload was aborted; the next start aborts it again",
                 self.key)
        try:
            await trio.to_thread.run_sync(journal.record, self.key, upload_id)
        except Exception as exc:  # sqlite3.Error, OSError: only the record is missing
            log.warning("could not record multipart upload %s of %s in the upload journal again: %s", upload_id,
                        self.key, exc)

    async def abort(self) -> None:
        """Drop the upload and the local copy (the file was truncated, unlinked or closed unfinished)."""
        self._drop_upload()
        self.chunks, self.buffered = [], 0
        self._release_charge()
        with trio.CancelScope(shield=True):
            await self._close_view()
            await self.tee.discard()
            await self.spill.discard()

    async def abandon(self) -> None:
        """At shutdown: abort the upload once its parts in flight are answered (bounded by the write timeout), so
        nothing is left in S3: a part that lands after its upload's abort can keep storage (S3 documents it).
        A part still in flight after that keeps the upload in the journal, so the next start aborts it again."""
        self._release_charge()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.settings.timeout):
                    await self._drain()
                in_flight = self._parts_in_flight()
                await self.store.abort_multipart(self.key, upload_id)
                if in_flight:
                    await self._journal_again(upload_id)
        with trio.CancelScope(shield=True):
            await self._close_view()
            await self.tee.discard()
            await self.spill.discard()


# -- the spool ------------------------------------------------------------------------------------------------


class SpoolWriter:
    """A private local copy of the whole file, changed in place and uploaded whole. Owned by the trio thread."""

    def __init__(self, store: CloudStore, cache: LocalCache, key: str, settings: WriteSettings,
                 spawner: Spawner | None = None, fence: WriteFence | None = None) -> None:
        self.store = store
        self.cache = cache
        self.key = key
        self.settings = settings
        self.spawner = spawner
        self.fence = fence
        self.path = settings.spool_dir / f"{uuid.uuid4().hex}.spool"
        self.fd: int | None = None
        self.size = 0
        self.dirty = False

    async def _run(self, fn: object) -> object:
        return await trio.to_thread.run_sync(fn, limiter=self.cache.limiter)  # type: ignore[arg-type]

    async def _create(self) -> None:
        def create() -> None:
            self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

        try:
            await self._run(create)
        except OSError as exc:
            raise io_error(f"cannot create spool file in {self.settings.spool_dir}: {exc}") from exc

    async def load(self, etag: str | None, size: int, initial: bytes | None = None) -> None:
        """Fill the spool with the current content: ``initial`` bytes, the cached copy, or S3."""
        await self._create()
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

    async def adopt(self, source: Path, size: int) -> None:
        """Take ``source`` (the local copy of a stream's first ``size`` bytes) as the spool's content."""
        def take() -> None:
            self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(source, self.path)
            except OSError:  # another filesystem (EXDEV): copy it
                shutil.copyfile(source, self.path)
                source.unlink(missing_ok=True)
            self.fd = os.open(self.path, os.O_RDWR)
            os.ftruncate(self.fd, size)

        try:
            await self._run(take)
        except OSError as exc:
            raise io_error(f"cannot move the local copy of {self.key} into the spool: {exc}") from exc
        self.size = size
        self.dirty = True

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
        try:
            await self._run(lambda: os.ftruncate(fd, size))
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise FsError(code, f"truncating the spool of {self.key} to {size}: {exc}",
                          level=logging.INFO if code == errno.EFBIG else logging.ERROR) from exc
        self.size = size
        self.dirty = True

    async def read(self, offset: int, length: int) -> bytes:
        fd = self._fd()
        return await self._run(lambda: os.pread(fd, length, offset))  # type: ignore[return-value]

    def _fd(self) -> int:
        if self.fd is None:
            raise io_error(f"spool of {self.key} is closed")
        return self.fd

    async def finish(self, metadata: dict[str, str], condition: Condition, deadline: float) -> Uploaded:
        """Upload the whole spool by ``deadline``; the spool stays dirty (every byte kept) when that fails."""
        with trio.move_on_at(deadline) as scope:
            if self.size <= self.settings.part_size:
                etag = await self._put(metadata, condition)
            else:
                etag = await self._multipart(metadata, condition)
        if scope.cancelled_caught:
            raise timeout_error(self.key, self.settings.timeout)
        self.dirty = False
        tee_error = await self._tee(etag)
        return Uploaded(etag, self.size, tee_error is None, tee_error)

    async def _commit(self, condition: Condition, token: str, send: Send) -> str:
        if self.fence is None or self.spawner is None:  # a one-off upload (truncate of a closed file)
            return await send(condition)
        return await self.fence.commit(self.spawner, self.key, condition, token, send)

    async def _put(self, metadata: dict[str, str], condition: Condition) -> str:
        data = await self.read(0, self.size)
        token = new_token()
        meta = with_token(metadata, token)
        return await self._commit(condition, token,
                                  lambda cond: self.store.put(self.key, data, meta, condition=cond))

    async def _multipart(self, metadata: dict[str, str], condition: Condition) -> str:
        """Parts read from the spool, ``max_inflight`` at a time; the commit is fenced like a stream's."""
        token = new_token()
        upload_id = await self.store.create_multipart(self.key, with_token(metadata, token))
        parts: list[Part] = []
        errors: list[FsError] = []
        completed = False
        try:
            limiter = trio.Semaphore(self.settings.max_inflight)
            async with trio.open_nursery() as nursery:
                offset, number = 0, 1
                while offset < self.size and not errors:
                    size = min(part_size_for(number, self.settings.part_size), self.size - offset)
                    await limiter.acquire()
                    nursery.start_soon(self._part, upload_id, number, offset, size, parts, errors, limiter)
                    offset, number = offset + size, number + 1
            if errors:
                raise errors[0]
            etag = await self._commit(
                condition, token,
                lambda cond: self.store.complete_multipart(self.key, upload_id, parts, condition=cond))
            completed = True
            return etag
        finally:
            if not completed:
                self.store.schedule_abort(self.key, upload_id)

    async def _part(self, upload_id: str, number: int, offset: int, size: int, parts: list[Part],
                    errors: list[FsError], limiter: trio.Semaphore) -> None:
        budget = self.settings.budget
        charged = 0
        try:
            if budget is not None:
                charged = await budget.acquire(size)
            data = await self.read(offset, size)
            parts.append(await self.store.upload_part(self.key, upload_id, number, data))
        except FsError as exc:
            errors.append(exc)
        except OSError as exc:
            errors.append(io_error(f"reading the spool of {self.key}: {exc}"))
        finally:
            limiter.release()
            if charged and budget is not None:
                budget.release(charged)

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
