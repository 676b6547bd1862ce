"""Mapping between paths in the mount and keys in the bucket.

A path is relative to the mount root, with ``/`` separators and no leading slash; the root is ``""``.
Keys mirror paths under the mount's prefix; a directory marker is the directory's key plus ``/``.
"""

from __future__ import annotations

import errno
import logging

from hybridfs.errors import FsError

NAME_MAX = 255  # bytes, as every POSIX filesystem
KEY_MAX = 1024  # bytes, the S3 limit


class KeyMapper:
    def __init__(self, prefix: str) -> None:
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""

    def key(self, path: str) -> str:
        """The object key of a file at ``path``."""
        key = self.prefix + path
        if len(key.encode()) > KEY_MAX:
            raise FsError(errno.ENAMETOOLONG, f"{path[:60]!r}...: object key would exceed {KEY_MAX} bytes",
                          level=logging.INFO)
        return key

    def dir_prefix(self, path: str) -> str:
        """The key prefix under which a directory's children live (also its marker key)."""
        if not path:
            return self.prefix
        return self.key(path + "/")

    def path(self, key: str) -> str | None:
        """The path for an object key, or None when the key is outside the prefix."""
        if not key.startswith(self.prefix):
            return None
        return key[len(self.prefix):].rstrip("/")


def child_path(parent: str, name: bytes) -> str:
    """Join a directory path and a name from the kernel, refusing names S3 keys cannot carry."""
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes exceeds {NAME_MAX}", level=logging.INFO)
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise FsError(errno.EINVAL, f"name {name!r} is not UTF-8, which S3 keys require",
                      level=logging.INFO) from None
    if text in ("", ".", "..") or "/" in text or "\0" in text:
        raise FsError(errno.EINVAL, f"invalid name {text!r}", level=logging.INFO)
    return f"{parent}/{text}" if parent else text


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def name_of(path: str) -> str:
    return path.rpartition("/")[2]
