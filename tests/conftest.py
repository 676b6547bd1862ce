"""Test harness: the real local stack, isolated S3/Kafka prefixes per test, and real FUSE mounts.

Fixtures
  stack          session: `hybridfs stack up` (reuses a running stack), env exported into os.environ.
                 Left running afterwards; HYBRIDFS_TEST_STACK_DOWN=1 stops it at the end of the session.
  s3             a boto3 S3 client for the stack.
  prefix         a unique S3 key prefix for this test (no trailing slash); its objects are deleted afterwards
                 (HYBRIDFS_TEST_KEEP_DATA=1 keeps them).
  topic_prefix   a unique Kafka topic prefix for this test.
  mount_factory  mounts with `python -m hybridfs mount ...` in a subprocess; see ``Mount``.
  mounted        one mount with the defaults.
  allow_log      allow_log(regex): this test may log a matching WARNING+ in-process (or use the marker).
  s3_proxy       a started ``S3FaultProxy`` (tests/s3proxy.py) in front of the stack's MinIO, closed afterwards:
                 mount through it with ``mount_factory(extra_args=["--endpoint-url", s3_proxy.url])``. Name it
                 before ``mount_factory``/``mounted`` in the test's arguments so that it outlives the mounts.

Every test fails if its in-process logging produced a WARNING or above that no ``allow_log`` pattern matches,
and a mount fails its test if it logged an unexpected WARNING+ or exited non-zero after a clean unmount.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import MOUNT_TIMEOUT, Mount, Stack, wait_until
from s3proxy import S3FaultProxy

from hybridfs.stack import BUCKET, KAFKA_BOOTSTRAP, S3_ENDPOINT, stack_env

# Expected everywhere: librdkafka's note that a just-started broker is still loading its group coordinator
# (transient, the message is delivered; see STACK-NOTES).
DEFAULT_ALLOWED_LOG = (r"Coordinator load in progress",)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_log(*regex): in-process or mount log WARNING+ lines matching a regex are expected"
    )


# -- the stack


def _run_stack(pytestconfig: pytest.Config, action: str) -> None:
    """Run `hybridfs stack ACTION` with output shown live (a first run builds things for minutes)."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\n==> hybridfs stack {action}", flush=True)
        result = subprocess.run(
            [sys.executable, "-m", "hybridfs", "stack", action], timeout=1800, check=False
        )
    if result.returncode != 0:
        pytest.fail(f"`hybridfs stack {action}` failed (exit {result.returncode}); its output is above")


def _prune_topics(pytestconfig: pytest.Config, *args: str) -> None:
    """`hybridfs stack prune ARGS`, best effort: topics left behind cost the broker's start-up, not this run."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        try:
            result = subprocess.run([sys.executable, "-m", "hybridfs", "stack", "prune", *args], timeout=600,
                                    check=False, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            print("==> hybridfs stack prune: no answer within 600 s", flush=True)
            return
        print(f"==> hybridfs stack prune: {(result.stdout + result.stderr).strip().splitlines()[-1:]}"
              f" (exit {result.returncode})", flush=True)


_TOPIC_PREFIXES: list[str] = []  # every topic prefix this session handed out, deleted when it ends


@pytest.fixture(scope="session")
def stack(pytestconfig: pytest.Config) -> Iterator[Stack]:
    _run_stack(pytestconfig, "up")
    _prune_topics(pytestconfig)  # what killed runs left (older than a run lasts)
    env = stack_env()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield Stack(env=env, bucket=BUCKET, bootstrap=KAFKA_BOOTSTRAP, endpoint=S3_ENDPOINT)
    if _TOPIC_PREFIXES and os.environ.get("HYBRIDFS_TEST_KEEP_DATA") != "1":
        _prune_topics(pytestconfig, *(arg for p in _TOPIC_PREFIXES for arg in ("--prefix", p)))
    if os.environ.get("HYBRIDFS_TEST_STACK_DOWN") == "1":
        _run_stack(pytestconfig, "down")


@pytest.fixture
def s3(stack: Stack) -> Any:
    return stack.s3_client()


def _short_name(request: pytest.FixtureRequest, width: int = 32) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    name = name.removeprefix("test-")
    return name[:width].rstrip("-") or "t"


@pytest.fixture
def prefix(request: pytest.FixtureRequest, stack: Stack, s3: Any) -> Iterator[str]:
    value = f"t-{_short_name(request)}-{secrets.token_hex(4)}"
    yield value
    if os.environ.get("HYBRIDFS_TEST_KEEP_DATA") != "1":
        _delete_prefix(s3, stack.bucket, value + "/")


def _delete_prefix(s3: Any, bucket: str, key_prefix: str) -> None:
    """Best effort: a test may have left S3 unreachable, which is its own failure, not this one's."""
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    except Exception as exc:
        logging.getLogger("tests").info("could not delete s3://%s/%s*: %s", bucket, key_prefix, exc)


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    value = f"t-{_short_name(request)}-{secrets.token_hex(4)}"
    _TOPIC_PREFIXES.append(value)
    return value


# -- in-process logging: an unexpected WARNING+ fails the test


_ALLOWED_KEY = pytest.StashKey[list[str]]()
_REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
_MOUNTS_KEY = pytest.StashKey[list["Mount"]]()


