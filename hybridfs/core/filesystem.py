"""The filesystem in its own terms: POSIX operations over the namespace, the writers and the readers.

Nothing here knows about pyfuse3: operations take inode numbers and names, return ``Stat`` and handle numbers,
and raise ``FsError``. ``hybridfs.fuse_ops`` is the thin layer that speaks FUSE.

Concurrency contract (trio): code between two ``await``s runs atomically. After an ``await`` that may have let
another request run, re-read what you depend on (the node's path, the open file's writer) instead of trusting a
local copy.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat as stat_mod
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import trio
from cachetools import LRUCache, TTLCache

from hybridfs.core.attrs import PATH_MAX, SPECIAL_TYPES, Defaults, Stat, metadata_for, now_ns
from hybridfs.core.changes import (
    ABSENT,
    NOTHING,
    Change,
    ChangeSink,
    KeyOrder,
    Known,
    NoChanges,
    Verdict,
    version_of,
)
from hybridfs.core.inodes import InodeTable, Node
from hybridfs.core.namespace import Namespace
from hybridfs.core.openfile import OpenFile, WritePath
from hybridfs.core.paths import KeyMapper, child_path, name_of, parent_of
from hybridfs.core.reader import CacheReader, CloudReader, HandleReader, ReadSettings
from hybridfs.core.writer import Condition, Uploaded, WriteSettings
from hybridfs.errors import FsError, not_found
from hybridfs.tasks import Spawner
from hybridfs.tiers.cache import LocalCache
from hybridfs.tiers.s3 import CloudStore, ObjectInfo, WriteConflict

log = logging.getLogger("hybridfs.fs")

XATTR_PREFIX = "user.hybridfs."  # every extended attribute a mount has starts with it
XATTR_STATE = "user.hybridfs.state"
XATTR_KEY = "user.hybridfs.key"
XATTR_ETAG = "user.hybridfs.etag"
XATTR_STATUS = "user.hybridfs.status"  # on the root: the mount's status as JSON (hybridfs status)
FILE_XATTRS = (XATTR_STATE, XATTR_KEY, XATTR_ETAG)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class HydrationSink(Protocol):
    """Where the core reports that an object should be copied into the cache (a Kafka producer in the mount)."""

    def request_hydration(self, key: str, etag: str, size: int, reason: str) -> None: ...


class KernelNotifier(Protocol):
    """Tells the kernel to drop what it caches of an inode (pyfuse3.invalidate_inode in the mount) or of a
    directory entry (pyfuse3.invalidate_entry)."""

    async def invalidate(self, ino: int) -> None: ...

    async def forget_entry(self, parent_ino: int, name: bytes) -> None: ...


class NoKernel:
    async def invalidate(self, ino: int) -> None:
        return None

    async def forget_entry(self, parent_ino: int, name: bytes) -> None:
        return None


T = TypeVar("T")


class BoundedStore:
    """The S3 requests of metadata operations (mkdir, rmdir, unlink, rename, chmod/chown/utime, truncate, symlink,
    mknod), each bounded by --write-timeout like a close: a stalled S3 fails the operation with EIO instead of
    holding it — and the directory, which the kernel keeps locked meanwhile — through botocore's timeouts and
    retries (minutes). A copy is bounded by its progress, since its time grows with the object.

    A request given up on may still reach S3 (a boto3 call cannot be taken back): a late PUT of a marker or a late
    copy is the change the caller asked for, arriving late (the copy still conditional on its source version); an
    unlink's DELETE goes through the write fence, so it cannot remove a version this mount makes after it."""

    def __init__(self, store: CloudStore, timeout: float) -> None:
        self.store = store
        self.timeout = timeout
        # Set by the filesystem: a change of this key may or may not have reached S3 (``Filesystem._unsure``).
        self.unsure: Callable[[str], None] = _ignore

    async def within(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        with trio.move_on_after(self.timeout):
            return await op()
        raise FsError(errno.EIO, f"{what} did not finish within {self.timeout:g}s (S3 slow or unreachable)",
                      level=logging.WARNING)

    async def changing(self, key: str, op: Callable[[], Awaitable[T]]) -> T:
        """``op`` changes ``key`` in S3: when it ends without a clear answer (EIO: S3 unreachable after retries, an
        answer lost, a request given up on, which may still land), S3 may hold the change or not, and nobody
        will publish it: say so (``unsure``). A refusal (a conflict, a missing source) changed nothing."""
        try:
            return await op()
        except FsError as exc:
            if exc.errno == errno.EIO and not isinstance(exc, WriteConflict):
                self.unsure(key)
            raise

    async def put(self, key: str, data: bytes, metadata: dict[str, str]) -> str:
        return await self.changing(key, lambda: self.within(f"PUT {key}", lambda: self.store.put(key, data,
                                                                                                metadata)))

    async def delete(self, key: str) -> None:
        await self.changing(key, lambda: self.within(f"DELETE {key}", lambda: self.store.delete(key)))

    async def head(self, key: str) -> ObjectInfo | None:
        return await self.within(f"HEAD {key}", lambda: self.store.head(key))

    async def has_children(self, prefix: str) -> bool:
        return await self.within(f"LIST {prefix}", lambda: self.store.has_children(prefix))

    async def copy(self, src: str, dst: str, metadata: dict[str, str], *, source_etag: str | None = None,
                   size: int | None = None) -> ObjectInfo | None:
        return await self.changing(dst, lambda: self.store.copy(src, dst, metadata, source_etag=source_etag,
                                                                stall_timeout=self.timeout, size=size))


def _ignore(key: str) -> None:
    return None


@dataclass(frozen=True)
class AttrChanges:
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None


@dataclass
class Handle:
    fh: int
    file: OpenFile
    writable: bool
    reader: HandleReader | None = None  # made at the first read; switches between S3 and the cache


@dataclass
class DirHandle:
    fh: int
    path: str
    entries: list[tuple[str, str, Stat]] = field(default_factory=list)  # (name, path, stat)


@dataclass(frozen=True)
class FsSettings:
    defaults: Defaults
    write: WriteSettings
    read: ReadSettings
    attr_timeout: float = 1.0
    hydrate_dedupe_seconds: float = 300.0


class Filesystem:
    def __init__(self, store: CloudStore, cache: LocalCache, keys: KeyMapper, namespace: Namespace,
                 settings: FsSettings, spawner: Spawner, hydration: HydrationSink,
                 kernel: KernelNotifier | None = None) -> None:
        self.store = store
        self.cache = cache
        self.keys = keys
        self.ns = namespace
        namespace.spawner = spawner
        self.settings = settings
        self.spawner = spawner
        self.hydration = hydration
        self.kernel: KernelNotifier = kernel or NoKernel()
        self.inodes = InodeTable()
        self.open_files: dict[int, OpenFile] = {}
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        # Key -> the versions a hydrate event was raised for, within the dedupe window. By key, so a purge
        # forgets a key's in O(1) (by (key, ETag) it walked all 100,000 on the trio thread).
        self._hydrate_asked: TTLCache[str, tuple[str, ...]] = TTLCache(100_000, settings.hydrate_dedupe_seconds)
        self.status_extra: Callable[[], dict[str, object]] = dict
        # The order of versions of each key: which feed records are news and which only say "ask S3"
        # (hybridfs.core.changes.KeyOrder; docs/semantics.md, "Order of versions"). No clock is read for it.
        self.order = KeyOrder()
        self.reads_from_cache = 0
        self.reads_from_cloud = 0
        self.read_bytes = {"cache": 0, "s3": 0, "local": 0}  # bytes read() returned, by where they came from
        self.refuse_opens = False  # set while shutting down: in-flight work finishes, nothing new starts
        self.changes: ChangeSink = NoChanges()  # set by the mount: the change feed (after S3 acknowledged)
        self.changes_applied = 0  # foreign changes applied (apply_change / invalidate_key)
        self._told_missing: LRUCache[str, bool] = LRUCache(100_000)  # paths a lookup answered ENOENT for
        self.writes = WritePath(store, cache, settings.write, spawner, self._key_of, self._stored,
                                self.ask_hydration)
        self.meta = BoundedStore(store, settings.write.timeout)  # the S3 requests of metadata operations
        self.meta.unsure = self._unsure
        self.writes.fence.landed_late = self._landed_late

    def _check_accepting(self) -> None:
        if self.refuse_opens:
            raise FsError(errno.EBUSY, "the mount is shutting down", level=logging.INFO)

    # -- helpers --------------------------------------------------------------------------------------------

    def _fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF, f"file handle {fh} is not open") from None

    def _key_of(self, node: Node) -> str:
        return self.keys.key(node.path)

    async def _child(self, parent_ino: int, name: bytes) -> str:
        parent = self.inodes.path(parent_ino)
        await self.ns.require_dir(parent)
        return child_path(parent, name)

    def _new_stat(self, kind: int, mode: int, uid: int, gid: int) -> Stat:
        return Stat(mode=kind | (mode & 0o7777), uid=uid, gid=gid, size=0, mtime_ns=now_ns(), etag=None)

    def ask_hydration(self, key: str, etag: str, size: int, reason: str) -> None:
        """Raise one hydrate event per object version (repeated misses within the dedupe window raise one)."""
        asked = self._hydrate_asked.get(key, ())
        if etag in asked:
            return
        self._hydrate_asked[key] = (*asked[-3:], etag)  # the last few versions: a key rewritten often stays small
        self.hydration.request_hydration(key, etag, size, reason)

    # -- lookups and attributes ------------------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: bytes) -> tuple[Node, Stat]:
        path = await self._child(parent_ino, name)
        try:
            st = await self.stat_of(path)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                self._told_missing[path] = True  # the kernel may keep a negative entry for it
            raise
        self._told_missing.pop(path, None)
        return self.inodes.looked_up(path), st

    async def stat_of(self, path: str) -> Stat:
        """Attributes of ``path``: those of the open file when it is written here (local state wins over
        anything S3 says), else the namespace's."""
        node = self.inodes.existing(path)
        of = self.open_files.get(node.ino) if node is not None else None
        if of is not None and self._is_local(of):
            return self._open_stat(of)
        st = await self.ns.stat(path)
        if node is not None:
            self._detach_if_replaced(node, st)  # a new version is a new file: lookup gives a new inode
        return st

    def _open_stat(self, of: OpenFile) -> Stat:
        return of.stat.with_(size=of.size) if of.size != of.stat.size else of.stat

    async def getattr(self, ino: int) -> Stat:
        of = self.open_files.get(ino)
        if of is None:
            return await self.ns.stat(self.inodes.path(ino))
        if self._is_local(of):
            return self._open_stat(of)
        path = self.inodes.path(ino)
        try:  # open for reading only: is it still the version S3 holds?
            st = await self.ns.stat(path)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                self._detach(of.node)  # deleted elsewhere: the open handles keep their file, with nlink 0
            else:  # S3 unreachable: an open file's fstat does not depend on it
                log.debug("getattr of open %s: %s; answering with the open version", path, exc.message)
            return self._open_stat(of)
        if self._detach_if_replaced(of.node, st):
            return self._open_stat(of)  # replaced elsewhere: the handles keep the old version
        return st

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)

    async def setattr(self, ino: int, changes: AttrChanges, fh: int | None = None) -> Stat:
        node = self.inodes.node(ino)
        path = self.inodes.path(ino)
        of = self.open_files.get(ino)
        if changes.size is not None:
            await self._truncate(node, path, changes.size, of)
            of = self.open_files.get(ino)  # re-read after the await
            if of is not None and of.dirty and changes.mtime_ns is None:
                # ftruncate moves the mtime (and so the ctime) at once, as a write does; the flush then stores
                # the time of the upload, as after a write.
                of.stat = of.stat.with_(mtime_ns=now_ns())
                of.mtime_set = False
        meta_changes = {k: v for k, v in (("mode", changes.mode), ("uid", changes.uid), ("gid", changes.gid),
                                          ("mtime_ns", changes.mtime_ns), ("atime_ns", changes.atime_ns))
                        if v is not None}
        if changes.mode is not None:
            # Permission bits only: the type is that of the version the change is stored on (_typed), which
            # another request may have replaced since any stat taken here.
            meta_changes["mode"] = changes.mode & 0o7777
        if meta_changes:
            meta_changes["ctime_ns"] = now_ns()  # chmod, chown and utimes change the ctime (POSIX)
            await self._change_metadata(node, path, meta_changes, of)
        return await self.getattr(ino)

    async def _change_metadata(self, node: Node, path: str, changes: dict[str, int], of: OpenFile | None) -> None:
        if of is not None:
            # After a flush under way (the release that stores a new empty file right after `touch` returned):
            # it uploads the attributes it started with, so a change made meanwhile would be lost.
            async with of.lock:
                if of.dirty:  # applied by the upload at flush
                    of.stat = of.stat.with_(**self._typed(of.stat, changes))
                    of.mtime_set = of.mtime_set or "mtime_ns" in changes  # utime before close: the flush keeps it
                    return
        st = await self.ns.stat(path)
        if st.is_dir:
            new = self._with_changes(st, changes)
            await self.meta.put(self.keys.dir_prefix(path), b"", metadata_for(new))
            self.ns.remember(path, new)
            self._publish(Change.put(self.keys.dir_prefix(path), new))
            return
        key = self.keys.key(path)
        try:
            new = await self._copy_in_place(key, st, changes)
        except WriteConflict:
            # The object is no longer the version our attributes came from (another writer replaced it within
            # --dir-cache-time). chmod, chown and utime name the file, not a version of it: they apply to what is
            # there now, as they would on a local disk after the other write. Refusing would fail `chmod` for a
            # change the user cannot see. So: HEAD it again and copy once more from that version; only a second
            # change in between fails (EIO, logged), never a copy onto bytes our attributes do not describe.
            st = await self._reread(path, key)
            log.info("%s changed in S3 since its attributes were read; applying %s to the new version (ETag %s)",
                     path, ", ".join(sorted(changes)), st.etag)
            try:
                new = await self._copy_in_place(key, st, changes)
            except WriteConflict as exc:
                raise FsError(errno.EIO, f"{path!r} keeps changing in S3; its attributes were not changed "
                              f"({exc.message})", level=logging.WARNING) from None
        self.ns.remember(path, new)
        self._publish(Change.put(key, new))
        if of is not None and of.stat.etag == st.etag:
            # Only the open file of the version copied takes the copy's attributes. One open on another version
            # (replaced elsewhere since it was opened) keeps its own: its handles read what they opened, with the
            # size the kernel was told (the getattr that ends setattr detaches its node).
            of.stat = new

    @classmethod
    def _with_changes(cls, st: Stat, changes: dict[str, int]) -> Stat:
        changes = cls._typed(st, changes)
        if "ctime_ns" in changes and st.atime_ns is None and "atime_ns" not in changes:
            changes = {**changes, "atime_ns": st.accessed_ns}  # keep the atime shown until now
        return st.with_(**changes)

    @staticmethod
    def _typed(st: Stat, changes: dict[str, int]) -> dict[str, int]:
        """``changes`` with the file type of ``st``, the version they are stored on: a chmod changes permission
        bits, never the type (a type from an earlier stat would store a directory's mode on a file)."""
        if "mode" not in changes:
            return changes
        return {**changes, "mode": stat_mod.S_IFMT(st.mode) | (changes["mode"] & 0o7777)}

    async def _copy_in_place(self, key: str, st: Stat, changes: dict[str, int]) -> Stat:
        """Store ``changes`` on version ``st.etag`` of ``key`` (a copy onto itself, conditional on that version:
        WriteConflict when it is gone). The attributes returned are S3's answer after the copy — size and ETag
        of what it holds now, never those of the stat the change was computed from."""
        copied = await self.meta.copy(key, key, metadata_for(self._with_changes(st, changes)), source_etag=st.etag,
                                      size=st.size)
        return await self._stat_after_copy(key, st.etag, copied)

    async def _stat_after_copy(self, key: str, old_etag: str | None, copied: ObjectInfo | None = None) -> Stat:
        """The attributes S3 holds at ``key`` after a copy: its answer to a single CopyObject (conditional on the
        source version, whose size it copied), else a HEAD."""
        info = copied if copied is not None else await self.meta.head(key)
        if info is None:  # deleted right after the copy: as if the delete came after our change
            raise not_found(self.keys.path(key) or key)
        if old_etag is not None and info.etag != old_etag:
            await self.cache.remove(key)  # a multipart copy changes the ETag: the cached version is now stale
        return self.ns.parse(info)

    async def _reread(self, path: str, key: str) -> Stat:
        """What S3 holds at ``path`` now (a HEAD, past every cache); ENOENT when it is gone."""
        info = await self.meta.head(key)
        if info is None:
            self.ns.forget(path)
            raise not_found(path)
        st = self.ns.parse(info)
        self.ns.remember(path, st)
        return st

    async def _truncate(self, node: Node, path: str, size: int, of: OpenFile | None) -> None:
        while of is not None:
            if await self.writes.truncate(of, size):
                node.kernel_etag = None
                return
            # Its last handle was released while we waited for its lock: whoever holds the inode now, if anyone.
            of = self.open_files.get(node.ino)
            if of is not None and of.handles == 0:
                of = None
        st = await self.ns.stat(path)
        if st.is_dir:
            raise FsError(errno.EISDIR, f"{path!r} is a directory")
        key = self.keys.key(path)
        try:
            done, new = await self._truncate_closed(key, st, size)
        except WriteConflict:
            # Replaced since its attributes were read: truncate names the file, so it applies to the version there
            # now, with that version's attributes (mode, owner) — not ours from before (see _change_metadata).
            st = await self._reread(path, key)
            log.info("%s changed in S3 since its attributes were read; truncating the new version (ETag %s)",
                     path, st.etag)
            try:
                done, new = await self._truncate_closed(key, st, size)
            except WriteConflict as exc:
                raise FsError(errno.EIO, f"{path!r} keeps changing in S3; not truncated ({exc.message})",
                              level=logging.WARNING) from None
        self._after_upload(key, path, done)
        self.ns.remember(path, new)
        self._publish(Change.put(key, new))
        node.kernel_etag = None

    async def _truncate_closed(self, key: str, st: Stat, size: int) -> tuple[Uploaded, Stat]:
        """Store version ``st.etag`` of ``key`` cut (or extended) to ``size``: a commit conditional on that version
        (WriteConflict when S3 holds another) and fenced like a close's, so one that lands after its caller gave up
        can never replace a newer version, and the next close of the file waits for it. The upload is bounded by
        --write-timeout; reading the current content (for a size above 0) is not: it is a download."""
        new = st.with_(size=size, mtime_ns=now_ns())
        spool = self.writes.spool_writer(key)
        try:
            if size:
                await spool.load(st.etag, st.size)
                await spool.truncate(size)
            else:
                await spool.load(None, 0)  # nothing of the old content is needed
            done = await spool.finish(metadata_for(new), Condition(st.etag),
                                      trio.current_time() + self.settings.write.timeout)
        finally:
            await spool.close()
        return done, new.with_(etag=done.etag, complete=True)

    # -- namespace changes -----------------------------------------------------------------------------------

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> tuple[Node, Stat]:
        path = await self._child(parent_ino, name)
        await self._require_absent(path)
        st = self._new_stat(stat_mod.S_IFDIR, mode, uid, gid)
        await self.meta.put(self.keys.dir_prefix(path), b"", metadata_for(st))
        self.ns.remember(path, st)
        self.ns.listings[path] = {}
        self._publish(Change.put(self.keys.dir_prefix(path), st))
        return self.inodes.looked_up(path), st

    async def _require_absent(self, path: str) -> None:
        try:
            await self.stat_of(path)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        raise FsError(errno.EEXIST, f"{path!r} exists")

    async def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int
                      ) -> tuple[Node, Stat]:
        path = await self._child(parent_ino, name)
        await self._require_absent(path)
        st = self._new_stat(stat_mod.S_IFLNK, 0o777, uid, gid).with_(size=len(target))
        etag = await self.meta.put(self.keys.key(path), target, metadata_for(st))
        st = st.with_(etag=etag)
        self.ns.remember(path, st)
        self._publish(Change.put(self.keys.key(path), st, target=target.decode("utf-8", "replace")))
        return self.inodes.looked_up(path), st

    async def readlink(self, ino: int) -> bytes:
        path = self.inodes.path(ino)
        st = await self.ns.stat(path)
        if not st.is_symlink:
            raise FsError(errno.EINVAL, f"{path!r} is not a symbolic link")
        if st.size == 0:
            return b""
        if st.size >= PATH_MAX:  # no symlink(2) makes these; another tool did: never read it whole
            raise FsError(errno.EIO, f"{path!r}: a symlink target of {st.size} bytes is longer than PATH_MAX",
                          level=logging.WARNING)
        return await self.store.get_range(self.keys.key(path), 0, st.size, st.etag)

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        """The node stays while it is open or known to the kernel, with nlink 0 (``Node.unlinked``)."""
        path = await self._child(parent_ino, name)
        st = await self.stat_of(path)
        if st.is_dir:
            raise FsError(errno.EISDIR, f"{path!r} is a directory (use rmdir)")
        key = self.keys.key(path)
        committing = await self._commits_settled(path, key)
        node = self.inodes.existing(path)

        def gone() -> None:
            if self.inodes.existing(path) is not node:  # a DELETE that landed after its unlink gave up, and the
                return  # name is another file's now: that one stays (its first commit waits for this DELETE)
            self.ns.forget(path)
            self.inodes.unlink(path)  # a close of it that waited for the DELETE now finds it unlinked

        def deleted() -> None:
            self._publish(Change.delete(key))
            gone()

        # A file created here and never committed is not in S3: no DELETE. One with a commit on its way (another
        # process closing it, or a close that gave up) may be there, or be about to land: delete it, and have any
        # commit still on its way delete what it stores (WriteFence.removing), or the name comes back.
        # The cached copy goes first: an eviction that checks S3 while the DELETE is on its way must find nothing
        # to preserve (it would keep the bytes as "deleted elsewhere"); and again after, for a hydration that
        # committed meanwhile.
        await self.cache.remove(key)
        with self.writes.fence.removing(key):
            if path not in self.ns.pending or committing:
                await self.meta.within(f"DELETE {key}", lambda: self.writes.fence.delete(
                    self.spawner, key, lambda: self.meta.changing(key, lambda: self.store.delete(key)), deleted))
            else:
                gone()
            await self.cache.remove(key)

    async def _commits_settled(self, path: str, key: str) -> bool:
        """Before a delete of ``key``: wait (up to --write-timeout) for its commits on their way, so the delete
        comes after them; those still on their way then are fenced by the caller. True when the key had any.
        ENOENT when the path went away meanwhile (renamed or removed by a request that ran during the wait)."""
        fence = self.writes.fence
        if not fence.busy(key):
            return False
        log.debug("%s: a commit of it is on its way; the unlink waits for it", path)
        if not await fence.drain(key, trio.current_time() + self.settings.write.timeout):
            log.info("%s: its commit is still on its way after %gs; removing it now, and whatever the commit stores "
                     "when it lands", path, self.settings.write.timeout)
        await self.stat_of(path)  # re-check after the await
        return True

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        path = await self._child(parent_ino, name)
        st = await self.stat_of(path)
        if not st.is_dir:
            raise FsError(errno.ENOTDIR, f"{path!r} is not a directory")
        prefix = self.keys.dir_prefix(path)
        if await self.meta.has_children(prefix) or any(p.startswith(path + "/") for p in self.ns.pending):
            raise FsError(errno.ENOTEMPTY, f"{path!r} is not empty")
        await self.meta.delete(prefix)
        self._publish(Change.delete(prefix))
        self.ns.forget_tree(path)
        self.inodes.unlink(path)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int) -> None:
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE cannot be done on S3 (no atomic swap)",
                          level=logging.INFO)
        old = await self._child(old_parent, old_name)
        new = await self._child(new_parent, new_name)
        if old == new:
            return
        src = await self.stat_of(old)
        dst = await self._stat_or_none(new)
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST, f"{new!r} exists (RENAME_NOREPLACE)")
            await self._check_replace(src, dst, new)
        if new.startswith(old + "/"):
            raise FsError(errno.EINVAL, f"cannot move {old!r} into itself")
        if src.is_dir:
            await self._rename_dir(old, new, dst)
        else:
            await self._rename_file(old, new, src, dst)
        self.inodes.rename(old, new)

    async def _stat_or_none(self, path: str) -> Stat | None:
        try:
            return await self.stat_of(path)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    async def _check_replace(self, src: Stat, dst: Stat, new: str) -> None:
        if src.is_dir and not dst.is_dir:
            raise FsError(errno.ENOTDIR, f"{new!r} is not a directory")
        if not src.is_dir and dst.is_dir:
            raise FsError(errno.EISDIR, f"{new!r} is a directory")
        if dst.is_dir and await self.meta.has_children(self.keys.dir_prefix(new)):
            raise FsError(errno.ENOTEMPTY, f"{new!r} is not empty")

    async def _rename_file(self, old: str, new: str, src: Stat, dst: Stat | None) -> None:
        old_key, new_key = self.keys.key(old), self.keys.key(new)
        node = self.inodes.existing(old)
        of = self.open_files.get(node.ino) if node is not None else None
        if of is not None and of.dirty:
            # S3 must hold the current bytes before we copy them (this also ends a streamed upload, whose
            # multipart upload is bound to the old key).
            await self.writes.flush(of)
            src = of.stat
        try:
            copied = await self.meta.copy(old_key, new_key, metadata_for(src), source_etag=src.etag, size=src.size)
        except WriteConflict:  # replaced since we read its attributes: move what is there now (see setattr)
            src = await self._reread(old, old_key)
            log.info("%s changed in S3 since its attributes were read; moving the new version (ETag %s)", old,
                     src.etag)
            try:
                copied = await self.meta.copy(old_key, new_key, metadata_for(src), source_etag=src.etag,
                                              size=src.size)
            except WriteConflict as exc:
                raise FsError(errno.EIO, f"{old!r} keeps changing in S3; not renamed ({exc.message})",
                              level=logging.WARNING) from None
        # Size, ETag and times from S3's answer: the copy is what src.etag named, which src's size may not be.
        moved = await self._stat_after_copy(new_key, None, copied)
        self._publish(Change.put(new_key, moved))  # S3 holds the copy now, whatever becomes of the DELETE
        # Fenced like an unlink's: a DELETE that S3 processes late must not remove a file made at the old name next.
        # Its landing is published whenever it comes (also after this rename gave up on it).
        await self.meta.within(f"DELETE {old_key}", lambda: self.writes.fence.delete(
            self.spawner, old_key, lambda: self.meta.changing(old_key, lambda: self.store.delete(old_key)),
            lambda: self._publish(Change.delete(old_key))))
        self.ns.remember(new, moved)
        if of is not None and of.stat.etag == src.etag:
            of.stat = moved  # a multipart copy has a new ETag; later reads and spools must pin that one
        if dst is not None and dst.is_dir:
            await self.meta.delete(self.keys.dir_prefix(new))
            self._publish(Change.delete(self.keys.dir_prefix(new)))
        await self.cache.rename(old_key, new_key)
        self.ns.forget(old)

    async def _rename_dir(self, old: str, new: str, dst: Stat | None) -> None:
        """Copy every object under the old prefix, then delete the originals. Not atomic: a crash midway
        leaves both trees, and no data is lost."""
        if any(p == old or p.startswith(old + "/") for p in self.ns.pending):
            for p in [p for p in self.ns.pending if p.startswith(old + "/")]:
                self.ns.set_pending(new + p[len(old):], self.ns.pending.pop(p))
        old_prefix, new_prefix = self.keys.dir_prefix(old), self.keys.dir_prefix(new)
        moved = await self.ns.stat(old)
        objects = await self.store.list_keys(old_prefix)
        for info in objects:
            await self._copy_as_is(info.key, new_prefix + info.key[len(old_prefix):])
        if not any(o.key == old_prefix for o in objects):
            await self.meta.put(new_prefix, b"", metadata_for(moved))
            self._publish(Change.put(new_prefix, moved))
        for info in objects:
            # A copy's ETag may differ from the original's (multipart): the feed says "changed, ask S3".
            self._publish(Change.unknown(new_prefix + info.key[len(old_prefix):]))
        for info in objects:
            await self.meta.delete(info.key)
            self._publish(Change.delete(info.key))
            await self.cache.remove(info.key)
        if dst is not None:
            self.ns.forget_tree(new)
        self.ns.forget_tree(old)
        self.ns.listings.clear()
        self.ns.remember(new, moved)

    async def _copy_as_is(self, src: str, dst: str) -> None:
        """Copy ``src`` with its own metadata, conditional on the version the metadata was read from: a version
        replaced between the HEAD and the copy must not get the previous version's attributes. Once more on a
        conflict (the new version, with its own metadata); gone meanwhile: nothing to move."""
        for _ in range(2):
            head = await self.meta.head(src)
            if head is None:
                return
            try:
                await self.meta.copy(src, dst, head.metadata or {}, source_etag=head.etag, size=head.size)
                return
            except WriteConflict:
                continue
        raise FsError(errno.EIO, f"{src} keeps changing in S3; the directory was not moved whole",
                      level=logging.WARNING)

    # -- files -----------------------------------------------------------------------------------------------

    async def create(self, parent_ino: int, name: bytes, mode: int, flags: int, uid: int, gid: int
                     ) -> tuple[int, Node, Stat]:
        self._check_accepting()
        path = await self._child(parent_ino, name)
        if not stat_mod.S_ISREG(mode) and stat_mod.S_IFMT(mode) != 0:
            raise FsError(errno.EPERM, "only regular files, directories and symlinks can be stored in S3",
                          level=logging.INFO)
        existing = await self._stat_or_none(path)
        if existing is not None:
            raise FsError(errno.EEXIST, f"{path!r} exists")
        key = self.keys.key(path)  # ENAMETOOLONG before any state is created
        st = self._new_stat(stat_mod.S_IFREG, mode, uid, gid)
        node = self.inodes.looked_up(path)
        self.ns.set_pending(path, st)
        of = OpenFile(node, st, created=True)
        self.open_files[node.ino] = of
        of.writer = self.writes.stream_writer(of, key)
        fh = self._open_handle(of, writable=True)
        node.kernel_etag = None
        return fh, node, st

    def _open_handle(self, of: OpenFile, *, writable: bool) -> int:
        fh = self._fh()
        self.handles[fh] = Handle(fh, of, writable)
        of.handles += 1
        of.node.open_handles += 1
        return fh

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file; returns the handle and whether the kernel may keep its page cache."""
        self._check_accepting()
        node = self.inodes.node(ino)
        if node.unlinked:
            # The kernel still had an entry for a name that is gone: removed by another mount, or a new file
            # whose every upload failed, forgotten at its last release. ESTALE, not ENOENT: the kernel looks the
            # name up again, so that open(O_CREAT) creates the file anew instead of failing.
            raise FsError(errno.ESTALE, f"inode {ino} was unlinked; looking its name up again", level=logging.DEBUG)
        path = self.inodes.path(ino)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        truncate = writable and bool(flags & os.O_TRUNC)  # the kernel passes O_TRUNC to us (atomic_o_trunc)
        of = await self._joinable_open_file(ino)
        self._check_not_removed(ino, path)  # by the release waited for (a new file that was never stored)
        if of is None or not self._is_local(of):
            # Revalidate after --attr-timeout, also while other handles are open (tail -f). A file written
            # here is never revalidated: its local state is the truth until it is uploaded.
            st = await self._revalidate(ino, path)
            await self._drop_kernel_attrs_of_other_version(ino, st)
            of = await self._joinable_open_file(ino)  # re-check after the awaits
            node = self._check_not_removed(ino, path)
            if of is None:
                # A new open file is registered together with its handle, with no await in between: one left in
                # the table without a handle (an await here, then ESTALE because a getattr or unlink detached the
                # node meanwhile) would never be released.
                of = OpenFile(node, st)
                if truncate:
                    self.writes.truncate_unshared(of)
                    truncate = False
                self.open_files[ino] = of
            elif self._detach_if_replaced(node, st):
                # S3 holds a new version: a new file for the new open, while the open handles keep the old
                # one (their inode, their pages, their pinned reader). ESTALE from open makes the kernel
                # walk the path again with a forced lookup, which finds the new inode.
                raise FsError(errno.ESTALE, f"{path!r} changed in S3 while open; reopening the new version",
                              level=logging.DEBUG)
        if truncate:  # an open file others hold: truncated under its lock
            await self.writes.truncate_open(of)  # waits for the file's lock: a release may hold it
            if self.open_files.get(ino) is not of or node.unlinked:
                # The last handle's release dropped the file meanwhile (a new file whose every upload failed is
                # forgotten then): a handle on it would take writes nobody stores and close with success.
                # ESTALE makes the kernel look the name up again and open, or create, what is there now.
                raise FsError(errno.ESTALE, f"{path!r} was dropped while being opened; opening it again",
                              level=logging.DEBUG)
        fh = self._open_handle(of, writable=writable)
        keep = not of.dirty and of.stat.etag is not None and node.kernel_etag == of.stat.etag
        node.kernel_etag = of.stat.etag if not of.dirty else None
        return fh, keep

    def _check_not_removed(self, ino: int, path: str) -> Node:
        """ESTALE when the inode was removed while an open waited: the kernel looks the name up again and opens,
        or with O_CREAT creates, what is there now."""
        node = self.inodes.node(ino)
        if node.unlinked:
            raise FsError(errno.ESTALE, f"{path!r} was removed while being opened; opening it again",
                          level=logging.DEBUG)
        return node

    async def _joinable_open_file(self, ino: int) -> OpenFile | None:
        """The open file of ``ino`` a new handle may join. One whose last release is under way (no handle left)
        is not: that release drops its writer and changes and leaves attributes that may describe no version
        (O_TRUNC's size 0 with the ETag of the version S3 holds, after a failed flush) — a handle that joined it
        read 0 bytes of a file fstat said was 32 KiB. Wait for the release, which removes it from the table."""
        of = self.open_files.get(ino)
        while of is not None and of.handles == 0:
            async with of.lock:  # the release holds it until the writer is dropped
                pass
            of = self.open_files.get(ino)
        return of

    async def _drop_kernel_attrs_of_other_version(self, ino: int, st: Stat) -> None:
        """The open found a version other than the one whose attributes the kernel holds (replaced elsewhere
        since the kernel's lookup): those may stand for --attr-timeout more, and their size is not this
        version's, so fstat would say the old size and the kernel would end reads there (or read past the new
        end as EOF). Drop them before the open returns: the next fstat or read asks us."""
        node = self.inodes.node(ino)
        # Unknown (None) counts as another version: the kernel may hold the size of a file it wrote itself.
        if st.etag is None or node.attr_etag == st.etag:
            return
        node.kernel_dropped_attrs()
        node.kernel_etag = None
        await self.kernel.invalidate(ino)

    async def read(self, fh: int, offset: int, length: int) -> bytes:
        handle = self._handle(fh)
        of = handle.file
        if of.writer is not None or of.lost is not None:  # local changes: read them back
            return self._served("local", await self.writes.read(of, offset, length))
        if of.stat.etag is None or of.stat.size == 0:
            return b""
        if handle.reader is None:
            handle.reader = self._handle_reader(of)
        data, source = await handle.reader.read(offset, length)
        return self._served(source, data)

    def _served(self, source: str, data: bytes) -> bytes:
        self.read_bytes[source] += len(data)
        return data

    def _handle_reader(self, of: OpenFile) -> HandleReader:
        """A handle reads the version its open file holds, from the cache when that version is there (also once
        the hydrator brings it while the handle is open), else from S3."""
        def version() -> tuple[str, str]:
            assert of.stat.etag is not None
            return self._key_of(of.node), of.stat.etag

        async def open_best() -> CacheReader | CloudReader:
            return await self._reader_for(of)

        return HandleReader(version, open_best, lambda: self._cloud_reader(of), self.cache)

    async def _reader_for(self, of: OpenFile) -> CacheReader | CloudReader:
        key = self._key_of(of.node)
        etag = of.stat.etag
        assert etag is not None
        if self.cache.lookup(key, etag) is not None:
            reader = await CacheReader.open(self.cache, key, etag)
            if reader is not None:
                self.cache.touch(key)
                self.cache.hits += 1
                self.reads_from_cache += 1
                return reader
        elif self.cache.lookup(key) is not None:  # an older version: the cloud ETag changed
            await self.cache.remove(key)
        self.cache.misses += 1
        self.reads_from_cloud += 1
        self.ask_hydration(key, etag, of.stat.size, "read-miss")
        return self._cloud_reader(of)

    def _cloud_reader(self, of: OpenFile) -> CloudReader:
        assert of.stat.etag is not None
        return CloudReader(self.store, self._key_of(of.node), of.stat.etag, of.stat.size,
                           self.settings.read, self.spawner)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        if not handle.writable:
            raise FsError(errno.EBADF, "file not open for writing")
        of = handle.file
        of.node.kernel_etag = None
        await self.writes.write(of, offset, data)
        return len(data)

    async def flush(self, fh: int) -> None:
        """close(2): returns once S3 holds the object (contract 1). A read-only handle publishes nothing."""
        handle = self._handle(fh)
        of = handle.file
        if handle.writable and (of.dirty or of.lost is not None):
            await self.writes.flush(of)

    async def fsync(self, fh: int) -> None:
        """fsync(2): stores every change of the file, whichever descriptor wrote it — ``sync FILE`` and many
        tools fsync through a read-only descriptor. Only close() of a read-only descriptor publishes nothing."""
        of = self._handle(fh).file
        if of.dirty or of.lost is not None:
            await self.writes.flush(of)

    def _stored(self, of: OpenFile, key: str, done: Uploaded) -> None:
        """A commit of ``of`` landed: the namespace shows the new version, the events hear about it."""
        # The kernel's size of the inode is what the writes made it: that of the version just stored.
        of.node.attr_etag, of.node.attr_told = of.stat.etag, True
        if not of.node.unlinked:
            self.ns.settle(of.node.path, of.stat)
            self._publish(Change.put(key, of.stat))
        self._after_upload(key, of.node.path, done)

    def _after_upload(self, key: str, path: str, done: Uploaded) -> None:
        if done.tee_error is not None and done.tee_error != "larger than the cache":
            log.warning("cache copy of %s failed (%s); the object is safe in S3, a hydrate event will "
                        "bring it back", key, done.tee_error)
            self.ask_hydration(key, done.etag, done.size, "tee-failed")

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        if handle.reader is not None:
            handle.reader.close()
        of = handle.file
        of.handles -= 1
        never_stored = False
        changed = of.handles == 0 and (of.dirty or of.lost is not None)
        try:
            if of.handles == 0:
                await self.writes.release(of)  # uploads what no flush tried (mmap, dup'ed fds), then drops
        finally:
            if of.handles == 0 and self.open_files.get(of.node.ino) is of:
                self.open_files.pop(of.node.ino, None)
                never_stored = self._never_stored(of.node, of)
            self.inodes.release(of.node)
        if never_stored:
            await self._forget_never_stored(of.node)
        elif changed and (of.flush_failed or of.lost is not None) and not of.node.unlinked:
            await self._forget_unstored_changes(of.node)

    async def _forget_unstored_changes(self, node: Node) -> None:
        """The last descriptor of a file whose changes could not be stored is gone: S3 keeps the previous version,
        so the kernel must not keep the size and pages those changes gave it (a read of the file after a failed
        close of an ftruncate returned the truncated length of the old content)."""
        node.kernel_dropped_attrs()
        node.kernel_etag = None
        await self.kernel.invalidate(node.ino)

    def _never_stored(self, node: Node, of: OpenFile) -> bool:
        return of.stat.etag is None and not node.unlinked and node.path in self.ns.pending

    async def _forget_never_stored(self, node: Node) -> None:
        """A file created here whose every upload failed never existed in S3: it must not stay listed. It is
        forgotten at once (no await before: nothing can open it in between), then the kernel's entry is dropped.
        An open that still reaches the old inode through that entry gets ESTALE (see ``open``), and the kernel
        looks the name up again: open(O_CREAT) creates the file anew instead of writing into a forgotten one."""
        path = node.path
        if node.ino in self.open_files or node.unlinked or path not in self.ns.pending:
            return  # opened, renamed or removed meanwhile: it is somebody's file again
        log.info("%s was never stored (its uploads failed); it is gone with its last descriptor", path)
        self.writes.fence.discard(self.keys.key(path))  # an upload that gave up and lands later must not bring it
        self.ns.forget(path)
        self.inodes.unlink(path)
        parent = self.inodes.existing(parent_of(path))
        if parent is not None:
            await self.kernel.forget_entry(parent.ino, name_of(path).encode())

    # -- directories -----------------------------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        path = self.inodes.path(ino)
        await self.ns.require_dir(path)
        fh = self._fh()
        self.dir_handles[fh] = DirHandle(fh, path)
        return fh

    async def readdir(self, fh: int, start: int, reply: Callable[[bytes, Node, Stat, int], bool]) -> None:
        """Feed entries from offset ``start`` to ``reply`` until it returns False (the kernel's buffer is full).

        The listing is taken once per handle (at offset 0), so offsets stay stable while entries come and go;
        offsets start at 3 (1 and 2 confuse NFS re-exports).
        """
        handle = self.dir_handles[fh]
        if start == 0 or not handle.entries:
            children = await self.ns.list(handle.path)
            handle.entries = [(name, f"{handle.path}/{name}" if handle.path else name, st)
                              for name, st in sorted(children.items())]
        for index in range(max(start - 3 + 1, 0) if start else 0, len(handle.entries)):
            name, path, st = handle.entries[index]
            node = self.inodes.for_path(path)
            of = self.open_files.get(node.ino)
            if of is not None and (self._is_local(of) or of.stat.etag != st.etag):
                # Its attributes go to the kernel's inode, also while it is open: the listing's size would become
                # the i_size of a file written here, or of one open on another version (replaced elsewhere, or a
                # listing older than the open). Reads end at i_size and O_APPEND writes start there: an append
                # after `ls` showed a newer, larger version stored zeros up to that size. The open file's own
                # attributes; the next lookup or getattr gives the path its new version's node.
                st = self._open_stat(of)
            if not reply(name.encode(), node, st, index + 3):
                break
            node.lookups += 1

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    # -- extended attributes and status ------------------------------------------------------------------------

    async def getxattr(self, ino: int, name: str) -> bytes:
        path = self.inodes.path(ino)
        if path == "" and name == XATTR_STATUS:
            return json.dumps(self.status(), sort_keys=True).encode()
        if name not in FILE_XATTRS:  # e.g. security.capability, asked before every write: no S3 round trip
            raise FsError(errno.ENODATA, f"no attribute {name} on {path!r}")
        st = await self.getattr(ino)
        if not st.is_file or name not in FILE_XATTRS:
            raise FsError(errno.ENODATA, f"no attribute {name} on {path!r}")
        key = self.keys.key(path)
        if name == XATTR_KEY:
            return key.encode()
        if name == XATTR_ETAG:
            return (st.etag or "").encode()
        return self.file_state(key, st).encode()

    def file_state(self, key: str, st: Stat) -> str:
        if st.etag is None:  # being written here: local until its first upload
            return "cached"
        return "cached" if self.cache.lookup(key, st.etag) is not None else "cloud"

    async def listxattr(self, ino: int) -> list[str]:
        st = await self.getattr(ino)
        if self.inodes.path(ino) == "":
            return [XATTR_STATUS]
        return list(FILE_XATTRS) if st.is_file else []

    def status(self) -> dict[str, object]:
        cache = self.cache
        lookups = cache.hits + cache.misses
        base: dict[str, object] = {
            "bucket": self.store.bucket,
            "prefix": self.keys.prefix,
            "cache": {
                "dir": str(cache.root),
                "available": cache.available,
                "used_bytes": cache.usage(),
                "capacity_bytes": cache.capacity,
                "files_cached": len(cache.entries),
                "pinned": len(cache.pins),
                "hits": cache.hits,
                "misses": cache.misses,
                "hit_ratio": round(cache.hits / lookups, 4) if lookups else None,
            },
            "open_files": len(self.open_files),
            "inodes": len(self.inodes),
            "time": time.time(),
        }
        base.update(self.status_extra())
        return base

    # -- hooks for background services --------------------------------------------------------------------

    def is_open(self, key: str) -> bool:
        path = self.keys.path(key)
        node = self.inodes.existing(path) if path is not None else None
        return node is not None and node.ino in self.open_files

    async def forget_kernel_cache(self, key: str) -> None:
        """The cached copy of ``key`` went away: the kernel must not keep pages of it either."""
        path = self.keys.path(key)
        node = self.inodes.existing(path) if path is not None else None
        self._hydrate_asked.pop(key, None)  # the next miss of it must raise a hydrate event again
        if node is not None:
            node.kernel_etag = None
            await self.kernel.invalidate(node.ino)

    # -- the change feed: other mounts' changes (docs/semantics.md, "The change feed") ---------------------

    def _unsure(self, key: str) -> None:
        """A request changing ``key`` ended without a clear answer: S3 may hold the change or not. The other mounts
        hear "changed, ask S3" (a lost change would stand there otherwise), and this mount asks S3 at the next
        access too (what a HEAD last told stays for while S3 is down)."""
        log.debug("%s: S3 may or may not hold the change asked for; every mount asks S3 again", key)
        self._publish(Change.unknown(key))
        path = self.keys.path(key)
        if path is None or self._written_here(path):
            return
        self.ns.invalidate(path)
        # A directory keeps its kernel entry (see _forget_in_kernel): an rmdir that failed leaves it in use.
        forget = partial(self._forget_in_kernel, path, self.inodes.existing(path), entry=not key.endswith("/"))
        self.spawner.start_soon(forget, name=f"forget {path!r} in the kernel")

    async def _landed_late(self, key: str, etag: str | None) -> None:
        """A commit of ``key`` whose caller heard "failed" landed (version ``etag``; None: it failed without a
        clear answer, and may have landed): publish it as "changed, ask S3", and ask S3 here too unless the file
        is still written here (its next flush replaces it)."""
        self._publish(Change.unknown(key))
        path = self.keys.path(key)
        if path and not self._written_here(path):
            await self._invalidate_path(path, key)

    def _publish(self, change: Change) -> None:
        """S3 acknowledged ``change``: tell the other mounts (never blocks, never fails the operation)."""
        self.order.own(change)  # a record of another mount is not ordered after it without asking S3
        try:
            self.changes.publish_change(change)
        except Exception:  # a bug in the sink must not fail a change S3 already holds
            log.exception("publishing the change of %s failed", change.key)

    async def apply_change(self, change: Change) -> Verdict | None:
        """Apply a change another mount or writer made to ``change.key`` (the feed consumer, the S3 event
        consumer). Idempotent; keys outside the mount's prefix are ignored. ``self.order`` says first whether
        the change is news (docs/semantics.md, "Order of versions"; no clock is read):

        - news, ``removed``: the path is gone here too (a node still open keeps its file, with nlink 0).
        - news, ``stat`` given: the path has these attributes now (remembered as from a HEAD); an open node on
          another version is detached (its handles keep the old version), the cached copy of an older ETag is
          dropped — or, when the key is pinned, a hydration of the new version is asked for.
        - its order is not known (another mount's record after ours or after another origin's, a record without
          a position, "attributes unknown"): what the mount knows of the path is forgotten and the next access
          asks S3. Only for a key the mount knows nothing of are the record's attributes kept, as the last
          known ones (a listing shows them only when its ETag agrees).
        - a duplicate or a replay (at or before a record already taken in): nothing.

        Always but for duplicates: the kernel's entry and inode of the path are invalidated (from a thread, never
        inline). A path written here (open with local changes, or created and not uploaded yet) is left alone:
        local state wins until its upload. Never raises for a well-formed change; FsError only for S3/cache
        failures. Returns the verdict (None: outside the prefix, or written here).
        """
        path = self.keys.path(change.key)
        if not path:
            return None
        if self._written_here(path):
            log.debug("change of %s from %s not applied: the file is being written here", path, change.origin)
            return None
        first = self.order.first(change.key)
        remembered = self.ns.last_known.get(path)
        verdict = self.order.judge(change, self._known(path), NOTHING if remembered is None else
                                   version_of(remembered))
        if verdict is Verdict.STALE:
            log.debug("change of %s from %s at %s not applied: a record at or after it was", path,
                      change.origin, change.position)
            return verdict
        self.changes_applied += 1
        if verdict is Verdict.ASK_S3:
            await self._ask_s3_about(path, change, first=first)
        elif change.removed:
            await self._apply_removed(path, change)
        else:
            assert change.stat is not None  # news has attributes or is a removal (KeyOrder)
            await self._apply_put(path, change, change.stat)
        return verdict

    async def _ask_s3_about(self, path: str, change: Change, *, first: bool) -> None:
        """The change's order is not known: forget what the mount knows of the path; the next access asks S3.
        The record's attributes are kept as the last known ones only for a key the mount knew nothing of (a fresh
        mount reading the feed): a listing shows them complete only when its ETag agrees."""
        keep = first and change.stat is not None and not change.removed and self._known(path) == NOTHING \
            and path not in self.ns.last_known
        await self._invalidate_path(path, change.key, entry=not change.is_dir)
        if keep and change.stat is not None and path not in self.ns.last_known:  # re-checked: a HEAD may have told
            self.ns.last_known[path] = change.stat.with_(complete=True, kind_known=True)
        log.debug("change of %s from %s: order not known, asking S3 at the next access", path, change.origin)

    def _known(self, path: str) -> Known:
        """What the namespace holds as current for ``path``: an S3 answer or an applied change, ABSENT when S3
        said nothing is there, else NOTHING."""
        cached = self.ns.stats.get(path)
        if cached is not None:
            return version_of(cached.stat)
        return ABSENT if path in self.ns.missing else NOTHING

    async def invalidate_key(self, key: str, *, removed: bool = False) -> None:
        """Someone changed (or, with ``removed``, deleted) ``key`` and we do not know its new attributes: the
        next stat, open or listing asks S3 (lazily). For S3 event records of foreign writers."""
        await self.apply_change(Change(key, None, removed=removed, origin="s3-event"))

    def _written_here(self, path: str) -> bool:
        if path in self.ns.pending:
            return True
        node = self.inodes.existing(path)
        of = self.open_files.get(node.ino) if node is not None else None
        return of is not None and (of.dirty or of.writer is not None or of.created or of.lost is not None)

    async def _apply_put(self, path: str, change: Change, st: Stat) -> None:
        st = st.with_(complete=True, kind_known=True, etag=None if st.is_dir else st.etag)
        self.ns.remember(path, st)
        node = self.inodes.existing(path)
        if node is not None:
            self._detach_if_replaced(node, st)
        await self._drop_older_copy(change.key, st)
        await self._forget_in_kernel(path, node, entry=not change.is_dir)

    async def _apply_removed(self, path: str, change: Change) -> None:
        if change.is_dir:  # rmdir, or a directory moved: what is below says so itself
            self.ns.invalidate(path)
            self.ns.last_known.pop(path, None)
        else:
            self.ns.forget(path)
        node = self.inodes.existing(path)
        if node is not None:
            self._detach(node)  # open handles keep their file, with nlink 0; the path is gone
        if not change.is_dir and not self.is_open(change.key):
            await self.cache.remove(change.key)
        await self._forget_in_kernel(path, node)

    async def _invalidate_path(self, path: str, key: str, *, entry: bool = True) -> None:
        self.ns.invalidate(path)
        self.ns.last_known.pop(path, None)  # its metadata may have changed with its ETag kept (a copy)
        await self._forget_in_kernel(path, self.inodes.existing(path), entry=entry)

    async def _drop_older_copy(self, key: str, st: Stat) -> None:
        entry = self.cache.lookup(key)
        if st.etag is None or entry is None or entry.etag == st.etag:
            return
        if key in self.cache.pins:  # pinned: stays cached, in its new version
            self.ask_hydration(key, st.etag, st.size, "changed")
        elif not self.is_open(key):  # open here: its readers keep the copy; the next open drops it
            await self.cache.remove(key)

    async def _forget_in_kernel(self, path: str, node: Node | None, *, entry: bool = True) -> None:
        """Make the kernel ask again: the inode's attributes (and pages), and with ``entry`` the name too.

        A directory that is still there keeps its entry: dropping it unhashes the dentry of every process's
        working directory below it (getcwd fails with ENOENT: git did, on a fresh mount replaying the feed's
        record of its mkdir). Only a live rmdir drops a directory's entry."""
        parent = self.inodes.existing(parent_of(path))
        # Without a node, the kernel's entry is a negative one (we said ENOENT) or a lookup is under way. Only the
        # first is dropped for a directory: dropping the entry a lookup is making (the kernel makes our call wait
        # for it) unhashed it, and getcwd of a process that had just entered the directory failed.
        if parent is not None and (entry or (node is None and path in self._told_missing)):
            self._told_missing.pop(path, None)
            await self.kernel.forget_entry(parent.ino, name_of(path).encode())
        if node is not None:
            node.kernel_etag = None
            await self.kernel.invalidate(node.ino)

    def statfs(self) -> dict[str, int]:
        return {"bsize": 4096, "namemax": 255}

    # -- special files, local state and revalidation (docs/semantics.md) --------------------------------------

    async def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
                    ) -> tuple[Node, Stat]:
        """A regular file, FIFO, socket or device node: an empty object with its mode (and rdev) in the
        metadata, as s3fs stores them. The kernel serves FIFOs, sockets and devices itself; only their
        attributes live here."""
        self._check_accepting()
        path = await self._child(parent_ino, name)
        kind = stat_mod.S_IFMT(mode) or stat_mod.S_IFREG
        if kind != stat_mod.S_IFREG and kind not in SPECIAL_TYPES:
            raise FsError(errno.EINVAL, f"mknod of {path!r}: mode {mode:o} is not a file type for mknod")
        key = self.keys.key(path)  # ENAMETOOLONG before anything is stored
        await self._require_absent(path)
        st = self._new_stat(kind, mode, uid, gid)
        if kind in (stat_mod.S_IFCHR, stat_mod.S_IFBLK):
            st = st.with_(rdev=rdev)
        st = st.with_(etag=await self.meta.put(key, b"", metadata_for(st)))
        self.ns.remember(path, st)
        self._publish(Change.put(key, st))
        return self.inodes.looked_up(path), st

    def _detach_if_replaced(self, node: Node, st: Stat) -> bool:
        """``st`` is what S3 holds at the node's path now. When the node is open (not written here) on
        another version, the path gets a new node on its next lookup and the old one keeps its handles."""
        of = self.open_files.get(node.ino)
        if of is None or self._is_local(of) or of.stat.etag == st.etag:
            return False
        self._detach(node)
        return True

    def _detach(self, node: Node) -> None:
        """The node's path no longer names it (deleted or replaced elsewhere); it reports nlink 0."""
        if not node.unlinked and self.inodes.existing(node.path) is node:
            self.inodes.unlink(node.path)

    @staticmethod
    def _is_local(of: OpenFile) -> bool:
        """The open file is being written here (or was unlinked): its own state is the truth, not S3's."""
        return of.dirty or of.writer is not None or of.created or of.lost is not None or of.node.unlinked

    async def _revalidate(self, ino: int, path: str) -> Stat:
        """The attributes an open uses: no older than --attr-timeout. A file deleted elsewhere fails the open
        and, from now on, every stat: the namespace forgot it, and the kernel's copy of its attributes is
        dropped."""
        try:
            st = await self.ns.stat(path, max_age=self.settings.attr_timeout)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                self._detach(self.inodes.node(ino))
                await self.kernel.invalidate(ino)
            raise
        if st.is_dir:
            raise FsError(errno.EISDIR, f"{path!r} is a directory")
        return st


def spool_dir_for(state_dir: Path) -> Path:
    return state_dir / "spool"

