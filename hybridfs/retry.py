"""One retry policy for every loop that waits for something to come back (S3, Kafka, a failed service).

* **When to try again**: exponential backoff with full jitter and a cap. The n-th failure in a row waits a
  random time in ``[floor, min(cap, first * factor**(n-1))]`` ("full jitter": mounts that lost S3 at the same
  moment do not all come back at the same moment).
* **How loud**: the count of failures in a row sets the log level, as S3QL's retry logic does: the first ones
  are DEBUG (a blip), at ``info_at`` one INFO, at ``warn_at`` one WARNING (it persists), all others DEBUG — one
  outage is one WARNING, not one per retry — and the first success after an INFO or WARNING says so at INFO.
  A failure that is not temporary but retried anyway (a bug in a service: restarting is all that can be done)
  is an ERROR with its traceback, every time.
* **Whether to try again**: :func:`is_temporary`, the one classification of errors. S3 errors that waiting
  cannot fix (NoSuchBucket, InvalidAccessKeyId, SignatureDoesNotMatch, InvalidRequest, AccessDenied, any other
  4xx) are final; 5xx, throttling, timeouts and connection failures are temporary. Kafka errors are temporary
  when librdkafka says so (retriable) or when they mean Kafka is unreachable
  (:func:`hybridfs.events.topics.is_unreachable_error`).

Why not tenacity or stamina: both wrap one call in a decorator and count towards giving up; our loops retry
forever (a service must outlive any outage), keep state between calls (one WARNING per outage, the INFO when
it ends) and sometimes retry something that is not a call (a pending abort list, a service restart). Expressing
that through their hooks is longer than the ~100 lines here, and their trio support goes through sniffio.
"""

from __future__ import annotations

import errno
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import botocore.exceptions
import trio
from confluent_kafka import KafkaError, KafkaException

from hybridfs.errors import FsError

T = TypeVar("T")

# S3 error codes that are worth waiting for although they are not 5xx (botocore's standard retry mode retries
# the same ones; these are what is left once its attempts are used up).
_TEMPORARY_S3_CODES = frozenset({
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown", "Throttling",
    "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded", "InternalError",
    "ServiceUnavailable", "OperationAborted", "ExpiredToken", "RequestExpired",
})
# S3's answers that no retry changes (every other 4xx is final too; these are also final without a status).
FINAL_S3_CODES = frozenset({
    "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidRequest", "AccessDenied",
    "InvalidBucketName", "AllAccessDisabled", "AccountProblem", "InvalidArgument", "MethodNotAllowed",
    "NotImplemented", "InvalidSecurity", "InvalidToken", "MalformedXML", "PermanentRedirect",
    "AuthorizationHeaderMalformed",
})
# botocore errors raised before any request is sent: a configuration that no retry can fix.
_FINAL_BOTOCORE = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.NoRegionError,
    botocore.exceptions.ParamValidationError,
    botocore.exceptions.UnknownServiceError,
    botocore.exceptions.InvalidConfigError,
)


def is_temporary(exc: BaseException) -> bool:
    """Whether waiting and trying again can help (S3 or Kafka unreachable or overloaded), or not (refused)."""
    verdict = _verdict(exc)
    if verdict is None:
        cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        return cause is not None and is_temporary(cause)
    return verdict


def _verdict(exc: BaseException) -> bool | None:
    """True/False when ``exc`` itself says; None for a wrapper whose cause decides."""
    from hybridfs.events.topics import KafkaUnavailable, is_unreachable_error  # topics imports this module

    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = str(err.get("Code", ""))
        if code in _TEMPORARY_S3_CODES:
            return True
        if code in FINAL_S3_CODES:
            return False
        return not isinstance(status, int) or status >= 500 or (status == 0 and not code)  # else a 4xx answer
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return not isinstance(exc, _FINAL_BOTOCORE)  # the rest are transport failures: connect, read, reset
    if isinstance(exc, KafkaUnavailable):
        return True
    if isinstance(exc, KafkaException):
        kafka_err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        return kafka_err is not None and (is_unreachable_error(kafka_err) or kafka_err.retriable())
    if isinstance(exc, FsError):
        # The cloud tier's EIO wraps the botocore error it maps (raise ... from); an EIO of its own ("S3 is
        # down" from the circuit breaker) is an outage. Any other errno is S3's answer (ENOENT, EACCES, ESTALE).
        if exc.errno != errno.EIO:
            return False
        return None if exc.__cause__ is not None else True
    if isinstance(exc, ConnectionError | TimeoutError | trio.TooSlowError):
        return True
    if type(exc).__name__ == "RetriesExceededError":  # s3transfer gave up on a broken stream
        return True
    if type(exc).__name__ == "S3UploadFailedError":  # boto3 wraps the ClientError of an upload_file
        return None
    return False


