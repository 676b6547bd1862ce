"""Issue 11, scenario 6: a handle opened while its file was cloud-only switches to the cache copy of the same
version once the hydrator has brought it (before: it kept reading S3 at 70 IOPS for as long as it was open)."""

from __future__ import annotations

import os
import random
import re
from typing import Any

from helpers import wait_until
from s3proxy import S3FaultProxy

MiB = 1024 * 1024


def test_open_handle_moves_to_the_cache_after_hydration(s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any,
                                                        stack: Any, prefix: str) -> None:
    data = os.urandom(32 * MiB)
    s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/cold.bin", Body=data)
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--read-chunk-size", "1M",
                                      "--readahead-chunks", "1"])
    object_gets = re.escape(f"/{stack.bucket}/{prefix}/cold.bin") + "$"
    rng = random.Random(7)
    with open(mount.path / "cold.bin", "rb", buffering=0) as fh:
        assert fh.read(4096) == data[:4096]  # a miss: read from S3, a hydrate event raised
        wait_until(lambda: os.getxattr(mount.path / "cold.bin", "user.hybridfs.state") == b"cached", 30,
                   message="the hydrator to cache the file")
        gets_before = s3_proxy.seen(method="GET", path=object_gets)
        for _ in range(200):
            offset = rng.randrange(0, len(data) - 4096)
            fh.seek(offset)
            assert fh.read(4096) == data[offset:offset + 4096]
        assert s3_proxy.seen(method="GET", path=object_gets) == gets_before, "reads still went to S3"
