"""The local tier: a bounded cache directory and its SQLite index.

Layout under the cache directory::

    index.sqlite            what is cached: key, ETag, size, last access, pinned
    objects/ab/<digest>     one file per (key, ETag): digest = sha256(key NUL etag), so versions never mix
    tmp/                    files being written (tee of uploads, hydrations); cleared at start

The cache is an accelerator, never a dependency: every disk failure (full, read-only, erroring, missing) turns
into "not cached" plus a log line, and the caller carries on from S3. Blocking disk and SQLite calls run in
threads behind the ``disk`` CapacityLimiter; the in-memory mirror of the index answers lookups without I/O.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import trio

log = logging.getLogger("hybridfs.cache")

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    last_access REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS pins (key TEXT PRIMARY KEY);
"""


@dataclass(frozen=True)
class CacheEntry:
    key: str
    etag: str
    size: int
    last_access: float
    pinned: bool = False


class CacheUnavailable(Exception):
    """The cache directory cannot be used right now (the reason is in the message)."""


def data_name(key: str, etag: str) -> str:
    digest = hashlib.sha256(f"{key}\0{etag}".encode()).hexdigest()
    return f"{digest[:2]}/{digest}"


class LocalCache:
    def __init__(self, root: Path, capacity: int, *, threads: int = 4) -> None:
        self.root = Path(root)
        self.capacity = capacity
        self.limiter = trio.CapacityLimiter(threads)
        self.limiter_name = "disk"
        self.entries: dict[str, CacheEntry] = {}
        self.pins: set[str] = set()  # keys pinned, cached or not: pinned files are hydrated and never evicted
        self.available = False
        self.unavailable_reason = "not opened"
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        self._touched: set[str] = set()
        self.hits = 0
        self.misses = 0

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open or create the cache; on failure the mount runs without it (every read is a miss)."""
        try:
            await self._run(self._open_sync)
        except (OSError, sqlite3.Error) as exc:
            self._disable(f"cannot open cache directory {self.root}: {exc}")
            return
        self.available = True
        log.info("cache %s: %d files, %d bytes of %d", self.root, len(self.entries), self.usage(),
                 self.capacity)

    def _open_sync(self) -> None:
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp"
        tmp.mkdir(exist_ok=True)
        for leftover in tmp.iterdir():  # partial writes of a previous run
            leftover.unlink(missing_ok=True)
        db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        rows = db.execute("SELECT key, etag, size, last_access, pinned FROM entries").fetchall()
        self.pins = {r[0] for r in db.execute("SELECT key FROM pins")}
        stale = []
        for key, etag, size, last_access, pinned in rows:
            path = self.data_path(key, etag)
            try:
                ok = path.stat().st_size == size
            except OSError:
                ok = False
            if ok:
                self.entries[key] = CacheEntry(key, etag, size, last_access, bool(pinned))
            else:
                stale.append(key)
        if stale:
            log.warning("cache %s: %d index entries had no intact data file; dropped", self.root, len(stale))
            db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in stale])
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error, OSError):
                self._flush_touched_sync()
            with self._db_lock:
                self._db.close()
            self._db = None

    def _disable(self, reason: str) -> None:
        if self.available or self.unavailable_reason != reason:
            log.warning("%s; serving from S3 only until it recovers", reason)
        self.available = False
        self.unavailable_reason = reason

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.limiter, abandon_on_cancel=False)

    def _exec(self, sql: str, params: tuple[object, ...] = ()) -> None:
        if self._db is None:
            raise CacheUnavailable(self.unavailable_reason)
        with self._db_lock:
            self._db.execute(sql, params)

    # -- lookups (no I/O) -----------------------------------------------------------------------------------

    def data_path(self, key: str, etag: str) -> Path:
        return self.root / "objects" / data_name(key, etag)

    def lookup(self, key: str, etag: str | None = None) -> CacheEntry | None:
        """The entry for ``key`` when cached (and, given ``etag``, only when it is that version)."""
        if not self.available:
            return None
        entry = self.entries.get(key)
        if entry is None or (etag is not None and entry.etag != etag):
            return None
        return entry

    def usage(self) -> int:
        return sum(e.size for e in self.entries.values())

    def touch(self, key: str) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries[key] = replace(entry, last_access=time.time())
            self._touched.add(key)

    def coldest(self, exclude: Callable[[str], bool]) -> list[CacheEntry]:
        """Unpinned entries, least recently used first, skipping keys ``exclude`` says are busy."""
        candidates = [e for e in self.entries.values() if not e.pinned and e.key not in self.pins
                      and not exclude(e.key)]
        return sorted(candidates, key=lambda e: e.last_access)

    # -- changes --------------------------------------------------------------------------------------------

    def new_temp_path(self) -> Path:
        return self.root / "tmp" / uuid.uuid4().hex

    async def commit(self, temp: Path, key: str, etag: str, size: int) -> bool:
        """Move a fully written temp file into place as (key, etag). False, logged, when the disk refuses."""
        if not self.available:
            return False
        if size > self.capacity:
            await self._run(lambda: temp.unlink(missing_ok=True))
            return False
        try:
            old = await self._run(lambda: self._commit_sync(temp, key, etag, size))
        except (OSError, sqlite3.Error, CacheUnavailable) as exc:
            log.warning("cache: could not store %s: %s", key, exc)
            with contextlib.suppress(OSError):
                await self._run(lambda: temp.unlink(missing_ok=True))
            return False
        if old is not None and old.etag != etag:
            log.debug("cache: %s replaced version %s by %s", key, old.etag, etag)
        return True

    def _commit_sync(self, temp: Path, key: str, etag: str, size: int) -> CacheEntry | None:
        final = self.data_path(key, etag)
        final.parent.mkdir(exist_ok=True)
        os.replace(temp, final)
        now = time.time()
        pinned = key in self.pins
        self._exec("INSERT OR REPLACE INTO entries (key, etag, size, last_access, pinned) VALUES (?,?,?,?,?)",
                   (key, etag, size, now, int(pinned)))
        old = self.entries.get(key)
        self.entries[key] = CacheEntry(key, etag, size, now, pinned)
        if old is not None and old.etag != etag:
            self.data_path(key, old.etag).unlink(missing_ok=True)
        return old

    async def remove(self, key: str) -> int:
        """Drop ``key`` from the cache; returns the bytes freed (0 when it was not cached)."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return 0
        try:
            await self._run(lambda: self._remove_sync(entry))
        except (OSError, sqlite3.Error, CacheUnavailable) as exc:
            log.warning("cache: could not remove %s: %s", key, exc)
        return entry.size

    def _remove_sync(self, entry: CacheEntry) -> None:
        self._exec("DELETE FROM entries WHERE key = ?", (entry.key,))
        self.data_path(entry.key, entry.etag).unlink(missing_ok=True)

    async def rename(self, old_key: str, new_key: str) -> None:
        """Follow a rename in S3: the cached bytes are the same, the ETag of a copy may differ, so drop."""
        await self.remove(old_key)
        await self.remove(new_key)

    async def set_pinned(self, key: str, pinned: bool) -> None:
        if pinned:
            self.pins.add(key)
        else:
            self.pins.discard(key)
        entry = self.entries.get(key)
        if entry is not None:
            self.entries[key] = replace(entry, pinned=pinned)

        def persist() -> None:
            if pinned:
                self._exec("INSERT OR IGNORE INTO pins (key) VALUES (?)", (key,))
            else:
                self._exec("DELETE FROM pins WHERE key = ?", (key,))
            self._exec("UPDATE entries SET pinned = ? WHERE key = ?", (int(pinned), key))

        try:
            await self._run(persist)
        except (OSError, sqlite3.Error, CacheUnavailable) as exc:
            log.warning("cache: could not persist pin of %s: %s", key, exc)

    async def flush_touched(self) -> None:
        """Persist last-access times (batched: a read hit must not cost a disk write)."""
        if self._touched and self._db is not None:
            try:
                await self._run(self._flush_touched_sync)
            except (OSError, sqlite3.Error) as exc:
                log.warning("cache: could not persist access times: %s", exc)

    def _flush_touched_sync(self) -> None:
        touched, self._touched = self._touched, set()
        rows = [(self.entries[k].last_access, k) for k in touched if k in self.entries]
        if rows and self._db is not None:
            with self._db_lock:
                self._db.executemany("UPDATE entries SET last_access = ? WHERE key = ?", rows)

    async def disk_free(self) -> int | None:
        """Free bytes on the cache's filesystem, or None when it cannot be read."""
        try:
            st = await self._run(lambda: os.statvfs(self.root))
        except OSError:
            return None
        return st.f_bavail * st.f_frsize


