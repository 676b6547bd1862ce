"""Issue 23: what common programs cost in S3 requests, counted at the fault proxy through a real mount.

* A shell redirection into a new file (`echo alive > new.txt`) is one PUT: bash closes the descriptor it opened
  before the command writes, and that close of a new, still empty file stores nothing yet (docs/semantics.md,
  "A new file that is still empty"). An empty file is still stored by its last close (`touch`), and at once by
  fsync; a failed write leaves no empty object behind.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import Mount, object_path, s3_bytes, wait_until
from s3proxy import Rule, S3FaultProxy


def puts(proxy: S3FaultProxy, mount: Mount, name: str) -> int:
    return proxy.seen(method="PUT", path=object_path(mount, name))


# -- a new file written through a shell redirection ------------------------------------------------------------


def test_a_shell_redirection_into_a_new_file_is_one_put(mount_factory: Any, s3_proxy: S3FaultProxy,
                                                        s3: Any) -> None:
    """Before: HEAD 404, LIST, PUT (the empty file, at bash's close of the descriptor it had dup2'ed), PUT (the
    content). After: one PUT, of the content."""
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url])
    subprocess.run(["bash", "-c", f"echo alive > {mount.path / 'new.txt'}"], check=True)
    assert s3_bytes(s3, mount, "new.txt") == b"alive\n"  # the last close is the one that stores
    assert puts(s3_proxy, mount, "new.txt") == 1


def test_a_new_file_closed_empty_while_another_descriptor_stays_open(mount_factory: Any, s3_proxy: S3FaultProxy,
                                                                     s3: Any) -> None:
    """What bash does, step by step: the close of the first descriptor stores nothing; the file is listed here
    (and nowhere else yet); the close after the write stores the content, once. Before: the first close PUT an
    empty object, which other hosts saw as the file's content until the second PUT."""
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url])
    path = mount.path / "log.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    kept = os.dup(fd)
    os.close(fd)
    try:
        assert s3_bytes(s3, mount, "log.txt") is None, "the close of a new, empty file stored it"
        assert "log.txt" in os.listdir(mount.path)
        assert path.stat().st_size == 0
        os.write(kept, b"alive\n")
    finally:
        os.close(kept)
    assert s3_bytes(s3, mount, "log.txt") == b"alive\n"
    assert puts(s3_proxy, mount, "log.txt") == 1


def test_an_empty_new_file_is_stored_by_its_last_close_and_by_fsync(mount_factory: Any, s3_proxy: S3FaultProxy,
                                                                    s3: Any) -> None:
    """`touch`, and open(O_CREAT) then close with nothing written, store an empty object (one PUT each): the
    last close's release stores it, which the kernel sends as close() returns. fsync stores it at once."""
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url])
    subprocess.run(["touch", str(mount.path / "touched")], check=True)
    os.close(os.open(mount.path / "created", os.O_WRONLY | os.O_CREAT, 0o600))
    for name in ("touched", "created"):
        wait_until(lambda name=name: s3_bytes(s3, mount, name) == b"", 10,  # type: ignore[misc]
                   message=f"the empty {name} to be stored after its last close")
        assert puts(s3_proxy, mount, name) == 1
    assert os.stat(mount.path / "created").st_mode & 0o777 == 0o600
    fd = os.open(mount.path / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.fsync(fd)
        assert s3_bytes(s3, mount, "synced") == b"", "fsync of a new, empty file did not store it"
    finally:
        os.close(fd)
    assert puts(s3_proxy, mount, "synced") == 1


def test_chmod_right_after_touch_is_kept(mount_factory: Any, s3: Any) -> None:
    """`touch f && chmod 600 f`: the chmod may arrive while the release that stores the empty file is on its way.
    It waits for that upload, then changes the stored object: S3 and the mount say 0600. (Without the wait, the
    change went into the attributes of an upload that had already started, and was lost.)"""
    mount = mount_factory()
    names = [f"t{i:02d}" for i in range(20)]
    script = "; ".join(f"touch {name} && chmod 600 {name}" for name in names)
    subprocess.run(["sh", "-c", script], cwd=mount.path, check=True)
    for name in names:
        wait_until(lambda name=name: s3_mode(s3, mount, name) == "33152", 10,  # type: ignore[misc]
                   message=f"S3 to hold {name} with mode 0600")
        assert os.stat(mount.path / name).st_mode & 0o777 == 0o600


def s3_mode(s3: Any, mount: Mount, name: str) -> str | None:
    try:
        return str(s3.head_object(Bucket=mount.bucket, Key=mount.key(name))["Metadata"].get("mode"))
    except s3.exceptions.ClientError:
        return None


def test_a_failed_write_into_a_new_file_leaves_no_empty_object(mount_factory: Any, s3_proxy: S3FaultProxy,
                                                                 s3: Any) -> None:
    """The redirection's content cannot be stored (S3 refuses the PUT): the close says EIO and S3 holds nothing
    at the name. Before: the empty object stored by the first close stayed behind."""
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--s3-max-attempts", "1",
                                      "--write-timeout", "5"])
    mount.allow_log(r"S3 said|upload at release failed|closed with changes that are not stored")
    path = mount.path / "out.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    kept = os.dup(fd)
    os.close(fd)
    s3_proxy.add(Rule(method="PUT", path=object_path(mount, "out.txt")))
    try:
        os.write(kept, b"never stored\n")
        with pytest.raises(OSError) as failure:
            os.close(kept)
        assert failure.value.errno == errno.EIO
    finally:
        s3_proxy.clear()
    wait_until(lambda: not path.exists(), 10, message="the never stored file to be gone after its last close")
    assert s3.list_objects_v2(Bucket=mount.bucket, Prefix=mount.key("out.txt")).get("KeyCount") == 0


