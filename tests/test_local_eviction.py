"""Issue 12, item 5: the cache keeps its bound without Kafka. With ``--no-events``, or with a Kafka that does not
answer for ``--local-evict-after`` seconds, the eviction planner's decisions are purged locally."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from helpers import Mount, tmpfs, wait_until
from test_eviction import status

MiB = 1024 * 1024


def write_three_times_the_cache(mount: Mount, capacity: int, size: int = MiB) -> tuple[dict[str, str], list[int]]:
    (mount.path / "w").mkdir()
    files: dict[str, str] = {}
    usage = []
    for i in range(3 * capacity // size):
        data = os.urandom(size)
        name = f"w/f{i:03d}.bin"
        (mount.path / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
        usage.append(status(mount)["cache"]["used_bytes"])
    return files, usage


def check_bounded(mount: Mount, capacity: int, files: dict[str, str], usage: list[int]) -> None:
    print(f"usage peaked at {max(usage) / MiB:.0f} MiB of {capacity / MiB:.0f} over {len(usage)} writes")
    assert max(usage) <= capacity, f"cache usage peaked at {max(usage)} bytes, over the {capacity} capacity"
    wait_until(lambda: status(mount)["cache"]["used_bytes"] <= 0.9 * capacity, timeout=15,
               message="cache usage to settle under the high watermark")
    planner = status(mount)["services"]["planner"]
    assert planner["local"] is True and planner["local_purges"] >= len(files) - capacity // MiB
    for name, digest in files.items():
        assert hashlib.sha256((mount.path / name).read_bytes()).hexdigest() == digest, name


def test_no_events_keeps_the_cache_bounded(mount_factory: Any) -> None:
    capacity = 64 * MiB
    mount = mount_factory(extra_args=["--no-events", "--cache-size", "64M", "--evict-interval", "0.5"])
    files, usage = write_three_times_the_cache(mount, capacity)
    check_bounded(mount, capacity, files, usage)
    assert "consumer" not in status(mount)["services"]["purger"]


def test_kafka_down_for_long_keeps_the_cache_bounded(mount_factory: Any) -> None:
    """A Kafka where nothing listens is a Kafka that is down (the shared broker is never stopped)."""
    capacity = 64 * MiB
    mount = mount_factory(extra_args=["--kafka", "127.0.0.1:1", "--cache-size", "64M", "--evict-interval", "0.5",
                                      "--local-evict-after", "2"])
    mount.allow_log(r"kafka unreachable at 127\.0\.0\.1:1")  # the producer's and each consumer's, once
    mount.allow_log(r"Kafka unreachable for \d+s: purging the eviction planner's decisions locally")
    wait_until(lambda: status(mount)["services"]["planner"]["local"], timeout=30,
               message="the planner to purge locally once Kafka has been down for 2 s")
    files, usage = write_three_times_the_cache(mount, capacity)
    check_bounded(mount, capacity, files, usage)
    assert status(mount)["bus"]["outbox"] >= len(files) - capacity // MiB, "the evictions wait in the outbox"


def test_no_events_keeps_min_free_on_the_cache_disk(mount_factory: Any, tmp_path: Path) -> None:
    """A cache disk smaller than --cache-size: --min-free is what bounds the cache, without Kafka too (no tee
    ever meets a full disk: that would log a WARNING and fail the test)."""
    with tmpfs(tmp_path / "disk", "48m") as disk:
        mount = mount_factory(cache_dir=disk, extra_args=["--no-events", "--cache-size", "1G", "--min-free", "0.25",
                                                          "--evict-interval", "0.5"])
        total = os.statvfs(disk).f_blocks * os.statvfs(disk).f_frsize
        (mount.path / "w").mkdir()
        files: dict[str, str] = {}
        lowest = total
        for i in range(3 * total // MiB):
            data = os.urandom(MiB)
            (mount.path / f"w/f{i:03d}.bin").write_bytes(data)
            files[f"w/f{i:03d}.bin"] = hashlib.sha256(data).hexdigest()
            st = os.statvfs(disk)
            lowest = min(lowest, st.f_bavail * st.f_frsize)
        print(f"lowest free {lowest / MiB:.1f} MiB of {total / MiB:.0f} MiB (min-free 25%: {total / 4 / MiB:.0f} MiB)")
        assert lowest >= 0.25 * total - 4 * MiB, "the disk keeps --min-free (less what the planner reacts within)"
        wait_until(lambda: os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize >= 0.25 * total, timeout=15,
                   message="the cache disk back over --min-free")
        for name, digest in files.items():
            assert hashlib.sha256((mount.path / name).read_bytes()).hexdigest() == digest, name
        mount.unmount()
