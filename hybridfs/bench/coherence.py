"""The ``coherence`` workload: how long a change made in one place takes to show in another mount.

Two hybridfs mounts (A and B) with separate caches on one prefix. A writer (mount A, or boto3 straight to S3)
makes a sequence of changes, each a cycle over one name: create, overwrite, chmod, rename, delete. After each
change returns on the writer (close(), chmod(), rename(), unlink(), or the boto3 call), B is polled with a new
open+read or stat until it shows the change; the time from the writer's return until then is the change's
latency. B always looked at the previous state first (it polled it), so its caches hold what the change must
replace: the worst case for a cache, not a cold lookup.

What B must show: create/overwrite: a new open reads the new bytes; chmod: stat gives the new mode; rename:
the new name stats and the old does not; delete: the name does not stat. A change not seen within
``CHANGE_TIMEOUT`` counts as that long (censored) and is reported in the notes.
"""

from __future__ import annotations

import errno
import functools
import os
import stat as stat_mod
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

KINDS = ("create", "overwrite", "chmod", "rename", "delete")
SLOTS = 4  # names changed in turn, so consecutive changes hit different keys
CHANGE_TIMEOUT = 30.0
POLL = 0.002


class Writer(Protocol):
    def write(self, rel: str, data: bytes) -> None: ...

    def chmod(self, rel: str, mode: int) -> None: ...

    def rename(self, old: str, new: str) -> None: ...

    def delete(self, rel: str) -> None: ...


class MountWriter:
    """Changes through a mount: each call returns when the mount returned (close() means "in S3")."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, rel: str, data: bytes) -> None:
        with open(self.root / rel, "wb", buffering=0) as fh:
            fh.write(data)

    def chmod(self, rel: str, mode: int) -> None:
        os.chmod(self.root / rel, mode)

    def rename(self, old: str, new: str) -> None:
        os.rename(self.root / old, self.root / new)

    def delete(self, rel: str) -> None:
        os.unlink(self.root / rel)


class Boto3Writer:
    """The same changes made with boto3, as another tool would (chmod: a self-copy with s3fs's mode metadata)."""

    def __init__(self, s3: Any, bucket: str, prefix: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def write(self, rel: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def chmod(self, rel: str, mode: int) -> None:
        key = self._key(rel)
        self.s3.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                            Metadata={"mode": str(stat_mod.S_IFREG | mode)}, MetadataDirective="REPLACE")

    def rename(self, old: str, new: str) -> None:
        self.s3.copy_object(Bucket=self.bucket, Key=self._key(new),
                            CopySource={"Bucket": self.bucket, "Key": self._key(old)})
        self.s3.delete_object(Bucket=self.bucket, Key=self._key(old))

    def delete(self, rel: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._key(rel))


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    by_kind: dict[str, list[float]] = field(default_factory=dict)
    timed_out: int = 0
    estale: list[int] = field(default_factory=lambda: [0])  # opens on B that failed with ESTALE (then retried)

    def add(self, kind: str, value: float, timed_out: bool) -> None:
        self.seconds.append(value)
        self.by_kind.setdefault(kind, []).append(value)
        self.timed_out += timed_out

    def p50(self) -> float:
        return statistics.median(self.seconds)

    def p99(self) -> float:
        return percentile(self.seconds, 0.99)

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {statistics.median(v) * 1000:.0f}" for kind, v in self.by_kind.items())
        text = f"p50 by change (ms): {kinds}; max {max(self.seconds) * 1000:.0f} ms over {len(self.seconds)}"
        if self.estale[0]:
            text += f"; {self.estale[0]} open(s) on B failed with ESTALE and were retried"
        if self.timed_out:
            text += f"; {self.timed_out} not seen within {CHANGE_TIMEOUT:.0f}s (counted as {CHANGE_TIMEOUT:.0f}s)"
        return text


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 200 values is the second largest)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(q * len(ordered) + 0.999999)))
    return ordered[rank - 1]


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


def _reads(path: Path, data: bytes, stale: list[int]) -> bool:
    try:
        with open(path, "rb", buffering=0) as fh:
            return fh.read(len(data) + 1) == data
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.ESTALE:
            raise
        stale[0] += 1  # an open racing the change (the kernel's inode was replaced under it): not seen yet
        return False


def _mode_is(path: Path, mode: int) -> bool:
    try:
        return stat_mod.S_IMODE(os.stat(path).st_mode) == mode
    except FileNotFoundError:
        return False


def _wait_seen(check: Callable[[], bool], started: float) -> tuple[float, bool]:
    deadline = started + CHANGE_TIMEOUT
    while not check():
        if time.monotonic() >= deadline:
            return CHANGE_TIMEOUT, True
        time.sleep(POLL)
    return time.monotonic() - started, False


def _change(writer: Writer, reader_root: Path, kind: str, n: int, name: str, moved: str,
            stale: list[int]) -> Callable[[], bool]:
    """Make change ``n`` (of ``kind``) through ``writer``; returns what B must see."""
    if kind in ("create", "overwrite"):
        data = f"{n}:{kind}:{time.time_ns()}\n".encode() * 8
        writer.write(name, data)
        return functools.partial(_reads, reader_root / name, data, stale)
    if kind == "chmod":
        mode = (0o600, 0o640)[(n // len(KINDS)) % 2]
        writer.chmod(name, mode)
        return functools.partial(_mode_is, reader_root / name, mode)
    if kind == "rename":
        writer.rename(name, moved)
        return functools.partial(_moved, reader_root / name, reader_root / moved)
    writer.delete(moved)
    return functools.partial(_gone, reader_root / moved)


def _moved(old: Path, new: Path) -> bool:
    return _exists(new) and not _exists(old)


def _gone(path: Path) -> bool:
    return not _exists(path)


def measure(writer: Writer, reader_root: Path, folder: str, changes: int) -> Latencies:
    """Make ``changes`` changes under ``folder`` (which exists on both sides) and time each on the reader."""
    out = Latencies()
    for n in range(changes):
        kind = KINDS[n % len(KINDS)]
        name = f"{folder}/s{(n // len(KINDS)) % SLOTS}"
        check = _change(writer, reader_root, kind, n, name, f"{name}.moved", out.estale)
        value, timed_out = _wait_seen(check, time.monotonic())
        out.add(kind, value, timed_out)
    return out
