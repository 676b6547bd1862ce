"""The durable outbox: events waiting to be delivered to Kafka, in SQLite in the mount's state directory.

Every event the mount publishes is written here first and deleted only after Kafka has acknowledged it
(see ``bus.py``), so events survive a Kafka outage and a crash of the mount. The file lives in the state
directory, never in the cache directory: a failing cache disk must not take the events about it down with it.

Threading: every method blocks (SQLite I/O), so trio code calls them through ``trio.to_thread.run_sync``
behind a limiter. trio may run consecutive calls on different worker threads, so the one connection is opened
with ``check_same_thread=False`` and every use of it holds ``self._lock``: an SQLite connection is safe to
share between threads as long as only one thread uses it at a time, which the lock guarantees. One connection
(rather than one per thread) keeps file handles and WAL readers bounded; the bus never needs parallel access.

Durability: WAL mode with ``synchronous=FULL``, so a committed ``add`` survives a crash of the process
(SIGKILL) and of the machine. The relay batches events into one transaction: one fsync a batch, not an event.

Failures: a write that fails (a full or read-only state disk) raises ``OutboxError`` carrying SQLite's own
reason ("database or disk is full"); the rollback that follows is best effort and never replaces that reason
(after a failed COMMIT SQLite has usually rolled back already, and ROLLBACK itself then fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ["Headers", "Outbox", "OutboxError", "OutboxRow"]

Headers = Sequence[tuple[str, bytes]]

_SCHEMA_VERSION = 2  # 2: a ``headers`` column (JSON list of [name, value] pairs), for the change feed


class OutboxRow(NamedTuple):
    id: int
    topic: str
    key: bytes
    value: bytes  # b"" means a tombstone (a null value on Kafka): no event of ours is ever empty
    created: float
    headers: tuple[tuple[str, bytes], ...] = ()


class OutboxError(Exception):
    """The outbox could not store or delete rows; the message says why (SQLite's reason)."""


class Outbox:
    """A FIFO of (topic, key, value) rows in one SQLite file. Blocking; share between threads freely."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
                raise ValueError(f"bad synchronous mode {synchronous!r}")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS outbox ("
                    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
                    " topic TEXT NOT NULL,"
                    " key BLOB NOT NULL,"
                    " value BLOB NOT NULL,"
                    " created REAL NOT NULL,"
                    " headers TEXT)"
                )
                self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            elif version == 1:  # an outbox of an earlier release: its rows keep waiting, without headers
                self._db.execute("ALTER TABLE outbox ADD COLUMN headers TEXT")
                self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION:
                raise RuntimeError(f"outbox {self.path} has schema version {version}, expected {_SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def add(self, topic: str, key: bytes, value: bytes, headers: Headers = ()) -> int:
        """Append one row durably; return its id."""
        return self.add_many([(topic, key, value, headers)])[0]

    def add_many(self, rows: Iterable[tuple[str, bytes, bytes] | tuple[str, bytes, bytes, Headers]]
                 ) -> list[int]:
        """Append rows in one transaction (one fsync); return their ids in order."""
        now = time.time()
        ids: list[int] = []
        rows = list(rows)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for row in rows:
                    topic, key, value = row[0], row[1], row[2]
                    headers = _encode_headers(row[3] if len(row) > 3 else ())  # type: ignore[misc]
                    cur = self._db.execute(
                        "INSERT INTO outbox (topic, key, value, created, headers) VALUES (?, ?, ?, ?, ?)",
                        (topic, bytes(key), bytes(value), now, headers),
                    )
                    assert cur.lastrowid is not None
                    ids.append(cur.lastrowid)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot store {len(rows)} events in {self.path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise
        return ids

    def _rollback(self) -> None:
        """Best effort, under ``_lock``: never let a failing ROLLBACK hide the error that caused it."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def pending(self, limit: int = 1000, *, after_id: int = 0) -> list[OutboxRow]:
        """The oldest rows with id > ``after_id``, at most ``limit`` of them, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT id, topic, key, value, created, headers FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
            return [OutboxRow(r[0], r[1], bytes(r[2]), bytes(r[3]), r[4], _decode_headers(r[5]))
                    for r in cur.fetchall()]

    def delete(self, ids: Sequence[int]) -> int:
        """Delete rows by id (unknown ids are ignored); return how many were deleted."""
        if not ids:
            return 0
        deleted = 0
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
                    chunk = list(ids[start : start + 500])
                    marks = ",".join("?" * len(chunk))
                    deleted += self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk).rowcount
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot delete {len(ids)} delivered events from {self.path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise
        return deleted

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode_headers(headers: Headers) -> str | None:
    if not headers:
        return None
    return json.dumps([[name, value.decode("latin-1")] for name, value in headers])


def _decode_headers(text: str | None) -> tuple[tuple[str, bytes], ...]:
    if not text:
        return ()
    return tuple((str(name), str(value).encode("latin-1")) for name, value in json.loads(text))
