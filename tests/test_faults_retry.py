"""The retry policy through a real mount: the hydrator waits out S3 errors that can pass, and gives up at once on
those that cannot (before the one classification, any EIO was waited on forever: a hydrate event for an object
that S3 refuses with InvalidRequest never finished). Faults come from the ``s3_proxy`` (tests/s3proxy.py).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from confluent_kafka import Producer
from helpers import Mount, Stack, wait_until
from s3proxy import Rule, S3FaultProxy


def hydrate_event(mount: Mount, name: str, etag: str, size: int) -> bytes:
    return json.dumps({"version": 1, "type": "hydrate", "key": mount.key(name), "etag": etag, "size": size,
                       "reason": "test", "origin": "test", "time": time.time(), "id": os.urandom(8).hex()}).encode()


def hydrator(mount: Mount) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))
    return dict(status["services"]["hydrator"])


def test_hydrator_gives_up_on_a_final_s3_error_and_waits_out_a_temporary_one(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any, stack: Stack) -> None:
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--s3-max-attempts", "2"])
    mount.allow_log(r"hydration of .*refused\.bin failed: GET .*S3 said InvalidRequest|S3 marked down after")
    objects = {}
    for name in ("refused.bin", "flaky.bin"):
        etag = s3.put_object(Bucket=mount.bucket, Key=mount.key(name), Body=name.encode() * 100)["ETag"].strip('"')
        objects[name] = (etag, len(name) * 100)
    refused = s3_proxy.add(Rule(method="GET", path=re.escape(mount.key("refused.bin")), status=400,
                                code="InvalidRequest"))
    # Two failures per call (botocore's 2 attempts): the first three calls fail, the fourth gets through.
    flaky = s3_proxy.add(Rule(method="GET", path=re.escape(mount.key("flaky.bin")), status=503, code="SlowDown",
                              times=6))
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    for name, (etag, size) in objects.items():
        producer.produce(f"{mount.topic_prefix}.hydrate", key=mount.key(name).encode(),
                         value=hydrate_event(mount, name, etag, size))
    assert producer.flush(30) == 0

    wait_until(lambda: hydrator(mount)["outcomes"].get("hydrated", 0) >= 1, timeout=60,
               message="flaky.bin to be hydrated once S3 answers again")
    assert flaky.hits == 6 and hydrator(mount)["s3_waits"] >= 3
    wait_until(lambda: hydrator(mount)["outcomes"].get("failed", 0) >= 1, timeout=30,
               message="the hydration S3 refuses to end")
    assert refused.hits == 1  # a final error: neither botocore nor the hydrator asked again
    assert os.getxattr(mount.path / "flaky.bin", "user.hybridfs.state") == b"cached"
    assert os.getxattr(mount.path / "refused.bin", "user.hybridfs.state") == b"cloud"
    mount.unmount()
