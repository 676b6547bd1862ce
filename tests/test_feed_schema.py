"""The change feed's record format: what encodes decodes to the same change, and bad records say why."""

from __future__ import annotations

import json
import stat

import pytest

from hybridfs.core.attrs import Stat
from hybridfs.core.changes import Change
from hybridfs.events.schema import InvalidEvent
from hybridfs.services.feed_schema import decode_change, encode_change

FILE = Stat(stat.S_IFREG | 0o640, 1000, 1000, 5, 1_700_000_000_123_456_789, etag="9b2c", ctime_ns=1_700_000_001 * 10**9)


def roundtrip(change: Change) -> Change:
    key, value, headers = encode_change(change, "host:/mnt")
    return decode_change(key, value, headers, allowed_prefix="p", timestamp=42.0)


def test_a_put_a_symlink_a_directory_and_a_tombstone_round_trip() -> None:
    put = roundtrip(Change.put("p/a.txt", FILE))
    assert put.stat == FILE and put.origin == "host:/mnt" and not put.removed
    link = roundtrip(Change.put("p/l", Stat(stat.S_IFLNK | 0o777, 0, 0, 6, 0, etag="e"), target="target"))
    assert link.target == "target" and link.stat is not None and link.stat.is_symlink
    folder = roundtrip(Change.put("p/d/", Stat(stat.S_IFDIR | 0o755, 0, 0, 0, 0)))
    assert folder.is_dir and folder.stat is not None and folder.stat.is_dir
    gone = roundtrip(Change.delete("p/a.txt"))
    assert gone.removed and gone.origin == "host:/mnt" and gone.time == 42.0
    unknown = roundtrip(Change.unknown("p/moved"))
    assert unknown.stat is None and not unknown.removed


def value(**attrs: object) -> bytes:
    base = {"type": "file", "mode": 0o100644, "uid": 0, "gid": 0, "size": 1, "mtime_ns": 0}
    return json.dumps({"version": 1, "key": "p/a", "origin": "o", "time": 1.0,
                       "attrs": {**base, **attrs}}).encode()


@pytest.mark.parametrize(("key", "raw", "why"), [
    (b"p/a", b"\xff", "malformed JSON"),
    (b"p/a", b"[]", "not an object"),
    (b"../etc/passwd", value(), "'..' path segment"),
    (None, value(), "no key"),
    (b"p/a", value(mode=-1), "attrs.mode"),
    (b"p/a", value(type="dir", mode=0o40755), "a directory's key must end in '/'"),
    (b"p/a", value(type="file", mode=0o40755), "is not of type file"),
    (b"p/a", value(uid=2**40), "attrs.uid"),
    (b"p/a", value(size=-1), "attrs.size"),
    (b"p/a", value(type="door"), "unknown attrs.type"),
    (b"p/b", value(), "not the record's key"),
    (b"p/a", b'{"version": 2}', "unknown version"),
])
def test_bad_records_are_rejected_with_a_reason(key: bytes | None, raw: bytes, why: str) -> None:
    with pytest.raises(InvalidEvent, match=why.replace("(", r"\(")):
        decode_change(key, raw, [], allowed_prefix="p")
