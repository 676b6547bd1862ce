"""Issue 23: a purge forgets the hydrate requests of its key without walking every request remembered (up to
100,000, on the trio thread, at every purge). Core level against the real MinIO, no kernel: the dedupe still
raises one hydrate event per version, and again once the cached copy went away."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from test_core import ROOT, RecordingHydration, run_fs

from hybridfs.core.filesystem import Filesystem


def test_a_purge_forgets_its_keys_requests_at_once(stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    key = f"{prefix}/x"
    s3.put_object(Bucket=stack.bucket, Key=key, Body=b"0123456789")

    async def miss(fs: Filesystem, ino: int) -> None:
        fh, _ = await fs.open(ino, 0)
        assert await fs.read(fh, 0, 4) == b"0123"
        await fs.release(fh)

    async def body(fs: Filesystem, hydration: RecordingHydration) -> None:
        for i in range(100_000):  # other keys asked within the dedupe window
            fs.ask_hydration(f"{prefix}/other/{i}", "e", 1, "read-miss")
        hydration.requests.clear()
        node, _ = await fs.lookup(ROOT, b"x")
        await miss(fs, node.ino)
        await miss(fs, node.ino)
        assert [r[0] for r in hydration.requests] == [key], "one request per version"
        start = time.thread_time()
        await fs.forget_kernel_cache(key)  # what the purger calls after evicting it
        took = time.thread_time() - start
        await miss(fs, node.ino)
        assert [r[0] for r in hydration.requests] == [key, key], "a miss after the purge asks again"
        fs.ask_hydration(key, "another-version", 10, "read-miss")
        fs.ask_hydration(key, "another-version", 10, "read-miss")
        assert len(hydration.requests) == 3, "a new version is asked for once"
        print(f"\nforget_kernel_cache with 100,000 requests remembered: {took * 1e6:.0f} us of loop time")
        assert took < 1e-3

    run_fs(stack, prefix, tmp_path, body)
