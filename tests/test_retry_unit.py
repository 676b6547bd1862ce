"""The retry policy (hybridfs/retry.py): backoff, jitter, cap, log levels, and the one error classification.

Pure logic: no kernel, no S3, no Kafka; timers run on trio's MockClock.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import botocore.exceptions
import pytest
import trio
import trio.testing
from confluent_kafka import KafkaError, KafkaException

from hybridfs.errors import FsError
from hybridfs.events.topics import KafkaUnavailable
from hybridfs.retry import Policy, Retrying, is_temporary
from hybridfs.tiers.s3 import map_client_error


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response: Any = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, "HeadObject")


def mapped(exc: Exception) -> FsError:
    """What the cloud tier raises for ``exc``: its FsError, chained to the botocore error as _call does."""
    try:
        raise map_client_error(exc, "HEAD k") from exc
    except FsError as err:
        return err


# -- backoff -------------------------------------------------------------------------------------------------


def test_the_ceiling_doubles_up_to_the_cap() -> None:
    policy = Policy(first=0.5, cap=30.0)
    assert [policy.ceiling(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.ceiling(10_000) == 30.0  # no overflow after a very long outage


def test_full_jitter_spans_floor_to_ceiling() -> None:
    policy = Policy(first=1.0, cap=8.0, floor=0.05)
    assert policy.delay(4, rand=lambda: 1.0) == 8.0
    assert policy.delay(4, rand=lambda: 0.5) == 4.0
    assert policy.delay(4, rand=lambda: 0.0) == 0.05  # the floor: a loop that fails at once never spins
    assert policy.delay(50, rand=lambda: 1.0) == 8.0


def test_the_log_level_rises_with_the_failures_in_a_row_and_warns_once() -> None:
    policy = Policy(info_at=2, warn_at=5)
    levels = [policy.level(n) for n in range(1, 9)]
    assert levels == [logging.DEBUG, logging.INFO, logging.INFO, logging.INFO, logging.WARNING,
                      logging.DEBUG, logging.DEBUG, logging.DEBUG]
    quiet = Policy(info_at=3, warn_at=None)
    assert [quiet.level(n) for n in (1, 2, 3, 50)] == [logging.DEBUG, logging.DEBUG, logging.INFO, logging.INFO]


# -- classification ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code,status", [
    ("NoSuchBucket", 404), ("InvalidAccessKeyId", 403), ("SignatureDoesNotMatch", 403), ("InvalidRequest", 400),
    ("AccessDenied", 403), ("EntityTooLarge", 400), ("NotImplemented", 501), ("NoSuchBucket", 0),
])
def test_final_s3_errors_are_never_temporary(code: str, status: int) -> None:
    exc = client_error(code, status)
    assert not is_temporary(exc)
    assert not is_temporary(mapped(exc))  # also through the cloud tier's FsError


@pytest.mark.parametrize("code,status", [
    ("InternalError", 500), ("ServiceUnavailable", 503), ("SlowDown", 503), ("RequestTimeout", 400),
    ("", 502), ("", 0),
])
def test_overload_and_5xx_are_temporary(code: str, status: int) -> None:
    exc = client_error(code, status)
    assert is_temporary(exc) and is_temporary(mapped(exc))


def test_transport_failures_are_temporary_configuration_errors_are_not() -> None:
    down = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert is_temporary(down) and is_temporary(mapped(down))
    assert is_temporary(botocore.exceptions.ReadTimeoutError(endpoint_url="x"))
    assert not is_temporary(botocore.exceptions.NoCredentialsError())
    assert is_temporary(FsError(errno.EIO, "HEAD k: S3 is down; not asking it until it answers a probe"))
    assert not is_temporary(FsError(errno.ENOENT, "gone"))
    assert not is_temporary(FsError(errno.EACCES, "denied"))
    assert not is_temporary(RuntimeError("a bug"))
    assert is_temporary(ConnectionResetError())


def test_kafka_errors_follow_librdkafka_and_the_unreachable_codes() -> None:
    assert is_temporary(KafkaUnavailable("kafka unreachable at x"))
    assert is_temporary(KafkaException(KafkaError(KafkaError._TRANSPORT)))
    assert is_temporary(KafkaException(KafkaError(KafkaError.NOT_CONTROLLER, retriable=True)))
    assert not is_temporary(KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)))
    assert not is_temporary(KafkaException(KafkaError(KafkaError.INVALID_REPLICATION_FACTOR)))


def test_a_wrapper_is_classified_by_its_cause() -> None:
    class S3UploadFailedError(Exception):
        pass

    for inner, want in ((client_error("SlowDown", 503), True), (client_error("AccessDenied", 403), False)):
        try:
            try:
                raise inner
            except botocore.exceptions.ClientError as exc:
                raise S3UploadFailedError("Failed to upload") from exc
        except S3UploadFailedError as outer:
            assert is_temporary(outer) is want


# -- the loop ------------------------------------------------------------------------------------------------


def run(fn: Any) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.allow_log(r"S3 unreachable; tests wait .*5 failures in a row")
def test_call_waits_out_temporary_errors_logs_rising_and_says_when_it_is_back(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.retry")
    outcomes: list[BaseException | None] = [client_error("", 503)] * 6 + [None]

    async def flaky() -> str:
        exc = outcomes.pop(0)
        if exc is not None:
            raise exc
        return "ok"

    async def main() -> tuple[str, float]:
        retry = Retrying(Policy(first=1.0, cap=4.0, warn_at=5), log, "S3 unreachable; tests wait",
                         rand=lambda: 1.0)
        start = trio.current_time()
        result = await retry.call(flaky)
        assert retry.failures == 0 and retry.retries == 6
        return result, trio.current_time() - start

    caplog.set_level(logging.DEBUG, logger="test.retry")
    result, elapsed = run(main)
    assert result == "ok" and elapsed == 1 + 2 + 4 + 4 + 4 + 4
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.DEBUG, logging.INFO, logging.DEBUG, logging.DEBUG, logging.WARNING, logging.DEBUG,
                      logging.INFO]  # INFO and WARNING once each per streak
    assert "S3 unreachable; tests wait" in caplog.records[4].getMessage()
    assert "5 failures in a row" in caplog.records[4].getMessage()
    assert "works again after 6 failures" in caplog.records[-1].getMessage()


def test_call_raises_a_final_error_at_once() -> None:
    async def main() -> None:
        retry = Retrying(Policy(), logging.getLogger("test.retry"), "tests")

        async def no_bucket() -> None:
            raise mapped(client_error("NoSuchBucket", 404))

        with pytest.raises(FsError):
            await retry.call(no_bucket)
        assert retry.retries == 0

    run(main)


@pytest.mark.allow_log(r"background task x failed \(RuntimeError: a bug\)")
def test_a_failure_that_is_not_temporary_but_retried_anyway_is_an_error_with_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    retry = Retrying(Policy(), logging.getLogger("test.retry"), "background task x failed")
    retry.failed(RuntimeError("a bug"))
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "RuntimeError: a bug" in record.getMessage()


@pytest.mark.allow_log(r"hydrations wait \(down\)")
def test_concurrent_callers_back_off_on_their_own_count_and_share_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.retry")
    retry = Retrying(Policy(first=1.0, cap=60.0, warn_at=3), logging.getLogger("test.retry"), "hydrations wait",
                     rand=lambda: 1.0)
    delays = [retry.failed("down", attempt) for attempt in (1, 1, 1, 1, 2, 2, 3, 3, 3)]
    assert delays == [1, 1, 1, 1, 2, 2, 4, 4, 4]  # four callers in a row do not push each other's waits up
    assert retry.failures == 3
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 1


def test_a_quiet_streak_ends_quietly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.retry")
    retry = Retrying(Policy(info_at=3), logging.getLogger("test.retry"), "tests")
    retry.failed("blip")
    retry.succeeded()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


# -- a user of the policy: the abort worker ------------------------------------------------------------------


@pytest.mark.allow_log(r"could not abort the multipart upload u1 of k: .*AccessDenied.*; not retrying")
def test_an_abort_s3_refuses_for_good_is_dropped_one_s3_cannot_answer_stays_pending() -> None:
    from hybridfs.tiers.s3 import CloudStore, S3Settings

    answers = {"u1": client_error("AccessDenied", 403), "u2": client_error("ServiceUnavailable", 503)}
    calls: list[str] = []

    class Client:
        def abort_multipart_upload(self, **kwargs: Any) -> None:
            calls.append(kwargs["UploadId"])
            raise answers[kwargs["UploadId"]]

    store = CloudStore(S3Settings(bucket="b"), client=Client())
    store.schedule_abort("k", "u1")
    store.schedule_abort("k", "u2")
    trio.run(store.retry_aborts)  # one round of the abort worker
    assert calls == ["u1", "u2"]
    assert store.pending_aborts == [("k", "u2")]  # u1: not asked again (before: every minute, for ever)
