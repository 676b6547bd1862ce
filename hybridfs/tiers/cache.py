"""The local tier: a bounded cache directory, its SQLite index, and a checksum for every cached block.

Layout under the cache directory::

    index.sqlite            what is cached: key, ETag, size, last access, pinned, last-known attributes
    objects/ab/<digest>     one file per (key, ETag), the object's bytes as they are:
                            digest = sha256(key NUL etag), so versions never mix
    sums/ab/<digest>        its sidecar: key, ETag, size, block size and a CRC32C per block (``Sums``);
                            enough to rebuild the index from the disk alone
    tmp/                    files being written (tee of uploads, hydrations); cleared at start

Integrity: the checksums are computed from the bytes S3 acknowledged (the tee computes them from the parts it
uploads) or served (a hydration, from the file it downloaded), and verified on every read from the cache
(``open_verified``, through ``core/reader.CacheReader``), on every copy into a spool (``copy_verified``) and before
a re-upload (``verify``). A mismatch drops the copy, counts a checksum failure and asks for a hydration
(``on_corrupt``). A commit writes the data and the sidecar before the index row, and fsyncs them only with
``fsync`` (the mount's ``--cache-fsync``): a copy a power loss tore fails its checksums on first read, is dropped
and fetched again, since S3 holds every cached version.

Self-healing: the index is only a fast path. At open, and when the probe (``check``, called every few seconds)
finds the index missing, replaced or corrupt, or the directory replaced, gone or read-only, the cache
recreates its layout and rebuilds the index from the sidecars; data files without a usable sidecar, sidecars
without their data and temp leftovers are reclaimed. A cache directory locked by another process (flock on
the directory itself) fails the open with ``DirectoryInUse``.

The cache is an accelerator, never a dependency: every disk failure (full, read-only, erroring, missing) turns
into "not cached" plus a log line, and the caller carries on from S3. Every failing path leaves index and
files consistent: a removal unlinks the file first and keeps the entry when the unlink fails; a row whose
file is gone but whose DELETE failed (a full disk) is deleted again later.

Threads: everything on ``LocalCache`` itself (``entries``, ``pins``, counters, the sets of pending work,
``available``) belongs to the trio thread. Blocking disk and SQLite work runs in worker threads behind the
``disk`` CapacityLimiter, in functions that take what they need as arguments and *return* their results,
which the trio side then applies; they never touch that state. The SQLite connection (``Index``) belongs to
the worker threads and is used under its own lock; the trio side only holds the reference. Index writes are
issued under ``_index_lock`` (a trio lock, FIFO), so they reach SQLite in the order the trio side decided.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import sqlite3
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, ItemsView, Iterable, Iterator, MutableMapping, Sequence, ValuesView
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import google_crc32c
import trio

from hybridfs.tiers.s3 import ObjectInfo

log = logging.getLogger("hybridfs.cache")

T = TypeVar("T")

# The unit a checksum covers. A random 4 KiB read must read (and checksum) its whole block, so blocks are small;
# a 128 KiB FUSE read verifies four. Measured: 128 KiB blocks halved random 4 KiB reads through the mount.
BLOCK_SIZE = 32 * 1024
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    last_access REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    attrs TEXT
);
CREATE TABLE IF NOT EXISTS pins (key TEXT PRIMARY KEY);
"""
INDEX_NAME = "index.sqlite"
SUMS_MAGIC = b"HYBRIDFS-SUMS-1\n"

