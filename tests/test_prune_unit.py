"""Which topics `hybridfs stack prune` picks: by name, and by when a prune first saw them (no broker)."""

from __future__ import annotations

import json
from pathlib import Path

from hybridfs.stack.prune import stale_scratch_topics, topics_of

NOW = 1_800_000_000.0


def test_a_topic_is_stale_a_period_after_a_prune_first_saw_it(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    assert stale_scratch_topics(["t-a-1.hydrate", "prod.hydrate"], seen, 7200, now=NOW) == []  # first seen now
    assert json.loads(seen.read_text()) == {"t-a-1.hydrate": NOW}  # only scratch names are recorded
    later = ["t-a-1.hydrate", "t-b-2.evict"]
    assert stale_scratch_topics(later, seen, 7200, now=NOW + 3600) == []
    assert stale_scratch_topics(later, seen, 7200, now=NOW + 7200) == ["t-a-1.hydrate"]
    assert stale_scratch_topics(["t-b-2.evict"], seen, 7200, now=NOW + 7300) == []  # a gone topic is forgotten
    assert set(json.loads(seen.read_text())) == {"t-b-2.evict"}


def test_an_unreadable_record_makes_every_topic_new(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    seen.write_text("{not json")
    assert stale_scratch_topics(["t-a-1.hydrate"], seen, 0.5, now=NOW) == []
    assert stale_scratch_topics(["t-a-1.hydrate"], seen, 0.5, now=NOW + 1) == ["t-a-1.hydrate"]


def test_only_topics_named_like_tests_and_benchmarks_are_scratch(tmp_path: Path) -> None:
    names = ["t-x-1.hydrate", "bench-20261201-1.evict", "hybridfs.s3-events", "__consumer_offsets", "prod.hydrate",
             "test-z.hydrate", "t-z-3-roundtrip"]
    assert stale_scratch_topics(names, tmp_path / "seen.json", 0, now=NOW) == [
        "bench-20261201-1.evict", "t-x-1.hydrate", "t-z-3-roundtrip"]


def test_a_prefix_owns_its_kinds_and_its_dashed_extensions_only() -> None:
    existing = ["t-a.hydrate", "t-a.changes", "t-a-other.evict", "t-ab.hydrate", "t-a", "x.t-a.hydrate"]
    assert topics_of(["t-a"], existing) == ["t-a-other.evict", "t-a.changes", "t-a.hydrate"]
    assert topics_of([], existing) == []
