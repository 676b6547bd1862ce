"""Issue 21, item 5, through a real mount: a hydration racing ``rm`` (or ``mv``) must not put the removed file back
in the cache, and an eviction afterwards must preserve nothing under ``.hybridfs/preserved/`` (contract 4: a
deletion made through this very mount is not "deleted elsewhere").

The hydrator's GET of the file is answered by MinIO at once but held at the S3 fault proxy ("late") while the test
removes the file through the mount, then released: the bytes reach the hydrator after the removal. Before the fix
the hydrator cached them ("hydrated"), and the planner's max-age eviction uploaded them to the preserved copies.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import Mount, Stack, run_hybridfs, wait_until
from s3proxy import Rule, S3FaultProxy

MAX_AGE = 2.0  # the planner evicts a file not read for this long: what would preserve a resurrected copy


def status(mount: Mount) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))
    return found


def services(mount: Mount) -> dict[str, Any]:
    found: dict[str, Any] = status(mount).get("services", {})
    return found


def indexed_keys(cache_dir: Path) -> list[str]:
    """The keys the cache index holds (read beside the mount: SQLite in WAL mode allows it)."""
    db = sqlite3.connect(f"file:{cache_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return [row[0] for row in db.execute("SELECT key FROM entries")]
    finally:
        db.close()


@pytest.mark.parametrize("removal", ["rm", "mv"])
def test_a_hydration_racing_a_removal_does_not_bring_the_file_back(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any, stack: Stack, prefix: str, removal: str) -> None:
    data = os.urandom(200_000)
    key = f"{prefix}/cold.bin"
    s3.put_object(Bucket=stack.bucket, Key=key, Body=data)
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--max-age", str(MAX_AGE),
                                      "--evict-interval", "0.2"])
    wait_until(lambda: all(services(mount).get(name, {}).get("consumer", {}).get("reachable")
                           for name in ("hydrator", "purger")), 30, message="the consumers to join their groups")
    path = mount.path / "cold.bin"
    assert os.getxattr(path, "user.hybridfs.state") == b"cloud"

    held = s3_proxy.add(Rule(method="GET", path=re.escape(f"/{stack.bucket}/{key}") + "$", action="late"))
    run_hybridfs("hydrate", str(path))  # a hydrate event for the cold file: the hydrator GETs it
    wait_until(lambda: held.held >= 1, 30, message="the hydrator's GET to be answered (and held at the proxy)")
    if removal == "rm":
        os.unlink(path)
    else:
        os.rename(path, mount.path / "moved.bin")
    assert s3.list_objects_v2(Bucket=stack.bucket, Prefix=key).get("KeyCount") == 0
    s3_proxy.remove(held)  # the bytes reach the hydrator now, after the removal

    outcomes = wait_until(lambda: services(mount)["hydrator"]["outcomes"] or None, 30,
                          message="the hydration to end")
    cached = key in indexed_keys(mount.cache_dir)
    files = [p for p in (mount.cache_dir / "objects").rglob("*") if p.is_file()]
    moved_state = os.getxattr(mount.path / "moved.bin", "user.hybridfs.state") if removal == "mv" else b"cloud"

    # Let the planner run well past --max-age: a resurrected copy would be evicted, hence preserved, by now.
    rounds = services(mount)["planner"]["rounds"]
    wait_until(lambda: services(mount)["planner"]["rounds"] >= rounds + int(MAX_AGE / 0.2) + 5, 30,
               message="the planner to run past --max-age")
    listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"{prefix}/.hybridfs/preserved/")
    preserved = [o["Key"] for o in listed.get("Contents", [])]
    if preserved:  # seen before the fix; the purger's own WARNING is expected then, the assertion says it
        mount.allow_log(r"S3 no longer holds it \(deleted elsewhere\); preserving the cached copy")
    evicted = services(mount)["purger"]["outcomes"].get("evicted", 0)
    assert (outcomes, cached, files, preserved, evicted) == ({"removed": 1}, False, [], [], 0), (
        f"hydration {outcomes}, cached again: {cached}, cache files {files}, preserved {preserved}, "
        f"evicted {evicted}")
    # The new name is not cached either (a copy in S3 may have another ETag), and reads as it should.
    assert moved_state == b"cloud"
    if removal == "mv":
        assert (mount.path / "moved.bin").read_bytes() == data


def test_an_eviction_racing_rm_preserves_nothing(s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any,
                                                 stack: Stack, prefix: str) -> None:
    """`rm` of a cached file with its DELETE's answer held at the proxy, and `hybridfs evict` of it meanwhile: the
    purger finds the object gone from S3. Before: the cache entry was still there, so the purger kept the bytes
    under .hybridfs/preserved/ as "deleted elsewhere" (contract 4: a delete made through this mount is known)."""
    key = f"{prefix}/f.bin"
    s3.put_object(Bucket=stack.bucket, Key=key, Body=os.urandom(50_000))
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url])
    wait_until(lambda: all(services(mount).get(n, {}).get("consumer", {}).get("reachable")
                           for n in ("hydrator", "purger")), 30, message="the hydrator and purger to reach Kafka")
    path = mount.path / "f.bin"
    run_hybridfs("hydrate", "--wait", str(path))
    held = s3_proxy.add(Rule(method="DELETE", path=re.escape(f"/{stack.bucket}/{key}") + "$", action="late"))
    rm = threading.Thread(target=os.unlink, args=(path,))
    rm.start()
    try:
        wait_until(lambda: held.held >= 1, 30, message="the DELETE to reach S3 and its answer to be held")
        run_hybridfs("evict", str(path))  # publishes nothing when the unlink already dropped the cached copy

        def copy_gone() -> bool:
            try:
                return os.getxattr(path, "user.hybridfs.state") == b"cloud"
            except FileNotFoundError:
                return True  # the unlink finished

        wait_until(lambda: services(mount)["purger"]["outcomes"] or copy_gone(), 30,
                   message="the purger to handle it, or the copy to be gone already")
    finally:
        s3_proxy.remove(held)
        rm.join()
    listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"{prefix}/.hybridfs/preserved/")
    assert listed.get("KeyCount") == 0, [o["Key"] for o in listed.get("Contents", [])]
    assert not path.exists()
