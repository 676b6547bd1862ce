"""Foreign writers: the bucket's S3 event records (``--s3-events-topic``) applied to the mount.

::

    <s3 events topic> --S3EventFeed (every partition, no group)--> ForeignWrites.handle --> invalidate_key

Records of requests made by this mount, or by any mount publishing to the same change feed, are skipped: the
mount adds User-Agent tokens to each of its S3 requests (:func:`agent_tokens`) and MinIO and Ceph copy the
User-Agent into the record. The mount already shows what it wrote, and the feed brings the other mounts' changes
sooner and with their attributes (a record would only cost a HEAD). Records without a User-Agent (EventBridge)
are applied; that is harmless: an invalidation only makes the next stat ask S3 again.

While the records are read, the namespace is trusted only if this consumer is healthy too (:meth:`trusted`):
trusting local metadata is only right while every source of changes is caught up.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from hybridfs.core.coherence import invalidate_key
from hybridfs.events.s3events import S3Change, S3EventFeed

if TYPE_CHECKING:
    from hybridfs.core.filesystem import Filesystem

log = logging.getLogger("hybridfs.foreign")


MAX_LAG = 100  # records not read yet, beyond which the namespace is not trusted
MAX_POLL_AGE = 3.0  # seconds since the consumer thread last polled, beyond which it counts as stuck


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def agent_tokens(origin: str, feed: str | None) -> list[str]:
    """The User-Agent tokens of one mount's requests: ``hybridfs-mount/<its origin>`` and, with a change feed
    (``feed``: its Kafka servers and topic), ``hybridfs-feed/<the feed>``, shared by the mounts on that feed."""
    tokens = [f"hybridfs-mount/{_digest(origin)}"]
    if feed:
        tokens.append(f"hybridfs-feed/{_digest(feed)}")
    return tokens


class ForeignWrites:
    def __init__(self, fs: Filesystem, known_agents: list[str]) -> None:
        self.fs = fs
        self.known_agents = known_agents
        self.applied = 0
        self.own = 0
        self.ignored = 0  # outside the mount's prefix, or a path with local state

    async def handle(self, change: S3Change) -> None:
        if change.user_agent and any(token in change.user_agent for token in self.known_agents):
            self.own += 1
            return
        applied = await invalidate_key(self.fs, change.key, removed=change.removed, etag=change.etag,
                                       size=change.size)
        if applied:
            self.applied += 1
            log.debug("%s %s (ETag %s): invalidated", change.event_name, change.key, change.etag)
        else:
            self.ignored += 1

    @staticmethod
    def unhealthy_reason(feed: S3EventFeed) -> str | None:
        """Why the records of ``feed`` cannot be relied on now (None: they can): trusting local metadata is
        only right while every change made by another tool reaches the mount."""
        stats = feed.stats()
        if not stats.running:
            return f"not consuming: {stats.stopped or 'stopped'}"
        if stats.reachable is not True:
            return "kafka unreachable" if stats.reachable is False else "not connected to kafka yet"
        if stats.last_poll_age is None or stats.last_poll_age > MAX_POLL_AGE:
            return ("not consuming: no poll yet" if stats.last_poll_age is None else
                    f"not consuming: last poll {stats.last_poll_age:.1f}s ago (records being applied for that long)")
        if not stats.assigned:
            return "not consuming: no partition assigned yet"
        if stats.lag is None:
            return "lag not measured yet"
        if stats.lag > MAX_LAG:
            return f"lag {stats.lag} > {MAX_LAG} records"
        return None

    @staticmethod
    def healthy(feed: S3EventFeed) -> bool:
        return ForeignWrites.unhealthy_reason(feed) is None

    def status(self, feed: S3EventFeed) -> dict[str, Any]:
        stats = feed.stats()
        reason = self.unhealthy_reason(feed)
        return {"topic": stats.topic, "received": stats.received, "changes": stats.changes,
                "applied": self.applied, "own": self.own, "ignored": self.ignored, "bad_records": stats.bad_records,
                "handler_failures": stats.handler_failures, "lag": stats.lag, "last_poll_age": stats.last_poll_age,
                "reachable": stats.reachable, "running": stats.running, "assigned": stats.assigned,
                "healthy": reason is None, "reason": reason or "caught up"}
