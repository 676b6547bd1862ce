"""``hybridfs hydrate|evict|pin|unpin PATH...``: publish hydrate and evict events for files.

A PATH inside a mount is resolved through the mount itself: ``user.hybridfs.key``/``etag``/``state`` on each
file (directories are walked recursively), and ``user.hybridfs.status`` on the mount root gives the bucket,
the Kafka bootstrap servers and the topic prefix. A PATH may also be ``s3://BUCKET/KEY`` (one object): a
hybridfs mount on this host must serve that bucket and key (its Kafka and topics are then the defaults), or, with
``--no-mount-check`` (for mounts on other hosts), ``--kafka`` (or HYBRIDFS_KAFKA_BOOTSTRAP, or ``--config``) says
where to publish, and ``--topic-prefix`` (default ``hybridfs``) which topics.

What each verb publishes (see docs/events.md):

* ``hydrate``  a hydrate event (reason ``cli``) for every file not cached yet; ``--wait`` waits until they are
* ``evict``    an evict event (reason ``cli``) for every cached file; pinned files stay unless ``--unpin``
* ``pin``      a hydrate event with ``pin: true`` (reason ``pin``): pinned files are hydrated, never evicted
* ``unpin``    a hydrate event with ``pin: false`` (reason ``unpin``): the file stays where it is, evictable

The events are produced directly (acknowledged by Kafka before the command returns), not through a mount's
outbox: when Kafka cannot be reached the command fails with one line and publishes nothing it can't confirm.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import errno
import json
import os
import re
import socket
import stat as stat_mod
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from hybridfs.cli import CliError

XATTR_STATUS = "user.hybridfs.status"
XATTR_KEY = "user.hybridfs.key"
XATTR_ETAG = "user.hybridfs.etag"
XATTR_STATE = "user.hybridfs.state"

DEFAULT_TOPIC_PREFIX = "hybridfs"
RESOLVE_THREADS = 16


# -- finding mounts and files ---------------------------------------------------------------------------


@dataclass
class MountInfo:
    root: Path
    status: dict[str, Any]

    @property
    def bucket(self) -> str:
        return str(self.status.get("bucket", ""))

    @property
    def capacity(self) -> int | None:
        cache = self.status.get("cache") or {}
        value = cache.get("capacity_bytes") if isinstance(cache, dict) else None
        return int(value) if isinstance(value, int) else None


def read_status(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON status of the mount whose root is ``root``; CliError when it is not a hybridfs mount."""
    try:
        raw = os.getxattr(root, XATTR_STATUS)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise CliError(f"{root} is not in a hybridfs mount") from None
        raise CliError(f"{root}: cannot read the mount's status: {exc.strerror}") from None
    try:
        status = json.loads(raw)
    except ValueError:
        raise CliError(f"{root}: the mount's status is not JSON (a different hybridfs version?)") from None
    if not isinstance(status, dict):
        raise CliError(f"{root}: the mount's status is not a JSON object")
    return status


def mount_root(path: str | os.PathLike[str]) -> Path:
    """The mount point of the filesystem ``path`` is on (its nearest mount point above or at it)."""
    current = Path(os.path.abspath(path))
    if not os.path.lexists(current):
        raise CliError(f"{path}: no such file or directory")
    while not os.path.ismount(current):
        if current.parent == current:
            break
        current = current.parent
    return current


class Mounts:
    """Remembers the mounts met so far (one status read per mount)."""

    def __init__(self) -> None:
        self._by_root: dict[Path, MountInfo] = {}

    def of(self, path: str | os.PathLike[str]) -> MountInfo:
        root = mount_root(path)
        info = self._by_root.get(root)
        if info is None:
            try:
                status = read_status(root)
            except CliError:
                raise CliError(f"{path} is not in a hybridfs mount") from None
            info = self._by_root[root] = MountInfo(root, status)
        return info


@dataclass
class Target:
    """One file to publish an event for."""

    key: str
    etag: str | None
    size: int | None
    state: str | None  # cached | cloud | None (an s3:// URL: unknown)
    path: Path | None  # in a mount, for --wait
    bucket: str
    kafka: str
    topic_prefix: str
    mount: MountInfo | None = None


def _xattr(path: Path, name: str) -> str | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False).decode()
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def _files_under(path: Path) -> Iterator[Path]:
    """``path`` when it is a regular file, or every regular file below it (symlinks are not followed)."""
    st = os.lstat(path)
    if stat_mod.S_ISREG(st.st_mode):
        yield path
        return
    if not stat_mod.S_ISDIR(st.st_mode):
        return
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            child = Path(dirpath) / name
            if stat_mod.S_ISREG(os.lstat(child).st_mode):
                yield child


