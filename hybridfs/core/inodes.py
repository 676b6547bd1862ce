"""Inode numbers for paths, with the kernel's lookup counts.

The bucket has no inode numbers, so we hand them out as the kernel meets paths and keep each one until the
kernel forgets it (lookup count back to zero) and no handle is open on it. A rename moves the path of the node
(and of everything below a directory); an unlink detaches the path but keeps the node while the kernel or an
open handle still refers to it.

A path whose node was forgotten gets its old number back when it is met again (``recent``): readdir reports
entries of unknown type with attributes the kernel refuses, so it forgets them at once, and the lstat that
follows must find the same st_ino as the directory entry's d_ino. Reusing a number the kernel has forgotten is
allowed by FUSE.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from cachetools import LRUCache

from hybridfs.errors import FsError

ROOT_INO = 1
RECENT_ENTRIES = 100_000


@dataclass
class Node:
    ino: int
    path: str
    lookups: int = 0
    open_handles: int = 0
    unlinked: bool = False
    kernel_etag: str | None = None  # the version the kernel's page cache holds, for keep_cache
    attr_etag: str | None = None  # the version of the attributes (size) the kernel holds; None: not known
    attr_told: bool = False  # attributes were given to the kernel since it last dropped them

    def told_attrs(self, etag: str | None) -> None:
        """The kernel is sent attributes of version ``etag`` (a lookup, getattr, setattr or listing reply).

        Of the attribute replies of one inode that are in flight at once, the kernel keeps the first it applies
        and drops the others (fuse_change_attributes ignores a reply to a request sent before the inode's
        attributes last changed): the last reply sent is not always the one it holds. So once two versions were
        told since the kernel last dropped its attributes, it may hold either: not known (None) until an open of
        a version drops them (``kernel_dropped_attrs``)."""
        if not self.attr_told:
            self.attr_etag, self.attr_told = etag, True
        elif self.attr_etag != etag:
            self.attr_etag = None

    def kernel_dropped_attrs(self) -> None:
        """The kernel was told to drop its attributes of the inode: the next reply is what it will hold."""
        self.attr_etag, self.attr_told = None, False


class InodeTable:
    def __init__(self) -> None:
        self._next = ROOT_INO + 1
        root = Node(ROOT_INO, "", lookups=1)
        self.by_ino: dict[int, Node] = {ROOT_INO: root}
        self.by_path: dict[str, int] = {"": ROOT_INO}
        self.recent: LRUCache[str, int] = LRUCache(RECENT_ENTRIES)  # path -> number of its forgotten node

    def node(self, ino: int) -> Node:
        try:
            return self.by_ino[ino]
        except KeyError:
            raise FsError(errno.ESTALE, f"inode {ino} is not known (forgotten)") from None

    def path(self, ino: int) -> str:
        node = self.node(ino)
        if node.unlinked:
            raise FsError(errno.ENOENT, f"inode {ino} was unlinked")
        return node.path

    def for_path(self, path: str) -> Node:
        """The node of ``path``, created on first sight."""
        ino = self.by_path.get(path)
        if ino is not None:
            return self.by_ino[ino]
        ino = self.recent.pop(path, None)
        if ino is None or ino in self.by_ino:
            ino, self._next = self._next, self._next + 1
        node = Node(ino, path)
        self.by_ino[node.ino] = node
        self.by_path[path] = node.ino
        return node

    def existing(self, path: str) -> Node | None:
        ino = self.by_path.get(path)
        return None if ino is None else self.by_ino[ino]

    def looked_up(self, path: str) -> Node:
        node = self.for_path(path)
        node.lookups += 1
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self.by_ino.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def release(self, node: Node) -> None:
        node.open_handles -= 1
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups == 0 and node.open_handles == 0:
            del self.by_ino[node.ino]
            if not node.unlinked and self.by_path.get(node.path) == node.ino:
                del self.by_path[node.path]
                self.recent[node.path] = node.ino

    def unlink(self, path: str) -> None:
        ino = self.by_path.pop(path, None)
        if ino is not None:
            node = self.by_ino[ino]
            node.unlinked = True
            self._maybe_drop_detached(node)

    def _maybe_drop_detached(self, node: Node) -> None:
        if node.lookups == 0 and node.open_handles == 0:
            self.by_ino.pop(node.ino, None)

    def rename(self, old: str, new: str) -> None:
        """Move ``old`` (and, for a directory, every known path below it) to ``new``."""
        self.unlink(new)
        moves = [(p, ino) for p, ino in self.by_path.items() if p == old or p.startswith(old + "/")]
        for p, _ in moves:
            del self.by_path[p]
        for p, ino in moves:
            new_path = new + p[len(old):]
            self.by_ino[ino].path = new_path
            self.by_path[new_path] = ino

    def __len__(self) -> int:
        return len(self.by_ino)
