"""Every decoder of what Kafka brings is total (issue 22): any value, of any shape, size, nesting or encoding, is
decoded or refused with the decoder's own error (InvalidEvent, or BadRecord for S3 event records) — never
anything else, which would stop a consumer instead of setting the record aside.

Three kinds of input: arbitrary bytes; arbitrary JSON values (NaN, huge integers, lone surrogates, deep nesting);
and a valid record with one member, anywhere in it, replaced by an arbitrary JSON value (which reaches the checks
behind the parser: ``"attrs": {"type": []}`` was a TypeError).
"""

from __future__ import annotations

import json
import stat
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, example, given, settings

from hybridfs.core.attrs import Stat
from hybridfs.core.changes import Change
from hybridfs.events.s3events import BadRecord, S3Change, parse_s3_events
from hybridfs.events.schema import Event, InvalidEvent, decode, encode
from hybridfs.services.feed_schema import decode_change, encode_change, stat_from_attrs_json

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

POISON_S3 = b"[" * 100_000 + b"]" * 100_000  # the issue's record
POISON_CHANGE_ATTRS = {"type": [], "mode": 0o100644}  # the issue's record's attrs

# Any JSON scalar Python's json module can produce or read back: NaN and infinities, integers far beyond 64 bits,
# strings with lone surrogates (a "\udXXX" escape).
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=10**300)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text() | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)


def nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


deep_values = st.builds(nested, st.integers(min_value=1, max_value=200_000), st.sampled_from(["array", "object"]))


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn, document: Any) -> Any:
    """``document`` (a JSON value) with one member or element, at any depth, replaced by an arbitrary value."""
    doc = json.loads(json.dumps(document))
    node = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            return draw(json_values)
        key = draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, dict | list) or not child or draw(st.booleans()):
            node[key] = draw(json_values)
            return doc
        node = child


# --- S3 event records -----------------------------------------------------------------------------------------

MINIO_PUT = {
    "EventName": "s3:ObjectCreated:Put", "Key": "hybridfs/d/a+b.txt",
    "Records": [{"eventVersion": "2.0", "eventSource": "minio:s3", "eventName": "s3:ObjectCreated:Put",
                 "s3": {"bucket": {"name": "hybridfs"},
                        "object": {"key": "d%2Fa+b.txt", "size": 1, "eTag": "9dd4", "sequencer": "18ED"}},
                 "source": {"host": "127.0.0.1", "userAgent": "Boto3/1.44.8"}}],
}  # fmt: skip
EVENTBRIDGE_DELETE = {
    "source": "aws.s3", "detail-type": "Object Deleted",
    "detail": {"bucket": {"name": "hybridfs"}, "object": {"key": "d/a.txt", "etag": "9dd4", "size": 1},
               "reason": "DeleteObject"},
}  # fmt: skip


def parses_or_refuses(value: bytes) -> None:
    try:
        changes = parse_s3_events(value)
    except BadRecord as exc:
        assert exc.reason
        return
    assert all(isinstance(c, S3Change) and isinstance(c.key, str) and c.key.encode("utf-8") for c in changes)


@FUZZ
@given(st.binary(max_size=2000))
@example(POISON_S3)
@example(b"\xff\xfe")
@example(b'{"Records": [' + b"1" * 5000 + b"]}")
def test_s3_event_parser_on_any_bytes(value: bytes) -> None:
    parses_or_refuses(value)


@FUZZ
@given(json_values | deep_values)
def test_s3_event_parser_on_any_json(value: Any) -> None:
    parses_or_refuses(value if isinstance(value, bytes) else dumps(value))


@FUZZ
@given(mutated(MINIO_PUT) | mutated(EVENTBRIDGE_DELETE))
@example({**MINIO_PUT, "Records": [{**MINIO_PUT["Records"][0],  # type: ignore[dict-item]
                                    "s3": {"bucket": {"name": "b"}, "object": {"key": "\udc80"}}}]})
@example({**EVENTBRIDGE_DELETE, "detail": {**EVENTBRIDGE_DELETE["detail"], "reason": [[[]]]}})  # type: ignore[dict-item]
def test_s3_event_parser_on_a_record_with_one_member_changed(value: Any) -> None:
    parses_or_refuses(dumps(value))


