"""The event schema: versioned JSON hydrate/evict events, and the validation of events read back from Kafka.

On the wire an event is one Kafka message: key = the full S3 object key (UTF-8), value = a JSON object::

    {"version": 1, "type": "hydrate", "key": "demo/photos/a.jpg",
     "etag": "\\"9b2cf535f27731c974343645a3985328\\"", "size": 1048576, "reason": "read-miss",
     "origin": "host1:/mnt/demo", "time": 1732500000.25, "id": "4f1c0e2a9d6b4b8c8a0f6c2d1e3b5a79"}

Optional members: ``pin`` (true/false: a pin or unpin request riding on a hydrate/evict event) and ``bucket``.
Unknown members are ignored, so a newer producer may add members without a version bump; anything that
changes the meaning of a member needs a new ``version``.

Everything read from Kafka is untrusted (contract 6): :func:`decode` accepts only events whose key is a clean
relative path under the mount's prefix, so no event can name a file outside the cache directory.
"""

from __future__ import annotations

import json
import math
import re
import time as _time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

__all__ = [
    "MAX_EVENT_BYTES",
    "MAX_KEY_BYTES",
    "MAX_OBJECT_SIZE",
    "SCHEMA_VERSION",
    "Event",
    "EventType",
    "InvalidEvent",
    "RejectEvent",
    "Topics",
    "decode",
    "encode",
    "topic_names",
    "validate_key",
]

SCHEMA_VERSION = 1
EventType = Literal["hydrate", "evict"]
EVENT_TYPES: frozenset[str] = frozenset(get_args(EventType))

MAX_KEY_BYTES = 1024  # S3's limit on an object key
MAX_SEGMENT_BYTES = 255  # NAME_MAX: every segment becomes a file or directory name in the cache
MAX_OBJECT_SIZE = 5 * 1024**4  # 5 TiB, S3's largest object
MAX_ETAG_CHARS = 256
MAX_TEXT_CHARS = 256  # reason, origin, id, bucket
MAX_EVENT_BYTES = 64 * 1024  # a real event is a few hundred bytes; anything this big is garbage

_TOPIC_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")


class RejectEvent(Exception):
    """An event that can never be processed: a handler raises it to have the event dead-lettered, then
    committed. ``reason`` is a short human-readable text for the log line and the dead-letter headers.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidEvent(RejectEvent):
    """Raised by :func:`decode` for bytes that are not a valid event of a version and type we know."""


@dataclass(frozen=True, kw_only=True)
class Event:
    """One hydrate or evict request. Build with :meth:`hydrate` / :meth:`evict`; compare and hash by value."""

    version: int = SCHEMA_VERSION
    type: EventType
    key: str
    etag: str | None
    size: int | None
    reason: str
    origin: str
    time: float
    id: str
    pin: bool | None = None
    bucket: str | None = None

    @classmethod
    def new(
        cls,
        type: EventType,
        key: str,
        etag: str | None,
        size: int | None,
        reason: str,
        origin: str,
        *,
        pin: bool | None = None,
        bucket: str | None = None,
    ) -> Event:
        return cls(
            type=type,
            key=key,
            etag=etag,
            size=size,
            reason=reason,
            origin=origin,
            time=_time.time(),
            id=uuid.uuid4().hex,
            pin=pin,
            bucket=bucket,
        )

    @classmethod
    def hydrate(
        cls,
        key: str,
        etag: str | None,
        size: int | None,
        reason: str,
        origin: str,
        *,
        pin: bool | None = None,
        bucket: str | None = None,
    ) -> Event:
        """A request to copy ``key`` from S3 into the cache (``read-miss``, ``tee-failed``, ``cli``...)."""
        return cls.new("hydrate", key, etag, size, reason, origin, pin=pin, bucket=bucket)

    @classmethod
    def evict(
        cls,
        key: str,
        etag: str | None,
        size: int | None,
        reason: str,
        origin: str,
        *,
        pin: bool | None = None,
        bucket: str | None = None,
    ) -> Event:
        """A request to purge ``key`` from the cache (reason e.g. ``watermark``, ``max-age``, ``cli``)."""
        return cls.new("evict", key, etag, size, reason, origin, pin=pin, bucket=bucket)

    @property
    def kafka_key(self) -> bytes:
        """The Kafka message key: the object key in UTF-8 (so all events for one object share a partition)."""
        return self.key.encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "type": self.type,
            "key": self.key,
            "etag": self.etag,
            "size": self.size,
            "reason": self.reason,
            "origin": self.origin,
            "time": self.time,
            "id": self.id,
        }
        if self.pin is not None:
            out["pin"] = self.pin
        if self.bucket is not None:
            out["bucket"] = self.bucket
        return out


class Topics(NamedTuple):
    hydrate: str
    evict: str
    dead_letter: str

    def for_event(self, event: Event) -> str:
        return self.hydrate if event.type == "hydrate" else self.evict


def topic_names(prefix: str) -> Topics:
    """The three topic names for ``prefix`` (Kafka's legal topic characters only: ``[A-Za-z0-9._-]``)."""
    if not _TOPIC_PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"invalid topic prefix {prefix!r}: use 1-200 characters of A-Z a-z 0-9 . _ -")
    return Topics(hydrate=f"{prefix}.hydrate", evict=f"{prefix}.evict", dead_letter=f"{prefix}.dead-letter")


