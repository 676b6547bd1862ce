"""Issue 21, found by the concurrency torture: interleavings inside one request's awaits, forced in the core
(no kernel; the real MinIO). The mount-level ones are in tests/test_torture_races.py."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
import trio.testing
from test_core import ROOT, RecordingHydration, run_fs

from hybridfs.core.filesystem import AttrChanges, Filesystem
from hybridfs.errors import FsError
from hybridfs.fuse_ops import FuseOperations


def test_an_open_with_o_trunc_detached_meanwhile_leaves_no_open_file(
        stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    """open(O_WRONLY|O_TRUNC) of a closed file, while a getattr of the same inode learns that S3 holds a new
    version (another mount's overwrite) and detaches the node. Before: the open registered its new OpenFile, then
    awaited the file's lock to truncate it; the getattr detached the node in that await; the open failed with
    ESTALE and left the OpenFile in the table with no handle, for good (the torture's "files still open with no
    descriptor left"). The test catches the open parked in that await (an OpenFile without a handle) and only
    then runs the getattr. After: a new OpenFile is truncated before it is registered, with its handle at once."""

    async def body(fs: Filesystem, hydration: RecordingHydration) -> None:
        parked = 0
        for i in range(24):
            name = f"f{i}"
            key = fs.keys.key(name)
            s3.put_object(Bucket=stack.bucket, Key=key, Body=b"old")
            s3.put_object(Bucket=stack.bucket, Key=key, Body=b"the new version")  # written elsewhere
            info = await fs.store.head(key)
            assert info is not None
            newer = fs.ns.parse(info)
            s3.put_object(Bucket=stack.bucket, Key=key, Body=b"old")  # the mount is told of this one first
            node, _ = await fs.lookup(ROOT, name.encode())
            outcome: dict[str, Any] = {}

            async def opener(node_ino: int = node.ino, outcome: dict[str, Any] = outcome) -> None:
                try:
                    outcome["fh"] = (await fs.open(node_ino, os.O_WRONLY | os.O_TRUNC))[0]
                except FsError as exc:
                    outcome["errno"] = exc.errno

            async with trio.open_nursery() as nursery:
                nursery.start_soon(opener)
                while not outcome:
                    of = fs.open_files.get(node.ino)
                    if of is not None and of.handles == 0:  # the open made it and is inside an await
                        parked += 1
                        fs.ns.remember(name, newer)  # another request's HEAD found the new version ...
                        await fs.getattr(node.ino)  # ... and this getattr detaches the node (no await before)
                        break
                    await trio.lowlevel.checkpoint()
            if "fh" in outcome:
                await fs.release(outcome["fh"])
            orphans = {ino: of.node.path for ino, of in fs.open_files.items() if of.handles == 0}
            assert not orphans, f"round {i} ({outcome}, parked {parked}): open files with no handle: {orphans}"

    run_fs(stack, prefix, tmp_path, body)


def test_chmod_of_a_path_replaced_elsewhere_leaves_an_open_handle_on_its_version(
        stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    """A handle reads version 1 ("old", 3 bytes); another writer replaces the object (a record of an unknown
    order makes the mount forget the path, without detaching the open node); chmod of the path through the open
    inode copies what S3 holds now. Before: the open file took the copy's attributes, so the handle that opened
    3 bytes switched to the new version (getattr said 15 bytes, the read returned the new bytes: a size
    mismatch and, for a pwrite after it, a spool made from a version the writer never read). After: the handle
    keeps its version (its read is "old" or ESTALE, its size 3); chmod applies to the new version in S3."""

    async def body(fs: Filesystem, hydration: RecordingHydration) -> None:
        key = fs.keys.key("f")
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"old")
        node, _ = await fs.lookup(ROOT, b"f")
        fh, _ = await fs.open(node.ino, os.O_RDONLY)
        assert await fs.read(fh, 0, 4096) == b"old"
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"the new version")  # written elsewhere
        await fs.invalidate_key(key)  # an S3 event record: the next access asks S3
        await fs.setattr(node.ino, AttrChanges(mode=0o600))
        assert (await fs.getattr(node.ino)).size == 3
        try:
            data = await fs.read(fh, 0, 4096)
        except FsError as exc:
            assert exc.errno == errno.ESTALE, exc
        else:
            assert data == b"old"
        await fs.release(fh)
        head = s3.head_object(Bucket=stack.bucket, Key=key)
        assert head["ContentLength"] == 15 and int(head["Metadata"]["mode"]) & 0o777 == 0o600

    run_fs(stack, prefix, tmp_path, body)


class RecordingKernel:
    """The kernel notifier of a mount, recorded: which inodes were told to drop their attributes and pages."""

    def __init__(self) -> None:
        self.invalidated: list[int] = []

    async def invalidate(self, ino: int) -> None:
        self.invalidated.append(ino)

    async def forget_entry(self, parent_ino: int, name: bytes) -> None:
        return None


def test_an_open_drops_the_kernels_attributes_once_two_versions_were_told(
        stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    """The kernel keeps, of the attribute replies of one inode in flight at once, the first it applies; a reply
    to a request sent before that (a listing that waited for a slow LIST) is dropped. So after a getattr reply of
    the empty version and a listing reply of the new one, the kernel may still hold size 0. Before: the mount
    took the last reply sent as what the kernel holds, and an open of the new version left the kernel's size 0
    in place (the torture's pwrite read 0 bytes through fstat 0 and then wrote over the 201-block version it
    never read). After: two versions told make the kernel's version unknown, and the open drops it."""

    async def body(fs: Filesystem, hydration: RecordingHydration) -> None:
        kernel = fs.kernel = RecordingKernel()
        ops = FuseOperations(fs)
        key = fs.keys.key("f")
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"")
        node, empty = await fs.lookup(ROOT, b"f")
        ops.entry(node, empty)  # the lookup's reply: size 0
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"abc")  # written elsewhere
        info = await fs.store.head(key)
        assert info is not None
        newer = fs.ns.parse(info)
        ops.entry(node, newer, listing=True)  # a listing's reply, which the kernel may have dropped
        ops.entry(node, empty)  # a getattr's reply built meanwhile (the one the kernel kept)
        ops.entry(node, newer, listing=True)  # and another listing's
        fs.ns.remember("f", newer)  # what the listing told the namespace
        fh, _ = await fs.open(node.ino, os.O_RDWR)
        assert kernel.invalidated == [node.ino], "the open of the new version kept the kernel's attributes"
        await fs.release(fh)

    run_fs(stack, prefix, tmp_path, body)


