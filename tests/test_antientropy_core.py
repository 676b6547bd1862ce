"""The anti-entropy pass in the core, without a kernel, over the real MinIO (hybridfs/services/antientropy.py):
its listing is judged against what the mount holds, never against changes that arrived after it, and no pass runs
while the mount does not trust its metadata."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio
import trio.testing
from test_key_order import NoHydration, run_fs, version

from hybridfs.core.attrs import Defaults
from hybridfs.core.filesystem import Filesystem, FsSettings
from hybridfs.core.namespace import Namespace
from hybridfs.core.paths import KeyMapper
from hybridfs.core.reader import ReadSettings
from hybridfs.core.writer import WriteSettings
from hybridfs.services.antientropy import AntiEntropy
from hybridfs.tiers.cache import LocalCache
from hybridfs.tiers.s3 import CloudStore, Listing, S3Settings


def test_a_listing_overtaken_by_a_change_is_not_used(stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    """The pass's LIST is answered (version 1), then the mount learns of version 2 (its own commit, a record),
    then the answer reaches the pass: it must not invalidate version 2 on the word of the older listing."""
    async def body(fs: Filesystem) -> None:
        key = f"{prefix}/d/x"
        v1 = await version(fs, s3, stack.bucket, key, b"one")
        fs.ns.remember("d/x", v1)
        answered, release = trio.Event(), trio.Event()
        real_list = fs.store.list_dir

        async def held_list(dir_prefix: str) -> Listing:  # S3's answer, held back on its way to the pass
            listing = await real_list(dir_prefix)
            answered.set()
            await release.wait()
            return listing

        fs.store.list_dir = held_list  # type: ignore[method-assign,assignment]
        pass_ = AntiEntropy(fs, max_stale=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pass_.one_pass)
            await answered.wait()
            v2 = await version(fs, s3, stack.bucket, key, b"two, stored after the listing")
            fs.ns.remember("d/x", v2)  # what a commit of this mount or a record from the feed does
            release.set()
        cached = fs.ns.stats.get("d/x")
        assert cached is not None and cached.stat.etag == v2.etag, "the older listing undid a newer change"
        assert pass_.overtaken >= 1 and pass_.invalidated == 0, pass_.status()

        # The next pass lists again, after the change: nothing differs.
        fs.store.list_dir = real_list  # type: ignore[method-assign,assignment]
        assert await pass_.one_pass() == 0

        # A version the mount missed (boto3, no record): found and invalidated.
        await version(fs, s3, stack.bucket, key, b"three, never told")
        assert await pass_.one_pass() == 1
        assert fs.ns.stats.get("d/x") is None and "d/x" not in fs.ns.standing

    run_fs(stack, prefix, tmp_path, body)


def test_no_pass_runs_while_the_metadata_is_not_trusted(stack: Any, prefix: str, tmp_path: Path) -> None:
    """Outside trusted mode the timers bound what the mount serves: no LIST is spent on it; nor while every timer
    is within --max-stale and no attributes stand. (Mock clock.)"""
    async def main() -> None:
        store = CloudStore(S3Settings(bucket=stack.bucket, endpoint_url=stack.endpoint))
        cache = LocalCache(tmp_path / "cache", 1024**3)
        keys, defaults = KeyMapper(prefix), Defaults(uid=os.getuid(), gid=os.getgid())
        ns = Namespace(store, keys, defaults)
        settings = FsSettings(defaults=defaults, write=WriteSettings(spool_dir=tmp_path / "spool"),
                              read=ReadSettings(chunk_size=1024 * 1024))
        trusted = False
        ns.trusted = lambda: trusted
        async with trio.open_nursery() as nursery:
            fs = Filesystem(store, cache, keys, ns, settings, nursery, NoHydration())
            pass_ = AntiEntropy(fs, max_stale=4)
            await nursery.start(pass_.run)
            await trio.sleep(59)  # between two ticks of its schedule (every 2 s from its start): no tie
            assert pass_.passes == 0
            trusted = True
            await trio.sleep(2)  # one interval (max_stale / 2)
            assert pass_.passes == 1
            await trio.sleep(20)
            assert pass_.passes == 11  # one every interval, on a fixed schedule
            # Every timer within --max-stale, nothing standing: what the mount serves expires by itself.
            idle = AntiEntropy(fs, max_stale=10)
            await nursery.start(idle.run)
            await trio.sleep(59)  # ticks every 5 s from its start
            assert idle.passes == 0
            ns.lasting = lambda: True  # with S3 event records: known attributes stand until a record comes
            await trio.sleep(5)
            assert idle.passes == 1
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