def encode(event: Event) -> bytes:
    """The JSON value of ``event`` as UTF-8 bytes (compact, keys sorted, so equal events encode equally)."""
    return json.dumps(event.to_dict(), separators=(",", ":"), sort_keys=True, allow_nan=False).encode("utf-8")


# --- decoding untrusted input -------------------------------------------------------------------------------


def _show(value: object, limit: int = 80) -> str:
    """``value`` for a reason text: repr of a scalar (cut to ``limit``), the type of anything else (repr of a
    nested value from untrusted JSON can be huge, or deeper than the recursion limit)."""
    if value is None or isinstance(value, str | bool | float):
        return repr(value)[:limit]
    if isinstance(value, int):
        return repr(value)[:limit] if value.bit_length() < 256 else "a huge integer"
    try:
        return json.dumps(value)[:limit]
    except (RecursionError, ValueError, TypeError):
        return "a deeply nested JSON value"


def _reject_constant(name: str) -> Any:
    raise InvalidEvent(f"JSON constant {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InvalidEvent(f"duplicate member {_show(k)}")
        out[k] = v
    return out


def _sane_text(value: object, field: str, *, limit: int = MAX_TEXT_CHARS, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidEvent(f"{field} must be a string, not {type(value).__name__}")
    if not value and not empty_ok:
        raise InvalidEvent(f"{field} is empty")
    if len(value) > limit:
        raise InvalidEvent(f"{field} is longer than {limit} characters")
    if not value.isprintable():
        raise InvalidEvent(f"{field} contains unprintable characters")
    return value


def _normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def validate_key(key: object, *, allowed_prefix: str) -> str:
    """Check that ``key`` is a clean object key strictly under ``allowed_prefix``; return it, or raise
    InvalidEvent.

    Clean: a non-empty relative path of non-empty segments, none of them ``.`` or ``..``, no NUL, valid UTF-8,
    at most 1024 bytes in all and 255 bytes a segment. ``allowed_prefix`` is the mount's prefix inside the
    bucket ("" for the whole bucket; a trailing ``/`` is implied).
    """
    if not isinstance(key, str):
        raise InvalidEvent(f"key must be a string, not {type(key).__name__}")
    if not key:
        raise InvalidEvent("key is empty")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent("key is not valid UTF-8 (lone surrogate)") from None
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidEvent(f"key is {len(raw)} bytes, over the limit of {MAX_KEY_BYTES}")
    if "\x00" in key:
        raise InvalidEvent("key contains NUL")
    if key.startswith("/"):
        raise InvalidEvent("key starts with '/'")
    segments = key.split("/")
    for seg in segments:
        if seg == "":
            raise InvalidEvent("key has an empty path segment ('//' or a trailing '/')")
        if seg in (".", ".."):
            raise InvalidEvent(f"key has a {seg!r} path segment")
        if len(seg.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise InvalidEvent(f"key has a path segment over {MAX_SEGMENT_BYTES} bytes")
    prefix = _normalize_prefix(allowed_prefix)
    if prefix and (not key.startswith(prefix) or len(key) == len(prefix)):
        raise InvalidEvent(f"key is not under the mount's prefix {prefix!r}")
    return key


def decode(raw: bytes, *, allowed_prefix: str) -> Event:
    """Parse and validate one event value read from Kafka; raises :class:`InvalidEvent` saying what is bad."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise InvalidEvent(f"value must be bytes, not {type(raw).__name__}")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"value is {len(raw)} bytes, over the limit of {MAX_EVENT_BYTES}")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"value is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except InvalidEvent:
        raise
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"value is a JSON {type(obj).__name__}, not an object")

    version = obj.get("version")
    if type(version) is not int:
        raise InvalidEvent("version is missing or not an integer")
    if version != SCHEMA_VERSION:
        raise InvalidEvent(f"unknown version {version}")

    etype = obj.get("type")
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
        raise InvalidEvent(f"unknown type {_show(etype)}")

    for required in ("key", "etag", "size", "reason", "origin", "time", "id"):
        if required not in obj:
            raise InvalidEvent(f"missing member {required!r}")

    key = validate_key(obj["key"], allowed_prefix=allowed_prefix)

    etag = obj["etag"]
    if etag is not None:
        etag = _sane_text(etag, "etag", limit=MAX_ETAG_CHARS)

    size = obj["size"]
    if size is not None:
        if type(size) is not int:
            raise InvalidEvent(f"size must be an integer or null, not {type(size).__name__}")
        if size < 0 or size > MAX_OBJECT_SIZE:
            raise InvalidEvent(f"size {_show(size)} is out of range (0 to 5 TiB)")

    reason = _sane_text(obj["reason"], "reason", limit=64)
    origin = _sane_text(obj["origin"], "origin")
    event_id = _sane_text(obj["id"], "id", limit=64)

    when = obj["time"]
    if type(when) not in (int, float) or not math.isfinite(when) or when < 0:
        raise InvalidEvent("time must be a non-negative finite number")

    pin = obj.get("pin")
    if pin is not None and type(pin) is not bool:
        raise InvalidEvent("pin must be true, false or null")

    bucket = obj.get("bucket")
    if bucket is not None:
        bucket = _sane_text(bucket, "bucket", limit=255)

    return Event(
        version=version,
        type=etype,  # type: ignore[arg-type]  # checked against EVENT_TYPES above
        key=key,
        etag=etag,
        size=size,
        reason=reason,
        origin=origin,
        time=float(when),
        id=event_id,
        pin=pin,
        bucket=bucket,
    )
