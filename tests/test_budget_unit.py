"""The memory budget and the cloud reader's bounded chunks, on pure logic (a fake store, trio's MockClock)."""

from __future__ import annotations

import trio
import trio.testing

from hybridfs.core.budget import MemoryBudget
from hybridfs.core.reader import CloudReader, ReadSettings

KiB = 1024


def test_budget_back_pressure_is_fifo_and_cancel_safe() -> None:
    async def main() -> None:
        budget = MemoryBudget(100)
        order: list[str] = []
        assert await budget.acquire(60) == 60 and budget.try_acquire(50) is None

        async def take(name: str, n: int) -> None:
            got = await budget.acquire(n)
            order.append(name)
            await trio.sleep(1)
            budget.release(got)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, "big", 80)
            await trio.sleep(0.1)
            nursery.start_soon(take, "small", 10)  # fits now, but waits behind "big" (no starvation)
            await trio.sleep(0.1)
            with trio.move_on_after(0.1):
                await budget.acquire(5)  # cancelled while waiting: charges nothing
            assert order == [] and budget.waits == 3
            budget.release(30)
            await trio.sleep(0.1)
            assert order == [], "40 free: 'small' fits but waits behind 'big' (FIFO, no starvation)"
            budget.release(30)
        assert sorted(order) == ["big", "small"] and budget.used == 0 and budget.peak == 90
        assert await budget.acquire(1000) == 100, "a request larger than the budget is clamped to it"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class FakeStore:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.gets = 0

    async def get_range(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        self.gets += 1
        await trio.sleep(0.01)
        return self.data[start:start + length]


def test_cloud_reader_keeps_few_chunks_backwards_and_forwards() -> None:
    chunk, count = 64 * KiB, 200
    data = bytes(range(256)) * (chunk * count // 256)

    async def main() -> None:
        budget = MemoryBudget(8 * chunk)
        store = FakeStore(data)
        async with trio.open_nursery() as nursery:
            reader = CloudReader(store, "k", "e", len(data), ReadSettings(chunk, 16, budget),  # type: ignore[arg-type]
                                 nursery)
            step = 16 * KiB
            for offset in range(len(data) - step, -1, -step):  # backwards
                assert await reader.read(offset, step) == data[offset:offset + step]
                assert len(reader.chunks) <= reader.keep and budget.used <= budget.total
            assert store.gets == count, "each chunk fetched once on the way down"
            for offset in range(0, len(data), step):  # forwards, read-ahead bounded by the budget
                assert await reader.read(offset, step) == data[offset:offset + step]
                assert budget.used <= budget.total
            reader.close()
            await trio.sleep(1)  # let read-ahead in flight land
            assert budget.used == 0, "everything given back after close"
        assert budget.peak <= budget.total

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_reader_waiting_for_memory_gets_what_an_idle_reader_holds() -> None:
    chunk = 64 * KiB
    data = bytes(range(256)) * (chunk * 8 // 256)

    async def main() -> None:
        budget = MemoryBudget(4 * chunk)
        async with trio.open_nursery() as nursery:
            settings = ReadSettings(chunk, 4, budget)
            idle = CloudReader(FakeStore(data), "a", "e", len(data), settings, nursery)  # type: ignore[arg-type]
            busy = CloudReader(FakeStore(data), "b", "e", len(data), settings, nursery)  # type: ignore[arg-type]
            for offset in range(0, 2 * chunk, 16 * KiB):  # sequential: its read-ahead takes the whole budget
                await idle.read(offset, 16 * KiB)
            assert budget.free < chunk, budget.status()  # its read-ahead is in flight, not reclaimable yet
            with trio.fail_after(5):  # the idle reader's chunks are given back as they land; no deadlock
                assert await busy.read(5 * chunk, 100) == data[5 * chunk:5 * chunk + 100]
            idle.close()
            busy.close()
            await trio.sleep(1)
            assert budget.used == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