# -- unlink ----------------------------------------------------------------------------------------------------


def test_unlink_of_a_known_file_asks_one_head_and_one_delete(mount_factory: Any, s3_proxy: S3FaultProxy,
                                                              s3: Any) -> None:
    """`rm` of files this mount knows, after its attribute caches expired (the unlink loop of `hybridfs bench`,
    which comes long after the creates): the kernel's lookup revalidates each file, then the unlink deletes it.
    Before: HEAD + LIST (is a directory there?) + DELETE per file. After: HEAD + DELETE; the LIST is asked only
    when the HEAD finds nothing."""
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--dir-cache-time", "1"])
    d = mount.path / "many"
    d.mkdir()
    names = [f"s{i:03d}" for i in range(20)]
    for name in names:
        (d / name).write_bytes(b"x" * 100)
    time.sleep(1.5)  # past --dir-cache-time and the kernel's entry timeout: the age is the condition under test
    before = len(s3_proxy.requests)
    for name in names:
        os.unlink(d / name)
    asked = Counter()
    for method, path, query in s3_proxy.requests[before:]:
        if method == "GET" and "list-type" in query and re.search(r"prefix=[^&]*many%2Fs\d{3}%2F", query):
            asked["LIST"] += 1
        elif re.search(r"/many/s\d{3}$", path):
            asked[method] += 1
    print(f"\nS3 requests for {len(names)} unlinks of known files: {dict(asked)}")
    assert asked["DELETE"] == len(names)
    assert asked["LIST"] == 0
    assert asked["HEAD"] <= len(names)
    assert s3.list_objects_v2(Bucket=mount.bucket, Prefix=mount.key("many/s")).get("KeyCount") == 0
    assert os.listdir(d) == []


# -- rsync -a --------------------------------------------------------------------------------------------------


def test_rsync_of_small_files_costs_a_put_three_copies_and_a_delete_each(
        mount_factory: Any, s3_proxy: S3FaultProxy, s3: Any, tmp_path: Path) -> None:
    """rsync -a writes each file as a temp file (mkstemp, fchmod, write, close), then utimensat and fchmod of it,
    then renames it: a PUT, a copy onto itself for the times, one for the mode, a copy to the name and a DELETE
    of the temp key. Before: a HEAD before each copy (s3transfer learning the size) and after it (the mount
    learning the new version): 11 requests per file. After: 5, the copies' attributes taken from their answers."""
    source = tmp_path / "src"
    source.mkdir()
    names = [f"f{i}" for i in range(5)]
    for i, name in enumerate(names):
        (source / name).write_bytes(os.urandom(100 + i))
        os.chmod(source / name, 0o640)
        os.utime(source / name, (1_700_000_000 + i, 1_700_000_000 + i))
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url])
    (mount.path / "dst").mkdir()
    before = len(s3_proxy.requests)
    subprocess.run(["rsync", "-a", f"{source}/", f"{mount.path / 'dst'}/"], check=True)
    asked = Counter(method for method, path, _ in s3_proxy.requests[before:]
                    if re.search(r"/dst/\.?f\d", path))
    lists = sum(1 for method, _, query in s3_proxy.requests[before:] if "list-type" in query)
    print(f"\nS3 requests for rsync -a of {len(names)} files: {dict(asked)}, {lists} LIST")
    assert asked == {"PUT": 4 * len(names), "DELETE": len(names)}, "requests on the files' keys"
    for i, name in enumerate(names):
        st = os.stat(mount.path / "dst" / name)
        assert (st.st_mode & 0o777, int(st.st_mtime)) == (0o640, 1_700_000_000 + i)
        assert (mount.path / "dst" / name).read_bytes() == (source / name).read_bytes()
        head = s3.head_object(Bucket=mount.bucket, Key=mount.key(f"dst/{name}"))
        assert head["Metadata"]["mtime"].split(".")[0] == str(1_700_000_000 + i)
    assert sorted(os.listdir(mount.path / "dst")) == names