def _allowed_patterns(item: pytest.Item) -> list[str]:
    patterns = [*DEFAULT_ALLOWED_LOG, *item.stash.get(_ALLOWED_KEY, [])]
    for marker in item.iter_markers("allow_log"):
        patterns.extend(marker.args)
    return patterns


@pytest.fixture
def allow_log(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``allow_log(regex)``: a WARNING+ record whose message matches is expected in this test."""

    def allow(regex: str) -> None:
        request.node.stash.setdefault(_ALLOWED_KEY, []).append(regex)

    return allow


@pytest.fixture(autouse=True)
def _fail_on_unexpected_log(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    yield
    patterns = _allowed_patterns(request.node)
    unexpected = [
        f"{rec.levelname} {rec.name}: {rec.getMessage()}"
        for when in ("setup", "call")
        for rec in caplog.get_records(when)
        if rec.levelno >= logging.WARNING and not any(re.search(p, rec.getMessage()) for p in patterns)
    ]
    if unexpected and not _test_failed(request.node):
        lines = "\n".join(unexpected)
        pytest.fail(f"unexpected WARNING+ log records (use allow_log to expect them):\n{lines}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's report (fixtures ask whether the test failed); attach mount logs to failures."""
    report = yield
    item.stash.setdefault(_REPORTS_KEY, {})[report.when] = report
    if report.when == "call" and report.failed:
        for mount in item.stash.get(_MOUNTS_KEY, []):
            report.sections.append((f"mount log {mount.log_path} (last lines)", mount.log_tail(60)))
    return report


def _test_failed(item: pytest.Item) -> bool:
    return any(rep.failed for rep in item.stash.get(_REPORTS_KEY, {}).values())


# -- mounts


MountFactory = Callable[..., Mount]


@pytest.fixture
def mount_factory(
    request: pytest.FixtureRequest, stack: Stack, prefix: str, topic_prefix: str, tmp_path: Path
) -> Iterator[MountFactory]:
    mounts: list[Mount] = []
    request.node.stash[_MOUNTS_KEY] = mounts
    default_prefix = prefix

    def make(
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        prefix: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Mount:
        base = tmp_path / f"mount{len(mounts)}"
        mount = Mount(
            path=base / "mnt",
            bucket=stack.bucket,
            prefix=default_prefix if prefix is None else prefix,
            cache_dir=Path(cache_dir) if cache_dir is not None else base / "cache",
            state_dir=base / "state",
            topic_prefix=topic_prefix,
            proc=None,  # type: ignore[arg-type]  # set just below
            log_path=base / "mount.log",
        )
        for directory in (mount.path, mount.cache_dir, mount.state_dir):
            directory.mkdir(parents=True, exist_ok=True)
        mount.proc = _start_mount(mount, stack, extra_args, env)
        mounts.append(mount)
        _wait_mounted(mount)
        return mount

    yield make

    allowed = _allowed_patterns(request.node)
    problems = []
    for mount in reversed(mounts):
        mount.cleanup()
        problems += [f"{mount.path}: {p}" for p in mount.problems(allowed)]
    if problems and not _test_failed(request.node):
        tails = "\n".join(f"--- {m.log_path}\n{m.log_tail()}" for m in mounts)
        pytest.fail("mount did not end cleanly:\n" + "\n".join(problems) + "\n" + tails)


def _start_mount(
    mount: Mount, stack: Stack, extra_args: Sequence[str], env: Mapping[str, str] | None
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "hybridfs", "--log-level", "DEBUG", "mount",
        f"s3://{mount.bucket}/{mount.prefix}", str(mount.path),
        "--cache-dir", str(mount.cache_dir),
        "--state-dir", str(mount.state_dir),
        "--kafka", stack.bootstrap,
        "--topic-prefix", mount.topic_prefix,
        *extra_args,
    ]  # fmt: skip
    full_env = {**os.environ, **stack.env, **(env or {})}
    full_env.pop("JOURNAL_STREAM", None)  # keep the terminal log format the checks parse
    with open(mount.log_path, "ab") as log:
        log.write(f"==> {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=full_env
        )


def _is_ready(mount: Mount) -> bool:
    """Mounted, and the daemon has finished its own readiness probe (a stat of the mount point in flight holds
    the mount busy, so an unmount straight after `ismount` could get EBUSY)."""
    return os.path.ismount(mount.path) and "hybridfs.daemon: ready: " in mount.log_text()


def _wait_mounted(mount: Mount) -> None:
    try:
        wait_until(
            lambda: mount.proc.poll() is not None or _is_ready(mount),
            timeout=MOUNT_TIMEOUT,
            message=f"{mount.path} to be mounted and ready",
        )
    except AssertionError:
        pass
    if _is_ready(mount):
        return
    mount.killed = True  # already a failure; teardown only cleans up
    status = mount.proc.poll()
    mount.cleanup(grace=0)
    why = f"exited with status {status}" if status is not None else f"not mounted after {MOUNT_TIMEOUT:g}s"
    pytest.fail(f"hybridfs mount {why}; log {mount.log_path}:\n{mount.log_tail(60)}")


@pytest.fixture
def mounted(mount_factory: MountFactory) -> Mount:
    return mount_factory()


# -- S3 fault injection


@pytest.fixture
def s3_proxy(stack: Stack) -> Iterator[S3FaultProxy]:
    """A fault-injection proxy in front of MinIO for this test (see tests/s3proxy.py)."""
    with S3FaultProxy(upstream=stack.endpoint) as proxy:
        yield proxy