def test_the_issues_poison_s3_record_says_why() -> None:
    with pytest.raises(BadRecord, match="nested too deeply"):
        parse_s3_events(POISON_S3)


# --- hydrate/evict events -------------------------------------------------------------------------------------

EVENT = json.loads(encode(Event.hydrate("p/a.txt", "9b2c", 5, "read-miss", "host:/mnt", pin=True, bucket="b")))


def decodes_or_refuses(value: bytes) -> None:
    try:
        event = decode(value, allowed_prefix="p")
    except InvalidEvent as exc:
        assert exc.reason
        return
    assert isinstance(event, Event) and event.key.startswith("p/")


@FUZZ
@given(st.binary(max_size=2000))
@example(POISON_S3[:30_000] + POISON_S3[-30_000:])
@example(b'{"version": 1, "size": ' + b"9" * 5000 + b"}")  # past Python's 4300-digit limit on int()
def test_event_decoder_on_any_bytes(value: bytes) -> None:
    decodes_or_refuses(value)


@FUZZ
@given(json_values | deep_values)
def test_event_decoder_on_any_json(value: Any) -> None:
    decodes_or_refuses(value if isinstance(value, bytes) else dumps(value))


@FUZZ
@given(mutated(EVENT))
@example({**EVENT, "type": []})
@example({**EVENT, "size": 2**4000})
@example({**EVENT, "time": float("nan")})
def test_event_decoder_on_an_event_with_one_member_changed(value: Any) -> None:
    decodes_or_refuses(dumps(value))


# --- change feed records --------------------------------------------------------------------------------------

FILE = Stat(stat.S_IFREG | 0o640, 1000, 1000, 5, 1_700_000_000_123_456_789, etag="9b2c", ctime_ns=1_700_000_001 * 10**9)
CHANGE_KEY, CHANGE_VALUE, CHANGE_HEADERS = encode_change(Change.put("p/a.txt", FILE), "host:/mnt")
CHANGE = json.loads(CHANGE_VALUE or b"")


def decodes_change_or_refuses(key: bytes | None, value: bytes | None, headers: Any = CHANGE_HEADERS) -> None:
    try:
        change = decode_change(key, value, headers, allowed_prefix="p", timestamp=1.0)
    except InvalidEvent as exc:
        assert exc.reason
        return
    assert isinstance(change, Change)


@FUZZ
@given(st.none() | st.binary(max_size=300), st.none() | st.binary(max_size=2000),
       st.none() | st.lists(st.tuples(st.text(max_size=20), st.none() | st.binary(max_size=40)), max_size=3))
def test_change_decoder_on_any_bytes(key: bytes | None, value: bytes | None, headers: Any) -> None:
    decodes_change_or_refuses(key, value, headers)
    decodes_change_or_refuses(CHANGE_KEY, value, headers)


@FUZZ
@given(json_values | deep_values)
def test_change_decoder_on_any_json(value: Any) -> None:
    decodes_change_or_refuses(CHANGE_KEY, value if isinstance(value, bytes) else dumps(value))


@FUZZ
@given(mutated(CHANGE))
@example({**CHANGE, "attrs": POISON_CHANGE_ATTRS})
@example({**CHANGE, "attrs": {**CHANGE["attrs"], "type": {"a": 1}}})
@example({**CHANGE, "version": [[]]})
def test_change_decoder_on_a_change_with_one_member_changed(value: Any) -> None:
    decodes_change_or_refuses(CHANGE_KEY, dumps(value))


@FUZZ
@given(json_values | deep_values | mutated(CHANGE["attrs"]))
def test_metadata_index_rows_of_any_shape(value: Any) -> None:
    text = value.decode() if isinstance(value, bytes) else dumps(value).decode("utf-8", "surrogatepass")
    try:
        stat_from_attrs_json(text, "p/a.txt")
    except InvalidEvent as exc:
        assert exc.reason


def test_the_issues_poison_change_record_says_why() -> None:
    value = dumps({**CHANGE, "attrs": POISON_CHANGE_ATTRS})
    with pytest.raises(InvalidEvent, match=r"unknown attrs.type \[\]"):
        decode_change(CHANGE_KEY, value, CHANGE_HEADERS, allowed_prefix="p")
