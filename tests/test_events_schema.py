"""The event schema: round trips, and decode() refusing untrusted input (no Kafka needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hybridfs.events.schema import (
    MAX_OBJECT_SIZE,
    Event,
    InvalidEvent,
    RejectEvent,
    decode,
    encode,
    topic_names,
    validate_key,
)

PREFIX = "demo"


def good(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "version": 1,
        "type": "hydrate",
        "key": "demo/photos/a.jpg",
        "etag": '"9b2cf535f27731c974343645a3985328"',
        "size": 1048576,
        "reason": "read-miss",
        "origin": "host1:/mnt/demo",
        "time": 1732500000.25,
        "id": "4f1c0e2a9d6b4b8c8a0f6c2d1e3b5a79",
    }
    obj.update(overrides)
    return obj


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_round_trip_hydrate_and_evict() -> None:
    for event in (
        Event.hydrate("demo/a/b.bin", '"abc"', 12, "read-miss", "h:/m"),
        Event.evict("demo/c", None, None, "watermark", "h:/m", pin=False, bucket="bkt"),
        Event.hydrate("demo/ü ñ/π.txt", "etag-1", 0, "cli", "h:/m", pin=True),
    ):
        assert decode(encode(event), allowed_prefix=PREFIX) == event
        assert event.kafka_key == event.key.encode("utf-8")
        assert len(event.id) == 32 and event.version == 1


def test_encoding_is_compact_json_with_optional_members_omitted() -> None:
    event = Event.hydrate("demo/x", None, None, "cli", "o")
    obj = json.loads(encode(event))
    assert obj["type"] == "hydrate" and obj["key"] == "demo/x" and obj["etag"] is None
    assert "pin" not in obj and "bucket" not in obj
    assert b" " not in encode(event)


def test_unknown_members_are_ignored_for_forward_compatibility() -> None:
    event = decode(raw(good(priority=5, extra={"a": 1})), allowed_prefix=PREFIX)
    assert event.key == "demo/photos/a.jpg"


def test_empty_prefix_allows_the_whole_bucket_and_prefix_slashes_are_normalized() -> None:
    assert decode(raw(good(key="top.txt")), allowed_prefix="").key == "top.txt"
    assert decode(raw(good()), allowed_prefix="/demo/").key == "demo/photos/a.jpg"


def test_invalid_event_is_a_reject_event_with_a_reason() -> None:
    with pytest.raises(RejectEvent) as info:
        decode(b"nope", allowed_prefix=PREFIX)
    assert isinstance(info.value, InvalidEvent)
    assert "malformed JSON" in info.value.reason


BAD_VALUES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "malformed JSON"),
    ("not json", b"{not json", "malformed JSON"),
    ("not utf-8", b'{"a": "\xff\xfe"}', "not UTF-8"),
    ("array", b"[1, 2]", "not an object"),
    ("string", b'"hello"', "not an object"),
    ("null", b"null", "not an object"),
    ("number", b"42", "not an object"),
    ("NaN constant", raw(good())[:-1] + b', "x": NaN}', "NaN"),
    ("duplicate member", b'{"version": 1, "version": 1}', "duplicate"),
    ("huge", b'{"pad": "' + b"x" * 70000 + b'"}', "over the limit"),
    ("deep nesting", b"[" * 100000 + b"]" * 100000, "over the limit"),
    ("deep nesting under limit", b"[" * 30000 + b"]" * 30000, "malformed JSON"),
    ("time overflows to infinity", raw(good(time=1))[:-1].replace(b'"time": 1', b'"time": 1e400') + b"}", "time"),
    ("huge integer literal", raw(good())[:-1] + b', "x": ' + b"9" * 5000 + b"}", "malformed JSON"),
]


@pytest.mark.parametrize(("what", "value", "why"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_malformed_values_are_rejected(what: str, value: bytes, why: str) -> None:
    with pytest.raises(InvalidEvent, match=why):
        decode(value, allowed_prefix=PREFIX)


BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("version missing", {"version": None}, "version"),
    ("version 2", {"version": 2}, "unknown version 2"),
    ("version 0", {"version": 0}, "unknown version"),
    ("version string", {"version": "1"}, "version"),
    ("version bool", {"version": True}, "version"),
    ("version float", {"version": 1.0}, "version"),
    ("type unknown", {"type": "delete"}, "unknown type"),
    ("type missing", {"type": None}, "unknown type"),
    ("type number", {"type": 3}, "unknown type"),
    ("size negative", {"size": -1}, "out of range"),
    ("size over 5 TiB", {"size": MAX_OBJECT_SIZE + 1}, "out of range"),
    ("size absurd", {"size": 10**30}, "out of range"),
    ("size float", {"size": 1.5}, "size must be an integer"),
    ("size string", {"size": "10"}, "size must be an integer"),
    ("size bool", {"size": True}, "size must be an integer"),
    ("etag number", {"etag": 5}, "etag must be a string"),
    ("etag empty", {"etag": ""}, "etag is empty"),
    ("etag too long", {"etag": "a" * 257}, "etag is longer"),
    ("etag newline", {"etag": "abc\ndef"}, "etag contains unprintable"),
    ("etag escape", {"etag": "\x1b[31mred"}, "etag contains unprintable"),
    ("reason missing", {"reason": None}, "reason must be a string"),
    ("reason too long", {"reason": "r" * 65}, "reason is longer"),
    ("origin object", {"origin": {"h": 1}}, "origin must be a string"),
    ("origin empty", {"origin": ""}, "origin is empty"),
    ("id number", {"id": 12}, "id must be a string"),
    ("id too long", {"id": "i" * 65}, "id is longer"),
    ("time string", {"time": "now"}, "time"),
    ("time negative", {"time": -5}, "time"),
    ("time bool", {"time": False}, "time"),
    ("pin string", {"pin": "yes"}, "pin"),
    ("pin number", {"pin": 1}, "pin"),
    ("bucket number", {"bucket": 1}, "bucket must be a string"),
]


@pytest.mark.parametrize(("what", "change", "why"), BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_ill_typed_fields_are_rejected(what: str, change: dict[str, Any], why: str) -> None:
    obj = good(**change)
    with pytest.raises(InvalidEvent, match=why):
        decode(raw(obj), allowed_prefix=PREFIX)


@pytest.mark.parametrize("member", ["key", "etag", "size", "reason", "origin", "time", "id"])
def test_missing_members_are_rejected(member: str) -> None:
    obj = good()
    del obj[member]
    with pytest.raises(InvalidEvent, match=f"missing member '{member}'|{member}"):
        decode(raw(obj), allowed_prefix=PREFIX)


def test_null_etag_and_size_are_allowed() -> None:
    event = decode(raw(good(etag=None, size=None)), allowed_prefix=PREFIX)
    assert event.etag is None and event.size is None
    assert decode(raw(good(size=MAX_OBJECT_SIZE)), allowed_prefix=PREFIX).size == MAX_OBJECT_SIZE
    assert decode(raw(good(size=0)), allowed_prefix=PREFIX).size == 0


BAD_KEYS: list[tuple[str, Any, str]] = [
    ("dotdot escape", "demo/../etc/passwd", "'..' path segment"),
    ("dotdot at start", "../demo/x", "'..' path segment"),
    ("dotdot at end", "demo/x/..", "'..' path segment"),
    ("dotdot only", "..", "'..' path segment"),
    ("dot segment", "demo/./x", "'.' path segment"),
    ("absolute", "/etc/passwd", "starts with '/'"),
    ("absolute under prefix", "/demo/x", "starts with '/'"),
    ("double slash", "demo//x", "empty path segment"),
    ("trailing slash", "demo/dir/", "empty path segment"),
    ("NUL", "demo/a\x00b", "NUL"),
    ("empty", "", "key is empty"),
    ("not a string", 42, "key must be a string"),
    ("list", ["demo", "x"], "key must be a string"),
    ("outside prefix", "other/x", "not under the mount's prefix"),
    ("prefix sibling", "demo2/x", "not under the mount's prefix"),
    ("prefix itself", "demo", "not under the mount's prefix"),
    ("too long", "demo/" + "/".join(["a" * 200] * 6), "over the limit of 1024"),
    ("long multibyte", "demo/" + "é" * 600, "over the limit of 1024"),
    ("segment over 255 bytes", "demo/" + "a" * 256, "over 255 bytes"),
    ("lone surrogate", "demo/\ud800", "lone surrogate"),
]


@pytest.mark.parametrize(("what", "key", "why"), BAD_KEYS, ids=[b[0] for b in BAD_KEYS])
def test_path_escapes_and_bad_keys_are_rejected(what: str, key: Any, why: str) -> None:
    with pytest.raises(InvalidEvent, match=why):
        decode(raw(good(key=key)), allowed_prefix=PREFIX)


def test_json_escaped_traversal_is_still_caught() -> None:
    # "\u002e\u002e" is ".." once parsed; "\u0000" is NUL.
    for key_json in (r'"demo/\u002e\u002e/\u002e\u002e/etc"', r'"demo/x\u0000y"', r'"\u002fetc/passwd"'):
        value = raw(good())[:-1] + b"}"
        obj_text = value.decode().replace('"demo/photos/a.jpg"', key_json)
        with pytest.raises(InvalidEvent):
            decode(obj_text.encode(), allowed_prefix=PREFIX)


def test_validate_key_accepts_ordinary_names() -> None:
    for key in ("demo/a", "demo/a b/c-d_e.f", "demo/.hidden", "demo/...", "demo/a..b", "demo/日本語/ファイル"):
        assert validate_key(key, allowed_prefix="demo/") == key


def test_topic_names() -> None:
    topics = topic_names("demo")
    assert topics.hydrate == "demo.hydrate"
    assert topics.evict == "demo.evict"
    assert topics.dead_letter == "demo.dead-letter"
    assert list(topics) == ["demo.hydrate", "demo.evict", "demo.dead-letter"]
    assert topics.for_event(Event.evict("demo/x", None, None, "cli", "o")) == "demo.evict"
    for bad in ("", "a b", "a/b", "x" * 201, "é"):
        with pytest.raises(ValueError, match="invalid topic prefix"):
            topic_names(bad)
