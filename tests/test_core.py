"""The core without a kernel: Filesystem operations called directly, over the real MinIO, and pure logic."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from hybridfs.config import ConfigError, MountConfig, parse_size
from hybridfs.core.attrs import Defaults, metadata_for, stat_from_object
from hybridfs.core.filesystem import AttrChanges, Filesystem, FsSettings
from hybridfs.core.namespace import Namespace
from hybridfs.core.paths import KeyMapper, child_path
from hybridfs.core.reader import CloudReader, ReadSettings
from hybridfs.core.writer import WriteSettings, part_size_for
from hybridfs.errors import FsError
from hybridfs.tiers.cache import LocalCache
from hybridfs.tiers.s3 import CloudStore, ObjectInfo, S3Settings

ROOT = 1


class RecordingHydration:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, int, str]] = []

    def request_hydration(self, key: str, etag: str, size: int, reason: str) -> None:
        self.requests.append((key, etag, size, reason))


def run_fs(stack: Any, prefix: str, tmp_path: Path,
           body: Callable[[Filesystem, RecordingHydration], Awaitable[None]], **write: Any) -> None:
    async def main() -> None:
        store = CloudStore(S3Settings(bucket=stack.bucket, endpoint_url=stack.endpoint))
        cache = LocalCache(tmp_path / "cache", 1024**3)
        await cache.open()
        keys = KeyMapper(prefix)
        defaults = Defaults(uid=os.getuid(), gid=os.getgid())
        ns = Namespace(store, keys, defaults)
        settings = FsSettings(defaults=defaults, write=WriteSettings(spool_dir=tmp_path / "spool", **write),
                              read=ReadSettings(chunk_size=1024 * 1024))
        hydration = RecordingHydration()
        async with trio.open_nursery() as nursery:
            fs = Filesystem(store, cache, keys, ns, settings, nursery, hydration)
            await body(fs, hydration)
            nursery.cancel_scope.cancel()
        cache.close()

    trio.run(main)


def test_create_write_flush_read(stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    async def body(fs: Filesystem, hydration: RecordingHydration) -> None:
        fh, node, st = await fs.create(ROOT, b"f", 0o640, os.O_WRONLY, 0, 0)
        assert stat.S_IMODE(st.mode) == 0o640
        for offset in range(0, 12 * 1024 * 1024, 1024 * 1024):
            await fs.write(fh, offset, bytes([offset // 1024 // 1024]) * 1024 * 1024)
        await fs.flush(fh)
        await fs.release(fh)
        head = s3.head_object(Bucket=stack.bucket, Key=f"{prefix}/f")
        assert head["ContentLength"] == 12 * 1024 * 1024
        assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB parts: streamed, not staged
        fh, keep = await fs.open(node.ino, os.O_RDONLY)
        assert not keep  # the kernel never saw this version
        assert await fs.read(fh, 5 * 1024 * 1024, 3) == b"\x05\x05\x05"
        await fs.release(fh)
        fh, keep = await fs.open(node.ino, os.O_RDONLY)
        assert keep  # same ETag as the kernel's pages
        await fs.release(fh)
        assert fs.reads_from_cache == 1 and hydration.requests == []

    run_fs(stack, prefix, tmp_path, body, part_size=5 * 1024 * 1024)


def test_miss_raises_one_hydrate_request(stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/x", Body=b"0123456789")

    async def body(fs: Filesystem, hydration: RecordingHydration) -> None:
        node, _ = await fs.lookup(ROOT, b"x")
        for _ in range(3):
            fh, _ = await fs.open(node.ino, os.O_RDONLY)
            assert await fs.read(fh, 2, 4) == b"2345"
            await fs.release(fh)
        assert [(r[0], r[3]) for r in hydration.requests] == [(f"{prefix}/x", "read-miss")]

    run_fs(stack, prefix, tmp_path, body)


def test_errors_are_errnos(stack: Any, prefix: str, tmp_path: Path) -> None:
    async def body(fs: Filesystem, hydration: RecordingHydration) -> None:
        async def errno_of(coro: Awaitable[Any]) -> int:
            with pytest.raises(FsError) as err:
                await coro
            return err.value.errno

        assert await errno_of(fs.lookup(ROOT, b"missing")) == errno.ENOENT
        node, _ = await fs.mkdir(ROOT, b"d", 0o755, 0, 0)
        fh, _, _ = await fs.create(node.ino, b"f", 0o644, os.O_WRONLY, 0, 0)
        await fs.flush(fh)
        await fs.release(fh)
        assert await errno_of(fs.rmdir(ROOT, b"d")) == errno.ENOTEMPTY
        assert await errno_of(fs.mkdir(ROOT, b"d", 0o755, 0, 0)) == errno.EEXIST
        assert await errno_of(fs.unlink(ROOT, b"d")) == errno.EISDIR
        assert await errno_of(fs.lookup(ROOT, b"n" * 256)) == errno.ENAMETOOLONG
        assert await errno_of(fs.rename(ROOT, b"d", node.ino, b"inside", 0)) == errno.EINVAL
        changed = await fs.setattr(node.ino, AttrChanges(mode=0o700))
        assert stat.S_IMODE(changed.mode) == 0o700 and stat.S_ISDIR(changed.mode)

    run_fs(stack, prefix, tmp_path, body)


class FakeStore:
    """In-memory object client with ETags and call counts, for the read-ahead logic."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []

    async def get_range(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        self.calls.append((start, length))
        await trio.lowlevel.checkpoint()
        return self.data[start:start + length]


def test_readahead_widens_for_sequential_and_stays_narrow_for_random() -> None:
    data = os.urandom(40 * 1024)

    async def main() -> None:
        store = FakeStore(data)
        async with trio.open_nursery() as nursery:
            reader = CloudReader(store, "k", "e", len(data), ReadSettings(chunk_size=1024, max_readahead=4),
                                 nursery)  # type: ignore[arg-type]
            got = b"".join([await reader.read(off, 1024) for off in range(0, 8 * 1024, 1024)])
            assert got == data[:8 * 1024]
            await trio.testing.wait_all_tasks_blocked()
            assert len(store.calls) > 8  # fetched ahead of the reader
            store.calls.clear()
            assert await reader.read(30 * 1024 + 7, 10) == data[30 * 1024 + 7:30 * 1024 + 17]
            await trio.testing.wait_all_tasks_blocked()
            assert store.calls == [(30 * 1024, 1024)]  # a random read fetches only its chunk
            assert await reader.read(len(data), 10) == b""

    trio.run(main)


def test_key_mapping_and_names() -> None:
    keys = KeyMapper("/pre/fix/")
    assert keys.key("a/b") == "pre/fix/a/b"
    assert keys.dir_prefix("a") == "pre/fix/a/"
    assert keys.dir_prefix("") == "pre/fix/"
    assert keys.path("pre/fix/a/b") == "a/b"
    assert keys.path("other/a") is None
    assert child_path("", b"x") == "x" and child_path("d", b"x") == "d/x"
    for bad in (b".", b"..", b"", b"\xff"):
        with pytest.raises(FsError):
            child_path("", bad)


def test_metadata_round_trip_and_foreign_objects() -> None:
    defaults = Defaults(uid=7, gid=8)
    foreign = stat_from_object(ObjectInfo("k", 5, "e", 1_000_000_000, {}), defaults)  # HEAD, no metadata
    assert (foreign.mode, foreign.uid, foreign.gid, foreign.complete) == (stat.S_IFREG | 0o644, 7, 8, True)
    st = foreign.with_(mode=stat.S_IFREG | 0o600, uid=1, mtime_ns=5_000_000_000)
    again = stat_from_object(ObjectInfo("k", 5, "e", 0, metadata_for(st)), defaults)
    assert (again.mode, again.uid, again.mtime_ns) == (stat.S_IFREG | 0o600, 1, 5_000_000_000)
    listed = stat_from_object(ObjectInfo("k", 5, "e", 0, None), defaults)
    assert not listed.complete


def test_sizes_parts_and_config_errors() -> None:
    assert parse_size("512M") == 512 * 1024**2 and parse_size("1.5G") == 1536 * 1024**2
    assert parse_size("4096") == 4096 and parse_size("10GiB") == 10 * 1024**3
    with pytest.raises(ConfigError, match="cache_size = 'lots'"):
        parse_size("lots", "cache_size")
    assert part_size_for(1, 8) == 8 and part_size_for(1000, 8) == 8 and part_size_for(1001, 8) == 16
    cfg = MountConfig(source="s3://bucket/p", mountpoint="/m", cache_dir="/c", no_events=True,
                      low_watermark=0.95)
    with pytest.raises(ConfigError, match=r"low_watermark = 0\.95"):
        cfg.validate()


class LateStore:
    """A bucket of one object whose HEAD and LIST S3 answers at once and that reach the caller when the test
    releases them: by then the object may have changed (the answer is on its way, like a slow network's)."""

    def __init__(self, key: str, info: ObjectInfo) -> None:
        self.key, self.info = key, info
        self.asks = 0
        self.both_asked = trio.Event()
        self.release = trio.Event()

    async def _late(self, answer: Any) -> Any:
        self.asks += 1
        if self.asks == 2:
            self.both_asked.set()
        await self.release.wait()
        return answer

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._late(self.info if key == self.key else None)

    async def first_keys(self, prefix: str, limit: int = 2) -> list[str]:
        return []

    async def list_dir(self, prefix: str, on_page: Any = None) -> Any:
        from hybridfs.tiers.s3 import Listing

        return await self._late(Listing(files=[ObjectInfo(self.key, 3, "v1", 0)], subdirs=[]))


@pytest.mark.parametrize("change", ["remember", "forget", "invalidate"])
def test_an_answer_older_than_a_change_is_not_kept(change: str) -> None:
    """A HEAD (or listing) that S3 answered before a change arrived (the feed's record of another mount's close,
    our own unlink) and that reaches the namespace after it: the caller that asked gets it, nobody after. Before,
    it was stored over the change, and while the feed is trusted nothing asked S3 again for --dir-cache-time."""
    keys = KeyMapper("p")
    v1 = ObjectInfo("p/f", 3, "v1", 0, {})
    v2 = stat_from_object(ObjectInfo("p/f", 11, "v2", 0, {}), Defaults(uid=0, gid=0))

    async def main() -> None:
        store = LateStore("p/f", v1)
        ns = Namespace(store, keys, Defaults(uid=0, gid=0), dir_cache_time=60)  # type: ignore[arg-type]
        answers: dict[str, Any] = {}

        async def stat() -> None:
            answers["stat"] = (await ns.stat("f")).size

        async def listing() -> None:
            answers["list"] = {name: st.size for name, st in (await ns.list("")).items()}

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stat)
                nursery.start_soon(listing)
                await store.both_asked.wait()  # both S3 requests answered, their answers on their way
                getattr(ns, change)(*(("f", v2) if change == "remember" else ("f",)))
                store.release.set()
        assert answers == {"stat": 3, "list": {"f": 3}}  # asked before the change: the old version is right
        after = ns.stats.get("f")
        if change == "remember":
            assert after is not None and after.stat.size == 11
        else:
            assert after is None or after.stat.size != 3
        assert ns.listings.get("") is None  # the listing was under way when f changed: not kept either
        assert ns.stale_answers >= 1 and ns._watched == {}

    trio.run(main)
