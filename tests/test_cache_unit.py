"""The local cache without a mount: checksum sidecars, the index rebuilt from them, orphans reclaimed, worker
threads that never change what the trio thread iterates, and the S3 circuit breaker (issue 12)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
import trio
import trio.lowlevel
import trio.testing

from hybridfs.errors import FsError
from hybridfs.tiers.breaker import Breaker
from hybridfs.tiers.cache import BLOCK_SIZE, DirectoryInUse, LocalCache, Sums, TeeFile, lock_directory, verify_blocks


def run(body: Callable[[LocalCache], Awaitable[None]], root: Path, capacity: int = 1 << 30) -> None:
    async def main() -> None:
        cache = LocalCache(root, capacity)
        await cache.open()
        try:
            await body(cache)
        finally:
            cache.close()

    trio.run(main)


async def put(cache: LocalCache, key: str, data: bytes, etag: str = "e1") -> None:
    temp = cache.new_temp_path()
    temp.write_bytes(data)
    assert await cache.commit(temp, key, etag, len(data))


def test_sums_round_trip_and_damage_is_refused() -> None:
    data = os.urandom(3 * BLOCK_SIZE + 17)
    sums = Sums.of_bytes("k/a", "etag", data)
    assert len(sums.crcs) == 4 and Sums.decode(sums.encode()) == sums
    raw = bytearray(sums.encode())
    raw[30] ^= 0xFF
    with pytest.raises(ValueError, match="damaged"):
        Sums.decode(bytes(raw))
    with pytest.raises(ValueError):
        Sums.decode(sums.encode()[:-9])
    assert verify_blocks(sums, 0, data) is None
    assert verify_blocks(sums, 1, data[BLOCK_SIZE:2 * BLOCK_SIZE]) is None
    flipped = bytearray(data)
    flipped[2 * BLOCK_SIZE + 5] ^= 1
    assert verify_blocks(sums, 0, bytes(flipped)) == 2
    assert verify_blocks(sums, 3, data[3 * BLOCK_SIZE:-1]) == 3  # short: the file lost bytes
    assert list(sums.blocks(BLOCK_SIZE - 1, 2)) == [0, 1] and list(sums.blocks(len(data), 5)) == []


def test_tee_checksums_come_from_the_written_parts(tmp_path: Path) -> None:
    """Parts teed out of order (as uploads finish) still give the checksums of the bytes, without a re-read."""
    data = os.urandom(5 * BLOCK_SIZE + 3)

    async def body(cache: LocalCache) -> None:
        tee = TeeFile(cache)
        part = 2 * BLOCK_SIZE
        for offset in (part * 2, 0, part):
            await tee.write(offset, data[offset:offset + part])
        assert tee._sums("k", "e", len(data)) == Sums.of_bytes("k", "e", data)
        assert await tee.commit("k", "e", len(data))
        fd, sums = await cache.open_verified("k", "e") or (None, None)
        assert fd is not None and sums == Sums.of_bytes("k", "e", data)
        os.close(fd)

    run(body, tmp_path / "c")


@pytest.mark.allow_log(r"cache copy of k is corrupt \(block 1 fails its checksum\)")
def test_copy_verified_refuses_a_flipped_byte_and_drops_the_copy(tmp_path: Path) -> None:
    data = os.urandom(2 * BLOCK_SIZE)
    asked: list[tuple[str, str]] = []

    async def body(cache: LocalCache) -> None:
        cache.on_corrupt = lambda key, etag, size, reason: asked.append((key, reason))
        await put(cache, "k", data)
        assert await cache.copy_verified("k", "e1", tmp_path / "copy") and (tmp_path / "copy").read_bytes() == data
        path = cache.data_path("k", "e1")
        flip(path, BLOCK_SIZE + 7)
        assert not await cache.copy_verified("k", "e1", tmp_path / "copy")
        assert cache.lookup("k") is None and not path.exists() and cache.checksum_failures == 1
        assert asked == [("k", "corrupt")]

    run(body, tmp_path / "c")


@pytest.mark.allow_log(r"index unusable \(file is not a database\); rebuilt it from the data files \(5 files\)",
                       r"index.sqlite missing; rebuilt it from the data files \(5 files\)")
def test_index_rebuilt_from_sidecars_and_orphans_reclaimed(tmp_path: Path) -> None:
    root = tmp_path / "c"
    files = {f"k/{i}": os.urandom(1000 + i) for i in range(5)}

    async def fill(cache: LocalCache) -> None:
        for key, data in files.items():
            await put(cache, key, data)

    run(fill, root)
    (root / INDEX).write_bytes(b"this is not a database, it was overwritten" * 10)
    orphan = root / "objects" / "zz" / "f00d"
    orphan.parent.mkdir()
    orphan.write_bytes(b"x" * 4096)  # a data file without a sidecar
    (root / "tmp" / "leftover").write_bytes(b"y" * 100)

    async def check(cache: LocalCache) -> None:
        assert cache.rebuilds == 1 and set(cache.entries) == set(files)
        assert cache.reclaimed_files == 2 and cache.reclaimed_bytes == 4196
        for key, data in files.items():
            assert await cache.copy_verified(key, "e1", tmp_path / "out") and (tmp_path / "out").read_bytes() == data

    run(check, root)
    assert not orphan.exists() and not (root / "tmp" / "leftover").exists()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / INDEX}{suffix}").unlink(missing_ok=True)  # deleted this time

    async def again(cache: LocalCache) -> None:
        assert cache.rebuilds == 1 and set(cache.entries) == set(files)

    run(again, root)


INDEX = "index.sqlite"


def test_index_rows_without_their_files_are_dropped(tmp_path: Path) -> None:
    root = tmp_path / "c"

    async def fill(cache: LocalCache) -> None:
        await put(cache, "a", b"aaa")
        await put(cache, "b", b"bbb")

    run(fill, root)
    next((root / "objects").rglob("*/*")).unlink()

    async def check(cache: LocalCache) -> None:
        assert len(cache.entries) == 1 and cache.rebuilds == 0
        assert cache.reclaimed_files == 1  # the sidecar of the lost file

    run(check, root)
    with sqlite3.connect(root / INDEX) as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 1


def test_a_second_process_cannot_take_the_directory(tmp_path: Path) -> None:
    fd = lock_directory(tmp_path / "d", "state directory")
    try:
        pid = os.fork()
        if pid == 0:  # another process: flock is per open file description, so a fork of ours would share it
            try:
                lock_directory(tmp_path / "d", "state directory")
                os._exit(0)
            except DirectoryInUse:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        os.close(fd)


def test_commits_in_threads_never_change_what_the_trio_thread_iterates(tmp_path: Path) -> None:
    """Issue 12 item 4: 400 commits in worker threads while the trio side sums and sorts the entries."""

    async def body(cache: LocalCache) -> None:
        done = trio.Event()

        async def iterate() -> None:
            while not done.is_set():
                cache.usage()
                list(cache.coldest(lambda key: False))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(iterate)
            async with trio.open_nursery() as writers:
                for i in range(400):
                    writers.start_soon(put, cache, f"k/{i}", b"x" * 100)
            done.set()
        assert len(cache.entries) == 400 and cache.usage() == 40_000

    run(body, tmp_path / "c")


@pytest.mark.parametrize("during", ["storing the data", "writing the index row"])
def test_remove_during_a_commit_wins(tmp_path: Path, during: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file deleted through the mount while its tee is being committed must not come back as cached: the
    remove lands while the commit's worker call (the data, then the index row) is held back."""

    async def body(cache: LocalCache) -> None:
        real_run = cache._run
        calls: list[int] = []
        held, release = trio.Event(), trio.Event()
        hold_at = 0 if during == "storing the data" else 1

        async def gated_run(fn: Any) -> Any:
            calls.append(1)
            if len(calls) - 1 == hold_at:
                held.set()
                await release.wait()
            return await real_run(fn)

        monkeypatch.setattr(cache, "_run", gated_run)
        temp = cache.new_temp_path()
        temp.write_bytes(b"z" * 5000)
        results: list[bool] = []

        async def commit() -> None:
            results.append(await cache.commit(temp, "k", "e", 5000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            await held.wait()
            await cache.remove("k")
            release.set()
        assert results == [False] and cache.lookup("k") is None
        assert not cache.data_path("k", "e").exists()

    run(body, tmp_path / "c")


def _index_rows(root: Path) -> set[tuple[str, str]]:
    with sqlite3.connect(root / INDEX) as db:
        return {(k, e) for k, e in db.execute("SELECT key, etag FROM entries")}


def test_removals_at_once_share_delete_transactions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removals running at the same time delete their index rows together (one DELETE each behind the
    index lock held `hybridfs evict` of a directory to 30 files/s), and every row is gone when they return."""
    root = tmp_path / "c"

    async def body(cache: LocalCache) -> None:
        for i in range(40):
            await put(cache, f"k/{i}", b"x" * 100)
        batches: list[int] = []
        index = cache._idx()
        real = index.delete_versions

        def counting(pairs: Any) -> None:
            pairs = list(pairs)
            batches.append(len(pairs))
            real(pairs)

        monkeypatch.setattr(index, "delete_versions", counting)
        freed: list[int] = []

        async def remove(key: str) -> None:
            freed.append(await cache.remove(key))

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(remove, f"k/{i}")
        assert freed == [100] * 40 and not cache.entries
        assert sum(batches) == 40 and len(batches) < 40, batches
        assert _index_rows(root) == set()

    run(body, root)


def test_a_version_stored_again_while_its_removal_waits_keeps_its_row(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """remove(k) waits for the next DELETE transaction while the same version of k is stored again (evict,
    then hydrate at once): the new row must survive, or the index and the files disagree after a restart."""
    root = tmp_path / "c"

    async def body(cache: LocalCache) -> None:
        await put(cache, "a", b"first")
        await put(cache, "k", b"kkkk")
        index = cache._idx()
        real = index.delete_versions
        entered, release = trio.Event(), trio.Event()
        token = trio.lowlevel.current_trio_token()

        def held(pairs: Any) -> None:
            pairs = list(pairs)
            if ("a", "e1") in pairs:  # the first removal holds the transaction: k's removal has to wait
                token.run_sync_soon(entered.set)
                trio.from_thread.run(release.wait, trio_token=token)
            real(pairs)

        monkeypatch.setattr(index, "delete_versions", held)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.remove, "a")
            await entered.wait()
            nursery.start_soon(cache.remove, "k")
            await _until(lambda: ("k", "e1") in cache._row_deletes.rows)  # its file is gone, its row waits
            nursery.start_soon(put, cache, "k", b"kkkk")
            await _until(lambda: cache._index_lock.statistics().tasks_waiting == 1)  # the INSERT waits too
            release.set()
        assert cache.lookup("k") is not None
        assert _index_rows(root) == {("k", "e1")}

    run(body, root)
    run(lambda cache: _assert_cached(cache, "k"), root)  # after a restart too


async def _until(condition: Callable[[], bool]) -> None:
    """Poll a condition that worker threads make true, for up to 10 s."""
    for _ in range(2000):
        if condition():
            return
        await trio.sleep(0.005)
    raise AssertionError("condition not reached within 10 s")


async def _assert_cached(cache: LocalCache, key: str) -> None:
    assert cache.lookup(key) is not None and cache.rebuilds == 0


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _connection_error() -> Exception:
    return botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")


def _answer(status: int) -> Exception:
    return botocore.exceptions.ClientError({"Error": {"Code": str(status)}, "ResponseMetadata": {
        "HTTPStatusCode": status}}, "HeadObject")


@pytest.mark.allow_log(r"S3 marked down after 2 failed calls in a row")
def test_breaker_opens_after_consecutive_outages_and_a_probe_closes_it() -> None:
    async def main() -> None:
        breaker = Breaker(threshold=2, probe_interval=3.0, clock=trio.current_time)
        breaker.observe(_connection_error())
        breaker.observe(_answer(404))  # S3 answered: the count starts again
        breaker.observe(_answer(503))
        assert not breaker.is_open
        breaker.observe(_connection_error())
        assert breaker.is_open and breaker.trips == 1
        with pytest.raises(FsError) as info:
            breaker.check("HEAD k")
        assert info.value.errno == 5 and "S3 is down" in info.value.message
        answers = [False, True]
        probes: list[float] = []

        async def probe() -> bool:
            probes.append(trio.current_time())
            return answers.pop(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(breaker.run, probe)
            await trio.sleep(10)  # virtual time: a probe at 3 s (down), one at 6 s (up)
            nursery.cancel_scope.cancel()
        assert not breaker.is_open
        assert len(probes) == 2 and probes[1] - probes[0] == pytest.approx(3.0)
        breaker.check("HEAD k")  # closed: no error
        assert breaker.status()["state"] == "closed" and breaker.status()["refused_calls"] == 1

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.allow_log(r"S3 marked down after 2 failed calls in a row")
def test_two_5xx_answers_make_the_breaker_probe_first() -> None:
    """5xx answers mean S3 is there: a request may be failing, not S3 (an UploadPart refused twice). The breaker
    probes at once and stays closed when the probe is answered; it opens when the probe is not."""

    async def main() -> None:
        breaker = Breaker(threshold=2, probe_interval=3.0, clock=trio.current_time)
        answers: list[bool] = [True, False]

        async def probe() -> bool:
            return answers.pop(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(breaker.run, probe)
            breaker.observe(_answer(500))
            breaker.observe(_answer(500))
            assert breaker.suspect and not breaker.is_open
            breaker.check("DELETE k")  # calls still go to S3 while the probe runs
            await trio.testing.wait_all_tasks_blocked()
            assert not breaker.suspect and not breaker.is_open and breaker.failures == 0
            breaker.observe(_answer(503))
            breaker.observe(_answer(503))
            await trio.testing.wait_all_tasks_blocked()
            assert breaker.is_open and breaker.trips == 1  # the probe was not answered either
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
