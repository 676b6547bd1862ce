"""A cache that can be trusted (issue 12), through real mounts: corrupt bytes are never served nor uploaded, a
lost index is rebuilt, a second mount on one directory is refused, parallel cold reads do not end the mount, a
cache directory that vanished or went read-only comes back, and a full disk keeps index and files consistent."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from eventlog import read_events
from helpers import Mount, Stack, run_hybridfs, tmpfs, wait_until

from hybridfs.tiers.cache import data_name

MiB = 1024 * 1024
CORRUPT = r"cache copy of .* is corrupt \(block \d+ fails its checksum\)"


def status(mount: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))
    return doc


def health(mount: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = status(mount)["cache_health"]
    return doc


def state(path: Path) -> str:
    return os.getxattr(path, "user.hybridfs.state").decode()


def etag_of(s3: Any, mount: Mount, name: str) -> str:
    return str(s3.head_object(Bucket=mount.bucket, Key=mount.key(name))["ETag"].strip('"'))


def cache_file(s3: Any, mount: Mount, name: str) -> Path:
    return mount.cache_dir / "objects" / data_name(mount.key(name), etag_of(s3, mount, name))


def flip(path: Path, offset: int, count: int = 3) -> None:
    """Flip ``count`` bytes on disk, as a failing disk would."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(count)
        fh.seek(offset)
        fh.write(bytes(b ^ 0x5A for b in old))


def data_files(cache_dir: Path) -> set[Path]:
    return {p for p in (cache_dir / "objects").rglob("*") if p.is_file()}


