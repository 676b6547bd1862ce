"""``hybridfs stack up|down|status|env|prune``: the local Kafka + MinIO stack on 127.0.0.1."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from confluent_kafka import KafkaException

from hybridfs.cli import CliError
from hybridfs.stack import manage, prune
from hybridfs.stack.config import KAFKA_BOOTSTRAP, SERVICES, StackPaths, stack_env
from hybridfs.stack.kafka import Kafka


def _hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of hours: {text!r}") from None
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError(f"hours must be 0 or more: {text!r}")
    return value


def _names(args: argparse.Namespace) -> list[str]:
    return [args.service] if args.service else list(SERVICES)


def cmd_up(args: argparse.Namespace) -> int:
    for line in manage.up(StackPaths.from_env(), _names(args), timeout=args.timeout):
        print(line, flush=True)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    for line in manage.down(StackPaths.from_env(), _names(args), timeout=args.timeout):
        print(line, flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    statuses = manage.status(StackPaths.from_env(), _names(args))
    for st in statuses:
        print(st.line())
    return 0 if all(st.up for st in statuses) else 3


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        if args.prefix:
            doomed = prune.topics_of(args.prefix, prune.existing_topics())
        else:
            seen = Kafka(StackPaths.from_env()).dir / prune.SEEN_FILE
            doomed = prune.stale_scratch_topics(prune.existing_topics(), seen, args.older_than * 3600)
        if not doomed:
            print("kafka: no topics to delete")
            return 0
        print(f"kafka: deleting {len(doomed)} topics left by tests and benchmarks", flush=True)
        deleted = prune.delete(doomed, progress=len(doomed) > prune.BATCH)
    except KafkaException as exc:
        raise CliError(f"kafka: cannot list or delete topics at {KAFKA_BOOTSTRAP}: {exc}") from None
    print(f"kafka: deleted {deleted} of {len(doomed)} topics")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    for key, value in stack_env(args.service).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def register(subparsers: Any) -> None:
    stack = subparsers.add_parser(
        "stack",
        help="run the local Kafka + MinIO stack on 127.0.0.1",
        description="The local stack for development and tests: Apache Kafka (KRaft) on 127.0.0.1:19092 and "
        "MinIO (S3) on 127.0.0.1:19000. Jars/binaries are cached under ${XDG_CACHE_HOME:-~/.cache}/hybridfs "
        "(HYBRIDFS_STACK_CACHE), data and logs under ${XDG_STATE_HOME:-~/.local/state}/hybridfs/stack "
        "(HYBRIDFS_STACK_STATE).",
    )
    actions = stack.add_subparsers(dest="stack_action", metavar="ACTION")
    actions.required = True
    verbs = (
        ("up", cmd_up, "start the stack (idempotent) and wait until it answers", "readiness deadline"),
        ("down", cmd_down, "stop what `up` started (pid files)", "SIGTERM-to-SIGKILL deadline"),
        ("status", cmd_status, "show what runs (exit 3 unless all requested services are up)", None),
        ("env", cmd_env, 'print export lines: eval "$(hybridfs stack env)"', None),
    )
    timeouts = {"up": manage.DEFAULT_UP_TIMEOUT, "down": manage.DEFAULT_DOWN_TIMEOUT}
    for name, func, help_text, timeout_help in verbs:
        parser = actions.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("service", nargs="?", choices=SERVICES, help="one service only (default: all)")
        if timeout_help is not None:
            parser.add_argument(
                "--timeout", type=float, default=timeouts[name], metavar="SECONDS",
                help=f"{timeout_help} (default {timeouts[name]:.0f})",
            )  # fmt: skip
        parser.set_defaults(func=func)
    prune_help = ("delete the Kafka topics that tests and benchmarks left (names t-* and bench-*) that a prune first "
                  "saw --older-than hours ago or earlier, or those of the given --prefix")
    prune_parser = actions.add_parser("prune", help=prune_help, description=prune_help)
    prune_parser.add_argument("--older-than", type=_hours, default=prune.DEFAULT_OLDER_THAN_HOURS, metavar="HOURS",
                              help="only topics a prune first saw this long ago or earlier (default %(default)s)")
    prune_parser.add_argument("--prefix", action="append", default=[], metavar="PREFIX",
                              help="delete the topics PREFIX.* and PREFIX-* whatever their age (repeatable)")
    prune_parser.set_defaults(func=cmd_prune)