@dataclass
class Options:
    kafka: str | None
    topic_prefix: str | None
    kafka_config: dict[str, str] = field(default_factory=dict)
    mount_check: bool = True  # an s3:// URL must be served by a hybridfs mount on this host


@dataclass(frozen=True)
class Served:
    """A hybridfs mount on this host and what it serves (from /proc/self/mountinfo)."""

    root: Path
    bucket: str
    prefix: str  # without slashes at either end; "" for the whole bucket

    @property
    def source(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def serves(self, bucket: str, key: str) -> bool:
        return bucket == self.bucket and (not self.prefix or key.startswith(self.prefix + "/"))


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def local_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Served]:
    """The hybridfs mounts of this host: FUSE mounts of subtype ``hybridfs`` named ``hybridfs:s3://B/P``."""
    found = []
    try:
        with open(mountinfo) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2 or tail[0] != "fuse.hybridfs":
            continue
        source = _unescape(tail[1])
        match = re.fullmatch(r"hybridfs:s3://([^/]+)/?(.*)", source)
        if match:
            found.append(Served(Path(_unescape(fields[4])), match.group(1), match.group(2).strip("/")))
    return found


def _serving_mount(url: str, bucket: str, key: str) -> Served:
    """The mount on this host that serves ``bucket``/``key``; CliError (one line) when there is none."""
    mounts = local_mounts()
    for served in mounts:
        if served.serves(bucket, key):
            return served
    same = sorted({m.source for m in mounts if m.bucket == bucket})
    if same:
        listed = ", ".join(same[:3]) + (f" and {len(same) - 3} more" if len(same) > 3 else "")
        why = f"this host's mounts of bucket {bucket!r} serve other prefixes: {listed}"
    else:
        why = f"no mount of bucket {bucket!r} here; {len(mounts)} hybridfs mounts of other buckets"
    raise CliError(f"{url}: no hybridfs mount here serves s3://{bucket}/{key} ({why}); pass --no-mount-check to "
                   "publish for mounts on other hosts")


def _mount_target(path: Path, mount: MountInfo, opts: Options) -> Target:
    key = _xattr(path, XATTR_KEY)
    if key is None:
        raise CliError(f"{path}: the mount does not name its object key")
    status = mount.status
    kafka = opts.kafka or str(status.get("kafka") or "")
    if not kafka or (status.get("events") is False and not opts.kafka):
        raise CliError(f"the mount at {mount.root} runs without events (--no-events); pass --kafka to publish "
                       "anyway")
    return Target(
        key=key,
        etag=_xattr(path, XATTR_ETAG) or None,
        size=os.lstat(path).st_size,
        state=_xattr(path, XATTR_STATE),
        path=path,
        bucket=mount.bucket,
        kafka=kafka,
        topic_prefix=opts.topic_prefix or str(status.get("topic_prefix") or DEFAULT_TOPIC_PREFIX),
        mount=mount,
    )


def _url_target(url: str, opts: Options) -> Target:
    from hybridfs.events.schema import InvalidEvent, validate_key

    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise CliError(f"{url}: expected s3://BUCKET/KEY")
    if key.endswith("/"):
        raise CliError(f"{url}: names a prefix; s3:// URLs name single objects (use a path in a mount to walk a "
                       "directory)")
    try:
        validate_key(key, allowed_prefix="")
    except InvalidEvent as exc:
        raise CliError(f"{url}: {exc.reason}") from None
    kafka = opts.kafka or os.environ.get("HYBRIDFS_KAFKA_BOOTSTRAP", "")
    topic_prefix = opts.topic_prefix
    if opts.mount_check:
        # Published for a bucket nobody here serves, the event would only be dead-lettered: refuse it. The
        # serving mount's Kafka and topics are the defaults.
        served = _serving_mount(url, bucket, key)
        status = read_status(served.root)
        if status.get("events") is False and not kafka:
            raise CliError(f"{url}: the mount at {served.root} runs without events (--no-events); pass --kafka to "
                           "publish anyway")
        kafka = kafka or str(status.get("kafka") or "")
        topic_prefix = topic_prefix or str(status.get("topic_prefix") or "") or None
    if not kafka:
        raise CliError(f"{url}: no Kafka to publish to (pass --kafka or set HYBRIDFS_KAFKA_BOOTSTRAP)")
    return Target(key=key, etag=None, size=None, state=None, path=None, bucket=bucket, kafka=kafka,
                  topic_prefix=topic_prefix or DEFAULT_TOPIC_PREFIX)


