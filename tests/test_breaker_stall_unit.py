"""The breaker's watchdog (hybridfs/tiers/breaker.py) on a virtual clock: two metadata reads waiting for their answers
make S3 slow after ``slow_after`` (one alone does not); after ``stall_after`` a probe decides: no answer within
``probe_timeout`` opens the breaker and releases the reads still waiting with EIO; an answered probe leaves it
closed (S3 slow, not down)."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from hybridfs.errors import FsError
from hybridfs.tiers.breaker import Breaker, Flight


async def _wait_for_answer(breaker: Breaker, flight: Flight, outcome: list[object]) -> None:
    """A read whose thread sent its request and has no answer (the thread is simulated: it never returns)."""
    flight.sent = trio.current_time()
    try:
        with breaker.watching(flight):
            await trio.sleep_forever()
    except FsError as exc:
        outcome.append(exc)


@pytest.mark.allow_log(r"S3 marked down: HEAD k: no answer for")
def test_a_stalled_read_opens_the_breaker_within_seconds_and_is_released() -> None:
    async def main() -> None:
        breaker = Breaker(clock=trio.current_time)
        probes: list[float] = []

        async def probe() -> bool:  # S3 stalls: the probe gets no answer either
            probes.append(trio.current_time())
            await trio.sleep_forever()
            return True

        outcome: list[object] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(breaker.run, probe)
            nursery.start_soon(_wait_for_answer, breaker, Flight("HEAD k"), outcome)
            await trio.sleep(0.65)  # slow_after, seen at the next look (watch_interval)
            assert not breaker.slow  # one read held up is no sign of S3
            nursery.start_soon(_wait_for_answer, breaker, Flight("LIST k/"), outcome)
            await trio.sleep(0.65)
            assert breaker.slow and breaker.slowed.is_set() and not breaker.is_open  # readers with a fallback
            await trio.sleep(0.8 - 0.05)  # stop waiting
            await trio.sleep(1.0)
            assert breaker.suspect and len(probes) == 1  # stall_after: the probe asks S3
            await trio.sleep(3.0)  # probe_timeout without an answer
            assert breaker.is_open and breaker.status()["released_calls"] == 2
            assert not breaker.slow  # nothing waits any more: calls fail at once
            nursery.cancel_scope.cancel()
        assert len(outcome) == 2 and all(isinstance(exc, FsError) and exc.errno == errno.EIO for exc in outcome)
        assert "S3 marked down while this call waited" in outcome[0].message  # type: ignore[attr-defined]
        assert probes[0] == pytest.approx(2.0, abs=0.15)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_slow_s3_that_answers_the_probe_stays_up_and_is_not_slow_once_a_read_is_answered_in_time() -> None:
    async def main() -> None:
        breaker = Breaker(clock=trio.current_time)

        async def probe() -> bool:  # busy, not down: the probe is answered within probe_timeout
            await trio.sleep(1.5)
            return True

        outcome: list[object] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(breaker.run, probe)
            async with trio.open_nursery() as reads:
                for what in ("HEAD d", "LIST d/"):
                    reads.start_soon(_wait_for_answer, breaker, Flight(what), outcome)
                await trio.sleep(4.0)
                assert breaker.slow and not breaker.is_open and not breaker.suspect
                reads.cancel_scope.cancel()  # both end (late)
            assert breaker.slow  # evidence for late_window
            quick = Flight("HEAD e")
            quick.sent = trio.current_time()
            with breaker.watching(quick):
                quick.answered = quick.sent + 0.05
            assert not breaker.slow and not breaker.slowed.is_set()  # answered in time: S3 is back
            nursery.cancel_scope.cancel()
        assert outcome == []

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
