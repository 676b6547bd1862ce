"""File attributes and how they travel in S3 object metadata, the way s3fs-fuse writes them.

``x-amz-meta-mode`` holds the full st_mode (type bits included) in decimal, ``-uid`` and ``-gid`` the owner,
``-mtime`` whole seconds since the epoch. Objects written by other tools carry none of these and get the mount's
defaults, so a bucket stays readable from both sides.
"""

from __future__ import annotations

import stat as stat_mod
import time
from dataclasses import dataclass, replace

from hybridfs.tiers.s3 import ObjectInfo


@dataclass(frozen=True)
class Defaults:
    uid: int
    gid: int
    file_mode: int = 0o644
    dir_mode: int = 0o755


@dataclass(frozen=True)
class Stat:
    mode: int  # full st_mode, type bits included
    uid: int
    gid: int
    size: int
    mtime_ns: int
    etag: str | None = None  # None for directories and for files not uploaded yet
    # False when built from a listing, which carries no user metadata: mode/uid/gid/mtime may be defaults.
    complete: bool = True

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat_mod.S_ISREG(self.mode)

    def with_(self, **changes: object) -> Stat:
        return replace(self, **changes)  # type: ignore[arg-type]


def now_ns() -> int:
    return time.time_ns()


def _int(meta: dict[str, str], name: str) -> int | None:
    raw = meta.get(name)
    if raw is None:
        return None
    try:
        return int(float(raw))
    except ValueError:
        return None


def stat_from_object(info: ObjectInfo, defaults: Defaults, *, is_dir: bool = False) -> Stat:
    """Attributes of an object (or of a ``dir/`` marker when ``is_dir``)."""
    meta = info.metadata or {}
    mode = _int(meta, "mode")
    if mode is None or stat_mod.S_IFMT(mode) == 0:
        perm = mode & 0o7777 if mode is not None else (defaults.dir_mode if is_dir else defaults.file_mode)
        mode = (stat_mod.S_IFDIR if is_dir else stat_mod.S_IFREG) | perm
    elif is_dir and not stat_mod.S_ISDIR(mode):
        mode = stat_mod.S_IFDIR | (mode & 0o7777)
    mtime = _int(meta, "mtime")
    mtime_ns = mtime * 1_000_000_000 if mtime is not None else info.mtime_ns
    return Stat(
        mode=mode,
        uid=_int(meta, "uid") if _int(meta, "uid") is not None else defaults.uid,  # type: ignore[arg-type]
        gid=_int(meta, "gid") if _int(meta, "gid") is not None else defaults.gid,  # type: ignore[arg-type]
        size=0 if is_dir else info.size,
        mtime_ns=mtime_ns,
        etag=None if is_dir else info.etag,
        complete=info.metadata is not None,
    )


def implicit_dir(defaults: Defaults, mtime_ns: int = 0) -> Stat:
    """A directory that exists only because keys live under it (no marker object)."""
    return Stat(stat_mod.S_IFDIR | defaults.dir_mode, defaults.uid, defaults.gid, 0, mtime_ns)


def metadata_for(st: Stat) -> dict[str, str]:
    return {
        "mode": str(st.mode),
        "uid": str(st.uid),
        "gid": str(st.gid),
        "mtime": str(st.mtime_ns // 1_000_000_000),
    }
