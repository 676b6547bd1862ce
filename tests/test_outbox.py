"""The SQLite outbox: round trip, order, deletes, survival across reopen and across a killed process."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from hybridfs.events.outbox import Outbox


def test_round_trip_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.sqlite") as box:
        assert box.count() == 0 and box.pending() == []
        first = box.add("t.hydrate", b"k1", b'{"a":1}')
        ids = box.add_many([("t.evict", b"k2", b"v2"), ("t.hydrate", "ké".encode(), b"\x00\xff")])
        assert ids == [first + 1, first + 2]
        rows = box.pending()
        assert [(r.id, r.topic, r.key, r.value) for r in rows] == [
            (first, "t.hydrate", b"k1", b'{"a":1}'),
            (first + 1, "t.evict", b"k2", b"v2"),
            (first + 2, "t.hydrate", "ké".encode(), b"\x00\xff"),
        ]
        assert all(isinstance(r.created, float) for r in rows)
        assert box.count() == 3
        assert [r.id for r in box.pending(limit=2)] == [first, first + 1]
        assert [r.id for r in box.pending(after_id=first)] == [first + 1, first + 2]
        assert box.delete([first + 1, 999999]) == 1
        assert [r.id for r in box.pending()] == [first, first + 2]
        assert box.delete([]) == 0
        assert box.count() == 2


def test_survives_reopen_and_ids_never_repeat(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.sqlite"  # parent directories are created
    with Outbox(path) as box:
        ids = box.add_many([("t", b"k", str(i).encode()) for i in range(5)])
        box.delete(ids[-2:])
    with Outbox(path) as box:
        assert box.count() == 3
        assert [r.value for r in box.pending()] == [b"0", b"1", b"2"]
        # AUTOINCREMENT: a deleted id is never handed out again, so a late delivery report cannot delete a
        # newer row.
        assert box.add("t", b"k", b"new") > ids[-1]


def test_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(path) as box:
        box.add("t", b"k", b"v")
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            db.close()


def test_delete_many_ids_at_once(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.sqlite") as box:
        ids = box.add_many([("t", b"k", b"v")] * 1500)
        assert box.delete(ids[:1200]) == 1200
        assert box.count() == 300


def test_shared_between_threads(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.sqlite") as box:
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            try:
                for i in range(50):
                    box.add("t", f"{n}".encode(), f"{i}".encode())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert box.count() == 200


def test_committed_rows_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    code = (
        "import os, sys\n"
        "from hybridfs.events.outbox import Outbox\n"
        "box = Outbox(sys.argv[1])\n"
        "box.add_many([('t', b'k', str(i).encode()) for i in range(100)])\n"
        "print('stored', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == "stored"
    assert os.path.exists(path)
    with Outbox(path) as box:
        assert box.count() == 100
        assert [r.value for r in box.pending(limit=3)] == [b"0", b"1", b"2"]
