"""``hybridfs mount``: run a mount in the foreground (or, with --daemon, in the background like rclone)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hybridfs.cli import CliError
from hybridfs.config import ConfigError, MountConfig, coerce, from_mapping, option_fields, read_config_file


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "mount", help="mount s3://BUCKET[/PREFIX] on a directory",
        description="Mount an S3 bucket (or a prefix of it) with a local cache. Runs in the foreground until "
                    "unmounted (fusermount3 -u MOUNTPOINT) or signalled (SIGTERM/SIGINT).")
    parser.add_argument("source", nargs="?", help="s3://BUCKET[/PREFIX]")
    parser.add_argument("mountpoint", nargs="?", help="directory to mount on")
    parser.add_argument("--config", metavar="FILE", help="TOML file with mount options (flags override it)")
    parser.add_argument("--daemon", action="store_true", help="run in the background once mounted")
    add_option_flags(parser)
    parser.set_defaults(func=run)


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per MountConfig field; values stay strings here and are validated by ``coerce``."""
    for fld in option_fields():
        flag = "--" + fld.name.replace("_", "-")
        help_text = f"{fld.metadata['help']}"
        if fld.type in ("bool", bool):
            parser.add_argument(flag, dest=f"opt_{fld.name}", action="store_const", const=True, help=help_text)
        elif fld.metadata.get("kind") == "kv":
            parser.add_argument(flag.removesuffix("s"), dest=f"opt_{fld.name}", action="append",
                                metavar="KEY=VALUE", help=help_text)
        else:
            parser.add_argument(flag, dest=f"opt_{fld.name}", metavar=fld.name.upper(), help=help_text)


def load_config(args: argparse.Namespace) -> MountConfig:
    """TOML file (if any), then flags on top; resolved and validated. ConfigError names the bad key."""
    cfg = MountConfig()
    if args.config:
        cfg = from_mapping(read_toml(args.config), cfg)
    overrides: dict[str, Any] = {}
    for fld in option_fields():
        value = getattr(args, f"opt_{fld.name}", None)
        if value is None:
            continue
        if fld.metadata.get("kind") == "kv":
            value = dict(kv_pair(item, fld.name) for item in value)
            value = {**cfg.kafka_options, **value}
        overrides[fld.name] = value
    cfg = from_mapping(overrides, cfg)
    if args.source:
        cfg.source = coerce("source", args.source)
    if args.mountpoint:
        cfg.mountpoint = coerce("mountpoint", args.mountpoint)
    cfg = cfg.resolved()
    cfg.validate()
    return cfg


def kv_pair(item: str, name: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{name}: {item!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def read_toml(path: str) -> dict[str, Any]:
    try:
        return read_config_file(path)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def check_mountpoint(path: str) -> None:
    if not os.path.isdir(path):
        raise CliError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise CliError(f"{path} is already a mount point (unmount it first: fusermount3 -u {path})")
    if not os.path.exists("/dev/fuse"):
        raise CliError("/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    check_mountpoint(cfg.mountpoint)
    offline = preflight(cfg)
    if args.daemon:
        return daemonize(cfg.mountpoint, Path(cfg.state_dir))
    from hybridfs.daemon import run_mount
    from hybridfs.logs import setup_logging

    setup_logging(args.log_level if args.log_level != "INFO" else cfg.log_level)
    if offline:
        logging.getLogger("hybridfs.mount").warning("%s; mounting anyway (--offline-start, or a cache that served "
                                                    "before): cached files are served, the rest fails with EIO "
                                                    "until S3 answers", offline)
    run_mount(cfg, s3_down=offline)
    return 0


def preflight(cfg: MountConfig) -> str | None:
    """Bucket, credentials and endpoint checked before mounting; CliError (one line) when they are wrong.
    Returns why S3 did not answer when ``--offline-start`` lets the mount start anyway."""
    from hybridfs.commands.preflight import CHECK_TIMEOUT, RESTART_CHECK_TIMEOUT, Fatal, Unreachable, check_s3

    restart = (Path(cfg.cache_dir) / "index.sqlite").exists()
    try:
        check_s3(cfg, RESTART_CHECK_TIMEOUT if restart else CHECK_TIMEOUT)
    except Fatal as exc:
        raise CliError(str(exc)) from None
    except Unreachable as exc:
        # A cache that has served this mount before makes an unreachable S3 an outage, not a typo: start, so
        # a restart during an outage still serves the cached files (contract 5). A first start refuses.
        if not cfg.offline_start and not restart:
            raise CliError(f"{exc} (--offline-start mounts anyway, serving the cache)") from None
        return str(exc)
    return None


def daemonize(mountpoint: str, state_dir: Path) -> int:
    """Re-run this command without --daemon in a new session; return once the mount answers."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "mount.log"
    argv = [a for a in sys.argv[1:] if a != "--daemon"]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "hybridfs", *argv], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=log_file, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            print(f"hybridfs: mounted on {mountpoint} (pid {proc.pid}, log {log_path})")
            return 0
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise CliError(f"mount exited with status {proc.returncode}: " + " | ".join(tail))
        time.sleep(0.1)
    proc.terminate()
    raise CliError(f"{mountpoint} was not mounted within 60s; see {log_path}")
