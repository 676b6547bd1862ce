"""The S3 fault-injection proxy (tests/s3proxy.py): transparent for boto3 and a mount, and each fault as documented."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
import tracemalloc
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions
import pytest
from conftest import MountFactory
from helpers import Stack, wait_until
from s3proxy import Rule, S3FaultProxy

MiB = 1024 * 1024


def client_via(stack: Stack, proxy: S3FaultProxy, **config: Any) -> Any:
    """A boto3 client through the proxy; one attempt per request, so that an injected fault is seen at once."""
    settings = {"retries": {"total_max_attempts": 1, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 30}
    return boto3.client(
        "s3",
        endpoint_url=proxy.url,
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
        region_name=stack.env["AWS_DEFAULT_REGION"],
        config=botocore.config.Config(s3={"addressing_style": "path"}, **{**settings, **config}),
    )


def error_code(exc: botocore.exceptions.ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


def test_put_get_and_multipart_pass_through_with_valid_signatures(
    stack: Stack, s3_proxy: S3FaultProxy, s3: Any, prefix: str
) -> None:
    c = client_via(stack, s3_proxy)
    c.put_object(Bucket=stack.bucket, Key=f"{prefix}/small", Body=b"hello proxy")
    assert c.get_object(Bucket=stack.bucket, Key=f"{prefix}/small")["Body"].read() == b"hello proxy"
    assert c.head_object(Bucket=stack.bucket, Key=f"{prefix}/small")["ContentLength"] == 11

    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB), b"tail"]
    key = f"{prefix}/multi"
    upload = c.create_multipart_upload(Bucket=stack.bucket, Key=key)["UploadId"]
    etags = [
        c.upload_part(Bucket=stack.bucket, Key=key, UploadId=upload, PartNumber=n, Body=body)["ETag"]
        for n, body in enumerate(parts, 1)
    ]
    c.complete_multipart_upload(
        Bucket=stack.bucket, Key=key, UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )  # fmt: skip
    # Read back directly from MinIO: the bytes went through unchanged.
    assert s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == b"".join(parts)
    assert s3_proxy.seen("PUT", path=f"/{key}$", query=r"partNumber=\d+&uploadId=|uploadId=.*partNumber=") == 3
    assert s3_proxy.seen("POST", path=f"/{key}$", query="uploads") == 1
    listing = c.list_objects_v2(Bucket=stack.bucket, Prefix=prefix + "/")
    assert sorted(o["Key"] for o in listing["Contents"]) == [f"{prefix}/multi", f"{prefix}/small"]


def _raw_upstream(answer: bytes) -> tuple[socket.socket, list[bytes]]:
    """A one-shot HTTP server: it records the raw request up to the end of its chunked body, then sends ``answer``."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while not data.endswith(b"\r\n0\r\n\r\n"):
                piece = conn.recv(65536)
                if not piece:
                    break
                data += piece
            received.append(data)
            conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return listener, received


def test_chunked_bodies_are_forwarded_as_is() -> None:
    # MinIO refuses a chunked PUT without a length (411), so a raw upstream shows what the proxy sends on.
    pieces = [os.urandom(100_000), os.urandom(3), os.urandom(70_000)]
    framed = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n" + framed
    listener, received = _raw_upstream(answer)
    with listener, S3FaultProxy(upstream=f"http://127.0.0.1:{listener.getsockname()[1]}") as proxy:
        conn = http.client.HTTPConnection(urlsplit(proxy.url).netloc, timeout=30)
        conn.putrequest("PUT", "/bucket/key?x=1", skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "signed.example:1234")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("X-Amz-Thing", "a")
        conn.endheaders()
        conn.send(framed)
        response = conn.getresponse()
        assert (response.status, response.getheader("X-Up"), response.read()) == (200, "1", b"".join(pieces))
        conn.close()
    head, _, body = received[0].partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"PUT /bucket/key?x=1 HTTP/1.1", b"Host: signed.example:1234", b"Transfer-Encoding: chunked",
        b"X-Amz-Thing: a",
    ]  # fmt: skip
    assert body == framed


