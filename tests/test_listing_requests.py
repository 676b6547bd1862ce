"""What `ls -l` of objects other tools wrote asks S3 (issue 23), counted at the fault proxy, through real mounts.

MinIO lists user metadata when asked (``metadata=true``, hybridfs/tiers/s3listing.py): then a listing gives every
entry its final attributes and `ls -l` sends no HEAD, neither on a fresh mount nor after --dir-cache-time. A store
that refuses the parameter (the proxy answers it 400 here, standing in for one) gets HEADs, 20 at once, and only
for entries a listing cannot prove: an entry whose ETag and Last-Modified a settled HEAD already described is
not asked again.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MountFactory
from helpers import Mount, wait_until
from s3proxy import Rule, S3FaultProxy

from hybridfs.bench.s3 import put_many

MODE_META = {"mode": str(stat.S_IFREG | 0o600), "uid": "1234", "gid": "4321", "mtime": "1500000000"}
LINK_META = {"mode": str(stat.S_IFLNK | 0o777), "mtime": "1500000000"}


def make_foreign_dir(s3: Any, bucket: str, prefix: str, plain: int) -> None:
    """``d/`` with ``plain`` objects without metadata (boto3's), one with s3fs-style attributes and a symlink."""
    put_many(s3, [f"{prefix}/d/", *(f"{prefix}/d/e{i:04d}" for i in range(plain))], body=b"abc", bucket=bucket,
             threads=8)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/d/owned", Body=b"12345", Metadata=MODE_META)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/d/link", Body=b"e0000", Metadata=LINK_META)


def ls_l(directory: Path) -> dict[str, os.stat_result]:
    """What `ls -l` does: readdir, then an lstat of every entry."""
    with os.scandir(directory) as entries:
        return {entry.name: entry.stat(follow_symlinks=False) for entry in entries}


def check(found: dict[str, os.stat_result], plain: int, *, owned_mode: int = 0o600) -> None:
    assert len(found) == plain + 2
    for i in range(plain):
        st = found[f"e{i:04d}"]
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644 and st.st_size == 3
    owned = found["owned"]
    assert stat.S_ISREG(owned.st_mode) and stat.S_IMODE(owned.st_mode) == owned_mode
    assert (owned.st_uid, owned.st_gid, int(owned.st_mtime), owned.st_size) == (1234, 4321, 1_500_000_000, 5)
    assert stat.S_ISLNK(found["link"].st_mode)


def heads(proxy: S3FaultProxy, mount: Mount) -> int:
    return proxy.seen("HEAD", path=rf"/{mount.bucket}/{mount.prefix}/d/.")


def outlive(seconds: float) -> None:
    """Let a cache TTL run out (or S3's clock pass a second): a matter of time, not an event to poll for."""
    time.sleep(seconds + 0.3)


def chmod_by_copy(s3: Any, bucket: str, key: str, mode: int) -> None:
    """What s3fs's chmod does: copy the object onto itself with new metadata (a single-part copy keeps the ETag)."""
    before = s3.head_object(Bucket=bucket, Key=key)
    s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key}, MetadataDirective="REPLACE",
                   Metadata={**MODE_META, "mode": str(stat.S_IFREG | mode)})
    after = s3.head_object(Bucket=bucket, Key=key)
    assert after["ETag"] == before["ETag"] and after["LastModified"] > before["LastModified"]


def test_ls_l_of_foreign_objects_sends_no_head(s3_proxy: S3FaultProxy, mount_factory: MountFactory, s3: Any,
                                                prefix: str) -> None:
    """Before: one HEAD per entry on the fresh mount (202), and again after --dir-cache-time."""
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--no-events", "--dir-cache-time", "1"])
    make_foreign_dir(s3, mount.bucket, prefix, 200)
    check(ls_l(mount.path / "d"), 200)
    assert heads(s3_proxy, mount) == 0
    assert s3_proxy.seen("GET", query=r"metadata=true") >= 1
    outlive(1)
    chmod_by_copy(s3, mount.bucket, f"{prefix}/d/owned", 0o640)
    check(ls_l(mount.path / "d"), 200, owned_mode=0o640)  # the listing told of the new mode
    assert heads(s3_proxy, mount) == 0


def refusing_store(proxy: S3FaultProxy) -> Rule:
    """A store that refuses MinIO's parameter (AWS ignores it: the same fallback, detected from the answer)."""
    return proxy.add(Rule(method="GET", query=r"metadata=true", status=400, code="InvalidArgument"))


def test_without_metadata_listings_heads_go_out_twenty_at_once(s3_proxy: S3FaultProxy,
                                                               mount_factory: MountFactory, s3: Any,
                                                               prefix: str) -> None:
    """Before: 8 HEADs in flight at most (the wait for 16 held HEADs timed out)."""
    refusing_store(s3_proxy)
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--no-events"])
    make_foreign_dir(s3, mount.bucket, prefix, 60)
    held = s3_proxy.add(Rule(method="HEAD", path=rf"/{prefix}/d/.", action="late"))
    found: dict[str, os.stat_result] = {}
    lister = threading.Thread(target=lambda: found.update(ls_l(mount.path / "d")))
    lister.start()
    try:
        wait_until(lambda: held.held >= 16, timeout=20, message="16 HEADs in flight at once")
    finally:
        s3_proxy.remove(held)
        lister.join(60)
    check(found, 60)
    assert 62 <= heads(s3_proxy, mount) <= 62 + 2  # one per entry (a lookup may race its prefetch)


