"""``up`` / ``down`` / ``status`` of the local stack, for one service or all of them."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hybridfs.cli import CliError
from hybridfs.stack import procs
from hybridfs.stack.config import HOST, SERVICES, StackPaths
from hybridfs.stack.kafka import Kafka
from hybridfs.stack.minio import MinIO
from hybridfs.stack.service import Service

DEFAULT_UP_TIMEOUT = 120.0
DEFAULT_DOWN_TIMEOUT = 30.0


def make_services(paths: StackPaths, names: Sequence[str] | None = None) -> list[Service]:
    classes: dict[str, type[Service]] = {"kafka": Kafka, "s3": MinIO}
    return [classes[name](paths) for name in (names or SERVICES)]


@dataclass
class _Starting:
    service: Service
    pid: int
    proc: subprocess.Popen[bytes] | None  # None: it was already running before this `up`
    since: float
    ready_after: float | None = None

    def exit_status(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        return None if procs.is_ours(self.pid, self.service.marker) else -1


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _fail(entry: _Starting, why: str) -> CliError:
    svc = entry.service
    if entry.proc is not None and entry.proc.poll() is None:  # we started it and it never answered: stop it
        procs.stop(entry.pid, svc.marker, timeout=10)
        svc.pid_file.unlink(missing_ok=True)
    for log in dict.fromkeys((svc.out_log, svc.read_log)):
        text = _tail(log)
        if text:
            print(f"--- last lines of {log}:\n{text}\n---", file=sys.stderr)
    return CliError(f"{svc.name} failed to start: {why}; read {svc.read_log}")


def _launch(svc: Service) -> _Starting:
    pid = svc.pid()
    if pid is not None:
        return _Starting(svc, pid, None, time.monotonic())
    svc.pid_file.unlink(missing_ok=True)
    if procs.port_open(HOST, svc.port):
        raise CliError(
            f"{svc.name}: {HOST}:{svc.port} is in use by a process hybridfs did not start"
            f" (no live process in {svc.pid_file}); stop it first"
        )
    svc.prepare()
    proc = svc.start()
    return _Starting(svc, proc.pid, proc, time.monotonic())


def _wait_ready(starting: list[_Starting], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(starting)
    while pending:
        for entry in list(pending):
            status = entry.exit_status()
            if status is not None:
                raise _fail(entry, f"the process exited (status {status})")
            if entry.service.ready():
                entry.ready_after = time.monotonic() - entry.since
                pending.remove(entry)
        if pending and time.monotonic() >= deadline:
            raise _fail(pending[0], f"no answer on {pending[0].service.endpoint} within {timeout:.0f}s")
        if pending:
            time.sleep(0.2)


def _up_line(entry: _Starting, note: str) -> str:
    svc = entry.service
    how = "started" if entry.proc is not None else "already running"
    ready = f", ready in {entry.ready_after:.1f}s" if entry.proc is not None and entry.ready_after is not None else ""
    extra = f"  {note}" if note else ""
    return f"{svc.name:<6} up  ({how}, pid {entry.pid}{ready})  {svc.endpoint}{extra}  log {svc.read_log}"


def up(
    paths: StackPaths, names: Sequence[str] | None = None, timeout: float = DEFAULT_UP_TIMEOUT
) -> list[str]:
    """Start what is not running, wait until everything answers; one status line per service."""
    services = make_services(paths, names)
    with procs.locked(paths.state / "stack.lock"):
        for svc in services:
            svc.install()
        starting = [_launch(svc) for svc in services]
        _wait_ready(starting, timeout)
        return [_up_line(entry, entry.service.on_ready()) for entry in starting]


def down(
    paths: StackPaths, names: Sequence[str] | None = None, timeout: float = DEFAULT_DOWN_TIMEOUT
) -> list[str]:
    """Stop what ``up`` started (pid files only, never by name); one line per service."""
    lines = []
    with procs.locked(paths.state / "stack.lock"):
        for svc in make_services(paths, names):
            pid = svc.pid()
            if pid is None:
                lines.append(f"{svc.name:<6} down (was not running)")
            else:
                how = procs.stop(pid, svc.marker, timeout)
                lines.append(f"{svc.name:<6} down ({how} pid {pid})")
            svc.pid_file.unlink(missing_ok=True)
    return lines


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    answering: bool
    endpoint: str
    log: Path

    @property
    def up(self) -> bool:
        return self.pid is not None and self.answering

    def line(self) -> str:
        if self.pid is None:
            return f"{self.name:<6} down"
        state = "up" if self.answering else "not answering"
        return f"{self.name:<6} {state} (pid {self.pid})  {self.endpoint}  log {self.log}"


def status(paths: StackPaths, names: Sequence[str] | None = None) -> list[ServiceStatus]:
    result = []
    for svc in make_services(paths, names):
        pid = svc.pid()
        answering = pid is not None and svc.ready()
        result.append(ServiceStatus(svc.name, pid, answering, svc.endpoint, svc.read_log))
    return result
