"""The metadata index: the attributes the change feed delivered, per object key, in SQLite in the state directory.

So a restarted mount knows at once what it knew before (``Namespace.last_known``): a listing of a known
directory is complete while the feed is healthy, without a HEAD per entry, also after a restart — the feed's
consumer group resumes at its committed offsets, and the records it missed while away update the index.

Rows are written in batches (one transaction a second) by :class:`hybridfs.services.feed.FeedService`; losing
the last batch in a crash only means those keys are asked of S3 again. Every method blocks: call them from a
thread. One connection, used by one thread at a time (the service's limiter), hence ``check_same_thread=False``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

__all__ = ["FeedIndex"]

_SCHEMA_VERSION = 1


class FeedIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # a lost last batch is asked of S3 again
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                self._db.execute("DROP TABLE IF EXISTS attrs")  # a cache of the feed: rebuilt by the feed
            self._db.execute("CREATE TABLE IF NOT EXISTS attrs (key TEXT PRIMARY KEY, attrs TEXT NOT NULL)")
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def rows(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(str(k), str(v)) for k, v in self._db.execute("SELECT key, attrs FROM attrs")]

    def write(self, changes: Iterable[tuple[str, str | None]]) -> None:
        """(key, attrs JSON) rows to store, (key, None) rows to delete, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key, attrs in changes:
                    if attrs is None:
                        self._db.execute("DELETE FROM attrs WHERE key = ?", (key,))
                    else:
                        self._db.execute("INSERT OR REPLACE INTO attrs (key, attrs) VALUES (?, ?)", (key, attrs))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
