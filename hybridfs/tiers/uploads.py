"""The multipart uploads this mount has open in S3, recorded durably so that none outlives a crash.

An incomplete multipart upload is invisible storage that S3 keeps (and bills) forever. Every upload is recorded
here (a small SQLite file in the state directory) before its first part is sent and forgotten once it is
completed or aborted; a mount that starts after a SIGKILL finds the survivors and aborts them. Uploads of other
mounts (of crashed hosts whose state is gone) are found by listing the bucket's multipart uploads and aborting
those older than a grace period (``--abort-uploads-after``).

All methods block (SQLite): call them from a worker thread. The journal is the only state they touch.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    key TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    started REAL NOT NULL,
    PRIMARY KEY (key, upload_id)
);
"""


class UploadJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a recorded upload must survive a power cut
        self._db.executescript(SCHEMA)

    def record(self, key: str, upload_id: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO uploads (key, upload_id, started) VALUES (?, ?, ?)",
                             (key, upload_id, time.time()))

    def forget(self, key: str, upload_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM uploads WHERE key = ? AND upload_id = ?", (key, upload_id))

    def pending(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(k, u) for k, u in self._db.execute("SELECT key, upload_id FROM uploads ORDER BY started")]

    def close(self) -> None:
        with self._lock:
            self._db.close()