def test_injected_503_on_one_part_reaches_boto3(stack: Stack, s3_proxy: S3FaultProxy, prefix: str) -> None:
    c = client_via(stack, s3_proxy)
    key = f"{prefix}/parts"
    rule = s3_proxy.add(Rule(method="PUT", query=r"partNumber=2\b", status=503, code="SlowDown"))
    upload = c.create_multipart_upload(Bucket=stack.bucket, Key=key)["UploadId"]
    c.upload_part(Bucket=stack.bucket, Key=key, UploadId=upload, PartNumber=1, Body=os.urandom(5 * MiB))
    with pytest.raises(botocore.exceptions.ClientError) as info:
        c.upload_part(Bucket=stack.bucket, Key=key, UploadId=upload, PartNumber=2, Body=b"x" * 1000)
    assert error_code(info.value) == (503, "SlowDown")
    c.upload_part(Bucket=stack.bucket, Key=key, UploadId=upload, PartNumber=12, Body=b"y")  # \b: 12 is not 2
    assert rule.hits == 1
    c.abort_multipart_upload(Bucket=stack.bucket, Key=key, UploadId=upload)
    assert s3_proxy.seen("DELETE", path=f"/{key}$", query="uploadId=") == 1


def test_after_and_times_choose_which_matching_requests_fail(
    stack: Stack, s3_proxy: S3FaultProxy, s3: Any, prefix: str
) -> None:
    s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/k", Body=b"v")
    c = client_via(stack, s3_proxy)
    rule = s3_proxy.add(Rule(method="GET", path=f"/{prefix}/k$", after=1, times=2, code="InternalError"))
    other = s3_proxy.add(Rule(method="GET", path=f"/{prefix}/k$", status=404, code="NoSuchKey", times=1))
    outcomes = []
    for _ in range(5):
        try:
            outcomes.append(c.get_object(Bucket=stack.bucket, Key=f"{prefix}/k")["Body"].read())
        except botocore.exceptions.ClientError as exc:
            outcomes.append(error_code(exc))
    # 1st: skipped by `after`, falls through to the next rule; 2nd, 3rd: the first rule; then both are used up.
    assert outcomes == [(404, "NoSuchKey"), (500, "InternalError"), (500, "InternalError"), b"v", b"v"]
    assert (rule.hits, rule.matched, other.hits) == (2, 5, 1)
    s3_proxy.remove(rule)
    s3_proxy.add(Rule(method="HEAD", status=403, code="AccessDenied"))
    with pytest.raises(botocore.exceptions.ClientError) as info:
        c.head_object(Bucket=stack.bucket, Key=f"{prefix}/k")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def _get_in_thread(c: Any, bucket: str, key: str) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        try:
            result.append(c.get_object(Bucket=bucket, Key=key)["Body"].read())
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_stall_holds_a_request_until_cleared(stack: Stack, s3_proxy: S3FaultProxy, s3: Any, prefix: str) -> None:
    s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/k", Body=b"v")
    c = client_via(stack, s3_proxy, read_timeout=60)
    rule = s3_proxy.add(Rule(method="GET", action="stall"))
    thread, result = _get_in_thread(c, stack.bucket, f"{prefix}/k")
    wait_until(lambda: rule.hits == 1, timeout=10, message="the GET to reach the proxy")
    thread.join(timeout=0.5)
    assert thread.is_alive() and not result, "a stalled request was answered"
    released = time.monotonic()
    s3_proxy.clear()
    thread.join(timeout=10)
    assert not thread.is_alive() and time.monotonic() - released < 5
    assert isinstance(result[0], botocore.exceptions.ConnectionClosedError), result
    assert c.get_object(Bucket=stack.bucket, Key=f"{prefix}/k")["Body"].read() == b"v"  # cleared: passes again


