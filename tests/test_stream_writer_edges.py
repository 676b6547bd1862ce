"""Issue 21 item 7, the writer's parts, each through a real mount."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import Mount, wait_until
from s3proxy import Rule, S3FaultProxy
from test_faults_write import object_path, through_proxy, uploads

MiB = 1024 * 1024


def stored(s3: Any, mount: Mount, name: str) -> bytes | None:
    try:
        return bytes(s3.get_object(Bucket=mount.bucket, Key=mount.key(name))["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def test_fsync_on_a_read_only_descriptor_stores_another_descriptors_writes(mounted: Mount, s3: Any) -> None:
    """fsync() through a read-only descriptor (what ``sync FILE`` does) stores the writes made through another
    descriptor of the same file (before: it returned 0 and S3 held nothing)."""
    path = mounted.path / "synced.txt"
    writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(writer, b"first version\n")
        reader = os.open(path, os.O_RDONLY)
        try:
            os.fsync(reader)
            assert stored(s3, mounted, "synced.txt") == b"first version\n"
        finally:
            os.close(reader)
        os.write(writer, b"second line\n")
        subprocess.run(["sync", str(path)], check=True)
        assert stored(s3, mounted, "synced.txt") == b"first version\nsecond line\n"
    finally:
        os.close(writer)


@pytest.mark.parametrize("then", ["close", "pwrite"])
def test_failed_move_of_a_stream_after_its_directory_was_renamed(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any, then: str) -> None:
    """A stream whose directory is renamed mid-upload finishes at its old key and is then copied to the new one.
    When that copy fails, fsync fails; the next close (after a pwrite too: it edits the stored content in a
    spool) stores the whole file at the new key and nothing stays at the old one (before: the used-up stream was
    finished again — an empty object claiming the full size)."""
    mount = through_proxy(mount_factory, s3_proxy)  # --part-size 5M
    (mount.path / "d").mkdir()
    data = os.urandom(12 * MiB + 3)
    fd = os.open(mount.path / "d" / "a.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data[:7 * MiB])
        os.rename(mount.path / "d", mount.path / "e")
        os.write(fd, data[7 * MiB:])
        refused = s3_proxy.add(Rule(method="PUT", path=object_path(mount, "e/a.bin")))
        with pytest.raises(OSError) as failure:
            os.fsync(fd)
        assert failure.value.errno == errno.EIO
        assert refused.hits >= 1
        s3_proxy.remove(refused)
        if then == "pwrite":
            assert os.pwrite(fd, b"Z" * 10, 3) == 10
            data = data[:3] + b"Z" * 10 + data[13:]
    finally:
        os.close(fd)
    assert stored(s3, mount, "e/a.bin") == data
    assert stored(s3, mount, "d/a.bin") is None
    assert (mount.path / "e" / "a.bin").stat().st_size == len(data)
    assert (mount.path / "e" / "a.bin").read_bytes() == data


def test_shutdown_aborts_a_stream_only_after_its_parts_in_flight(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """SIGTERM while a file is still open and streaming, a part on its way to S3: the upload is aborted once that
    part is answered, not under it (S3 may keep a part that lands after the abort). Before: the abort went out
    at once and the mount exited with part 2 still held (S3 never answered it)."""
    # --write-timeout 4: the stop waits 9 s for open files. Botocore waits for the held part (its connect
    # timeout also bounds sending the body, which the proxy reads only after the delay).
    mount = through_proxy(mount_factory, s3_proxy, "--s3-read-timeout", "30", "--s3-connect-timeout", "30")
    mount.allow_log(r"unmounting with 1 file\(s\) still being written|dropping its unfinished upload")
    # Held longer than the stop's wait for open files (9 s), shorter than that plus the write timeout.
    held = s3_proxy.add(Rule(method="PUT", query=r"partNumber=2(&|$)", action="delay", delay=11))
    fd = os.open(mount.path / "open.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, os.urandom(11 * MiB))
        wait_until(lambda: held.matched >= 1, 10, message="part 2 to reach the proxy")
        mount.proc.send_signal(signal.SIGTERM)
        mount.proc.wait(60)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert held.answers == [200], f"part 2 answered {held.answers} (404 or None: aborted under it)"
    assert uploads(s3, mount, "open.bin") == []


WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
data = open(sys.argv[2], "rb").read()
for start, end in ((0, 6), (6, 12), (12, 16)):
    os.write(fd, data[start * 2**20:end * 2**20])
    print(end, flush=True)
    sys.stdin.readline()
os.close(fd)
print("closed", flush=True)
"""


def test_a_starting_mount_does_not_abort_a_live_mounts_long_stream(
        mount_factory: Any, s3: Any, stack: Any, prefix: str, tmp_path: Path) -> None:
    """--abort-uploads-after aborts uploads left by crashed hosts; a live mount's stream that started longer ago
    but still sends parts is not one (before: the starting mount aborted it under its writer, whose next part
    failed with NoSuchUpload). The writer is a process of its own: a descriptor of the file in this process
    would be closed in the forked mount process, and that close flushes (finishes) the stream."""
    grace = 5
    a = mount_factory(extra_args=["--part-size", "5M"])
    dead = s3.create_multipart_upload(Bucket=stack.bucket, Key=f"{prefix}/from-a-dead-host.bin")["UploadId"]
    data = os.urandom(16 * MiB)
    (tmp_path / "data").write_bytes(data)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(a.path / "long.bin"), str(tmp_path / "data")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdin is not None and writer.stdout is not None
    try:
        assert writer.stdout.readline().strip() == "6"
        live = wait_until(lambda: uploads(s3, a, "long.bin"), 10, message="A's multipart upload")
        time.sleep(grace + 1)  # both uploads must be older than the grace period: age is the condition under test
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "12"  # part 2: the stream is alive
        wait_until(lambda: len(s3.list_parts(Bucket=a.bucket, Key=a.key("long.bin"), UploadId=live[0])
                               .get("Parts", [])) == 2, 10, message="part 2 of A's stream")
        b = mount_factory(extra_args=["--abort-uploads-after", str(grace)])
        wait_until(lambda: not uploads(s3, b, "from-a-dead-host.bin"), 30,
                   message=f"the dead host's upload {dead} to be aborted")
        assert uploads(s3, a, "long.bin") == live, "the starting mount aborted A's live stream"
        for _ in range(2):
            writer.stdin.write("\n")
            writer.stdin.flush()
        assert writer.stdout.readline().strip() == "16"
        assert writer.stdout.readline().strip() == "closed"
        assert writer.wait(30) == 0
    finally:
        writer.kill()
        writer.wait()
    assert stored(s3, a, "long.bin") == data
