"""Supervised background tasks: nothing that runs in the background can end the mount.

A trio nursery re-raises whatever a child task raises (wrapped in an ``ExceptionGroup``) and cancels every other
child — for the mount's nursery that means unmounting. So every background task of the mount is started through
a ``Supervisor``: a task that fails is logged once (with its traceback, since any exception reaching here is a
bug or an unmapped error) and ends alone; a long-lived service that fails after it started is restarted with a
growing delay (hybridfs/retry.py). Cancellation is never swallowed: it is how the mount shuts its tasks down.

Request-serving work records its error on the request instead (the caller gets the errno); what reaches the
supervisor is what nobody waits for: part uploads, read-ahead fetches, prefetches, housekeeping, services.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from hybridfs.retry import Policy

log = logging.getLogger("hybridfs.tasks")

# Restarts of a failed service: the retry policy's backoff (1 s doubling to a minute, jittered). Always logged as
# an ERROR with its traceback (``_record``): what reaches the supervisor is a bug, whatever its count.
RESTART = Policy(first=1.0, cap=60.0)


def _parse_failpoints(text: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = item.partition(":")
        points[name] = int(count) if count.isdigit() else 1
    return points


# Fault injection for the test suite: HYBRIDFS_FAILPOINTS="part:1,fetch:2" makes the next 1 part upload and the
# next 2 chunk fetches raise an unexpected exception (a stand-in for any bug), to prove that no task can end the
# mount. Unset in production; each site is one dictionary lookup.
_FAILPOINTS = _parse_failpoints(os.environ.get("HYBRIDFS_FAILPOINTS", ""))


class FailpointError(RuntimeError):
    """Raised by an armed failpoint."""


def failpoint(name: str) -> None:
    left = _FAILPOINTS.get(name)
    if left:
        _FAILPOINTS[name] = left - 1
        log.info("failpoint %s fires", name)
        raise FailpointError(f"failpoint {name}")


class Spawner(Protocol):
    """What the core needs to run work in the background (a ``Supervisor``; a bare nursery in unit tests)."""

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None) -> None: ...


def split_errors(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """``exc`` as (the errors to log, the rest to re-raise: Cancelled, KeyboardInterrupt, SystemExit)."""
    if isinstance(exc, BaseExceptionGroup):
        errors, rest = exc.split(Exception)
        return errors, rest
    if isinstance(exc, Exception):
        return exc, None
    return None, exc


def describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


class Supervisor:
    """Starts tasks in ``nursery`` so that their failures are logged, counted and contained."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.failures = 0
        self.restarts = 0
        self.last_failure: str | None = None

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None) -> None:
        label = str(name or getattr(fn, "__qualname__", fn))
        self.nursery.start_soon(self._guard, fn, args, label, name=label)

    async def start(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None) -> Any:
        """Start a service (``async def run(..., task_status)``) and wait until it says it is ready.

        A failure before it is ready is raised here (start-up errors stay explicit); a failure afterwards is
        logged and the service is started again after the retry policy's delay (doubling up to a minute).
        """
        label = str(name or getattr(fn, "__qualname__", fn))
        return await self.nursery.start(self._service, fn, args, label, name=label)

    async def _guard(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], label: str) -> None:
        try:
            await fn(*args)
        except BaseException as exc:
            errors, rest = split_errors(exc)
            if errors is not None:
                self._record(label, errors, "ended")
            if rest is not None:
                raise rest from None

    async def _service(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], label: str, *,
                       task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        started = False

        class Relay:
            def started(self, value: Any = None) -> None:
                nonlocal started
                started = True
                task_status.started(value)

        failures = 0  # in a row: a service that then ran for longer than the longest wait starts counting anew
        while True:
            began = trio.current_time()
            try:
                await fn(*args, task_status=Relay() if not started else trio.TASK_STATUS_IGNORED)
                return
            except BaseException as exc:
                errors, rest = split_errors(exc)
                if rest is not None or not started:
                    raise
                assert errors is not None
                failures = 1 if trio.current_time() - began > RESTART.cap else failures + 1
                delay = RESTART.delay(failures)
                self._record(label, errors, f"restarting in {delay:.1f}s")
            await trio.sleep(delay)
            self.restarts += 1

    def _record(self, label: str, errors: BaseException, outcome: str) -> None:
        self.failures += 1
        self.last_failure = f"{label}: {describe(errors)}"
        log.error("background task %s failed (%s); %s — the mount goes on", label, describe(errors), outcome,
                  exc_info=errors)

    def status(self) -> dict[str, object]:
        return {"failures": self.failures, "restarts": self.restarts, "last_failure": self.last_failure}
