"""``hybridfs stack prune``: delete the Kafka topics that tests and benchmarks left on the local broker.

Every test and bench run makes its own topics (``t-<test>-<hex>.*``, ``bench-<stamp>-*``) so that runs never read
each other's events. Left alone they pile up: after a few hundred runs the broker held 14,789 partitions, needed
longer than its heap allowed to load them at start (OutOfMemoryError) and the next suite found no Kafka at all.
Runs delete their own topics when they end; this deletes what killed runs left, by age, so that a run still going
beside it (younger than ``older_than``) keeps its topics. The age of a topic is that of its partition directories on
the broker's disk (the stack runs the broker, so it can read them); topics of other names are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from hybridfs.stack.config import KAFKA_BOOTSTRAP

log = logging.getLogger(__name__)

SCRATCH_TOPIC = re.compile(r"(t|bench)-[a-z0-9-]+(\..+)?")  # what tests and benchmarks name their topics
DEFAULT_OLDER_THAN_HOURS = 2.0  # a run older than this is over: the full suite takes half an hour
BATCH = 200  # topics per DeleteTopics request: the broker answers each within the operation time-out


def partition_ages(data_dir: Path, now: float | None = None) -> dict[str, float]:
    """Topic name -> seconds since its youngest partition directory was made (``<topic>-<n>`` directories;
    those already being deleted, ``<topic>-<n>.<id>-delete``, are not topics any more)."""
    now = time.time() if now is None else now
    ages: dict[str, float] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in data_dir.iterdir():
            match = re.fullmatch(r"(.+)-\d+", entry.name)
            if match is None or not entry.is_dir():
                continue
            try:
                made = (entry / "partition.metadata").stat().st_mtime
            except OSError:
                made = entry.stat().st_mtime
            topic = match.group(1)
            ages[topic] = min(ages.get(topic, float("inf")), now - made)
    return ages


def stale_scratch_topics(ages: dict[str, float], older_than: float) -> list[str]:
    """The test and bench topics older than ``older_than`` seconds, sorted."""
    return sorted(t for t, age in ages.items() if SCRATCH_TOPIC.fullmatch(t) and age >= older_than)


def topics_of(prefixes: Iterable[str], existing: Iterable[str]) -> list[str]:
    """The existing topics that belong to any of ``prefixes``: ``<prefix>.<kind>``, and ``<prefix>-<more>`` (a
    test's second mount or its own topic)."""
    wanted = tuple(p + sep for p in prefixes for sep in ".-")
    return sorted(t for t in existing if wanted and t.startswith(wanted))


def delete(names: Sequence[str], bootstrap: str = KAFKA_BOOTSTRAP, progress: bool = False) -> int:
    """Delete ``names`` in batches; the number the broker confirmed. Raises KafkaUnavailable-like errors from
    the admin client only when it cannot be made."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    deleted = 0
    for start in range(0, len(names), BATCH):
        batch = list(names[start:start + BATCH])
        for name, future in admin.delete_topics(batch, operation_timeout=30, request_timeout=60).items():
            try:
                future.result(timeout=90)
                deleted += 1
            except Exception as exc:  # already gone, or the broker is slow: the next prune tries again
                log.debug("topic %s not deleted: %s", name, exc)
        if progress:
            print(f"deleted {deleted} of {len(names)} topics", flush=True)
    return deleted


def existing_topics(bootstrap: str = KAFKA_BOOTSTRAP) -> list[str]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    return list(admin.list_topics(timeout=30).topics)
