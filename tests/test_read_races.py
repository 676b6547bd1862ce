"""Issue 21, items 1 and 2: reads of one handle racing each other, the hydration of their file, and a failing
cached copy. Core tests force each interleaving with a store whose GETs wait until the test releases them; the
mount test is the reported case (cp of a cold file while the hydrator commits it returned short files, exit 0)."""

from __future__ import annotations

import errno
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import wait_until
from s3proxy import Rule, S3FaultProxy

from hybridfs.core.budget import MemoryBudget
from hybridfs.core.reader import CacheReader, CloudReader, HandleReader, ReaderState, ReadSettings
from hybridfs.errors import FsError
from hybridfs.tiers.cache import LocalCache

KiB = 1024
MiB = 1024 * KiB


class GatedStore:
    """Ranged GETs that wait until the test opens their gate (``release``); counts them."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.gates: dict[int, trio.Event] = {}
        self.gets: list[int] = []
        self.open_all = False

    def gate(self, start: int) -> trio.Event:
        return self.gates.setdefault(start, trio.Event())

    def release(self, start: int) -> None:
        self.gate(start).set()

    async def get_range(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        self.gets.append(start)
        if not self.open_all:
            await self.gate(start).wait()
        await trio.lowlevel.checkpoint()
        return self.data[start:start + length]


async def _wait_for(predicate: Any, what: str) -> None:
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - the condition is set by worker threads and trio tasks alike
            await trio.sleep(0.001)
    assert predicate(), what


def test_a_chunk_in_use_keeps_its_bytes_when_its_reader_is_closed() -> None:
    """Before: close() (the handle switching to the cache) freed a chunk a read was waiting on, and the read
    returned b"" — a short read the kernel takes as EOF."""
    chunk = 4 * KiB
    data = os.urandom(8 * chunk)

    async def main() -> None:
        store = GatedStore(data)
        budget = MemoryBudget(16 * chunk)
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            reader = CloudReader(store, "k", "e", len(data), ReadSettings(chunk, 1, budget),  # type: ignore[arg-type]
                                 nursery)

            async def read() -> None:
                got.append(await reader.read(chunk, chunk))

            nursery.start_soon(read)
            await _wait_for(lambda: chunk in store.gets, "the read's GET started")
            reader.close()  # the handle moved on while the read waits for its chunk
            store.open_all = True
            for gate in list(store.gates.values()):
                gate.set()
        assert got == [data[chunk:2 * chunk]]
        assert budget.used == 0, "every chunk's memory went back once its last read was done"

    trio.run(main)


def test_a_trim_by_a_later_read_keeps_a_chunk_an_earlier_read_waits_on() -> None:
    """Two reads of one handle in flight (cp's read-ahead): the one that completes first trims chunks behind it,
    including the one the other still waits on. Before: that read came back short."""
    chunk = 4 * KiB
    data = os.urandom(16 * chunk)

    async def main() -> None:
        store = GatedStore(data)
        budget = MemoryBudget(64 * chunk)
        results: dict[str, bytes] = {}
        async with trio.open_nursery() as nursery:
            reader = CloudReader(store, "k", "e", len(data), ReadSettings(chunk, 4, budget),  # type: ignore[arg-type]
                                 nursery)
            store.release(0)
            assert await reader.read(0, chunk) == data[:chunk]  # sequential from here: the window opens

            async def read(name: str, offset: int) -> None:
                results[name] = await reader.read(offset, chunk)

            nursery.start_soon(read, "behind", chunk)  # waits on chunk 1 (its gate stays shut)
            await trio.testing.wait_all_tasks_blocked()
            for index in range(2, 16):
                store.release(index * chunk)
            reader.next_expected = 5 * chunk  # as if reads of chunks 1-4 had completed out of order
            await read("ahead", 5 * chunk)  # sequential: trims what is behind chunk 4, chunk 1 included
            assert 1 not in reader.chunks, "the trim dropped the chunk from the table"
            store.release(chunk)
        assert results == {"behind": data[chunk:2 * chunk], "ahead": data[5 * chunk:6 * chunk]}
        reader.close()
        assert budget.used == 0

    trio.run(main)


async def _cached(cache: LocalCache, key: str, etag: str, data: bytes) -> None:
    temp = cache.new_temp_path()
    temp.write_bytes(data)
    assert await cache.commit(temp, key, etag, len(data))


class Readers:
    """What a Filesystem gives a HandleReader: the best reader of one version, and its S3 reader; records every
    reader it made so the test can check that each was closed exactly when it should be."""

    def __init__(self, cache: LocalCache, store: GatedStore, nursery: trio.Nursery, settings: ReadSettings) -> None:
        self.cache, self.store, self.nursery, self.settings = cache, store, nursery, settings
        self.made: list[CacheReader | CloudReader] = []

    def cloud(self) -> CloudReader:
        reader = CloudReader(self.store, "k", "e", len(self.store.data), self.settings,  # type: ignore[arg-type]
                             self.nursery)
        self.made.append(reader)
        return reader

    async def best(self) -> CacheReader | CloudReader:
        if self.cache.lookup("k", "e") is not None:
            reader = await CacheReader.open(self.cache, "k", "e")
            if reader is not None:
                self.made.append(reader)
                return reader
        return self.cloud()

    def handle(self) -> HandleReader:
        return HandleReader(lambda: ("k", "e"), self.best, self.cloud, self.cache)

    def open_cache_readers(self) -> list[CacheReader]:
        return [r for r in self.made if isinstance(r, CacheReader) and r.fd >= 0]


def test_reads_racing_the_switch_to_the_cache_lose_nothing(tmp_path: Path) -> None:
    """A read waits on S3 while the hydrator commits the same version; two more reads then both see the copy.
    Before: the switch closed the S3 reader under the waiting read (short data), and each of the two opened a
    cache reader of its own (one descriptor leaked)."""
    chunk = 64 * KiB
    data = os.urandom(8 * chunk)

    async def main() -> None:
        cache = LocalCache(tmp_path / "cache", 1 << 30)
        await cache.open()
        store = GatedStore(data)
        budget = MemoryBudget(32 * chunk)
        results: dict[int, bytes] = {}
        async with trio.open_nursery() as nursery:
            readers = Readers(cache, store, nursery, ReadSettings(chunk, 2, budget))
            handle = readers.handle()

            async def read(offset: int) -> None:
                data_, source = await handle.read(offset, chunk)
                results[offset] = data_
                assert source in ("s3", "cache")

            nursery.start_soon(read, 0)
            await _wait_for(lambda: 0 in store.gets, "the first read's GET started")
            assert handle.state is ReaderState.CLOUD
            await _cached(cache, "k", "e", data)  # the hydrator commits the same version meanwhile
            nursery.start_soon(read, 3 * chunk)  # both see the copy: one switches, the other reads on meanwhile
            nursery.start_soon(read, 5 * chunk)
            await _wait_for(lambda: handle.state is ReaderState.CACHE, "the handle to switch to the cache")
            store.open_all = True
            for gate in list(store.gates.values()):
                gate.set()
            await _wait_for(lambda: len(results) == 3, "every read to finish")
            handle.close()
            handle.close()  # idempotent
            nursery.cancel_scope.cancel()
        assert results == {o: data[o:o + chunk] for o in (0, 3 * chunk, 5 * chunk)}
        assert sum(isinstance(r, CacheReader) for r in readers.made) == 1, "one cache reader for the handle"
        assert readers.open_cache_readers() == [], "closed once the handle was released"
        assert budget.used == 0
        cache.close()

    trio.run(main)


@pytest.mark.allow_log(r"cache copy of k is corrupt \(block \d+ fails its checksum\); dropped it; reading from S3")
def test_reads_of_a_corrupt_copy_fall_back_once_and_close_its_descriptor_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two reads of one handle both find the cached copy corrupt. Before: each closed the same descriptor (the
    second close could hit a number reused by SQLite or a spool) and the second read failed instead of going to
    S3."""
    chunk = 64 * KiB
    data = os.urandom(4 * chunk)

    async def main() -> None:
        cache = LocalCache(tmp_path / "cache", 1 << 30)
        await cache.open()
        await _cached(cache, "k", "e", data)
        await trio.Path(cache.data_path("k", "e")).write_bytes(b"\0" * len(data))  # rot on the cache disk
        store = GatedStore(data)
        store.open_all = True
        results: dict[int, tuple[bytes, str]] = {}
        async with trio.open_nursery() as nursery:
            readers = Readers(cache, store, nursery, ReadSettings(chunk, 2, MemoryBudget(16 * chunk)))
            handle = readers.handle()
            fake_fd = os.open(os.devnull, os.O_RDONLY)  # stands for any descriptor the process opens meanwhile
            try:

                async def read(offset: int) -> None:
                    results[offset] = await handle.read(offset, chunk)

                async with trio.open_nursery() as racing:
                    racing.start_soon(read, 0)
                    racing.start_soon(read, 2 * chunk)
                assert handle.state is ReaderState.CLOUD
                os.fstat(fake_fd)  # still open: nobody closed a descriptor twice
            finally:
                os.close(fake_fd)
            handle.close()
        assert results == {0: (data[:chunk], "s3"), 2 * chunk: (data[2 * chunk:3 * chunk], "s3")}
        assert sum(isinstance(r, CacheReader) for r in readers.made) == 1
        assert readers.open_cache_readers() == []
        assert cache.lookup("k", "e") is None, "the corrupt copy was dropped"
        assert sum("reading from S3 instead" in r.getMessage() for r in caplog.records) == 1, "said once"
        cache.close()

    trio.run(main)


def test_a_closed_cache_reader_closes_nothing_twice(tmp_path: Path) -> None:
    async def main() -> None:
        cache = LocalCache(tmp_path / "cache", 1 << 30)
        await cache.open()
        await _cached(cache, "k", "e", b"x" * 100)
        reader = await CacheReader.open(cache, "k", "e")
        assert reader is not None
        reader.close()
        other = os.open(os.devnull, os.O_RDONLY)  # may take the number the reader had
        try:
            reader.close()
            os.fstat(other)
        finally:
            os.close(other)
        with pytest.raises(FsError) as info:
            await reader.read(0, 10)
        assert info.value.errno == errno.EBADF
        cache.close()

    trio.run(main)


# -- through a real mount -------------------------------------------------------------------------------------


def _status(mount: Any) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))
    return status


