"""S3 helpers for the benchmark: a client for the stack, durability polling, bulk setup and cleanup."""

from __future__ import annotations

import concurrent.futures
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

from hybridfs.stack.config import ACCESS_KEY, BUCKET, HOST, KAFKA_PORT, REGION, S3_ENDPOINT, SECRET_KEY
from hybridfs.stack.procs import port_open

POLL_INTERVAL = 0.02  # seconds between durability polls: the resolution of every "durable" figure
DURABLE_TIMEOUT = 600.0


def client(max_pool: int = 32) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=S3_ENDPOINT, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        region_name=REGION, config=Config(max_pool_connections=max_pool, retries={"max_attempts": 4}),
    )  # fmt: skip


def list_sizes(s3: Any, prefix: str, bucket: str = BUCKET) -> dict[str, int]:
    """Every object under ``prefix`` with its size."""
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj["Size"]
    return out


def holds(s3: Any, expected: dict[str, int], prefix: str, bucket: str = BUCKET) -> bool:
    """True when S3 holds every key of ``expected`` with that size (one LIST, or one HEAD for a single key)."""
    if len(expected) == 1:
        ((key, size),) = expected.items()
        try:
            return bool(s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == size)
        except s3.exceptions.ClientError:
            return False
    found = list_sizes(s3, prefix, bucket)
    return all(found.get(k) == v for k, v in expected.items())


def wait_durable(
    s3: Any, expected: dict[str, int], prefix: str, timeout: float = DURABLE_TIMEOUT
) -> tuple[float, bool]:
    """Poll until S3 holds ``expected``; returns (the monotonic time it was seen, whether the first poll saw it).

    The first poll happens at once, so "not durable at the first poll" means the writer's close() returned
    before its data was in S3 (a write-back acknowledgement).
    """
    deadline = time.monotonic() + timeout
    first = True
    while True:
        if holds(s3, expected, prefix):
            return time.monotonic(), first
        first = False
        if time.monotonic() > deadline:
            raise TimeoutError(f"S3 did not hold {len(expected)} object(s) under {prefix} within {timeout:.0f}s")
        time.sleep(POLL_INTERVAL)


def put_many(s3: Any, keys: Iterable[str], body: bytes = b"", threads: int = 16, bucket: str = BUCKET) -> int:
    """Create objects in parallel (test data setup, not timed)."""
    keys = list(keys)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=body), keys))
    return len(keys)


def delete_prefix(s3: Any, prefix: str, bucket: str = BUCKET) -> int:
    """Delete every object under ``prefix`` (and abort its multipart uploads); returns the objects deleted."""
    if not prefix or prefix == "/":
        raise ValueError("refusing to delete the whole bucket")
    deleted = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            deleted += len(keys)
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return deleted


def stack_problem() -> str | None:
    """None when MinIO and Kafka answer, else what is down. (Other sessions on this machine restart the stack.)"""
    try:
        with urllib.request.urlopen(f"{S3_ENDPOINT}/minio/health/ready", timeout=3) as resp:
            if resp.status != 200:
                return f"MinIO not ready (HTTP {resp.status})"
    except (urllib.error.URLError, OSError) as exc:
        return f"MinIO not answering ({exc})"
    if not port_open(HOST, KAFKA_PORT):
        return "Kafka not answering"
    return None


def wait_for_stack(timeout: float) -> str | None:
    """Wait until the stack answers; None when it does, else what was still down after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        problem = stack_problem()
        if problem is None or time.monotonic() > deadline:
            return problem
        time.sleep(1.0)
