"""Reading events back from the real Kafka broker in tests."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition


def read_events(bootstrap: str, topic: str, match: Callable[[dict[str, Any]], bool], timeout: float = 30.0
                ) -> dict[str, Any]:
    """The first JSON event on ``topic`` (from the beginning) for which ``match`` is true; fails at the deadline."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"test-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "topic.metadata.refresh.interval.ms": 500,
    })
    seen: list[dict[str, Any]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            event = json.loads(msg.value())
            seen.append(event)
            if match(event):
                return event
    finally:
        consumer.close()
    raise AssertionError(f"no matching event on {topic} within {timeout:g}s; saw {seen[-10:]}")


def count_events(bootstrap: str, topic: str, match: Callable[[dict[str, Any]], bool], settle: float = 0.0
                 ) -> int:
    """How many events on ``topic`` match, reading to the end of every partition."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = meta.topics[topic].partitions if topic in meta.topics else {}
        total = 0
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, low)])
            read = low
            while read < high:
                msg = consumer.poll(5)
                if msg is None:
                    break
                read = msg.offset() + 1
                if not msg.error() and match(json.loads(msg.value())):
                    total += 1
        return total
    finally:
        consumer.close()
