"""The census: how many files the mount's prefix holds in S3, for ``hybridfs status`` (cloud-only = files in
the bucket minus files cached).

Counting means listing the whole prefix (one request per 1000 objects), so it runs in the background: once at
start, then when ``hybridfs status`` asks and the count is older than ``min_age``, and at least every
``interval`` seconds. It stops counting at ``limit`` objects (the status then says "at least"). Failures (S3
down) are DEBUG: the status shows the last good count and its age.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger("hybridfs.services.census")


@dataclass(frozen=True)
class Count:
    files: int
    bytes: int
    complete: bool  # False when the limit cut the count short
    at: float  # trio time the count began


class Census:
    def __init__(self, store: Any, prefix: str, *, interval: float = 600.0, min_age: float = 0.25,
                 limit: int = 1_000_000) -> None:
        self.store = store
        self.prefix = prefix
        self.interval = interval
        self.min_age = min_age
        self.limit = limit
        self.last: Count | None = None
        self.error: str | None = None
        self._wake = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.count()
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.last is not None:  # asked again right after a count: wait for min_age
                await trio.sleep_until(self.last.at + self.min_age)

    async def count(self) -> None:
        started = trio.current_time()  # the count shows the bucket as it was when the listing began
        try:
            files, size, complete = await trio.to_thread.run_sync(
                self._count_sync, limiter=self.store.limiter, abandon_on_cancel=True)
        except Exception as exc:  # S3 down, access denied: the status shows the last count and this error
            self.error = str(exc)
            log.debug("counting the objects under %r failed: %s", self.prefix, exc)
            return
        self.error = None
        self.last = Count(files, size, complete, started)

    def _count_sync(self) -> tuple[int, int, bool]:
        files = size = 0
        paginator = self.store.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.store.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):  # directory marker
                    continue
                files += 1
                size += int(obj["Size"])
            if files >= self.limit:
                return files, size, False
        return files, size, True

    def poke(self) -> None:
        """Someone looks at the status: count again soon if the count is getting old."""
        try:
            now = trio.current_time()
        except RuntimeError:  # not in trio (tests calling status() directly)
            return
        if self.last is None or now - self.last.at > self.min_age:
            self._wake.set()

    def status(self) -> dict[str, object]:
        last = self.last
        out: dict[str, object] = {"files": None, "bytes": None, "complete": None, "age_seconds": None,
                                  "error": self.error}
        if last is not None:
            try:
                age: float | None = round(trio.current_time() - last.at, 1)
            except RuntimeError:
                age = None
            out.update(files=last.files, bytes=last.bytes, complete=last.complete, age_seconds=age)
        return out
