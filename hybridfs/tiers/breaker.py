"""A circuit breaker in front of S3: once S3 is down, say so at once instead of paying a retry cycle per call.

S3 fails in two ways. Some faults fail fast (connection refused or reset, a name that does not resolve): botocore's
retries end in an error within a second or so, and the breaker counts those errors. Others fail slowly (a stall:
the connection is taken and no answer comes; an S3 that answers after tens of seconds; 503 SlowDown, which
botocore retries with a growing backoff): each request would wait its read timeout or its backoff,
``--s3-max-attempts`` times (4 x 30 s for a stall), before anything is counted. For those the breaker watches the
reads in flight instead (HEAD, LIST, a GET until its answer begins). ``slow_reads`` HEADs or LISTs without an answer
for ``slow_after`` seconds make S3 *slow*; any watched read without one for ``stall_after`` seconds makes the breaker
ask S3 itself, with a probe bounded by ``probe_timeout``. No answer to the probe either: S3 is down, the breaker
opens, and the reads still waiting are released with EIO (their threads are abandoned; their requests go on until
botocore gives up). A busy S3 that answers the probe is not down, only slow.

While S3 is slow the namespace serves what it knows (last known attributes and listings, cached bytes) without
waiting for S3, and its questions go on in the background; while the breaker is open every call fails at once
with EIO, which the namespace turns into the same last-known answers for what the mount holds (contract 5) and
writes turn into their bounded EIO. Writes are never released early: they keep their own bound,
``--write-timeout``, and the clean-up that goes with it (a multipart upload aborted, nothing partial left).

States (``slow`` is a flag beside them: it says how long a caller with a fallback should wait, not whether to ask):

    CLOSED --threshold failures in a row, the last a connection failure or time-out--> OPEN
    CLOSED --threshold failures in a row, the last a 5xx answer--> SUSPECT
    CLOSED --a watched read without an answer for stall_after (at most one probe per probe_interval)--> SUSPECT
    SUSPECT (probes at once; calls still go to S3) --the probe answered--> CLOSED (failures forgotten; a stall
                                                                            probed again after probe_interval)
    SUSPECT --no answer within probe_timeout--> OPEN (waiting reads released with EIO)
    OPEN (every call: EIO at once; a probe every probe_interval) --a probe answered--> CLOSED
    start_down (the start-up check found S3 unreachable) --> OPEN

    slow: while slow_reads HEADs/LISTs have each waited slow_after for their answers, in flight now or, within
    late_window, ended so late or failed for an outage reason; a HEAD/LIST answered in time ends it. Reads
    released when the breaker opens count no more: an OPEN breaker is not slow, it fails at once.

An S3 answer of any kind (404, 403, 412: S3 is there) counts as a success.

Threads: all state belongs to the trio thread. ``CloudStore._call`` reports outcomes after its worker thread
returned; the one thing a worker thread writes is its ``Flight``'s two timestamps (single float stores, read by
the watchdog: when the request was sent, when its answer began). Nothing here blocks.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

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


class Flight:
    """One watched read in flight. Its worker thread stamps ``sent`` as it starts the request and ``answered``
    when S3's answer begins (a GET: its headers are in; any other call: it returned), with ``time.monotonic``
    (the breaker's clock outside unit tests); the watchdog only reads them."""

    __slots__ = ("answered", "meta", "released", "scope", "sent", "what")

    def __init__(self, what: str, *, meta: bool = True) -> None:
        self.what = what
        # A metadata read (HEAD, LIST): what stats and listings wait on, so its wait alone makes S3 slow. A GET's
        # wait only makes the breaker probe (a download held up is no sign that metadata is).
        self.meta = meta
        self.sent: float | None = None
        self.answered: float | None = None
        self.scope: trio.CancelScope | None = None  # trio side: cancelled to release the caller (S3 down)
        self.released = False

    def send(self) -> None:
        self.sent = time.monotonic()

    def answer(self) -> None:
        if self.answered is None:
            self.answered = time.monotonic()

    def waiting(self, now: float) -> float:
        """How long it has waited for S3's answer so far (0 before it was sent and once answered)."""
        if self.sent is None or self.answered is not None:
            return 0.0
        return max(0.0, now - self.sent)


class Breaker:
    def __init__(self, *, threshold: int = 2, probe_interval: float = 2.0, slow_after: float = 0.5,
                 slow_reads: int = 2, late_window: float = 5.0, stall_after: float = 2.0, probe_timeout: float = 3.0,
                 watch_interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.probe_interval = probe_interval
        # A read without an answer for slow_after makes S3 slow (callers with a fallback stop waiting: the first
        # stat of an outage costs slow_after, well inside the 2 s a program or the availability bench gives it;
        # a healthy S3 answers a HEAD in milliseconds). For stall_after, a probe bounded by probe_timeout decides
        # whether S3 is down: probe_timeout is above what a busy S3 takes for one HEAD (the bench's slow S3
        # answers in 2 s: slow, not down), far below the read timeout (30 s).
        self.slow_after = slow_after
        self.slow_reads = slow_reads
        self.late_window = late_window
        self._late: collections.deque[float] = collections.deque()  # when metadata reads ended slow_after late
        self.stall_after = stall_after
        self.probe_timeout = probe_timeout
        self.watch_interval = watch_interval
        self.clock = clock
        self.flights: set[Flight] = set()
        self.slow = False
        self.slowed = trio.Event()  # set while slow: callers waiting with a fallback at hand stop waiting
        self.stalled: str | None = None  # SUSPECT because of this read's wait, not of failures
        self._stall_probed_at: float | None = None
        self._watching = trio.Event()  # set when a flight starts: the watchdog has something to watch
        self.released = 0  # reads released with EIO when the breaker opened
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
        self.stalled = None
        if self.is_open:
            self._close()

    @contextlib.contextmanager
    def watching(self, flight: Flight) -> Iterator[Flight]:
        """Around a watched read (trio side): its wait counts towards slow and stalled, and it is released with
        EIO when the breaker opens before S3's answer began."""
        with trio.CancelScope() as scope:
            flight.scope = scope
            self.flights.add(flight)
            self._watching.set()
            self._judge_slow()  # old evidence expires before this read's caller decides how long to wait
            try:
                yield flight
            except BaseException as exc:
                outage = is_outage(exc.__cause__) if isinstance(exc, FsError) and exc.__cause__ else None
                self._ended(flight, answered=outage is False, failed=outage is True)
                raise
            else:
                self._ended(flight, answered=True)
            finally:
                self.flights.discard(flight)
                self._judge_slow()
        if scope.cancelled_caught:
            waited = self.clock() - flight.sent if flight.sent is not None else 0.0
            raise FsError(errno.EIO, f"{flight.what}: S3 marked down while this call waited {waited:.1f}s for its "
                                     f"answer ({self.last_error})", level=logging.INFO)

    def _ended(self, flight: Flight, *, answered: bool, failed: bool = False) -> None:
        """A metadata read that failed for an outage reason, or took slow_after or longer, is evidence for
        ``late_window`` seconds; one S3 answered in time (404 included) ends all evidence so far."""
        if not flight.meta or flight.released or flight.sent is None:
            return
        end = flight.answered if answered and flight.answered is not None else self.clock()
        if failed or end - flight.sent >= self.slow_after:
            self._late.append(self.clock())
        elif answered:
            self._late.clear()

    def _judge_slow(self) -> None:
        """Slow while ``slow_reads`` metadata reads have each waited ``slow_after`` for their answers, counting those
        in flight and, within ``late_window``, those that ended so late or failed for an outage reason: one held
        request is no sign of S3 (a large listing, one busy disk behind it); a stat asks two at once (HEAD of the
        file, LIST below it), so the first stat of a stall makes S3 slow, and 503s whose retries end at random
        times count as they end."""
        now = self.clock()
        while self._late and now - self._late[0] > self.late_window:
            self._late.popleft()
        overdue = [f for f in self.flights if f.meta and f.waiting(now) >= self.slow_after]
        evidence = len(overdue) + len(self._late)
        if evidence >= self.slow_reads and not self.slow:
            self.slow = True
            self.slowed.set()
            log.info("S3 slow: %d reads without an answer for %gs (%d in flight%s); readers of what the mount knows "
                     "stop waiting for S3 meanwhile", evidence, self.slow_after, len(overdue),
                     f": {overdue[0].what}, ..." if overdue else "")
        elif evidence < self.slow_reads and self.slow:
            self._not_slow()
            log.debug("S3 not slow any more: %d reads without an answer for %gs", evidence, self.slow_after)

    def _not_slow(self) -> None:
        if self.slow:
            self.slow = False
            self.slowed = trio.Event()

    async def _watchdog(self) -> None:
        """Looks at the reads in flight every ``watch_interval`` while there are any (threads stamp them, so
        there is no event to wait for): slow after ``slow_after``, a probe after ``stall_after``."""
        while True:
            await self._watching.wait()
            self._watching = trio.Event()
            while self.flights:
                self._look()
                await trio.sleep(self.watch_interval)

    def _look(self) -> None:
        self._judge_slow()
        now = self.clock()
        oldest = max(self.flights, key=lambda f: f.waiting(now))
        waited = oldest.waiting(now)
        if (waited >= self.stall_after and not self.is_open and not self.suspect
                and (self._stall_probed_at is None or now - self._stall_probed_at >= self.probe_interval)):
            self._stall_probed_at = now
            self.suspect = True
            self.stalled = f"{oldest.what}: no answer for {waited:.1f}s"
            self._wake.set()

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
        stalled, self.stalled = self.stalled, None
        self.suspect = False
        self.is_open = True
        self.opened_at = self.clock()
        self.trips += 1
        self._wake.set()
        if stalled is not None:
            self.last_error = f"{stalled}, and none to a probe within {self.probe_timeout:g}s"
            log.warning("S3 marked down: %s; calls fail at once until a probe answers (every %.0fs)",
                        self.last_error, self.probe_interval)
        else:
            log.warning("S3 marked down after %d failed calls in a row (%s); calls fail at once until a probe "
                        "answers (every %.0fs)", self.failures, self.last_error, self.probe_interval)
        self._release()

    def _release(self) -> None:
        """The reads still waiting for an answer fail now with EIO instead of after botocore's retry cycle."""
        for flight in list(self.flights):
            if flight.answered is None and flight.scope is not None and not flight.released:
                flight.released = True
                self.released += 1
                flight.scope.cancel()

    def _close(self) -> None:
        down = self.clock() - self.opened_at if self.opened_at is not None else 0.0
        self.is_open = False
        self.opened_at = None
        self.failures = 0
        self._late.clear()
        self._not_slow()
        log.info("S3 answers again (it was marked down for %.1fs)", down)

    async def run(self, probe: Callable[[], Awaitable[bool]]) -> None:
        """Background task: the watchdog of reads in flight; a SUSPECT breaker probes at once; an OPEN one every
        ``probe_interval`` seconds until the first answer closes it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watchdog)
            await self._prober(probe)

    async def _prober(self, probe: Callable[[], Awaitable[bool]]) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self.suspect and not self.is_open:
                answered = await self._probe(probe)
                if not self.suspect:  # a call succeeded meanwhile
                    continue
                self.suspect = False
                if answered and self.stalled is not None:
                    log.debug("S3 answered a probe while %s: S3 is slow, not down", self.stalled)
                    self.stalled = None
                elif answered:
                    log.debug("S3 answered a probe after %d failed calls in a row: those requests failed, S3 is "
                              "up (%s)", self.failures, self.last_error)
                    self.failures = 0
                else:
                    self._open()
            while self.is_open:
                await trio.sleep(self.probe_interval)
                if await self._probe(probe) and self.is_open:
                    self._close()

    async def _probe(self, probe: Callable[[], Awaitable[bool]]) -> bool:
        with trio.move_on_after(self.probe_timeout):
            try:
                return await probe()
            except Exception as exc:  # a probe must never end the mount
                log.debug("S3 probe failed: %s", exc)
                return False
        log.debug("S3 probe: no answer within %gs", self.probe_timeout)
        return False

    def status(self) -> dict[str, object]:
        return {
            "state": "open" if self.is_open else "suspect" if self.suspect else "closed",
            "slow": self.slow,
            "reads_in_flight": len(self.flights),
            "released_calls": self.released,
            "down_seconds": round(self.clock() - self.opened_at, 1) if self.opened_at is not None else None,
            "consecutive_failures": self.failures,
            "trips": self.trips,
            "refused_calls": self.refused,
            "last_error": self.last_error or None,
        }
