"""A copy whose length disagrees with the size it is committed with is refused alone: the cache stays available.
Before: the mismatch was raised as EIO, read as a failing disk, and the whole cache went unavailable (seen by the
torture test after a chmod adopted a new ETag with an old size: "cache file has 1048576 bytes, expected 12")."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from hybridfs.tiers.cache import LocalCache


@pytest.mark.allow_log(r"cache: not storing k/a: the file has 10 bytes, its version e1 has 12; the copy is dropped")
def test_a_copy_of_the_wrong_length_is_dropped_and_the_cache_stays_in_use(tmp_path: Path) -> None:
    async def main() -> None:
        cache = LocalCache(tmp_path / "cache", 1 << 30)
        await cache.open()
        try:
            temp = cache.new_temp_path()
            temp.write_bytes(b"0123456789")
            assert not await cache.commit(temp, "k/a", "e1", 12)
            assert not temp.exists(), "the refused copy is not left behind"
            assert cache.available, "one wrong copy is not a failing disk"
            assert cache.lookup("k/a") is None
            good = cache.new_temp_path()
            good.write_bytes(b"x" * 12)
            assert await cache.commit(good, "k/b", "e2", 12)
            assert cache.lookup("k/b", "e2") is not None
        finally:
            cache.close()

    trio.run(main)