# A disk that answers these is gone or refuses writes: the cache turns unavailable until the probe sees it back.
DISK_GONE = {errno.ENOENT, errno.EROFS, errno.EIO, errno.ENOTDIR, errno.ESTALE, errno.EACCES, errno.EPERM}


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: the commit's fsync does all the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Blocking (briefly): start writing a range to disk without waiting for it, so the fsync at commit finds
    little left to do (measured: a 256 MiB tee's commit fsync 0.5-0.6 s -> under 10 ms). Best effort. Only
    with ``--cache-fsync``: without a commit fsync, forced writeback would only compete with S3's disk."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


@dataclass(frozen=True)
class CacheEntry:
    key: str
    etag: str
    size: int
    last_access: float
    pinned: bool = False
    # Last-known attributes of this version (s3fs-style metadata: mode, uid, gid, mtime), for offline lookups.
    attrs: dict[str, str] | None = field(default=None, compare=False, hash=False)


class EntryTable(MutableMapping[str, CacheEntry]):
    """The cached entries (key -> CacheEntry) with what would otherwise take a scan of all of them on the trio
    thread, kept as they change: their total size (``bytes``), how many live under each directory prefix
    (``has_below``), and the keys in least-recently-used order (``coldest``). At a million entries a scan is
    ~100 ms, a stall of every request of the mount; each of these answers in O(1) (``coldest``: per entry taken).

    Every mutation goes through ``__setitem__``/``__delitem__`` (MutableMapping routes ``pop``, ``update``,
    ``clear``... there), so the figures cannot drift from the entries. Reads go straight to the dict."""

    def __init__(self, entries: Iterable[CacheEntry] = ()) -> None:
        self._entries: dict[str, CacheEntry] = {}
        self.bytes = 0
        self._below: Counter[str] = Counter()  # "a/", "a/b/" -> keys below it
        # key -> last access, in access order while ``_ordered`` (touches move a key to the end); a time older
        # than the newest (a clock stepped back, an entry loaded out of order) costs one sort at the next use.
        self._order: dict[str, float] = {}
        self._newest = -math.inf
        self._ordered = True
        self._load(entries)

    def _load(self, entries: Iterable[CacheEntry]) -> None:
        """Bulk-build from ``entries`` (unique keys), a few C-speed passes: an open of a million entries."""
        oldest_first = sorted(entries, key=lambda e: e.last_access)
        self._entries = {e.key: e for e in oldest_first}
        self._order = {e.key: e.last_access for e in oldest_first}
        self.bytes = sum(e.size for e in oldest_first)
        self._newest = oldest_first[-1].last_access if oldest_first else -math.inf
        # Count each key in its own directory, then add each directory's count to its ancestors (few).
        parents = Counter(key[:key.rfind("/") + 1] for key in self._entries if "/" in key)
        for directory, count in parents.items():
            for prefix in _dir_prefixes(directory):
                self._below[prefix] += count

    # -- reads (the dict's own speed) --

    def __getitem__(self, key: str) -> CacheEntry:
        return self._entries[key]

    def get(self, key: str, default: CacheEntry | None = None) -> CacheEntry | None:  # type: ignore[override]
        return self._entries.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> ValuesView[CacheEntry]:
        return self._entries.values()

    def items(self) -> ItemsView[str, CacheEntry]:
        return self._entries.items()

    def __repr__(self) -> str:
        return f"EntryTable({self._entries!r})"

    # -- changes --

    def __setitem__(self, key: str, entry: CacheEntry) -> None:
        old = self._entries.get(key)
        self._entries[key] = entry
        if old is None:
            self.bytes += entry.size
            for prefix in _dir_prefixes(key):
                self._below[prefix] += 1
        else:
            self.bytes += entry.size - old.size
            if old.last_access == entry.last_access:  # pinned or attributes changed: same place in the order
                return
            del self._order[key]
        if entry.last_access < self._newest:
            self._ordered = False
        self._newest = max(self._newest, entry.last_access)
        self._order[key] = entry.last_access

    def __delitem__(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
        del self._order[key]
        for prefix in _dir_prefixes(key):
            left = self._below[prefix] - 1
            if left:
                self._below[prefix] = left
            else:
                del self._below[prefix]

    # -- the indexes --

    def has_below(self, prefix: str) -> bool:
        """Whether some key starts with ``prefix``: O(1) for "" and directory prefixes (ending in "/")."""
        if not prefix:
            return bool(self._entries)
        if prefix.endswith("/"):
            return prefix in self._below
        return any(k.startswith(prefix) for k in self._entries)  # not a directory: no index for it

    def coldest(self) -> Iterator[CacheEntry]:
        """Entries, least recently accessed first. Lazy: consume it before the table changes (no await)."""
        if not self._ordered:
            self._order = dict(sorted(self._order.items(), key=lambda item: item[1]))
            self._ordered = True
        entries = self._entries
        return (entries[key] for key in self._order)


def _dir_prefixes(key: str) -> Iterator[str]:
    """The directory prefixes a key lives under: "a/b/c" -> "a/", "a/b/"."""
    end = key.find("/")
    while end >= 0:
        yield key[:end + 1]
        end = key.find("/", end + 1)


class CacheUnavailable(Exception):
    """The cache directory cannot be used right now (the reason is in the message)."""


class DirectoryInUse(Exception):
    """Another process holds the directory's lock: a second mount on one cache or state directory."""


class SizeMismatch(Exception):
    """A copy to store is not as long as its version: the caller's size and ETag disagree. Not a disk fault:
    the copy is dropped and the cache stays in use (as an EIO it once turned the whole cache unavailable)."""


class CacheCorrupt(Exception):
    """A cached block does not match its checksum."""


# -- checksums (pure) --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sums:
    """The sidecar of one cached version: what it is, and a CRC32C per ``block`` bytes."""

    key: str
    etag: str
    size: int
    block: int
    crcs: tuple[int, ...]

    @staticmethod
    def count(size: int, block: int) -> int:
        return (size + block - 1) // block

    def span(self, index: int) -> tuple[int, int]:
        """Offset and length of block ``index``."""
        start = index * self.block
        return start, min(self.block, self.size - start)

    def blocks(self, offset: int, length: int) -> range:
        """The blocks that bytes [offset, offset+length) touch (within the file)."""
        end = min(offset + length, self.size)
        if end <= offset:
            return range(0)
        return range(offset // self.block, (end - 1) // self.block + 1)

    def encode(self) -> bytes:
        head = json.dumps({"key": self.key, "etag": self.etag, "size": self.size, "block": self.block},
                          separators=(",", ":")).encode()
        body = SUMS_MAGIC + struct.pack(">I", len(head)) + head + struct.pack(f">{len(self.crcs)}I", *self.crcs)
        return body + struct.pack(">I", crc32c(body))

    @classmethod
    def decode(cls, raw: bytes) -> Sums:
        """Parse a sidecar; ValueError when it is truncated, damaged or inconsistent."""
        if len(raw) < len(SUMS_MAGIC) + 8 or not raw.startswith(SUMS_MAGIC):
            raise ValueError("not a checksum file")
        body, (tail,) = raw[:-4], struct.unpack(">I", raw[-4:])
        if crc32c(body) != tail:
            raise ValueError("checksum file damaged")
        pos = len(SUMS_MAGIC)
        (head_len,) = struct.unpack(">I", body[pos:pos + 4])
        head = json.loads(body[pos + 4:pos + 4 + head_len])
        key, etag, size, block = head["key"], head["etag"], int(head["size"]), int(head["block"])
        if not isinstance(key, str) or not isinstance(etag, str) or size < 0 or block <= 0:
            raise ValueError("checksum file has a bad header")
        packed = body[pos + 4 + head_len:]
        n = cls.count(size, block)
        if len(packed) != 4 * n:
            raise ValueError("checksum file has the wrong number of blocks")
        return cls(key, etag, size, block, struct.unpack(f">{n}I", packed))

    @classmethod
    def of_bytes(cls, key: str, etag: str, data: bytes, block: int = BLOCK_SIZE) -> Sums:
        crcs = tuple(crc32c(data[i:i + block]) for i in range(0, len(data), block))
        return cls(key, etag, len(data), block, crcs)


def sums_of_file(fd: int, key: str, etag: str, size: int, block: int = BLOCK_SIZE) -> Sums:
    """Blocking: the checksums of an open file's first ``size`` bytes (OSError when it is shorter)."""
    crcs = []
    for index in range(Sums.count(size, block)):
        start = index * block
        want = min(block, size - start)
        data = os.pread(fd, want, start)
        if len(data) != want:
            raise OSError(errno.EIO, f"file shorter than {size} bytes")
        crcs.append(crc32c(data))
    return Sums(key, etag, size, block, tuple(crcs))


def verify_blocks(sums: Sums, first: int, data: bytes) -> int | None:
    """The first block of ``data`` (which starts at block ``first``) that fails its checksum, or None."""
    pos = 0
    index = first
    while pos < len(data):
        _, length = sums.span(index)
        piece = data if pos == 0 and length == len(data) else data[pos:pos + length]
        if len(piece) != length or crc32c(piece) != sums.crcs[index]:
            return index
        pos += length
        index += 1
    return None


def data_name(key: str, etag: str) -> str:
    digest = hashlib.sha256(f"{key}\0{etag}".encode()).hexdigest()
    return f"{digest[:2]}/{digest}"


# -- the directory lock ------------------------------------------------------------------------------------


def lock_directory(path: Path, what: str) -> int:
    """Blocking: take an exclusive flock on directory ``path`` (created when missing) and return its fd, which
    holds the lock until closed. DirectoryInUse when another process holds it."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryInUse(f"{what} {path} is in use by another hybridfs mount") from None
    except OSError:
        os.close(fd)
        raise
    return fd


# -- the index (worker threads only) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    etag: str
    size: int
    last_access: float
    pinned: bool
    attrs: dict[str, str] | None


class Index:
    """The SQLite index. Blocking; used only from worker threads, one at a time (``_lock``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"index schema version {version}, expected {SCHEMA_VERSION}")
            if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise sqlite3.DatabaseError("index of an older version (no checksums)")
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("index failed its integrity check")
        except BaseException:
            db.close()
            raise
        self.db = db
        self.ino = os.stat(path).st_ino

    def rows(self) -> tuple[list[Row], set[str]]:
        with self._lock:
            rows = [Row(k, e, s, a, bool(p), _attrs(t)) for k, e, s, a, p, t in self.db.execute(
                "SELECT key, etag, size, last_access, pinned, attrs FROM entries")]
            pins = {r[0] for r in self.db.execute("SELECT key FROM pins")}
        return rows, pins

    def put(self, rows: Iterable[Row]) -> None:
        with self._lock:
            self.db.executemany(
                "INSERT OR REPLACE INTO entries (key, etag, size, last_access, pinned, attrs) VALUES (?,?,?,?,?,?)",
                [(r.key, r.etag, r.size, r.last_access, int(r.pinned),
                  json.dumps(r.attrs) if r.attrs is not None else None) for r in rows])

    def delete(self, keys: Iterable[str]) -> None:
        with self._lock:
            self.db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])

    def delete_versions(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Delete the rows of (key, etag) pairs in one transaction."""
        with self._lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("DELETE FROM entries WHERE key = ? AND etag = ?", list(pairs))
                self.db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise

    def flush(self, touched: Sequence[tuple[float, str]], attrs: Sequence[tuple[str, str, dict[str, str]]]) -> None:
        """Persist access times (last_access, key) and attributes (key, etag, attrs) in one transaction."""
        with self._lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("UPDATE entries SET last_access = ? WHERE key = ?", touched)
                self.db.executemany("UPDATE entries SET attrs = ? WHERE key = ? AND etag = ?",
                                    [(json.dumps(a), k, e) for k, e, a in attrs])
                self.db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise

    def pin(self, key: str, pinned: bool) -> None:
        with self._lock:
            if pinned:
                self.db.execute("INSERT OR IGNORE INTO pins (key) VALUES (?)", (key,))
            else:
                self.db.execute("DELETE FROM pins WHERE key = ?", (key,))
            self.db.execute("UPDATE entries SET pinned = ? WHERE key = ?", (int(pinned), key))

    def replaced(self) -> bool:
        """The index file was deleted or replaced under us (we would be writing to an unlinked inode)."""
        try:
            return os.stat(self.path).st_ino != self.ino
        except FileNotFoundError:
            return True

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self.db.close()


def _attrs(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else None


# -- opening and rebuilding (worker threads) ---------------------------------------------------------------


@dataclass
class _RowDeletes:
    """Index rows that removals running at the same time delete in one transaction (``LocalCache._delete_row``)."""

    rows: set[tuple[str, str]] = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class Opened:
    """What a (re)open found; applied by the trio side."""

    index: Index
    lock_fd: int | None
    root_id: tuple[int, int]
    entries: EntryTable  # built in the worker thread: a million entries must not be indexed on the trio thread
    pins: set[str]
    rebuilt: str | None = None  # why the index was rebuilt from the sidecars, when it was
    reclaimed_files: int = 0
    reclaimed_bytes: int = 0
    dropped_rows: int = 0


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.sums = root / "sums"
        self.tmp = root / "tmp"
        self.index = root / INDEX_NAME

    def data_path(self, key: str, etag: str) -> Path:
        return self.objects / data_name(key, etag)

    def sums_path(self, key: str, etag: str) -> Path:
        return self.sums / data_name(key, etag)

    def root_id(self) -> tuple[int, int]:
        st = os.stat(self.root)
        return st.st_dev, st.st_ino

    def open(self, lock_fd: int | None, *, force_rebuild: str | None = None) -> Opened:
        """Blocking: lock, recreate the layout, open (or rebuild) the index and reconcile it with the disk."""
        if lock_fd is None:
            lock_fd = lock_directory(self.root, "cache directory")
        try:
            return self._open_locked(lock_fd, force_rebuild)
        except BaseException:
            os.close(lock_fd)
            raise

    def _open_locked(self, lock_fd: int, force_rebuild: str | None) -> Opened:
        for directory in (self.objects, self.sums, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        reclaimed = [0, 0]
        for leftover in self.tmp.iterdir():  # partial writes of a previous run
            _reclaim(leftover, reclaimed)
        rebuilt = force_rebuild
        missing = not self.index.exists()
        index: Index | None = None
        if rebuilt is None:
            try:
                index = Index(self.index)
            except sqlite3.OperationalError:
                raise  # locked, read-only, full: the disk's problem, not the index's; tried again later
            except sqlite3.DatabaseError as exc:
                rebuilt = f"index unusable ({exc})"
        if index is None:  # unusable (not merely busy or on a full disk): start a new one from the sidecars
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.index}{suffix}").unlink(missing_ok=True)
            index = Index(self.index)
        try:
            rows, pins = index.rows()
            entries, dropped = self._reconcile(rows, reclaimed)
            if missing and rebuilt is None and entries:  # a lost index, not a new cache
                rebuilt = "index.sqlite missing"
            if dropped:
                index.delete(dropped)
            indexed = {(r.key, r.etag) for r in rows}
            index.put(Row(e.key, e.etag, e.size, e.last_access, e.pinned, e.attrs) for e in entries.values()
                      if (e.key, e.etag) not in indexed)
        except BaseException:
            index.close()
            raise
        return Opened(index, lock_fd, self.root_id(), EntryTable(entries.values()), pins, rebuilt, reclaimed[0],
                      reclaimed[1], len(dropped))

    def _reconcile(self, rows: list[Row], reclaimed: list[int]) -> tuple[dict[str, CacheEntry], list[str]]:
        """Index rows whose files are intact, plus intact files the index lacks; everything else is reclaimed."""
        data_files = _scan(self.objects)
        sums_files = _scan(self.sums)
        entries: dict[str, CacheEntry] = {}
        dropped: list[str] = []
        for row in rows:
            name = data_name(row.key, row.etag)
            size = data_files.get(name)
            if size == row.size and name in sums_files and row.key not in entries:
                entries[row.key] = CacheEntry(row.key, row.etag, row.size, row.last_access, row.pinned, row.attrs)
            else:
                dropped.append(row.key)
        known = {data_name(e.key, e.etag) for e in entries.values()}
        for name in sorted(set(sums_files) - known):  # no row: adopt it when its sidecar says what it is
            sums = _read_sums(self.sums / name)
            ok = sums is not None and data_name(sums.key, sums.etag) == name and data_files.get(name) == sums.size
            if ok and sums is not None:
                old = entries.get(sums.key)
                mtime = _mtime(self.objects / name)
                if old is None or old.last_access < mtime:
                    if old is not None:
                        known.discard(data_name(old.key, old.etag))
                    entries[sums.key] = CacheEntry(sums.key, sums.etag, sums.size, mtime)
                    known.add(name)
        for name in set(data_files) | set(sums_files):
            if name not in known:
                for path in (self.objects / name, self.sums / name):
                    _reclaim(path, reclaimed)
        return entries, [k for k in dropped if k not in entries]


def _scan(top: Path) -> dict[str, int]:
    """Files two levels under ``top`` ("ab/<digest>") -> size."""
    found: dict[str, int] = {}
    with os.scandir(top) as subdirs:
        for sub in subdirs:
            if not sub.is_dir(follow_symlinks=False):
                continue
            with os.scandir(sub.path) as files:
                for f in files:
                    with contextlib.suppress(OSError):
                        found[f"{sub.name}/{f.name}"] = f.stat(follow_symlinks=False).st_size
    return found


def _read_sums(path: Path) -> Sums | None:
    try:
        return Sums.decode(path.read_bytes())
    except (OSError, ValueError, KeyError, struct.error):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _reclaim(path: Path, counts: list[int]) -> None:
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return
    counts[0] += 1
    counts[1] += size


def _unlink_all(paths: Iterable[Path]) -> list[Path]:
    """Blocking: unlink each path; returns those still there (the unlink failed)."""
    left = []
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                left.append(path)
    return left


def _store(layout: Layout, temp: Path, key: str, etag: str, size: int, sums: Sums | None,
           block: int, fsync: bool = True) -> None:
    """Blocking: make ``temp`` the data file of (key, etag) with its sidecar, both fsynced if ``fsync``."""
    fd = os.open(temp, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != size:
            raise SizeMismatch(f"the file has {os.fstat(fd).st_size} bytes, its version {etag} has {size}")
        if sums is None:  # no checksums from the writer: compute them from the file it wrote
            sums = sums_of_file(fd, key, etag, size, block)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    side_temp = temp.with_name(temp.name + ".sums")
    try:
        with open(side_temp, "wb") as fh:
            fh.write(sums.encode())
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        final_sums, final = layout.sums_path(key, etag), layout.data_path(key, etag)
        final_sums.parent.mkdir(exist_ok=True)
        final.parent.mkdir(exist_ok=True)
        os.replace(side_temp, final_sums)
        os.replace(temp, final)
    finally:
        side_temp.unlink(missing_ok=True)


# -- the cache (trio thread) -------------------------------------------------------------------------------


class LocalCache:
    def __init__(self, root: Path, capacity: int, *, threads: int = 4, block_size: int = BLOCK_SIZE,
                 fsync: bool = False) -> None:
        self.root = Path(root)
        # Commits fsync their files only when asked: every cached version is in S3 and every read of a copy is
        # verified against its checksums, so a copy torn by a power loss is dropped and fetched again on first
        # use. The two fsyncs of a commit were most of a small file's close() on a busy disk (~5 ms each).
        self.fsync = fsync
        self.layout = Layout(self.root)
        self.capacity = capacity
        self.block_size = block_size
        self.limiter = trio.CapacityLimiter(threads)
        self.limiter_name = "disk"
        self.entries = EntryTable()
        self.pins: set[str] = set()  # keys pinned, cached or not: pinned files are hydrated and never evicted
        self.available = False
        self.unavailable_reason = "not opened"
        self.hits = 0
        self.misses = 0
        self.checksum_failures = 0
        self.rebuilds = 0  # times the index was rebuilt from the sidecars
        self.recoveries = 0  # times the cache came back after being unavailable
        self.reclaimed_files = 0
        self.reclaimed_bytes = 0
        # Hooks set by the composition root: the attributes the mount knows for (key, etag), persisted for
        # offline lookups; and where a corrupt copy asks to be hydrated again (key, etag, size, reason).
        self.attributes_of: Callable[[str, str], dict[str, str] | None] | None = None
        self.on_corrupt: Callable[[str, str, int, str], None] | None = None
        self._index: Index | None = None
        self._lock_fd: int | None = None
        self._root_id: tuple[int, int] | None = None
        self._index_lock = trio.Lock()
        self._removing = EntryTable()  # being unlinked: no longer served, still on disk
        # Per key, bumped by remove(): a download or commit that started in an older generation loses, so a
        # removal outlives what started before it. Kept while anything is in flight for the key (downloads
        # hold it from their first request, ``fetching``; commits from their start), dropped after.
        self._in_flight: Counter[str] = Counter()
        self._generation: Counter[str] = Counter()
        self._touched: set[str] = set()
        self._attrs_due: set[str] = set()  # keys whose last-known attributes may not be persisted yet
        self._stale_rows: set[tuple[str, str]] = set()  # files gone, DELETE failed: delete again later
        self._row_deletes = _RowDeletes()  # rows of removed files waiting for the next DELETE transaction
        self._deleting_rows = False  # a removal is running DELETE transactions for everyone
        self._doomed: list[Path] = []  # files whose unlink failed: unlink again later
        self._index_broken: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open or create the cache; on a disk failure the mount runs without it (every read is a miss) until
        ``check`` sees the disk back. DirectoryInUse propagates: a second mount must not start."""
        try:
            opened = await self._run(lambda: self.layout.open(None))
        except (OSError, sqlite3.Error) as exc:
            self._disable(f"cannot open cache directory {self.root}: {exc}")
            return
        self._apply_open(opened)
        log.info("cache %s: %d files, %d bytes of %d", self.root, len(self.entries), self.usage(),
                 self.capacity)

    def _apply_open(self, opened: Opened) -> None:
        if self._index is not None:
            self._index.close()
        self._index, self._lock_fd, self._root_id = opened.index, opened.lock_fd, opened.root_id
        self.entries = opened.entries
        for key in self._removing:
            self.entries.pop(key, None)
        self.pins = opened.pins | self.pins
        self._index_broken = None
        self._stale_rows.clear()
        self.reclaimed_files += opened.reclaimed_files
        self.reclaimed_bytes += opened.reclaimed_bytes
        if opened.rebuilt is not None:
            self.rebuilds += 1
            log.warning("cache %s: %s; rebuilt it from the data files (%d files)", self.root, opened.rebuilt,
                        len(self.entries))
        if opened.reclaimed_files or opened.dropped_rows:
            log.info("cache %s: reclaimed %d orphan files (%d bytes), dropped %d index rows without intact "
                     "data", self.root, opened.reclaimed_files, opened.reclaimed_bytes, opened.dropped_rows)
        self.available = True
        self.unavailable_reason = ""

    def close(self) -> None:
        """At unmount (the trio loop is over): persist access times and attributes, release the lock."""
        if self._index is not None:
            touched, attrs = self._take_touched(), self._take_attrs()
            with contextlib.suppress(sqlite3.Error, OSError):
                self._index.flush(touched, attrs)
            self._index.close()
            self._index = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def _disable(self, reason: str) -> None:
        if self.available or self.unavailable_reason != reason:
            log.warning("%s; serving from S3 only until it recovers", reason)
        self.available = False
        self.unavailable_reason = reason

    def _disk_failed(self, exc: BaseException, what: str) -> None:
        """A disk or index error on some path: a gone or read-only disk, or a broken index, turns the cache
        unavailable (one warning) until ``check`` brings it back; anything else is logged by the caller."""
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            self._index_broken = f"index corrupt ({exc})"
            self._disable(f"cache {self.root}: {self._index_broken} while {what}")
        elif isinstance(exc, OSError) and exc.errno in DISK_GONE:
            self._disable(f"cache {self.root}: {os.strerror(exc.errno or errno.EIO)} while {what}")

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.limiter, abandon_on_cancel=False)

    def _idx(self) -> Index:
        if self._index is None:
            raise CacheUnavailable(self.unavailable_reason)
        return self._index

    # -- the probe: coming back by itself -------------------------------------------------------------------

    async def check(self) -> None:
        """Called every few seconds (housekeeping): finish deferred work, notice a lost index or a replaced,
        gone or read-only directory, and bring an unavailable cache back once its disk works again."""
        if self.available:
            if self._index_broken is not None:
                problem: str | None = self._index_broken
            else:
                root_id, index = self._root_id, self._index
                problem = await self._run(lambda: self._health_sync(root_id, index))
            if problem is None:
                await self._retry_deferred()
                return
            self._disable(f"cache {self.root}: {problem}")
        await self._recover()

    def _health_sync(self, root_id: tuple[int, int] | None, index: Index | None) -> str | None:
        """Blocking: why the open cache can no longer be trusted as it is, or None."""
        try:
            if self.layout.root_id() != root_id:
                return "directory replaced"
            for directory in (self.layout.objects, self.layout.sums, self.layout.tmp):
                if not directory.is_dir():
                    return f"{directory.name}/ missing"
            probe = self.layout.tmp / f".probe-{uuid.uuid4().hex}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            return os.strerror(exc.errno or errno.EIO)
        if index is not None and index.replaced():
            return "index.sqlite deleted or replaced"
        try:  # overwritten in place: SQLite may not notice before it reads the page again
            with open(self.layout.index, "rb") as fh:
                if fh.read(16) != b"SQLite format 3\0":
                    return "index.sqlite corrupt (not an SQLite file)"
        except OSError as exc:
            return f"index.sqlite unreadable ({exc})"
        return None

    async def _recover(self) -> None:
        """Reopen: recreate the layout, rebuild the index when it is lost, reclaim what nobody owns."""
        async with self._index_lock:
            same_dir = self._root_id is not None and await self._run(self._same_root)
            if not same_dir and self._lock_fd is not None:  # the old directory is gone: so is its lock
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)
                self._lock_fd = None
            index, self._index = self._index, None
            lost = self._index_broken or await self._run(self._index_garbled)
            if index is not None:
                if same_dir and await self._run(index.replaced):  # a new directory is a new cache
                    lost = lost or "index.sqlite was deleted or replaced"
                await self._run(index.close)
            lock_fd = self._lock_fd
            try:
                opened = await self._run(lambda: self.layout.open(lock_fd, force_rebuild=lost))
            except (OSError, sqlite3.Error, DirectoryInUse) as exc:
                if isinstance(exc, DirectoryInUse):
                    self._lock_fd = None
                self._index_broken = None
                self.unavailable_reason = f"cache {self.root}: {exc}"
                log.debug("cache %s still unavailable: %s", self.root, exc)
                return
        self._apply_open(opened)
        self.recoveries += 1
        log.info("cache %s is usable again: %d files, %d bytes", self.root, len(self.entries), self.usage())

    def _index_garbled(self) -> str | None:
        try:
            with open(self.layout.index, "rb") as fh:
                head = fh.read(16)
        except OSError:
            return None
        return None if head in (b"", b"SQLite format 3\0") else "index.sqlite corrupt (not an SQLite file)"

    def _same_root(self) -> bool:
        try:
            return self.layout.root_id() == self._root_id
        except OSError:
            return False

    async def _retry_deferred(self) -> None:
        if self._doomed:
            doomed, self._doomed = self._doomed, []
            self._doomed += await self._run(lambda: _unlink_all(doomed))
        if self._stale_rows:
            stale: set[tuple[str, str]] = set()
            try:
                async with self._index_lock:
                    stale, self._stale_rows = self._stale_rows, set()  # under the lock: see _delete_rows_now
                    index = self._idx()
                    await self._run(lambda: index.delete_versions(stale))
            except (OSError, sqlite3.Error, CacheUnavailable) as exc:
                self._stale_rows |= stale
                self._disk_failed(exc, "deleting index rows")

    # -- lookups (no I/O) -----------------------------------------------------------------------------------

    def data_path(self, key: str, etag: str) -> Path:
        return self.layout.data_path(key, etag)

    def lookup(self, key: str, etag: str | None = None) -> CacheEntry | None:
        """The entry for ``key`` when cached (and, given ``etag``, only when it is that version)."""
        if not self.available:
            return None
        entry = self.entries.get(key)
        if entry is None or (etag is not None and entry.etag != etag):
            return None
        return entry

    def usage(self) -> int:
        """Bytes on the cache disk: what is cached plus what is being removed (running totals: O(1))."""
        return self.entries.bytes + self._removing.bytes

    def touch(self, key: str) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries[key] = replace(entry, last_access=time.time())
            self._touched.add(key)
            if entry.attrs is None:
                self._attrs_due.add(key)

    def coldest(self, exclude: Callable[[str], bool]) -> Iterator[CacheEntry]:
        """Unpinned entries, least recently used first, skipping keys ``exclude`` says are busy. Lazy (the
        planner takes only as many as it needs): consume it before the next await."""
        pins = self.pins
        return (e for e in self.entries.coldest() if not e.pinned and e.key not in pins and not exclude(e.key))

    def known_object(self, key: str) -> ObjectInfo | None:
        """What the cache last knew of ``key`` as an object (for lookups while S3 is down): only a cached
        version with persisted attributes, so the answer is the attributes that version had."""
        entry = self.entries.get(key) if self.available else None
        if entry is None or entry.attrs is None:
            return None
        try:
            mtime_ns = int(float(entry.attrs.get("mtime", "0")) * 1e9)
        except ValueError:
            mtime_ns = 0
        return ObjectInfo(key=key, size=entry.size, etag=entry.etag, mtime_ns=mtime_ns, metadata=dict(entry.attrs))

    def has_below(self, prefix: str) -> bool:
        """Whether a cached key lives under ``prefix`` (a directory while S3 is down, or after a restart). O(1)
        for a directory prefix: every cold or negative lookup asks it."""
        return self.available and self.entries.has_below(prefix)

    def status(self) -> dict[str, object]:
        """The cache's own figures for ``hybridfs status``."""
        return {
            "available": self.available,
            "unavailable_reason": None if self.available else self.unavailable_reason,
            "checksum_failures": self.checksum_failures,
            "index_rebuilds": self.rebuilds,
            "recoveries": self.recoveries,
            "reclaimed_files": self.reclaimed_files,
            "reclaimed_bytes": self.reclaimed_bytes,
            "block_size": self.block_size,
        }

    # -- changes --------------------------------------------------------------------------------------------

    def new_temp_path(self) -> Path:
        return self.layout.tmp / uuid.uuid4().hex

    @contextlib.contextmanager
    def fetching(self, key: str) -> Iterator[int]:
        """Around a download of ``key`` into the cache, from before its first request: yields the generation it
        started in, for ``commit(since=...)``. A removal of ``key`` meanwhile (an unlink, a rename, a change
        seen) makes that commit lose: the bytes were fetched before the removal and must not come back."""
        self._in_flight[key] += 1
        try:
            yield self._generation[key]
        finally:
            self._release(key)

    def removed_since(self, key: str, generation: int) -> bool:
        """Whether ``key`` was removed after ``generation`` (from ``fetching``, still open) was taken."""
        return self._generation[key] != generation

    def _release(self, key: str) -> None:
        self._in_flight[key] -= 1
        if self._in_flight[key] <= 0:
            del self._in_flight[key]
            self._generation.pop(key, None)

    async def commit(self, temp: Path, key: str, etag: str, size: int, sums: Sums | None = None, *,
                     since: int | None = None) -> bool:
        """Make a fully written temp file the cached (key, etag): data and sidecar fsynced, then the index
        row. ``sums`` are the checksums of the bytes S3 acknowledged, when the writer computed them; else
        they are computed from the file. ``since``: the generation the download started in (``fetching``);
        a removal after it wins. False, logged, when the disk refuses or a removal won (the temp file is gone
        then)."""
        if not self.available or size > self.capacity:
            await self._drop_temp(temp)
            return False
        generation = self._generation[key] if since is None else since
        self._in_flight[key] += 1
        try:
            try:
                await self._run(lambda: _store(self.layout, temp, key, etag, size, sums, self.block_size,
                                               self.fsync))
            except SizeMismatch as exc:
                await self._drop_temp(temp)
                log.warning("cache: not storing %s: %s; the copy is dropped (S3 holds the object)", key, exc)
                return False
            except OSError as exc:
                await self._drop_temp(temp)
                self._disk_failed(exc, f"storing {key}")
                log.warning("cache: could not store %s: %s", key, exc)
                return False
            return await self._index_commit(key, etag, size, generation)
        finally:
            self._release(key)

    async def _index_commit(self, key: str, etag: str, size: int, generation: int) -> bool:
        files = [self.layout.data_path(key, etag), self.layout.sums_path(key, etag)]
        async with self._index_lock:
            if self._generation[key] != generation or not self.available:  # removed meanwhile: it lost
                await self._forget_files(files)
                return False
            # An earlier removal of this version, not yet in SQLite, must not delete the row written now.
            self._row_deletes.rows.discard((key, etag))
            self._stale_rows.discard((key, etag))
            now = time.time()
            pinned = key in self.pins
            attrs = self.attributes_of(key, etag) if self.attributes_of is not None else None
            try:
                index = self._idx()
                await self._run(lambda: index.put([Row(key, etag, size, now, pinned, attrs)]))
            except (OSError, sqlite3.Error, CacheUnavailable) as exc:
                await self._forget_files(files)
                self._disk_failed(exc, f"indexing {key}")
                log.warning("cache: could not store %s: %s", key, exc)
                return False
            if self._generation[key] != generation:
                # Removed while the row was written (remove takes no lock when nothing is cached yet): the
                # removal still wins, or a file deleted through the mount would come back as cached.
                try:
                    await self._run(lambda: index.delete_versions([(key, etag)]))
                except (OSError, sqlite3.Error) as exc:
                    self._stale_rows.add((key, etag))
                    self._disk_failed(exc, f"removing {key}")
                await self._forget_files(files)
                return False
            old = self.entries.get(key)
            self.entries[key] = CacheEntry(key, etag, size, now, pinned, attrs)
            if attrs is None:
                self._attrs_due.add(key)
        if old is not None and old.etag != etag:
            log.debug("cache: %s replaced version %s by %s", key, old.etag, etag)
            await self._forget_files([self.layout.data_path(key, old.etag), self.layout.sums_path(key, old.etag)])
        return True

    async def _forget_files(self, paths: list[Path]) -> None:
        try:
            self._doomed += await self._run(lambda: _unlink_all(paths))
        except OSError:
            self._doomed += paths

    async def _drop_temp(self, temp: Path) -> None:
        with contextlib.suppress(OSError):
            await self._run(lambda: _unlink_all([temp]))

    async def remove(self, key: str) -> int:
        """Drop ``key`` from the cache; returns the bytes freed (0 when it was not cached, or when its file
        could not be unlinked: the entry then stays, so index, memory and disk keep agreeing).

        The entry stops being served before the first await; its bytes count in ``usage`` until unlinked."""
        self._generation[key] += 1
        entry = self.entries.pop(key, None)
        if entry is None:
            if not self._in_flight[key]:  # nothing started before this removal: nothing to outlive
                self._generation.pop(key, None)
            return 0
        self._removing[key] = entry
        self._touched.discard(key)
        self._attrs_due.discard(key)
        try:
            files = [self.layout.data_path(key, entry.etag), self.layout.sums_path(key, entry.etag)]
            try:
                left = await self._run(lambda: _unlink_all(files))
            except OSError:
                left = files
            if left:
                log.warning("cache: could not remove %s (its file stays cached)", key)
                if key not in self.entries:
                    self.entries[key] = entry
                return 0
            await self._delete_row(key, entry.etag)
            return entry.size
        finally:
            self._removing.pop(key, None)
            if not self._in_flight[key]:
                self._generation.pop(key, None)

    async def rename(self, old_key: str, new_key: str) -> None:
        """Follow a rename in S3: the cached bytes are the same, the ETag of a copy may differ, so drop both keys
        (a download of either that started before the rename then loses its commit: ``fetching``)."""
        await self.remove(old_key)
        await self.remove(new_key)

    async def _delete_row(self, key: str, etag: str) -> None:
        """Delete the index row of a removed file. Removals that overlap share one transaction (group commit):
        one DELETE each, one after the other behind the index lock, held ``hybridfs evict`` of a directory to
        30 files/s. Returns once the row is deleted, or is in ``_stale_rows`` to be deleted later (the disk
        refused it, or the removal running the transaction was cancelled)."""
        waiting = self._row_deletes
        waiting.rows.add((key, etag))
        if self._deleting_rows:
            await waiting.done.wait()
            return
        self._deleting_rows = True
        try:
            while self._row_deletes.rows:
                await self._delete_rows_now()
        finally:
            self._deleting_rows = False

    async def _delete_rows_now(self) -> None:
        batch: _RowDeletes | None = None
        deleted = False
        try:
            async with self._index_lock:
                # Taken under the lock: a commit of a version that is waiting here takes its row back out
                # (``_index_commit``), so a DELETE never lands after the INSERT of the same version.
                batch, self._row_deletes = self._row_deletes, _RowDeletes()
                rows = list(batch.rows)
                index = self._idx()
                await self._run(lambda: index.delete_versions(rows))
                deleted = True
        except (OSError, sqlite3.Error, CacheUnavailable) as exc:
            self._disk_failed(exc, f"removing {len(batch.rows) if batch else 0} index rows")
            log.info("cache: index rows of removed files stay until the disk takes the DELETE: %s", exc)
        finally:
            if batch is None:  # cancelled before the lock: nobody else will run what waits
                batch, self._row_deletes = self._row_deletes, _RowDeletes()
            if not deleted:
                self._stale_rows |= batch.rows  # the files are gone: the rows go later
            batch.done.set()

    async def set_pinned(self, key: str, pinned: bool) -> None:
        if pinned:
            self.pins.add(key)
        else:
            self.pins.discard(key)
        entry = self.entries.get(key)
        if entry is not None:
            self.entries[key] = replace(entry, pinned=pinned)
        try:
            async with self._index_lock:
                index = self._idx()
                await self._run(lambda: index.pin(key, pinned))
        except (OSError, sqlite3.Error, CacheUnavailable) as exc:
            self._disk_failed(exc, f"pinning {key}")
            log.warning("cache: could not persist pin of %s: %s", key, exc)

    def _take_touched(self) -> list[tuple[float, str]]:
        touched, self._touched = self._touched, set()
        return [(self.entries[k].last_access, k) for k in touched if k in self.entries]

    def _take_attrs(self) -> list[tuple[str, str, dict[str, str]]]:
        """Attributes the mount now knows for cached versions that lack them (a tee commits before the
        namespace learns the new version's attributes)."""
        due, self._attrs_due = self._attrs_due, set()
        rows = []
        for key in due:
            entry = self.entries.get(key)
            attrs = self.attributes_of(key, entry.etag) if entry is not None and self.attributes_of else None
            if entry is None:
                continue
            if attrs is None:
                continue
            if attrs != entry.attrs:
                self.entries[key] = replace(entry, attrs=attrs)
                rows.append((key, entry.etag, attrs))
        return rows

    async def flush_touched(self) -> None:
        """Persist last-access times and attributes (batched: a read hit must not cost a disk write)."""
        if not (self._touched or self._attrs_due) or self._index is None:
            return
        touched, attrs = self._take_touched(), self._take_attrs()
        try:
            async with self._index_lock:
                index = self._idx()
                await self._run(lambda: index.flush(touched, attrs))
        except (OSError, sqlite3.Error, CacheUnavailable) as exc:
            self._disk_failed(exc, "persisting access times")
            log.info("cache: could not persist access times: %s", exc)

    async def disk_free(self) -> int | None:
        """Free bytes on the cache's filesystem, or None when it cannot be read."""
        try:
            st = await self._run(lambda: os.statvfs(self.root))
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    # -- verified access ------------------------------------------------------------------------------------

    async def open_verified(self, key: str, etag: str) -> tuple[int, Sums] | None:
        """An fd on the cached (key, etag) and its checksums, or None (not cached, or unreadable: dropped)."""
        data, side = self.layout.data_path(key, etag), self.layout.sums_path(key, etag)

        def open_both() -> tuple[int, Sums]:
            sums = Sums.decode(side.read_bytes())
            fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
            if sums.key != key or sums.etag != etag or os.fstat(fd).st_size != sums.size:
                os.close(fd)
                raise ValueError("checksum file does not describe the data file")
            return fd, sums

        try:
            return await self._run(open_both)
        except (OSError, ValueError, KeyError, struct.error) as exc:
            entry = self.entries.get(key)
            if isinstance(exc, FileNotFoundError) and (entry is None or entry.etag != etag):
                # dropped or replaced while we opened it (a read racing the drop of a corrupt copy): expected
                log.debug("cache copy of %s went away while it was opened; reading from S3", key)
                return None
            if isinstance(exc, OSError) and exc.errno != errno.ENOENT:  # one lost file is not a lost disk
                self._disk_failed(exc, f"opening {key}")
            log.warning("cache copy of %s unusable (%s); reading from S3", key, exc)
            await self._dropped(key, etag, str(exc), corrupt=not isinstance(exc, OSError))
            return None

    async def corrupt(self, key: str, etag: str, why: str) -> None:
        """A verified read found a bad block (the caller logged it): drop the copy, hydrate it again."""
        await self._dropped(key, etag, why, corrupt=True)

    async def _dropped(self, key: str, etag: str, why: str, *, corrupt: bool) -> None:
        entry = self.entries.get(key)
        if corrupt:
            self.checksum_failures += 1
        if entry is not None and entry.etag == etag:
            await self.remove(key)
            if corrupt and self.on_corrupt is not None:
                self.on_corrupt(key, etag, entry.size, "corrupt")

    async def copy_verified(self, key: str, etag: str, dest: Path) -> bool:
        """Copy the cached (key, etag) to ``dest`` block by block, verifying each; False (logged, the copy
        dropped when it is corrupt) when it is not cached or does not verify. ``dest`` may be left partial."""
        return await self._scan_verified(key, etag, dest, "using S3")

    async def verify(self, key: str, etag: str) -> bool:
        """Whether the whole cached (key, etag) matches its checksums (before a re-upload); a corrupt copy is
        dropped, logged once."""
        return await self._scan_verified(key, etag, None, "")

    async def _scan_verified(self, key: str, etag: str, dest: Path | None, fallback: str) -> bool:
        """Read every block of the cached (key, etag), checking its sum, and copy it to ``dest`` if given."""
        opened = await self.open_verified(key, etag) if self.lookup(key, etag) is not None else None
        if opened is None:
            return False
        fd, sums = opened

        def scan() -> int | None:
            try:
                with open(dest, "wb") if dest is not None else contextlib.nullcontext() as out:
                    for index in range(len(sums.crcs)):
                        start, length = sums.span(index)
                        data = os.pread(fd, length, start)
                        if verify_blocks(sums, index, data) is not None:
                            return index
                        if out is not None:
                            out.write(data)
                return None
            finally:
                os.close(fd)

        bad = await self._run(scan)
        if bad is not None:
            log.warning("cache copy of %s is corrupt (block %d fails its checksum); dropped it%s", key, bad,
                        f", {fallback}" if fallback else "")
            await self.corrupt(key, etag, f"block {bad}")
            return False
        return True


