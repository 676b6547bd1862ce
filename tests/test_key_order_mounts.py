"""A key never moves backwards, through real mounts (issue 22; docs/semantics.md, "Order of versions").

Mounts A and B, C (the one checked: 60 s timers and the bucket's S3 event records) and a boto3 writer write one
key in turn; C must end on each newest version, and a thread reading C the whole time must never see a version
older than one it saw before. Then an old record of B is produced again into the feed, stamped 30 s later as a
host whose clock is ahead would stamp it (a duplicate, as a retrying producer or a replay writes it): C must stay
on the newest version.

Not under libfaketime: with it preloaded (Debian's faketime 0.9.10, -30 s or +30 s, libfaketimeMT too, with
FAKETIME_DONT_FAKE_MONOTONIC or FAKETIME_FORCE_MONOTONIC_FIX) every librdkafka metadata request of the process
times out, so the mount never reaches Kafka. Skewed clocks are covered by the stamps of the records here and in
tests/test_key_order.py (a record stamped 30 s behind or ahead); no clock is read to order records.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from helpers import Mount, Stack, wait_until

from hybridfs.stack.config import S3_EVENTS_TOPIC

LONG_TIMERS = ["--attr-timeout", "60", "--dir-cache-time", "60", "--negative-cache-time", "60"]
STUCK = 15.0  # far below C's 60 s timers: a version seen in time came through the feed or the S3 event records


def status(mount: Mount) -> dict[str, Any]:
    return json.loads(os.getxattr(mount.path, "user.hybridfs.status"))


def trusted(mount: Mount) -> bool:
    return status(mount).get("feed", {}).get("mode") == "trusted"


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # not there yet, or replaced between open and read (ESTALE)
        return None


class Reader(threading.Thread):
    """Reads C's file in a loop; every version seen, in order (versions are b"v<N>", N increasing)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.seen, self.stop = path, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            data = read(self.path)
            if data is not None and data.startswith(b"v"):
                n = int(data[1:].split(b" ")[0])
                if not self.seen or self.seen[-1] != n:
                    self.seen.append(n)
            time.sleep(0.005)

    def went_back(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b in zip(self.seen, self.seen[1:], strict=False) if b < a]


def last_record_of(stack: Stack, topic: str, key: str, origin_tail: str) -> tuple[bytes, bytes | None, Any]:
    """The latest record of ``key`` in ``topic`` published by the mount whose origin ends in ``origin_tail``."""
    consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"test-{secrets.token_hex(4)}",
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        parts = [TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions]
        consumer.assign(parts)
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
        found = None
        done: set[int] = set()
        deadline = time.monotonic() + 20
        while len(done) < len(parts) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            origin = dict(msg.headers() or []).get("hybridfs.origin", b"").decode()
            if msg.key() == key.encode() and origin.endswith(origin_tail):
                found = (msg.key(), msg.value(), msg.headers())
            if msg.offset() + 1 >= ends[msg.partition()]:
                done.add(msg.partition())
        assert found is not None, f"no record of {key} from {origin_tail}"
        return found
    finally:
        consumer.close()


def test_a_key_never_moves_back_with_writers_in_turn_and_an_old_record(mount_factory: Any, stack: Stack,
                                                                     s3: Any) -> None:
    # Every mount consumes the S3 event records: a writer that missed boto3's version would have its close
    # refused (its commit is conditional on the version it opened), which is not what this test is about.
    a = mount_factory(extra_args=["--s3-events-topic", S3_EVENTS_TOPIC])
    b = mount_factory(extra_args=["--s3-events-topic", S3_EVENTS_TOPIC])
    c = mount_factory(extra_args=["--s3-events-topic", S3_EVENTS_TOPIC, *LONG_TIMERS])
    for m in (a, b, c):
        wait_until(lambda m=m: trusted(m), timeout=60, message=f"{m.path}: feed caught up")
    f = "f.txt"
    reader = Reader(c.path / f)
    writers = {"C": c, "A": a, "B": b}

    def write(n: int, who: str) -> None:
        if who in writers and n > 0:  # a mount writes over what it knows: its close is conditional on that version
            wait_until(lambda: (read(writers[who].path / f) or b"").startswith(f"v{n - 1} ".encode()),
                       timeout=STUCK, message=f"{who} sees v{n - 1} before writing v{n}")
        if who == "boto3":
            s3.put_object(Bucket=stack.bucket, Key=c.key(f), Body=f"v{n} by boto3".encode())
        else:
            (writers[who].path / f).write_bytes(f"v{n} by {who}".encode())
        wait_until(lambda: (read(c.path / f) or b"").startswith(f"v{n} ".encode()), timeout=STUCK,
                   message=f"C sees v{n}, written by {who}")

    write(0, "C")  # C's own change first: records of others after it are asked of S3
    reader.start()
    try:
        for n, who in enumerate(["A", "B", "boto3", "A", "A", "B", "C", "A", "boto3", "B"], start=1):
            write(n, who)
        # B's record of v10 again, now that A writes v11 and v12: a duplicate must not put C back on v10.
        old = last_record_of(stack, f"{c.topic_prefix}.changes", c.key(f), str(b.path))
        write(11, "A")
        write(12, "A")
        applied = status(c)["feed"]["applied"]
        producer = Producer({"bootstrap.servers": stack.bootstrap})
        value = json.loads(old[1])
        value["time"] += 30  # as a host 30 s ahead stamps it: "made now"
        producer.produce(f"{c.topic_prefix}.changes", key=old[0], value=json.dumps(value).encode(), headers=old[2])
        assert producer.flush(10) == 0
        wait_until(lambda: status(c)["feed"]["applied"] > applied or status(c)["feed"].get("order", {})
                   .get("stale", 0) > 0, timeout=STUCK, message="C took in the old record")
        last: list[bytes | None] = []
        wait_until(lambda: last.append(read(c.path / f)) or last[-1] is not None, timeout=STUCK,
                   message="C reads f.txt")  # None: ESTALE, an open that raced a change
        assert (last[-1] or b"").startswith(b"v12 "), f"C went back: {last[-1]!r}"
    finally:
        reader.stop.set()
        reader.join(5)
    assert not reader.went_back(), f"C's reads went back: {reader.went_back()} in {reader.seen}"
    assert reader.seen and reader.seen[-1] == 12, reader.seen
