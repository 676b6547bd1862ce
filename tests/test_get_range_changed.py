"""A ranged GET pinned to a version while S3 holds an empty one (truncated elsewhere): MinIO answers InvalidRange
before it checks If-Match, which the store took for "past the end" and answered b"" — reads of a file emptied
elsewhere came back short, which the kernel takes as EOF (the torture test: "fstat said 294912 bytes, read returned
0"). Against the real MinIO: now ESTALE, as the 412 for a longer new version is. Before: the empty case returned
b"" (the longer case already raised ESTALE)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import trio

from hybridfs.errors import FsError
from hybridfs.tiers.s3 import CloudStore, S3Settings


def test_a_range_of_a_replaced_version_is_estale_not_empty(stack: Any, s3: Any, prefix: str) -> None:
    key = f"{prefix}/f.bin"
    old = s3.put_object(Bucket=stack.bucket, Key=key, Body=b"o" * 300_000)["ETag"].strip('"')

    async def main() -> None:
        store = CloudStore(S3Settings(bucket=stack.bucket, endpoint_url=stack.endpoint))
        assert await store.get_range(key, 299_990, 100, old) == b"o" * 10
        assert await store.get_range(key, 300_000, 100, old) == b"", "past the end of the pinned version itself"
        new = s3.put_object(Bucket=stack.bucket, Key=key, Body=b"n" * 4096)["ETag"].strip('"')
        with pytest.raises(FsError) as info:
            await store.get_range(key, 262_144, 4096, old)
        assert info.value.errno == errno.ESTALE, info.value.message
        assert await store.get_range(key, 4096, 10, new) == b""
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"")  # truncated to 0 elsewhere
        with pytest.raises(FsError) as info:
            await store.get_range(key, 0, 262_144, new)
        assert info.value.errno == errno.ESTALE, info.value.message
        s3.delete_object(Bucket=stack.bucket, Key=key)
        with pytest.raises(FsError) as info:
            await store.get_range(key, 262_144, 4096, old)
        assert info.value.errno in (errno.ESTALE, errno.ENOENT), info.value.message

    trio.run(main)
