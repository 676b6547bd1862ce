"""What the services share: the narrow interfaces they need from the mount, per-key locks, S3 waits.

The services sit above the tiers and the core: they get the cloud store, the cache and a few hooks into the
filesystem (is a file open, drop the kernel's pages of it, what does the namespace know) through the small
protocols below, so their logic is tested with fakes and no kernel.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from hybridfs.core.attrs import Stat, stat_from_object
from hybridfs.retry import Policy, Retrying
from hybridfs.tiers.s3 import ObjectInfo

# Evict reasons produced by the eviction planner. Everything else (``cli``...) is an explicit request.
PLANNER_REASONS = frozenset({"watermark", "max-age"})

# S3 waits of the hydrator and the purger: the circuit breaker already warns when S3 goes down, so a service
# says INFO from its second failure in a row and WARNING only once it has waited about a minute (7 failures).
S3_WAIT = Policy(first=0.5, cap=30.0, info_at=2, warn_at=7)


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


class S3Waiter(Retrying):
    """Runs S3 calls for a service; while S3 is unreachable, waits with the retry policy instead of failing the
    event: the event is not committed meanwhile, so nothing is lost. A final S3 error (NoSuchBucket,
    AccessDenied, InvalidRequest...) is raised at once: the service gives the event up and says why."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        super().__init__(S3_WAIT, log, f"S3 unreachable; {what} wait until it answers",
                         recovered=f"S3 answers again; {what} resume")

    @property
    def waits(self) -> int:
        return self.retries