def test_an_open_during_the_last_release_of_a_failed_truncate_reads_the_stored_version(
        stack: Any, s3: Any, prefix: str, tmp_path: Path, allow_log: Callable[[str], None]) -> None:
    """open(O_TRUNC), write 8 KiB, close fails (another writer replaced the file: the conditional commit is
    refused), and the last release drops the unstored changes. An open of the file while that release is under
    way (held: the test holds every thread of the cache's limiter, so the release waits to close its spool).
    Before: the open joined the released file, whose attributes were O_TRUNC's size 0 with the ETag of the
    version S3 holds, and its read returned 0 bytes where getattr said 15 (the torture's short read: fstat
    32768, read 0). After: the open waits for the release and opens the version S3 holds."""

    allow_log(r"^f closed with changes that are not stored \(the last flush failed\)")

    async def body(fs: Filesystem, hydration: RecordingHydration) -> None:
        key = fs.keys.key("f")
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"old")
        node, _ = await fs.lookup(ROOT, b"f")
        fh_w, _ = await fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
        await fs.write(fh_w, 0, b"x" * 8192)
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"the new version")  # written elsewhere
        try:
            await fs.flush(fh_w)
        except FsError as exc:
            assert exc.errno == errno.EIO
        else:
            raise AssertionError("the close of a replaced file succeeded")
        await fs.ns.stat("f", max_age=0)  # the mount knows the new version
        limiter = fs.cache.limiter
        borrowers = [object() for _ in range(int(limiter.total_tokens))]
        for borrower in borrowers:  # hold every cache thread: the release waits to close the spool
            limiter.acquire_on_behalf_of_nowait(borrower)
        opened: dict[str, int] = {}

        async def reopen() -> None:
            opened["fh"] = (await fs.open(node.ino, os.O_RDONLY))[0]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.release, fh_w)
            await trio.testing.wait_all_tasks_blocked()
            assert node.ino in fs.open_files and fs.open_files[node.ino].handles == 0  # the release is under way
            nursery.start_soon(reopen)
            await trio.testing.wait_all_tasks_blocked()
            for borrower in borrowers:
                limiter.release_on_behalf_of(borrower)
        size = (await fs.getattr(node.ino)).size
        data = await fs.read(opened["fh"], 0, 4096)
        await fs.release(opened["fh"])
        assert (size, data) == (15, b"the new version")

    run_fs(stack, prefix, tmp_path, body)


