"""pytest-benchmark microbenchmarks of hot in-process paths: event encode/decode, cache index lookups, path/key
mapping.

They run with the normal test command, a few rounds each (well under a second in all). The numbers are for
reading (``pytest tests/test_bench_micro.py --benchmark-columns=min,median,ops``), never a pass/fail criterion;
what decides pass/fail is that each measured call returned the right result.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from pytest_benchmark.fixture import BenchmarkFixture

from hybridfs.core.paths import KeyMapper, child_path
from hybridfs.events.schema import Event, decode, encode
from hybridfs.tiers.cache import LocalCache

ROUNDS = {"min_rounds": 5, "max_time": 0.1, "warmup": False}
PREFIX = "bench/prefix"
ENTRIES = 1000

Filled = tuple[LocalCache, list[tuple[str, str]]]


@pytest.mark.benchmark(group="events", **ROUNDS)
def test_event_encode(benchmark: BenchmarkFixture) -> None:
    event = Event.hydrate(f"{PREFIX}/photos/2024/img_0001.jpg", '"9b2cf535f27731c974343645a3985328"', 1048576,
                          "read-miss", "host1:/mnt/demo")
    raw = benchmark(encode, event)
    assert decode(raw, allowed_prefix=PREFIX) == event


@pytest.mark.benchmark(group="events", **ROUNDS)
def test_event_decode(benchmark: BenchmarkFixture) -> None:
    event = Event.evict(f"{PREFIX}/videos/take 3/ü-clip.mov", '"0f343b0931126a20f133d67c2b018a3b-4"', 5 * 1024**3,
                        "watermark", "host2:/srv/cache", pin=False, bucket="studio")
    raw = encode(event)
    decoded = benchmark(decode, raw, allowed_prefix=PREFIX)
    assert decoded == event


def _fill(cache: LocalCache, count: int) -> list[tuple[str, str]]:
    async def fill() -> list[tuple[str, str]]:
        await cache.open()
        assert cache.available, cache.unavailable_reason
        items = []
        for i in range(count):
            key, etag = f"{PREFIX}/dir{i % 37}/file-{i:05d}.bin", f'"{i:032x}"'
            temp = cache.new_temp_path()
            temp.write_bytes(b"x" * (i % 7))
            assert await cache.commit(temp, key, etag, i % 7)
            items.append((key, etag))
        return items

    return trio.run(fill)


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    cache = LocalCache(tmp_path_factory.mktemp("micro-cache"), capacity=1024**3, threads=2)
    items = _fill(cache, ENTRIES)
    yield cache, items
    cache.close()


@pytest.mark.benchmark(group="cache-index", **ROUNDS)
def test_cache_lookup_hits(benchmark: BenchmarkFixture, filled_cache: Filled) -> None:
    cache, items = filled_cache

    def lookup_all() -> int:
        return sum(1 for key, etag in items if cache.lookup(key, etag) is not None)

    assert benchmark(lookup_all) == ENTRIES
    entry = cache.lookup(*items[3])
    assert entry is not None and entry.size == 3 and entry.etag == items[3][1]


@pytest.mark.benchmark(group="cache-index", **ROUNDS)
def test_cache_lookup_misses(benchmark: BenchmarkFixture, filled_cache: Filled) -> None:
    cache, items = filled_cache
    stale = [(key, '"stale"') for key, _ in items[: ENTRIES // 2]] + [
        (f"{PREFIX}/absent/{i}", None) for i in range(ENTRIES // 2)]

    def lookup_all() -> int:
        return sum(1 for key, etag in stale if cache.lookup(key, etag) is None)

    assert benchmark(lookup_all) == ENTRIES


@pytest.mark.benchmark(group="cache-index", **ROUNDS)
def test_cache_data_path(benchmark: BenchmarkFixture, filled_cache: Filled) -> None:
    cache, items = filled_cache
    key, etag = items[5]
    path = benchmark(cache.data_path, key, etag)
    assert path.is_file() and path.stat().st_size == 5
    assert Path(os.path.commonpath([path, cache.root])) == cache.root


PATHS = [f"projects/show-{i % 13}/shot_{i:04d}/render/frame.{i:06d}.exr" for i in range(ENTRIES)]


@pytest.mark.benchmark(group="paths", **ROUNDS)
def test_keymapper_round_trip(benchmark: BenchmarkFixture) -> None:
    mapper = KeyMapper(PREFIX + "/")

    def round_trip() -> list[str | None]:
        return [mapper.path(mapper.key(p)) for p in PATHS]

    assert benchmark(round_trip) == PATHS
    assert mapper.key("a/b") == f"{PREFIX}/a/b"
    assert mapper.dir_prefix("a") == f"{PREFIX}/a/"
    assert mapper.path("elsewhere/a") is None


@pytest.mark.benchmark(group="paths", **ROUNDS)
def test_child_path(benchmark: BenchmarkFixture) -> None:
    names = [p.rpartition("/")[2].encode() for p in PATHS]
    parents = [p.rpartition("/")[0] for p in PATHS]

    def join_all() -> list[str]:
        return [child_path(parent, name) for parent, name in zip(parents, names, strict=True)]

    assert benchmark(join_all) == PATHS
