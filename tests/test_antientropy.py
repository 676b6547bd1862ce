"""Nothing a mount's own consumers miss can stand forever (issue 22): changes whose records never reach a trusting
mount are seen within --max-stale (the anti-entropy pass), S3 event records of other feed mounts are compared with
what the mount knows instead of dropped, and a commit that lands after its close was told EIO is published.

Each reading mount runs with metadata timers far longer than the test (SLOW): without the mechanism under test,
it would serve the old version for all of it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from conftest import MountFactory
from helpers import Mount, Stack, wait_until
from s3proxy import Rule, S3FaultProxy
from tcpcut import CuttableProxy
from test_foreign_writes import minio_record

from hybridfs.bench.avail_faults import PrivateKafka, free_port
from hybridfs.events.topics import create_topics
from hybridfs.services.feed_schema import changes_topic
from hybridfs.services.foreign import agent_tokens

MAX_STALE = 4.0
# What a loaded machine (2 cores, other test runs) may add to the bound: a pass's LISTs and the stats polling.
SLACK = 4.0
SLOW = ["--dir-cache-time", "300", "--attr-timeout", "60", "--negative-cache-time", "60"]


def status(mount: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))
    return doc


def wait_trusted(mount: Mount) -> None:
    wait_until(lambda: status(mount)["feed"]["mode"] == "trusted", timeout=30, message="the change feed trusted")


def size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def seen_within(predicate: Any, bound: float, what: str) -> float:
    started = time.monotonic()
    wait_until(predicate, timeout=bound, interval=0.05, message=what)
    return time.monotonic() - started


def test_changes_whose_records_never_arrive_are_seen_within_max_stale(
    mount_factory: MountFactory, s3: Any, stack: Stack
) -> None:
    """boto3 overwrites, deletes and creates in a directory the mount knows; the mount reads no S3 event records
    and the feed carries nothing of boto3's: only the anti-entropy pass can tell. Before it: the old size, the
    deleted file and the listing without the new file stood for --dir-cache-time (300 s)."""
    mount = mount_factory(extra_args=[*SLOW, "--max-stale", str(MAX_STALE)])
    wait_trusted(mount)
    d = mount.path / "d"
    d.mkdir()
    (d / "over").write_bytes(b"v1")
    (d / "gone").write_bytes(b"here")
    assert sorted(os.listdir(d)) == ["gone", "over"]
    assert (d / "over").read_bytes() == b"v1"
    new = b"v2, written by boto3"
    s3.put_object(Bucket=stack.bucket, Key=mount.key("d/over"), Body=new)
    s3.delete_object(Bucket=stack.bucket, Key=mount.key("d/gone"))
    s3.put_object(Bucket=stack.bucket, Key=mount.key("d/new"), Body=b"n")
    took = seen_within(lambda: size_or_none(d / "over") == len(new) and size_or_none(d / "gone") is None
                       and "new" in os.listdir(d), MAX_STALE + SLACK, "boto3's changes, by the anti-entropy pass")
    print(f"boto3's changes seen after {took:.2f}s (--max-stale {MAX_STALE:g})")
    assert (d / "over").read_bytes() == new  # the kernel's pages and the cached copy of v1 are gone too
    assert sorted(os.listdir(d)) == ["new", "over"]
    # "new": its listing went with "gone"
    wait_until(lambda: status(mount)["antientropy"]["invalidated"] >= 2, timeout=5, message="the pass to count them")


def test_the_bound_holds_for_changes_made_at_any_moment(mount_factory: MountFactory, s3: Any, stack: Stack) -> None:
    """Twelve boto3 overwrites of known files, each at a random moment of the pass schedule, each timed until a
    stat shows it: none takes longer than --max-stale (with room for a loaded machine), and on average about a
    quarter of it (half the pass interval). Before the pass: none was seen within the test."""
    import random

    max_stale = 2.0
    mount = mount_factory(extra_args=[*SLOW, "--max-stale", str(max_stale)])
    wait_trusted(mount)
    names = [f"f{i}" for i in range(12)]
    for name in names:
        (mount.path / name).write_bytes(b"v1")
    assert [size_or_none(mount.path / name) for name in names] == [2] * len(names)
    rng = random.Random(22)
    delays = []
    for i, name in enumerate(names):
        time.sleep(rng.uniform(0, max_stale / 2))  # a random moment between two passes
        body = b"v2" * (i + 2)
        s3.put_object(Bucket=stack.bucket, Key=mount.key(name), Body=body)
        delays.append(seen_within(lambda name=name, body=body: size_or_none(mount.path / name) == len(body),
                                  max_stale + SLACK, f"the overwrite of {name}, by the anti-entropy pass"))
    print("seen after " + ", ".join(f"{d:.2f}" for d in delays) + f" s (--max-stale {max_stale:g})")
    assert max(delays) <= max_stale + 1.0, delays  # the bound, plus a second for a loaded machine
    assert status(mount)["feed"]["mode"] == "trusted"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_mount_cut_off_kafka_writes_and_a_trusting_mount_sees_it_within_max_stale(
    mount_factory: MountFactory, stack: Stack
) -> None:
    """One mount cannot reach Kafka (its bootstrap is a port nobody listens on: its records wait in its outbox)
    while the reading mount is caught up and trusts what it knows. The writer overwrites a file the reader knows.
    Before: the reader served the old version for --dir-cache-time (300 s), and with S3 event records for as
    long as no other record of the key came."""
    reader = mount_factory(extra_args=[*SLOW, "--max-stale", str(MAX_STALE)])
    wait_trusted(reader)
    target = reader.path / "f"
    target.write_bytes(b"v1, written by the reader")
    assert target.read_bytes() == b"v1, written by the reader"
    cut = mount_factory(extra_args=["--kafka", f"127.0.0.1:{closed_port()}"])
    cut.allow_log(r"kafka unreachable at .*: (events wait in outbox|not consuming)")
    assert (cut.path / "f").read_bytes() == b"v1, written by the reader"
    new = b"v2, written by the mount that is cut off Kafka"
    (cut.path / "f").write_bytes(new)
    assert status(cut)["feed"]["mode"] != "trusted"
    took = seen_within(lambda: size_or_none(target) == len(new), MAX_STALE + SLACK,
                       "the cut-off mount's change, by the anti-entropy pass")
    print(f"the change of the mount cut off Kafka seen after {took:.2f}s (--max-stale {MAX_STALE:g})")
    assert target.read_bytes() == new
    assert status(reader)["feed"]["mode"] == "trusted"  # the reader never fell back: the pass did it


class TwoListenerKafka(PrivateKafka):
    """A private broker (the shared one must not be reconfigured or stopped) with a second listener, CUT, whose
    advertised address is ``proxy``: a client bootstrapped there reaches the broker only through the proxy, so
    cutting it takes Kafka from that client alone."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.cut_port = free_port()
        self.proxy = CuttableProxy(("127.0.0.1", self.cut_port))

    def prepare(self) -> None:
        super().prepare()
        path = self.dir / "server.properties"
        lines = []
        for line in path.read_text().splitlines():
            if line.startswith("listeners="):
                line += f",CUT://127.0.0.1:{self.cut_port}"
            elif line.startswith("advertised.listeners="):
                line += f",CUT://127.0.0.1:{self.proxy.port}"
            elif line.startswith("listener.security.protocol.map="):
                line += ",CUT:PLAINTEXT"
            lines.append(line)
        path.write_text("\n".join(lines) + "\n")

    @property
    def cut_bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"