class TeeFile:
    """The local copy of a file being uploaded, with the checksums of the bytes as they go to S3. A failure
    here never fails the upload: it is recorded in ``failed`` and the caller raises a hydrate event instead.

    Threads: ``_write_sync`` runs in worker threads (parts are teed several at once); it only opens the file
    (once, under ``_open_lock``) and returns the block checksums it computed, which the trio side records."""

    def __init__(self, cache: LocalCache) -> None:
        self.cache = cache
        self.path: Path | None = None
        self._fd: int | None = None
        self._open_lock = threading.Lock()
        self._closed = False  # set under _open_lock once discarded: a late part must not recreate the file
        self.failed: str | None = None if cache.available else f"cache unavailable ({cache.unavailable_reason})"
        self.written = 0
        self._crcs: dict[int, tuple[int, int]] = {}  # block index -> (length, crc32c); trio thread
        self._unaligned = False  # a write not on a block boundary: checksums come from the file at commit

    async def write(self, offset: int, data: bytes) -> None:
        if self.failed is not None:
            return
        if offset + len(data) > self.cache.capacity:
            await self.discard("larger than the cache")
            return
        if self.path is None:
            self.path = self.cache.new_temp_path()
        path = self.path
        try:
            crcs = await self.cache._run(lambda: self._write_sync(path, offset, data))
        except OSError as exc:
            self.cache._disk_failed(exc, f"writing {path}")
            await self.discard(f"{os.strerror(exc.errno or 5)} writing {path}")
            return
        if crcs is None:
            self._unaligned = True
        else:
            self._crcs.update(crcs)
        self.written = max(self.written, offset + len(data))

    def _write_sync(self, path: Path, offset: int, data: bytes) -> dict[int, tuple[int, int]] | None:
        with self._open_lock:  # parts are teed from several threads at once: open the file exactly once
            if self._closed:
                raise OSError(errno.ECANCELED, "tee discarded")
            if self._fd is None:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            fd = self._fd
        written = os.pwrite(fd, data, offset)
        if written != len(data):
            raise OSError(errno.ENOSPC, "short write")
        if self.cache.fsync:  # the commit will fsync: have most of it written by then, in the background
            start_writeback(fd, offset, written)
        block = self.cache.block_size
        if offset % block:
            return None
        first = offset // block
        return {first + i // block: (len(piece), crc32c(piece))
                for i in range(0, len(data), block) for piece in (data[i:i + block],)}

    def _sums(self, key: str, etag: str, size: int) -> Sums | None:
        """The checksums of the teed bytes, when the writes covered every block exactly."""
        if self._unaligned:
            return None
        block = self.cache.block_size
        crcs = []
        for index in range(Sums.count(size, block)):
            got = self._crcs.get(index)
            if got is None or got[0] != min(block, size - index * block):
                return None
            crcs.append(got[1])
        return Sums(key, etag, size, block, tuple(crcs))

    async def commit(self, key: str, etag: str, size: int, *, since: int | None = None) -> bool:
        """Store the teed file as the cached (key, etag). ``since``: the generation of ``key`` when the upload
        began (``LocalCache.fetching``), so a removal of the key during the upload (an unlink) wins."""
        if self.failed is not None:
            return False
        try:
            await self.cache._run(self._close_sync)
            if self.path is None:  # empty file: nothing was written yet
                self.path = self.cache.new_temp_path()
                path = self.path
                await self.cache._run(lambda: path.touch())
        except OSError as exc:
            self.cache._disk_failed(exc, f"closing {self.path}")
            await self.discard(f"{os.strerror(exc.errno or 5)} closing {self.path}")
            return False
        path, self.path = self.path, None
        if not await self.cache.commit(path, key, etag, size, self._sums(key, etag, size), since=since):
            removed = since is not None and self.cache.removed_since(key, since)
            self.failed = ("removed while it was uploaded" if removed
                           else "could not store the finished file in the cache")
            return False
        return True

    async def detach(self) -> Path:
        """Hand the file written so far over to the caller (closed, not removed); the tee is done with it."""
        path = self.path
        if path is None:
            raise OSError(errno.ENOENT, "no local copy was written")

        def close() -> None:
            with self._open_lock:
                self._closed = True
            self._close_sync()

        await self.cache._run(close)
        self.path = None
        self.failed = "handed over"
        return path

    def _close_sync(self) -> None:
        with self._open_lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    async def discard(self, reason: str | None = None) -> None:
        if reason is not None and self.failed is None:
            self.failed = reason
        path, self.path = self.path, None

        def drop() -> None:
            with self._open_lock:
                self._closed = True
            self._close_sync()
            if path is not None:
                path.unlink(missing_ok=True)

        with contextlib.suppress(OSError):
            await self.cache._run(drop)
