"""File attributes and how they travel in S3 object metadata, the way s3fs-fuse writes them.

``x-amz-meta-mode`` holds the full st_mode (type bits included) in decimal, ``-uid`` and ``-gid`` the owner,
``-mtime``, ``-ctime`` and ``-atime`` seconds since the epoch (s3fs and rclone may add a fraction), ``-rdev``
the device number of a character or block device. Objects written by other tools carry none of these and get
the mount's defaults, so a bucket stays readable from both sides.

Metadata is input from anyone who can write to the bucket: every parse here is total. A value that is not a
number, out of range, or of a type no file can have gives the default for that attribute and a problem string,
which the namespace logs once per object version (``stat_from_object(..., problems=...)``).
"""

from __future__ import annotations

import re
import stat as stat_mod
import time
from dataclasses import dataclass, replace

from hybridfs.tiers.s3 import ObjectInfo

MAX_ID = 2**32 - 2  # uid_t/gid_t; 2**32 - 1 is (uid_t)-1, "no owner", which chown treats as "unchanged"
MAX_RDEV = 2**32 - 1  # the FUSE protocol carries rdev in 32 bits
NS = 1_000_000_000
# Times are kept in nanoseconds in a signed 64-bit integer (the kernel's and pyfuse3's limit).
MIN_TIME_S = -(2**63) // NS + 1
MAX_TIME_S = (2**63 - 1) // NS - 1
# Every type a file can have; 0 (no type bits) means "regular file, or directory for a dir/ marker".
FILE_TYPES = frozenset((stat_mod.S_IFREG, stat_mod.S_IFDIR, stat_mod.S_IFLNK, stat_mod.S_IFIFO,
                        stat_mod.S_IFSOCK, stat_mod.S_IFCHR, stat_mod.S_IFBLK))
# A symlink's target is shorter than PATH_MAX, and FIFOs, sockets and devices are empty objects: an object of
# PATH_MAX bytes or more can only be a regular file.
PATH_MAX = 4096
SPECIAL_TYPES = frozenset((stat_mod.S_IFIFO, stat_mod.S_IFSOCK, stat_mod.S_IFCHR, stat_mod.S_IFBLK))

_UNSIGNED = re.compile(r"[0-9]{1,20}")
_TIME = re.compile(r"(-?[0-9]{1,20})(?:\.([0-9]{1,30}))?")


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
    # False when built from a listing, which carries no user metadata: mode/uid/gid/mtime may be defaults,
    # and the kernel must not cache them (hybridfs.fuse_ops gives them no attribute or entry lifetime).
    complete: bool = True
    # False when nothing but a listing has been seen of the entry: a plain object may as well be a symlink
    # or a FIFO, so its type is unknown until a HEAD (readdir reports DT_UNKNOWN for it).
    kind_known: bool = True
    ctime_ns: int | None = None  # None: not stored; the change time is then the mtime
    atime_ns: int | None = None  # None: not stored; the access time is then the mtime
    rdev: int = 0  # character and block devices only

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat_mod.S_ISREG(self.mode)

    @property
    def changed_ns(self) -> int:
        """st_ctime: the last change of metadata, or of the data (which moves the mtime), whichever is later."""
        return self.mtime_ns if self.ctime_ns is None else max(self.ctime_ns, self.mtime_ns)

    @property
    def accessed_ns(self) -> int:
        return self.mtime_ns if self.atime_ns is None else self.atime_ns

    def with_(self, **changes: object) -> Stat:
        return replace(self, **changes)  # type: ignore[arg-type]


def now_ns() -> int:
    return time.time_ns()


