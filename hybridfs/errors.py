"""The one error type of the core: an errno, a message that says why, and the level to log it at.

The FUSE layer turns every ``FsError`` into ``FUSEError(errno)`` plus one log line; anything else that escapes
the core is a bug and becomes ``EIO`` with a traceback.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os


class FsError(Exception):
    def __init__(self, errno: int, message: str, *, level: int = logging.DEBUG) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message
        # Expected outcomes (ENOENT on lookup, ENOTEMPTY) log at DEBUG; failures users should hear about at
        # WARNING or ERROR.
        self.level = level

    def __str__(self) -> str:
        return f"[{errno_mod.errorcode.get(self.errno, self.errno)}] {self.message}"


def not_found(what: str) -> FsError:
    return FsError(errno_mod.ENOENT, f"{what}: no such file or directory")


def io_error(message: str) -> FsError:
    return FsError(errno_mod.EIO, message, level=logging.ERROR)


def errno_name(code: int) -> str:
    return errno_mod.errorcode.get(code, str(code))


def from_os_error(exc: OSError, context: str) -> FsError:
    code = exc.errno or errno_mod.EIO
    return FsError(code, f"{context}: {os.strerror(code)}", level=logging.WARNING)
