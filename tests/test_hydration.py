"""Hydration through real mounts, Kafka and MinIO: a miss turns a file ``cached``; events survive a Kafka
outage and a SIGKILL of the mount (outbox); untrusted events are dead-lettered while the mount keeps serving.

Also the measurements of issue 4 (``-s`` shows them): time from a miss to ``cached`` over 20 files, and the
throughput of ``hybridfs hydrate --wait`` over 200 files of 1 MiB.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from eventlog import read_events
from helpers import Mount, Stack, run_hybridfs, wait_until

MiB = 1024 * 1024
KAFKA_BACK_TIMEOUT = 90.0  # Kafka answers ~10 s after a start; the consumers rejoin their groups after that
# Expected in a mount while Kafka is stopped and just after it starts again (librdkafka's metadata settling).
KAFKA_OUTAGE_LOG = (r"kafka unreachable at .*: (events wait in outbox|not consuming)"
                    r"|new leader-?\d+ not found in cache"
                    # an outage longer than --local-evict-after (30 s) lets the planner purge locally
                    r"|Kafka unreachable for \d+s: purging the eviction planner's decisions locally")


def state(path: Path) -> str:
    return os.getxattr(path, "user.hybridfs.state").decode()


def mount_status(mount: Mount) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))
    return status


def wait_consuming(mount: Mount) -> None:
    """Until the hydrator's and the purger's consumers have joined their groups."""

    def ready() -> bool:
        services = mount_status(mount).get("services", {})
        return all(services.get(name, {}).get("consumer", {}).get("reachable") for name in ("hydrator", "purger"))

    wait_until(ready, timeout=30, message="the consumers to join their groups")


def put_objects(s3: Any, bucket: str, items: dict[str, bytes], threads: int = 8) -> None:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), items.items()))


@contextmanager
def kafka_stopped() -> Iterator[None]:
    """Kafka down for the body only: other tests share the broker, so it always comes back, and soon."""
    run_hybridfs("stack", "down", "kafka")
    try:
        yield
    finally:
        run_hybridfs("stack", "up", "kafka")


def test_miss_turns_cached(mounted: Mount, s3: Any, stack: Stack) -> None:
    data = os.urandom(3 * MiB + 17)
    s3.put_object(Bucket=mounted.bucket, Key=mounted.key("dir/remote.bin"), Body=data)
    path = mounted.path / "dir" / "remote.bin"
    assert state(path) == "cloud"
    assert path.read_bytes() == data  # a miss: served from S3, raises a hydrate event
    wait_until(lambda: state(path) == "cached", timeout=15, message="the missed file to be cached")
    event = read_events(stack.bootstrap, f"{mounted.topic_prefix}.hydrate",
                        lambda e: e["key"] == mounted.key("dir/remote.bin"))
    assert event["reason"] == "read-miss" and event["size"] == len(data)
    assert path.read_bytes() == data
    status = mount_status(mounted)
    assert status["services"]["hydrator"]["outcomes"]["hydrated"] == 1
    # The cached copy is the object: the one file in the cache directory has the same bytes.
    (cached,) = [p for p in (mounted.cache_dir / "objects").rglob("*") if p.is_file()]
    assert cached.read_bytes() == data


def test_hydrate_cli_recursive_wait(mounted: Mount, s3: Any) -> None:
    files = {f"tree/{d}/f{i}.bin": os.urandom(10_000 + i) for d in ("a", "b/c") for i in range(10)}
    put_objects(s3, mounted.bucket, {mounted.key(k): v for k, v in files.items()})
    result = run_hybridfs("hydrate", "--wait", "--timeout", "60", str(mounted.path / "tree"))
    assert "20 events published" in result.stderr and "20/20 files" in result.stderr
    for rel, data in files.items():
        assert state(mounted.path / rel) == "cached"
        assert (mounted.path / rel).read_bytes() == data
    again = run_hybridfs("hydrate", "--wait", str(mounted.path / "tree"))
    assert "0 events published (20 already cached)" in again.stderr


def test_kafka_outage_events_wait_in_outbox(mounted: Mount, s3: Any) -> None:
    mounted.allow_log(KAFKA_OUTAGE_LOG)
    names = [f"out/f{i}.bin" for i in range(5)]
    files = {name: os.urandom(200_000 + i) for i, name in enumerate(names)}
    put_objects(s3, mounted.bucket, {mounted.key(k): v for k, v in files.items()})
    written = os.urandom(500_000)
    with kafka_stopped():
        for name, data in files.items():
            assert (mounted.path / name).read_bytes() == data  # misses: events go to the outbox
        (mounted.path / "out" / "written.bin").write_bytes(written)  # writes keep working
        assert (mounted.path / "out" / "written.bin").read_bytes() == written
        wait_until(lambda: mount_status(mounted)["bus"]["outbox"] >= len(files), timeout=10,
                   message="the hydrate events to wait in the outbox")
        assert all(state(mounted.path / name) == "cloud" for name in files)
    # Kafka is back: the outbox drains and the waiting hydrations complete.
    wait_until(lambda: all(state(mounted.path / name) == "cached" for name in files), timeout=KAFKA_BACK_TIMEOUT,
               message="the hydrations waiting in the outbox to complete")
    # The rest of the outbox (the change feed's record of written.bin) drains too, on the bus's own retry.
    wait_until(lambda: mount_status(mounted)["bus"]["outbox"] == 0, timeout=KAFKA_BACK_TIMEOUT,
               message="the outbox to drain")
    for name, data in files.items():
        assert (mounted.path / name).read_bytes() == data


def test_sigkill_with_events_in_outbox(mount_factory: Any, s3: Any, stack: Stack) -> None:
    first = mount_factory()
    first.allow_log(KAFKA_OUTAGE_LOG)
    files = {f"k/f{i}.bin": os.urandom(100_000 + i) for i in range(4)}
    put_objects(s3, first.bucket, {first.key(k): v for k, v in files.items()})
    with kafka_stopped():
        for name, data in files.items():
            assert (first.path / name).read_bytes() == data
        wait_until(lambda: mount_status(first)["bus"]["outbox"] >= len(files), timeout=10,
                   message="the hydrate events to be stored in the outbox")
        first.kill()
    # Same cache and state directories (so the same outbox and the same cache id), another mount point.
    second = mount_factory(cache_dir=first.cache_dir, extra_args=["--state-dir", str(first.state_dir)])
    second.allow_log(KAFKA_OUTAGE_LOG)
    assert "events from an earlier run wait in the outbox" in second.log_text()
    keys = {first.key(name) for name in files}
    seen: set[str] = set()

    def all_delivered(event: dict[str, Any]) -> bool:
        seen.add(event["key"])
        return keys <= seen

    read_events(stack.bootstrap, f"{first.topic_prefix}.hydrate", all_delivered, timeout=KAFKA_BACK_TIMEOUT)
    wait_until(lambda: all(state(second.path / name) == "cached" for name in files), timeout=KAFKA_BACK_TIMEOUT,
               message="the hydrations from before the crash to complete")
    for name, data in files.items():
        assert (second.path / name).read_bytes() == data
    second.unmount()


GARBAGE: list[tuple[str, bytes, bytes]] = [  # (topic suffix, key, value)
    ("hydrate", b"x", b"not json at all"),
    ("hydrate", b"x", b"\xff\xfe binary"),
    ("hydrate", b"x", b'{"version": 99, "type": "hydrate"}'),
    ("hydrate", b"x", b"[1, 2, 3]"),
    ("evict", b"x", b'{"version": 1, "type": "explode"}'),
]


def event_json(key: str, **changes: Any) -> bytes:
    base = {"version": 1, "type": "hydrate", "key": key, "etag": None, "size": None, "reason": "test",
            "origin": "attacker", "time": time.time(), "id": os.urandom(8).hex()}
    base.update(changes)
    return json.dumps(base).encode()


def test_garbage_and_escaping_events_are_dead_lettered(mounted: Mount, s3: Any, stack: Stack,
                                                        tmp_path: Path) -> None:
    mounted.allow_log(r"sent to the dead-letter topic")
    p = mounted.prefix
    s3.put_object(Bucket=mounted.bucket, Key=f"{p}/victim.bin", Body=b"v" * 1000)
    hostile = [
        ("hydrate", event_json(f"{p}/../../escape")),
        ("hydrate", event_json(f"{p}/a/../../../etc/passwd")),
        ("hydrate", event_json(f"/{p}/absolute")),
        ("hydrate", event_json("some-other-prefix/file")),
        ("hydrate", event_json(f"{p}/nul\u0000byte")),
        ("hydrate", event_json(f"{p}/big", size=10**18)),
        ("hydrate", event_json(f"{p}/victim.bin", size=-5)),
        ("evict", event_json(f"{p}/victim.bin", type="evict", pin=True)),  # decodes; the purger rejects it
        ("hydrate", event_json(f"{p}/victim.bin", type="evict")),  # an evict event on the hydrate topic
        ("hydrate", event_json(f"{p}/victim.bin", bucket="not-this-bucket")),
    ]
    messages = [(t, b"x", v) for t, _k, v in GARBAGE] + [(t, b"k", v) for t, v in hostile]
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    for suffix, key, value in messages:
        producer.produce(f"{mounted.topic_prefix}.{suffix}", key=key, value=value)
    assert producer.flush(30) == 0
    dead = f"{mounted.topic_prefix}.dead-letter"
    wait_until(lambda: dead_letter_count(stack.bootstrap, dead) >= len(messages), timeout=30,
               message=f"{len(messages)} messages on {dead}")
    # The mount kept serving, and nothing was written outside the cache directory.
    data = os.urandom(300_000)
    (mounted.path / "after.bin").write_bytes(data)
    assert (mounted.path / "after.bin").read_bytes() == data
    assert (mounted.path / "victim.bin").read_bytes() == b"v" * 1000
    assert mounted.proc.poll() is None
    for escaped in (tmp_path / "escape", mounted.cache_dir.parent / "escape", mounted.cache_dir / "escape"):
        assert not escaped.exists()
    inside = [mounted.cache_dir / "objects", mounted.cache_dir / "sums"]  # data files and their checksums
    outside = [p for p in mounted.cache_dir.rglob("*") if p.is_file()
               and not (any(p.is_relative_to(d) for d in inside) or p.name.startswith("index.sqlite"))]
    assert outside == []


def dead_letter_count(bootstrap: str, topic: str) -> int:
    """Messages on the dead-letter topic (they are raw bytes, not necessarily JSON)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{os.urandom(4).hex()}",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            return 0
        total = 0
        for partition in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            total += max(0, high - low)
        return total
    finally:
        consumer.close()


