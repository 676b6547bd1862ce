"""Issue 21, item 5, without a kernel: a removal from the cache (an unlink, a rename) outlives the hydrations that
started before it. The hydrator's S3 answer is held until the test has removed the key, then released; the
download must not put the key back in the cache, and an eviction afterwards must preserve nothing.

Before the fix ``LocalCache.remove`` forgot the key's generation as soon as nothing was *committing*, so a
download already under way committed afterwards: the deleted file was cached again, and its eviction uploaded it
to ``.hybridfs/preserved/`` ("S3 no longer holds it (deleted elsewhere)").
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from test_services_unit import PREFIX, World, evict, hydrate, run

from hybridfs.services.purger import PRESERVED_DIR
from hybridfs.tiers.cache import TeeFile


@contextlib.contextmanager
def downloads_held(w: World, seq: trio.testing.Sequencer) -> Iterator[None]:
    """S3 answers the hydrator's GET (or parallel download) at once, but the answer reaches it only at step 2 of
    ``seq``: the bytes are on their way while the test removes the key (the proxy's "late" action)."""
    get_range, download_file = w.store.get_range, w.store.download_file

    async def late_get(key: str, start: int, length: int, etag: str | None) -> bytes:
        data = await get_range(key, start, length, etag)
        async with seq(0):
            pass
        async with seq(2):
            return data

    async def late_download(key: str, etag: str, path: str) -> None:
        await download_file(key, etag, path)
        async with seq(0):
            pass
        async with seq(2):
            pass

    w.store.get_range = late_get  # type: ignore[method-assign]
    w.store.download_file = late_download  # type: ignore[method-assign]
    try:
        yield
    finally:
        w.store.get_range, w.store.download_file = get_range, download_file  # type: ignore[method-assign]


async def race(w: World, key: str, remove: Callable[[], Awaitable[None]]) -> None:
    """Hydrate ``key`` and run ``remove`` (what an unlink or rename does) while the download's answer is held."""
    etag = w.store.put_object(key, b"the bytes of a file about to be deleted")
    seq = trio.testing.Sequencer()
    with downloads_held(w, seq):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.hydrator.handle, hydrate(key, etag, 39))
            async with seq(1):  # the answer is held: the download started before the removal
                await remove()


def preserved(w: World) -> list[str]:
    return [k for k in w.store.objects if k.startswith(f"{PREFIX}{PRESERVED_DIR}/")]


@pytest.mark.parametrize("small_object", [8 * 1024**2, 0], ids=["one-get", "download"])
@pytest.mark.parametrize("cached_before", [False, True], ids=["cold", "older-version-cached"])
def test_unlink_during_a_hydration_keeps_the_file_out_of_the_cache(tmp_path: Path, small_object: int,
                                                                   cached_before: bool) -> None:
    async def body(w: World) -> None:
        if cached_before:  # remove() then has an entry to unlink (awaits) as well
            await w.cached("data/a", b"an older version")

        async def unlink() -> None:  # Filesystem.unlink: DELETE in S3, then the cache
            await w.store.delete("data/a")
            await w.cache.remove("data/a")

        await race(w, "data/a", unlink)
        assert w.cache.lookup("data/a") is None, "the deleted file came back into the cache"
        assert w.hydrator.outcomes == {"removed": 1}
        await w.purger.handle(evict("data/a"))
        assert preserved(w) == [], "an eviction preserved a file deleted through the mount"
        assert "data/a" not in w.store.objects
        assert not list((w.cache.root / "tmp").iterdir()), "the downloaded temp file was left behind"
        assert not list((w.cache.root / "objects").rglob("*.*")) and w.cache.entries == {}
        # Nothing is remembered once nothing is in flight: the per-key generations stay bounded.
        assert not w.cache._in_flight and not w.cache._generation
        # A hydration that starts after the removal is not refused.
        etag = w.store.put_object("data/a", b"written again")
        await w.hydrator.handle(hydrate("data/a", etag, 13))
        assert w.cached_bytes("data/a") == b"written again"

    run(body, tmp_path, small_object=small_object)


def test_rename_during_a_hydration_of_the_old_key_keeps_it_out_of_the_cache(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        async def rename() -> None:  # Filesystem._rename_file: COPY, DELETE, then the cache follows
            data, meta = w.store.objects["data/old"]
            w.store.put_object("data/new", data, meta)
            await w.store.delete("data/old")
            await w.cache.rename("data/old", "data/new")

        await race(w, "data/old", rename)
        assert w.cache.lookup("data/old") is None, "the renamed-away key came back into the cache"
        assert w.hydrator.outcomes == {"removed": 1}
        await w.purger.handle(evict("data/old"))
        assert preserved(w) == []
        assert not w.cache._in_flight and not w.cache._generation

    run(body, tmp_path)


def test_a_tee_committed_after_a_removal_of_its_key_loses(tmp_path: Path) -> None:
    """The same rule for a write's local copy, for a writer that takes its generation when the upload begins."""
    async def body(w: World) -> None:
        tee = TeeFile(w.cache)
        with w.cache.fetching("data/w") as since:
            await tee.write(0, b"uploaded while it was deleted")
            await w.cache.remove("data/w")  # an unlink while the PUT is in flight
            assert not await tee.commit("data/w", "etag", 29, since=since)
        assert w.cache.lookup("data/w") is None and tee.failed == "removed while it was uploaded"
        assert not list((w.cache.root / "tmp").iterdir()) and not w.cache._generation

    run(body, tmp_path)
