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

log = logging.getLogger("hybridfs.cli")


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (or ``status``)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridfs",
        description="FUSE filesystem over S3 with a bounded local cache and Kafka-driven hydration/eviction.",
    )
    parser.add_argument("--version", action="version", version=f"hybridfs {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    subparsers.required = True
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # verb not written yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
