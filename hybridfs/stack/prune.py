"""``hybridfs stack prune``: delete the Kafka topics that tests and benchmarks left on the local broker.

Every test and bench run makes its own topics (``t-<test>-<hex>.*``, ``bench-<stamp>-*``) so that runs never read
each other's events. Left alone they pile up: after a few hundred runs the broker held 14,789 partitions, needed
longer than its heap allowed to load them at start (OutOfMemoryError) and the next suite found no Kafka at all.
Runs delete their own topics when they end; this deletes what killed runs left, by age, so that a run still going
beside it (younger than ``older_than``) keeps its topics; topics of other names are never touched.

Kafka does not say when a topic was made (and rewrites the files in a partition's directory), so the age of a topic
is the time since a prune first saw it, kept in a small JSON file beside the broker's data (``SEEN_FILE``): a topic
is deleted by the first prune that runs ``older_than`` after one saw it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from hybridfs.stack.config import KAFKA_BOOTSTRAP

log = logging.getLogger(__name__)

SCRATCH_TOPIC = re.compile(r"(t|bench)-[a-z0-9-]+(\..+)?")  # what tests and benchmarks name their topics
DEFAULT_OLDER_THAN_HOURS = 2.0  # a run older than this is over: the full suite takes half an hour
BATCH = 200  # topics per DeleteTopics request: the broker answers each within the operation time-out
SEEN_FILE = "scratch-topics.json"  # topic -> when a prune first saw it (seconds since the epoch)


def _load_seen(path: Path) -> dict[str, float]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every topic is new (deleted a period later)
    if not isinstance(doc, dict):
        return {}
    return {k: float(v) for k, v in doc.items() if isinstance(k, str) and isinstance(v, int | float)}


def stale_scratch_topics(existing: Iterable[str], seen_path: Path, older_than: float,
                         now: float | None = None) -> list[str]:
    """The test and bench topics among ``existing`` that a prune first saw ``older_than`` seconds ago or earlier,
    sorted. Records the ones seen for the first time in ``seen_path``, and forgets those that no longer exist."""
    now = time.time() if now is None else now
    seen = _load_seen(seen_path)
    scratch = [t for t in existing if SCRATCH_TOPIC.fullmatch(t)]
    seen = {t: seen.get(t, now) for t in scratch}
    with contextlib.suppress(OSError):  # not recorded: only delays the deletion
        tmp = seen_path.with_name(seen_path.name + ".tmp")
        tmp.write_text(json.dumps(seen, sort_keys=True))
        os.replace(tmp, seen_path)
    return sorted(t for t in scratch if now - seen[t] >= older_than)


def topics_of(prefixes: Iterable[str], existing: Iterable[str]) -> list[str]:
    """The existing topics that belong to any of ``prefixes``: ``<prefix>.<kind>``, and ``<prefix>-<more>`` (a
    test's second mount or its own topic)."""
    wanted = tuple(p + sep for p in prefixes for sep in ".-")
    return sorted(t for t in existing if wanted and t.startswith(wanted))


def delete(names: Sequence[str], bootstrap: str = KAFKA_BOOTSTRAP, progress: bool = False) -> int:
    """Delete ``names`` in batches; the number the broker confirmed (a topic it refused or did not confirm in
    time is left for the next prune)."""
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
