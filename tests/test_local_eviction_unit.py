"""Issue 12, item 5 on pure logic: the planner's decisions take effect without Kafka (events off, or the bus down
for ``local_after`` seconds), still published for audit when there is a bus."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_services_unit import MiB, World, run

from hybridfs.events.schema import Event


async def fill(w: World, count: int) -> None:
    for i in range(count):
        await w.cached(f"data/f{i}", bytes([i]) * MiB)
        w.cache.touch(f"data/f{i}")


def test_events_off_purges_locally(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        w.planner.publish = None
        w.planner.purge = w.purger.handle
        await fill(w, 10)  # 10 MiB in a 10 MiB cache: over the high watermark
        async with trio.open_nursery() as nursery:
            await nursery.start(w.planner.run)
            with trio.fail_after(30):
                while w.cache.usage() > 0.75 * w.cache.capacity:
                    await w.planner.wait_changed()  # woken by every purge
            nursery.cancel_scope.cancel()
        assert w.planner.status()["local"] is True and w.planner.local_purges >= 3
        assert w.purger.outcomes["evicted"] >= 3 and w.published == []

    run(body, tmp_path)


@pytest.mark.allow_log(r"Kafka unreachable for \d+s: purging the eviction planner's decisions locally")
def test_bus_down_for_long_purges_locally_and_still_publishes(tmp_path: Path) -> None:
    reachable: list[bool | None] = [False]

    async def body(w: World) -> None:
        w.planner.bus_reachable = lambda: reachable[0]
        w.planner.purge = w.purger.handle
        await fill(w, 10)
        async with trio.open_nursery() as nursery:
            await nursery.start(w.planner.run)
            await trio.sleep(5)  # within local_after: the evictions wait for the bus
            assert w.published and w.purger.outcomes["evicted"] == 0 and not w.planner.status()["local"]
            with trio.fail_after(30):
                while w.cache.usage() > 0.75 * w.cache.capacity:
                    await w.planner.wait_changed()  # woken by every purge
            assert w.planner.status()["local"] is True
            published = {e.key for e in w.published}
            assert {k for k in (f"data/f{i}" for i in range(10)) if w.cache.lookup(k) is None} <= published, \
                "every local purge was published too (audit)"
            reachable[0] = True
            await trio.sleep(2)
            assert w.planner.status()["local"] is False, "back to the bus once it answers"
            nursery.cancel_scope.cancel()

    run(body, tmp_path, local_after=10.0)


def test_a_purge_applied_twice_is_harmless(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.cached("data/a", b"x")
        event = Event.evict("data/a", w.cache.entries["data/a"].etag, 1, "watermark", "host:/mnt")
        await w.purger.handle(event)
        await w.purger.handle(event)  # the copy that Kafka delivers later
        assert w.purger.outcomes == {"evicted": 1, "not-cached": 1}

    run(body, tmp_path)
