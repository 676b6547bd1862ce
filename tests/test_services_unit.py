"""The hydrator, the eviction planner and the purger without Kafka, S3 or a kernel: a real LocalCache in a
temporary directory, an in-memory object store with ETags and call counters, fake filesystem hooks, and an
in-process "bus" that hands planner events straight to the purger. Timers run on trio's MockClock."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from hybridfs.commands.status import render, summarize
from hybridfs.core.attrs import Stat
from hybridfs.errors import FsError
from hybridfs.events.schema import Event, RejectEvent
from hybridfs.keylocks import KeyLocks
from hybridfs.services.common import S3Waiter
from hybridfs.services.hydrator import Hydrator, HydratorSettings
from hybridfs.services.planner import DiskSpace, Planner, PlannerSettings
from hybridfs.services.purger import PRESERVED_DIR, Purger, PurgerSettings
from hybridfs.tiers.cache import LocalCache
from hybridfs.tiers.s3 import ObjectInfo

ORIGIN = "host:/mnt"
PREFIX = "data/"
MiB = 1024 * 1024


def etag_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_file(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


def read_file(path: str) -> bytes:
    return Path(path).read_bytes()


class FakeStore:
    """An in-memory bucket: ETag = MD5 of the bytes, as S3 for single-part objects."""

    bucket = "bucket"

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.calls: Counter[str] = Counter()
        self.down = 0  # the next N calls fail as "S3 unreachable"
        self.on_download: Callable[[str], None] | None = None
        self.mtimes: dict[str, float] = {}
        self.now = time.time()  # Unix time of the next PUT (one second apart)

    def put_object(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> str:
        self.objects[key] = (data, metadata or {})
        self.mtimes[key] = self.now
        self.now += 1
        return etag_of(data)

    async def list_keys(self, prefix: str) -> list[ObjectInfo]:
        self._unreachable("list")
        return [ObjectInfo(k, len(d), etag_of(d), int(self.mtimes[k] * 1e9)) for k, (d, _) in
                sorted(self.objects.items()) if k.startswith(prefix)]

    async def delete(self, key: str) -> None:
        self._unreachable("delete")
        self.objects.pop(key, None)

    def _unreachable(self, what: str) -> None:
        self.calls[what] += 1
        if self.down:
            self.down -= 1
            raise FsError(errno.EIO, f"{what}: S3 unreachable")

    async def head(self, key: str) -> ObjectInfo | None:
        self._unreachable("head")
        if key not in self.objects:
            return None
        data, meta = self.objects[key]
        return ObjectInfo(key, len(data), etag_of(data), 0, dict(meta))

    async def download_file(self, key: str, etag: str, path: str) -> None:
        self._unreachable("download")
        if self.on_download is not None:
            self.on_download(key)
        if key not in self.objects:
            raise FsError(errno.ENOENT, f"GET {key}: NoSuchKey")
        data, _ = self.objects[key]
        if etag_of(data) != etag:
            raise FsError(errno.ESTALE, f"GET {key}: object changed remotely")
        write_file(path, data)

    async def upload_file(self, key: str, path: str, metadata: dict[str, str]) -> ObjectInfo:
        self._unreachable("upload")
        data = read_file(path)
        self.put_object(key, data, metadata)
        return ObjectInfo(key, len(data), etag_of(data), 0, dict(metadata))

    async def get_range(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        self._unreachable("get")
        if self.on_download is not None:
            self.on_download(key)
        if key not in self.objects:
            raise FsError(errno.ENOENT, f"GET {key}: NoSuchKey")
        data, _ = self.objects[key]
        if etag is not None and etag_of(data) != etag:
            raise FsError(errno.ESTALE, f"GET {key}: object changed remotely")
        return data[start:start + length]


class FakeHooks:
    def __init__(self) -> None:
        self.open: set[str] = set()
        self.known: dict[str, Stat] = {}
        self.forgotten: list[str] = []
        self.remembered: dict[str, ObjectInfo] = {}

    def is_open(self, key: str) -> bool:
        return key in self.open

    async def forget_kernel_cache(self, key: str) -> None:
        self.forgotten.append(key)

    def known_stat(self, key: str) -> Stat | None:
        return self.known.get(key)

    def uploaded(self, key: str, info: ObjectInfo) -> None:
        self.remembered[key] = info


class World:
    """The services wired together; planner events go straight to the purger (no Kafka)."""

    def __init__(self, tmp_path: Path, capacity: int = 10 * MiB, small_object: int = 8 * MiB,
                 **planner_settings: Any) -> None:
        self.store = FakeStore()
        self.cache = LocalCache(tmp_path / "cache", capacity)
        self.hooks = FakeHooks()
        self.locks = KeyLocks()
        self.published: list[Event] = []
        self.clock_now = 1_000_000.0
        settings = PlannerSettings(**{"interval": 1.0, "dedupe_window": 30.0, "growth_check": 1.0,
                                      **planner_settings})
        self.planner = Planner(self.cache, settings, self.published.append, ORIGIN, self.hooks.is_open,
                               clock=lambda: self.clock_now)
        self.hydrator = Hydrator(self.store, self.cache, self.planner, self.locks,
                                 HydratorSettings(room_timeout=5, small_object=small_object))
        self.purger = Purger(self.store, self.cache, self.hooks, self.planner, self.locks, ORIGIN, PREFIX)

    async def open(self) -> None:
        await self.cache.open()

    async def cached(self, key: str, data: bytes) -> None:
        """Put ``key`` in S3 and in the cache (as a hydration would)."""
        etag = self.store.put_object(key, data)
        temp = self.cache.new_temp_path()
        temp.write_bytes(data)
        assert await self.cache.commit(temp, key, etag, len(data))

    def cached_bytes(self, key: str) -> bytes | None:
        entry = self.cache.lookup(key)
        return None if entry is None else self.cache.data_path(key, entry.etag).read_bytes()


def run(fn: Callable[[World], Awaitable[None]], tmp_path: Path, **kw: Any) -> None:
    async def main() -> None:
        world = World(tmp_path, **kw)
        await world.open()
        try:
            await fn(world)
        finally:
            world.cache.close()

    # Jumps only after 0.1 s of real idleness: cache and disk work runs in threads, which a jump must not outrun.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.1))


def hydrate(key: str, etag: str | None, size: int | None, **kw: Any) -> Event:
    return Event.hydrate(key, etag, size, kw.pop("reason", "read-miss"), kw.pop("origin", ORIGIN), **kw)


def evict(key: str, etag: str | None = None, size: int | None = None, **kw: Any) -> Event:
    return Event.evict(key, etag, size, kw.pop("reason", "cli"), kw.pop("origin", ORIGIN), **kw)


# -- hydrator ---------------------------------------------------------------------------------------------


def test_hydrate_copies_once_and_is_idempotent(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        data = b"x" * 5000
        etag = w.store.put_object("data/a", data)
        await w.hydrator.handle(hydrate("data/a", etag, len(data)))
        assert w.cached_bytes("data/a") == data
        calls = dict(w.store.calls)
        await w.hydrator.handle(hydrate("data/a", f'"{etag}"', len(data)))  # quoted, as S3 writes it
        assert dict(w.store.calls) == calls, "a second event for a cached version must not touch S3"
        assert w.hydrator.outcomes == {"hydrated": 1, "already-cached": 1}
        assert not list((w.cache.root / "tmp").iterdir())

    run(body, tmp_path)


@pytest.mark.parametrize("small_object", [8 * MiB, 0], ids=["one-get", "download"])
def test_hydrate_stale_etag_takes_the_current_version(tmp_path: Path, small_object: int) -> None:
    async def body(w: World) -> None:
        old = w.store.put_object("data/a", b"old")
        new = w.store.put_object("data/a", b"newer")
        await w.hydrator.handle(hydrate("data/a", old, 3))
        entry = w.cache.lookup("data/a")
        assert entry is not None and entry.etag == new
        assert w.cached_bytes("data/a") == b"newer"
        await w.hydrator.handle(hydrate("data/a", None, None))  # no version named: the current one
        assert w.hydrator.outcomes == {"hydrated": 1, "already-cached": 1}

    run(body, tmp_path, small_object=small_object)


def test_hydrate_large_object_uses_the_parallel_download(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        data = os.urandom(3 * MiB)
        etag = w.store.put_object("data/big", data)
        await w.hydrator.handle(hydrate("data/big", etag, len(data)))
        assert w.cached_bytes("data/big") == data
        assert w.store.calls["download"] == 1 and w.store.calls["get"] == 0

    run(body, tmp_path, small_object=MiB)


def test_hydrate_gone_object_is_dropped(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.hydrator.handle(hydrate("data/gone", "abc", 3))
        assert w.cache.lookup("data/gone") is None
        assert w.hydrator.outcomes == {"gone": 1}

    run(body, tmp_path)


def test_hydrate_chases_a_version_changed_during_download(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        etag = w.store.put_object("data/a", b"v1")
        changed = []

        def change(key: str) -> None:
            if not changed:
                changed.append(key)
                w.store.put_object(key, b"v2-longer")

        w.store.on_download = change
        await w.hydrator.handle(hydrate("data/a", etag, 2))
        assert w.cached_bytes("data/a") == b"v2-longer"

    run(body, tmp_path)


def test_hydrate_rejects_inconsistent_and_misrouted_events(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        etag = w.store.put_object("data/a", b"12345")
        with pytest.raises(RejectEvent, match="does not match"):
            await w.hydrator.handle(hydrate("data/a", etag, 999))
        with pytest.raises(RejectEvent, match="does not match"):  # an understated size is caught too
            await w.hydrator.handle(hydrate("data/a", etag, 3))
        with pytest.raises(RejectEvent, match="evict event on the hydrate topic"):
            await w.hydrator.handle(evict("data/a"))
        with pytest.raises(RejectEvent, match="bucket"):
            await w.hydrator.handle(hydrate("data/a", etag, 5, bucket="other"))
        with pytest.raises(RejectEvent, match="hydrate event on the evict topic"):
            await w.purger.handle(hydrate("data/a", etag, 5))
        assert w.cache.lookup("data/a") is None

    run(body, tmp_path)


def test_hydrate_skips_objects_larger_than_the_cache(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        etag = w.store.put_object("data/big", b"z" * 2048)
        await w.hydrator.handle(hydrate("data/big", etag, 2048))
        assert w.cache.lookup("data/big") is None
        assert w.hydrator.outcomes == {"too-large": 1}
        assert w.store.calls["download"] == 0

    run(body, tmp_path, capacity=1024)


def test_pin_and_unpin_ride_on_hydrate_events(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        etag = w.store.put_object("data/p", b"pinned")
        await w.hydrator.handle(hydrate("data/p", etag, 6, pin=True, reason="pin"))
        entry = w.cache.lookup("data/p")
        assert entry is not None and entry.pinned and "data/p" in w.cache.pins
        await w.purger.handle(evict("data/p"))
        assert w.cache.lookup("data/p") is not None, "an explicit evict of a pinned file is refused"
        await w.hydrator.handle(hydrate("data/p", etag, 6, pin=False, reason="unpin"))
        assert "data/p" not in w.cache.pins and w.cache.lookup("data/p") is not None
        await w.purger.handle(evict("data/p"))
        assert w.cache.lookup("data/p") is None

    run(body, tmp_path)


def test_hydrate_waits_for_s3_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(w: World) -> None:
        etag = w.store.put_object("data/a", b"abc")
        w.store.down = 5
        await w.hydrator.handle(hydrate("data/a", etag, 3))
        assert w.cached_bytes("data/a") == b"abc"

    caplog.set_level(logging.DEBUG, "hybridfs.services")
    run(body, tmp_path)
    infos = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(infos) == 2 and "S3 unreachable" in infos[0] and "answers again" in infos[1], infos


def test_hydration_waits_for_room_made_by_the_planner(tmp_path: Path) -> None:
    """A full cache: the hydration asks for room, the planner publishes evictions, the purger makes room."""

    async def body(w: World) -> None:
        for i in range(9):
            await w.cached(f"data/old{i}", bytes([i]) * MiB)
            w.cache.touch(f"data/old{i}")
        w.planner.publish = lambda e: bus.send_nowait(e)  # planner -> purger, in process
        bus, inbox = trio.open_memory_channel[Event](100)

        async def purger_loop() -> None:
            async for event in inbox:
                await w.purger.handle(event)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(purger_loop)
            await nursery.start(w.planner.run)
            etag = w.store.put_object("data/new", b"n" * (2 * MiB))
            await w.hydrator.handle(hydrate("data/new", etag, 2 * MiB))
            assert w.cache.lookup("data/new") is not None, (w.hydrator.outcomes, w.purger.outcomes, w.published)
            assert w.cache.usage() <= w.cache.capacity
            assert w.cache.lookup("data/old0") is None, "the coldest file goes first"
            assert w.cache.lookup("data/old8") is not None, "the hottest file stays"
            nursery.cancel_scope.cancel()

    run(body, tmp_path)


def test_hydration_gives_up_when_nothing_can_be_evicted(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.cached("data/p", b"p" * (9 * MiB))
        await w.cache.set_pinned("data/p", True)
        etag = w.store.put_object("data/new", b"n" * (2 * MiB))
        async with trio.open_nursery() as nursery:
            await nursery.start(w.planner.run)
            await w.hydrator.handle(hydrate("data/new", etag, 2 * MiB))
            nursery.cancel_scope.cancel()
        assert w.cache.lookup("data/new") is None
        assert w.hydrator.outcomes == {"no-room": 1}
        assert w.planner.reserved == 0 and not w.planner.wanted

    run(body, tmp_path)


# -- planner ----------------------------------------------------------------------------------------------


def test_planner_evicts_coldest_unpinned_closed_down_to_low_watermark(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        for i in range(10):
            await w.cached(f"data/f{i}", b"." * MiB)
            w.cache.touch(f"data/f{i}")  # f0 coldest ... f9 hottest
        await w.cache.set_pinned("data/f0", True)
        w.hooks.open.add("data/f1")
        plan = await w.planner.round()
        assert plan is not None
        # 10 MiB used of 10 MiB (> 90%): down to 7.5 MiB means 3 files, skipping pinned f0 and open f1.
        assert [e.key for e in w.published] == ["data/f2", "data/f3", "data/f4"]
        assert {e.reason for e in w.published} == {"watermark"} and all(e.origin == ORIGIN for e in w.published)
        # Requested, not done yet: the next round publishes nothing again (dedupe), projecting them freed.
        await w.planner.round()
        assert len(w.published) == 3
        # The purger settles them; still over because nothing was removed: published again.
        for event in w.published[:3]:
            w.planner.settled(event.key)
        await w.planner.round()
        assert [e.key for e in w.published[3:]] == ["data/f2", "data/f3", "data/f4"]

    run(body, tmp_path)


def test_planner_reacts_to_growth_between_rounds(tmp_path: Path) -> None:
    """Files teed into the cache by writes take it over the high watermark: the planner acts within
    ``growth_check``, not at its next round."""

    async def body(w: World) -> None:
        published = trio.Event()

        def publish(event: Event) -> None:
            w.published.append(event)
            published.set()

        w.planner.publish = publish
        async with trio.open_nursery() as nursery:
            await nursery.start(w.planner.run)
            await trio.sleep(1)  # the first round ran: nothing to do
            assert w.published == []
            started = trio.current_time()
            for i in range(10):
                await w.cached(f"data/f{i}", b"." * MiB)
            await published.wait()
            assert trio.current_time() - started < 5, "reacted within growth_check, long before the interval"
            nursery.cancel_scope.cancel()

    run(body, tmp_path, interval=600.0, growth_check=1.0)


def test_planner_is_quiet_below_the_high_watermark(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        for i in range(9):
            await w.cached(f"data/f{i}", b"." * MiB)
        await w.planner.round()
        assert w.published == []

    run(body, tmp_path)


def test_planner_max_age(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.cached("data/old", b"o")
        await w.cached("data/young", b"y")
        w.clock_now = w.cache.entries["data/old"].last_access + 100
        w.cache.entries["data/young"] = w.cache.entries["data/young"].__class__(
            "data/young", w.cache.entries["data/young"].etag, 1, w.clock_now - 10)
        await w.planner.round()
        assert [(e.key, e.reason) for e in w.published] == [("data/old", "max-age")]

    run(body, tmp_path, max_age=60.0)


def test_planner_disk_pressure(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        for i in range(4):
            await w.cached(f"data/f{i}", b"." * MiB)
        w.planner.disk = DiskSpace(free=3 * MiB, total=100 * MiB)  # 3% free, min_free 5% (+1% slack): 3 MiB
        plan = w.planner.plan()
        assert [e.key for e in plan.watermark] == ["data/f0", "data/f1", "data/f2"]

    run(body, tmp_path, capacity=1000 * MiB)


# -- purger -----------------------------------------------------------------------------------------------


def test_purge_when_s3_holds_the_same_bytes(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.cached("data/a", b"same")
        await w.purger.handle(evict("data/a"))
        assert w.cache.lookup("data/a") is None
        assert w.hooks.forgotten == ["data/a"]
        assert w.store.calls["upload"] == 0
        assert not list((w.cache.root / "objects").rglob("*.*")) and w.purger.bytes_freed == 4
        await w.purger.handle(evict("data/a"))  # idempotent
        assert w.purger.outcomes == {"evicted": 1, "not-cached": 1}

    run(body, tmp_path)


@pytest.mark.allow_log(r"S3 no longer holds it \(deleted elsewhere\); preserving the cached copy")
def test_purge_never_writes_a_deleted_object_back(tmp_path: Path) -> None:
    """S3 is the truth for deletes: the key stays absent, the bytes are kept beside it (contract 4)."""
    async def body(w: World) -> None:
        await w.cached("data/a", b"only copy")
        etag = w.cache.entries["data/a"].etag
        w.hooks.known["data/a"] = Stat(mode=0o100600, uid=7, gid=8, size=9, mtime_ns=5 * 10**9, etag=etag)
        del w.store.objects["data/a"]
        await w.purger.handle(evict("data/a"))
        assert w.cache.lookup("data/a") is None and w.purger.outcomes == {"evicted": 1}
        assert "data/a" not in w.store.objects, "a deleted object must not come back"
        data, meta = w.store.objects[f"data/{PRESERVED_DIR}/a.{etag}"]
        assert data == b"only copy"
        assert meta == {"mode": str(0o100600), "uid": "7", "gid": "8", "mtime": "5",
                        "hybridfs-original-key": "data/a", "hybridfs-original-etag": etag}
        assert w.hooks.remembered == {}, "the namespace learns nothing about the deleted key"

    run(body, tmp_path)


@pytest.mark.allow_log(r"S3 no longer holds it", r"larger than the preserved copies may be")
def test_preserved_copies_are_bounded_by_size_and_age(tmp_path: Path) -> None:
    """Each different ETag would add a copy: the total stays under preserved_size (oldest dropped first), no
    copy outlives preserved_age, and a copy larger than the bound is not kept at all."""
    async def body(w: World) -> None:
        w.purger.settings = PurgerSettings(preserved_size=250, preserved_age=3600)
        w.store.put_object(f"data/{PRESERVED_DIR}/ancient.x", b"old")
        w.store.mtimes[f"data/{PRESERVED_DIR}/ancient.x"] = time.time() - 7200
        for version in range(4):
            await w.cached("data/v", bytes([version]) * 100)
            del w.store.objects["data/v"]
            await w.purger.handle(evict("data/v"))
        kept = sorted(k for k in w.store.objects if PRESERVED_DIR in k)
        etags = [etag_of(bytes([v]) * 100) for v in (2, 3)]
        assert kept == sorted(f"data/{PRESERVED_DIR}/v.{e}" for e in etags), "the two newest copies stay"
        assert "data/v" not in w.store.objects
        doc = w.purger.status()["preserved"]
        assert doc["count"] == 2 and doc["bytes"] == 200 and doc["dropped"] == 3  # ancient + versions 0, 1
        assert [p["key"] for p in doc["newest"]] == [f"data/{PRESERVED_DIR}/v.{etags[1]}",
                                                    f"data/{PRESERVED_DIR}/v.{etags[0]}"]
        await w.cached("data/big", b"b" * 300)
        del w.store.objects["data/big"]
        await w.purger.handle(evict("data/big"))
        assert w.cache.lookup("data/big") is None and len([k for k in w.store.objects if "big" in k]) == 0
        assert w.purger.status()["preserved"]["deleted_not_preserved"] == 1

    run(body, tmp_path)


@pytest.mark.allow_log(r"S3 holds another version")
def test_purge_preserves_a_cached_version_s3_replaced(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.cached("data/d/a", b"cached version")
        old = w.cache.entries["data/d/a"].etag
        w.store.put_object("data/d/a", b"someone else's newer version", {"mode": "33188"})
        await w.purger.handle(evict("data/d/a"))
        assert w.cache.lookup("data/d/a") is None
        assert w.store.objects["data/d/a"][0] == b"someone else's newer version", "the newer version stays"
        spare = f"data/{PRESERVED_DIR}/d/a.{old}"
        data, meta = w.store.objects[spare]
        assert data == b"cached version"
        assert meta["hybridfs-original-key"] == "data/d/a" and meta["mode"] == "33188"

    run(body, tmp_path)


def test_purge_same_bytes_under_another_etag_uploads_nothing(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.cached("data/a", b"bytes")
        temp = w.cache.new_temp_path()
        temp.write_bytes(b"bytes")
        assert await w.cache.commit(temp, "data/a", "x", 5)  # the same bytes cached under another ETag
        await w.purger.handle(evict("data/a"))
        assert w.cache.lookup("data/a") is None and w.store.calls["upload"] == 0

    run(body, tmp_path)


def test_purge_refuses_open_pinned_and_recently_read(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        for name in ("open", "pinned", "hot"):
            await w.cached(f"data/{name}", name.encode())
        w.hooks.open.add("data/open")
        await w.cache.set_pinned("data/pinned", True)
        planned = evict("data/hot", reason="watermark")
        w.cache.touch("data/hot")
        w.cache.entries["data/hot"] = w.cache.entries["data/hot"].__class__(
            "data/hot", w.cache.entries["data/hot"].etag, 3, planned.time + 1)
        await w.purger.handle(evict("data/open"))
        await w.purger.handle(evict("data/pinned", reason="watermark"))
        await w.purger.handle(planned)
        assert all(w.cache.lookup(f"data/{n}") for n in ("open", "pinned", "hot"))
        assert w.purger.outcomes == {"open": 1, "pinned": 1, "hot": 1}
        # --unpin: pin=false on the evict event unpins, then evicts.
        await w.purger.handle(evict("data/pinned", pin=False))
        assert w.cache.lookup("data/pinned") is None and "data/pinned" not in w.cache.pins

    run(body, tmp_path)


def test_purge_ignores_another_caches_plan_and_stale_versions(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.cached("data/a", b"a")
        await w.purger.handle(evict("data/a", reason="watermark", origin="elsewhere:/mnt"))
        await w.purger.handle(evict("data/a", etag="not-the-cached-one"))
        assert w.cache.lookup("data/a") is not None
        with pytest.raises(RejectEvent, match="pin=true"):
            await w.purger.handle(evict("data/a", pin=True))
        assert w.purger.outcomes == {"other-cache": 1, "other-version": 1}

    run(body, tmp_path)


def test_preserved_key_of_a_long_path_is_hashed(tmp_path: Path) -> None:
    w = World(tmp_path)
    long_name = "data/" + "/".join(["d" * 200] * 4) + "/" + "f" * 250
    spare = w.purger.preserved_key(long_name, "0123-4")
    assert spare.startswith(f"data/{PRESERVED_DIR}/") and spare.endswith(".0123-4")
    assert len(spare.encode()) <= 1024 and all(len(s) <= 255 for s in spare.split("/"))


def test_key_locks_serialize_one_key_only() -> None:
    async def main() -> None:
        locks = KeyLocks()
        order: list[str] = []

        async def hold(key: str, name: str) -> None:
            async with locks(key):
                order.append(f"{name}+")
                await trio.sleep(1)
                order.append(f"{name}-")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, "k", "a")
            await trio.sleep(0.1)
            nursery.start_soon(hold, "k", "b")
            nursery.start_soon(hold, "other", "c")
        assert order.index("a-") < order.index("b+")
        assert order.index("c+") < order.index("a-")
        assert not locks.held("k") and not locks.held("other")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_s3_waiter_reraises_what_waiting_cannot_fix() -> None:
    async def main() -> None:
        waiter = S3Waiter(logging.getLogger("t"), "tests")

        async def denied() -> None:
            raise FsError(errno.EACCES, "denied")

        with pytest.raises(FsError):
            await waiter.call(denied)
        assert waiter.waits == 0

    trio.run(main)


# -- status rendering -------------------------------------------------------------------------------------


def test_status_summary_and_rendering() -> None:
    status = {
        "bucket": "b", "prefix": "p/", "mountpoint": "/mnt", "cache_id": "h-1", "kafka": "k:9092",
        "topic_prefix": "t", "events": True,
        "cache": {"dir": "/c", "available": True, "used_bytes": 5 * MiB, "capacity_bytes": 10 * MiB,
                  "files_cached": 5, "pinned": 1, "hits": 3, "misses": 1, "hit_ratio": 0.75},
        "bus": {"published": 4, "produced": 3, "failed": 0, "outbox": 1, "in_flight": 0, "reachable": True},
        "services": {
            "hydrator": {"outcomes": {"hydrated": 4}, "bytes_hydrated": 4 * MiB,
                         "consumer": {"handled": 4, "dead_lettered": 1, "lag": 2}},
            "purger": {"outcomes": {}, "bytes_freed": 0, "consumer": {"handled": 0, "dead_lettered": 0,
                                                                     "lag": None}},
            "planner": {"high_watermark": 0.9, "low_watermark": 0.75, "min_free": 0.05, "max_age": 0,
                        "disk_free_bytes": 50 * MiB, "disk_total_bytes": 100 * MiB},
            "census": {"files": 12, "complete": True, "age_seconds": 1.0},
        },
    }
    s = summarize(status)
    assert s["files_cloud_only"] == 7 and s["files_pinned"] == 1 and s["consumer_lag_total"] == 2
    assert s["high_watermark_bytes"] == 9 * MiB and s["events_dead_lettered"] == 1
    text = render(status)
    assert "5.0 MiB of 10.0 MiB (50%)" in text and "7 cloud-only" in text and "1 waiting in the outbox" in text
    assert "hit ratio 75.0%" in text
    assert "feed" not in text  # no feed (events off, or an older mount): no line
    status["feed"] = {"topic": "t.changes", "mode": "fallback", "reason": "kafka unreachable", "for_seconds": 3.0,
                      "applied": 7, "published": 2, "delay_p50_ms": 12.5, "consumer": {"lag": None}}
    line = next(x for x in render(status).splitlines() if x.startswith("feed"))
    assert "t.changes: FALLBACK (revalidating with S3) for 3.0s (kafka unreachable)" in line
    assert "7 changes applied, p50 12.5 ms" in line and "lag ?" in line


@pytest.mark.allow_log(r"S3 holds another version")
def test_a_purge_whose_copy_is_removed_meanwhile_ends_quietly(tmp_path: Path) -> None:
    """An unlink (or a change from the feed) removes the cached copy while the purger uploads it aside. Before:
    FileNotFoundError escaped the handler, and the consumer logged an ERROR and retried the event (seen by the
    torture test: "handling evict event ... failed ([Errno 2] No such file or directory ...)")."""
    async def body(w: World) -> None:
        await w.cached("data/a", b"cached version")
        w.store.put_object("data/a", b"a newer version in S3")
        upload = w.store.upload_file

        async def removed_first(key: str, path: str, metadata: dict[str, str]) -> ObjectInfo:
            await w.cache.remove("data/a")  # the unlink, between the purger's checks and its upload
            return await upload(key, path, metadata)

        w.store.upload_file = removed_first  # type: ignore[method-assign]
        await w.purger.handle(evict("data/a"))
        assert w.purger.outcomes == {"not-cached": 1}
        assert w.cache.lookup("data/a") is None

    run(body, tmp_path)