def resolve(paths: list[str], opts: Options) -> list[Target]:
    """Every file the PATHs name, in order, each once."""
    mounts = Mounts()
    targets: list[Target] = []
    seen: set[tuple[str, str, str]] = set()
    for raw in paths:
        if raw.startswith("s3://"):
            found = [_url_target(raw, opts)]
        else:
            mount = mounts.of(raw)
            try:
                files = list(_files_under(Path(os.path.abspath(raw))))
                # Each file's attributes may cost the mount a HEAD request: ask for several at once.
                with concurrent.futures.ThreadPoolExecutor(RESOLVE_THREADS) as pool:
                    found = list(pool.map(lambda p, m=mount: _mount_target(p, m, opts), files))
            except OSError as exc:
                raise CliError(f"{exc.filename or raw}: {exc.strerror}") from None
        for target in found:
            ident = (target.kafka, target.topic_prefix, target.key)
            if ident not in seen:
                seen.add(ident)
                targets.append(target)
    return targets


# -- publishing -----------------------------------------------------------------------------------------


def origin() -> str:
    return f"{socket.gethostname()}:cli:{os.getpid()}"


def publish(targets: list[Target], make: Callable[[Target], Any], opts: Options, timeout: float) -> int:
    """Publish one event per target (grouped by Kafka cluster and topic prefix); returns how many."""
    from hybridfs.events.bus import publish_now
    from hybridfs.events.topics import KafkaUnavailable

    groups: dict[tuple[str, str], list[Any]] = {}
    for target in targets:
        groups.setdefault((target.kafka, target.topic_prefix), []).append(make(target))
    total = 0
    for (kafka, topic_prefix), events in groups.items():
        try:
            total += publish_now(events, timeout, bootstrap=kafka, topic_prefix=topic_prefix,
                                 kafka_config=opts.kafka_config)
        except KafkaUnavailable as exc:
            raise CliError(str(exc)) from None
        except ValueError as exc:  # a bad topic prefix
            raise CliError(str(exc)) from None
    return total


# -- progress and waiting -------------------------------------------------------------------------------