# -- measurements (issue 4) ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_measure_miss_to_cached_and_hydrate_throughput(mounted: Mount, s3: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Reproduce with: .venv/bin/pytest tests/test_hydration.py -k measure -s"""
    wait_consuming(mounted)  # a new mount joins its consumer groups first (a second or two)
    # 1. Time from a read miss to `cached`, 20 files of 1 MiB, one at a time.
    singles = {f"miss/f{i:02d}.bin": os.urandom(MiB) for i in range(20)}
    put_objects(s3, mounted.bucket, {mounted.key(k): v for k, v in singles.items()})
    os.listdir(mounted.path / "miss")  # the listing is not part of the measurement
    latencies = []
    for name, data in singles.items():
        path = mounted.path / name
        started = time.monotonic()
        with open(path, "rb") as fh:
            assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest()
        wait_until(lambda p=path: state(p) == "cached", timeout=30, interval=0.002,  # type: ignore[misc]
                   message=f"{name} to be cached")
        latencies.append(time.monotonic() - started)

    # 2. `hybridfs hydrate --wait` over 200 files of 1 MiB.
    many = {f"warm/d{i % 10}/f{i:03d}.bin": os.urandom(MiB) for i in range(200)}
    put_objects(s3, mounted.bucket, {mounted.key(k): v for k, v in many.items()})
    os.listdir(mounted.path / "warm")
    started = time.monotonic()
    result = run_hybridfs("hydrate", "--wait", "--timeout", "300", str(mounted.path / "warm"))
    elapsed = time.monotonic() - started
    waited = result.stderr.strip().splitlines()[-1]  # the progress line: time from publishing to all cached
    assert all(state(mounted.path / name) == "cached" for name in many)
    with capsys.disabled():
        print(f"\nmiss -> cached over {len(latencies)} files of 1 MiB: median {statistics.median(latencies) * 1000:.0f}"
              f" ms, worst {max(latencies) * 1000:.0f} ms, best {min(latencies) * 1000:.0f} ms; all (ms): "
              f"{[round(x * 1000) for x in latencies]}")
        print(f"hybridfs hydrate --wait, 200 files of 1 MiB: {elapsed:.2f}s (CLI included), "
              f"{200 / elapsed:.0f} files/s, {200 * MiB / elapsed / 1e6:.1f} MB/s; after publishing: {waited}")
    assert statistics.median(latencies) < 5.0


def test_remount_under_another_topic_prefix_consumes_at_once(mount_factory: Any, s3: Any, tmp_path: Path,
                                                            topic_prefix: str) -> None:
    """The consumer groups are per cache *and* topic prefix: a static member that came back with another
    subscription used to keep its old assignment for about a minute and consume nothing."""
    cache_dir = tmp_path / "shared-cache"
    first = mount_factory(cache_dir=cache_dir)
    wait_consuming(first)
    first.unmount()
    second = mount_factory(cache_dir=cache_dir, extra_args=["--topic-prefix", f"{topic_prefix}-other"])
    wait_consuming(second)
    s3.put_object(Bucket=second.bucket, Key=second.key("cold.bin"), Body=b"c" * 5000)
    path = second.path / "cold.bin"
    assert path.read_bytes() == b"c" * 5000
    wait_until(lambda: state(path) == "cached", timeout=15, message="the missed file to be cached")
