"""The core filesystem through a real mount: namespace, POSIX operations, cloud-first writes (issue 3)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest
from eventlog import read_events
from helpers import Mount, wait_until


def s3_bytes(s3: Any, mount: Mount, rel: str) -> bytes:
    return s3.get_object(Bucket=mount.bucket, Key=mount.key(rel))["Body"].read()  # type: ignore[no-any-return]


def state(path: Path) -> str:
    return os.getxattr(path, "user.hybridfs.state").decode()


def test_close_means_the_object_is_in_s3(mounted: Mount, s3: Any) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    target = mounted.path / "a.bin"
    with open(target, "wb") as fh:
        fh.write(data)
    # No waiting: close() returned, so S3 holds it.
    assert s3_bytes(s3, mounted, "a.bin") == data
    head = s3.head_object(Bucket=mounted.bucket, Key=mounted.key("a.bin"))
    assert int(head["Metadata"]["mode"]) == stat.S_IFREG | 0o644
    assert target.read_bytes() == data
    assert state(target) == "cached"


def test_streamed_multipart_upload(mounted: Mount, s3: Any) -> None:
    # 20 MiB with the default 8 MiB parts: three parts streamed while writing.
    chunk = os.urandom(1024 * 1024)
    with open(mounted.path / "big.bin", "wb") as fh:
        for _ in range(20):
            fh.write(chunk)
    head = s3.head_object(Bucket=mounted.bucket, Key=mounted.key("big.bin"))
    assert head["ContentLength"] == 20 * 1024 * 1024
    assert head["ETag"].strip('"').endswith("-3")
    assert hashlib.sha256(s3_bytes(s3, mounted, "big.bin")).digest() == hashlib.sha256(chunk * 20).digest()


def test_object_written_elsewhere_reads_through_and_raises_read_miss(
        mounted: Mount, s3: Any, stack: Any) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    s3.put_object(Bucket=mounted.bucket, Key=mounted.key("outside/thing.dat"), Body=data)
    listing = os.listdir(mounted.path / "outside")
    assert listing == ["thing.dat"]
    path = mounted.path / "outside" / "thing.dat"
    assert path.stat().st_size == len(data)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # no metadata: the mount's defaults
    assert state(path) == "cloud"
    assert path.read_bytes() == data
    event = read_events(stack.bootstrap, f"{mounted.topic_prefix}.hydrate",
                        lambda e: e["key"] == mounted.key("outside/thing.dat"))
    assert event["type"] == "hydrate" and event["reason"] == "read-miss" and event["size"] == len(data)
    assert event["version"] == 1


def test_random_reads_of_a_cloud_object(mounted: Mount, s3: Any) -> None:
    data = os.urandom(9 * 1024 * 1024)
    s3.put_object(Bucket=mounted.bucket, Key=mounted.key("r.dat"), Body=data)
    with open(mounted.path / "r.dat", "rb") as fh:
        for offset in (8 * 1024 * 1024 + 5, 17, 4 * 1024 * 1024 - 3, len(data) - 10):
            fh.seek(offset)
            assert fh.read(4096) == data[offset:offset + 4096]


def test_directories(mounted: Mount, s3: Any) -> None:
    d = mounted.path / "d1"
    d.mkdir(mode=0o750)
    head = s3.head_object(Bucket=mounted.bucket, Key=mounted.key("d1") + "/")
    assert int(head["Metadata"]["mode"]) == stat.S_IFDIR | 0o750
    (d / "f").write_bytes(b"x")
    with pytest.raises(OSError) as err:
        d.rmdir()
    assert err.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        d.mkdir()
    (d / "f").unlink()
    d.rmdir()
    assert not d.exists()
    assert "Contents" not in s3.list_objects_v2(Bucket=mounted.bucket, Prefix=mounted.key("d1"))


def test_rename_file_and_directory(mounted: Mount, s3: Any) -> None:
    (mounted.path / "src").mkdir()
    (mounted.path / "src" / "sub").mkdir()
    (mounted.path / "src" / "sub" / "x").write_bytes(b"xx")
    (mounted.path / "src" / "y").write_bytes(b"yyy")
    os.rename(mounted.path / "src" / "y", mounted.path / "src" / "z")
    assert s3_bytes(s3, mounted, "src/z") == b"yyy"
    os.rename(mounted.path / "src", mounted.path / "dst")
    assert sorted(os.listdir(mounted.path / "dst")) == ["sub", "z"]
    assert (mounted.path / "dst" / "sub" / "x").read_bytes() == b"xx"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=mounted.bucket, Prefix=mounted.prefix + "/")
                  ["Contents"])
    assert keys == [f"{mounted.prefix}/{k}" for k in ("dst/", "dst/sub/", "dst/sub/x", "dst/z")]
    # Replacing an existing file.
    (mounted.path / "a").write_bytes(b"A")
    (mounted.path / "b").write_bytes(b"B")
    os.rename(mounted.path / "a", mounted.path / "b")
    assert (mounted.path / "b").read_bytes() == b"A"
    assert not (mounted.path / "a").exists()


def test_rename_while_writing(mounted: Mount, s3: Any) -> None:
    first, tail = os.urandom(9 * 1024 * 1024), b"tail"
    (mounted.path / "dir").mkdir()
    with open(mounted.path / "dir" / "f", "wb") as fh:
        fh.write(first)  # one part is already uploading to dir/f
        os.rename(mounted.path / "dir", mounted.path / "dir2")
        fh.write(tail)
    assert s3_bytes(s3, mounted, "dir2/f") == first + tail
    assert "Contents" not in s3.list_objects_v2(Bucket=mounted.bucket, Prefix=f"{mounted.prefix}/dir/")
    with open(mounted.path / "g", "wb") as fh:
        fh.write(first)
        os.rename(mounted.path / "g", mounted.path / "h")
        fh.write(tail)
    assert s3_bytes(s3, mounted, "h") == first + tail
    assert not (mounted.path / "g").exists()
    assert (mounted.path / "h").read_bytes() == first + tail


def test_attributes_persist(mounted: Mount, s3: Any) -> None:
    f = mounted.path / "m"
    f.write_bytes(b"data")
    os.chmod(f, 0o600)
    os.chown(f, 1234, 5678)
    os.utime(f, (1_600_000_000, 1_600_000_000))
    meta = s3.head_object(Bucket=mounted.bucket, Key=mounted.key("m"))["Metadata"]
    assert int(meta["mode"]) == stat.S_IFREG | 0o600
    assert (meta["uid"], meta["gid"], meta["mtime"]) == ("1234", "5678", "1600000000")
    st = f.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime)) == (0o600, 1234, 5678, 1_600_000_000)
    assert f.read_bytes() == b"data"


def test_overwrite_append_truncate_sparse(mounted: Mount, s3: Any) -> None:
    f = mounted.path / "w"
    f.write_bytes(b"hello world")
    with open(f, "ab") as fh:
        fh.write(b"!!")
    assert s3_bytes(s3, mounted, "w") == b"hello world!!"
    with open(f, "r+b") as fh:
        fh.seek(6)
        fh.write(b"WORLD")
    assert s3_bytes(s3, mounted, "w") == b"hello WORLD!!"
    os.truncate(f, 5)
    assert s3_bytes(s3, mounted, "w") == b"hello"
    with open(f, "r+b") as fh:
        fh.truncate(8)
    assert s3_bytes(s3, mounted, "w") == b"hello\0\0\0"
    with open(mounted.path / "sparse", "wb") as fh:
        fh.seek(1_000_000)
        fh.write(b"end")
    assert s3_bytes(s3, mounted, "sparse") == b"\0" * 1_000_000 + b"end"
    with open(f, "w+b") as fh:  # O_TRUNC then write, read back through the same handle
        fh.write(b"new")
        fh.seek(0)
        assert fh.read() == b"new"
    assert s3_bytes(s3, mounted, "w") == b"new"


def test_symlinks_and_unsupported_nodes(mounted: Mount) -> None:
    (mounted.path / "target").write_bytes(b"t")
    os.symlink("target", mounted.path / "link")
    assert os.readlink(mounted.path / "link") == "target"
    assert (mounted.path / "link").read_bytes() == b"t"
    with pytest.raises(OSError) as err:
        os.link(mounted.path / "target", mounted.path / "hard")
    assert err.value.errno == errno.EPERM
    assert "hard links cannot be stored" in mounted.log_text()  # FIFOs and devices: tests/test_special_files.py


def test_name_limits(mounted: Mount) -> None:
    with pytest.raises(OSError) as err:
        (mounted.path / ("n" * 256)).write_bytes(b"")
    assert err.value.errno == errno.ENAMETOOLONG
    deep = mounted.path
    for _ in range(4):
        deep = deep / ("d" * 200)
        deep.mkdir()
    with pytest.raises(OSError) as err:
        (deep / ("f" * 200)).write_bytes(b"")
    assert err.value.errno == errno.ENAMETOOLONG
    assert "exceed 1024 bytes" in mounted.log_text()
    # MinIO refuses a directory marker whose name is over 246 bytes (pjdfstest mkdir/02.t): ENAMETOOLONG with
    # the store's reason, not EIO.
    with pytest.raises(OSError) as err:
        (mounted.path / ("m" * 250)).mkdir()
    assert err.value.errno == errno.ENAMETOOLONG
    assert "XMinioInvalidObjectName" in mounted.log_text()


def test_unlink_and_missing(mounted: Mount, s3: Any) -> None:
    f = mounted.path / "gone"
    f.write_bytes(b"x")
    f.unlink()
    assert not f.exists()
    assert "Contents" not in s3.list_objects_v2(Bucket=mounted.bucket, Prefix=mounted.key("gone"))
    with pytest.raises(FileNotFoundError):
        (mounted.path / "never").read_bytes()


def test_statfs_and_xattrs(mounted: Mount) -> None:
    st = os.statvfs(mounted.path)
    assert st.f_namemax == 255 and st.f_bavail > 0
    f = mounted.path / "x"
    f.write_bytes(b"1")
    assert os.getxattr(f, "user.hybridfs.key").decode() == mounted.key("x")
    assert "user.hybridfs.state" in os.listxattr(f)
    # What `ls -l` asks of every entry (answered before the core), and a name of ours that does not exist.
    for name in ("user.other", "security.selinux", "system.posix_acl_access", "user.hybridfs.nosuch"):
        with pytest.raises(OSError) as err:
            os.getxattr(f, name)
        assert err.value.errno == errno.ENODATA, name


def test_large_directory_listing(mounted: Mount, stack: Any) -> None:
    s3 = boto3.client("s3", config=botocore.config.Config(max_pool_connections=32))
    keys = [mounted.key(f"many/f{i:05d}") for i in range(10_000)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=mounted.bucket, Key=k, Body=b"z"), keys))
    names = os.listdir(mounted.path / "many")
    assert len(names) == 10_000
    assert sorted(names) == [f"f{i:05d}" for i in range(10_000)]


def test_concurrent_writers_and_readers(mounted: Mount, s3: Any) -> None:
    blobs = {f"c{i}": os.urandom(256 * 1024 + i) for i in range(24)}

    def write(name: str) -> None:
        (mounted.path / name).write_bytes(blobs[name])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, blobs))
    with ThreadPoolExecutor(8) as pool:
        results = dict(zip(blobs, pool.map(lambda n: (mounted.path / n).read_bytes(), blobs), strict=True))
    assert results == blobs
    assert all(s3_bytes(s3, mounted, n) == b for n, b in blobs.items())


def test_changed_remotely_is_seen_after_the_cache_time(mount_factory: Any, s3: Any) -> None:
    mount = mount_factory(extra_args=["--dir-cache-time", "0.5", "--attr-timeout", "0.2"])
    f = mount.path / "v"
    f.write_bytes(b"version 1")
    assert f.read_bytes() == b"version 1"
    s3.put_object(Bucket=mount.bucket, Key=mount.key("v"), Body=b"version two")
    wait_until(lambda: f.read_bytes() == b"version two", timeout=10, message="the new version through the mount")


def test_cli_rejects_bad_input(tmp_path: Path) -> None:
    result = subprocess.run(["python", "-m", "hybridfs", "mount", "not-a-url", str(tmp_path), "--cache-dir",
                             str(tmp_path / "c"), "--no-events"], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "source = 'not-a-url'" in result.stderr
