"""Reference-model property test of coherence: two mounts and a direct S3 writer (issue 13).

Random sequences of changes (whole-file writes and deletes) made on mount A, or with boto3 straight to S3, and
reads on mount B (a new open, read and close; or a stat). The model keeps, per name, every version with the time
its change returned (close() on A, the boto3 call). A read on B that began at time t may return any version
except one that was already replaced by a change returned before ``t - bound``: B never reads a version older
than the last one whose change returned before its open began, beyond the bound.

Bounds: a change on A reaches B through the mounts' change feed: ``FEED_BOUND``, a p99 goal — a read past it
(within B's timers, ``S3_BOUND``, which hold for every change) is counted as late, and one late read in a run
(or 1 % of the reads) is tolerated. A boto3 change reaches B through the bucket's S3 event records (B runs with
``--s3-events-topic``), which MinIO's queued Kafka target delivers 1-4 s late on this machine, and otherwise when
B's ``--dir-cache-time`` runs out: ``S3_BOUND``, on every read. A ``pause`` rule lets time pass, so that reads
land beyond the bounds too.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from conftest import MountFactory
from helpers import Mount, Stack, wait_until
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from hybridfs.stack.config import S3_EVENTS_TOPIC

NAMES = ["a", "b", "d/c"]
DIR_CACHE_TIME = 3.0
FEED_BOUND = 1.0  # a p99 goal: see the module's text
S3_BOUND = DIR_CACHE_TIME + 1.0  # B's timers bound what the records do not deliver in time
DATA = st.binary(min_size=0, max_size=200)
# A's close of a file boto3 replaced or deleted since A last looked: refused by S3 (the write path's conditions).
A_CONFLICT_LINES = r"S3 said PreconditionFailed|changed remotely|changed in S3 while this file was open|" \
                   r"closed with changes that are not stored"


@dataclass
class Version:
    content: bytes | None  # None: deleted
    done: float  # monotonic time the change returned
    bound: float  # how long B may still show the version before this one (the goal)
    hard: float  # ... on every read (B's timers)


@dataclass
class History:
    versions: list[Version] = field(default_factory=lambda: [Version(None, 0.0, 0.0, 0.0)])

    def allowed(self, began: float, *, hard: bool = False) -> list[bytes | None]:
        """Contents a read that began at ``began`` may return: every version not replaced too long before
        (``hard``: by the bounds that hold on every read, else by the goals)."""
        out = []
        for i, v in enumerate(self.versions):
            later = self.versions[i + 1] if i + 1 < len(self.versions) else None
            if later is None or later.done + (later.hard if hard else later.bound) > began:
                out.append(v.content)
        return out


class CoherenceModel(RuleBasedStateMachine):
    a: Mount
    b: Mount
    s3: Any
    bucket: str
    examples = 0
    reads = 0  # reads and stats on B checked, over the whole run
    late: list[str] = []  # those within the hard bounds but past a goal (FEED_BOUND)

    @initialize()
    def fresh_folder(self) -> None:
        """Each example works in a folder of its own (made on A, seen on B), so examples do not mix."""
        CoherenceModel.examples += 1
        self.folder = f"ex{CoherenceModel.examples}"
        (self.a.path / self.folder / "d").mkdir(parents=True)
        wait_until(lambda: (self.b.path / self.folder / "d").is_dir(), timeout=S3_BOUND + 5,
                   message="the example's folder on B")
        self.history = {name: History() for name in NAMES}

    def rel(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def record(self, name: str, content: bytes | None, bound: float) -> None:
        self.history[name].versions.append(Version(content, time.monotonic(), bound, S3_BOUND))

    def check(self, name: str, began: float, got: Any, what: str, view: Any = lambda c: c) -> None:
        """``got`` (``view`` of a version's content) must be allowed by the hard bounds; past a goal, it is late."""
        CoherenceModel.reads += 1
        history = self.history[name]
        allowed = [view(c) for c in history.allowed(began, hard=True)]
        assert got in allowed, f"B's {what} of {name} gave {got!r}; allowed then: {allowed!r}"
        if got not in [view(c) for c in history.allowed(began)]:
            CoherenceModel.late.append(f"{what} of {self.rel(name)} gave {got!r} at {began:.2f}")

    @rule(name=st.sampled_from(NAMES), data=DATA)
    def write_on_a(self, name: str, data: bytes) -> None:
        try:
            (self.a.path / self.rel(name)).write_bytes(data)
        except OSError as exc:
            # A had not seen a boto3 change yet (it reads no S3 event records): its close is conditional on the
            # version it knew, S3 refuses it, and S3 keeps what boto3 left (README, "Two writers of one file").
            assert exc.errno == errno.EIO, exc
            return
        self.record(name, data, FEED_BOUND)

    @rule(name=st.sampled_from(NAMES))
    def delete_on_a(self, name: str) -> None:
        try:
            os.unlink(self.a.path / self.rel(name))
        except FileNotFoundError:
            return  # nothing there, or A has not seen a boto3 put yet (A reads no S3 event records): no change
        self.record(name, None, FEED_BOUND)

    @rule(name=st.sampled_from(NAMES), data=DATA)
    def put_with_boto3(self, name: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self.a.key(self.rel(name)), Body=data)
        self.record(name, data, S3_BOUND)

    @rule(name=st.sampled_from(NAMES))
    def delete_with_boto3(self, name: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.a.key(self.rel(name)))
        if self.history[name].versions[-1].content is not None:
            self.record(name, None, S3_BOUND)

    @rule(seconds=st.sampled_from([0.3, 1.2, S3_BOUND + 0.2]))
    def pause(self, seconds: float) -> None:
        time.sleep(seconds)  # lets time pass on purpose: the bounds are about time

    @rule(name=st.sampled_from(NAMES))
    def read_on_b(self, name: str) -> None:
        began = time.monotonic()
        got = read_fresh(self.b.path / self.rel(name))
        self.check(name, began, got, "read")

    @rule(name=st.sampled_from(NAMES))
    def stat_on_b(self, name: str) -> None:
        began = time.monotonic()
        try:
            size: int | None = os.stat(self.b.path / self.rel(name)).st_size
        except FileNotFoundError:
            size = None
        self.check(name, began, size, "stat (size)", lambda c: None if c is None else len(c))


def read_fresh(path: Path) -> bytes | None:
    """A new open, read and close; an open racing a change (ESTALE) is retried, as the kernel would."""
    for _ in range(5):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
    raise AssertionError(f"open of {path} kept failing with ESTALE")


@pytest.mark.slow
def test_b_never_reads_a_version_older_than_the_bounds(mount_factory: MountFactory, s3: Any, stack: Stack) -> None:
    timers = ["--dir-cache-time", str(DIR_CACHE_TIME)]
    a = mount_factory(extra_args=timers)
    a.allow_log(A_CONFLICT_LINES)
    b = mount_factory(extra_args=[*timers, "--s3-events-topic", S3_EVENTS_TOPIC])
    CoherenceModel.a, CoherenceModel.b, CoherenceModel.s3, CoherenceModel.bucket = a, b, s3, stack.bucket
    CoherenceModel.examples, CoherenceModel.reads, CoherenceModel.late = 0, 0, []
    run_state_machine_as_test(CoherenceModel, settings=settings(
        max_examples=8, stateful_step_count=20, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    reads, late = CoherenceModel.reads, CoherenceModel.late
    print(f"\ncoherence model: {reads} reads and stats on B, {len(late)} past the feed's {FEED_BOUND:g}s goal")
    # A run has a few dozen reads, too few for a p99 (that is test_feed.py::test_visibility_latency_over_200_changes):
    # one straggler is tolerated, as in any 100; every read still held B's timers (the hard bounds) above.
    assert len(late) <= max(1, reads // 100), f"{len(late)} of {reads} reads on B past the feed's goal: {late}"