@pytest.fixture
def two_listener_kafka(tmp_path: Path) -> Iterator[TwoListenerKafka]:
    """Requested before mount_factory, so it is stopped after the mounts are."""
    kafka = TwoListenerKafka(tmp_path / "kafka")
    try:
        kafka.prepare()
        kafka.start()
        yield kafka
    finally:
        kafka.proxy.close()
        kafka.kill()


def test_one_mount_loses_kafka_mid_run_while_the_reader_keeps_it(
    two_listener_kafka: TwoListenerKafka, mount_factory: MountFactory
) -> None:
    """The writer reaches the broker only through a proxy the test cuts; the reader keeps the broker and stays
    caught up, so it trusts what it knows. A change made while the writer is cut off is seen within --max-stale;
    when the writer's Kafka comes back its outbox delivers the late record, and the reader stays on the newest
    version. Before the anti-entropy pass: the reader kept the old version until the late record came (here, for
    as long as the test kept the writer cut off), or for good had the writer been killed meanwhile."""
    kafka = two_listener_kafka
    reader = mount_factory(extra_args=["--kafka", kafka.bootstrap, *SLOW, "--max-stale", str(MAX_STALE)])
    writer = mount_factory(extra_args=["--kafka", kafka.cut_bootstrap])
    writer.allow_log(r"kafka unreachable at .*: (events wait in outbox|not consuming)"
                     r"|new leader-?\d+ not found in cache")
    wait_trusted(reader)
    wait_trusted(writer)
    target = reader.path / "f"
    (writer.path / "f").write_bytes(b"v1, while connected")
    # Its record delivered and applied before the cut: a record of v1 arriving late would make the reader ask S3.
    wait_until(lambda: status(writer)["bus"]["outbox"] == 0 and status(reader)["feed"]["applied"] >= 1,
               timeout=10, message="v1's feed record delivered and applied")
    assert target.read_bytes() == b"v1, while connected"

    kafka.proxy.cut_off()
    wait_until(lambda: status(writer)["feed"]["mode"] != "trusted", timeout=10, message="the writer cut off")
    new = b"v2, made while the writer is cut off Kafka"
    (writer.path / "f").write_bytes(new)
    assert status(writer)["bus"]["outbox"] >= 1  # its record waits
    took = seen_within(lambda: size_or_none(target) == len(new), MAX_STALE + SLACK,
                       "the cut-off writer's change, by the anti-entropy pass")
    print(f"the change of the mount cut off Kafka mid-run seen after {took:.2f}s (--max-stale {MAX_STALE:g})")
    assert target.read_bytes() == new
    assert status(reader)["feed"]["mode"] == "trusted"  # the reader never fell back: the pass did it

    newest = b"v3, by the reader"
    target.write_bytes(newest)
    kafka.proxy.restore()  # the writer's outbox delivers its late record of v2 now
    wait_until(lambda: status(writer)["bus"]["outbox"] == 0, timeout=30, message="the writer's outbox delivered")
    published = status(writer)["feed"]["published"]
    wait_until(lambda: status(reader)["feed"]["applied"] >= published, timeout=10,
               message="the late record applied by the reader")
    assert target.read_bytes() == newest, "a late record put the key back on an older version"


