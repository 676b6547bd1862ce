"""The cloud tier: one S3 bucket through boto3, the source of truth for data and namespace.

Every boto3 call is blocking, so each runs in a worker thread behind a CapacityLimiter; the trio loop never waits
on the network. Metadata calls (HEAD, LIST) have a limiter of their own, ``s3-meta``: a GET streaming a whole
object holds its thread for seconds, and a wave of them (hydrations, cold reads, uploads) must never make a stat
or an open wait for a thread. Retries of throttling, 5xx and connection failures are botocore's (standard mode,
exponential backoff with jitter); once they are used up the error maps to an errno here, in one place.

Writes that replace an object are conditional (``Condition``: If-Match the ETag the new content was based on, or
If-None-Match for a new file), so an upload whose caller was already told it failed, and which S3 only processes
later, can never overwrite a newer version. Each such write carries a token in its metadata, so a retry whose
first attempt did land (botocore retries after a reset) is recognised as ours rather than as a conflict.

Multipart uploads are recorded in an ``UploadJournal`` while open; aborts run in the background
(``run_aborts``), retried until S3 answers, so a failing close never waits for one.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import email.utils
import errno
import functools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers
import botocore.session
import google_crc32c
import trio
from boto3.s3.transfer import TransferConfig
from s3transfer.exceptions import S3CopyFailedError

from hybridfs.errors import FsError, errno_name
from hybridfs.retry import Policy, Retrying, is_temporary
from hybridfs.tiers.breaker import Breaker, Flight, is_outage
from hybridfs.tiers.s3listing import KEY as LISTED_METADATA
from hybridfs.tiers.s3listing import MetadataListing
from hybridfs.tiers.uploads import UploadJournal

log = logging.getLogger("hybridfs.s3")

T = TypeVar("T")

# S3 refuses single PUT and CopyObject above 5 GiB; multipart parts are 5 MiB..5 GiB, at most 10,000 of them.
MAX_SINGLE_OBJECT = 5 * 1024**3
MIN_PART_SIZE = 5 * 1024**2
MAX_PARTS = 10_000
# Seconds between a version's Last-Modified and an answer about it after which no later version can share its
# Last-Modified second (both are whole seconds; one more for a request that straddles a second).
SETTLED_AFTER = 2.0
WRITE_TOKEN = "hybridfs-write"  # x-amz-meta-hybridfs-write: which upload stored this version
# Pending aborts: INFO at once (an upload is left open meanwhile), WARNING once S3 stays away (~10 s).
ABORT_RETRY = Policy(first=1.0, cap=60.0, info_at=1, warn_at=4)
# Operations (the first word of a call's ``what``) that run behind the metadata limiter: short requests that a stat,
# a lookup or an `ls` waits on. Everything else (GET, PUT, parts, COPY, DELETE, ...) runs behind the bulk one.
METADATA_OPERATIONS = frozenset({"HEAD", "LIST"})
# Reads whose wait for an answer the breaker watches (a stall is seen in seconds, not after the read timeout) and
# releases with EIO when it opens. Writes are not: they have --write-timeout and their own clean-up.
WATCHED_OPERATIONS = METADATA_OPERATIONS | {"GET"}


class WriteConflict(FsError):
    """S3 refused a conditional write: the object is no longer the version the write was based on."""


@dataclass(frozen=True)
class Condition:
    """What S3 must hold for a write to land: exactly ``etag``, or (``etag`` None) no object at all."""

    etag: str | None

    def args(self) -> dict[str, str]:
        return {"IfMatch": f'"{self.etag}"'} if self.etag else {"IfNoneMatch": "*"}

    def __str__(self) -> str:
        return f"ETag {self.etag}" if self.etag else "no object"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    mtime_ns: int
    # User metadata (x-amz-meta-*, lower-case names without the prefix); None when the object came from a
    # listing, which does not carry metadata.
    metadata: dict[str, str] | None = None
    # A HEAD's answer given a whole second or more after this version was written (S3's Date against its
    # Last-Modified): any later version (a copy onto itself that changed only the metadata keeps the ETag) has a
    # later Last-Modified second, so a listing showing this ETag and second lists this very version.
    settled: bool = False


@dataclass(frozen=True)
class Part:
    """One uploaded part of a multipart upload, as CompleteMultipartUpload must name it."""

    number: int
    etag: str
    checksum: str  # base64 CRC32C of the part's bytes (the upload was created with ChecksumAlgorithm CRC32C)


def crc32c_b64(data: bytes | bytearray | memoryview) -> str:
    """The x-amz-checksum-crc32c value of ``data``: S3 refuses the request when the bytes it got differ."""
    return base64.b64encode(int(google_crc32c.value(data)).to_bytes(4, "big")).decode()


@dataclass
class Listing:
    files: list[ObjectInfo] = field(default_factory=list)
    subdirs: list[str] = field(default_factory=list)  # child names (not keys)
    has_marker: bool = False  # the ``dir/`` marker object exists
    # Whether the store listed the objects' user metadata (hybridfs.tiers.s3listing): True, False (it ignored or
    # refused the request), None (not asked, or no object to tell by).
    with_metadata: bool | None = None


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 4
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    threads: int = 16
    # Threads for metadata calls (HEAD, LIST), beside ``threads``; None: as many as ``threads``.
    meta_threads: int | None = None
    part_size: int = 8 * 1024**2
    # Added to the User-Agent of every request: bucket notifications carry it (MinIO's and Ceph's
    # ``source.userAgent``), so a mount recognises the records of its own changes.
    user_agent_extra: str = ""


def _answered_after(resp: dict[str, Any], when: float) -> bool:
    """Whether S3's Date header on ``resp`` is ``when`` (seconds since the epoch) or later."""
    raw = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return email.utils.parsedate_to_datetime(raw).timestamp() >= when if raw else False
    except (TypeError, ValueError):
        return False


