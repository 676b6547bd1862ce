"""Changes to the namespace, as the change feed carries them between mounts (no Kafka here: the core's view).

A :class:`Change` says what one object key holds now: its attributes (``stat``), nothing (``removed``), or
"something changed, ask S3" (neither: attributes unknown, fetched lazily). The filesystem publishes one through
its :class:`ChangeSink` after S3 acknowledged the change, and applies the changes of others with
``Filesystem.apply_change`` (see there).

Keys are object keys; a directory is named by its marker key (``dir/``, with the trailing slash).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from hybridfs.core.attrs import Stat

__all__ = ["Change", "ChangeSink", "NoChanges"]


@dataclass(frozen=True)
class Change:
    key: str  # the object key; a directory's ends with "/"
    stat: Stat | None = None  # what a stat needs; None with removed=False: changed, attributes unknown
    removed: bool = False  # the key holds nothing any more (a tombstone on the feed)
    target: str | None = None  # a symlink's target, when known
    origin: str = ""  # the mount that made the change ("" when not known, e.g. an S3 event record)
    time: float = field(default_factory=time.time)  # when the change was made (seconds since the epoch)

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