class _Parser:
    """Reads one object's metadata; collects what could not be used."""

    def __init__(self, meta: dict[str, str]) -> None:
        self.meta = meta
        self.problems: list[str] = []

    def _bad(self, name: str, raw: str, why: str) -> None:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        self.problems.append(f"{name}={shown!r} ({why})")

    def unsigned(self, name: str, limit: int) -> int | None:
        raw = self.meta.get(name)
        if raw is None:
            return None
        text = raw.strip()
        if not _UNSIGNED.fullmatch(text) or int(text) > limit:
            self._bad(name, raw, f"not an integer in 0..{limit}")
            return None
        return int(text)

    def time_ns(self, name: str) -> int | None:
        """Seconds, optionally with a fraction ("1700000000", "1700000000.123456789"), as nanoseconds."""
        raw = self.meta.get(name)
        if raw is None:
            return None
        match = _TIME.fullmatch(raw.strip())
        if match is None or not MIN_TIME_S <= int(match.group(1)) <= MAX_TIME_S:
            self._bad(name, raw, "not a time in seconds since the epoch")
            return None
        seconds, fraction = int(match.group(1)), (match.group(2) or "")[:9].ljust(9, "0")
        nanos = int(fraction)
        return seconds * NS - nanos if match.group(1).startswith("-") else seconds * NS + nanos

    def mode(self, is_dir: bool) -> int | None:
        mode = self.unsigned("mode", 0o177777)
        if mode is None:
            return None
        kind = stat_mod.S_IFMT(mode)
        if kind and kind not in FILE_TYPES:
            self._bad("mode", self.meta["mode"], "no file has this type")
            return None
        if is_dir:
            return stat_mod.S_IFDIR | (mode & 0o7777)  # a dir/ marker is a directory, whatever it says
        return mode if kind else stat_mod.S_IFREG | mode


def stat_from_object(info: ObjectInfo, defaults: Defaults, *, is_dir: bool = False,
                     problems: list[str] | None = None) -> Stat:
    """Attributes of an object (or of a ``dir/`` marker when ``is_dir``). Never raises: unusable values are
    replaced by defaults and described in ``problems`` (when given)."""
    parser = _Parser(info.metadata or {})
    mode = parser.mode(is_dir)
    if mode is None:
        mode = stat_mod.S_IFDIR | defaults.dir_mode if is_dir else stat_mod.S_IFREG | defaults.file_mode
    uid = parser.unsigned("uid", MAX_ID)
    gid = parser.unsigned("gid", MAX_ID)
    mtime_ns = parser.time_ns("mtime")
    ctime_ns = parser.time_ns("ctime")
    atime_ns = parser.time_ns("atime")
    rdev = parser.unsigned("rdev", MAX_RDEV) if stat_mod.S_IFMT(mode) in (stat_mod.S_IFCHR,
                                                                          stat_mod.S_IFBLK) else None
    if problems is not None:
        problems.extend(parser.problems)
    return Stat(
        mode=mode,
        uid=defaults.uid if uid is None else uid,
        gid=defaults.gid if gid is None else gid,
        size=0 if is_dir else max(info.size, 0),
        mtime_ns=info.mtime_ns if mtime_ns is None else mtime_ns,
        etag=None if is_dir else info.etag,
        complete=info.metadata is not None,
        ctime_ns=ctime_ns,
        atime_ns=atime_ns,
        rdev=rdev or 0,
    )


def implicit_dir(defaults: Defaults, mtime_ns: int = 0, *, complete: bool = True) -> Stat:
    """A directory that exists only because keys live under it (no marker object). ``complete=False`` when
    only a listing says so: a marker with other attributes may still be there."""
    return Stat(stat_mod.S_IFDIR | defaults.dir_mode, defaults.uid, defaults.gid, 0, mtime_ns,
                complete=complete)


def metadata_for(st: Stat) -> dict[str, str]:
    meta = {
        "mode": str(st.mode),
        "uid": str(st.uid),
        "gid": str(st.gid),
        "mtime": str(st.mtime_ns // NS),
    }
    if st.ctime_ns is not None:
        meta["ctime"] = str(st.changed_ns // NS)
    if st.atime_ns is not None:
        meta["atime"] = str(st.atime_ns // NS)
    if stat_mod.S_IFMT(st.mode) in (stat_mod.S_IFCHR, stat_mod.S_IFBLK):
        meta["rdev"] = str(st.rdev)
    return meta
