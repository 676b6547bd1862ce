"""MinIO for the local stack: built with `go install` at a pinned version, serving S3 on loopback."""

from __future__ import annotations

import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hybridfs.cli import CliError
from hybridfs.stack.config import (
    ACCESS_KEY,
    BUCKET,
    HOST,
    KAFKA_BOOTSTRAP,
    MINIO_KAFKA_TARGETS,
    MINIO_MODULE,
    MINIO_VERSION,
    REGION,
    S3_CONSOLE_PORT,
    S3_ENDPOINT,
    S3_EVENT_TYPES,
    S3_EVENTS_QUEUE_ARNS,
    S3_EVENTS_TOPIC,
    S3_PORT,
    SECRET_KEY,
    StackPaths,
)
from hybridfs.stack.progress import run_with_progress
from hybridfs.stack.service import Service

# Never send the health probe through a proxy from the environment: the stack is on loopback.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MinIO(Service):
    name = "s3"
    port = S3_PORT

    def __init__(self, paths: StackPaths) -> None:
        super().__init__(paths)
        self.binary: Path | None = None

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def marker(self) -> str:
        return str(self.data_dir)

    @property
    def endpoint(self) -> str:
        return S3_ENDPOINT

    # install: a given binary, one on PATH, or go install at the pinned version
    def install(self) -> None:
        self.binary = self._find() or self._build()

    def _find(self) -> Path | None:
        named = os.environ.get("HYBRIDFS_MINIO_BIN")
        if named:
            if not os.access(named, os.X_OK):
                raise CliError(f"s3: HYBRIDFS_MINIO_BIN={named} is not an executable file")
            return Path(named)
        on_path = shutil.which("minio")
        if on_path:
            return Path(on_path)
        cached = self.paths.bin_dir / "minio"
        return cached if os.access(cached, os.X_OK) else None

    def _build(self) -> Path:
        go = shutil.which("go")
        if go is None:
            raise CliError("s3: no minio binary and no `go` on PATH; install Go or set HYBRIDFS_MINIO_BIN")
        target = self.paths.bin_dir / "minio"
        staging = self.paths.bin_dir / ".minio-build"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        go_log = self.paths.logs / "minio-build.log"
        print(
            f"==> s3: building MinIO {MINIO_VERSION} with go install (first run only: about 2 minutes on 2"
            f" cores, downloads modules and compiles ~1500 packages; log {go_log})",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        env = {**os.environ, "GOBIN": str(staging), "CGO_ENABLED": "0"}
        argv = [go, "install", "-v", f"{MINIO_MODULE}@{MINIO_VERSION}"]
        status, tail = run_with_progress(argv, label="go install", log_path=go_log, env=env, cwd=staging)
        built = staging / "minio"
        if status != 0 or not built.is_file():
            print("\n".join(tail), file=sys.stderr)
            raise CliError(f"s3: building MinIO with go install failed; read {go_log}")
        built.replace(target)
        shutil.rmtree(staging, ignore_errors=True)
        return target

    # run
    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.events_queue_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> tuple[list[str], dict[str, str]]:
        assert self.binary is not None, "install() first"
        argv = [
            str(self.binary), "server", str(self.data_dir),
            "--address", f"{HOST}:{S3_PORT}",
            "--console-address", f"{HOST}:{S3_CONSOLE_PORT}",
        ]  # fmt: skip
        env = {
            **os.environ,
            "MINIO_ROOT_USER": ACCESS_KEY,
            "MINIO_ROOT_PASSWORD": SECRET_KEY,
            "MINIO_REGION": REGION,
            "MINIO_UPDATE": "off",
            **self._kafka_notify_env(),
        }
        return argv, env

    def _kafka_notify_env(self) -> dict[str, str]:
        """The bucket's S3 event records go to the stack's Kafka through two targets (see S3_EVENTS_TOPIC): one
        direct, one through a queue directory. Neither makes a PUT wait for Kafka, and MinIO also starts while
        Kafka is not up yet (as at `stack up`, where both start at once)."""
        env: dict[str, str] = {}
        for target, queued in MINIO_KAFKA_TARGETS.items():
            env[f"MINIO_NOTIFY_KAFKA_ENABLE_{target}"] = "on"
            env[f"MINIO_NOTIFY_KAFKA_BROKERS_{target}"] = KAFKA_BOOTSTRAP
            env[f"MINIO_NOTIFY_KAFKA_TOPIC_{target}"] = S3_EVENTS_TOPIC
            if queued:
                env[f"MINIO_NOTIFY_KAFKA_QUEUE_DIR_{target}"] = str(self.events_queue_dir)
                env[f"MINIO_NOTIFY_KAFKA_QUEUE_LIMIT_{target}"] = "100000"
        return env

    @property
    def events_queue_dir(self) -> Path:
        return self.paths.service_dir("s3") / "events-queue"

    def ready(self) -> bool:
        try:
            with _opener.open(f"{S3_ENDPOINT}/minio/health/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def on_ready(self) -> str:
        ensure_bucket(BUCKET)
        publish_bucket_events(BUCKET)
        return f"bucket {BUCKET}, its S3 event records to Kafka topic {S3_EVENTS_TOPIC}"


def _client() -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=S3_ENDPOINT, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )  # fmt: skip


def publish_bucket_events(bucket: str) -> None:
    """Every object created or removed in ``bucket`` raises an S3 event record on the Kafka target."""
    from botocore.exceptions import ClientError

    config = {"QueueConfigurations": [{"QueueArn": arn, "Events": list(S3_EVENT_TYPES)}
                                      for arn in S3_EVENTS_QUEUE_ARNS]}
    try:
        _client().put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=config)
    except ClientError as exc:  # a MinIO started by an older hybridfs, without the Kafka target
        raise CliError(
            f"s3: MinIO refused the Kafka notification targets {', '.join(S3_EVENTS_QUEUE_ARNS)} ({exc}); it "
            "was started without them: restart it with `hybridfs stack down s3 && hybridfs stack up`"
        ) from exc


def ensure_bucket(bucket: str) -> None:
    from botocore.exceptions import ClientError

    s3 = _client()
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)
