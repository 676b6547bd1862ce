"""One lock per key, held only while someone holds or waits for it (so the table never grows without bound).

Used by the event consumer (two events for one object key never run at once) and by the hydrator and purger
(a hydration and a purge of the same object never interleave).
"""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

K = TypeVar("K")


class KeyLocks(Generic[K]):
    def __init__(self) -> None:
        self._locks: dict[K, tuple[trio.Lock, int]] = {}

    def held(self, key: K) -> bool:
        """Someone holds or waits for ``key``."""
        return key in self._locks

    def __call__(self, key: K) -> _Held[K]:
        """``async with locks(key):`` — exclusive use of ``key``."""
        return _Held(self._locks, key)


class _Held(Generic[K]):
    def __init__(self, table: dict[K, tuple[trio.Lock, int]], key: K) -> None:
        self._table = table
        self._key = key

    async def __aenter__(self) -> None:
        lock, users = self._table.get(self._key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._table[self._key] = (lock, users + 1)
        self._lock = lock
        try:
            await lock.acquire()
        except BaseException:
            self._release_entry()
            raise

    def _release_entry(self) -> None:
        lock, users = self._table[self._key]
        if users <= 1:
            del self._table[self._key]
        else:
            self._table[self._key] = (lock, users - 1)

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()
        self._release_entry()
