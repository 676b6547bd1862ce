"""A circuit breaker in front of S3: once S3 is down, say so at once instead of paying a retry cycle per call.

After ``threshold`` consecutive calls failed for outage reasons (connection refused or reset, timeouts, 5xx once
botocore's retries are used up), the breaker *opens*: every call fails at once with EIO, which the namespace
turns into last-known attributes for cached files (contract 5) and writes turn into their bounded EIO. A
background task (``run``) probes S3 every ``probe_interval`` seconds with one request without retries; the
first answer closes the breaker. An S3 answer of any kind (404, 403, 412: S3 is there) counts as a success.

States: CLOSED -(threshold failures, the last one a connection failure or time-out)-> OPEN;
CLOSED -(threshold failures, the last one a 5xx answer)-> SUSPECT: S3 answered, so the failures may be
request-scoped (one UploadPart refused twice). SUSPECT probes at once, calls still go to S3: an answer makes it
CLOSED again (failures forgotten), no answer makes it OPEN. OPEN -(a probe answered)-> CLOSED. A mount that
starts while the start-up check found S3 unreachable starts OPEN (``start_down``).

Threads: all state belongs to the trio thread (``CloudStore._call`` reports outcomes after its worker thread
returned); nothing here blocks.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable

import botocore.exceptions
import trio

from hybridfs.errors import FsError

log = logging.getLogger("hybridfs.s3")

_OUTAGE_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ProxyConnectionError,
    botocore.exceptions.HTTPClientError,
)


def is_outage(exc: BaseException) -> bool | None:
    """True: S3 did not answer usably (count it); False: S3 answered (it is up); None: says nothing about S3."""
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return bool(isinstance(status, int) and status >= 500)
    if isinstance(exc, _OUTAGE_ERRORS):
        return True
    return None


class Breaker:
    def __init__(self, *, threshold: int = 2, probe_interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.probe_interval = probe_interval
        self.clock = clock
        self.failures = 0  # consecutive outage failures
        self.is_open = False
        self.suspect = False  # threshold reached by 5xx answers: a probe decides (see the module's states)
        self.opened_at: float | None = None
        self.trips = 0
        self.refused = 0  # calls failed at once while open
        self.last_error = ""
        self._wake = trio.Event()  # set on OPEN or SUSPECT: the run task has a probe to make

    def check(self, what: str) -> None:
        """Before a call: EIO at once while S3 is known to be down."""
        if self.is_open:
            self.refused += 1
            raise FsError(errno.EIO, f"{what}: S3 is down ({self.last_error}); not asking it until it answers a "
                                     "probe", level=logging.INFO)

    def success(self) -> None:
        self.failures = 0
        self.suspect = False
        if self.is_open:
            self._close()

    def observe(self, exc: BaseException) -> None:
        """After a failed call (botocore's retries used up)."""
        outage = is_outage(exc)
        if outage is None:
            return
        if not outage:
            self.success()
            return
        self.failures += 1
        self.last_error = str(exc)[:200]
        if self.is_open or self.failures < self.threshold:
            return
        if isinstance(exc, botocore.exceptions.ClientError):
            if not self.suspect:
                self.suspect = True
                self._wake.set()
            return
        self._open()

    def start_down(self, reason: str) -> None:
        """Start OPEN: the start-up check found S3 unreachable and has said so at WARNING (``--offline-start``).
        Calls fail at once from the first one, and the outage is not announced a second time when the first
        calls fail; a probe closes the breaker at S3's first answer, as after any trip."""
        self.last_error = reason[:200]
        self.suspect = False
        self.is_open = True
        self.opened_at = self.clock()
        self.trips += 1
        self._wake.set()
        log.info("S3 starts marked down (%s); calls fail at once until a probe answers (every %.0fs)",
                 self.last_error, self.probe_interval)

    def _open(self) -> None:
        self.suspect = False
        self.is_open = True
        self.opened_at = self.clock()
        self.trips += 1
        self._wake.set()
        log.warning("S3 marked down after %d failed calls in a row (%s); calls fail at once until a probe "
                    "answers (every %.0fs)", self.failures, self.last_error, self.probe_interval)

    def _close(self) -> None:
        down = self.clock() - self.opened_at if self.opened_at is not None else 0.0
        self.is_open = False
        self.opened_at = None
        self.failures = 0
        log.info("S3 answers again (it was marked down for %.1fs)", down)

    async def run(self, probe: Callable[[], Awaitable[bool]]) -> None:
        """Background task: a SUSPECT breaker probes at once; an OPEN one every ``probe_interval`` seconds
        until the first answer closes it."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self.suspect and not self.is_open:
                answered = await self._probe(probe)
                if not self.suspect:  # a call succeeded meanwhile
                    continue
                self.suspect = False
                if answered:
                    log.debug("S3 answered a probe after %d failed calls in a row: those requests failed, S3 is "
                              "up (%s)", self.failures, self.last_error)
                    self.failures = 0
                else:
                    self._open()
            while self.is_open:
                await trio.sleep(self.probe_interval)
                if await self._probe(probe) and self.is_open:
                    self._close()

    @staticmethod
    async def _probe(probe: Callable[[], Awaitable[bool]]) -> bool:
        try:
            return await probe()
        except Exception as exc:  # a probe must never end the mount
            log.debug("S3 probe failed: %s", exc)
            return False

    def status(self) -> dict[str, object]:
        return {
            "state": "open" if self.is_open else "suspect" if self.suspect else "closed",
            "down_seconds": round(self.clock() - self.opened_at, 1) if self.opened_at is not None else None,
            "consecutive_failures": self.failures,
            "trips": self.trips,
            "refused_calls": self.refused,
            "last_error": self.last_error or None,
        }