def test_a_listed_prefix_gone_before_its_prefetch_is_no_directory(
        stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    """A listing shows ``f03/`` as a prefix, and by the time its attributes are prefetched nothing is below it;
    an object ``f03`` is there instead (the keys below were deleted and a file written elsewhere; MinIO also lists
    a prefix ``f03/`` for a moment while the object ``f03`` is written or deleted). Before: the prefetch found no
    marker and stored a directory with default attributes, as complete as a HEAD's; the lookup took it, and
    chmod PUT a marker ``f03/`` (the torture's stray marker, then mode 040644 and EISDIR on every later op).
    After: a prefix without a marker is asked as a stat asks it; the file wins, and chmod changes the file."""

    async def body(fs: Filesystem, hydration: RecordingHydration) -> None:
        key = fs.keys.key("f03")
        s3.put_object(Bucket=stack.bucket, Key=key + "/x", Body=b"below")
        listing = await fs.ns.list("")
        assert listing["f03"].is_dir
        assert "f03" in fs.ns._prefetching  # spawned, not run yet: boto3 calls below do not yield to it
        s3.delete_object(Bucket=stack.bucket, Key=key + "/x")
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"a file")
        await fs.ns._prefetching["f03"].wait()
        node, st = await fs.lookup(ROOT, b"f03")
        assert stat.S_ISREG(st.mode), oct(st.mode)
        await fs.setattr(node.ino, AttrChanges(mode=0o600))
        markers = s3.list_objects_v2(Bucket=stack.bucket, Prefix=key + "/").get("Contents", [])
        assert not markers, [m["Key"] for m in markers]
        head = s3.head_object(Bucket=stack.bucket, Key=key)
        assert head["Metadata"]["mode"] == str(stat.S_IFREG | 0o600)

    run_fs(stack, prefix, tmp_path, body)


def test_chmod_keeps_the_type_of_the_version_it_changes(
        stack: Any, s3: Any, prefix: str, tmp_path: Path) -> None:
    """chmod of a file the mount knows, replaced elsewhere by an object of another type (a symlink another
    mount made) since: the conditional copy is refused, and the change goes onto the version S3 holds now.
    Before: setattr took the type bits from its own stat of the inode (a regular file), so the copy stored
    S_IFREG on the symlink, which became a regular file (the same cause stored a directory's type on a file: mode
    040644 and EISDIR in the torture). After: only the permission bits come from chmod; the type is that of
    the version copied."""

    async def body(fs: Filesystem, hydration: RecordingHydration) -> None:
        key = fs.keys.key("f")
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"a file")
        node, st = await fs.lookup(ROOT, b"f")
        assert stat.S_ISREG(st.mode)
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"target",
                      Metadata={"mode": str(stat.S_IFLNK | 0o777)})  # a symlink, made elsewhere
        await fs.setattr(node.ino, AttrChanges(mode=0o600))
        mode = int(s3.head_object(Bucket=stack.bucket, Key=key)["Metadata"]["mode"])
        assert stat.S_ISLNK(mode), oct(mode)
        assert stat.S_IMODE(mode) == 0o600

    run_fs(stack, prefix, tmp_path, body)
