"""One memory budget for the mount's data buffers: read-ahead chunks (CloudReader) and write buffers.

A buffer is charged before it is filled and released when it is dropped. When the budget is spent, a caller
that needs memory waits (back-pressure, first come first served) instead of failing; read-ahead, which only
speculates, asks with :meth:`MemoryBudget.try_acquire` and is skipped instead of waiting.

A single request larger than the whole budget is clamped to the budget (it then waits until everything else is
released and runs alone), so no request can wait forever.

State belongs to the trio thread: call it only from there (worker threads never touch it).

Use::

    async with budget.reserve(nbytes):     # held for the block
        ...
    granted = await budget.acquire(nbytes)  # held until budget.release(granted)
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import trio

log = logging.getLogger("hybridfs.budget")

class Reclaimer(Protocol):
    """Something holding memory it can give back on demand (a reader's fetched, idle chunks)."""

    def give_back(self, nbytes: int) -> int: ...


class MemoryBudget:
    def __init__(self, total: int) -> None:
        if total <= 0:
            raise ValueError("a memory budget must be positive")
        self.total = total
        self.used = 0
        self.peak = 0
        self.waits = 0  # acquisitions that had to wait
        self.skipped = 0  # try_acquire calls refused (read-ahead not started)
        self._waiters: deque[tuple[int, trio.Event]] = deque()
        self._reclaimers: weakref.WeakSet[Reclaimer] = weakref.WeakSet()

    @property
    def free(self) -> int:
        return self.total - self.used

    @property
    def shortfall(self) -> int:
        """Bytes the waiters need beyond what is free (0: nobody waits)."""
        return max(0, sum(n for n, _ in self._waiters) - self.free) if self._waiters else 0

    def _clamp(self, nbytes: int) -> int:
        return max(0, min(nbytes, self.total))

    def try_acquire(self, nbytes: int) -> int | None:
        """Charge ``nbytes`` now if they fit and nobody waits ahead; returns what was charged, or None."""
        n = self._clamp(nbytes)
        if self._waiters or n > self.free:
            self.skipped += 1
            return None
        self._charge(n)
        return n

    async def acquire(self, nbytes: int) -> int:
        """Charge ``nbytes`` (clamped to the budget), waiting until they fit; returns what was charged (give
        exactly that to :meth:`release`). Cancellation while waiting charges nothing."""
        n = self._clamp(nbytes)
        if not self._waiters and n <= self.free:
            self._charge(n)
            return n
        self.waits += 1
        ticket = (n, trio.Event())
        self._waiters.append(ticket)
        try:
            await ticket[1].wait()
        except BaseException:
            if ticket[1].is_set():  # granted just as we were cancelled: hand it back
                self.release(n)
            else:
                self._waiters.remove(ticket)
                self._grant()  # we may have been the head of the queue, blocking smaller requests
            raise
        return n

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)
        self._grant()

    @asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[int]:
        granted = await self.acquire(nbytes)
        try:
            yield granted
        finally:
            self.release(granted)

    def add_reclaimer(self, holder: Reclaimer) -> None:
        self._reclaimers.add(holder)

    def remove_reclaimer(self, holder: Reclaimer) -> None:
        self._reclaimers.discard(holder)

    def reclaim(self, nbytes: int) -> int:
        """Ask the holders of idle memory to give back ``nbytes`` (before a caller waits); returns the bytes."""
        freed = 0
        for holder in list(self._reclaimers):
            if freed >= nbytes:
                break
            freed += holder.give_back(nbytes - freed)
        return freed

    def _charge(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def _grant(self) -> None:
        """Wake waiters in order while the head of the queue fits (FIFO: a large request is not starved)."""
        while self._waiters and self._waiters[0][0] <= self.free:
            n, event = self._waiters.popleft()
            self._charge(n)
            event.set()

    def status(self) -> dict[str, int]:
        return {"total_bytes": self.total, "used_bytes": self.used, "peak_bytes": self.peak,
                "waiting": len(self._waiters), "waits": self.waits, "readahead_skipped": self.skipped}
