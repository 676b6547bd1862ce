"""Issue 24, "pressure evictions are bounded and undone": another process short of space on the cache disk makes
the planner evict only what restores --min-free (nothing when even the whole cache could not), and the files
evicted under pressure are hydrated again once the space returns, so a later S3 outage still finds them cached."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import Mount, tmpfs, wait_until
from test_eviction import status, wait_consuming

MiB = 1024 * 1024
FILES = 16  # of 1 MiB, on a 64 MiB disk with --min-free 25% (16 MiB): the cache never fills the disk itself


def free_bytes(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def cached(mount: Mount) -> tuple[int, int]:
    """(files, bytes) in the cache."""
    doc = status(mount)["cache"]
    return doc["files_cached"], doc["used_bytes"]


def planner(mount: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = status(mount)["services"]["planner"]
    return doc


def rounds_pass(mount: Mount, count: int) -> None:
    """Until the planner has planned ``count`` more rounds (each saw the disk as it is now)."""
    start = planner(mount)["rounds"]
    wait_until(lambda: planner(mount)["rounds"] >= start + count, timeout=15, message=f"{count} planner rounds")


def fill_to_enospc(fh: Any) -> None:
    with contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()


@pytest.mark.parametrize("events", [True, False], ids=["kafka", "no-events"])
def test_pressure_evictions_are_bounded_and_undone(mount_factory: Any, s3_proxy: Any, tmp_path: Path,
                                                    events: bool) -> None:
    with tmpfs(tmp_path / "disk", "64m") as disk:
        mount = mount_factory(cache_dir=disk, extra_args=[
            "--endpoint-url", s3_proxy.url, "--cache-size", "48M", "--min-free", "0.25", "--evict-interval", "0.5",
            "--s3-max-attempts", "2", "--s3-connect-timeout", "1", *([] if events else ["--no-events"])])
        mount.allow_log(r"S3 unreachable|S3 marked down")  # the outage at the end
        if events:
            wait_consuming(mount)
        total = os.statvfs(disk).f_blocks * os.statvfs(disk).f_frsize
        (mount.path / "d").mkdir()
        digests = {}
        for i in range(FILES):
            data = os.urandom(MiB)
            (mount.path / f"d/f{i:02d}.bin").write_bytes(data)
            digests[f"d/f{i:02d}.bin"] = hashlib.sha256(data).hexdigest()
        wait_until(lambda: cached(mount) == (FILES, FILES * MiB), timeout=15, message="every file cached")

        # 1. Others take the disk 4 MiB under --min-free: the cache gives up about that much, not everything.
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as fh:
            fh.write(b"\0" * (free_bytes(disk) - int(0.25 * total) + 4 * MiB))
            wait_until(lambda: free_bytes(disk) >= 0.25 * total, timeout=15, message="--min-free restored")
            rounds_pass(mount, 3)
            files, _ = cached(mount)
            print(f"after a 4 MiB shortage: {files} of {FILES} files cached; planner {planner(mount)}")
            assert FILES - 6 <= files < FILES, "evicted what restores --min-free (4 MiB and the 1% slack)"

            # 2. Others fill the whole disk: emptying the cache could not restore --min-free, so nothing goes.
            fill_to_enospc(fh)
            rounds_pass(mount, 4)
            assert cached(mount)[0] == files, "a disk the cache does not fill is not emptied of the cache"
            assert "others fill it; not evicting for it" in mount.log_text()
        filler.unlink()

        # 3. The space returns: what was evicted under pressure comes back, most recently used first.
        wait_until(lambda: cached(mount) == (FILES, FILES * MiB), timeout=30,
                   message="the files evicted under pressure to be hydrated again")
        assert planner(mount)["pressure_returned"] >= FILES - files
        assert planner(mount)["pressure_evicted"] == 0

        # 4. S3 stops: every file read before the fill is served from the cache, each within 2 s.
        s3_proxy.down("refuse")
        for name, digest in digests.items():
            start = time.monotonic()
            data = (mount.path / name).read_bytes()
            took = time.monotonic() - start
            assert hashlib.sha256(data).hexdigest() == digest, name
            assert took < 2.0, f"{name} took {took:.2f}s with S3 down"
        s3_proxy.up()


def test_a_slowly_growing_file_does_not_take_the_whole_cache(mount_factory: Any, tmp_path: Path) -> None:
    """Another file grows a little at a time into the space the evictions free: the cache gives it --min-free
    (plus 1 %) of the disk in all, not everything a few MiB at a time; and gets it back once the file is gone."""
    count = 32
    with tmpfs(tmp_path / "disk", "64m") as disk:
        mount = mount_factory(cache_dir=disk, extra_args=[
            "--no-events", "--cache-size", "48M", "--min-free", "0.1", "--evict-interval", "0.3"])
        total = os.statvfs(disk).f_blocks * os.statvfs(disk).f_frsize
        (mount.path / "d").mkdir()
        for i in range(count):
            (mount.path / f"d/f{i:02d}.bin").write_bytes(os.urandom(MiB))
        wait_until(lambda: cached(mount) == (count, count * MiB), timeout=15, message="every file cached")
        steps = 0
        with open(disk / "growing", "ab", buffering=0) as fh:
            for steps in range(1, 60):  # noqa: B007 - the count is reported
                try:
                    fh.write(b"\0" * (2 * MiB))
                except OSError:  # the disk is full: the cache stopped giving
                    break
                rounds_pass(mount, 2)
        files, _ = cached(mount)
        print(f"after {steps} steps of 2 MiB: {files} of {count} files cached, "
              f"{(disk / 'growing').stat().st_size / MiB:.0f} MiB grown; planner {planner(mount)}")
        assert files >= count - (0.11 * total // MiB) - 1, "the cache gave the growing file at most --min-free"
        (disk / "growing").unlink()
        wait_until(lambda: cached(mount) == (count, count * MiB), timeout=30,
                   message="the files given to the growing file to be hydrated again")
