"""Uploads are protected by a CRC32C that S3 checks (issue 14): the mount sends UNSIGNED-PAYLOAD over http (SigV4
would otherwise SHA-256 every byte), so the checksum header is what guards the body on the wire. S3 stores it:
a single PUT's object has the CRC32C of its bytes, a multipart object the composite of its parts' CRC32Cs."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from typing import Any

import google_crc32c
from helpers import Mount, wait_until

MiB = 1024 * 1024


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(int(google_crc32c.value(data)).to_bytes(4, "big")).decode()


def stored_checksum(s3: Any, mount: Mount, name: str) -> tuple[str | None, str | None]:
    head = s3.head_object(Bucket=mount.bucket, Key=mount.key(name), ChecksumMode="ENABLED")
    return head.get("ChecksumCRC32C"), head.get("ChecksumType")


def test_single_put_carries_the_crc32c_of_its_bytes(mount_factory: Any, s3: Any) -> None:
    mount = mount_factory()
    data = os.urandom(3 * MiB + 5)
    (mount.path / "one.bin").write_bytes(data)
    assert stored_checksum(s3, mount, "one.bin")[0] == crc32c_b64(data)
    body = s3.get_object(Bucket=mount.bucket, Key=mount.key("one.bin"))["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


def test_exactly_one_part_is_one_put(mount_factory: Any, s3: Any) -> None:
    """A file of exactly the part size is one PUT (its ETag has no "-N" suffix), not a one-part multipart."""
    mount = mount_factory(extra_args=["--part-size", "5M"])
    data = os.urandom(5 * MiB)
    with open(mount.path / "five.bin", "wb") as fh:
        for i in range(5):
            fh.write(data[i * MiB:(i + 1) * MiB])
    head = s3.head_object(Bucket=mount.bucket, Key=mount.key("five.bin"))
    assert "-" not in head["ETag"] and head["ContentLength"] == 5 * MiB
    assert stored_checksum(s3, mount, "five.bin")[0] == crc32c_b64(data)


def test_multipart_parts_carry_their_crc32c(mount_factory: Any, s3: Any) -> None:
    mount = mount_factory(extra_args=["--part-size", "5M"])
    data = os.urandom(12 * MiB + 3)
    with open(mount.path / "parts.bin", "wb") as fh:
        for offset in range(0, len(data), 128 * 1024):  # cp-sized writes: parts straddle the writes' ends
            fh.write(data[offset:offset + 128 * 1024])
    checksum, _ = stored_checksum(s3, mount, "parts.bin")
    parts = [data[i:i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    composite = google_crc32c.value(b"".join(base64.b64decode(crc32c_b64(p)) for p in parts))
    expected = base64.b64encode(int(composite).to_bytes(4, "big")).decode()
    assert checksum is not None and checksum.split("-")[0] == expected
    assert (mount.path / "parts.bin").read_bytes() == data


def test_a_stream_spanning_seconds_is_not_copied_after_its_upload(mount_factory: Any, s3: Any) -> None:
    """The multipart upload carries no times: S3's LastModified (the completion, i.e. the close) is the mtime.
    Comparing times at close copied every upload that spanned a second boundary onto itself: the whole object
    again (minutes for a large file), and its parts' checksums lost."""
    mount = mount_factory(extra_args=["--part-size", "5M"])
    path = mount.path / "slow.bin"
    with open(path, "wb") as fh:
        fh.write(os.urandom(6 * MiB))  # one part sent
        start = time.time()
        fh.flush()
        wait_until(lambda: time.time() - start > 1.1, timeout=5, message="a second boundary")
        fh.write(os.urandom(MiB))
    closed = time.time()
    head = s3.head_object(Bucket=mount.bucket, Key=mount.key("slow.bin"), ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-2") and head.get("ChecksumCRC32C"), head  # as uploaded, no copy
    assert "mtime" not in head["Metadata"]
    assert abs(path.stat().st_mtime - closed) < 2.5
    assert s3.get_object(Bucket=mount.bucket, Key=mount.key("slow.bin"))["ContentLength"] == 7 * MiB
