"""Which topics `hybridfs stack prune` picks: by name and by the age of their partitions on disk (no broker)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hybridfs.stack.prune import partition_ages, stale_scratch_topics, topics_of


def _partition(data_dir: Path, name: str, age: float, now: float) -> None:
    (data_dir / name).mkdir(parents=True)
    meta = data_dir / name / "partition.metadata"
    meta.write_text("version: 0\n")
    os.utime(meta, (now - age, now - age))


def test_ages_are_of_the_youngest_partition_and_deleted_partitions_are_not_topics(tmp_path: Path) -> None:
    now = time.time()
    _partition(tmp_path, "t-a-1234.hydrate-0", 9000, now)
    _partition(tmp_path, "t-a-1234.hydrate-1", 100, now)  # a partition added later: the topic is young
    _partition(tmp_path, "t-b-5678.evict-0.0123abcd-delete", 9000, now)
    (tmp_path / "meta.properties").write_text("")
    ages = partition_ages(tmp_path, now)
    assert set(ages) == {"t-a-1234.hydrate"}
    assert abs(ages["t-a-1234.hydrate"] - 100) < 1


def test_only_old_topics_named_like_tests_and_benchmarks_are_stale() -> None:
    ages = {"t-x-1.hydrate": 8000.0, "bench-20261201-1.evict": 8000.0, "t-y-2.hydrate": 60.0,
            "hybridfs.s3-events": 9e9, "__consumer_offsets": 9e9, "prod.hydrate": 9e9, "test-z.hydrate": 9e9,
            "t-z-3-roundtrip": 8000.0}
    assert stale_scratch_topics(ages, 7200) == ["bench-20261201-1.evict", "t-x-1.hydrate", "t-z-3-roundtrip"]


def test_a_prefix_owns_its_kinds_and_its_dashed_extensions_only() -> None:
    existing = ["t-a.hydrate", "t-a.changes", "t-a-other.evict", "t-ab.hydrate", "t-a", "x.t-a.hydrate"]
    assert topics_of(["t-a"], existing) == ["t-a-other.evict", "t-a.changes", "t-a.hydrate"]
    assert topics_of([], existing) == []