def _clean_etag(raw: str) -> str:
    return raw.strip('"')


def _deleted_is_conflict(exc: FsError, condition: Condition | None, what: str) -> FsError:
    """S3 (and MinIO) answer an If-Match write to a key that no longer exists with 404 NoSuchKey, not 412: the
    object was deleted since the write's version was read, which is a conflict like any other change."""
    if (condition is not None and condition.etag is not None and exc.errno == errno.ENOENT
            and "NoSuchUpload" not in exc.message):
        return WriteConflict(errno.ESTALE, f"{what}: object deleted remotely", level=logging.INFO)
    return exc


def map_client_error(exc: Exception, what: str) -> FsError:
    """Turn a boto3/botocore failure into the errno a caller should see, with a message that says why."""
    if isinstance(exc, FsError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        text = f"{what}: S3 said {code or status} ({err.get('Message', '')})"
        if code in ("NoSuchKey", "NotFound", "404", "NoSuchUpload") or status == 404:
            return FsError(errno.ENOENT, text)
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return FsError(errno.EACCES, text, level=logging.WARNING)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return WriteConflict(errno.ESTALE, f"{what}: object changed remotely", level=logging.INFO)
        if code in ("KeyTooLongError", "XMinioInvalidObjectName"):  # MinIO: a segment over 255 bytes, a
            return FsError(errno.ENAMETOOLONG, text, level=logging.INFO)  # directory marker over 246
        if code in ("EntityTooLarge",):
            return FsError(errno.EFBIG, text, level=logging.WARNING)
        if code == "NoSuchBucket":
            return FsError(errno.EIO, text, level=logging.ERROR)
        return FsError(errno.EIO, text + (" after retries" if status >= 500 or not status else ""),
                       level=logging.ERROR)
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return FsError(errno.EIO, f"{what}: S3 unreachable ({exc})", level=logging.ERROR)
    if isinstance(exc, OSError):
        return FsError(exc.errno or errno.EIO, f"{what}: {exc}", level=logging.ERROR)
    raise exc


def s3_options(endpoint_url: str | None) -> dict[str, Any]:
    """botocore's S3 options. Over plain http SigV4 would SHA-256 every body byte to sign it (a third of the
    mount's CPU per uploaded byte, measured); the body is protected by its CRC32C header instead, so the payload
    is sent UNSIGNED-PAYLOAD (MinIO and S3 accept it; headers and the checksum are still signed)."""
    options: dict[str, Any] = {}
    if endpoint_url:
        options["addressing_style"] = "path"
        if endpoint_url.startswith("http:"):
            options["payload_signing_enabled"] = False
    return options


def make_client(settings: S3Settings) -> Any:
    """A boto3 client configured from the standard chain (env, profile, instance role) plus our timeouts."""
    config = botocore.config.Config(
        retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # The mount's own calls (both limiters), the hydrator's, the purger's and s3transfer's threads share one
        # client; connections beyond the pool are opened anyway and closed after use (with a warning: urllib3's
        # pool does not block), so the pool only bounds idle connections kept: make it large enough for every
        # caller at once, metadata calls included.
        max_pool_connections=max(128, settings.threads * 4 + meta_threads(settings)),
        s3=s3_options(settings.endpoint_url),  # type: ignore[arg-type]
        user_agent_extra=settings.user_agent_extra or None,
        # Uploads carry a CRC32C we compute (google_crc32c, ~17 GB/s) instead of botocore's pure-Python-driven
        # CRC32 over a file object; S3 verifies it. Responses are not re-checksummed: ranged GETs and multipart
        # objects carry no checksum botocore could check anyway, and cached bytes have CRC32Cs of their own.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
    session = boto3.session.Session(botocore_session=core)
    return session.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config)


def parse_timestamp(value: str) -> datetime.datetime:
    """botocore's timestamp parser, fast for ISO 8601: every object of a listing has a LastModified, and botocore's
    own parser (dateutil) took 60 % of the CPU of listing 10,000 objects (0.8 s of CPU; 0.3 s with this). HTTP
    dates (a HEAD's Last-Modified) and anything else go to botocore's parser."""
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return botocore.parsers.DEFAULT_TIMESTAMP_PARSER(value)  # type: ignore[no-any-return]
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)


