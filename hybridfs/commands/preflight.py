"""Checks made before anything is mounted, so a misconfiguration is one line and a non-zero exit at once instead
of errors on first access: the bucket exists, the credentials are accepted, the endpoint answers.

One ListObjectsV2 of the mount's prefix (``MaxKeys=1``) rather than a HEAD of the bucket: the mount needs to list
anyway, a prefix-scoped policy may allow that and not a HEAD of the bucket, and, unlike a HEAD, its error body
names the cause (``NoSuchBucket``, ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ``AccessDenied``). Bounded:
two attempts with short timeouts, and ``CHECK_TIMEOUT`` in all (``RESTART_CHECK_TIMEOUT`` when the cache has served
before: that start mounts anyway, with the breaker open). A 5xx answer (503 SlowDown) is an outage, not a refusal.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

from hybridfs.config import MountConfig, bucket_and_prefix

CHECK_TIMEOUT = 15.0
# A restart (the cache has served this mount before) mounts anyway when S3 does not answer, with the breaker open:
# waiting the whole CHECK_TIMEOUT for a stalled S3 would only keep the cached files away that much longer. The
# breaker's probe (every 2 s) closes it at S3's first answer.
RESTART_CHECK_TIMEOUT = 5.0


class Fatal(Exception):
    """The mount must not start: the message is the one line to print."""


class Unreachable(Exception):
    """The endpoint did not answer (S3 down, or a wrong endpoint): fatal unless ``--offline-start``."""


def check_s3(cfg: MountConfig, timeout: float = CHECK_TIMEOUT) -> None:
    """Raise Fatal or Unreachable (one-line messages); return when S3 answered the listing."""
    import botocore.exceptions

    from hybridfs.tiers.s3 import S3Settings, make_client

    bucket, prefix = bucket_and_prefix(cfg.source)
    endpoint = cfg.endpoint_url or "the default AWS endpoint"
    settings = S3Settings(bucket=bucket, endpoint_url=cfg.endpoint_url or None, region=cfg.region or None,
                          max_attempts=2, connect_timeout=min(cfg.s3_connect_timeout, 5.0),
                          read_timeout=min(cfg.s3_read_timeout, 10.0), threads=1)
    answer: queue.Queue[BaseException | None] = queue.Queue()

    def probe() -> None:
        try:
            client = make_client(settings)
            client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
        except BaseException as exc:  # handed to the caller, who decides
            answer.put(exc)
        else:
            answer.put(None)

    # A daemon thread, so a stalled endpoint cannot keep the process from exiting after the one-line error.
    threading.Thread(target=probe, name="s3-preflight", daemon=True).start()
    try:
        exc = answer.get(timeout=timeout)
    except queue.Empty:
        raise Unreachable(f"S3 endpoint {endpoint} did not answer within {timeout:g}s") from None
    if exc is None:
        return
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if isinstance(status, int) and status >= 500:  # 503 SlowDown, 500: S3 is there but failing, an outage
            raise Unreachable(f"S3 endpoint {endpoint} unavailable: {_client_error(exc, bucket, prefix, endpoint)}"
                              ) from None
        raise Fatal(_client_error(exc, bucket, prefix, endpoint)) from None
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        raise Fatal("no AWS credentials found (environment, shared config/profile or instance role)") from None
    if isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
        raise Unreachable(f"S3 endpoint {endpoint} unreachable: {exc}") from None
    raise exc


def _client_error(exc: Any, bucket: str, prefix: str, endpoint: str) -> str:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
    where = f"s3://{bucket}/{prefix}".rstrip("/")
    if code == "NoSuchBucket":
        return f"bucket {bucket!r} does not exist at {endpoint} (NoSuchBucket)"
    if code == "InvalidAccessKeyId":
        return f"S3 at {endpoint} does not know the access key (InvalidAccessKeyId): check the AWS credentials"
    if code == "SignatureDoesNotMatch":
        return f"S3 at {endpoint} refused the credentials (SignatureDoesNotMatch): wrong secret key?"
    if code in ("AccessDenied", "403", "AllAccessDisabled"):
        return f"S3 denies listing {where} ({code}): the credentials need s3:ListBucket on it"
    return f"S3 at {endpoint} refused listing {where}: {code} ({err.get('Message', '')})"


# -- the kernel's FUSE request timeout (Linux >= 6.14) -----------------------------------------------------------

FUSE_SYSCTLS = Path("/proc/sys/fs/fuse")
FUSE_TIMER = 15  # seconds between the kernel's checks for overdue requests (FUSE_TIMEOUT_TIMER_FREQ)


def fuse_request_timeout(sysctls: Path = FUSE_SYSCTLS) -> tuple[str, int] | None:
    """The timeout the kernel will give a new mount that sets none itself (hybridfs sets none), and the sysctl it
    comes from; None when there is none (0, or a kernel without these sysctls). The ceiling applies alone too
    (measured: max_request_timeout 20 with the default at 0 aborted a mount whose close waited 30 s). A request
    left unanswered that long aborts the whole connection: every later access fails with ENOTCONN until a
    remount."""
    default = _read_uint(sysctls / "default_request_timeout")
    ceiling = _read_uint(sysctls / "max_request_timeout")
    if ceiling and (not default or default > ceiling):  # the ceiling applies to the default too
        return "fs.fuse.max_request_timeout", ceiling
    if default:
        return "fs.fuse.default_request_timeout", default
    return None


def check_fuse_request_timeout(cfg: MountConfig, sysctls: Path = FUSE_SYSCTLS) -> str | None:
    """The warning to log when the kernel would abort the mount before hybridfs answers a request that waits
    for S3, or None. Two waits bound a request today: a close()/fsync() waits for its upload up to
    ``--write-timeout``; any request that calls S3 while it stalls waits for that call, up to
    ``--s3-max-attempts`` x (``--s3-connect-timeout`` + ``--s3-read-timeout``) (measured: 120 s with the
    defaults, for lookups, listings, reads of uncached files, mkdir, unlink, rename) until the breaker marks S3
    down. Read once at mount time, as the kernel does."""
    found = fuse_request_timeout(sysctls)
    s3_call = cfg.s3_max_attempts * (cfg.s3_connect_timeout + cfg.s3_read_timeout)
    # The kernel raises a timeout under its 15 s timer to 15 s (and aborts up to 15 s late).
    if found is None or max(found[1], FUSE_TIMER) > max(cfg.write_timeout, s3_call):
        return None
    name, seconds = found
    return (f"{name} is {seconds}s, not above what a request may wait for S3 (--write-timeout "
            f"{cfg.write_timeout:g}s; an S3 call that stalls: {cfg.s3_max_attempts} attempts x "
            f"({cfg.s3_connect_timeout:g}s connect + {cfg.s3_read_timeout:g}s read) = {s3_call:g}s): the kernel "
            f"would abort this mount (Transport endpoint is not connected); raise the sysctl (0: off) or lower "
            f"those options")


def _read_uint(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0  # no such sysctl (a kernel before 6.14): no timeout


def warn_fuse_request_timeout(cfg: MountConfig) -> None:
    """Called once as the mount starts: one WARNING line when the kernel's request timeout is too short."""
    warning = check_fuse_request_timeout(cfg)
    if warning is not None:
        logging.getLogger("hybridfs.mount").warning("%s", warning)
