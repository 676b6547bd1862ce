"""A file open on the mount while another writer replaces or deletes its object: the close does not overwrite
the other writer's version (writes are conditional: If-Match the version the open file was based on)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from helpers import Mount

REFUSED = r"changed in S3 while this file was open .*not overwritten"
NOT_STORED = r"closed with changes that are not stored"


def _append_then(mount: Mount, s3: Any, change: str) -> OSError:
    path = mount.path / "log.txt"
    path.write_bytes(b"first line\n")
    fh = open(path, "ab")  # closed below, where the error is expected
    fh.write(b"second line\n")
    fh.flush()  # to the mount: the bytes wait in the open file's spool
    if change == "overwrite":
        s3.put_object(Bucket=mount.bucket, Key=mount.key("log.txt"), Body=b"someone else's version\n")
    else:
        s3.delete_object(Bucket=mount.bucket, Key=mount.key("log.txt"))
    with pytest.raises(OSError) as caught:
        fh.close()
    return caught.value


@pytest.mark.parametrize("change", ["overwrite", "delete"])
def test_close_never_overwrites_a_version_another_writer_made(mounted: Mount, s3: Any, change: str) -> None:
    mounted.allow_log(REFUSED)
    mounted.allow_log(NOT_STORED)
    mounted.allow_log(r"flush: .*changed in S3 while this file was open.* -> EIO")
    error = _append_then(mounted, s3, change)
    assert error.errno == errno.EIO
    objects = s3.list_objects_v2(Bucket=mounted.bucket, Prefix=mounted.key("log.txt")).get("Contents", [])
    if change == "overwrite":
        body = s3.get_object(Bucket=mounted.bucket, Key=mounted.key("log.txt"))["Body"].read()
        assert body == b"someone else's version\n"
    else:
        assert objects == []  # deleted stays deleted: not brought back with our stale base
    # A delete is a conflict like an overwrite (S3 answers 404 to If-Match on a missing key): no ERROR about
    # NoSuchKey, and the log says what happened.
    assert "NoSuchKey" not in mounted.log_text()
    assert "found no object" in mounted.log_text() or change == "overwrite"