@dataclass(frozen=True)
class Policy:
    """How one kind of loop retries: the backoff and the log levels (see the module's docstring)."""

    first: float = 1.0  # the ceiling of the first wait
    cap: float = 60.0  # the ceiling of every wait
    factor: float = 2.0
    floor: float = 0.05  # no wait is shorter: a loop that fails at once never spins
    info_at: int | None = 2  # from this failure in a row on: INFO (said once; before: DEBUG); None: never
    warn_at: int | None = 5  # this failure in a row: one WARNING; None: never (someone else reports the outage)

    def ceiling(self, failures: int) -> float:
        return min(self.cap, self.first * self.factor ** min(max(failures - 1, 0), 64))

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """The wait after the ``failures``-th failure in a row."""
        return max(self.floor, rand() * self.ceiling(failures))

    def level(self, failures: int) -> int:
        if self.warn_at is not None and failures == self.warn_at:
            return logging.WARNING
        if self.info_at is not None and failures >= self.info_at and (self.warn_at is None or failures < self.warn_at):
            return logging.INFO
        return logging.DEBUG


class Retrying:
    """The state of one retry loop: failures in a row, what was said about them, and the waits.

    ``what`` starts each log line (``"S3 unreachable; hydrations wait"``); ``recovered`` is the INFO line of the
    first success after a loud failure (None: ``what`` + "works again").
    """

    def __init__(self, policy: Policy, log: logging.Logger, what: str, *, recovered: str | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self.log = log
        self.what = what
        self.recovered = recovered
        self.rand = rand
        self.failures = 0  # in a row
        self.retries = 0  # all waits so far, for the status and the metrics
        self._said: set[int] = set()  # the levels logged in this streak (INFO and WARNING: once each)

    def failed(self, reason: BaseException | str, attempt: int | None = None) -> float:
        """Count one failure, log it at the level its count earns, return how long to wait.

        ``attempt``: this caller's failures in a row, when several callers share the loop's state (concurrent
        hydrations): each backs off on its own count, the streak is the longest one, and each level is said
        once per streak whoever reaches it.
        """
        self.failures = self.failures + 1 if attempt is None else max(self.failures, attempt)
        self.retries += 1
        delay = self.policy.delay(attempt or self.failures, self.rand)
        unexpected = reason if isinstance(reason, BaseException) and not is_temporary(reason) else None
        level = logging.ERROR if unexpected is not None else self.policy.level(attempt or self.failures)
        if level in self._said and unexpected is None:
            level = logging.DEBUG
        self._said.add(level)
        text = describe(reason) if isinstance(reason, BaseException) else reason
        self.log.log(level, "%s (%s); retrying in %.1fs, %d failure%s in a row", self.what, text, delay,
                     self.failures, "" if self.failures == 1 else "s", exc_info=unexpected)
        return delay

    async def wait(self, reason: BaseException | str, attempt: int | None = None) -> None:
        await trio.sleep(self.failed(reason, attempt))

    def succeeded(self) -> None:
        if any(level >= logging.INFO for level in self._said):
            self.log.info("%s after %d failure%s", self.recovered or f"{self.what}: works again", self.failures,
                          "" if self.failures == 1 else "s")
        self.failures = 0
        self._said.clear()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` until it succeeds; a final error (see :func:`is_temporary`) is raised at once."""
        attempt = 0
        while True:
            try:
                result = await fn()
            except Exception as exc:
                if not is_temporary(exc):
                    raise
                attempt += 1
                await self.wait(exc, attempt)
                continue
            self.succeeded()
            return result


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text and not text.startswith("[") else text or type(exc).__name__
