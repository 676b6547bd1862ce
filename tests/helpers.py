"""Test helpers: polling with a deadline instead of sleeping, running the CLI, the Stack and Mount handles.

Import them as ``from helpers import wait_until``: tests/ has no __init__.py, so pytest's default "prepend"
import mode puts tests/ on sys.path.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

T = TypeVar("T")

MOUNT_TIMEOUT = 30.0
UNMOUNT_TIMEOUT = 30.0

# A mount log line: "HH:MM:SS.mmm LEVEL   logger: message" (hybridfs/logs.py).
_BAD_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (WARNING|ERROR|CRITICAL) ")
# The FUSE layer's line for an unexpected exception (hybridfs/fuse_ops.py boundary): a bug, whatever a test's
# allow-list says, unless a pattern names it ("BUG:") on purpose.
_BUG_LINE = re.compile(r" hybridfs\.fuse: \w+: BUG: ")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that; fail after ``timeout`` seconds.

    The predicate is always tried once more at the deadline, so a slow last poll cannot cause a false failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def run_hybridfs(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hybridfs ARGS`` (the real command) and capture its output."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "hybridfs", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"hybridfs {' '.join(args)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
        )
    return result


@dataclass(frozen=True)
class Stack:
    env: dict[str, str]
    bucket: str
    bootstrap: str
    endpoint: str

    def s3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )


def _unescape_mountinfo(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def is_mounted(path: Path) -> bool:
    """Also true for a dead FUSE mount ("transport endpoint is not connected"), unlike os.path.ismount."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as fh:
        return any(_unescape_mountinfo(line.split()[4]) == target for line in fh)


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fusermount3", *args], capture_output=True, text=True, check=False)


@dataclass
class Mount:
    path: Path
    bucket: str
    prefix: str
    cache_dir: Path
    state_dir: Path
    topic_prefix: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    allowed: list[str] = field(default_factory=list)
    killed: bool = False  # the test killed it on purpose: no clean-exit checks, its log is checked up to the kill
    log_cut: int | None = None  # the log's size when it was killed (None: the whole log)
    forced: list[str] = field(default_factory=list)  # what teardown had to force

    def key(self, relpath: str | os.PathLike[str]) -> str:
        """The S3 key of a path in the mount (relative, or absolute under ``path``)."""
        rel = Path(relpath)
        if rel.is_absolute():
            rel = rel.relative_to(self.path)
        text = str(PurePosixPath(*rel.parts))
        return f"{self.prefix}/{text}" if self.prefix else text

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def allow_log(self, regex: str) -> None:
        """A WARNING/ERROR/CRITICAL line of the mount log matching ``regex`` is expected."""
        self.allowed.append(regex)

    def unexpected_log_lines(self, extra_allowed: Sequence[str] = ()) -> list[str]:
        patterns = [*self.allowed, *extra_allowed]
        bug_patterns = [p for p in patterns if "BUG" in p]
        text = self.log_text()
        if self.log_cut is not None:
            text = text[:self.log_cut]
        return [
            line
            for line in text.splitlines()
            if _BAD_LOG_LINE.match(line)
            and not any(re.search(p, line) for p in (bug_patterns if _BUG_LINE.search(line) else patterns))
        ]

    def unmount(self, timeout: float = UNMOUNT_TIMEOUT) -> None:
        """`fusermount3 -u`, then wait for the mount process to exit."""
        result = _fusermount("-u", str(self.path))
        if result.returncode != 0:
            raise AssertionError(f"fusermount3 -u {self.path} failed: {result.stderr.strip()}")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"mount process {self.proc.pid} still running {timeout:g}s after unmount\n{self.log_tail()}"
            ) from None

    def kill(self, detach: bool = True) -> None:
        """SIGKILL the mount process (a crash), then (``detach``) detach the dead mount lazily."""
        self.killed = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log_cut = len(self.log_text())  # what it logged before it died is checked like any mount's log
        if detach:
            _fusermount("-u", "-z", str(self.path))

    def cleanup(self, grace: float = UNMOUNT_TIMEOUT) -> None:
        """Whatever state it is in: unmounted and no process left. Records anything it had to force.

        ``grace``: how long the process may take to exit after the unmount before it is terminated.
        """
        if is_mounted(self.path):
            why = "the mount process had exited but left the mount point attached"
            if self.proc.poll() is None:
                why = "fusermount3 -u: " + _fusermount("-u", str(self.path)).stderr.strip()
            if is_mounted(self.path):
                _fusermount("-u", "-z", str(self.path))
                if not self.killed:
                    self.forced.append(f"could not unmount cleanly ({why}); detached lazily")
        if self.proc.poll() is None:
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.forced.append(f"process did not exit {grace:g}s after unmount; terminated")
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()

    def problems(self, extra_allowed: Sequence[str]) -> list[str]:
        unexpected = [f"unexpected log line: {line}" for line in self.unexpected_log_lines(extra_allowed)]
        if self.killed:  # no clean exit to check, but what it said before the kill counts
            return unexpected
        found = list(self.forced)
        if self.proc.returncode != 0:
            found.append(f"mount process exited with status {self.proc.returncode}")
        return found + unexpected



def object_path(mount: Mount, name: str) -> str:
    """The S3 fault proxy's URL path of ``name``'s object (path-style: /bucket/key), as a rule regex."""
    return re.escape(f"/{mount.bucket}/{mount.key(name)}") + "$"


def s3_bytes(s3: Any, mount: Mount, name: str) -> bytes | None:
    """What S3 holds for ``name`` of ``mount`` (read past the mount), None when nothing."""
    try:
        return bytes(s3.get_object(Bucket=mount.bucket, Key=mount.key(name))["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None

@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (a small disk a test can fill or fault), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
