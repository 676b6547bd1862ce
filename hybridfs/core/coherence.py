"""Changes made elsewhere (another tool writing to the bucket), applied to what this mount caches.

An invalidation never asserts anything about the object: it drops what the namespace, the kernel and the cache
hold of the key, and the next lookup, stat or open asks S3 (attributes are fetched lazily). So a notification
that arrives late, twice or out of order costs at most a HEAD, never a wrong answer.

What is dropped for a key (a file, or a ``dir/`` marker):

* the namespace's attributes of the path (for a removal, of its ancestors too) and the listings that name
  it (the parent's; for a removal every ancestor's too, since an implicit directory may have vanished with
  its last key; for a creation the ancestors whose listing lacks the new name), and the negative entries of
  the path and its ancestors;
* the kernel's cached attributes and pages of its inode, and its dentry in the parent (for a removal, the
  ancestors' dentries too);
* the cached copy of an older ETag (when nobody has the file open; a pinned file is hydrated again).

Paths with local state are left alone: a file being created or written here is what this mount says it is
until its upload (the write path compares ETags when it stores). The path's own part is
``Filesystem.invalidate_key`` (the change feed's); this module adds what a foreign key implies for its
ancestors and for the cached copy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hybridfs.core.paths import name_of, parent_of

if TYPE_CHECKING:
    from hybridfs.core.filesystem import Filesystem

log = logging.getLogger("hybridfs.coherence")


def _ancestors(path: str) -> list[str]:
    """``a/b/c`` -> ``["a/b", "a", ""]``."""
    found = []
    while path:
        path = parent_of(path)
        found.append(path)
    return found


async def invalidate_key(fs: Filesystem, key: str, *, removed: bool, etag: str | None = None,
                         size: int | None = None) -> bool:
    """Forget what this mount caches of ``key`` (changed in S3 by someone else); False when nothing applied
    (outside the mount's prefix, the mount root, or a path with local state).

    A removal is applied as "changed, ask S3" too, never as a tombstone: a record may arrive seconds late
    (MinIO's queue), after the name was created again."""
    path = fs.keys.path(key)
    if not path or fs._written_here(path):
        return False
    # The path's attributes, its and its parent's listings, its kernel entry and inode (Filesystem's half).
    await fs.invalidate_key(key)
    _forget_ancestors(fs, path, removed=removed)
    if removed:
        for ancestor in _ancestors(path)[:-1]:  # the kernel's dentries of directories that may have vanished
            await _forget_dentry(fs, ancestor)
    elif etag is not None:
        await _drop_older_copy(fs, key, etag, size or 0)
    return True


def _forget_ancestors(fs: Filesystem, path: str, *, removed: bool) -> None:
    """A new key makes its implicit parents exist; the removal of the last key under one may end it."""
    ns = fs.ns
    child = path
    for ancestor in _ancestors(path):
        ns.missing.pop(ancestor, None)
        if removed and ancestor:
            ns.stats.pop(ancestor, None)
            ns.standing.pop(ancestor, None)
        listing = ns.listings.get(ancestor)
        if listing is not None and (removed or name_of(child) not in listing):
            ns.listings.pop(ancestor, None)
        child = ancestor


async def _drop_older_copy(fs: Filesystem, key: str, etag: str, size: int) -> None:
    entry = fs.cache.lookup(key)
    if entry is None or entry.etag == etag:
        return
    if key in fs.cache.pins:  # pinned: keep it local, in its new version
        fs.ask_hydration(key, etag, size, "changed-remotely")
    if fs.is_open(key):
        return  # its readers hold the old version; the next open replaces the copy (Filesystem._reader_for)
    await fs.cache.remove(key)
    log.debug("dropped the cached copy of %s (version %s): S3 holds %s now", key, entry.etag, etag)


async def _forget_dentry(fs: Filesystem, path: str) -> None:
    parent = fs.inodes.existing(parent_of(path))
    if parent is not None:
        await fs.kernel.forget_entry(parent.ino, name_of(path).encode())


def disagrees(fs: Filesystem, path: str, etag: str | None) -> bool:
    """Whether something this mount may serve for the file at ``path`` without asking S3 says otherwise than S3
    holding version ``etag`` (None: nothing) — its attributes (fresh, or standing while trusted), the parent's
    listing, the negative entry, or what the kernel was given (attributes, pages). Directories are left out: a
    listing names them without a version."""
    ns = fs.ns
    cached = ns.stats.get(path)
    views = [cached.stat if cached is not None else None, ns.standing.get(path)]
    for st in views:
        if st is not None and not st.is_dir and (etag is None or st.etag != etag):
            return True
    if etag is not None and path in ns.missing:
        return True
    listing = ns.listings.get(parent_of(path))
    if listing is not None:
        entry = listing.get(name_of(path))
        if entry is None:
            if etag is not None:
                return True
        elif not entry.is_dir and entry.etag != etag:
            return True
    node = fs.inodes.existing(path)
    if node is not None and not node.unlinked:
        for given in (node.attr_etag, node.kernel_etag):
            if given is not None and given != etag:
                return True
    return False


async def reconcile(fs: Filesystem, key: str, etag: str | None, size: int | None = None) -> bool:
    """S3 holds version ``etag`` of ``key`` (None: nothing), as a record or a listing says: when what this mount
    knows says otherwise, forget it (``invalidate_key``; the next access asks S3). True when it did; the same
    version is a no-op, and so is a key the mount knows nothing of."""
    path = fs.keys.path(key)
    if not path or key.endswith("/") or not disagrees(fs, path, etag):
        return False
    return await invalidate_key(fs, key, removed=etag is None, etag=etag, size=size)
