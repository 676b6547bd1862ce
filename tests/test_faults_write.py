"""Issue 10: no fault ends the mount or loses a byte — the write path under S3 faults injected over HTTP.

Every mount here talks to MinIO through the ``s3_proxy`` fault proxy (tests/s3proxy.py), which fails, delays,
stalls or refuses chosen requests while the mount runs; process faults are signals. Botocore is set to two
attempts and short timeouts so that "after botocore's retries" takes milliseconds, not minutes.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Mount, object_path, s3_bytes, wait_until
from s3proxy import Rule, S3FaultProxy

MiB = 1024 * 1024
WRITE_TIMEOUT = 4.0
FAST_S3 = ["--s3-max-attempts", "2", "--s3-connect-timeout", "1", "--s3-read-timeout", "3",
           "--part-size", "5M", "--write-timeout", str(WRITE_TIMEOUT)]
# What a mount says when S3 refuses a write: expected in these tests, unexpected anywhere else.
S3_FAILURE_LINES = r"streamed upload of .* failed|S3 said|S3 unreachable|did not finish within|" \
                   r"could not abort|closed with changes that are not stored|upload at release failed|" \
                   r"S3 marked down"


def through_proxy(mount_factory: Callable[..., Mount], proxy: S3FaultProxy, *extra: str,
                  env: dict[str, str] | None = None) -> Mount:
    mount = mount_factory(extra_args=["--endpoint-url", proxy.url, *FAST_S3, *extra], env=env)
    mount.allow_log(S3_FAILURE_LINES)
    return mount


def uploads(s3: Any, mount: Mount, name: str) -> list[str]:
    """Open multipart uploads of ``name``'s key (MinIO lists them for an exact key)."""
    key = mount.key(name)
    found = s3.list_multipart_uploads(Bucket=mount.bucket, Prefix=key).get("Uploads", [])
    return [u["UploadId"] for u in found if u["Key"] == key]


def write_in_pieces(path: Path, data: bytes, piece: int = MiB) -> None:
    with open(path, "wb") as fh:
        for start in range(0, len(data), piece):
            fh.write(data[start:start + piece])


def assert_serving(mount: Mount) -> None:
    """The mount process is alive and answers a write and a read (after an outage, once its circuit breaker
    has seen S3 answer again: a probe every 2 s)."""
    assert mount.proc.poll() is None, f"the mount exited:\n{mount.log_tail()}"
    probe = mount.path / f"probe-{time.monotonic_ns()}"

    def write_and_read() -> bool:
        try:
            probe.write_bytes(b"still here")
        except OSError:
            return False
        return probe.read_bytes() == b"still here"

    wait_until(write_and_read, 10, interval=0.2, message="the mount to write and read again")
    assert mount.proc.poll() is None


def close_fails_in_time(fh: Any, what: str) -> None:
    """close() of ``fh`` fails with EIO within the write timeout + 1 s (abort included)."""
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        fh.close()
    took = time.monotonic() - started
    assert failure.value.errno == errno.EIO
    assert took < WRITE_TIMEOUT + 1, f"{what}: close took {took:.1f}s"


# -- scenario 1: a failed part never ends the mount -------------------------------------------------------


@pytest.mark.parametrize("code,status", [("InternalError", 500), ("NoSuchUpload", 404)])
def test_part_failing_after_retries_keeps_mount_and_every_byte(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any, code: str, status: int) -> None:
    """Part 2 of a 40 MiB stream fails after botocore's retries: the mount stays, the stream hands its bytes
    to a spool, and close() stores the whole file (before: the mount process exited, ENOTCONN for all)."""
    mount = through_proxy(mount_factory, s3_proxy)
    attempts = 2 if status >= 500 else 1  # botocore retries a 5xx, never a 404
    rule = s3_proxy.add(Rule(method="PUT", query=r"partNumber=2(&|$)", status=status, code=code, times=attempts))
    data = os.urandom(40 * MiB)
    write_in_pieces(mount.path / "big.bin", data)
    assert rule.hits == attempts
    assert s3_bytes(s3, mount, "big.bin") == data
    wait_until(lambda: not uploads(s3, mount, "big.bin"), 30, message="the failed upload to be aborted")
    assert (mount.path / "big.bin").read_bytes() == data
    assert_serving(mount)


