"""Object metadata through a real mount: hostile values (issue 11 item 4), ctime and atime as s3fs stores them
(item 8)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from typing import Any

import pytest
from conftest import MountFactory
from helpers import Mount

HOSTILE = {
    "mtime-inf": {"mtime": "inf"},
    "mtime-nan": {"mtime": "nan"},
    "mtime-huge": {"mtime": "1e400"},
    "mtime-far": {"mtime": "99999999999999999999"},
    "uid-huge": {"uid": "1e400"},
    "uid-negative": {"uid": "-1"},
    "uid-big": {"uid": "4294967296"},
    "gid-junk": {"gid": "junk"},
    "mode-junk": {"mode": "junk"},
    "mode-huge": {"mode": "99999999999"},
    "mode-negative": {"mode": "-420"},
    "all-bad": {"mode": "inf", "uid": "nan", "gid": "-0.5", "mtime": "-inf", "ctime": "x", "atime": "1e999"},
}
GOOD_MTIME = 1_600_000_000


def put(s3: Any, mount: Mount, rel: str, meta: dict[str, str], body: bytes = b"abc") -> None:
    key = mount.key(rel) + ("/" if rel.endswith("/") else "")  # a directory marker keeps its slash
    s3.put_object(Bucket=mount.bucket, Key=key, Body=body, Metadata=meta)


def test_hostile_metadata_gives_defaults_and_one_log_line_per_object(mount_factory: MountFactory,
                                                                     s3: Any) -> None:
    mount = mount_factory(extra_args=["--dir-cache-time", "0.5", "--attr-timeout", "0.2"])
    mount.allow_log(r"has unusable metadata")
    for name, meta in HOSTILE.items():
        put(s3, mount, f"bad/{name}", meta)
    put(s3, mount, "bad/good", {"mode": str(stat.S_IFREG | 0o600), "uid": "123", "gid": "456",
                                "mtime": str(GOOD_MTIME)})
    d = mount.path / "bad"
    for _ in range(2):  # twice, across the caches' expiry: still one log line per object
        ls = subprocess.run(["ls", "-l", str(d)], capture_output=True, text=True, timeout=30)
        assert ls.returncode == 0, ls.stderr
        assert sorted(line.split()[-1] for line in ls.stdout.splitlines()[1:]) == sorted([*HOSTILE, "good"])
        found = subprocess.run(["find", str(d), "-ls"], capture_output=True, text=True, timeout=30)
        assert found.returncode == 0, found.stderr
        for name in HOSTILE:
            st = os.stat(d / name)
            assert stat.S_ISREG(st.st_mode) and st.st_size == 3
            assert (d / name).read_bytes() == b"abc"
        good = os.stat(d / "good")
        assert (stat.S_IMODE(good.st_mode), good.st_uid, good.st_gid, int(good.st_mtime)) == (
            0o600, 123, 456, GOOD_MTIME)
        time.sleep(0.7)  # past --dir-cache-time: the objects are read again (a TTL, not an event)
    assert os.path.ismount(mount.path)
    lines = [line for line in mount.log_text().splitlines() if "has unusable metadata" in line]
    assert sorted(line.split("object ")[1].split(" ")[0].rsplit("/", 1)[1] for line in lines) == sorted(HOSTILE)
    st = os.stat(d / "uid-huge")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_IMODE(os.stat(d / "mode-junk").st_mode) == 0o644
    assert os.stat(d / "mtime-inf").st_mtime > GOOD_MTIME  # the object's Last-Modified


def test_hostile_metadata_on_a_directory_marker_and_a_symlink(mounted: Mount, s3: Any) -> None:
    mounted.allow_log(r"has unusable metadata")
    put(s3, mounted, "dir/", {"mode": "junk", "mtime": "inf"}, body=b"")
    put(s3, mounted, "dir/inside", {})
    put(s3, mounted, "link", {"mode": str(stat.S_IFLNK | 0o777), "mtime": "nan"}, body=b"dir/inside")
    assert sorted(os.listdir(mounted.path)) == ["dir", "link"]
    assert stat.S_IMODE(os.stat(mounted.path / "dir").st_mode) == 0o755
    assert os.readlink(mounted.path / "link") == "dir/inside"
    assert (mounted.path / "link").read_bytes() == b"abc"


def test_chmod_and_chown_change_ctime_utimensat_sets_atime(mount_factory: MountFactory, s3: Any) -> None:
    mount = mount_factory()
    f = mount.path / "f"
    f.write_bytes(b"data")
    os.utime(f, (1_500_000_000, 1_400_000_000))  # atime, mtime
    st = os.stat(f)
    assert (int(st.st_atime), int(st.st_mtime)) == (1_500_000_000, 1_400_000_000)
    before = time.time() - 1
    meta = s3.head_object(Bucket=mount.bucket, Key=mount.key("f"))["Metadata"]
    assert (meta["atime"], meta["mtime"]) == ("1500000000", "1400000000")
    assert int(meta["ctime"]) >= int(before)
    # chmod: ctime moves, mtime and atime stay
    os.utime(f, (1_500_000_000, 1_400_000_000))
    os.chmod(f, 0o600)
    st = os.stat(f)
    assert st.st_ctime >= before and int(st.st_mtime) == 1_400_000_000 and int(st.st_atime) == 1_500_000_000
    os.chown(f, 1000, 1000)
    assert os.stat(f).st_ctime >= before
    # a fresh mount reads them back from S3
    mount.unmount()
    fresh = mount_factory()
    st = os.stat(fresh.path / "f")
    assert (int(st.st_atime), int(st.st_mtime), st.st_uid, stat.S_IMODE(st.st_mode)) == (
        1_500_000_000, 1_400_000_000, 1000, 0o600)
    assert st.st_ctime >= before


def test_objects_from_s3fs_with_times_show_them(mounted: Mount, s3: Any) -> None:
    put(s3, mounted, "s3fs-made", {"mode": str(stat.S_IFREG | 0o640), "uid": "0", "gid": "0",
                                   "mtime": "1600000000", "ctime": "1600000100", "atime": "1600000200"})
    st = os.stat(mounted.path / "s3fs-made")
    assert (int(st.st_mtime), int(st.st_ctime), int(st.st_atime)) == (1_600_000_000, 1_600_000_100,
                                                                       1_600_000_200)


def test_a_symlink_object_longer_than_path_max_is_refused_not_read(mounted: Mount, s3: Any) -> None:
    mounted.allow_log(r"longer than PATH_MAX")
    put(s3, mounted, "long-link", {"mode": str(stat.S_IFLNK | 0o777)}, body=b"x" * 5000)
    put(s3, mounted, "max-link", {"mode": str(stat.S_IFLNK | 0o777)}, body=b"y" * 4095)
    # The listing comes first and carries the objects' metadata (MinIO's metadata=true listing): both are
    # symlinks from the start. (A plain listing would take the 5000-byte object for a regular file, DT_REG, by its
    # size, until the lookup's HEAD told otherwise.)
    assert [e.is_file(follow_symlinks=False) for e in sorted(os.scandir(mounted.path), key=lambda e: e.name)] == [
        False, False]
    st = os.lstat(mounted.path / "long-link")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == 5000
    with pytest.raises(OSError) as err:
        os.readlink(mounted.path / "long-link")
    assert err.value.errno == errno.EIO
    assert os.readlink(mounted.path / "max-link") == "y" * 4095


@pytest.mark.parametrize("size", [4096, 12 * 1024 * 1024], ids=["one PUT", "streamed multipart"])
def test_times_set_on_an_open_file_before_close_reach_s3(mount_factory: MountFactory, s3: Any, tmp_path: Any,
                                                         size: int) -> None:
    """futimens after the last write and before close (what tar, cp -p and rsync -a do) is what S3 keeps and a
    fresh mount shows; before the fix S3 got the close time."""
    mount = mount_factory(extra_args=["--part-size", "5M"])
    fd = os.open(mount.path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, os.urandom(size))
        os.utime(fd, ns=(1_500_000_000_000_000_000, 1_400_000_000_000_000_000))
    finally:
        os.close(fd)
    meta = s3.head_object(Bucket=mount.bucket, Key=mount.key("f"))["Metadata"]
    assert (meta["atime"], meta["mtime"]) == ("1500000000", "1400000000")
    local = tmp_path / "local"
    local.write_bytes(b"copied with cp -p")
    os.utime(local, (1_300_000_000, 1_200_000_000))
    subprocess.run(["cp", "-p", str(local), str(mount.path / "copied")], check=True)
    mount.unmount()
    fresh = mount_factory()
    for name, mtime in (("f", 1_400_000_000), ("copied", 1_200_000_000)):
        st = os.stat(fresh.path / name)
        assert int(st.st_mtime) == mtime, name
    assert os.stat(fresh.path / "f").st_size == size
