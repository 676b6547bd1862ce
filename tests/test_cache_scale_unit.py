"""Issue 23, "Cache scans on the trio thread": with a million cached entries, the lookup of a missing name
(``Namespace._cached_stat`` -> ``LocalCache.has_below``) and the eviction planner's tick (the growth watch's
``wake_if_over`` every 20 ms, and a round: ``usage()``, ``plan()``) each take well under 1 ms of loop time.

Before: ``has_below`` scanned every key (~100 ms at 1 M), ``usage()`` summed every entry and ``coldest`` sorted
them all. Index rows are enough here: the entries are set in memory, as an open of such a cache would.
Run with ``-s`` to see the figures; the bound asserted is generous (1 ms), the figures are far below it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.abc

from hybridfs.core.attrs import Defaults
from hybridfs.core.namespace import Namespace
from hybridfs.core.paths import KeyMapper
from hybridfs.services.planner import Planner, PlannerSettings
from hybridfs.tiers.cache import CacheEntry, LocalCache

N = 1_000_000
DIRS = 1000
SIZE = 1000
BOUND = 1e-3  # seconds of loop time per operation
EPOCH = 1_700_000_000.0


class LoopTime(trio.abc.Instrument):
    """Seconds the trio thread spent running task steps (what stalls every other request). CPU time of the
    thread: on a shared machine, wall time would also count the moments other processes had the core."""

    def __init__(self) -> None:
        self.busy = 0.0
        self._started: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is not None:  # the step that added the instrument began before it could be timed
            self.busy += time.thread_time() - self._started
        self._started = None


def worst(fn: Callable[[], object], times: int = 200) -> float:
    """The slowest of ``times`` calls of a synchronous step (all of it is loop time), in thread CPU seconds."""
    slowest = 0.0
    for _ in range(times):
        start = time.thread_time()
        fn()
        slowest = max(slowest, time.thread_time() - start)
    return slowest


def entries(n: int) -> Iterator[CacheEntry]:
    return (CacheEntry(f"data/d{i % DIRS}/f{i}", "e", SIZE, EPOCH + i) for i in range(n))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCache]:
    cache = LocalCache(tmp_path_factory.mktemp("cache"), capacity=N * SIZE * 2)
    trio.run(cache.open)
    for entry in entries(N):  # as commits add them (oldest first)
        cache.entries[entry.key] = entry
    yield cache
    cache.close()


def test_a_missing_name_is_looked_up_without_a_scan(big: LocalCache) -> None:
    ns = Namespace(None, KeyMapper("data"), Defaults(uid=0, gid=0))  # type: ignore[arg-type]  # no S3 asked
    ns.cache = big
    assert ns._cached_stat("d7") is not None  # a directory with cached files below it exists
    missing_file = worst(lambda: ns._cached_stat("d7/nothing-here"))
    missing_dir = worst(lambda: ns._cached_stat("nothing-here"))
    print(f"\n{N} entries: _cached_stat of a missing file {missing_file * 1e6:.1f} us, of a missing directory "
          f"{missing_dir * 1e6:.1f} us (worst of 200)")
    assert ns._cached_stat("d7/nothing-here") is None and ns._cached_stat("nothing-here") is None
    assert missing_file < BOUND and missing_dir < BOUND


@pytest.mark.parametrize("max_age", [0.0, 3600.0], ids=["no-max-age", "max-age"])
def test_the_planner_ticks_without_a_scan(big: LocalCache, max_age: float) -> None:
    # With a max age, the clock makes exactly the 100 oldest entries due.
    planner = Planner(big, PlannerSettings(max_age=max_age), None, "host:/mnt", lambda key: False,
                      clock=lambda: EPOCH + 100 + max_age)
    assert big.usage() == N * SIZE
    growth = worst(planner.wake_if_over)
    plan = worst(planner.plan, times=20)
    result = planner.plan()
    assert result.watermark == [] and len(result.max_age) == (100 if max_age else 0)
    loop = LoopTime()

    first = LoopTime()

    async def rounds() -> None:
        trio.lowlevel.add_instrument(first)  # publishes the 100 max-age evictions: work per eviction, not a scan
        await planner.round()
        trio.lowlevel.remove_instrument(first)
        trio.lowlevel.add_instrument(loop)
        for _ in range(20):
            await planner.round()
        trio.lowlevel.remove_instrument(loop)

    trio.run(rounds)
    print(f"\n{N} entries, max-age {max_age:g}: growth check {growth * 1e6:.1f} us, plan() {plan * 1e6:.1f} us "
          f"(worst), a round {loop.busy / 20 * 1e6:.1f} us of loop time (mean of 20; the first "
          f"{first.busy * 1e6:.0f} us)")
    assert growth < BOUND and plan < BOUND and loop.busy / 20 < BOUND


def test_the_planner_under_pressure_takes_only_what_it_needs(big: LocalCache) -> None:
    """Just over the high watermark, evicting down to just under it: the coldest few are found without sorting
    a million entries."""
    settings = PlannerSettings(high_watermark=0.9, low_watermark=0.89999)
    planner = Planner(big, settings, None, "host:/mnt", lambda key: False)
    capacity = big.capacity
    try:
        big.capacity = int(big.usage() / 0.90001)
        taken = worst(planner.plan, times=20)
        plan = planner.plan()
        low = settings.low_watermark * big.capacity
    finally:
        big.capacity = capacity
    assert 0 < len(plan.watermark) < 100 and big.usage() - sum(e.size for e in plan.watermark) <= low
    assert [e.key for e in plan.watermark[:3]] == ["data/d0/f0", "data/d1/f1", "data/d2/f2"]  # coldest first
    print(f"\n{N} entries over the high watermark: plan() {taken * 1e6:.1f} us for {len(plan.watermark)} "
          "evictions (worst of 20)")
    assert taken < BOUND


def test_the_table_keeps_its_figures_through_every_change() -> None:
    from hybridfs.tiers.cache import EntryTable  # imported here: the measurements above also run on main's code

    table = EntryTable([CacheEntry("a/b/c", "1", 10, 5.0), CacheEntry("a/d", "1", 20, 1.0)])
    assert table.bytes == 30 and table.has_below("a/") and table.has_below("a/b/") and not table.has_below("b/")
    assert [e.key for e in table.coldest()] == ["a/d", "a/b/c"]
    table["a/b/c"] = CacheEntry("a/b/c", "2", 15, 6.0)  # a new version: replaces, size and order follow
    table["x"] = CacheEntry("x", "1", 1, 0.5)  # older than the newest: one sort at the next use
    assert table.bytes == 36 and [e.key for e in table.coldest()] == ["x", "a/d", "a/b/c"]
    assert table.pop("a/b/c").size == 15 and table.pop("a/b/c", None) is None
    assert not table.has_below("a/b/") and table.has_below("a/") and table.bytes == 21
    del table["a/d"]
    assert not table.has_below("a/") and table.has_below("") and table.has_below("x")
    table.clear()
    assert table == {} and table.bytes == 0 and not table.has_below("") and list(table.coldest()) == []


def test_a_table_loaded_at_once_equals_one_built_entry_by_entry() -> None:
    from hybridfs.tiers.cache import EntryTable

    rng = random.Random(23)
    names = ["a/", "a/b/", "c/", "", "a/b/d/"]
    made = [CacheEntry(f"{rng.choice(names)}f{i}", "e", rng.randrange(100), rng.random()) for i in range(2000)]
    loaded, built = EntryTable(made), EntryTable()
    for entry in made:
        built[entry.key] = entry
    for table in (loaded, built):
        for entry in made[::3]:
            del table[entry.key]
        for prefix in [*names, "a", "b/", "zz/"]:
            assert table.has_below(prefix) == any(k.startswith(prefix) for k in table), prefix
    assert loaded == built and loaded.bytes == built.bytes == sum(e.size for e in loaded.values())
    assert loaded._below == built._below
    assert list(loaded.coldest()) == list(built.coldest()) == sorted(loaded.values(), key=lambda e: e.last_access)
