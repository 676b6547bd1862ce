"""Foreign writers: the bucket's S3 event records (``--s3-events-topic``) applied to the mount.

::

    <s3 events topic> --S3EventFeed (every partition, no group)--> ForeignWrites.handle --> invalidate_key

The mount adds User-Agent tokens to each of its S3 requests (:func:`agent_tokens`) and MinIO and Ceph copy the
User-Agent into the record. Records of this mount's own requests are skipped: it already shows what it wrote.
Records of another mount publishing to the same change feed are compared with what this mount knows
(``coherence.reconcile``): the feed normally brings that change sooner and with its attributes, so the same ETag
costs nothing; but a change that never reached the feed (a commit that landed after its close was told EIO, a
request whose answer was lost, the other mount cut off Kafka or killed before its outbox) shows here as another
ETag than the one the mount knows, and is invalidated (the next access asks S3). Records of any other writer,
and records without a User-Agent (EventBridge), are applied as invalidations; that is harmless: an invalidation
only makes the next stat ask S3 again.

While the records are read, the namespace is trusted only if this consumer is healthy too (:meth:`trusted`):
trusting local metadata is only right while every source of changes is caught up.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from hybridfs.core.coherence import invalidate_key, reconcile
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
    def __init__(self, fs: Filesystem, own_agent: str, feed_agent: str | None = None) -> None:
        """``own_agent``: this mount's User-Agent token; ``feed_agent``: the one shared by the mounts on its change
        feed (:func:`agent_tokens`)."""
        self.fs = fs
        self.own_agent = own_agent
        self.feed_agent = feed_agent
        self.applied = 0
        self.own = 0
        self.ignored = 0  # outside the mount's prefix, or a path with local state
        self.feed_known = 0  # another feed mount's change, already known here (its feed record came first)
        self.feed_missed = 0  # another feed mount's change that this mount did not know: invalidated

    async def handle(self, change: S3Change) -> None:
        agent = change.user_agent
        if agent and self.own_agent in agent:
            self.own += 1
            return
        if agent and self.feed_agent is not None and self.feed_agent in agent:
            await self._feed_mounts(change)
            return
        applied = await invalidate_key(self.fs, change.key, removed=change.removed, etag=change.etag,
                                       size=change.size)
        if applied:
            self.applied += 1
            log.debug("%s %s (ETag %s): invalidated", change.event_name, change.key, change.etag)
        else:
            self.ignored += 1

    async def _feed_mounts(self, change: S3Change) -> None:
        """Another mount on the change feed made it: the feed normally told us first; compare, never drop."""
        etag = None if change.removed else change.etag
        if not change.removed and etag is None:  # a creation whose version the record does not say
            missed = await invalidate_key(self.fs, change.key, removed=False)
        else:
            missed = await reconcile(self.fs, change.key, etag, change.size)
        if missed:
            self.feed_missed += 1
            log.debug("%s %s (ETag %s) by another feed mount, not known here: invalidated", change.event_name,
                      change.key, change.etag)
        else:
            self.feed_known += 1

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
                "applied": self.applied, "own": self.own, "ignored": self.ignored,
                "feed_known": self.feed_known, "feed_missed": self.feed_missed, "bad_records": stats.bad_records,
                "handler_failures": stats.handler_failures, "lag": stats.lag, "last_poll_age": stats.last_poll_age,
                "reachable": stats.reachable, "running": stats.running, "assigned": stats.assigned,
                "healthy": reason is None, "reason": reason or "caught up"}