class Progress:
    """Progress of a wait on stderr: a tqdm bar (bytes, with rate and ETA, and the file count) on a terminal;
    elsewhere (CI, a log file) a plain line every ``quiet_interval`` seconds, since a bar's carriage returns make
    a log unreadable. The last line is plain either way."""

    def __init__(self, label: str, total: int, total_bytes: int, out: TextIO | None = None,
                 quiet_interval: float = 10.0, first_bytes: int = 0) -> None:
        self.label = label
        self.total = total
        self.total_bytes = total_bytes
        self.out = out or sys.stderr
        self.started = time.monotonic()
        self.quiet_interval = quiet_interval
        self.first_bytes = first_bytes
        self._next_quiet = self.started + quiet_interval
        self.bar: tqdm[Any] | None = None
        if self.out.isatty():
            self.bar = tqdm(total=total_bytes, initial=first_bytes, desc=label, unit="iB", unit_scale=True,
                            unit_divisor=1024, file=self.out, leave=False, dynamic_ncols=True)

    def line(self, done: int, done_bytes: int) -> str:
        elapsed = time.monotonic() - self.started
        moved = done_bytes - self.first_bytes  # what was there already is not part of the rate
        rate = f", {moved / elapsed / 2**20:.1f} MiB/s" if elapsed >= 0.1 and moved else ""
        return (f"{self.label}: {done}/{self.total} files, {done_bytes / 2**20:.1f}/"
                f"{self.total_bytes / 2**20:.1f} MiB, {elapsed:.1f}s{rate}")

    def update(self, done: int, done_bytes: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{done}/{self.total} files", refresh=False)
            self.bar.update(done_bytes - self.bar.n)
        elif time.monotonic() >= self._next_quiet:
            self._next_quiet += self.quiet_interval
            print(self.line(done, done_bytes), file=self.out, flush=True)

    def finish(self, done: int, done_bytes: int) -> None:
        if self.bar is not None:
            self.bar.close()
        print(self.line(done, done_bytes), file=self.out, flush=True)


def _state_or_gone(target: Target) -> str | None:
    assert target.path is not None
    try:
        return _xattr(target.path, XATTR_STATE)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # deleted meanwhile: nothing to wait for
            return "gone"
        raise CliError(f"{target.path}: {exc.strerror}") from None


def wait_for_state(targets: list[Target], want: str, label: str, timeout: float) -> None:
    """Poll ``user.hybridfs.state`` of every target until it is ``want``; CliError at the deadline."""
    waiting = [t for t in targets if t.path is not None and t.state != want]
    total_bytes = sum(t.size or 0 for t in targets)
    done_bytes = sum(t.size or 0 for t in targets if t not in waiting)
    progress = Progress(label, len(targets), total_bytes, first_bytes=done_bytes)
    deadline = time.monotonic() + timeout
    with concurrent.futures.ThreadPoolExecutor(RESOLVE_THREADS) as pool:
        while waiting:
            progress.update(len(targets) - len(waiting), done_bytes)
            sweep_start = time.monotonic()
            still: list[Target] = []
            # The mounts work through the events roughly in the order they were published: a sweep stops at
            # the first batch with a file not done yet, so polling costs the mount about one getxattr per
            # file, not one per file per sweep (which took a third of the mount's time from its purges).
            for first in range(0, len(waiting), RESOLVE_THREADS):
                batch = waiting[first:first + RESOLVE_THREADS]
                for target, now in zip(batch, pool.map(_state_or_gone, batch), strict=True):
                    if now == want:
                        done_bytes += target.size or 0
                    elif now != "gone":
                        still.append(target)
                if still:
                    still += waiting[first + RESOLVE_THREADS:]
                    break
            waiting = still
            if not waiting:
                break
            if time.monotonic() >= deadline:
                progress.finish(len(targets) - len(waiting), done_bytes)
                names = ", ".join(str(t.path) for t in waiting[:3]) + (", ..." if len(waiting) > 3 else "")
                raise CliError(f"timed out after {timeout:g}s: {len(waiting)} of {len(targets)} files not {want} "
                               f"yet ({names})")
            # Poll at most every 20 ms (a sweep of a few files is a few getxattr calls), and never spend more
            # than half the time polling a large tree.
            time.sleep(max(0.02, time.monotonic() - sweep_start))
    progress.finish(len(targets), done_bytes)


# -- the verbs ------------------------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> Options:
    kafka, topic_prefix, kafka_config = args.kafka, args.topic_prefix, {}
    if args.config:
        from hybridfs.config import ConfigError, MountConfig, from_mapping, read_config_file

        try:
            cfg = from_mapping(read_config_file(args.config), MountConfig())
        except ConfigError as exc:
            raise CliError(str(exc)) from None
        kafka = kafka or cfg.kafka or None
        topic_prefix = topic_prefix or (cfg.topic_prefix if cfg.topic_prefix != DEFAULT_TOPIC_PREFIX else None)
        kafka_config.update(cfg.kafka_options)
    for item in args.kafka_option or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--kafka-option {item!r}: expected KEY=VALUE")
        kafka_config[name.strip()] = value.strip()
    return Options(kafka=kafka, topic_prefix=topic_prefix, kafka_config=kafka_config,
                   mount_check=not args.no_mount_check)


def _summary(verb: str, published: int, skipped: dict[str, int]) -> None:
    notes = ", ".join(f"{n} {why}" for why, n in skipped.items() if n)
    print(f"{verb}: {published} event{'s' if published != 1 else ''} published" + (f" ({notes})" if notes else ""),
          file=sys.stderr)


def _targets(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The Kafka options and the resolved PATH arguments of a verb; --wait needs paths inside a mount."""
    opts = _options(args)
    targets = resolve(args.paths, opts)
    if getattr(args, "wait", False) and any(t.path is None for t in targets):
        raise CliError("--wait needs paths inside a mount (an s3:// URL cannot be watched)")
    return opts, targets


def cmd_hydrate(args: argparse.Namespace) -> int:
    from hybridfs.events.schema import Event

    opts, targets = _targets(args)
    too_large = [t for t in targets if t.mount is not None and t.mount.capacity is not None and t.size is not None
                 and t.size > t.mount.capacity]
    todo = [t for t in targets if t.state != "cached" and t not in too_large]
    me = origin()
    published = publish(todo, lambda t: Event.hydrate(t.key, t.etag, t.size, "cli", me, bucket=t.bucket), opts,
                        args.kafka_timeout)
    _summary("hydrate", published, {"already cached": sum(1 for t in targets if t.state == "cached"),
                                    "larger than the cache, skipped": len(too_large)})
    if args.wait:
        wait_for_state([t for t in targets if t not in too_large], "cached", "hydrate", args.timeout)
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    from hybridfs.events.schema import Event

    opts, targets = _targets(args)
    todo = [t for t in targets if t.state != "cloud" or args.unpin]
    me = origin()
    pin = False if args.unpin else None
    published = publish(todo, lambda t: Event.evict(t.key, t.etag, t.size, "cli", me, pin=pin, bucket=t.bucket),
                        opts, args.kafka_timeout)
    _summary("evict", published, {"already cloud-only": len(targets) - len(todo)})
    if args.wait:
        wait_for_state(targets, "cloud", "evict", args.timeout)
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    from hybridfs.events.schema import Event

    opts, targets = _targets(args)
    me = origin()
    published = publish(targets, lambda t: Event.hydrate(t.key, t.etag, t.size, "pin", me, pin=True,
                                                         bucket=t.bucket), opts, args.kafka_timeout)
    _summary("pin", published, {})
    if args.wait:
        wait_for_state(targets, "cached", "pin", args.timeout)
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    from hybridfs.events.schema import Event

    opts, targets = _targets(args)
    me = origin()
    published = publish(targets, lambda t: Event.hydrate(t.key, t.etag, t.size, "unpin", me, pin=False,
                                                         bucket=t.bucket), opts, args.kafka_timeout)
    _summary("unpin", published, {})
    return 0


def _add_common(parser: argparse.ArgumentParser, *, wait: str | None) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a file or directory (recursive) in a hybridfs mount, or s3://BUCKET/KEY")
    parser.add_argument("--kafka", metavar="BOOTSTRAP",
                        help="Kafka bootstrap servers (default: the mount's; for s3:// URLs HYBRIDFS_KAFKA_BOOTSTRAP)")
    parser.add_argument("--topic-prefix", metavar="PREFIX",
                        help=f"topic prefix (default: the mount's; for s3:// URLs {DEFAULT_TOPIC_PREFIX!r})")
    parser.add_argument("--kafka-option", action="append", metavar="KEY=VALUE",
                        help="extra librdkafka setting (TLS, SASL); repeatable")
    parser.add_argument("--config", metavar="FILE",
                        help="take kafka, topic_prefix and kafka_options from a mount's TOML config")
    parser.add_argument("--no-mount-check", action="store_true",
                        help="publish for an s3:// URL that no hybridfs mount on this host serves (mounts on "
                             "other hosts consume the events)")
    parser.add_argument("--kafka-timeout", type=float, default=15.0, metavar="SECONDS",
                        help="how long Kafka may take to acknowledge the events (default 15)")
    if wait is not None:
        parser.add_argument("--wait", action="store_true", help=wait)
        parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                            help="give up waiting after this long (default 600)")


def register(subparsers: Any) -> None:
    hydrate = subparsers.add_parser(
        "hydrate", help="copy files from S3 into their mount's cache (warm-up)",
        description="Publish hydrate events for files (directories: every file below them) so the mounts "
                    "consuming them copy the files from S3 into their caches. Files already cached are skipped.")
    _add_common(hydrate, wait="wait until every file is cached, with a progress bar on stderr")
    hydrate.set_defaults(func=cmd_hydrate)

    evict = subparsers.add_parser(
        "evict", help="purge files from their mount's cache (they stay in S3)",
        description="Publish evict events: the mounts purge the files from their caches once S3 is known to hold "
                    "the same bytes (uploading the cached copy first if it does not). Pinned and open files stay.")
    _add_common(evict, wait="wait until every file is cloud-only")
    evict.add_argument("--unpin", action="store_true", help="unpin the files first, so pinned files go too")
    evict.set_defaults(func=cmd_evict)

    pin = subparsers.add_parser(
        "pin", help="pin files: hydrate them and never evict them",
        description="Publish hydrate events with pin=true: the files are hydrated and the eviction planner never "
                    "picks them (hybridfs evict refuses them unless --unpin).")
    _add_common(pin, wait="wait until every file is cached")
    pin.set_defaults(func=cmd_pin)

    unpin = subparsers.add_parser(
        "unpin", help="unpin files (they stay cached until they are cold)",
        description="Publish hydrate events with pin=false: the files become ordinary cached files again.")
    _add_common(unpin, wait=None)
    unpin.set_defaults(func=cmd_unpin)