def feed_record(stack: Stack, mount: Mount, name: str, etag: str, size: int) -> bytes:
    """MinIO's record of a request made by another mount on ``mount``'s change feed (its User-Agent token)."""
    token = agent_tokens("another-host:/mnt", f"{stack.bootstrap} {changes_topic(mount.topic_prefix)}")[1]
    doc = json.loads(minio_record(stack.bucket, mount.key(name), "s3:ObjectCreated:Put", etag, size))
    doc["Records"][0]["source"]["userAgent"] = f"Boto3/1.35 md/Botocore#1.35 {token}"
    return json.dumps(doc).encode()


def test_an_s3_event_record_of_another_feed_mount_is_compared_not_dropped(
    mount_factory: MountFactory, s3: Any, stack: Stack, topic_prefix: str, s3_proxy: S3FaultProxy
) -> None:
    """A change by another mount on the same feed whose feed record never came (written to S3 directly here),
    told only by its S3 event record: another ETag than the mount knows invalidates; the same ETag again costs
    nothing. Before: every record carrying the feed's token was dropped, and the old version stood (with S3 event
    records read, known attributes stand until a record of the key arrives)."""
    topic = f"{topic_prefix}.s3-events"
    create_topics(stack.bootstrap, [topic], partitions=1)
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--s3-events-topic", topic, *SLOW,
                                      "--max-stale", "0"])
    wait_until(lambda: status(mount)["s3_events"]["healthy"], timeout=30, message="the S3 event records read")
    wait_trusted(mount)
    target = mount.path / "f"
    target.write_bytes(b"v1")
    assert target.read_bytes() == b"v1"
    new = b"v2, by another mount whose feed record was lost"
    etag = s3.put_object(Bucket=stack.bucket, Key=mount.key("f"), Body=new)["ETag"].strip('"')
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    producer.produce(topic, value=feed_record(stack, mount, "f", etag, len(new)))
    assert producer.flush(10) == 0
    seen_within(lambda: size_or_none(target) == len(new), 10, "the other feed mount's change, by its S3 record")
    assert target.read_bytes() == new
    assert status(mount)["s3_events"]["feed_missed"] == 1

    heads = s3_proxy.add(Rule(method="HEAD", path=re.escape(mount.key("f")), action="delay", delay=0.0))
    producer.produce(topic, value=feed_record(stack, mount, "f", etag, len(new)))
    assert producer.flush(10) == 0
    wait_until(lambda: status(mount)["s3_events"]["feed_known"] == 1, timeout=10, message="the same version again")
    assert target.read_bytes() == new
    assert heads.hits == 0 and status(mount)["s3_events"]["feed_missed"] == 1


