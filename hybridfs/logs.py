"""Logging set-up: one line per record on stderr, in a form journald reads well.

Under systemd (JOURNAL_STREAM is set) each line starts with a syslog priority prefix such as ``<4>``, so
journald records the right level without timestamps of our own (it adds its own). On a terminal we print a
timestamp and the level name instead.
"""

from __future__ import annotations

import logging
import os
import sys

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """``<PRIO>logger: message`` — journald strips the prefix and stores the priority."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
        text = f"<{prio}>{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info).replace("\n", f"\n<{prio}>")
        return text


class LateReplyFilter(logging.Filter):
    """pyfuse3 logs an ERROR when a reply finds the request gone (``fuse_reply_* failed with No such file or
    directory``): the kernel stopped waiting (the caller was interrupted, or the file system is being unmounted
    while a RELEASE was still closing a spool). Nothing is lost and nobody can act on it: log it at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "fuse_reply_" in (message := record.getMessage()) and \
                "No such file or directory" in message:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str | int = "INFO", *, stream: object = None) -> None:
    """Install the one stderr handler. Safe to call more than once (the last call wins)."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler.addFilter(LateReplyFilter())
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    # Library chatter that is noise at INFO.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
