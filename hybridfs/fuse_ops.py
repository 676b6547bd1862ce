"""The FUSE layer: pyfuse3 requests in, core calls, replies out — and the single error boundary.

pyfuse3 stops the whole filesystem when a handler raises anything but ``FUSEError``. So every handler runs
through ``boundary``: an ``FsError`` becomes its errno plus a log line at its level ("op: why -> ERRNO"); any
other exception is a bug, logged with its traceback as "op: BUG: unexpected ...", and the caller gets EIO.
Nothing else escapes.
"""

from __future__ import annotations

import errno
import functools
import logging
import stat
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from hybridfs.core.attrs import Stat
from hybridfs.core.filesystem import XATTR_PREFIX, AttrChanges, Filesystem
from hybridfs.core.inodes import Node
from hybridfs.core.paths import name_of, parent_of
from hybridfs.errors import FsError, errno_name
from hybridfs.metrics import record_request

log = logging.getLogger("hybridfs.fuse")

_OUR_XATTRS = XATTR_PREFIX.encode()

P = ParamSpec("P")
R = TypeVar("R")


def boundary(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Also the one place every request is counted and timed, by operation and errno (hybridfs.metrics)."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        started, code = time.perf_counter(), 0
        try:
            return await fn(*args, **kwargs)
        except FsError as exc:
            code = exc.errno
            log.log(exc.level, "%s: %s -> %s", op, exc.message, errno_name(exc.errno))
            raise pyfuse3.FUSEError(exc.errno) from None
        except pyfuse3.FUSEError as exc:
            code = exc.errno
            raise
        except trio.Cancelled:
            code = errno.EINTR  # the kernel interrupted the request (or the mount is ending)
            raise
        except Exception as exc:
            code = errno.EIO
            # Worded unlike the FsError line above ("op: why -> ERRNO"): a test's allow-list for an expected
            # failure ("S3 said ...", "-> EIO") must never match a bug (tests/helpers.py fails on BUG lines).
            log.exception("%s: BUG: unexpected %s, replying EIO", op, type(exc).__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            record_request(op, code, time.perf_counter() - started)

    return wrapper


class KernelTimeouts:
    """How long the kernel may keep an entry and its attributes without asking us.

    ``attr_timeout`` (--attr-timeout, 1 s) normally. With a longer ``lasting_timeout`` (--trusted-attr-timeout),
    a file that is not open gets the longer time while ``lasting()`` holds — every writer's changes reach the
    mount (the change feed and the S3 event records caught up) and each change that arrives invalidates the
    kernel's entry and inode of its path — so `git status` and `ls -l` over a known tree stay in the kernel.
    Directories never do: dropping a directory's entry later would unhash the working directory of every
    process below it. States of the kernel's copy::

        short (--attr-timeout) --lasting() and not open--> lasting (ino in ``given``)
        lasting --a change arrives--> dropped by Filesystem.apply_change (its kernel invalidation)
        lasting --lasting() stops--> dropped by ``watch`` (every entry and attribute in ``given``) --> short

    ``watch`` looks every ``WATCH_INTERVAL`` s: a change made while the consumers were behind reaches us late
    and invalidates then; a change that never reaches us (S3 event records dropped by the bucket) is what the
    drop on leaving lasting mode is for. The kernel discards an attribute reply older than an invalidation of
    its inode (attr_version), so a getattr on its way when a change arrives cannot put old attributes back.
    """

    WATCH_INTERVAL = 0.1

    def __init__(self, fs: Filesystem, attr_timeout: float, lasting_timeout: float = 0.0) -> None:
        self.fs = fs
        self.attr_timeout = attr_timeout
        self.lasting_timeout = max(lasting_timeout, attr_timeout)
        self.given: set[int] = set()  # inodes given lasting_timeout since the last drop
        self.drops = 0  # times lasting mode ended with entries to drop from the kernel

    @property
    def enabled(self) -> bool:
        return self.lasting_timeout > self.attr_timeout

    def for_node(self, node: Node, st: Stat) -> float:
        if not st.complete:
            return 0.0
        if (self.enabled and not st.is_dir and node.open_handles == 0 and not node.unlinked
                and self.fs.ns.lasting()):
            self.given.add(node.ino)
            if len(self.given) > 2 * len(self.fs.inodes.by_ino) + 1024:  # forgotten ones: keep the set bounded
                self.given &= self.fs.inodes.by_ino.keys()
            return self.lasting_timeout
        return self.attr_timeout

    async def watch(self, kernel: PyfuseKernel) -> None:
        while True:
            await trio.sleep(self.WATCH_INTERVAL)
            if self.given and not self.fs.ns.lasting():
                await self.drop(kernel)

    async def drop(self, kernel: PyfuseKernel) -> None:
        """Make the kernel ask again for everything given lasting_timeout (computed here, sent from a thread)."""
        given, self.given = self.given, set()
        inodes: list[int] = []
        entries: list[tuple[int, bytes]] = []
        table = self.fs.inodes
        for ino in given:
            node = table.by_ino.get(ino)
            if node is None:  # the kernel forgot it
                continue
            inodes.append(ino)
            parent = table.existing(parent_of(node.path)) if not node.unlinked else None
            if parent is not None:
                entries.append((parent.ino, name_of(node.path).encode()))
        self.drops += 1
        log.info("change feed or S3 event records not caught up: dropping %d entries and attributes kept by the "
                 "kernel (--trusted-attr-timeout); back to --attr-timeout", len(inodes))
        await kernel.invalidate_many(inodes, entries)


class FuseOperations(pyfuse3.Operations):
    enable_writeback_cache = False  # writes must reach us at once so close() can mean "in S3"

    def __init__(self, fs: Filesystem, *, attr_timeout: float = 1.0, timeouts: KernelTimeouts | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.timeouts = timeouts or KernelTimeouts(fs, attr_timeout)

    def entry(self, node: Node, st: Stat, *, listing: bool = False) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = cast(pyfuse3.InodeT, node.ino)
        attr.generation = 0
        node.told_attrs(st.etag)  # an open of another version (or of one not known) drops them (core)
        # Attributes from a listing lack the object metadata: the kernel must not cache them, neither the
        # attributes nor the entry, so the next stat (even through a cached dentry) asks us again.
        attr.attr_timeout = attr.entry_timeout = self.timeouts.for_node(node, st)
        mode = st.mode
        if listing and not st.kind_known:
            # Only a listing has seen it, and a plain object may be a symlink or a FIFO. No type bits: the
            # kernel reports DT_UNKNOWN and does not make an inode of it (it refuses the attributes and
            # forgets the entry), so programs lstat it, and the lookup brings the real type.
            mode = stat.S_IMODE(mode)
        attr.st_mode = cast(pyfuse3.ModeT, mode)
        attr.st_nlink = 0 if node.unlinked else 2 if st.is_dir else 1
        attr.st_uid = st.uid
        attr.st_gid = st.gid
        attr.st_rdev = st.rdev
        attr.st_size = st.size
        attr.st_blksize = 512 * 1024
        attr.st_blocks = (st.size + 511) // 512
        attr.st_atime_ns = st.accessed_ns
        attr.st_mtime_ns = st.mtime_ns
        attr.st_ctime_ns = st.changed_ns
        return attr

    # -- lookups and attributes ------------------------------------------------------------------------------

    @boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node, st = await self.fs.lookup(parent_inode, name)
        return self.entry(node, st)

    async def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:  # must never raise
            try:
                self.fs.forget(ino, count)
            except Exception:
                log.exception("forget(%s) failed", ino)

    @boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        st = await self.fs.getattr(inode)
        return self.entry(self.fs.inodes.node(inode), st)

    @boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        changes = AttrChanges(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,  # UTIME_NOW: pyfuse3 fills in now
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
        )
        st = await self.fs.setattr(inode, changes, fh)
        return self.entry(self.fs.inodes.node(inode), st)

    @boundary
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.fs.readlink(inode)

    # -- namespace -------------------------------------------------------------------------------------------

    @boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        node, st = await self.fs.mknod(parent_inode, name, mode & ~ctx.umask, rdev, ctx.uid, ctx.gid)
        return self.entry(node, st)

    @boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        node, st = await self.fs.mkdir(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
        return self.entry(node, st)

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent_inode, name)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent_inode, name)

    @boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        node, st = await self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        return self.entry(node, st)

    @boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise FsError(errno.EPERM, f"link {new_name!r}: hard links cannot be stored in S3", level=logging.INFO)

    # -- files -----------------------------------------------------------------------------------------------

    @boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        fh, node, st = await self.fs.create(parent_inode, name, mode & ~ctx.umask, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self.entry(node, st)

    @boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        fh, keep = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @boundary
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @boundary
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    # -- directories -----------------------------------------------------------------------------------------

    @boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        return await self.fs.opendir(inode)

    @boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        def reply(name: bytes, node: Node, st: Stat, next_id: int) -> bool:
            return bool(pyfuse3.readdir_reply(token, name, self.entry(node, st, listing=True), next_id))

        await self.fs.readdir(fh, start_id, reply)

    @boundary
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None  # directory changes are in S3 when the call that made them returns

    @boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        # An object store has no fixed size; report 1 PiB free like other S3 filesystems do.
        data.f_blocks = data.f_bfree = data.f_bavail = 2**50 // 4096
        data.f_files = data.f_ffree = data.f_favail = 2**32
        data.f_namemax = 255
        return data

    # -- extended attributes ---------------------------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if not name.startswith(_OUR_XATTRS):
            # `ls -l` asks for security.selinux and system.posix_acl_access of every entry, and the kernel
            # asks for security.capability before writes; none exists here. Answered before the boundary's
            # error path (an FsError with its message, a log call, a second exception): 55-80 us a request
            # instead of 95-140 us, most of `ls -l` over a known directory.
            record_request("getxattr", errno.ENODATA, 0.0)
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._getxattr(inode, name, ctx)

    @boundary
    async def _getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.fs.getxattr(inode, name.decode(errors="replace"))

    @boundary
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [n.encode() for n in await self.fs.listxattr(inode)]

    @boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise FsError(errno.ENOTSUP, f"setxattr {name!r}: extended attributes are not stored in S3",
                      level=logging.DEBUG)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise FsError(errno.ENOTSUP, f"removexattr {name!r}: extended attributes are not stored in S3",
                      level=logging.DEBUG)


class PyfuseKernel:
    """KernelNotifier for the mount: invalidate_inode can block, so it runs in a thread (never inline)."""

    async def invalidate(self, ino: int) -> None:
        def call() -> None:
            try:
                pyfuse3.invalidate_inode(cast(pyfuse3.InodeT, ino), attr_only=False)
            except (FileNotFoundError, OSError) as exc:  # the kernel already forgot it
                log.debug("invalidate_inode(%d): %s", ino, exc)

        await trio.to_thread.run_sync(call)

    async def forget_entry(self, parent_ino: int, name: bytes) -> None:
        def call() -> None:
            try:
                pyfuse3.invalidate_entry(cast(pyfuse3.InodeT, parent_ino), cast(pyfuse3.FileNameT, name))
            except (FileNotFoundError, OSError) as exc:  # the kernel has no such entry (any more)
                log.debug("invalidate_entry(%d, %r): %s", parent_ino, name, exc)

        await trio.to_thread.run_sync(call)

    async def invalidate_many(self, inodes: list[int], entries: list[tuple[int, bytes]]) -> None:
        """Drop the attributes of ``inodes`` (their pages stay) and the ``entries``, in one thread."""

        def call() -> None:
            for ino in inodes:
                try:
                    pyfuse3.invalidate_inode(cast(pyfuse3.InodeT, ino), attr_only=True)
                except OSError as exc:
                    log.debug("invalidate_inode(%d): %s", ino, exc)
            for parent_ino, name in entries:
                try:
                    pyfuse3.invalidate_entry(cast(pyfuse3.InodeT, parent_ino), cast(pyfuse3.FileNameT, name))
                except OSError as exc:
                    log.debug("invalidate_entry(%d, %r): %s", parent_ino, name, exc)

        await trio.to_thread.run_sync(call)


def mount_options(fsname: str, *, allow_other: bool, read_only: bool = False) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {f"fsname={fsname}", "subtype=hybridfs", "noatime"}
    if allow_other:
        options.add("allow_other")
    if read_only:
        options.add("ro")
    return options