def test_one_object_refused_twice_does_not_mark_s3_down(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """Two closes of one file fail with 500 after botocore's retries; S3 answers everything else. Those failures
    are the request's, not S3's: the next write of another file goes to S3 and succeeds (before: the circuit
    breaker counted them as an outage and failed every call with EIO for 2 s)."""
    mount = through_proxy(mount_factory, s3_proxy)
    refused = s3_proxy.add(Rule(method="PUT", path=object_path(mount, "refused.txt"), times=4))  # 2 closes x 2
    for attempt in range(2):
        with pytest.raises(OSError) as failure:
            (mount.path / "refused.txt").write_bytes(b"refused %d" % attempt)
        assert failure.value.errno == errno.EIO
    assert refused.hits == 4
    (mount.path / "other.txt").write_bytes(b"S3 is up")
    assert s3_bytes(s3, mount, "other.txt") == b"S3 is up"
    breaker = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))["s3"]["breaker"]
    assert breaker["trips"] == 0 and breaker["refused_calls"] == 0, breaker


def test_a_new_file_written_again_right_after_its_failed_close_is_stored(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """A new file's close fails (S3 refused its PUT); the program writes it again at once. That open can race the
    release of the failed file, which forgets it (it never existed in S3): before, it got a handle on the forgotten
    file, took the writes and closed with 0, and S3 never got them (3 runs of 4). Now it gets the name anew."""
    mount = through_proxy(mount_factory, s3_proxy)
    for round_ in range(5):
        name = f"again-{round_}.txt"
        refused = s3_proxy.add(Rule(method="PUT", path=object_path(mount, name), times=2))  # one close x 2
        with pytest.raises(OSError) as failure:
            (mount.path / name).write_bytes(b"refused")
        assert failure.value.errno == errno.EIO and refused.hits == 2
        (mount.path / name).write_bytes(b"stored, round %d" % round_)
        assert s3_bytes(s3, mount, name) == b"stored, round %d" % round_
        assert (mount.path / name).read_bytes() == b"stored, round %d" % round_


def test_parts_failing_for_good_fail_close_and_leave_nothing(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    mount = through_proxy(mount_factory, s3_proxy)
    s3_proxy.add(Rule(method="PUT", query=r"partNumber="))
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        write_in_pieces(mount.path / "never.bin", os.urandom(20 * MiB))
    assert failure.value.errno == errno.EIO
    s3_proxy.clear()
    assert s3_bytes(s3, mount, "never.bin") is None
    wait_until(lambda: not uploads(s3, mount, "never.bin"), 30, message="every multipart upload to be aborted")
    assert_serving(mount)
    assert time.monotonic() - started < 60


def test_s3_refusing_connections_mid_stream(s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """S3 goes away mid-part: close() fails with EIO within the write timeout (+1 s, abort included), no object
    appears, and the upload is aborted once S3 is back (its abort waits in the background)."""
    mount = through_proxy(mount_factory, s3_proxy)
    path = mount.path / "cut.bin"
    fh = open(path, "wb")
    fh.write(os.urandom(12 * MiB))
    fh.flush()
    wait_until(lambda: uploads(s3, mount, "cut.bin"), 10, message="the multipart upload to start")
    s3_proxy.down("refuse")
    fh.write(os.urandom(3 * MiB))
    close_fails_in_time(fh, "cut.bin")
    s3_proxy.up()
    wait_until(lambda: not uploads(s3, mount, "cut.bin"), 40, message="the upload to be aborted after S3 returns")
    assert s3_bytes(s3, mount, "cut.bin") is None
    assert_serving(mount)


def test_close_on_stalled_s3_returns_within_the_write_timeout(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """S3 stops answering (requests held, never answered) after the files were opened: close() fails with EIO
    within the write timeout + 1 s, abort included. Before: 15 s with --write-timeout 10."""
    mount = through_proxy(mount_factory, s3_proxy)
    files = {name: open(mount.path / name, "wb") for name in ("small.bin", "streamed.bin")}
    files["streamed.bin"].write(os.urandom(6 * MiB))  # one part under way
    files["streamed.bin"].flush()
    s3_proxy.down("stall")
    for name, size in (("small.bin", 100_000), ("streamed.bin", 5 * MiB)):
        files[name].write(os.urandom(size))
        close_fails_in_time(files[name], name)
    s3_proxy.up()
    assert_serving(mount)
    wait_until(lambda: not uploads(s3, mount, "streamed.bin"), 40, message="the upload to be aborted")


# -- scenario 2: after a failed fsync or close, nothing partial is ever stored --------------------------


def test_failed_fsync_then_close_stores_every_byte(s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """Before: S3 ended with the last 4 bytes (or none) while the cache claimed 4,004."""
    mount = through_proxy(mount_factory, s3_proxy)
    rule = s3_proxy.add(Rule(method="PUT", path=object_path(mount, "f.txt")))
    first = os.urandom(4000)
    fd = os.open(mount.path / "f.txt", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, first)
        with pytest.raises(OSError) as failure:
            os.fsync(fd)
        assert failure.value.errno == errno.EIO
        s3_proxy.remove(rule)
        os.write(fd, b"more")
    finally:
        os.close(fd)
    assert s3_bytes(s3, mount, "f.txt") == first + b"more"
    assert (mount.path / "f.txt").read_bytes() == first + b"more"


def test_release_after_failed_close_keeps_previous_version(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """Before: the release after a failed close PUT an empty buffer over the previous version."""
    mount = through_proxy(mount_factory, s3_proxy)
    (mount.path / "v.txt").write_bytes(b"version 1")
    rule = s3_proxy.add(Rule(method="PUT", path=object_path(mount, "v.txt")))
    with pytest.raises(OSError):
        (mount.path / "v.txt").write_bytes(b"version 2, never stored")
    s3_proxy.remove(rule)
    puts_before = s3_proxy.seen(method="PUT", path=object_path(mount, "v.txt"))
    mount.unmount()  # every release has been served once the process exits
    assert s3_proxy.seen(method="PUT", path=object_path(mount, "v.txt")) == puts_before
    assert s3_bytes(s3, mount, "v.txt") == b"version 1"


# -- scenario 3: a close that returned EIO never lands over a newer version -------------------------------


def test_late_commit_cannot_overwrite_a_newer_version(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """A close times out while its PUT is held by a slow S3; another host stores a newer version; the held PUT
    then reaches S3 and is refused (conditional write). Before: it overwrote the newer version (7 of 8)."""
    slow = through_proxy(mount_factory, s3_proxy, "--attr-timeout", "0")
    direct = mount_factory()
    (slow.path / "doc.txt").write_bytes(b"v0")
    # Both of botocore's attempts are held (each gives up after --s3-read-timeout), then reach S3 late.
    rule = s3_proxy.add(Rule(method="PUT", path=object_path(slow, "doc.txt"), action="delay",
                             delay=WRITE_TIMEOUT + 4, times=2))
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        (slow.path / "doc.txt").write_bytes(b"stale version, its caller was told EIO")
    assert failure.value.errno == errno.EIO
    assert time.monotonic() - started < WRITE_TIMEOUT + 1
    (direct.path / "doc.txt").write_bytes(b"the newer version")
    wait_until(lambda: len(rule.answers) == 2, WRITE_TIMEOUT + 20, message="the held PUTs to reach S3")
    assert rule.answers == [412, 412], "S3 must refuse both late attempts (conditional write)"
    assert s3_bytes(s3, slow, "doc.txt") == b"the newer version"


def test_next_close_on_the_same_mount_waits_for_a_late_commit(
        s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any) -> None:
    """The held PUT lands after its caller got EIO; the next close of the file waits for it and replaces it."""
    mount = through_proxy(mount_factory, s3_proxy)
    (mount.path / "doc.txt").write_bytes(b"v0")
    # Both of botocore's attempts are held: the first lands after the close gave up, the second is refused.
    s3_proxy.add(Rule(method="PUT", path=object_path(mount, "doc.txt"), action="delay", delay=WRITE_TIMEOUT + 1,
                      times=2))
    with pytest.raises(OSError):
        (mount.path / "doc.txt").write_bytes(b"v1, told EIO")
    (mount.path / "doc.txt").write_bytes(b"v2")
    assert s3_bytes(s3, mount, "doc.txt") == b"v2"
    assert (mount.path / "doc.txt").read_bytes() == b"v2"


# -- scenario 4: two descriptors, one file --------------------------------------------------------------


def test_dup_descriptors_closed_at_once_store_the_whole_file(mount_factory: Any, s3: Any) -> None:
    """Before: two FLUSH ran finish() at once and about 1 trial in 4 stored an empty object."""
    mount = mount_factory()
    for trial in range(8):
        data = os.urandom(300_000 + trial)
        fd = os.open(mount.path / "dup.bin", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        second = os.dup(fd)
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def close(descriptor: int, barrier: threading.Barrier = barrier,
                  errors: list[BaseException] = errors) -> None:
            barrier.wait()
            try:
                os.close(descriptor)
            except OSError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=close, args=(d,)) for d in (fd, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert s3_bytes(s3, mount, "dup.bin") == data, f"trial {trial}"


def test_read_only_close_and_read_back_publish_nothing(mount_factory: Any, s3: Any) -> None:
    """Before: a read-only handle's close, or a read of a file being streamed, published the half-written file
    (or a 10-byte prefix, leaking the multipart upload)."""
    mount = mount_factory(extra_args=["--part-size", "5M"])
    head = os.urandom(12 * MiB)  # two parts already sent
    tail = os.urandom(3 * MiB)
    writer = os.open(mount.path / "half.bin", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(writer, head)
        with open(mount.path / "half.bin", "rb") as reader:
            assert reader.read(100) == head[:100]
        assert os.pread(writer, 1000, 6 * MiB) == head[6 * MiB:6 * MiB + 1000]
        assert s3_bytes(s3, mount, "half.bin") is None
        os.write(writer, tail)
    finally:
        os.close(writer)
    assert s3_bytes(s3, mount, "half.bin") == head + tail
    wait_until(lambda: not uploads(s3, mount, "half.bin"), 30, message="the abandoned stream to be aborted")


# -- scenario 5: leftovers after a crash ------------------------------------------------------------------


def test_sigkill_during_multipart_upload_leaves_nothing_after_restart(mount_factory: Any, s3: Any) -> None:
    """Before: pending aborts lived in memory; a SIGKILLed mount left its multipart upload in S3 forever."""
    first = mount_factory(extra_args=["--part-size", "5M"])
    fd = os.open(first.path / "killed.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, os.urandom(12 * MiB))
    wait_until(lambda: uploads(s3, first, "killed.bin"), 10, message="the multipart upload to start")
    first.kill()
    with pytest.raises(OSError):
        os.close(fd)
    assert uploads(s3, first, "killed.bin"), "the upload survived the crash (the premise of this test)"
    again = mount_factory(extra_args=["--state-dir", str(first.state_dir)])
    wait_until(lambda: not uploads(s3, again, "killed.bin"), 30, message="the restarted mount to abort it")


def test_stale_uploads_of_other_hosts_are_aborted_at_start(mount_factory: Any, s3: Any, stack: Any,
                                                           prefix: str) -> None:
    key = f"{prefix}/from-a-dead-host.bin"
    upload_id = s3.create_multipart_upload(Bucket=stack.bucket, Key=key)["UploadId"]
    time.sleep(1.1)  # the upload must be older than the grace period: age is the condition under test
    mount = mount_factory(extra_args=["--abort-uploads-after", "1"])
    wait_until(lambda: not uploads(s3, mount, "from-a-dead-host.bin"), 30,
               message=f"the stale upload {upload_id} to be aborted")


# -- scenario 6: concurrent writers of one name -----------------------------------------------------------


def test_concurrent_writers_of_one_name(mount_factory: Any, s3: Any) -> None:
    """Before: close() sometimes failed with an internal error (XAmzContentSHA256Mismatch): a spool changed while
    botocore signed and sent it. Now flushes and writes of one file are serialised."""
    mount = mount_factory(extra_args=["--part-size", "5M"])
    path = mount.path / "shared.bin"
    path.write_bytes(b"")
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        try:
            for round_ in range(4):
                block = bytes([seed * 16 + round_]) * (3 * MiB)
                with open(path, "r+b") as fh:
                    fh.seek(seed * 3 * MiB)
                    fh.write(block)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stored = s3_bytes(s3, mount, "shared.bin")
    assert stored is not None and stored == path.read_bytes()
    for seed in range(4):  # every writer's last block is there
        assert stored[seed * 3 * MiB:seed * 3 * MiB + 3 * MiB] == bytes([seed * 16 + 3]) * (3 * MiB)
    assert "internal error" not in mount.log_text() and "BUG:" not in mount.log_text()


# -- supervision: an unexpected exception in any background task ------------------------------------------


def test_unexpected_exceptions_in_background_tasks_never_end_the_mount(mount_factory: Any, s3: Any,
                                                                       stack: Any, prefix: str,
                                                                       s3_proxy: S3FaultProxy) -> None:
    """Failpoints (HYBRIDFS_FAILPOINTS) raise a RuntimeError inside a part upload, a read-ahead fetch, a commit
    and an attribute prefetch — stand-ins for any bug. Each costs at most that one request; the mount serves on."""
    for i in range(3):
        s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/dir/f{i}", Body=b"x" * 100)
    cold = os.urandom(3 * MiB)
    s3.put_object(Bucket=stack.bucket, Key=f"{prefix}/cold.bin", Body=cold)
    # The store refuses MinIO's metadata listings, as AWS ignores them: listed objects' attributes are prefetched
    # with HEADs, where the prefetch failpoint is.
    s3_proxy.add(Rule(method="GET", query=r"metadata=true", status=400, code="InvalidArgument"))
    mount = mount_factory(extra_args=["--endpoint-url", s3_proxy.url, "--part-size", "5M"],
                          env={"HYBRIDFS_FAILPOINTS": "part:1,fetch:1,commit:1,prefetch:1,housekeeping:1"})
    mount.allow_log(r"failpoint|streamed upload of .* failed|internal error|closed with changes that are not|"
                    r"background task housekeeping failed")
    with pytest.raises(OSError) as failure:  # the commit fails once: this close is EIO, nothing stored
        (mount.path / "small.txt").write_bytes(b"first try")
    assert failure.value.errno == errno.EIO
    assert s3_bytes(s3, mount, "small.txt") is None
    (mount.path / "small.txt").write_bytes(b"second try")
    assert s3_bytes(s3, mount, "small.txt") == b"second try"
    data = os.urandom(12 * MiB)
    write_in_pieces(mount.path / "streamed.bin", data)  # the part fails: handed over to a spool, stored whole
    assert s3_bytes(s3, mount, "streamed.bin") == data
    assert sorted(os.listdir(mount.path / "dir")) == ["f0", "f1", "f2"]
    assert all(os.stat(mount.path / "dir" / f"f{i}").st_size == 100 for i in range(3))
    try:  # one chunk fetch fails: that read is EIO, unless it was the kernel's read-ahead, which retries
        got = (mount.path / "cold.bin").read_bytes()
    except OSError as exc:
        assert exc.errno == errno.EIO
        got = (mount.path / "cold.bin").read_bytes()
    assert got == cold
    assert_serving(mount)
    for point in ("part", "fetch", "commit", "prefetch"):
        assert f"failpoint {point} fires" in mount.log_text()
    # A service that fails is restarted by its supervisor: housekeeping runs again after its failure.
    def restarts() -> int:
        status = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))
        return int(status["tasks"]["restarts"])

    wait_until(lambda: restarts() >= 1, 20, message="the supervisor to restart housekeeping after its failure")
    assert "background task housekeeping failed" in mount.log_text()
    assert_serving(mount)


def test_an_allow_list_never_hides_a_bug(tmp_path: Path, allow_log: Callable[[str], None]) -> None:
    """The FUSE boundary's line for an unexpected exception and for an expected FsError, as a mount logs them:
    an allow-list for the expected failure (even ".*") passes the FsError line and still reports the bug's."""
    import logging

    import pyfuse3
    import trio

    from hybridfs.errors import FsError
    from hybridfs.fuse_ops import boundary

    allow_log(r"BUG: unexpected RuntimeError|S3 said InternalError")  # in-process: this test's own records
    log_path = tmp_path / "mount.log"
    handler = logging.FileHandler(log_path)  # the mount's line format (hybridfs/logs.py)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    fuse_log = logging.getLogger("hybridfs.fuse")
    fuse_log.addHandler(handler)

    @boundary
    async def flush(fail: BaseException) -> None:
        raise fail

    async def main() -> None:
        for fail in (FsError(errno.EIO, "PUT k: S3 said InternalError (injected) after retries"),
                     RuntimeError("a bug")):
            with pytest.raises(pyfuse3.FUSEError) as refused:
                await flush(fail)
            assert refused.value.errno == errno.EIO

    try:
        trio.run(main)
    finally:
        fuse_log.removeHandler(handler)
        handler.close()
    mount = Mount(path=tmp_path, bucket="b", prefix="p", cache_dir=tmp_path, state_dir=tmp_path, topic_prefix="t",
                  proc=None, log_path=log_path)  # type: ignore[arg-type]  # only its log is used
    for allowed in (r"S3 said|-> EIO", r".*"):
        bad = mount.unexpected_log_lines([allowed])
        assert len(bad) == 1 and "flush: BUG: unexpected RuntimeError, replying EIO" in bad[0], (allowed, bad)
    assert mount.unexpected_log_lines([r"BUG: unexpected RuntimeError"]) == []