def fill(directory: Path) -> Path:
    """Write until the filesystem says ENOSPC; returns the filler."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
    return filler


# -- checksums (item 1) -----------------------------------------------------------------------------------


def test_corrupt_cache_bytes_are_not_served_after_a_remount(mount_factory: Any, s3: Any, stack: Stack) -> None:
    first = mount_factory()
    data = os.urandom(3 * MiB + 100)
    (first.path / "f.bin").write_bytes(data)
    assert state(first.path / "f.bin") == "cached"
    path = cache_file(s3, first, "f.bin")
    first.unmount()
    flip(path, 2 * MiB + 5)

    second = mount_factory(cache_dir=first.cache_dir)
    second.allow_log(CORRUPT)
    assert (second.path / "f.bin").read_bytes() == data  # from S3: the bad block was caught
    warnings = [line for line in second.log_text().splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "is corrupt" in warnings[0], warnings
    assert health(second)["checksum_failures"] == 1
    event = read_events(stack.bootstrap, f"{second.topic_prefix}.hydrate",
                        lambda e: e["key"] == second.key("f.bin") and e["reason"] == "corrupt")
    assert event["etag"].strip('"') == etag_of(s3, second, "f.bin")
    wait_until(lambda: state(second.path / "f.bin") == "cached", timeout=20, message="the copy to be hydrated again")
    assert path.read_bytes() == data
    second.unmount()


def test_an_append_to_a_corrupt_copy_uploads_the_true_bytes(mounted: Mount, s3: Any) -> None:
    mounted.allow_log(CORRUPT)
    data = os.urandom(MiB + 7)
    (mounted.path / "a.bin").write_bytes(data)
    flip(cache_file(s3, mounted, "a.bin"), 1000)
    with open(mounted.path / "a.bin", "ab") as fh:  # the spool loads the current content from the cache
        fh.write(b"tail")
    assert s3.get_object(Bucket=mounted.bucket, Key=mounted.key("a.bin"))["Body"].read() == data + b"tail"
    assert health(mounted)["checksum_failures"] == 1


def test_an_evict_never_uploads_corrupt_bytes(mounted: Mount, s3: Any) -> None:
    """S3 holds another version: the purger would preserve the cached bytes beside it, but they fail their
    checksums, so nothing is uploaded and the bad copy is dropped."""
    mounted.allow_log(CORRUPT)
    mounted.allow_log(r"S3 holds another version")
    data = os.urandom(2 * MiB)
    (mounted.path / "p.bin").write_bytes(data)
    path = cache_file(s3, mounted, "p.bin")
    flip(path, 5)
    s3.put_object(Bucket=mounted.bucket, Key=mounted.key("p.bin"), Body=b"a newer version from elsewhere")
    run_hybridfs("evict", "--wait", "--timeout", "30", str(mounted.path / "p.bin"), check=False)
    wait_until(lambda: not path.exists(), timeout=30, message="the corrupt copy to be dropped")
    listed = s3.list_objects_v2(Bucket=mounted.bucket, Prefix=f"{mounted.prefix}/.hybridfs/").get("Contents", [])
    assert listed == []
    assert s3.get_object(Bucket=mounted.bucket, Key=mounted.key("p.bin"))["Body"].read() == (
        b"a newer version from elsewhere")
    assert health(mounted)["checksum_failures"] == 1


# -- the index (item 2) -----------------------------------------------------------------------------------


def test_a_corrupt_or_deleted_index_is_rebuilt_and_orphans_reclaimed(mount_factory: Any, s3: Any) -> None:
    first = mount_factory()
    files = {f"f{i}.bin": os.urandom(200_000 + i) for i in range(3)}
    for name, data in files.items():
        (first.path / name).write_bytes(data)
    first.unmount()
    cache_dir = first.cache_dir
    (cache_dir / "index.sqlite").write_bytes(b"overwritten by a failing disk " * 100)
    for suffix in ("-wal", "-shm"):
        Path(f"{cache_dir / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    orphan = cache_dir / "objects" / "ff" / ("f" * 64)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"x" * MiB)  # no sidecar says what it is
    (cache_dir / "tmp" / "leftover").write_bytes(b"y" * 1000)

    second = mount_factory(cache_dir=cache_dir)
    second.allow_log(r"index unusable \(file is not a database\); rebuilt it from the data files \(3 files\)")
    assert all(state(second.path / name) == "cached" for name in files)
    assert all((second.path / name).read_bytes() == data for name, data in files.items())
    assert not orphan.exists() and not (cache_dir / "tmp" / "leftover").exists()
    assert health(second)["index_rebuilds"] == 1 and health(second)["reclaimed_bytes"] == MiB + 1000

    # Lost while mounted: the probe notices and rebuilds; later commits go to the new index.
    second.allow_log(r"index.sqlite (deleted or replaced|was deleted or replaced)")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache_dir / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    wait_until(lambda: health(second)["index_rebuilds"] == 2 and health(second)["available"], timeout=20,
               message="the index to be rebuilt")
    (second.path / "new.bin").write_bytes(b"after the rebuild")
    assert state(second.path / "new.bin") == "cached" and status(second)["cache"]["files_cached"] == 4
    second.unmount()

    third = mount_factory(cache_dir=cache_dir)
    assert health(third)["index_rebuilds"] == 0 and status(third)["cache"]["files_cached"] == 4
    with sqlite3.connect(f"file:{cache_dir / 'index.sqlite'}?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 4


# -- one directory, one mount (item 7) --------------------------------------------------------------------


def test_a_second_mount_on_the_same_cache_or_state_dir_is_refused(mounted: Mount, tmp_path: Path,
                                                                   stack: Stack) -> None:
    (mounted.path / "keep.bin").write_bytes(b"k" * 1000)
    other = tmp_path / "other-mnt"
    other.mkdir()
    base = ["mount", f"s3://{mounted.bucket}/{mounted.prefix}", str(other), "--kafka", stack.bootstrap,
            "--topic-prefix", mounted.topic_prefix]
    try:
        cases = [(["--cache-dir", str(mounted.cache_dir), "--state-dir", str(tmp_path / "s2")], "cache directory"),
                 (["--cache-dir", str(tmp_path / "c2"), "--state-dir", str(mounted.state_dir)], "state directory")]
        for extra, what in cases:
            result = run_hybridfs(*base, *extra, check=False, timeout=60)
            assert result.returncode == 1, result
            assert result.stderr.strip().splitlines() == [
                f"hybridfs: error: {what} {mounted.cache_dir if what.startswith('cache') else mounted.state_dir} "
                "is in use by another hybridfs mount"], result.stderr
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(other)], capture_output=True, check=False)
    assert (mounted.cache_dir / "tmp").is_dir() and (mounted.state_dir / "spool").is_dir()
    assert (mounted.path / "keep.bin").read_bytes() == b"k" * 1000 and state(mounted.path / "keep.bin") == "cached"


# -- parallel cold reads (item 4) -------------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_cold_reads_of_thousands_of_fresh_files(mounted: Mount, s3: Any) -> None:
    names = [f"many/f{i:04d}" for i in range(2000)]

    def put(name: str) -> None:
        s3.put_object(Bucket=mounted.bucket, Key=mounted.key(name), Body=name.encode() * 50)

    with ThreadPoolExecutor(8) as pool:  # the client keeps 10 connections
        list(pool.map(put, names))
    result = subprocess.run("find . -type f -print0 | xargs -0 -P 8 -n 20 cat | wc -c", shell=True,
                            cwd=mounted.path / "many", capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == sum(len(n.encode()) * 50 for n in names)
    assert mounted.proc.poll() is None
    wait_until(lambda: status(mounted)["cache"]["files_cached"] == len(names), timeout=120,
               message="every file to be hydrated")
    assert (mounted.path / names[-1]).read_bytes() == names[-1].encode() * 50


# -- recovery (items 9, 10) -------------------------------------------------------------------------------


def test_a_cache_dir_removed_and_recreated_comes_back(mount_factory: Any, s3: Any) -> None:
    mount = mount_factory()
    mount.allow_log(r"cache .*: directory replaced; serving from S3 only until it recovers")
    data = os.urandom(300_000)
    (mount.path / "before.bin").write_bytes(data)
    shutil.rmtree(mount.cache_dir)
    mount.cache_dir.mkdir()
    wait_until(lambda: health(mount)["recoveries"] == 1 and health(mount)["available"], timeout=20,
               message="the cache to come back")
    assert status(mount)["cache"]["files_cached"] == 0 and status(mount)["cache"]["used_bytes"] == 0
    assert {p.name for p in mount.cache_dir.iterdir()} >= {"objects", "sums", "tmp", "index.sqlite"}
    (mount.path / "after.bin").write_bytes(b"a" * 5000)
    assert state(mount.path / "after.bin") == "cached"
    assert (mount.path / "before.bin").read_bytes() == data  # a miss now, from S3
    mount.unmount()
    assert sum(1 for line in mount.log_text().splitlines() if " WARNING " in line) == 1


def test_a_read_only_cache_dir_comes_back_when_writable(mount_factory: Any, s3: Any) -> None:
    mount = mount_factory()
    mount.allow_log(r"cache .*: Read-only file system; serving from S3 only until it recovers")
    mount.allow_log(r"cache copy of .* failed")
    (mount.path / "f1.bin").write_bytes(b"1" * 10_000)
    target = str(mount.cache_dir)
    subprocess.run(["mount", "--bind", target, target], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)
        wait_until(lambda: not health(mount)["available"], timeout=20, message="the cache to see its disk read-only")
        assert re.search(r"(?i)read-only|readonly", health(mount)["unavailable_reason"])
        (mount.path / "f2.bin").write_bytes(b"2" * 10_000)  # the write succeeds; only the tee fails
        assert state(mount.path / "f2.bin") == "cloud"
        assert (mount.path / "f1.bin").read_bytes() == b"1" * 10_000
    finally:
        subprocess.run(["umount", target], check=True)
    wait_until(lambda: health(mount)["available"], timeout=20, message="the cache to come back")
    assert state(mount.path / "f1.bin") == "cached"
    (mount.path / "f3.bin").write_bytes(b"3" * 10_000)
    assert state(mount.path / "f3.bin") == "cached"


def test_an_evict_on_a_full_cache_disk_frees_the_file_and_keeps_the_index(mount_factory: Any, s3: Any,
                                                                          tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "8m") as disk:
        mount = mount_factory(cache_dir=disk / "cache")
        a, b = os.urandom(MiB), os.urandom(MiB + 1)
        (mount.path / "a.bin").write_bytes(a)
        (mount.path / "b.bin").write_bytes(b)
        a_file, b_file = cache_file(s3, mount, "a.bin"), cache_file(s3, mount, "b.bin")
        filler = fill(disk)
        run_hybridfs("evict", "--wait", "--timeout", "30", str(mount.path / "a.bin"))
        assert not a_file.exists() and b_file.exists()  # the bytes left the disk, not just the index
        assert status(mount)["cache"]["files_cached"] == 1 and status(mount)["cache"]["used_bytes"] == len(b)
        filler.unlink()
        mount.unmount()
        again = mount_factory(cache_dir=disk / "cache")
        assert data_files(disk / "cache") == {b_file}
        assert status(again)["cache"]["files_cached"] == 1 and health(again)["reclaimed_files"] == 0
        assert state(again.path / "a.bin") == "cloud" and (again.path / "a.bin").read_bytes() == a
        again.unmount()


# -- the outbox on a full state disk (item 10) ------------------------------------------------------------


def test_an_outbox_on_a_full_disk_says_why_and_that_events_are_not_durable(mount_factory: Any, s3: Any,
                                                                           stack: Stack, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", "8m") as disk:
        mount = mount_factory(extra_args=["--state-dir", str(disk / "st")])
        mount.allow_log(r"cannot store \d+ events in .*outbox.sqlite: database or disk is full; keeping \d+ "
                        r"events in memory only, NOT durable")
        s3.put_object(Bucket=mount.bucket, Key=mount.key("cold.bin"), Body=b"c" * 5000)
        filler = fill(disk)
        assert (mount.path / "cold.bin").read_bytes() == b"c" * 5000  # a miss: a hydrate event is due
        wait_until(lambda: "NOT durable" in mount.log_text(), timeout=20, message="the outbox error")
        line = next(ln for ln in mount.log_text().splitlines() if "NOT durable" in ln)
        # The reason, not what a failing ROLLBACK after it would say ("cannot rollback - no transaction is active").
        assert "database or disk is full" in line and "rollback" not in line.lower(), line
        filler.unlink()
        event = read_events(stack.bootstrap, f"{mount.topic_prefix}.hydrate",
                            lambda e: e["key"] == mount.key("cold.bin"))
        assert event["reason"] == "read-miss"
        mount.unmount()
