"""The change feed's record format: ``<topic-prefix>.changes``, a compacted topic of what every key holds now.

One Kafka message per change a mount made (after S3 acknowledged it). Key = the full S3 object key in UTF-8
(a directory by its marker key, ending in ``/``), so compaction keeps the latest record of every key and the
topic is a replayable picture of the namespace's metadata. Header ``hybridfs.origin`` = the mount that made
the change, header ``hybridfs.seq`` = ``<run>:<count>`` its order among that mount's changes (both also on
tombstones, which have no value). Value::

    {"version": 1, "key": "demo/a.txt", "origin": "host1:/mnt/demo", "time": 1732500000.25,
     "id": "4f1c...", "attrs": {"type": "file", "mode": 33188, "uid": 1000, "gid": 1000, "size": 5,
     "mtime_ns": 1732500000000000000, "etag": "9b2c...", "ctime_ns": ..., "atime_ns": ..., "rdev": 0,
     "target": "b.txt"}}

``attrs`` null: the key changed and its attributes are unknown (a directory rename's copies): fetch lazily.
A null value (tombstone): the key was deleted. ``time`` is the producing host's clock, for delay figures only:
records are ordered by their position, origin and ``hybridfs.seq``, never by a clock (``KeyOrder``).
``ctime_ns``, ``atime_ns``, ``rdev``, ``etag`` and ``target`` are optional; unknown members are ignored (a newer
producer may add some without a version bump).

Everything read from Kafka is untrusted: :func:`decode_change` accepts only records whose key is a clean key
under the mount's prefix and whose attributes are in range, and raises :class:`InvalidEvent` saying why.
"""

from __future__ import annotations

import json
import math
import re
import stat as stat_mod
import uuid
from typing import Any

from hybridfs.core.attrs import MAX_ID, MAX_RDEV, MAX_TIME_S, MIN_TIME_S, NS, Stat
from hybridfs.core.changes import Change
from hybridfs.events.schema import (
    MAX_ETAG_CHARS,
    MAX_EVENT_BYTES,
    MAX_OBJECT_SIZE,
    InvalidEvent,
    _no_duplicates,
    _reject_constant,
    _sane_text,
    _show,
    topic_names,
    validate_key,
)

__all__ = ["CHANGES_VERSION", "ORIGIN_HEADER", "SEQ_HEADER", "changes_topic", "decode_change", "encode_change"]

CHANGES_VERSION = 1
ORIGIN_HEADER = "hybridfs.origin"
# "<run>:<count>": the publishing mount's run (random, new at each start) and the count of changes it published
# in that run, in the order S3 acknowledged them. Orders one mount's records of a key (KeyOrder); on tombstones too.
SEQ_HEADER = "hybridfs.seq"
_SEQ = re.compile(r"([0-9a-f]{1,32}):([0-9]{1,18})")
MAX_TARGET_BYTES = 4095  # a symlink target is shorter than PATH_MAX
# Compaction keeps the latest record of each key; tombstones stay a day so a mount that was away that long
# still hears of the delete.
TOPIC_CONFIG = {"cleanup.policy": "compact", "delete.retention.ms": str(24 * 3600 * 1000)}

_TYPES = {
    "file": stat_mod.S_IFREG,
    "dir": stat_mod.S_IFDIR,
    "symlink": stat_mod.S_IFLNK,
    "fifo": stat_mod.S_IFIFO,
    "socket": stat_mod.S_IFSOCK,
    "chr": stat_mod.S_IFCHR,
    "blk": stat_mod.S_IFBLK,
}
_NAMES = {v: k for k, v in _TYPES.items()}


def changes_topic(prefix: str) -> str:
    topic_names(prefix)  # validates the prefix
    return f"{prefix}.changes"


# --- encoding -------------------------------------------------------------------------------------------------


def _attrs(change: Change) -> dict[str, Any] | None:
    st = change.stat
    if st is None:
        return None
    out: dict[str, Any] = {
        "type": _NAMES[stat_mod.S_IFMT(st.mode)],
        "mode": st.mode,
        "uid": st.uid,
        "gid": st.gid,
        "size": st.size,
        "mtime_ns": st.mtime_ns,
    }
    for name, value in (("etag", st.etag), ("ctime_ns", st.ctime_ns), ("atime_ns", st.atime_ns),
                        ("target", change.target)):
        if value is not None:
            out[name] = value
    if st.rdev:
        out["rdev"] = st.rdev
    return out


def encode_change(change: Change, origin: str, seq: tuple[str, int] | None = None
                  ) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    """(Kafka key, value or None for a tombstone, headers) of ``change`` made by ``origin``, the ``seq``-th
    change (``(run, count)``) that mount published."""
    headers = [(ORIGIN_HEADER, origin.encode("utf-8"))]
    if seq is not None:
        headers.append((SEQ_HEADER, f"{seq[0]}:{seq[1]}".encode()))
    key = change.key.encode("utf-8")
    if change.removed:
        return key, None, headers
    value = {
        "version": CHANGES_VERSION,
        "key": change.key,
        "origin": origin,
        "time": change.time,
        "id": uuid.uuid4().hex,
        "attrs": _attrs(change),
    }
    return key, json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False).encode("utf-8"), headers


# --- decoding untrusted input ---------------------------------------------------------------------------------


def _header(headers: Any, name: str) -> str:
    for k, v in headers or ():
        if k == name and isinstance(v, bytes | bytearray):
            try:
                return bytes(v).decode("utf-8")[:256]
            except UnicodeDecodeError:
                return ""
    return ""


