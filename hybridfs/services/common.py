"""What the services share: the narrow interfaces they need from the mount, per-key locks, quiet S3 retries.

The services sit above the tiers and the core: they get the cloud store, the cache and a few hooks into the
filesystem (is a file open, drop the kernel's pages of it, what does the namespace know) through the small
protocols below, so their logic is tested with fakes and no kernel.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

from hybridfs.core.attrs import Stat, stat_from_object
from hybridfs.errors import FsError
from hybridfs.tiers.s3 import ObjectInfo

T = TypeVar("T")

# Evict reasons produced by the eviction planner. Everything else (``cli``...) is an explicit request.
PLANNER_REASONS = frozenset({"watermark", "max-age"})


class Store(Protocol):
    """The part of :class:`hybridfs.tiers.s3.CloudStore` the services use."""

    bucket: str

    async def head(self, key: str) -> ObjectInfo | None: ...

    async def download_file(self, key: str, etag: str, path: str) -> None: ...

    async def upload_file(self, key: str, path: str, metadata: dict[str, str]) -> ObjectInfo: ...

    async def get_range(self, key: str, start: int, length: int, etag: str | None) -> bytes: ...

    async def list_keys(self, prefix: str) -> list[ObjectInfo]: ...

    async def delete(self, key: str) -> None: ...


class FsHooks(Protocol):
    """What the services ask of the filesystem."""

    def is_open(self, key: str) -> bool: ...

    async def forget_kernel_cache(self, key: str) -> None: ...

    def known_stat(self, key: str) -> Stat | None: ...

    def uploaded(self, key: str, info: ObjectInfo) -> None: ...


class FilesystemHooks:
    """:class:`FsHooks` over the mount's :class:`hybridfs.core.filesystem.Filesystem`."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def is_open(self, key: str) -> bool:
        return bool(self.fs.is_open(key))

    async def forget_kernel_cache(self, key: str) -> None:
        await self.fs.forget_kernel_cache(key)

    def known_stat(self, key: str) -> Stat | None:
        path = self.fs.keys.path(key)
        if path is None:
            return None
        known: Stat | None = self.fs.ns.last_known.get(path)
        return known

    def uploaded(self, key: str, info: ObjectInfo) -> None:
        """We wrote ``key`` to S3 (a copy of the cache): the namespace must know its new ETag at once, or
        readers would ask S3 for the old one and get ESTALE."""
        path = self.fs.keys.path(key)
        if path:
            self.fs.ns.remember(path, stat_from_object(info, self.fs.ns.defaults))


def clean_etag(etag: str | None) -> str | None:
    """ETags travel quoted or not (S3 quotes them, the core strips them): compare them unquoted."""
    return None if etag is None else etag.strip('"')


def is_transient(exc: BaseException) -> bool:
    """S3 could not be reached or answered 5xx after botocore's retries: worth waiting for."""
    if isinstance(exc, FsError):
        return exc.errno == errno.EIO
    # s3transfer gives up on a broken download stream with its own exception type.
    return type(exc).__name__ in ("RetriesExceededError", "ReadTimeoutError", "ConnectionClosedError")


class S3Waiter:
    """Runs S3 calls for a service; while S3 is unreachable, waits quietly (one INFO line when the outage
    starts, one when it ends) with a capped exponential backoff instead of failing the event: the event is not
    committed meanwhile, so nothing is lost, and a handler never fills the log with tracebacks."""

    def __init__(self, log: logging.Logger, what: str, *, max_backoff: float = 30.0) -> None:
        self.log = log
        self.what = what
        self.max_backoff = max_backoff
        self.down = False
        self.waits = 0

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        backoff = 0.5
        while True:
            try:
                result = await fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.waits += 1
                if not self.down:
                    self.down = True
                    self.log.info("S3 unreachable (%s); %s wait until it answers", exc, self.what)
                else:
                    self.log.debug("S3 still unreachable: %s", exc)
                await trio.sleep(backoff)
                backoff = min(self.max_backoff, backoff * 2)
                continue
            if self.down:
                self.down = False
                self.log.info("S3 answers again; %s resume", self.what)
            return result