def test_a_refetched_listing_heads_only_what_changed(s3_proxy: S3FaultProxy, mount_factory: MountFactory, s3: Any,
                                                     prefix: str) -> None:
    """Without metadata listings, a listing refetched after --dir-cache-time: entries whose ETag and Last-Modified
    a settled HEAD described need none again; a chmod by copy (same ETag, later Last-Modified) is asked and shown.
    Before: every entry was asked again (62 more HEADs)."""
    refusing_store(s3_proxy)
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--no-events", "--dir-cache-time", "1"])
    make_foreign_dir(s3, mount.bucket, prefix, 60)
    outlive(2)  # S3's clock past the objects' Last-Modified second (ObjectInfo.settled)
    check(ls_l(mount.path / "d"), 60)
    first = heads(s3_proxy, mount)
    assert first >= 62
    outlive(1)
    check(ls_l(mount.path / "d"), 60)
    assert heads(s3_proxy, mount) == first
    chmod_by_copy(s3, mount.bucket, f"{prefix}/d/owned", 0o640)
    outlive(1)
    check(ls_l(mount.path / "d"), 60, owned_mode=0o640)
    assert 1 <= heads(s3_proxy, mount) - first <= 2  # the changed one (its prefetch, maybe its lookup)


def test_a_failing_head_never_shows_wrong_attributes(s3_proxy: S3FaultProxy, mount_factory: MountFactory, s3: Any,
                                                     prefix: str) -> None:
    """Without metadata listings, the HEADs of one entry answered 500: its lstat fails with EIO, every other
    entry shows its own attributes; once S3 answers, that entry does too."""
    refusing_store(s3_proxy)
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--no-events"])
    mount.allow_log(r"lookup: HEAD .*/d/owned: S3 said 500 \(Internal Server Error\) after retries -> EIO")
    make_foreign_dir(s3, mount.bucket, prefix, 30)
    failing = s3_proxy.add(Rule(method="HEAD", path=rf"/{prefix}/d/owned$", status=500))
    names = sorted(os.listdir(mount.path / "d"))
    assert len(names) == 32
    for name in names:
        if name == "owned":
            with pytest.raises(OSError) as raised:
                os.lstat(mount.path / "d" / name)
            assert raised.value.errno == errno.EIO
            continue
        st = os.lstat(mount.path / "d" / name)
        if name == "link":
            assert stat.S_ISLNK(st.st_mode)
        else:
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644 and st.st_size == 3
    assert failing.hits >= 1
    s3_proxy.remove(failing)
    wait_until(lambda: _owned_ok(mount.path / "d" / "owned"), timeout=20, message="owned's attributes")


def _owned_ok(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 1234


def test_a_listing_page_that_fails_fails_the_listing(s3_proxy: S3FaultProxy, mount_factory: MountFactory, s3: Any,
                                                     prefix: str) -> None:
    """Metadata listing of two pages, the second answered 500: `ls` fails with EIO (nothing partial, nothing
    made up), then lists every entry once S3 answers."""
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--no-events"])
    mount.allow_log(r"readdir: LIST .*/d/: S3 said InternalError \(injected\) after retries -> EIO")
    make_foreign_dir(s3, mount.bucket, prefix, 1100)
    failing = s3_proxy.add(Rule(method="GET", query=r"continuation-token=", status=500))
    with pytest.raises(OSError) as raised:
        os.listdir(mount.path / "d")
    assert raised.value.errno == errno.EIO
    assert failing.hits >= 1
    s3_proxy.remove(failing)
    check(ls_l(mount.path / "d"), 1100)
    assert heads(s3_proxy, mount) == 0


def test_a_stalled_head_holds_only_its_own_entry(s3_proxy: S3FaultProxy, mount_factory: MountFactory, s3: Any,
                                                 prefix: str) -> None:
    """Without metadata listings, the HEAD of one entry stalls mid-listing: every other entry's lstat answers with
    its own attributes meanwhile; the stalled one's waits and, once S3 answers, shows the right attributes."""
    refusing_store(s3_proxy)
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--no-events"])
    make_foreign_dir(s3, mount.bucket, prefix, 30)
    stalled = s3_proxy.add(Rule(method="HEAD", path=rf"/{prefix}/d/owned$", action="stall"))
    names = sorted(os.listdir(mount.path / "d"))
    assert len(names) == 32
    wait_until(lambda: stalled.hits >= 1, timeout=20, message="the HEAD of owned to stall")
    others = {name: os.lstat(mount.path / "d" / name) for name in names if name != "owned"}
    assert stat.S_ISLNK(others.pop("link").st_mode)
    assert all(stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644 and st.st_size == 3
               for st in others.values())
    found: list[os.stat_result] = []
    waiter = threading.Thread(target=lambda: found.append(os.lstat(mount.path / "d" / "owned")))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # its lstat waits for S3's answer: nothing made up meanwhile
    s3_proxy.remove(stalled)
    waiter.join(60)
    assert len(found) == 1
    owned = found[0]
    assert stat.S_IMODE(owned.st_mode) == 0o600 and (owned.st_uid, owned.st_size) == (1234, 5)