def test_parallel_reads_of_one_handle_while_the_hydrator_commits_it_get_every_byte(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any, stack: Any, prefix: str) -> None:
    """The reported case (cp: several reads in flight on one handle) made certain: eight threads read one
    descriptor of a cold file whose GETs are slow, while the hydrator brings the same version into the cache and
    the handle switches to it. Before: reads in flight at the switch came back short or empty (cp exited 0 with
    36-162 MiB of 256, 2 of 3 runs of this test with one reader thread and cp)."""
    size, piece = 64 * MiB, 128 * KiB
    data = os.urandom(size)
    s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/cold.bin", Body=data)
    object_path = re.escape(f"/{stack.bucket}/{prefix}/cold.bin") + "$"
    s3_proxy.add(Rule(method="GET", path=object_path, action="delay", delay=0.3))
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--read-chunk-size", "1M",
                                      "--readahead-chunks", "1"])
    offsets = list(range(0, size, piece))
    bad: list[str] = []
    fd = os.open(mount.path / "cold.bin", os.O_RDONLY)
    try:
        def read_from(first: int) -> None:
            for offset in offsets[first::8]:
                got = os.pread(fd, piece, offset)
                if got != data[offset:offset + piece]:
                    bad.append(f"{offset}: {len(got)} bytes, {'other bytes' if len(got) == piece else 'short'}")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(read_from, range(8)))
    finally:
        os.close(fd)
    assert not bad, f"{len(bad)} reads wrong: {bad[:5]}"
    cache = _status(mount)["cache"]
    assert cache["misses"] >= 1 and cache["hits"] >= 1, \
        f"the handle should have started on S3 and switched to the cache while read: {cache}"
    wait_until(lambda: _status(mount)["memory"]["used_bytes"] == 0, 10,
               message="every read-ahead chunk's memory given back")