def _seq(headers: Any) -> tuple[str, int] | None:
    """The record's sequence header; None when missing or unusable (the record is then of unknown order, which
    costs a HEAD, never a wrong answer: not a reason to set the record aside)."""
    match = _SEQ.fullmatch(_header(headers, SEQ_HEADER))
    return (match.group(1), int(match.group(2))) if match else None


def _object_key(raw: bytes | None, *, allowed_prefix: str) -> str:
    if not raw:
        raise InvalidEvent("record has no key")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent("record key is not UTF-8") from None
    bare = text[:-1] if text.endswith("/") else text
    validate_key(bare, allowed_prefix=allowed_prefix)
    return text


def _int(obj: dict[str, Any], name: str, low: int, high: int, *, required: bool = True) -> int | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidEvent(f"attrs.{name} is missing")
        return None
    if type(value) is not int or not low <= value <= high:
        raise InvalidEvent(f"attrs.{name} must be an integer in {low}..{high}")
    return value


def _time_ns(obj: dict[str, Any], name: str, *, required: bool = True) -> int | None:
    return _int(obj, name, MIN_TIME_S * NS, MAX_TIME_S * NS, required=required)


def _stat(attrs: object, key: str) -> tuple[Stat, str | None]:
    if not isinstance(attrs, dict):
        raise InvalidEvent(f"attrs must be an object or null, not {type(attrs).__name__}")
    name = attrs.get("type")
    kind = _TYPES.get(name) if isinstance(name, str) else None  # any other JSON value: unhashable, or not a name
    if kind is None:
        raise InvalidEvent(f"unknown attrs.type {_show(name)}")
    mode = _int(attrs, "mode", 0, 0o177777)
    assert mode is not None
    if stat_mod.S_IFMT(mode) != kind:
        raise InvalidEvent(f"attrs.mode {mode:o} is not of type {name}")
    if (kind == stat_mod.S_IFDIR) != key.endswith("/"):
        raise InvalidEvent("a directory's key must end in '/', and only a directory's")
    etag = attrs.get("etag")
    if etag is not None:
        etag = _sane_text(etag, "attrs.etag", limit=MAX_ETAG_CHARS)
    target = attrs.get("target")
    if target is not None:
        target = _sane_text(target, "attrs.target", limit=MAX_TARGET_BYTES, empty_ok=True)
    st = Stat(
        mode=mode,
        uid=_int(attrs, "uid", 0, MAX_ID) or 0,
        gid=_int(attrs, "gid", 0, MAX_ID) or 0,
        size=_int(attrs, "size", 0, MAX_OBJECT_SIZE) or 0,
        mtime_ns=_time_ns(attrs, "mtime_ns") or 0,
        etag=etag,
        ctime_ns=_time_ns(attrs, "ctime_ns", required=False),
        atime_ns=_time_ns(attrs, "atime_ns", required=False),
        rdev=_int(attrs, "rdev", 0, MAX_RDEV, required=False) or 0,
    )
    return st, target


def decode_change(key: bytes | None, value: bytes | None, headers: Any, *, allowed_prefix: str,
                  timestamp: float = 0.0, position: tuple[int, int] | None = None) -> Change:
    """Parse and validate one record of the changes topic; raises :class:`InvalidEvent` saying what is bad.
    ``position``: the record's (partition, offset), which orders the records of one key (KeyOrder). A tombstone
    has no time of its own: ``timestamp`` (the record's, from Kafka) is its time, for the delay figures only."""
    object_key = _object_key(key, allowed_prefix=allowed_prefix)
    if value is None:
        return Change(object_key, None, removed=True, origin=_header(headers, ORIGIN_HEADER), time=timestamp,
                      position=position, seq=_seq(headers))
    if len(value) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"value is {len(value)} bytes, over the limit of {MAX_EVENT_BYTES}")
    try:
        obj = json.loads(bytes(value).decode("utf-8"), parse_constant=_reject_constant,
                         object_pairs_hook=_no_duplicates)
    except InvalidEvent:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidEvent(f"malformed JSON: {exc}"[:300]) from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"value is a JSON {type(obj).__name__}, not an object")
    if type(obj.get("version")) is not int or obj["version"] != CHANGES_VERSION:
        raise InvalidEvent(f"unknown version {_show(obj.get('version'))}")
    for required in ("key", "origin", "time", "attrs"):
        if required not in obj:
            raise InvalidEvent(f"missing member {required!r}")
    if obj["key"] != object_key:
        raise InvalidEvent("the value's key is not the record's key")
    origin = _sane_text(obj["origin"], "origin")
    when = obj["time"]
    if type(when) not in (int, float) or not math.isfinite(when) or when < 0:
        raise InvalidEvent("time must be a non-negative finite number")
    if obj["attrs"] is None:
        return Change(object_key, None, origin=origin, time=float(when), position=position, seq=_seq(headers))
    st, target = _stat(obj["attrs"], object_key)
    return Change(object_key, st, target=target, origin=origin, time=float(when), position=position,
                  seq=_seq(headers))


# --- the metadata index's rows (hybridfs.services.feed_index) -------------------------------------------------


def attrs_json(change: Change) -> str | None:
    """The ``attrs`` member of ``change`` as JSON, for the metadata index; None when there is nothing to keep."""
    attrs = None if change.removed else _attrs(change)
    return None if attrs is None else json.dumps(attrs, separators=(",", ":"), sort_keys=True)


def stat_from_attrs_json(text: str, key: str) -> Stat:
    """A row of the metadata index back as a Stat; InvalidEvent when the row is unusable."""
    try:
        attrs = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"malformed JSON: {exc}"[:300]) from None
    return _stat(attrs, key)[0]
