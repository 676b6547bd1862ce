"""The Python floor: a bare pyfuse3 + trio passthrough filesystem, every request straight to the local disk.

    python benchmarks/passthrough.py SRC MNT        # foreground; stops at `fusermount3 -u MNT` or SIGTERM/SIGINT

The shape of pyfuse3's own example (examples/passthroughfs.py): each FUSE request is one handler that makes the
matching system call on ``SRC`` inline, on the trio thread, and replies. No cache, no S3, no thread hop, no metrics,
no error boundary beyond ``OSError -> FUSEError``. ``hybridfs bench`` mounts it as the system "floor": what a FUSE
filesystem written in Python on pyfuse3 + trio costs per request at the least, so hybridfs's (and s3fs's) request
costs can be stated as a ratio to it, measured in the same run.

Fairness: the kernel must send this filesystem the same requests it sends hybridfs, so the kernel-facing settings
are hybridfs's, not the example's:
- mount options ``pyfuse3.default_options`` (default_permissions) + ``noatime``, as ``hybridfs.fuse_ops.
  mount_options``; max_read / max_write are libfuse's defaults for both (128 KiB requests: pyfuse3 3.5 on libfuse
  3.14 sets neither, and hybridfs does not either);
- no writeback cache (``enable_writeback_cache = False``; the example turns it on, hybridfs cannot: close() must
  mean "in S3"), so every write() is a request here too;
- entries and attributes cached by the kernel for 1 s (hybridfs's ``--attr-timeout`` default; the example uses 0,
  which would send a GETATTR/LOOKUP for every stat and make the floor slower than hybridfs on metadata);
- ``keep_cache=False`` at every open (hybridfs's answer for the first open of a version; the bench's fio jobs
  drop the page cache or use O_DIRECT anyway, so every read is a request on both);
- the mount's kernel read-ahead (its bdi ``read_ahead_kb``) set to 4 MiB, hybridfs's ``--kernel-readahead``
  default: with the kernel's 128 KiB a sequential reader has one request in flight and the floor would measure the
  read-ahead, not Python;
- ``st_blksize`` 512 KiB, as hybridfs reports (stdio and ``cp`` size their buffers by it).
Differences kept on purpose: reads and writes are ``pread``/``pwrite`` on the trio thread (the example's
``lseek`` + ``read`` is two calls and unsafe with two requests on one descriptor); the descriptor is opened without
O_DIRECT (the kernel hands the request to us whatever the flag; a Python buffer is not aligned for O_DIRECT) and
without O_APPEND (the kernel gives the offset); one descriptor per open, not per inode (the example reuses the
first open's descriptor, so a write through a handle opened after a read-only one fails); hard links are refused
(EPERM) as in hybridfs, so one inode has one path. Inode numbers are our own (a counter per backing inode), so a
backing inode numbered 1 cannot collide with the root.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import resource
import signal
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, cast

import pyfuse3
import trio

log = logging.getLogger("passthrough")

ATTR_TIMEOUT = 1.0  # hybridfs's --attr-timeout default
KERNEL_READAHEAD = 4 * 1024**2  # hybridfs's --kernel-readahead default
BLKSIZE = 512 * 1024  # what hybridfs reports as st_blksize
# Flags the backing descriptor must not get: the kernel already applied them (or they cannot apply to a Python
# buffer), see the module docstring.
_STRIP = os.O_DIRECT | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOCTTY


def _fail(exc: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(exc.errno or errno.EIO)


@dataclass
class Inode:
    path: bytes | None  # None once unlinked: its name may already be another file's
    key: tuple[int, int]  # the backing (st_dev, st_ino)
    lookups: int = 0
    fds: set[int] = field(default_factory=set)  # open descriptors: getattr of an unlinked open file uses one


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = os.fsencode(os.path.abspath(source))
        root = os.lstat(self.source)
        key = (root.st_dev, root.st_ino)
        self.inodes: dict[int, Inode] = {pyfuse3.ROOT_INODE: Inode(self.source, key, lookups=1)}
        self.ids: dict[tuple[int, int], int] = {key: pyfuse3.ROOT_INODE}
        self.next_id = pyfuse3.ROOT_INODE + 1
        self.fd_inode: dict[int, int] = {}
        self.dirs: dict[int, tuple[int, list[tuple[bytes, os.stat_result]]]] = {}  # handle -> inode, listing
        self.next_dir = 1

    # -- inodes

    def _path(self, inode: int) -> bytes:
        node = self.inodes.get(inode)
        if node is None or node.path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node.path

    def _entry(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = cast(pyfuse3.InodeT, ino)
        attr.generation = 0
        attr.entry_timeout = attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = cast(pyfuse3.ModeT, st.st_mode)
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = BLKSIZE
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _inode_for(self, path: bytes, st: os.stat_result) -> Inode:
        """Our inode of a backing inode (a new id for one not seen), now known by ``path``."""
        key = (st.st_dev, st.st_ino)
        ino = self.ids.get(key)
        if ino is None:
            ino = self.ids[key] = self.next_id
            self.next_id += 1
            self.inodes[ino] = Inode(path, key)
        node = self.inodes[ino]
        node.path = path  # the name it was last reached by (a rename outside the mount is followed here)
        return node

    def _remember(self, path: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """An entry the kernel now holds: one more lookup of its inode."""
        node = self._inode_for(path, st)
        node.lookups += 1
        return self._entry(self.ids[node.key], st)

    @staticmethod
    def _lstat(path: bytes) -> os.stat_result | None:
        try:
            return os.lstat(path)
        except OSError:
            return None

    def _removed(self, st: os.stat_result | None) -> None:
        """A name of the backing inode ``st`` (as it was before) is gone: if it was the last one, our inode is
        detached (the kernel may still hold it, and ext4 reuses the number for the next new file)."""
        if st is None or not (st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode)):
            return
        ino = self.ids.pop((st.st_dev, st.st_ino), None)
        if ino is not None:
            self.inodes[ino].path = None

    async def forget(self, inode_list: Any) -> None:
        # The kernel forgets an inode only once nothing holds it open: no handle can outlive its record.
        for ino, count in inode_list:
            node = self.inodes.get(ino)
            if node is None or ino == pyfuse3.ROOT_INODE:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                del self.inodes[ino]
                if self.ids.get(node.key) == ino:
                    del self.ids[node.key]

    # -- attributes

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        parent = self._path(parent_inode)
        if name == b".":
            path = parent
        elif name == b"..":
            path = parent if parent == self.source else os.path.dirname(parent)
        else:
            path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise _fail(exc) from None
        return self._remember(path, st)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = self.inodes.get(inode)
        try:
            if node is not None and node.fds:
                st = os.fstat(next(iter(node.fds)))
            elif node is not None and node.path is not None:
                st = os.lstat(node.path)
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
        except OSError as exc:
            raise _fail(exc) from None
        return self._entry(inode, st)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1,
                         follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                old = os.lstat(path)
                atime = attr.st_atime_ns if fields.update_atime else old.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else old.st_mtime_ns
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        except OSError as exc:
            raise _fail(exc) from None
        return await self.getattr(inode)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        try:
            return os.readlink(self._path(inode))
        except OSError as exc:
            raise _fail(exc) from None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        try:
            vfs = os.statvfs(self.source)
        except OSError as exc:
            raise _fail(exc) from None
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                     "f_namemax"):
            setattr(data, name, getattr(vfs, name))
        return data

    # -- extended attributes (straight through; `ls -l` asks security.selinux of every entry)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise _fail(exc) from None

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        try:
            return [os.fsencode(n) for n in os.listxattr(self._path(inode), follow_symlinks=False)]
        except OSError as exc:
            raise _fail(exc) from None

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        try:
            os.setxattr(self._path(inode), name, value, follow_symlinks=False)
        except OSError as exc:
            raise _fail(exc) from None

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        try:
            os.removexattr(self._path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise _fail(exc) from None

    # -- namespace

    def _made(self, path: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        """A new node: owned by the caller (this process runs as root), then remembered."""
        try:
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
            st = os.lstat(path)
        except OSError as exc:
            raise _fail(exc) from None
        return self._remember(path, st)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        path = os.path.join(self._path(parent_inode), name)
        try:
            os.mknod(path, mode & ~ctx.umask, rdev)
        except OSError as exc:
            raise _fail(exc) from None
        return self._made(path, ctx)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        path = os.path.join(self._path(parent_inode), name)
        try:
            os.mkdir(path, mode & ~ctx.umask)
        except OSError as exc:
            raise _fail(exc) from None
        return self._made(path, ctx)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        path = os.path.join(self._path(parent_inode), name)
        try:
            os.symlink(target, path)
        except OSError as exc:
            raise _fail(exc) from None
        return self._made(path, ctx)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)  # as hybridfs: one inode, one path

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = os.path.join(self._path(parent_inode), name)
        before = self._lstat(path)
        try:
            os.unlink(path)
        except OSError as exc:
            raise _fail(exc) from None
        self._removed(before)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = os.path.join(self._path(parent_inode), name)
        before = self._lstat(path)
        try:
            os.rmdir(path)
        except OSError as exc:
            raise _fail(exc) from None
        self._removed(before)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_NOREPLACE / EXCHANGE: not in this baseline
        old = os.path.join(self._path(parent_inode_old), name_old)
        new = os.path.join(self._path(parent_inode_new), name_new)
        moved, replaced = self._lstat(old), self._lstat(new)
        try:
            os.rename(old, new)
        except OSError as exc:
            raise _fail(exc) from None
        if replaced is not None and moved is not None and (replaced.st_dev, replaced.st_ino) != (
                moved.st_dev, moved.st_ino):
            self._removed(replaced)
        # Every known path at or below the old name moves with it.
        below = old + b"/"
        for node in self.inodes.values():
            if node.path is None:
                continue
            if node.path == old:
                node.path = new
            elif node.path.startswith(below):
                node.path = new + node.path[len(old):]

    # -- files

    def _opened(self, inode: int, fd: int) -> int:
        self.inodes[inode].fds.add(fd)
        self.fd_inode[fd] = inode
        return fd

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        path = self._path(inode)
        try:
            fd = os.open(path, flags & ~_STRIP)
        except OSError as exc:
            raise _fail(exc) from None
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, self._opened(inode, fd)), keep_cache=False)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        path = os.path.join(self._path(parent_inode), name)
        try:
            fd = os.open(path, (flags & ~_STRIP) | os.O_CREAT | (flags & os.O_EXCL), mode & ~ctx.umask)
        except OSError as exc:
            raise _fail(exc) from None
        try:
            entry = self._made(path, ctx)
        except pyfuse3.FUSEError:
            os.close(fd)
            raise
        fh = self._opened(entry.st_ino, fd)
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, fh), keep_cache=False), entry

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(fh, size, off)
        except OSError as exc:
            raise _fail(exc) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise _fail(exc) from None

    async def flush(self, fh: int) -> None:
        return None  # every write is already in the backing file

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        except OSError as exc:
            raise _fail(exc) from None

    async def release(self, fh: int) -> None:
        node = self.inodes.get(self.fd_inode.pop(fh, 0))
        if node is not None:
            node.fds.discard(fh)
        try:
            os.close(fh)
        except OSError as exc:
            raise _fail(exc) from None

    # -- directories

    async def opendir(self, inode: int, ctx: Any) -> pyfuse3.FileHandleT:
        self._path(inode)  # known (the kernel sends opendir for directories only)
        handle = self.next_dir
        self.next_dir += 1
        self.dirs[handle] = (inode, [])
        return cast(pyfuse3.FileHandleT, handle)

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        inode, entries = self.dirs[fh]
        path = self._path(inode)
        if start_id == 0:  # (re)read the directory: one listing per pass, offsets are indexes into it
            entries = []
            try:
                with os.scandir(path) as it:
                    for entry in it:
                        try:
                            entries.append((os.fsencode(entry.name), entry.stat(follow_symlinks=False)))
                        except OSError:
                            continue  # removed meanwhile
            except OSError as exc:
                raise _fail(exc) from None
            self.dirs[fh] = (inode, entries)
        for i in range(start_id, len(entries)):
            name, st = entries[i]
            node = self._inode_for(os.path.join(path, name), st)
            # readdir_reply hands the kernel an entry (READDIRPLUS): a lookup, counted only if it was taken.
            if not pyfuse3.readdir_reply(token, name, self._entry(self.ids[node.key], st), i + 1):
                return
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None


def set_kernel_readahead(target: str, size: int) -> None:
    """The mount's bdi read_ahead_kb, as hybridfs sets it. Only once the mount answers: the kernel lowers the
    read-ahead to what our reply to its INIT request allows (128 KiB), so a value written before that is lost. The
    stat is a request to ourselves: call it from a thread while main() serves."""
    path = "the mount's read_ahead_kb"
    try:
        dev = os.stat(target).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        with open(path, "w") as out:
            out.write(str(size // 1024))
    except OSError as exc:
        log.info("kernel read-ahead left at its default: cannot write %s (%s)", path, exc.strerror)


async def serve(target: str, readahead: int, stopped: list[int]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, stopped)
        if readahead > 0:
            nursery.start_soon(trio.to_thread.run_sync, set_kernel_readahead, target, readahead)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signals(stopped: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            stopped.append(signum)
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="directory to mirror")
    parser.add_argument("mountpoint")
    parser.add_argument("--kernel-readahead", type=int, default=KERNEL_READAHEAD, metavar="BYTES",
                        help="the mount's kernel read-ahead (default 4 MiB, as hybridfs; 0 leaves the kernel's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one descriptor per open file of the clients
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ops = Passthrough(args.source)
    options = set(pyfuse3.default_options) | {f"fsname=floor:{os.path.abspath(args.source)}",
                                              "subtype=passthrough", "noatime"}
    target = os.path.realpath(args.mountpoint)
    pyfuse3.init(ops, target, options)
    log.info("mounted %s on %s", args.source, args.mountpoint)
    stopped: list[int] = []  # the signal that ended main(), if one did
    try:
        trio.run(serve, target, args.kernel_readahead, stopped)
    finally:
        # After `fusermount3 -u`, main() returns with the mount gone; after a signal (or an error) it is still
        # there: terminate() only ends main().
        pyfuse3.close(unmount=bool(stopped) or sys.exc_info()[0] is not None)
    log.info("unmounted %s", args.mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
