"""Mount configuration: one dataclass whose fields are at once the CLI flags and the TOML keys.

Every option is declared once, in ``MountConfig``, with its help text; ``add_arguments`` derives the
``hybridfs mount`` flags from it and ``from_mapping`` validates a TOML table against it, so the two can never
drift apart. Errors name the key, the value and what is wrong.

Secrets stay out of the file: any string value (including the values of ``kafka_options``) may be, or contain,
``${env:NAME}`` (an environment variable, e.g. from the unit's ``EnvironmentFile=``) or ``${cred:NAME}`` (a
systemd credential: the file ``$CREDENTIALS_DIRECTORY/NAME``, from ``LoadCredential=``). A reference that does
not resolve is an error naming the key. ``hybridfs config check`` prints secrets masked.

Under systemd, ``StateDirectory=`` and ``CacheDirectory=`` provide the defaults of ``state_dir`` and ``cache_dir``
(``$STATE_DIRECTORY`` and ``$CACHE_DIRECTORY``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


class ConfigError(ValueError):
    """A bad option: the message names the key, the value and what is wrong."""


# ``${env:NAME}`` / ``${cred:NAME}`` inside a string value.
_REFERENCE_RE = re.compile(r"\$\{(env|cred):([A-Za-z_][A-Za-z0-9_.-]*)\}")
# librdkafka settings whose values are secrets (sasl.password, ssl.key.password, ssl.keystore.password,
# ssl.key.pem, sasl.oauthbearer.client.secret, sasl.oauthbearer.config, ...).
_SECRET_KEY_RE = re.compile(r"password|secret|token|key\.pem|oauthbearer\.config|credential", re.IGNORECASE)
MASK = "********"


def has_reference(value: object) -> bool:
    return isinstance(value, str) and _REFERENCE_RE.search(value) is not None


def expand_references(key: str, value: str) -> str:
    """Replace ``${env:NAME}`` and ``${cred:NAME}`` in ``value``; ConfigError (naming ``key``) when one is unset."""

    def resolve(match: re.Match[str]) -> str:
        kind, name = match.group(1), match.group(2)
        if kind == "env":
            found = os.environ.get(name)
            if found is None:
                raise ConfigError(f"{key} = {value!r}: environment variable {name} is not set")
            return found
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(f"{key} = {value!r}: no systemd credentials here ($CREDENTIALS_DIRECTORY is not "
                              "set; add LoadCredential= to the unit)")
        path = Path(directory) / name
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{key} = {value!r}: cannot read credential {path}: {exc.strerror}") from None
        return text.removesuffix("\n")

    return _REFERENCE_RE.sub(resolve, value)


def is_secret(name: str, subkey: str = "") -> bool:
    """Whether the value of option ``name`` (or of its table entry ``subkey``) must never be printed."""
    fld = _FIELDS.get(name)
    if fld is None or not fld.metadata.get("secret"):
        return False
    if fld.metadata.get("kind") == "kv":
        return _SECRET_KEY_RE.search(subkey) is not None
    return True


def parse_size(text: str | int, key: str = "size") -> int:
    """``1G``, ``512M``, ``1.5GiB``, ``4096`` -> bytes (binary units, as rclone and JuiceFS read them)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{key} = {text!r}: must not be negative")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"{key} = {text!r}: not a size (examples: 4096, 512M, 10G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(size: int) -> str | int:
    """The inverse of ``parse_size`` where it is exact: 10737418240 -> ``10G``; other sizes stay numbers."""
    for suffix in ("P", "T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return size


def _opt(default: Any, help: str, *, kind: str = "", secret: bool = False) -> Any:
    meta = {"help": help, "kind": kind, "secret": secret}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_state_dir(name: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or (
        "/var/lib" if os.geteuid() == 0 and not os.environ.get("HOME") else os.path.expanduser("~/.local/state"))
    return Path(base) / "hybridfs" / name


@dataclass
class MountConfig:
    source: str = _opt("", "s3://BUCKET[/PREFIX] to mount")
    mountpoint: str = _opt("", "directory to mount on")
    cache_dir: str = _opt("", "local cache directory (required)")
    cache_size: int = _opt(10 * 1024**3, "cache size limit, e.g. 10G", kind="size")
    cache_fsync: bool = _opt(False, "fsync every file committed to the cache (off: a copy torn by a power loss "
                                    "fails its checksums on first read and is fetched again from S3)")
    state_dir: str = _opt("", "state directory for the event outbox and spool files "
                              "(default ~/.local/state/hybridfs/<cache-id>)")
    cache_id: str = _opt("", "identity of this cache: one Kafka consumer group per cache (default: host + "
                             "cache dir)")
    # S3
    endpoint_url: str = _opt("", "S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    region: str = _opt("", "S3 region (default: the boto3 chain)")
    s3_threads: int = _opt(16, "concurrent S3 requests")
    s3_max_attempts: int = _opt(4, "attempts per S3 request before the error is returned (botocore retries)")
    s3_connect_timeout: float = _opt(5.0, "seconds to connect to S3")
    s3_read_timeout: float = _opt(30.0, "seconds to wait for S3 data")
    part_size: int = _opt(8 * 1024**2, "multipart upload part size, e.g. 8M", kind="size")
    max_inflight_parts: int = _opt(8, "parts of one file uploading at once (bounds memory per writer)")
    write_timeout: float = _opt(60.0, "seconds after which close()/fsync() of an unfinished upload returns EIO")
    abort_uploads_after: float = _opt(86400.0, "abort multipart uploads under the prefix older than this many "
                                                "seconds, left by crashed mounts (0: never)")
    read_chunk_size: int = _opt(8 * 1024**2, "ranged GET size for cache misses", kind="size")
    readahead_chunks: int = _opt(16, "chunks fetched ahead of a sequential reader")
    kernel_readahead: int = _opt(4 * 1024**2, "the kernel's read-ahead on the mount (its bdi read_ahead_kb; "
                                              "larger: fewer, overlapping read requests; 0: leave the kernel's "
                                              "128K)", kind="size")
    memory: int = _opt(0, "memory budget shared by read-ahead and write buffers, e.g. 512M; readers and writers "
                          "wait for it (default 0: min(1G, RAM/8))", kind="size")
    offline_start: bool = _opt(False, "mount even when the S3 endpoint does not answer at start (a restart during "
                                      "an outage: cached files are served); a missing bucket or bad credentials "
                                      "still refuse")
    # Kafka
    kafka: str = _opt("", "Kafka bootstrap servers (default HYBRIDFS_KAFKA_BOOTSTRAP)")
    topic_prefix: str = _opt("hybridfs", "topic prefix: <prefix>.hydrate, <prefix>.evict, <prefix>.dead-letter")
    kafka_options: dict[str, str] = _opt({}, "extra librdkafka settings (TLS, SASL), key=value",
                                         kind="kv", secret=True)
    no_events: bool = _opt(False, "run without Kafka: no hydration or eviction events")
    s3_events_topic: str = _opt("", "Kafka topic of the bucket's S3 event records (MinIO and Ceph RGW bucket "
                                    "notifications, AWS S3 through EventBridge): objects created or removed by "
                                    "other tools are seen within a second instead of after --dir-cache-time "
                                    "(default: off; `hybridfs stack env` exports the local stack's topic as "
                                    "HYBRIDFS_S3_EVENTS_TOPIC)")
    # Metadata caching
    attr_timeout: float = _opt(1.0, "seconds the kernel may cache attributes and entries")
    trusted_attr_timeout: float = _opt(0.0, "seconds the kernel may cache the entries and attributes of files that "
                                            "are not open while every writer's changes reach the mount (the change "
                                            "feed and --s3-events-topic caught up); dropped from the kernel as "
                                            "soon as that stops (0: --attr-timeout)")
    dir_cache_time: float = _opt(5.0, "seconds listings and attributes are cached (rclone's --dir-cache-time)")
    max_stale: float = _opt(30.0, "while local metadata is trusted (change feed caught up), the longest a change "
                                  "whose record never reached this mount may go unseen: the directories in use "
                                  "are listed again within this many seconds and ETags compared (0: no such "
                                  "pass; then a lost record stands until --dir-cache-time, or with "
                                  "--s3-events-topic until the next record of the key)")
    negative_cache_time: float = _opt(1.0, "seconds a missing path is remembered as missing")
    # Eviction
    high_watermark: float = _opt(0.90, "start evicting above this fraction of --cache-size")
    low_watermark: float = _opt(0.75, "evict down to this fraction of --cache-size")
    min_free: float = _opt(0.05, "also evict while the cache disk has less than this fraction free")
    max_age: float = _opt(0.0, "evict files not read for this many seconds (0: never)")
    evict_interval: float = _opt(2.0, "seconds between eviction checks")
    local_evict_after: float = _opt(30.0, "seconds evictions may wait for Kafka (down, or not consumed) before the "
                                          "planner's decisions are applied locally (always with --no-events)")
    preserved_size: int = _opt(1024**3, "bytes of cached copies kept under .hybridfs/preserved/ when S3 no longer "
                                        "holds them (oldest dropped first)", kind="size")
    preserved_age: float = _opt(7 * 86400.0, "seconds a preserved copy is kept (0: until --preserved-size needs "
                                             "room)")
    # Ownership and mount options
    uid: int = _opt(-1, "owner of objects without metadata (default: the mounting user)")
    gid: int = _opt(-1, "group of objects without metadata (default: the mounting user's)")
    file_mode: int = _opt(0o644, "permissions of files without metadata (octal)", kind="octal")
    dir_mode: int = _opt(0o755, "permissions of directories without metadata (octal)", kind="octal")
    allow_other: bool = _opt(False, "let other users access the mount (needs user_allow_other for non-root)")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")
    metrics_address: str = _opt("", "serve Prometheus metrics on HOST:PORT, e.g. 127.0.0.1:9464 (default: off)")

    def resolved(self) -> MountConfig:
        """Fill the defaults that depend on the environment."""
        cfg = dataclasses.replace(self)
        if not cfg.cache_dir and os.environ.get("CACHE_DIRECTORY"):  # systemd's CacheDirectory=
            cfg.cache_dir = os.environ["CACHE_DIRECTORY"].split(":")[0]
        if not cfg.state_dir and os.environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory=
            cfg.state_dir = os.environ["STATE_DIRECTORY"].split(":")[0]
        if not cfg.kafka:
            cfg.kafka = os.environ.get("HYBRIDFS_KAFKA_BOOTSTRAP", "")
        if not cfg.endpoint_url:
            cfg.endpoint_url = os.environ.get("AWS_ENDPOINT_URL", "")
        if cfg.cache_dir:
            cfg.cache_dir = str(Path(cfg.cache_dir).expanduser().absolute())
        if not cfg.cache_id:
            digest = hashlib.sha256(f"{socket.gethostname()}:{cfg.cache_dir}".encode()).hexdigest()[:12]
            cfg.cache_id = f"{socket.gethostname()}-{digest}"
        if not cfg.state_dir:
            cfg.state_dir = str(default_state_dir(cfg.cache_id))
        if cfg.memory == 0:
            cfg.memory = default_memory()
        if cfg.uid < 0:
            cfg.uid = os.getuid()
        if cfg.gid < 0:
            cfg.gid = os.getgid()
        return cfg

    def validate(self) -> None:
        bucket_and_prefix(self.source)
        if not self.mountpoint:
            raise ConfigError("mountpoint: missing")
        if not self.cache_dir:
            raise ConfigError("cache_dir: missing (every mount needs a local cache directory)")
        if not self.no_events and not self.kafka:
            raise ConfigError("kafka: no bootstrap servers (pass --kafka, set HYBRIDFS_KAFKA_BOOTSTRAP, "
                              "or --no-events)")
        if self.s3_events_topic and not self.kafka:
            raise ConfigError(f"s3_events_topic = {self.s3_events_topic!r}: needs Kafka (pass --kafka or set "
                              "HYBRIDFS_KAFKA_BOOTSTRAP)")
        checks = [
            ("cache_size", self.cache_size > 0, "must be positive"),
            ("part_size", 5 * 1024**2 <= self.part_size <= 5 * 1024**3, "must be between 5M and 5G (S3 limits)"),
            ("max_inflight_parts", self.max_inflight_parts >= 1, "must be at least 1"),
            ("s3_threads", self.s3_threads >= 1, "must be at least 1"),
            ("s3_max_attempts", self.s3_max_attempts >= 1, "must be at least 1"),
            ("write_timeout", self.write_timeout > 0, "must be positive"),
            ("read_chunk_size", 64 * 1024 <= self.read_chunk_size <= 256 * 1024**2, "must be 64K..256M"),
            ("readahead_chunks", self.readahead_chunks >= 0, "must not be negative"),
            ("memory", self.memory == 0 or self.memory >= 2 * self.read_chunk_size,
             f"must be at least twice read_chunk_size ({self.read_chunk_size})"),
            ("local_evict_after", self.local_evict_after >= 0, "must not be negative"),
            ("preserved_age", self.preserved_age >= 0, "must not be negative"),
            ("low_watermark", 0 < self.low_watermark < self.high_watermark,
             "must be above 0 and below high_watermark"),
            ("high_watermark", 0 < self.high_watermark <= 1, "must be in (0, 1]"),
            ("min_free", 0 <= self.min_free < 1, "must be in [0, 1)"),
            ("max_age", self.max_age >= 0, "must not be negative"),
            ("evict_interval", self.evict_interval > 0, "must be positive"),
            ("max_stale", self.max_stale == 0 or self.max_stale >= 1, "must be 0 (off) or at least 1 second"),
            ("s3_events_topic", re.fullmatch(r"[A-Za-z0-9._-]{0,249}", self.s3_events_topic) is not None,
             "a Kafka topic name: only letters, digits, '.', '_' and '-'"),
            ("topic_prefix", re.fullmatch(r"[A-Za-z0-9._-]{1,200}", self.topic_prefix) is not None,
             "only letters, digits, '.', '_' and '-'"),
            ("log_level", self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
             "must be DEBUG, INFO, WARNING or ERROR"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)!r}: {why}")
        if self.metrics_address:
            host_and_port(self.metrics_address, "metrics_address")


def host_and_port(text: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) -> (host, port); ConfigError naming ``key`` otherwise."""
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\s:\[\]]+)):(\d{1,5})", text)
    if match is None or not 0 < int(match.group(3)) < 65536:
        raise ConfigError(f"{key} = {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464 or [::1]:9464")
    return match.group(1) or match.group(2), int(match.group(3))


def default_memory() -> int:
    """The default memory budget: min(1 GiB, 1/8 of the machine's RAM), at least 64 MiB."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1024**3
    return max(64 * 1024**2, min(1024**3, ram // 8))


def bucket_and_prefix(source: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?", source or "")
    if not match:
        raise ConfigError(f"source = {source!r}: expected s3://BUCKET[/PREFIX] with a valid bucket name")
    return match.group(1), (match.group(2) or "").strip("/")


_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(MountConfig)}


def option_fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(MountConfig) if f.name not in ("source", "mountpoint")]


def coerce(name: str, value: Any) -> Any:
    """Convert one raw value (CLI string or TOML value) to the field's type, or raise ConfigError."""
    fld = _FIELDS.get(name)
    if fld is None:
        close = difflib.get_close_matches(name, list(_FIELDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{name} = {value!r}: unknown option{hint}")
    kind = fld.metadata.get("kind", "")
    if isinstance(value, str):
        value = expand_references(name, value)
    try:
        if kind == "size":
            return parse_size(value, name)
        if kind == "octal":
            return int(value, 8) if isinstance(value, str) else int(value)
        if kind == "kv":
            if isinstance(value, dict):
                return {key: expand_references(f"{name}.{key}", text) for key, text in flat_table(name, value)}
            raise ConfigError(f"{name} = {value!r}: expected a table of key = value")
        if fld.type in ("bool", bool):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name} = {value!r}: expected true or false")
        if fld.type in ("int", int):
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if fld.type in ("float", float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, str):
            raise ConfigError(f"{name} = {value!r}: expected a string")
        return value
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError(f"{name} = {value!r}: expected {fld.type}") from None


def flat_table(name: str, table: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A librdkafka table as (dotted key, string value): TOML reads ``sasl.mechanism = "PLAIN"`` as a nested
    table, librdkafka wants ``"sasl.mechanism": "PLAIN"``; booleans become ``true``/``false`` as it spells them."""
    items: list[tuple[str, str]] = []
    for raw_key, value in table.items():
        key = f"{prefix}{raw_key}"
        if isinstance(value, dict):
            items += flat_table(name, value, key + ".")
        elif isinstance(value, bool):
            items.append((key, "true" if value else "false"))
        elif isinstance(value, str | int | float):
            items.append((key, str(value)))
        else:
            raise ConfigError(f"{name}.{key} = {value!r}: expected a string, number or boolean")
    return items


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options table of a TOML config file: the top-level table, or ``[mount]``.

    With a ``[mount]`` table nothing else may sit at the top level (a stray key there would be silently ignored
    otherwise). Raises ConfigError; option keys and values are checked by ``from_mapping``.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from None
    if "mount" not in data:
        return data
    table = data["mount"]
    if not isinstance(table, dict):
        raise ConfigError(f"mount = {table!r}: must be a table ([mount])")
    for key, value in data.items():
        if key != "mount":
            raise ConfigError(f"{key} = {value!r}: unknown top-level key (options belong in the [mount] table)")
    return table


def world_readable_secrets(path: str | os.PathLike[str], table: dict[str, Any]) -> list[str]:
    """Keys holding a literal secret (no ``${...}`` reference) in a file that others than its owner may read."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return []
    found = []
    for raw_key, value in table.items():
        name = raw_key.replace("-", "_")
        if isinstance(value, dict) and _FIELDS.get(name) is not None:
            found += [f"{name}.{key}" for key, text in flat_table(name, value)
                      if is_secret(name, key) and not has_reference(text)]
        elif is_secret(name) and not has_reference(value):
            found.append(name)
    return found


def from_mapping(values: dict[str, Any], base: MountConfig | None = None) -> MountConfig:
    """Apply a mapping (a TOML table, or CLI overrides) onto ``base``; keys may use - or _."""
    cfg = dataclasses.replace(base) if base else MountConfig()
    for raw_key, value in values.items():
        name = raw_key.replace("-", "_")
        setattr(cfg, name, coerce(name, value))
    return cfg