def test_a_commit_that_lands_after_its_close_was_told_eio_is_published(
    mount_factory: MountFactory, stack: Stack, s3_proxy: S3FaultProxy
) -> None:
    """The writer's PUT reaches S3 but its answer is held past --write-timeout: close() fails with EIO, then the
    answer comes and the version stands in S3. The reading mount (no S3 event records, no anti-entropy pass) hears
    of it from the feed. Before: the fence published nothing, and the reader kept the old version for
    --dir-cache-time (300 s)."""
    reader = mount_factory(extra_args=[*SLOW, "--max-stale", "0"])
    wait_trusted(reader)
    target = reader.path / "doc"
    target.write_bytes(b"v1")
    assert target.read_bytes() == b"v1"
    writer = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--write-timeout", "2"])
    writer.allow_log(r"did not finish within|closed with changes that are not stored|S3 slow or unreachable")
    assert (writer.path / "doc").read_bytes() == b"v1"
    held = s3_proxy.add(Rule(method="PUT", path=re.escape(f"/{writer.bucket}/{writer.key('doc')}") + "$",
                             action="late", times=1))
    late = b"v2, its close was told EIO"
    with pytest.raises(OSError) as failure:
        (writer.path / "doc").write_bytes(late)
    assert failure.value.errno == errno.EIO
    assert held.hits == 1
    s3_proxy.remove(held)  # S3's answer reaches the writer now: the version it stored stands
    wait_until(lambda: "landed later" in writer.log_text(), timeout=10, message="the late commit to land")
    seen_within(lambda: size_or_none(target) == len(late), 10, "the late commit, by the feed")
    assert target.read_bytes() == late


def test_a_rename_whose_copy_answer_was_lost_is_published(
    mount_factory: MountFactory, stack: Stack, s3_proxy: S3FaultProxy
) -> None:
    """The writer's COPY (the first half of a rename) reaches S3, but its answer is held past --write-timeout:
    rename fails with EIO while S3 holds the new name. The reading mount, which remembers the name as missing, is
    told "changed, ask S3" through the feed. Before: nothing was published, and the reader said ENOENT for
    --negative-cache-time (60 s)."""
    reader = mount_factory(extra_args=[*SLOW, "--max-stale", "0"])
    wait_trusted(reader)
    (reader.path / "a").write_bytes(b"data")
    assert not (reader.path / "b").exists()  # remembered as missing
    writer = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--write-timeout", "2"])
    writer.allow_log(r"no progress for|did not finish within|S3 slow or unreachable")
    assert (writer.path / "a").read_bytes() == b"data"
    held = s3_proxy.add(Rule(method="PUT", path=re.escape(f"/{writer.bucket}/{writer.key('b')}") + "$",
                             action="late"))
    with pytest.raises(OSError) as failure:
        os.rename(writer.path / "a", writer.path / "b")
    assert failure.value.errno == errno.EIO
    s3_proxy.remove(held)
    seen_within(lambda: (reader.path / "b").exists(), 10, "the copy whose answer was lost, by the feed")
    assert (reader.path / "b").read_bytes() == b"data"