def meta_threads(settings: S3Settings) -> int:
    return settings.meta_threads or settings.threads


class _Progress:
    """When a transfer last moved bytes. s3transfer's threads store a float (atomic); the trio side only reads."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def moved(self, nbytes: int) -> None:
        self.last = time.monotonic()

    async def bounded(self, call: Callable[[], Awaitable[None]], stall_timeout: float, what: str) -> None:
        """Run ``call``; EIO when it has made no progress for ``stall_timeout`` seconds."""
        stalled = False
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                nonlocal stalled
                while (idle := time.monotonic() - self.last) < stall_timeout:  # noqa: ASYNC110 (set by threads)
                    await trio.sleep(stall_timeout - idle)
                stalled = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await call()
            except Exception as exc:  # raised as itself below, not wrapped in an exception group
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        if stalled:
            raise FsError(errno.EIO, f"{what}: no progress for {stall_timeout:g}s (S3 slow or unreachable)",
                          level=logging.WARNING)


def _stamped(flight: Flight, fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` for a worker thread that stamps ``flight`` as it sends the request and once it has the answer."""
    def run() -> T:
        flight.send()
        result = fn()
        flight.answer()
        return result
    return run


class CloudStore:
    """Async facade over one bucket. Keys are full object keys; the core maps paths to keys."""

    def __init__(self, settings: S3Settings, client: Any | None = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.client = client or make_client(settings)
        self.limiter = trio.CapacityLimiter(settings.threads)  # bulk: GET, PUT, parts, COPY, DELETE, ...
        self.limiter_name = "s3"
        # HEAD and LIST only: a stat never waits for a thread behind downloads and uploads (METADATA_OPERATIONS).
        self.meta_limiter = trio.CapacityLimiter(meta_threads(settings))
        self.meta_limiter_name = "s3-meta"
        self.pending_aborts: list[tuple[str, str]] = []
        self.journal: UploadJournal | None = None  # set by the mount: open multipart uploads, durably
        self._aborts_wanted = trio.Event()
        self.breaker = Breaker()
        # Made now, not at the first probe: building a botocore client takes 0.1 s to seconds of CPU on a loaded
        # machine, which inside the probe's time bound (and on the trio thread) made a healthy S3 look down.
        self._probe_client: Any | None = self._new_probe_client() if client is None else None
        # Does the store list user metadata (MinIO's ``metadata=true``)? None until a listing with objects tells;
        # False: every listing is a plain one and the attributes of its entries come from HEADs.
        self.lists_metadata: bool | None = None
        self._metadata_listing = MetadataListing(self.client)
        # Figures for the metrics (trio thread): calls by operation (the first word of ``what``: HEAD, GET, PUT,
        # UploadPart, ...), failed calls by operation and errno, object bytes received and sent by successful calls.
        self.calls: Counter[str] = Counter()
        self.call_errors: Counter[tuple[str, str]] = Counter()
        self.bytes_read = 0
        self.bytes_written = 0
        self.transfer_config = TransferConfig(
            multipart_threshold=settings.part_size,
            multipart_chunksize=settings.part_size,
            max_concurrency=max(2, settings.threads // 2),
            use_threads=True,
        )

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking boto3 call in a thread behind its limiter (metadata or bulk) and map its errors."""
        return await self._call_as(what, functools.partial(fn, *args, **kwargs))

    async def _call_as(self, what: str, bound: Callable[[], T], flight: Flight | None = None) -> T:
        """``_call`` of ``bound``. A read (WATCHED_OPERATIONS) runs as a ``Flight`` the breaker watches: its thread
        stamps when it sent the request and when the answer began (a GET passes its own flight, stamped once its
        headers are in)."""
        self.breaker.check(what)  # S3 known to be down: EIO at once, not after a retry cycle
        operation = what.split(" ", 1)[0]
        self.calls[operation] += 1
        limiter = self.meta_limiter if operation in METADATA_OPERATIONS else self.limiter
        if flight is None and operation in WATCHED_OPERATIONS:
            flight = Flight(what)
        if flight is None:
            return await self._run(what, operation, bound, limiter)
        with self.breaker.watching(flight):  # EIO once the breaker opens while this waits for its answer
            return await self._run(what, operation, _stamped(flight, bound), limiter)

    async def _run(self, what: str, operation: str, bound: Callable[[], T], limiter: trio.CapacityLimiter) -> T:
        try:
            result = await trio.to_thread.run_sync(bound, limiter=limiter, abandon_on_cancel=True)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self.breaker.observe(exc)
            error = map_client_error(exc, what)
            self.call_errors[operation, errno_name(error.errno)] += 1
            raise error from exc
        self.breaker.success()
        return result

    def _new_probe_client(self) -> Any:
        return make_client(dataclasses.replace(
            self.settings, max_attempts=1, connect_timeout=min(self.settings.connect_timeout, 2.0),
            read_timeout=min(self.settings.read_timeout, self.breaker.probe_timeout)))

    async def probe(self) -> bool:
        """The breaker's probe: does S3 answer one HEAD of the bucket (no retries, short timeouts)?"""
        if self._probe_client is None:
            self._probe_client = self._new_probe_client()
        client = self._probe_client
        try:
            await trio.to_thread.run_sync(lambda: client.head_bucket(Bucket=self.bucket), abandon_on_cancel=True)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            return is_outage(exc) is False
        return True

    # -- metadata -------------------------------------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = await self._call(f"HEAD {key}", self.client.head_object, Bucket=self.bucket, Key=key)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return ObjectInfo(
            key=key,
            size=int(resp["ContentLength"]),
            etag=_clean_etag(resp["ETag"]),
            mtime_ns=int(resp["LastModified"].timestamp() * 1e9),
            metadata={k.lower(): v for k, v in resp.get("Metadata", {}).items()},
            settled=_answered_after(resp, resp["LastModified"].timestamp() + SETTLED_AFTER),
        )

    async def list_dir(self, prefix: str, on_page: Callable[[], None] | None = None) -> Listing:
        """One directory level under ``prefix`` (which ends in ``/`` or is empty), all pages; with the objects'
        user metadata where the store lists it (asked until a listing shows it does not, once per mount).
        ``on_page`` is called from the worker thread as each page comes in (it must only stamp a time)."""
        ask = self.lists_metadata is not False
        what = f"LIST {prefix}"
        flight = Flight(what)

        def page_in() -> None:
            # The next page's request goes out now: the breaker times the wait for that one, so a directory of
            # many pages from a healthy S3 is no stall, while a page that never comes still is.
            flight.send()
            if on_page is not None:
                on_page()

        listing = await self._call_as(what, functools.partial(self._list_dir_sync, prefix, ask, page_in), flight)
        if ask and listing.with_metadata is not None and self.lists_metadata is None:
            self.lists_metadata = listing.with_metadata
            log.info("S3 %s user metadata in listings%s", "lists" if listing.with_metadata else "does not list",
                     "" if listing.with_metadata else "; attributes of listed objects come from HEADs")
        return listing

    def _list_dir_sync(self, prefix: str, with_metadata: bool, on_page: Callable[[], None]) -> Listing:
        if not with_metadata:
            return self._list_plain(prefix, on_page)
        try:
            with self._metadata_listing.asking():
                listing = self._list_plain(prefix, on_page)
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status not in (400, 405, 501):  # a store that refuses the parameter; anything else is an answer
                raise
            listing = self._list_plain(prefix, on_page)
            listing.with_metadata = False
            return listing
        if listing.files:
            listing.with_metadata = any(info.metadata is not None for info in listing.files)
        return listing

    def _list_plain(self, prefix: str, on_page: Callable[[], None] | None = None) -> Listing:
        listing = Listing()
        for page in self._pages(Prefix=prefix, Delimiter="/"):
            if on_page is not None:
                on_page()
            for cp in page.get("CommonPrefixes", []):
                name = cp["Prefix"][len(prefix):].rstrip("/")
                if name:
                    listing.subdirs.append(name)
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key == prefix:
                    listing.has_marker = True
                    continue
                # Whole seconds, as a HEAD's Last-Modified: one object shows one mtime, whoever asked.
                listing.files.append(
                    ObjectInfo(key=key, size=int(obj["Size"]), etag=_clean_etag(obj["ETag"]),
                               mtime_ns=int(obj["LastModified"].timestamp()) * 1_000_000_000,
                               metadata=obj.get(LISTED_METADATA))
                )
        return listing

    def _pages(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        yield from paginator.paginate(Bucket=self.bucket, **kwargs)

    async def has_children(self, prefix: str) -> bool:
        """Whether any object other than the marker itself lives under ``prefix``."""
        resp = await self._call(f"LIST {prefix}", self.client.list_objects_v2, Bucket=self.bucket,
                                Prefix=prefix, MaxKeys=2)
        return any(obj["Key"] != prefix for obj in resp.get("Contents", []))

    async def first_keys(self, prefix: str, limit: int = 2) -> list[str]:
        """The first keys under ``prefix`` (the marker ``prefix`` itself sorts first when it exists)."""
        resp = await self._call(f"LIST {prefix}", self.client.list_objects_v2, Bucket=self.bucket,
                                Prefix=prefix, MaxKeys=limit)
        return [obj["Key"] for obj in resp.get("Contents", [])]

    async def list_keys(self, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix``, recursively (used for directory renames and warm-up)."""
        def collect() -> list[ObjectInfo]:
            return [
                ObjectInfo(key=o["Key"], size=int(o["Size"]), etag=_clean_etag(o["ETag"]),
                           mtime_ns=int(o["LastModified"].timestamp() * 1e9))
                for page in self._pages(Prefix=prefix) for o in page.get("Contents", [])
            ]
        return await self._call(f"LIST {prefix}", collect)

    # -- data -----------------------------------------------------------------------------------------------

    async def get_range(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        """Bytes [start, start+length) of the object; ESTALE when its ETag is no longer ``etag``."""
        if length <= 0:
            return b""
        extra = {"IfMatch": f'"{etag}"'} if etag else {}

        what = f"GET {key} [{start}:+{length}]"
        flight = Flight(what, meta=False)

        def fetch() -> bytes:
            resp = self.client.get_object(Bucket=self.bucket, Key=key,
                                          Range=f"bytes={start}-{start + length - 1}", **extra)
            flight.answer()  # the body streams from here: its length is no sign of a stall
            return resp["Body"].read()  # type: ignore[no-any-return]

        try:
            data = await self._call_as(what, fetch, flight)
        except FsError as exc:
            if "InvalidRange" not in exc.message:
                raise
            return await self._past_the_end(key, start, etag)
        self.bytes_read += len(data)
        return data

    async def _past_the_end(self, key: str, start: int, etag: str | None) -> bytes:
        """S3 answered InvalidRange: the range starts at or past the end of the object it holds *now*. MinIO
        checks the range before If-Match, so for a pinned version that may mean another, shorter version (an
        empty answer there made reads of a file truncated elsewhere come back short, read as EOF). A HEAD says
        which: the pinned version itself ends there (b""), or the object changed (ESTALE, as a 412 would)."""
        if etag is None:
            return b""
        info = await self.head(key)
        if info is not None and info.etag == etag:
            return b""
        now = f"ETag {info.etag}, {info.size} bytes" if info is not None else "no object"
        raise WriteConflict(errno.ESTALE, f"GET {key} [{start}:]: object changed remotely (S3 holds {now}, not "
                                          f"ETag {etag})", level=logging.INFO)

    async def put(self, key: str, data: bytes, metadata: dict[str, str], *,
                  condition: Condition | None = None) -> str:
        """One PUT; with ``condition``, only if S3 still holds what the condition names (else WriteConflict)."""
        extra = condition.args() if condition is not None else {}
        try:
            resp = await self._call(f"PUT {key}", self.client.put_object, Bucket=self.bucket, Key=key,
                                    Body=data, Metadata=metadata, ChecksumCRC32C=crc32c_b64(data), **extra)
        except FsError as exc:
            raise _deleted_is_conflict(exc, condition, f"PUT {key}") from exc
        self.bytes_written += len(data)
        return _clean_etag(resp["ETag"])

    async def upload_file(self, key: str, path: str, metadata: dict[str, str]) -> ObjectInfo:
        """Upload a local file (multipart and parallel above the part size; s3transfer aborts on failure)."""
        await self._call(f"PUT {key}", self.client.upload_file, path, self.bucket, key,
                         ExtraArgs={"Metadata": metadata}, Config=self.transfer_config)
        info = await self.head(key)
        if info is None:
            raise FsError(errno.EIO, f"PUT {key}: object missing right after upload", level=logging.ERROR)
        self.bytes_written += info.size
        return info

    async def download_file(self, key: str, etag: str, path: str) -> None:
        """Download exactly version ``etag`` of an object to ``path`` (ESTALE when it changed).

        One streamed GET with If-Match: s3transfer's parallel download cannot pin the version.
        """
        flight = Flight(f"GET {key}", meta=False)

        def fetch() -> int:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=f'"{etag}"')
            flight.answer()  # a whole object streams from here: its length is no sign of a stall
            with open(path, "wb") as out:
                for block in resp["Body"].iter_chunks(1024 * 1024):
                    out.write(block)
                return out.tell()

        self.bytes_read += await self._call_as(f"GET {key}", fetch, flight)

    async def copy(self, src: str, dst: str, metadata: dict[str, str], *, source_etag: str | None = None,
                   stall_timeout: float | None = None, size: int | None = None) -> ObjectInfo | None:
        """Server-side copy with new metadata; s3transfer switches to a multipart copy (UploadPartCopy) above the
        part size, whose ETag then differs from the source's.

        With ``source_etag``, only from that version of ``src`` (CopySourceIfMatch): the metadata given was
        computed from it, and copying it onto another version (a foreign overwrite not seen yet) would pair that
        version's bytes with our stale attributes. s3transfer passes the condition to its HEAD (IfMatch) and to
        every UploadPartCopy. WriteConflict when ``src`` is no longer that version, ENOENT when it is gone.

        With ``stall_timeout``, EIO once no part has been copied for that long (S3 stalled): a copy's total time
        grows with the object, so only its progress can be bounded. The copy itself may go on in its threads.

        With ``size`` (the size of version ``source_etag``) below the multipart threshold: one CopyObject, without
        the HEAD s3transfer sends first to learn the size, and the attributes of the copy are S3's answer to it
        (ETag, LastModified; the size and metadata are what was copied): no HEAD after it either, unless S3's ETag
        is not ``source_etag``. Otherwise None.
        """
        extra: dict[str, str | dict[str, str]] = {"Metadata": metadata, "MetadataDirective": "REPLACE"}
        if source_etag is not None:
            extra["CopySourceIfMatch"] = f'"{source_etag}"'
        what = f"COPY {src} -> {dst}"
        if source_etag is not None and size is not None and size < self.transfer_config.multipart_threshold:
            copied = await self._copy_object(src, dst, extra, size, stall_timeout, what)
            # The size is the one of version source_etag; S3's answer names the version it copied. Another ETag
            # (a source uploaded in parts, or a version that landed between S3's check and its read) may have
            # another size: the caller's HEAD tells it, never the given size beside the new ETag.
            return copied if copied.etag == source_etag else None
        progress = _Progress()
        async def call() -> None:
            try:
                await self._call(what, self.client.copy, {"Bucket": self.bucket, "Key": src}, self.bucket, dst,
                                 ExtraArgs=extra, Callback=progress.moved, Config=self.transfer_config)
            except S3CopyFailedError as exc:
                # s3transfer's own word for an UploadPartCopy refused by CopySourceIfMatch: ``src`` was replaced
                # after the copy's HEAD (it aborts its multipart upload itself).
                raise WriteConflict(errno.ESTALE, f"{what}: object changed remotely during the copy ({exc})",
                                    level=logging.INFO) from exc

        if stall_timeout is None:
            await call()
        else:
            await progress.bounded(call, stall_timeout, what)
        return None

    async def _copy_object(self, src: str, dst: str, extra: dict[str, str | dict[str, str]], size: int,
                           stall_timeout: float | None, what: str) -> ObjectInfo:
        """One CopyObject (a single request: bounded as a whole by ``stall_timeout``)."""
        with trio.move_on_after(math.inf if stall_timeout is None else stall_timeout):
            resp = await self._call(what, self.client.copy_object, CopySource={"Bucket": self.bucket, "Key": src},
                                    Bucket=self.bucket, Key=dst, **extra)
            result = resp["CopyObjectResult"]
            metadata = extra["Metadata"]
            assert isinstance(metadata, dict)
            return ObjectInfo(key=dst, size=size, etag=_clean_etag(result["ETag"]),
                              mtime_ns=int(result["LastModified"].timestamp() * 1e9),
                              metadata={k.lower(): v for k, v in metadata.items()})
        raise FsError(errno.EIO, f"{what} did not finish within {stall_timeout:g}s (S3 slow or unreachable)",
                      level=logging.WARNING)

    async def delete(self, key: str) -> None:
        await self._call(f"DELETE {key}", self.client.delete_object, Bucket=self.bucket, Key=key)

    # -- streamed multipart upload --------------------------------------------------------------------------

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        """Start a multipart upload. A caller that gives up (timeout) while S3 has not answered yet leaves the
        request running in its thread; an upload it creates then is aborted at once, never left behind."""
        lock = threading.Lock()
        box: dict[str, Any] = {}

        def create() -> str:
            resp = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=metadata,
                                                       ChecksumAlgorithm="CRC32C")
            with lock:
                box["id"] = upload_id = str(resp["UploadId"])
                abandoned = box.get("abandoned", False)
            if abandoned:
                with contextlib.suppress(Exception):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            return upload_id

        try:
            upload_id = await self._call(f"CreateMultipartUpload {key}", create)
        except trio.Cancelled:
            with lock:
                box["abandoned"] = True
                late = box.get("id")
            if late is not None:  # created just as we gave up: nobody else will ever abort it
                self.schedule_abort(key, late)
            raise
        await self._journal("record", key, upload_id)
        return upload_id

    async def _journal(self, action: str, key: str, upload_id: str) -> None:
        journal = self.journal
        if journal is None:
            return
        fn = journal.record if action == "record" else journal.forget
        try:
            await trio.to_thread.run_sync(fn, key, upload_id)
        except Exception as exc:  # sqlite3.Error, OSError: the upload itself is fine, only its record is not
            log.warning("could not %s multipart upload %s of %s in the upload journal: %s", action, upload_id,
                        key, exc)

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        checksum = crc32c_b64(data)
        resp = await self._call(f"UploadPart {key} #{number}", self.client.upload_part, Bucket=self.bucket,
                                Key=key, UploadId=upload_id, PartNumber=number, Body=data,
                                ChecksumCRC32C=checksum)
        self.bytes_written += len(data)
        return Part(number, str(resp["ETag"]), checksum)

    async def complete_multipart(self, key: str, upload_id: str, parts: list[Part], *,
                                 condition: Condition | None = None) -> str:
        extra = condition.args() if condition is not None else {}
        listed = [{"PartNumber": p.number, "ETag": p.etag, "ChecksumCRC32C": p.checksum}
                  for p in sorted(parts, key=lambda p: p.number)]
        try:
            resp = await self._call(
                f"CompleteMultipartUpload {key}", self.client.complete_multipart_upload, Bucket=self.bucket,
                Key=key, UploadId=upload_id, MultipartUpload={"Parts": listed}, **extra,
            )
        except FsError as exc:
            raise _deleted_is_conflict(exc, condition, f"CompleteMultipartUpload {key}") from exc
        await self._journal("forget", key, upload_id)
        return _clean_etag(resp["ETag"])

    def schedule_abort(self, key: str, upload_id: str) -> None:
        """Abort in the background (``run_aborts``): a failing close must not wait for S3 to answer an abort."""
        if (key, upload_id) not in self.pending_aborts:
            self.pending_aborts.append((key, upload_id))
        self._aborts_wanted.set()

    async def abort_multipart(self, key: str, upload_id: str) -> bool:
        """Abort now (shielded, bounded); when S3 cannot be reached the abort is left to ``run_aborts``."""
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            if await self._abort_once(key, upload_id) is not False:  # gone, or refused for good (logged)
                return True
        self.schedule_abort(key, upload_id)
        return False

    async def _abort_once(self, key: str, upload_id: str) -> bool | None:
        """True when the upload is gone; False when S3 could not be reached (to retry); None when S3 refused the
        abort for good (logged; the upload stays in the journal, so the next start tries again)."""
        try:
            await self._call(f"AbortMultipartUpload {key}", self.client.abort_multipart_upload,
                             Bucket=self.bucket, Key=key, UploadId=upload_id)
        except FsError as exc:
            if exc.errno == errno.ENOENT:  # NoSuchUpload: already gone
                pass
            elif is_temporary(exc):
                log.debug("abort of %s (%s) failed: %s", key, upload_id, exc)
                return False
            else:
                log.warning("could not abort the multipart upload %s of %s: %s; not retrying (the next start "
                            "tries again)", upload_id, key, exc.message)
                return None
        await self._journal("forget", key, upload_id)
        return True

    async def retry_aborts(self) -> None:
        """Try every pending abort once."""
        for key, upload_id in list(self.pending_aborts):
            done = await self._abort_once(key, upload_id)
            if done is not False:
                with contextlib.suppress(ValueError):
                    self.pending_aborts.remove((key, upload_id))
            if done:
                log.info("aborted the incomplete multipart upload of %s", key)

    async def run_aborts(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Service: aborts scheduled uploads, retrying (the retry policy) while S3 cannot be reached."""
        task_status.started()
        retry = Retrying(ABORT_RETRY, log, "could not abort multipart uploads",
                         recovered="S3 answers again: no multipart upload left to abort")
        while True:
            await self._aborts_wanted.wait()
            self._aborts_wanted = trio.Event()
            await self.retry_aborts()
            if not self.pending_aborts:
                retry.succeeded()
                continue
            await retry.wait(f"{len(self.pending_aborts)} left, first: {self.pending_aborts[0][0]}")
            self._aborts_wanted.set()

    async def abort_journaled(self) -> int:
        """At start: schedule the abort of every upload a previous run left open (SIGKILL, power cut)."""
        journal = self.journal
        if journal is None:
            return 0
        left = await trio.to_thread.run_sync(journal.pending)
        for key, upload_id in left:
            log.info("aborting multipart upload of %s left open by a previous run", key)
            self.schedule_abort(key, upload_id)
        return len(left)

    async def stale_uploads(self, prefix: str, older_than: float) -> list[tuple[str, str]]:
        """Multipart uploads under ``prefix`` started more than ``older_than`` seconds ago.

        AWS lists uploads by prefix; MinIO answers a prefix only when it is an exact key (and the whole bucket
        when there is none), so an empty answer for the prefix is followed by a bucket-wide listing filtered here.
        """
        def collect() -> list[tuple[str, str]]:
            import datetime

            cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=older_than)
            found: list[tuple[str, str]] = []
            for scope in ([prefix, ""] if prefix else [""]):
                kwargs: dict[str, Any] = {"Bucket": self.bucket, **({"Prefix": scope} if scope else {})}
                try:
                    for page in self.client.get_paginator("list_multipart_uploads").paginate(**kwargs):
                        for upload in page.get("Uploads", []):
                            if (upload["Key"].startswith(prefix) and upload["Initiated"] < cutoff
                                    and not self._has_part_since(upload["Key"], upload["UploadId"], cutoff)):
                                found.append((upload["Key"], upload["UploadId"]))
                except botocore.exceptions.ClientError:
                    if not scope:
                        raise
                    continue  # MinIO refuses a prefix that is not an object name: list the bucket instead
                if found:
                    break
            return found

        return await self._call("ListMultipartUploads", collect)

    def _has_part_since(self, key: str, upload_id: str, cutoff: Any) -> bool:
        """Blocking: a part uploaded after ``cutoff`` — a live mount's long stream, not a crashed one's upload
        (judged by its start alone, another mount's start would abort it under its writer)."""
        try:
            for page in self.client.get_paginator("list_parts").paginate(
                    Bucket=self.bucket, Key=key, UploadId=upload_id):
                if any(part["LastModified"] >= cutoff for part in page.get("Parts", [])):
                    return True
        except botocore.exceptions.ClientError:
            return False  # gone meanwhile (NoSuchUpload), or unreadable: judged by its start alone
        return False

    async def list_multipart_uploads(self, prefix: str) -> list[str]:
        resp = await self._call("ListMultipartUploads", self.client.list_multipart_uploads,
                                Bucket=self.bucket, Prefix=prefix)
        return [u["Key"] for u in resp.get("Uploads", [])]
