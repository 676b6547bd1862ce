"""Processes the stack starts: detached start, pid files, identity checks, stop with a deadline.

A process counts as "ours" only if its pid file names it AND one of its arguments is a marker (a path inside
our state directory), so a recycled pid or a stranger's process is never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def write_pid(pid_file: Path, pid: int) -> None:
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(pid_file)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def is_ours(pid: int, marker: str) -> bool:
    """True if ``pid`` is alive (not a zombie) and one of its command-line arguments is exactly ``marker``."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return marker in args and not _is_zombie(pid)


def live_pid(pid_file: Path, marker: str) -> int | None:
    """The pid recorded in ``pid_file`` if that process is alive and ours, else None."""
    pid = read_pid(pid_file)
    return pid if pid is not None and is_ours(pid, marker) else None


def start_detached(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, output appended to ``log_path``, so it outlives this process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )


def _reap(pid: int) -> None:
    """Collect ``pid`` if it happens to be our child (the process that started it also stops it)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def wait_gone(pid: int, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not is_ours(pid, marker):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _signal(pid: int, sig: int) -> None:
    """Signal the process group ``pid`` leads (we started it in a new session), else just the process."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop(pid: int, marker: str, timeout: float) -> str:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns how it ended: "stopped" or "killed".

    The caller has checked that ``pid`` is ours (``is_ours``) just before.
    """
    _signal(pid, signal.SIGTERM)
    if wait_gone(pid, marker, timeout):
        return "stopped"
    _signal(pid, signal.SIGKILL)
    wait_gone(pid, marker, 10.0)
    return "killed"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Serialise ``up``/``down`` between concurrent invocations (tests, several shells)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