class TeeFile:
    """The local copy of a file being uploaded. A failure here never fails the upload: it is recorded in
    ``failed`` and the caller raises a hydrate event instead."""

    def __init__(self, cache: LocalCache) -> None:
        self.cache = cache
        self.path: Path | None = None
        self._fd: int | None = None
        self._open_lock = threading.Lock()
        self.failed: str | None = None if cache.available else f"cache unavailable ({cache.unavailable_reason})"
        self.written = 0

    async def write(self, offset: int, data: bytes) -> None:
        if self.failed is not None:
            return
        if offset + len(data) > self.cache.capacity:
            await self.discard("larger than the cache")
            return
        try:
            await self.cache._run(lambda: self._write_sync(offset, data))
        except OSError as exc:
            await self.discard(f"{os.strerror(exc.errno or 5)} writing {self.path}")

    def _write_sync(self, offset: int, data: bytes) -> None:
        with self._open_lock:  # parts are teed from several threads at once: open the file exactly once
            if self._fd is None:
                self.path = self.cache.new_temp_path()
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        written = os.pwrite(self._fd, data, offset)
        if written != len(data):
            raise OSError(28, "short write")
        self.written = max(self.written, offset + len(data))

    async def commit(self, key: str, etag: str, size: int) -> bool:
        if self.failed is not None:
            return False
        try:
            await self.cache._run(self._close_sync)
            if self.path is None:  # empty file: nothing was written yet
                self.path = self.cache.new_temp_path()
                path = self.path
                await self.cache._run(lambda: path.touch())
        except OSError as exc:
            await self.discard(f"{os.strerror(exc.errno or 5)} closing {self.path}")
            return False
        if not await self.cache.commit(self.path, key, etag, size):
            self.failed = "could not store the finished file in the cache"
            return False
        return True

    async def detach(self) -> Path:
        """Hand the file written so far over to the caller (closed, not removed); the tee is done with it."""
        path = self.path
        if path is None:
            raise OSError(errno.ENOENT, "no local copy was written")
        await self.cache._run(self._close_sync)
        self.path = None
        self.failed = "handed over"
        return path

    def _close_sync(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    async def discard(self, reason: str | None = None) -> None:
        if reason is not None and self.failed is None:
            self.failed = reason
        path, self.path = self.path, None

        def drop() -> None:
            self._close_sync()
            if path is not None:
                path.unlink(missing_ok=True)

        with contextlib.suppress(OSError):
            await self.cache._run(drop)
