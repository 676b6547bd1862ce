"""The CLI verbs against real mounts and Kafka: hydrate/evict/pin/unpin by path or s3:// URL, status, and the
one-line errors."""

from __future__ import annotations

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


def fails(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the CLI expecting a one-line error; returns it."""
    result = run_hybridfs(*args, check=False, timeout=60, env=env)
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridfs: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_one_line_errors(tmp_path: Path, stack: Stack) -> None:
    assert "is not in a hybridfs mount" in fails("hydrate", str(tmp_path))
    assert "is not in a hybridfs mount" in fails("status", str(tmp_path))
    assert "no such file or directory" in fails("evict", str(tmp_path / "missing"))
    assert "no Kafka to publish to" in fails("hydrate", "s3://bucket/key", "--no-mount-check",
                                                 env={"HYBRIDFS_KAFKA_BOOTSTRAP": ""})
    assert "expected s3://BUCKET/KEY" in fails("pin", "s3://bucket", "--kafka", stack.bootstrap)
    assert "'..' path segment" in fails("hydrate", "s3://bucket/a/../b", "--kafka", stack.bootstrap)
    assert "--wait needs paths inside a mount" in fails("hydrate", "--wait", "s3://bucket/key", "--no-mount-check",
                                                         "--kafka", stack.bootstrap)
    assert "no hybridfs mount here serves s3://bucket/key" in fails("hydrate", "s3://bucket/key", "--kafka",
                                                                    stack.bootstrap)
    error = fails("hydrate", "s3://bucket/key", "--no-mount-check", "--kafka", "127.0.0.1:1", "--kafka-timeout",
                  "2")
    assert "kafka unreachable at 127.0.0.1:1" in error


def test_status_of_a_mount(mounted: Mount, s3: Any) -> None:
    (mounted.path / "d").mkdir()
    (mounted.path / "d" / "local.bin").write_bytes(os.urandom(MiB))
    for i in range(3):
        s3.put_object(Bucket=mounted.bucket, Key=mounted.key(f"d/remote{i}.bin"), Body=b"r" * 1000)
    text = run_hybridfs("status", str(mounted.path)).stdout
    assert f"mount      {mounted.path}" in text
    assert "1.0 MiB of 10.0 GiB" in text and "evicts above 9.0 GiB down to 7.5 GiB" in text
    assert "1 cached, 3 cloud-only" in text and "0 pinned" in text
    assert "reachable" in text and "dead-lettered" in text
    doc = json.loads(run_hybridfs("status", "--json", str(mounted.path / "d")).stdout)  # any path inside
    summary = doc["summary"]
    assert summary["files_cached"] == 1 and summary["files_cloud_only"] == 3
    assert summary["cache_used_bytes"] == MiB and summary["cache_capacity_bytes"] == 10 * 1024**3
    assert summary["events_in_outbox"] == 0 and summary["consumer_lag"].keys() == {"hydrator", "purger"}
    assert doc["services"]["planner"]["high_watermark"] == 0.9


def test_pin_refuses_evict_until_unpinned(mounted: Mount, s3: Any) -> None:
    data = os.urandom(200_000)
    s3.put_object(Bucket=mounted.bucket, Key=mounted.key("p.bin"), Body=data)
    path = mounted.path / "p.bin"
    run_hybridfs("pin", "--wait", "--timeout", "30", str(path))
    assert state(path) == "cached" and status(mounted)["cache"]["pinned"] == 1
    run_hybridfs("evict", str(path))
    wait_until(lambda: status(mounted)["services"]["purger"]["outcomes"].get("pinned") == 1, timeout=20,
               message="the purger to refuse the pinned file")
    assert state(path) == "cached"
    assert "not evicting" in mounted.log_text() and "it is pinned" in mounted.log_text()
    run_hybridfs("evict", "--unpin", "--wait", "--timeout", "30", str(path))
    assert state(path) == "cloud" and status(mounted)["cache"]["pinned"] == 0
    # pin again, then unpin: the file stays cached and becomes evictable.
    run_hybridfs("pin", "--wait", str(path))
    run_hybridfs("unpin", str(path))
    wait_until(lambda: status(mounted)["cache"]["pinned"] == 0, timeout=20, message="the unpin")
    assert state(path) == "cached"
    run_hybridfs("evict", "--wait", "--timeout", "30", str(path))
    assert path.read_bytes() == data


def test_s3_url_from_any_host(mounted: Mount, s3: Any, stack: Stack) -> None:
    data = os.urandom(123_456)
    key = mounted.key("by-url.bin")
    s3.put_object(Bucket=mounted.bucket, Key=key, Body=data)
    result = run_hybridfs("hydrate", f"s3://{mounted.bucket}/{key}", "--kafka", stack.bootstrap,
                          "--topic-prefix", mounted.topic_prefix)
    assert "1 event published" in result.stderr
    wait_until(lambda: state(mounted.path / "by-url.bin") == "cached", timeout=20, message="hydration by URL")
    # An event for another bucket is not this mount's: dead-lettered, never hydrated.
    mounted.allow_log(r"rejected hydrate event .* event for bucket 'other-bucket'")
    run_hybridfs("hydrate", f"s3://other-bucket/{key}", "--no-mount-check", "--kafka", stack.bootstrap,
                 "--topic-prefix", mounted.topic_prefix)
    wait_until(lambda: status(mounted)["services"]["hydrator"]["consumer"]["dead_lettered"] == 1, timeout=20,
               message="the other bucket's event to be dead-lettered")


def test_hydrate_skips_files_larger_than_the_cache(mount_factory: Any, s3: Any) -> None:
    mount = mount_factory(extra_args=["--cache-size", "1M"])
    s3.put_object(Bucket=mount.bucket, Key=mount.key("big.bin"), Body=b"b" * (2 * MiB))
    s3.put_object(Bucket=mount.bucket, Key=mount.key("small.bin"), Body=b"s" * 1000)
    result = run_hybridfs("hydrate", "--wait", "--timeout", "30", str(mount.path))
    assert "1 event published (1 larger than the cache, skipped)" in result.stderr
    assert state(mount.path / "small.bin") == "cached" and state(mount.path / "big.bin") == "cloud"