def test_stall_with_delay_ends_by_itself_and_delay_forwards(
    stack: Stack, s3_proxy: S3FaultProxy, s3: Any, prefix: str
) -> None:
    s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/k", Body=b"v")
    c = client_via(stack, s3_proxy)
    s3_proxy.add(Rule(method="GET", action="stall", delay=0.5, times=1))
    started = time.monotonic()
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        c.get_object(Bucket=stack.bucket, Key=f"{prefix}/k")
    assert 0.5 <= time.monotonic() - started < 5
    s3_proxy.add(Rule(method="GET", action="delay", delay=0.4, times=1))
    started = time.monotonic()
    assert c.get_object(Bucket=stack.bucket, Key=f"{prefix}/k")["Body"].read() == b"v"
    assert time.monotonic() - started >= 0.4


def test_reset_and_down_modes(stack: Stack, s3_proxy: S3FaultProxy, s3: Any, prefix: str) -> None:
    s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/k", Body=b"v")
    c = client_via(stack, s3_proxy)
    get = lambda: c.get_object(Bucket=stack.bucket, Key=f"{prefix}/k")["Body"].read()  # noqa: E731
    assert get() == b"v"  # a pooled keep-alive connection now exists

    rule = s3_proxy.add(Rule(method="GET", action="reset", times=1))
    with pytest.raises((botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)):
        get()
    assert rule.hits == 1 and get() == b"v"

    s3_proxy.down("refuse")  # both the pooled connection and new ones are reset
    for _ in range(2):
        with pytest.raises((botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)):
            get()
    raw = http.client.HTTPConnection(urlsplit(s3_proxy.url).netloc, timeout=5)
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        raw.request("GET", "/")
        raw.getresponse()
    s3_proxy.up()
    assert get() == b"v"

    s3_proxy.down("503")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        get()
    assert error_code(info.value) == (503, "SlowDown")
    s3_proxy.up()
    assert get() == b"v"
    assert s3_proxy.seen("GET", path=f"/{prefix}/k$") >= 7


def test_close_releases_a_stalled_request(stack: Stack, s3: Any, prefix: str) -> None:
    s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/k", Body=b"v")
    proxy = S3FaultProxy(upstream=stack.endpoint).start()
    proxy.down("stall")
    c = client_via(stack, proxy, read_timeout=60)
    thread, result = _get_in_thread(c, stack.bucket, f"{prefix}/k")
    wait_until(lambda: proxy.requests, timeout=10, message="the GET to reach the proxy")
    started = time.monotonic()
    proxy.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and time.monotonic() - started < 5 and isinstance(result[0], Exception)


def test_a_64mib_get_streams_without_buffering(stack: Stack, s3_proxy: S3FaultProxy, s3: Any, prefix: str) -> None:
    data = os.urandom(64 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/big", Body=data)
    del data
    c = client_via(stack, s3_proxy)
    tracemalloc.start()  # the proxy runs in this process: its allocations are traced too
    try:
        body = c.get_object(Bucket=stack.bucket, Key=f"{prefix}/big")["Body"]
        sha = hashlib.sha256()
        total = 0
        while chunk := body.read(256 * 1024):
            sha.update(chunk)
            total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (total, sha.hexdigest()) == (64 * MiB, digest)
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB traced while streaming 64 MiB"


def test_a_mount_works_through_the_proxy(
    stack: Stack, s3_proxy: S3FaultProxy, mount_factory: MountFactory, s3: Any
) -> None:
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url])
    payload = os.urandom(3 * MiB + 17)
    (mount.path / "dir").mkdir()
    with open(mount.path / "dir" / "file.bin", "wb") as fh:
        fh.write(payload)
    key = mount.key("dir/file.bin")

    def landed() -> bool:
        try:
            return s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == payload
        except s3.exceptions.NoSuchKey:
            return False

    wait_until(landed, timeout=30, message=f"s3://{stack.bucket}/{key} to hold the bytes written")
    assert s3_proxy.seen("PUT", path=f"/{key}$") >= 1
    assert (mount.path / "dir" / "file.bin").read_bytes() == payload
