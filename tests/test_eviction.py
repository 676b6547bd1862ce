"""Eviction through real mounts, Kafka and MinIO: ``hybridfs evict`` makes files cloud-only and frees their
space; the watermarks keep a cache that is written three times over within bounds; an eviction never removes
the only copy of the bytes (contract 4)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from helpers import Mount, Stack, run_hybridfs, wait_until

MiB = 1024 * 1024


def state(path: Path) -> str:
    return os.getxattr(path, "user.hybridfs.state").decode()


def status(mount: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))
    return doc


def wait_consuming(mount: Mount) -> None:
    """Until the hydrator's and the purger's consumers have joined their groups (a new mount's topics are being
    created and its groups joined for a second or two; events wait in Kafka meanwhile)."""

    def ready() -> bool:
        services = status(mount).get("services", {})
        return all(services.get(name, {}).get("consumer", {}).get("reachable") for name in ("hydrator", "purger"))

    wait_until(ready, timeout=30, message="the consumers to join their groups")


def cache_files(mount: Mount) -> list[Path]:
    return [p for p in (mount.cache_dir / "objects").rglob("*") if p.is_file()]


def test_cli_evict_frees_space_and_keeps_bytes(mounted: Mount, s3: Any) -> None:
    keep, drop = os.urandom(2 * MiB), os.urandom(3 * MiB + 5)
    (mounted.path / "keep.bin").write_bytes(keep)
    (mounted.path / "d").mkdir()
    (mounted.path / "d" / "drop.bin").write_bytes(drop)
    assert state(mounted.path / "d" / "drop.bin") == "cached"  # the write teed it into the cache
    before = status(mounted)["cache"]["used_bytes"]
    assert before == len(keep) + len(drop) and len(cache_files(mounted)) == 2

    result = run_hybridfs("evict", "--wait", "--timeout", "30", str(mounted.path / "d"))
    assert "1 event published" in result.stderr
    assert state(mounted.path / "d" / "drop.bin") == "cloud"
    assert state(mounted.path / "keep.bin") == "cached"
    assert status(mounted)["cache"]["used_bytes"] == len(keep)
    (left,) = cache_files(mounted)
    assert left.read_bytes() == keep
    purger = status(mounted)["services"]["purger"]
    assert purger["outcomes"] == {"evicted": 1} and purger["uploads_before_evict"] == 0
    # The bytes still read right (from S3 now; the miss brings them back into the cache).
    assert hashlib.sha256((mounted.path / "d" / "drop.bin").read_bytes()).digest() == hashlib.sha256(drop).digest()
    assert s3.get_object(Bucket=mounted.bucket, Key=mounted.key("d/drop.bin"))["Body"].read() == drop
    wait_until(lambda: state(mounted.path / "d" / "drop.bin") == "cached", timeout=15, message="re-hydration")


def test_writing_three_times_the_cache_keeps_usage_bounded(mount_factory: Any) -> None:
    """Eviction runs beside the writes (planner -> Kafka -> purger), so usage may pass the high watermark by
    what is written while it reacts (tens of milliseconds): the headroom up to the capacity absorbs that, and
    usage settles under the high watermark. (Writes do not wait for room: a hard bound at the watermark would
    need the cache to refuse the tee of a write that does not fit.)"""
    capacity, size, count = 64 * MiB, MiB, 192
    mount = mount_factory(extra_args=["--cache-size", "64M", "--evict-interval", "0.5"])
    wait_consuming(mount)
    high = 0.9 * capacity
    (mount.path / "w").mkdir()
    files: dict[str, str] = {}
    usage = []
    for i in range(count):
        data = os.urandom(size)
        name = f"w/f{i:03d}.bin"
        (mount.path / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
        usage.append(status(mount)["cache"]["used_bytes"])
    over = sum(1 for u in usage if u > high)
    print(f"usage peaked at {max(usage) / MiB:.0f} MiB of {capacity / MiB:.0f}; over the high watermark after "
          f"{over} of {count} writes")
    assert max(usage) <= capacity, f"cache usage peaked at {max(usage)} bytes, over the {capacity} capacity"
    wait_until(lambda: status(mount)["cache"]["used_bytes"] <= high, timeout=15,
               message="cache usage to settle under the high watermark")
    settled = status(mount)
    assert settled["services"]["planner"]["evictions_requested"]["watermark"] >= count - capacity // size
    assert settled["services"]["purger"]["uploads_before_evict"] == 0
    assert state(mount.path / "w" / f"f{count - 1:03d}.bin") == "cached", "the newest file stays"
    for name, digest in files.items():
        assert hashlib.sha256((mount.path / name).read_bytes()).hexdigest() == digest, name


def test_evict_never_resurrects_a_deleted_object(mount_factory: Any, s3: Any, stack: Stack) -> None:
    """S3 is the truth for deletes (contract 4): an object deleted behind the mount's back stays deleted when its
    cached copy is evicted; the bytes are kept under .hybridfs/preserved/, within --preserved-size (oldest
    dropped first: each new version deleted this way would otherwise add a copy), and the status lists them."""
    mount = mount_factory(extra_args=["--preserved-size", "1M"])
    mount.allow_log(r"S3 no longer holds it \(deleted elsewhere\); preserving the cached copy")
    wait_consuming(mount)
    key = mount.key("lost.bin")
    versions = [os.urandom(400_000) for _ in range(3)]
    etags = []
    for done, data in enumerate(versions, 1):
        (mount.path / "lost.bin").write_bytes(data)
        os.chmod(mount.path / "lost.bin", 0o640)
        assert state(mount.path / "lost.bin") == "cached"
        etags.append(os.getxattr(mount.path / "lost.bin", "user.hybridfs.etag").decode())
        s3.delete_object(Bucket=mount.bucket, Key=key)  # deleted by another host, or `aws s3 rm`
        run_hybridfs("evict", f"s3://{mount.bucket}/{key}", "--kafka", stack.bootstrap, "--topic-prefix",
                     mount.topic_prefix)
        wait_until(lambda n=done: status(mount)["services"]["purger"]["outcomes"].get("evicted") == n, timeout=20,
                   message="the eviction")
        assert "Contents" not in s3.list_objects_v2(Bucket=mount.bucket, Prefix=key), "the delete stays"
        # Before the next version is written here: the mount has seen the deletion (its attributes expired).
        wait_until(lambda: not (mount.path / "lost.bin").exists(), timeout=20, message="the deletion to show")
    spare = f"{mount.prefix}/.hybridfs/preserved/lost.bin."
    kept = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=mount.bucket, Prefix=spare).get("Contents", []))
    assert kept == sorted(spare + e for e in etags[1:]), "the two newest copies fit in 1 MiB; the oldest went"
    obj = s3.get_object(Bucket=mount.bucket, Key=spare + etags[-1])
    assert obj["Body"].read() == versions[-1]
    assert obj["Metadata"]["hybridfs-original-key"] == key and int(obj["Metadata"]["mode"]) & 0o7777 == 0o640
    preserved = status(mount)["services"]["purger"]["preserved"]
    assert preserved["count"] == 2 and preserved["bytes"] == 800_000 and preserved["dropped"] == 1
    assert preserved["newest"][0]["key"] == spare + etags[-1]
    assert status(mount)["services"]["purger"]["uploads_before_evict"] == 3


def test_evict_after_a_delete_through_the_mount_keeps_nothing(mounted: Mount, s3: Any, stack: Stack) -> None:
    """A deletion made through the mount is known: nothing is evicted, preserved or uploaded."""
    wait_consuming(mounted)
    (mounted.path / "gone.bin").write_bytes(os.urandom(300_000))
    key = mounted.key("gone.bin")
    os.unlink(mounted.path / "gone.bin")
    run_hybridfs("evict", f"s3://{mounted.bucket}/{key}", "--kafka", stack.bootstrap, "--topic-prefix",
                 mounted.topic_prefix)
    wait_until(lambda: status(mounted)["services"]["purger"]["outcomes"].get("not-cached") == 1, timeout=20,
               message="the eviction")
    assert "Contents" not in s3.list_objects_v2(Bucket=mounted.bucket, Prefix=mounted.prefix + "/")
    assert status(mounted)["services"]["purger"]["uploads_before_evict"] == 0


def test_evict_preserves_a_cached_version_s3_no_longer_holds(mount_factory: Any, s3: Any, stack: Stack) -> None:
    mount = mount_factory()
    mount.allow_log(r"S3 holds another version .* preserving the cached copy")
    ours, theirs = os.urandom(500_000), os.urandom(700_000)
    (mount.path / "d").mkdir()
    (mount.path / "d" / "changed.bin").write_bytes(ours)
    etag = os.getxattr(mount.path / "d" / "changed.bin", "user.hybridfs.etag").decode()
    key = mount.key("d/changed.bin")
    s3.put_object(Bucket=mount.bucket, Key=key, Body=theirs)  # another writer replaced it
    run_hybridfs("evict", f"s3://{mount.bucket}/{key}", "--kafka", stack.bootstrap, "--topic-prefix",
                 mount.topic_prefix)
    wait_until(lambda: status(mount)["cache"]["files_cached"] == 0, timeout=20, message="the eviction")
    assert s3.get_object(Bucket=mount.bucket, Key=key)["Body"].read() == theirs, "the newer version stays"
    spare = f"{mount.prefix}/.hybridfs/preserved/d/changed.bin.{etag}"
    obj = s3.get_object(Bucket=mount.bucket, Key=spare)
    assert obj["Body"].read() == ours, "the cached bytes were uploaded beside it before the purge"
    assert obj["Metadata"]["hybridfs-original-key"] == key
    assert (mount.path / ".hybridfs" / "preserved" / "d" / f"changed.bin.{etag}").read_bytes() == ours
