"""The ``hybridfs`` command: parses arguments, dispatches to a verb, and turns failures into one-line errors.

Each verb lives in its own module and exposes ``register(subparsers)``; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from hybridfs import __version__
from hybridfs.logs import setup_logging

# Modules that each add one or more verbs. Kept as names so a broken optional verb cannot stop the others.
VERB_MODULES = (
    "hybridfs.commands.mount",
    "hybridfs.commands.events",
    "hybridfs.commands.status",
    "hybridfs.commands.config",
    "hybridfs.stack.cli",
    "hybridfs.bench.cli",
)

# Where each verb lives, so that running one imports only its module: importing every verb (trio, boto3, the
# stack manager) took ~1.9 of the 4.6 s a `hybridfs evict --wait` of 32 files spent (cProfile, no .pyc files).
# Help and unknown verbs still load them all.
VERB_HOMES = {
    "mount": "hybridfs.commands.mount",
    "hydrate": "hybridfs.commands.events", "evict": "hybridfs.commands.events",
    "pin": "hybridfs.commands.events", "unpin": "hybridfs.commands.events",
    "status": "hybridfs.commands.status",
    "config": "hybridfs.commands.config",
    "stack": "hybridfs.stack.cli",
    "bench": "hybridfs.bench.cli",
}

log = logging.getLogger("hybridfs.cli")


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (or ``status``)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def requested_verb(argv: Sequence[str]) -> str | None:
    """The verb in ``argv`` (the first word that is not a global option or its value), if any."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridfs",
        description="FUSE filesystem over S3 with a bounded local cache and Kafka-driven hydration/eviction.",
    )
    parser.add_argument("--version", action="version", version=f"hybridfs {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    subparsers.required = True
    home = VERB_HOMES.get(verb or "")
    for name in (home,) if home is not None else VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # verb not written yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(requested_verb(words))
    args = parser.parse_args(words)
    setup_logging(args.log_level)
    try:
        result = args.func(args)
    except CliError as exc:
        print(f"hybridfs: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("hybridfs: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
