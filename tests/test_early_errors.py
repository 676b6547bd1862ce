"""Issue 12, item 11: misconfiguration is found before anything is mounted, as one line and a non-zero exit;
the CLI verbs refuse an s3:// URL that no mount here serves."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import Mount, Stack, is_mounted, run_hybridfs


def mount_fails(tmp_path: Path, source: str, *extra: str, env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run `hybridfs mount` expecting a one-line error before mounting; returns it and how long it took."""
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir(exist_ok=True)
    started = time.monotonic()
    result = run_hybridfs("mount", source, str(mnt), "--cache-dir", str(cache), "--state-dir",
                          str(tmp_path / "state"), "--no-events", *extra, check=False, timeout=60, env=env)
    took = time.monotonic() - started
    assert not is_mounted(mnt), "nothing may be mounted"
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridfs: error: "), result.stderr
    return lines[0], took


def test_mount_of_a_missing_bucket_fails_at_once(tmp_path: Path, stack: Stack) -> None:
    line, took = mount_fails(tmp_path, "s3://no-such-bucket-hybridfs-test/p")
    assert "bucket 'no-such-bucket-hybridfs-test' does not exist" in line and "NoSuchBucket" in line
    assert took < 15


def test_mount_with_a_wrong_secret_key_fails_at_once(tmp_path: Path, stack: Stack) -> None:
    line, _ = mount_fails(tmp_path, f"s3://{stack.bucket}/p", env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert "SignatureDoesNotMatch" in line and "wrong secret key" in line
    line, _ = mount_fails(tmp_path, f"s3://{stack.bucket}/p", env={"AWS_ACCESS_KEY_ID": "nobody"})
    assert "InvalidAccessKeyId" in line


def test_mount_of_an_unreachable_endpoint_fails_within_a_bound(tmp_path: Path, stack: Stack) -> None:
    line, took = mount_fails(tmp_path, f"s3://{stack.bucket}/p", "--endpoint-url", "http://127.0.0.1:1")
    assert "S3 endpoint http://127.0.0.1:1 unreachable" in line and "--offline-start" in line
    assert took < 20


def test_offline_start_mounts_without_s3(mount_factory: Any, prefix: str) -> None:
    """A restart during an outage: --offline-start mounts anyway, with one WARNING. Before: the breaker did not
    know what the start-up check had found, and the first failed calls said the same outage again ("S3 marked
    down", within 0.5 s of every offline start: a teardown flake). Now the breaker starts open."""
    mount: Mount = mount_factory(extra_args=["--no-events", "--endpoint-url", "http://127.0.0.1:1",
                                             "--offline-start", "--s3-max-attempts", "1"])
    mount.allow_log(r"S3 endpoint http://127\.0\.0\.1:1 unreachable: .*; mounting anyway \(--offline-start")
    assert os.path.ismount(mount.path)
    status = json.loads(os.getxattr(mount.path, "user.hybridfs.status"))["s3"]["breaker"]
    assert status["state"] == "open" and "unreachable" in status["last_error"], status
    started = time.monotonic()
    with pytest.raises(OSError) as info:  # not cached: S3 is needed, and known to be down
        os.stat(mount.path / "not-cached")
    assert info.value.errno == errno.EIO
    assert time.monotonic() - started < 1.0, "S3 is known to be down: the lookup fails at once"
    mount.unmount()
    warnings = [line for line in mount.log_text().splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(warnings) == 1 and "mounting anyway" in warnings[0], warnings


def cli_fails(*args: str) -> str:
    result = run_hybridfs(*args, check=False, timeout=60)
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridfs: error: "), result.stderr
    return lines[0]


def test_verbs_refuse_a_bucket_no_mount_serves(mounted: Mount, stack: Stack) -> None:
    key = mounted.key("x")
    for verb in ("hydrate", "evict", "pin", "unpin"):
        line = cli_fails(verb, "s3://other-bucket/x", "--kafka", stack.bootstrap)
        assert "no hybridfs mount here serves s3://other-bucket/x" in line and "--no-mount-check" in line, line
    line = cli_fails("hydrate", f"s3://{mounted.bucket}/elsewhere/{key}", "--kafka", stack.bootstrap)
    assert f"this host's mounts of bucket '{mounted.bucket}' serve other prefixes: " in line
    # The mount's own bucket and prefix: accepted, and published to the mount's Kafka and topics by default.
    result = run_hybridfs("hydrate", f"s3://{mounted.bucket}/{key}")
    assert "1 event published" in result.stderr


@pytest.mark.slow
def test_mount_of_a_stalled_endpoint_fails_within_the_check_timeout(tmp_path: Path, stack: Stack,
                                                                    s3_proxy: Any) -> None:
    """An endpoint that accepts connections and never answers: the check gives up at its bound (15 s)."""
    s3_proxy.down("stall")
    line, took = mount_fails(tmp_path, f"s3://{stack.bucket}/p", "--endpoint-url", s3_proxy.url)
    assert f"S3 endpoint {s3_proxy.url} did not answer within 15s" in line
    assert 14 < took < 25
    s3_proxy.clear()
