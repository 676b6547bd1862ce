"""An open file — the state every handle open on one inode shares — and the write path that drives it.

Write states (``OpenFile.state``)::

    CLEAN ───── write at 0 of an empty file, O_TRUNC ─────────────────────> STREAMING
    CLEAN ───── any other write, truncate ─────────────────────────────────> SPOOLED (dirty)
    STREAMING ─ flush ok ───────────────────────────────────────────────────> CLEAN (committed: a new ETag)
    STREAMING ─ stored at its old key, the copy to its renamed directory fails ─> CLEAN + ``moving`` (the next
                flush retries the copy; a write first loads that content into a spool)
    STREAMING ─ write not at the end, read-back, failed part or flush ─────> SPOOLED (dirty, every byte)
    STREAMING ─ the same, when bytes already sent have no local copy left ──> LOST (state disk full: ENOSPC;
                the cache disk failed after holding some; see ``hybridfs.core.writer``)
    SPOOLED ─── flush ok ──> SPOOLED (clean, committed)     flush fails ──> FAILED (dirty, every byte kept)
    FAILED ──── flush ok ──> SPOOLED (clean)        last handle released ──> dropped, with a log line
    LOST ────── write, flush ──> EIO              O_TRUNC ──> STREAMING          released ──> dropped

Rules:

* Every transition happens under ``OpenFile.lock``: flushes of one file are serialised, and a write, truncate or
  read-back waits for a flush in progress, so the bytes being uploaded never change while botocore signs and
  sends them.
* Only a writable handle's flush uploads (``Filesystem.flush``); a read-only handle's close publishes nothing.
* A failed flush keeps every byte written since open (the spool holds them), so a later flush stores all of
  them or fails again — never a fragment.
* ``release`` of the last handle uploads changes that no flush has tried (mmap, writes after the last close of
  a dup'ed descriptor). After a failed flush it never uploads: the caller was told that version is not stored.
* A flush returns within ``--write-timeout``: aborts run in the background, and a commit that S3 answers late
  can never overwrite a newer version (``hybridfs.core.writer``: conditional, fenced commits).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from hybridfs.core.attrs import Stat, metadata_for, now_ns
from hybridfs.core.inodes import Node
from hybridfs.core.writer import (
    Condition,
    NeedsSpool,
    SpoolWriter,
    StreamWriter,
    Uploaded,
    WriteFence,
    WriteSettings,
    timeout_error,
)
from hybridfs.errors import FsError, io_error
from hybridfs.tasks import Spawner
from hybridfs.tiers.cache import LocalCache
from hybridfs.tiers.s3 import CloudStore, WriteConflict

log = logging.getLogger("hybridfs.openfile")


class WriteState(enum.Enum):
    CLEAN = "clean"
    STREAMING = "streaming"
    SPOOLED = "spooled"
    FAILED = "failed"
    LOST = "lost"


@dataclass(frozen=True)
class Move:
    """A stream that finished at its old key (its directory was renamed while it streamed) whose copy to the
    new key failed: the next flush retries the copy; a write first takes the finished content into a spool."""

    old_key: str
    done: Uploaded
    stat: Stat  # the attributes it was finished with


@dataclass
class OpenFile:
    """State shared by every handle open on one inode. Owned by the trio thread."""

    node: Node
    stat: Stat  # attributes of the version S3 holds (its ETag is what the next commit is conditional on)
    writer: StreamWriter | SpoolWriter | None = None
    handles: int = 0
    created: bool = False  # created or truncated by us and not uploaded yet: the next flush uploads, even empty
    lock: trio.Lock = field(default_factory=trio.Lock, repr=False)
    lost: FsError | None = None  # LOST: why nothing complete can be stored any more
    flush_failed: bool = False  # the last flush failed and none has succeeded since
    mtime_set: bool = False  # utime/futimens since the last write: the flush keeps that mtime
    moving: Move | None = None  # stored at a key the file has left; not at its own key yet

    @property
    def state(self) -> WriteState:
        if self.lost is not None:
            return WriteState.LOST
        if isinstance(self.writer, StreamWriter):
            return WriteState.STREAMING
        if isinstance(self.writer, SpoolWriter):
            return WriteState.FAILED if self.writer.dirty and self.flush_failed else WriteState.SPOOLED
        return WriteState.CLEAN

    @property
    def dirty(self) -> bool:
        """Changes that S3 does not hold yet and that a flush can still store."""
        if self.lost is not None:
            return False
        if isinstance(self.writer, SpoolWriter):
            return self.writer.dirty or self.moving is not None
        return self.writer is not None or self.created or self.moving is not None

    @property
    def size(self) -> int:
        if self.writer is not None:
            return self.writer.size
        return self.moving.done.size if self.moving is not None else self.stat.size


# The errnos a failed close()/fsync() may report as they are; anything else (NoSuchUpload's ENOENT, a refused
# conditional write's ESTALE) means "not stored" to the caller, which is EIO.
WRITE_ERRNOS = frozenset({errno.EIO, errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.ENAMETOOLONG})


def as_write_error(exc: FsError) -> FsError:
    if exc.errno in WRITE_ERRNOS:
        return exc
    return FsError(errno.EIO, f"{exc.message} (this version is not stored)", level=max(exc.level, logging.ERROR))


Stored = Callable[[OpenFile, str, Uploaded], None]
Hydrate = Callable[[str, str, int, str], None]


class WritePath:
    """Drives open files through their write states (see the module docstring)."""

    def __init__(self, store: CloudStore, cache: LocalCache, settings: WriteSettings, spawner: Spawner,
                 key_of: Callable[[Node], str], stored: Stored, hydrate: Hydrate) -> None:
        self.store = store
        self.cache = cache
        self.settings = settings
        self.spawner = spawner
        self.key_of = key_of
        self.stored = stored  # called after every commit: the namespace and the events learn the new version
        self.hydrate = hydrate
        self.fence = WriteFence(store)
        self.teed_bytes = 0  # bytes of stored versions the cache holds too (the tee worked)
        self.tee_failures = 0  # stored versions the cache does not hold (disk failing, or larger than the cache)

    def stream_writer(self, of: OpenFile, key: str) -> StreamWriter:
        return StreamWriter(self.store, self.cache, key, metadata_for(of.stat), self.settings, self.spawner,
                            self.fence)

    def spool_writer(self, key: str) -> SpoolWriter:
        return SpoolWriter(self.store, self.cache, key, self.settings, self.spawner, self.fence)

    # -- operations (each takes the file's lock) ------------------------------------------------------------

    async def write(self, of: OpenFile, offset: int, data: bytes) -> None:
        async with of.lock:
            if of.lost is not None:
                raise of.lost
            of.mtime_set = False
            writer = of.writer
            if writer is None:
                if of.size == 0 and offset == 0:
                    writer = of.writer = self.stream_writer(of, self.key_of(of.node))
                else:
                    log.debug("%s: first write at %d of a file of %d bytes: spooled", self.key_of(of.node),
                              offset, of.size)
                    writer = await self._to_spool(of)
            if isinstance(writer, StreamWriter):
                try:
                    await writer.write(offset, data)
                    return
                except NeedsSpool:
                    log.debug("%s: write of %d bytes at %d, the stream is at %d: spooled", self.key_of(of.node),
                              len(data), offset, writer.size)
                    writer = await self._to_spool(of)
            await writer.write(offset, data)

    async def read(self, of: OpenFile, offset: int, length: int) -> bytes:
        """Read-back of a file with local changes: from its spool (a stream hands over to one first)."""
        async with of.lock:
            if of.lost is not None:
                raise of.lost
            spool = await self._to_spool(of)
            return await spool.read(offset, length)

    async def flush(self, of: OpenFile) -> None:
        async with of.lock:
            if of.lost is not None:
                raise of.lost
            if of.dirty:
                await self._flush(of)

    async def truncate(self, of: OpenFile, size: int) -> bool:
        """Truncate an open file; False when its last handle was released while we waited for its lock (the
        release dropped its writer and nothing would ever store or close a spool made now: the caller truncates
        the file as a closed one)."""
        async with of.lock:
            if of.handles == 0:
                return False
            if of.lost is not None:
                raise of.lost
            if isinstance(of.writer, StreamWriter) and of.writer.size == size:
                return True
            spool = await self._to_spool(of)
            await spool.truncate(size)
            return True

    async def truncate_open(self, of: OpenFile) -> None:
        """O_TRUNC: empty the file; the next flush uploads the new content even if nothing is written."""
        async with of.lock:
            if isinstance(of.writer, SpoolWriter):
                await of.writer.truncate(0)
            else:
                if isinstance(of.writer, StreamWriter):
                    await of.writer.abort()
                    of.writer = None
                self.truncate_unshared(of)
                return
            of.lost = None  # new content: whatever could not be stored before no longer matters
            of.created = True

    def truncate_unshared(self, of: OpenFile) -> None:
        """O_TRUNC of an open file nobody else can reach yet (not in the open-files table) and without a writer:
        no lock and no await, so the open that made it registers it with its handle at once."""
        assert of.writer is None
        of.stat = of.stat.with_(size=0)
        of.writer = self.stream_writer(of, self.key_of(of.node))
        of.lost = None  # new content: whatever could not be stored before no longer matters
        of.created = True

    async def release(self, of: OpenFile) -> None:
        """The last handle is gone: upload what no flush has tried, then drop the writer."""
        async with of.lock:
            try:
                if of.dirty and not of.flush_failed:
                    await self._flush(of)
                elif of.dirty or of.lost is not None:
                    log.warning("%s closed with changes that are not stored (%s); S3 keeps the previous version",
                                of.node.path, of.lost.message if of.lost else "the last flush failed")
            except FsError as exc:
                log.error("%s: upload at release failed, changes since the last successful close are not "
                          "stored: %s", of.node.path, exc)
            finally:
                await self._drop(of)

    async def abandon(self, of: OpenFile) -> None:
        """Shutdown: a file still changing can never be closed through us; drop its upload (aborted now)."""
        writer, of.writer = of.writer, None
        if isinstance(writer, StreamWriter):
            await writer.abandon()
        elif isinstance(writer, SpoolWriter):
            await writer.close()

    # -- transitions (the file's lock is held) ----------------------------------------------------------------

    async def _to_spool(self, of: OpenFile) -> SpoolWriter:
        """STREAMING or CLEAN -> SPOOLED: the file's spool, made from whatever holds its current content."""
        writer = of.writer
        if isinstance(writer, SpoolWriter):
            return writer
        spool = self.spool_writer(self.key_of(of.node))
        try:
            if isinstance(writer, StreamWriter):
                if not await writer.hand_over(spool):
                    loss = writer.local_loss() or io_error("the local copy is gone")
                    await writer.abort()
                    of.writer = None
                    upload = f"their upload failed ({writer.failed.message}) and " if writer.failed else ""
                    of.lost = FsError(
                        loss.errno if loss.errno in WRITE_ERRNOS else errno.EIO,
                        f"{of.node.path}: the {writer.size} bytes written since open cannot be stored: {upload}"
                        f"{loss.message}; writes and flushes fail until it is closed", level=logging.ERROR)
                    raise of.lost
                spool.dirty = True
            elif of.moving is not None:  # the finished stream's content, at the key it was stored under
                spool.key = of.moving.old_key
                await spool.load(of.moving.done.etag, of.moving.done.size)
                spool.key = self.key_of(of.node)
                spool.dirty = True
            else:
                await spool.load(of.stat.etag, of.stat.size)
                spool.dirty = of.created
        except BaseException:
            await spool.close()
            raise
        of.writer = spool
        return spool

    async def _flush(self, of: OpenFile) -> None:
        """Commit the file's content to S3 within the write timeout, or fail keeping every byte."""
        deadline = trio.current_time() + self.settings.timeout
        node = of.node
        if node.unlinked:
            await self._drop(of)
            return
        key = self.key_of(node)
        with trio.move_on_at(deadline) as scope:
            landed = await self.fence.settle(key)  # an earlier commit of this key that is still on its way
        if scope.cancelled_caught:
            of.flush_failed = True
            raise timeout_error(key, self.settings.timeout)
        if node.unlinked:  # removed while we waited (an unlink's DELETE is fenced like a commit): nothing to store
            await self._drop(of)
            return
        if landed is not None:
            of.stat = of.stat.with_(etag=landed)
        if of.moving is not None and of.writer is None:
            await self._finish_move(of, key)
            return
        keep_mtime = of.writer is None or of.mtime_set
        st = of.stat if keep_mtime else of.stat.with_(mtime_ns=now_ns())
        writer = of.writer or self.stream_writer(of, key)  # created and never written: an empty object
        moved_from = None
        if isinstance(writer, StreamWriter) and writer.parts_started and writer.key != key:
            moved_from = writer.key  # its directory was renamed mid-upload: finish there, then move it
        else:
            writer.key = key
        condition = Condition(of.stat.etag)
        try:
            try:
                if isinstance(writer, StreamWriter):
                    done = await writer.finish(metadata_for(st), condition, deadline, times_set=of.mtime_set)
                else:
                    done = await writer.finish(metadata_for(st), condition, deadline)
            except NeedsSpool:
                writer = await self._to_spool(of)
                writer.key = key
                done = await writer.finish(metadata_for(st), condition, deadline)
        except Exception as exc:
            of.flush_failed = True
            if not isinstance(exc, FsError):  # a bug: still a failed flush, with every byte kept
                log.exception("flush of %s: internal error", key)
                exc = io_error(f"flush of {key}: internal error {exc!r}")
            if isinstance(of.writer, StreamWriter):
                with contextlib.suppress(FsError):
                    await self._to_spool(of)  # keep every byte for the next flush (or LOST)
            if isinstance(exc, WriteConflict):
                await self._learn_current(of, key)
            raise as_write_error(exc) from None
        if isinstance(writer, StreamWriter):
            of.writer = None  # used up: finishing it again would store only what is left in its buffer
        if moved_from is not None:
            of.moving = Move(moved_from, done, st)
            await self._finish_move(of, key)
            return
        if of.moving is not None:  # a spool made from a moved stream's content is stored at the new key now
            await self._forget_old_key(of.moving.old_key)
            of.moving = None
        self._stored_version(of, key, st, done)

    async def _finish_move(self, of: OpenFile, key: str) -> None:
        """Copy a stream stored at its old key to ``key``; on failure the next flush tries again."""
        assert of.moving is not None
        move = of.moving
        try:
            done = await self._move(move.old_key, key, move.stat, move.done)
        except FsError as exc:
            of.flush_failed = True
            raise as_write_error(exc) from None
        of.moving = None
        self._stored_version(of, key, move.stat, done)

    async def _forget_old_key(self, old_key: str) -> None:
        try:
            await self.store.delete(old_key)
        except FsError as exc:
            log.error("%s: the copy left there by a renamed directory could not be removed: %s", old_key, exc)
        await self.cache.remove(old_key)

    def _stored_version(self, of: OpenFile, key: str, st: Stat, done: Uploaded) -> None:
        of.created = False
        of.flush_failed = False
        of.mtime_set = False
        of.stat = st.with_(size=done.size, etag=done.etag, complete=True)
        if done.cached:
            self.teed_bytes += done.size
        else:
            self.tee_failures += 1
        self.stored(of, key, done)

    async def _learn_current(self, of: OpenFile, key: str) -> None:
        """After a conflict: base the next flush on what S3 holds now (a deliberate retry overwrites it)."""
        with trio.move_on_after(5):
            info = await self.store.head(key)
            of.stat = of.stat.with_(etag=info.etag if info is not None else None)
            if of.stat.etag is None:
                of.created = True

    async def _move(self, old_key: str, key: str, st: Stat, done: Uploaded) -> Uploaded:
        await self.store.copy(old_key, key, metadata_for(st))
        await self.store.delete(old_key)
        info = await self.store.head(key)
        moved = Uploaded(info.etag if info else done.etag, done.size, False)
        await self.cache.remove(old_key)
        self.hydrate(key, moved.etag, moved.size, "moved")
        return moved

    async def _drop(self, of: OpenFile) -> None:
        writer, of.writer = of.writer, None
        of.created = False
        if of.moving is not None:  # never moved to its key: what is left at the old one was never shown there
            moving, of.moving = of.moving, None
            await self._forget_old_key(moving.old_key)
        if isinstance(writer, StreamWriter):
            await writer.abort()
        elif isinstance(writer, SpoolWriter):
            await writer.close()
