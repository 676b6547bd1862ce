"""A failed close drops the kernel's copy of the changes it could not store. Found by the handle model
(tests/test_model_handles.py, CI run at 22:00): ftruncate of an appending handle to 81 bytes, then its close with
every PUT refused: S3 kept the previous version, but reading the file gave its first 81 bytes — the kernel kept the
size the ftruncate had given it."""

from __future__ import annotations

import os
from typing import Any

import pytest
from s3proxy import Rule, S3FaultProxy
from test_faults_write import object_path, s3_bytes, through_proxy


def test_a_read_after_a_failed_close_of_an_ftruncate_sees_the_stored_version(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    mount = through_proxy(mount_factory, s3_proxy)
    content = b"initial content of a\n" * 10
    path = mount.path / "a"
    path.write_bytes(content)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.ftruncate(fd, 81)
    assert os.fstat(fd).st_size == 81
    rule = s3_proxy.add(Rule(method="PUT", path=object_path(mount, "a")))
    with pytest.raises(OSError):
        os.close(fd)
    s3_proxy.remove(rule)
    assert s3_bytes(s3, mount, "a") == content, "S3 keeps the previous version"
    assert os.stat(path).st_size == len(content)
    assert path.read_bytes() == content
