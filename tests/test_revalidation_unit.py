"""The namespace without a kernel or S3: a revalidation that S3 does not answer within REVALIDATE_WITHIN serves the
last known attributes, but they are never stored as S3's answer (issue 22). The HEAD goes on; its answer is kept
when it lands unless the path changed meanwhile; the stat right after a fallback does not wait again, and one
past FALLBACK_STANDS asks S3 again."""

from __future__ import annotations

import time

import trio
import trio.testing

from hybridfs.core.attrs import Defaults, Stat, stat_from_object
from hybridfs.core.namespace import FALLBACK_STANDS, REVALIDATE_WITHIN, Namespace
from hybridfs.core.paths import KeyMapper
from hybridfs.tiers.s3 import ObjectInfo

DEFAULTS = Defaults(uid=0, gid=0)


def version(size: int, etag: str) -> ObjectInfo:
    return ObjectInfo("p/f", size, etag, 0, {})


class HeldStore:
    """One object whose HEADs S3 answers only when the test releases them, with what it holds then."""

    def __init__(self, info: ObjectInfo) -> None:
        self.info = info
        self.asks = 0
        self.release = trio.Event()

    async def head(self, key: str) -> ObjectInfo | None:
        self.asks += 1
        await self.release.wait()
        return self.info if key == self.info.key else None

    async def first_keys(self, prefix: str, limit: int = 2) -> list[str]:
        return []


def known_namespace(store: HeldStore, nursery: trio.Nursery) -> Namespace:
    """A namespace that knows f as v1 (an answer that has expired) and runs revalidations in ``nursery``."""
    ns = Namespace(store, KeyMapper("p"), DEFAULTS, dir_cache_time=60)  # type: ignore[arg-type]
    ns.spawner = nursery
    ns.remember("f", stat_from_object(version(3, "v1"), DEFAULTS))
    ns.stats.pop("f")  # expired: the next stat asks S3
    return ns


async def timed_stat(ns: Namespace, max_age: float | None = None) -> tuple[Stat, float]:
    start = time.monotonic()
    st = await ns.stat("f", max_age=max_age)
    return st, time.monotonic() - start


def test_a_fallback_is_not_an_answer_and_the_late_answer_is_kept() -> None:
    async def main() -> None:
        store = HeldStore(version(11, "v2"))  # S3 holds v2 (a foreign overwrite); the mount knows v1
        async with trio.open_nursery() as nursery:
            ns = known_namespace(store, nursery)
            st, took = await timed_stat(ns)
            assert st.etag == "v1" and took >= REVALIDATE_WITHIN * 0.9 and ns.slow_revalidations == 1
            assert ns.stats.get("f") is None, "the fallback was stored as S3's answer"
            st, took = await timed_stat(ns, max_age=0.2)  # the open right after the stat: no second wait
            assert st.etag == "v1" and took < REVALIDATE_WITHIN / 2 and store.asks == 1
            store.release.set()
            await trio.testing.wait_all_tasks_blocked()
            cached = ns.stats.get("f")
            assert cached is not None and cached.stat.etag == "v2", "S3's late answer was not kept"
            st, took = await timed_stat(ns)
            assert st.etag == "v2" and took < REVALIDATE_WITHIN / 2
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_late_answer_older_than_a_change_is_dropped_and_s3_asked_again() -> None:
    async def main() -> None:
        store = HeldStore(version(3, "v1"))
        async with trio.open_nursery() as nursery:
            ns = known_namespace(store, nursery)
            st, _ = await timed_stat(ns)
            assert st.etag == "v1" and store.asks == 1
            ns.invalidate("f")  # a change to f arrives (a record of a foreign write) while the HEAD is out
            store.info = version(11, "v2")
            # The change ends the fallback's stand: this stat asks S3 again rather than share the older HEAD.
            with trio.move_on_after(REVALIDATE_WITHIN * 2):
                await ns.stat("f")
            assert store.asks == 2
            store.release.set()
            await trio.testing.wait_all_tasks_blocked()
            cached = ns.stats.get("f")
            assert cached is not None and cached.stat.etag == "v2" and ns.stale_answers == 1
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_past_the_stand_a_revalidation_asks_s3_again() -> None:
    async def main() -> None:
        store = HeldStore(version(3, "v1"))
        async with trio.open_nursery() as nursery:
            ns = known_namespace(store, nursery)
            await ns.stat("f")
            assert store.asks == 1
            await trio.sleep(FALLBACK_STANDS + 0.1)  # the point of the test: the stand runs out (not a sync)
            st, took = await timed_stat(ns, max_age=FALLBACK_STANDS)  # an open: the HEAD under way is too old
            assert st.etag == "v1" and took >= REVALIDATE_WITHIN * 0.9 and store.asks == 2
            assert ns.slow_revalidations == 2
            nursery.cancel_scope.cancel()

    trio.run(main)
