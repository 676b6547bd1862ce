"""``hybridfs config check FILE`` and ``hybridfs config get FILE KEY``: the service's configuration, offline.

``check`` loads a TOML file exactly as ``hybridfs mount --config FILE`` does (flags given after FILE override it,
as they do for mount), validates it and prints the effective configuration as TOML with secrets masked. Any
problem is one line naming the key, the value and what is wrong, and a non-zero exit.

``get`` prints one effective value; the unit's ``ExecStopPost=`` uses it to find the mount point it cleans up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from hybridfs.cli import CliError
from hybridfs.commands.mount import add_option_flags, load_config
from hybridfs.config import (
    MASK,
    ConfigError,
    MountConfig,
    expand_references,
    flat_table,
    format_size,
    from_mapping,
    has_reference,
    is_secret,
    read_config_file,
    world_readable_secrets,
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "config", help="check a mount configuration file",
        description="Work with mount configuration files (TOML, e.g. /etc/hybridfs/NAME.toml).")
    verbs = parser.add_subparsers(dest="config_verb", metavar="VERB")
    verbs.required = True

    check = verbs.add_parser(
        "check", help="validate a config file and print the effective configuration",
        description="Validate FILE as `hybridfs mount --config FILE` would read it (flags after FILE override "
                    "it, as for mount) and print the effective configuration as TOML, secrets masked. Exits "
                    "non-zero with one line naming the key, the value and what is wrong.")
    check.add_argument("file", metavar="FILE", help="TOML config file")
    check.add_argument("--env-file", metavar="ENVFILE", action="append", default=[],
                       help="read KEY=VALUE lines into the environment first, as the unit's EnvironmentFile= "
                            "does (e.g. /etc/hybridfs/NAME.env)")
    add_option_flags(check)
    check.set_defaults(func=run_check)

    get = verbs.add_parser(
        "get", help="print one effective option of a config file",
        description="Print the effective value of KEY (an option name, or kafka_options.NAME) from FILE, "
                    "environment defaults applied. Secrets are refused.")
    get.add_argument("file", metavar="FILE", help="TOML config file")
    get.add_argument("key", metavar="KEY", help="option name, e.g. mountpoint")
    get.set_defaults(func=run_get)


def run_check(args: argparse.Namespace) -> int:
    for path in args.env_file:
        os.environ.update(read_env_file(path))
    try:
        table = read_config_file(args.file)
        mount_args = argparse.Namespace(**vars(args), config=args.file, source=None, mountpoint=None)
        cfg = load_config(mount_args)
    except ConfigError as exc:
        raise CliError(one_line(str(exc))) from None
    for key in world_readable_secrets(args.file, table):
        warn(f"{key}: a secret written in {args.file}, which others may read; use ${{env:NAME}} or "
             "${cred:NAME}, or chmod 600 the file")
    if not os.path.isdir(cfg.mountpoint):
        warn(f"mountpoint = {cfg.mountpoint!r}: not a directory on this host; the mount fails until it exists")
    print(f"# effective configuration of {args.file} (secrets masked)")
    sys.stdout.write(render_toml(cfg, table))
    return 0


def run_get(args: argparse.Namespace) -> int:
    name, _, subkey = args.key.replace("-", "_").partition(".")
    try:
        cfg = from_mapping(read_config_file(args.file)).resolved()
    except ConfigError as exc:
        raise CliError(one_line(str(exc))) from None
    value = getattr(cfg, name, None)
    if value is None or (subkey and not isinstance(value, dict)):
        raise CliError(f"{args.key}: unknown option")
    if isinstance(value, dict) and not subkey:
        raise CliError(f"{args.key}: a table; ask for one entry, e.g. {name}.{next(iter(value), 'NAME')}")
    if is_secret(name, subkey):
        raise CliError(f"{args.key}: holds secrets; not printed")
    if subkey:
        if subkey not in value:
            raise CliError(f"{args.key}: not set in {args.file}")
        value = value[subkey]
    print(value if isinstance(value, str) else toml_value(value))
    return 0


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments, blank lines, optional quotes)."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise CliError(f"cannot read environment file {path}: {exc.strerror}") from None
    values = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip().removeprefix("export "), value.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise CliError(f"{path}:{number}: expected KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def warn(message: str) -> None:
    print(f"hybridfs: warning: {message}", file=sys.stderr)


def one_line(text: str) -> str:
    return " ".join(text.split("\n"))


# -- rendering the effective configuration as TOML


def render_toml(cfg: MountConfig, file_table: dict[str, Any]) -> str:
    """``[mount]`` with every option, in declaration order; tables follow as ``[mount.NAME]``.

    A secret is shown as the ``${env:...}``/``${cred:...}`` reference it came from, or masked.
    """
    lines = ["[mount]"]
    tables: list[str] = []
    raw = {key.replace("-", "_"): value for key, value in file_table.items()}
    for fld in dataclasses.fields(MountConfig):
        value = getattr(cfg, fld.name)
        kind = fld.metadata.get("kind", "")
        if kind == "kv":
            raw_items = dict(flat_table(fld.name, raw[fld.name])) if isinstance(raw.get(fld.name), dict) else {}
            entries = [f"{toml_key(key)} = {toml_value(shown(fld.name, key, text, raw_items.get(key)))}"
                       for key, text in value.items()]
            if entries:
                tables += ["", f"[mount.{fld.name}]", *entries]
            continue
        if is_secret(fld.name):
            value = shown(fld.name, "", value, raw.get(fld.name))
        elif kind == "size":
            value = format_size(value)
        elif kind == "octal":
            value = f"0{value:o}"
        lines.append(f"{fld.name} = {toml_value(value)}")
    return "\n".join([*lines, *tables]) + "\n"


def shown(name: str, key: str, value: str, raw: object) -> str:
    if not is_secret(name, key) and not (is_secret(name) and not key):
        return value
    if isinstance(raw, str) and has_reference(raw):
        try:
            if expand_references(name, raw) == value:
                return raw
        except ConfigError:
            pass
    return MASK


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else toml_value(key)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
