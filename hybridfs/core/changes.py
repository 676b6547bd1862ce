"""Changes to the namespace, as the change feed carries them between mounts (no Kafka here: the core's view).

A :class:`Change` says what one object key holds now: its attributes (``stat``), nothing (``removed``), or
"something changed, ask S3" (neither: attributes unknown, fetched lazily). The filesystem publishes one through
its :class:`ChangeSink` after S3 acknowledged the change, and applies the changes of others with
``Filesystem.apply_change`` (see there).

Keys are object keys; a directory is named by its marker key (``dir/``, with the trailing slash).

:class:`KeyOrder` decides whether a change from the feed is news (newer than what this mount knows of the key) or
only tells that something changed (ask S3). It never reads a clock: see docs/semantics.md, "Order of versions".
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

from cachetools import LRUCache

from hybridfs.core.attrs import Stat

__all__ = ["ABSENT", "NOTHING", "Change", "ChangeSink", "KeyOrder", "NoChanges", "Verdict", "Version", "version_of"]


@dataclass(frozen=True)
class Change:
    key: str  # the object key; a directory's ends with "/"
    stat: Stat | None = None  # what a stat needs; None with removed=False: changed, attributes unknown
    removed: bool = False  # the key holds nothing any more (a tombstone on the feed)
    target: str | None = None  # a symlink's target, when known
    origin: str = ""  # the mount that made the change ("" when not known, e.g. an S3 event record)
    # When the change was made, by the clock of the host that made it: for the feed's delay figures only, never
    # to order changes (hosts' clocks differ).
    time: float = field(default_factory=time.time)
    # (partition, offset) of the feed record that carried it; None for a change made here or an S3 event record.
    position: tuple[int, int] | None = None
    # (the publishing mount's run, its count of changes published in that run): the order in which that mount's
    # S3 requests were acknowledged. None when not told (an S3 event record, an older producer).
    seq: tuple[str, int] | None = None

    @property
    def is_dir(self) -> bool:
        return self.key.endswith("/")

    @classmethod
    def put(cls, key: str, st: Stat, *, target: str | None = None) -> Change:
        return cls(key, st, target=target)

    @classmethod
    def delete(cls, key: str) -> Change:
        return cls(key, None, removed=True)

    @classmethod
    def unknown(cls, key: str) -> Change:
        """``key`` changed, and its new attributes are for a HEAD to tell."""
        return cls(key, None)


class ChangeSink(Protocol):
    """Where the core reports a change it made (the event bus's change feed in the mount)."""

    def publish_change(self, change: Change) -> None: ...


class NoChanges:
    def publish_change(self, change: Change) -> None:
        return None


# -- the order of versions of one key (docs/semantics.md, "Order of versions") -----------------------------------

# What a version of a key is, for comparing what a record says with what the mount knows: the ETag and the
# attributes that a HEAD parses the same way as a record carries them (no times: a record has them to the
# nanosecond, x-amz-meta-mtime to the second). ABSENT: the key holds nothing. NOTHING: the mount knows nothing.
Version = tuple[str | None, int, int, int, int]
ABSENT = "absent"
NOTHING = "nothing"
_UNKNOWN = "unknown"  # a change whose new state was not told (an S3 event record, "attributes unknown")

Known = Version | str


def version_of(st: Stat | None) -> Known:
    if st is None:
        return ABSENT
    etag = None if st.is_dir else st.etag
    return (etag, st.mode, st.uid, st.gid, 0 if st.is_dir else st.size)


class Verdict(enum.Enum):
    NEWS = "news"  # newer than what the mount knows: apply its attributes (or its removal)
    ASK_S3 = "ask-s3"  # its order is not known: forget what the mount knows of the key, the next access asks S3
    STALE = "stale"  # a record at or before one already applied (a duplicate, a replay): nothing to do


@dataclass(frozen=True)
class _Seen:
    origin: str
    version: Known
    position: tuple[int, int] | None
    seq: tuple[str, int] | None
    confirmed: bool = False  # applied as news (so the namespace holds it), not only asked of S3


OWN = "\0this mount"  # origin of the changes this mount made (never a record's: origins are printable)


class KeyOrder:
    """Per key, the last change this mount took in (bounded: least recently changed keys are forgotten, and a
    forgotten key's next record is asked of S3, which costs a HEAD, never a wrong answer).

    A record is news only when all of these hold, so that a late, duplicated or replayed record can never put a
    key back on an older version, whatever the hosts' clocks say:

    * it comes from the same mount (the same run of it) as the last record taken in for the key, with a higher
      count (``Change.seq``): a mount counts its changes in the order S3 acknowledged them, and the count rides
      in the record, so an outbox retry that lands a record after a later one of the same mount is seen as
      older (STALE), as is a duplicate or a replay (also: at or before that record's offset in the partition).
      Two mounts' records are published in no order S3 vouches for (an outbox retry delays one by seconds);
    * what the namespace knows of the key is what that last record said: S3 answered so after that record arrived
      (an answer on its way when a change arrives is never stored: ``Namespace._watch``), so the next change of
      that mount is newer than that answer; or that record was itself news and nothing was heard since. A HEAD
      that told of another version meanwhile makes the record's order unknown.

    Anything else is ASK_S3: the mount forgets what it knows of the key, and the next stat or open asks S3, which
    holds the newest version by definition.
    """

    def __init__(self, size: int = 100_000) -> None:
        self._seen: LRUCache[str, _Seen] = LRUCache(size)
        self.counts = {verdict.value: 0 for verdict in Verdict}

    def own(self, change: Change) -> None:
        """This mount made ``change`` (S3 acknowledged it): no record of another mount is ordered after it
        without asking S3."""
        self._seen[change.key] = _Seen(OWN, _version(change), None, None)

    def own_record(self, change: Change, origin: str) -> None:
        """The feed brought back this mount's own record: its position orders the replays before it."""
        seen = self._seen.get(change.key)
        if seen is not None and seen.origin == OWN and seen.version == _version(change):
            self._seen[change.key] = _Seen(origin, seen.version, change.position, change.seq)

    def judge(self, change: Change, known: Known, remembered: Known = NOTHING) -> Verdict:
        """What to do with ``change`` from another mount or writer; remembers it unless STALE. ``known``: what
        the namespace holds as current for the key (:func:`version_of` an S3 answer or an applied change, ABSENT
        when S3 said nothing is there, else NOTHING); ``remembered``: its last known attributes, kept longer."""
        verdict = self._verdict(change, known, remembered)
        self.counts[verdict.value] += 1
        if verdict is not Verdict.STALE:
            self._seen[change.key] = _Seen(change.origin, _version(change), change.position, change.seq,
                                           confirmed=verdict is Verdict.NEWS)
        return verdict

    def first(self, key: str) -> bool:
        """Nothing was taken in for ``key`` yet (or it was forgotten)."""
        return key not in self._seen

    def _verdict(self, change: Change, known: Known, remembered: Known) -> Verdict:
        seen = self._seen.get(change.key)
        if seen is None:
            return Verdict.ASK_S3  # nothing to order it against
        pos, last = change.position, seen.position
        if pos is not None and last is not None and pos[0] == last[0] and pos[1] <= last[1]:
            return Verdict.STALE  # at or before a record taken in: a duplicate, or the topic read again
        seq, seen_seq = change.seq, seen.seq
        same_run = seq is not None and seen_seq is not None and seq[0] == seen_seq[0] \
            and seen.origin == change.origin
        if same_run and seq is not None and seen_seq is not None and seq[1] <= seen_seq[1]:
            return Verdict.STALE  # the same mount published it before: an outbox retry, a duplicate
        if not same_run or seen.version == _UNKNOWN or _version(change) == _UNKNOWN:
            return Verdict.ASK_S3
        if known == seen.version:
            return Verdict.NEWS
        if known == NOTHING and seen.confirmed and (
                remembered == seen.version or (remembered == NOTHING and seen.version == ABSENT)):
            return Verdict.NEWS  # news before, and nothing heard of the key since (its fresh entry expired)
        return Verdict.ASK_S3  # the mount learned something else since (a HEAD), or nothing S3 vouched for


def _version(change: Change) -> Known:
    if change.removed:
        return ABSENT
    if change.stat is None:
        return _UNKNOWN
    return version_of(change.stat)
