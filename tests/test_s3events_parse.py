"""The S3 event record parser: MinIO's shape (as its Kafka target publishes it), Ceph's, EventBridge's, garbage."""

from __future__ import annotations

import json

import pytest

from hybridfs.events.s3events import BadRecord, parse_s3_events

# Copied from `kcat -t hybridfs.s3-events` after a boto3 put of "coh-probe/a b+c.txt" (trimmed ids).
MINIO_PUT = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "hybridfs/coh-probe/a b+c.txt",
    "Records": [{
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-12-01T10:17:04.347Z", "eventName": "s3:ObjectCreated:Put",
        "userIdentity": {"principalId": "hybridfs"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
               "bucket": {"name": "hybridfs", "ownerIdentity": {"principalId": "hybridfs"},
                          "arn": "arn:aws:s3:::hybridfs"},
               "object": {"key": "coh-probe%2Fa+b%2Bc.txt", "size": 1, "eTag": "9dd4e461268c8034f5c8564e155c67a6",
                          "contentType": "binary/octet-stream", "sequencer": "18ED19D3E915B510"}},
        "source": {"host": "127.0.0.1", "port": "", "userAgent": "Boto3/1.44.8 hybridfs-mount/0123456789ab"},
    }],
}  # fmt: skip


def _encode(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_minio_put_is_a_creation_with_the_decoded_key() -> None:
    [change] = parse_s3_events(_encode(MINIO_PUT))
    assert not change.removed
    assert (change.bucket, change.key) == ("hybridfs", "coh-probe/a b+c.txt")
    assert (change.etag, change.size, change.sequencer) == ("9dd4e461268c8034f5c8564e155c67a6", 1, "18ED19D3E915B510")
    assert "hybridfs-mount/0123456789ab" in change.user_agent


def test_minio_delete_is_a_removal() -> None:
    record = json.loads(json.dumps(MINIO_PUT["Records"][0]))  # type: ignore[index]
    record["eventName"] = "s3:ObjectRemoved:Delete"
    record["s3"]["object"] = {"key": "dir%2Fx", "sequencer": "18ED19D3EB0BB774"}
    [change] = parse_s3_events(_encode({"EventName": "s3:ObjectRemoved:Delete", "Records": [record]}))
    assert change.removed and change.key == "dir/x" and change.etag is None and change.size is None


def test_ceph_event_names_have_no_s3_prefix() -> None:
    record = json.loads(json.dumps(MINIO_PUT["Records"][0]))  # type: ignore[index]
    record["eventName"] = "ObjectRemoved:DeleteMarkerCreated"
    [change] = parse_s3_events(_encode({"Records": [record]}))
    assert change.removed


def test_eventbridge_shape() -> None:
    doc = {"version": "0", "source": "aws.s3", "detail-type": "Object Created",
           "detail": {"bucket": {"name": "b1"}, "object": {"key": "a/b%20c", "size": 5, "etag": "abc"},
                      "reason": "PutObject"}}  # fmt: skip
    [change] = parse_s3_events(_encode(doc))
    assert (change.removed, change.bucket, change.key, change.etag, change.size) == (False, "b1", "a/b c", "abc", 5)


def test_other_events_and_test_events_give_nothing() -> None:
    record = json.loads(json.dumps(MINIO_PUT["Records"][0]))  # type: ignore[index]
    record["eventName"] = "s3:ObjectAccessed:Get"
    assert parse_s3_events(_encode({"Records": [record]})) == []
    assert parse_s3_events(_encode({"Event": "s3:TestEvent"})) == []


@pytest.mark.parametrize("value", [
    b"", b"not json", b"[1, 2]", b'{"hello": 1}', b'{"Records": 3}', b'{"Records": [{"eventName": 1}]}',
    b'{"Records": [{"eventName": "s3:ObjectCreated:Put"}]}',
    b'{"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {}}}]}',
    b"\xff\xfe",
])  # fmt: skip
def test_garbage_is_a_bad_record(value: bytes) -> None:
    with pytest.raises(BadRecord):
        parse_s3_events(value)
