"""Fixed facts about the local stack: pinned versions, loopback ports, credentials, directories, client env.

Everything here is pure (no processes, no network), so tests and benchmarks can import it cheaply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

KAFKA_VERSION = "4.1.1"
MINIO_MODULE = "github.com/minio/minio"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"

HOST = "127.0.0.1"  # the stack only ever listens on loopback
KAFKA_PORT = 19092
KAFKA_CONTROLLER_PORT = 19093
S3_PORT = 19000
S3_CONSOLE_PORT = 19001

ACCESS_KEY = "hybridfs"
SECRET_KEY = "hybridfs-secret"
REGION = "us-east-1"
BUCKET = "hybridfs"

KAFKA_BOOTSTRAP = f"{HOST}:{KAFKA_PORT}"
S3_ENDPOINT = f"http://{HOST}:{S3_PORT}"

# MinIO publishes the bucket's S3 event records (ObjectCreated:*, ObjectRemoved:*) to this Kafka topic, so that
# mounts see changes made with other tools (boto3, aws s3, rclone). Two Kafka targets publish each record, because
# MinIO offers fast or durable, not both: the direct one within milliseconds (dropped while Kafka is down), the
# queued one from a queue directory that MinIO flushes every 3 s (kept across Kafka outages). Records come twice
# and out of order (the direct target sends each on its own); consumers only invalidate on a record, so the second
# copy costs one more revalidation and the order does not matter.
S3_EVENTS_TOPIC = "hybridfs.s3-events"
MINIO_KAFKA_TARGETS = {"HYBRIDFS": False, "HYBRIDFSQUEUED": True}  # target id -> through a queue directory
S3_EVENTS_QUEUE_ARNS = tuple(f"arn:minio:sqs::{target}:kafka" for target in MINIO_KAFKA_TARGETS)
S3_EVENT_TYPES = ("s3:ObjectCreated:*", "s3:ObjectRemoved:*")

SERVICES = ("kafka", "s3")


@dataclass(frozen=True)
class StackPaths:
    """Where the stack keeps things: ``cache`` (jars, binaries; reusable) and ``state`` (data, logs, pids)."""

    cache: Path
    state: Path

    @classmethod
    def from_env(cls) -> StackPaths:
        home = Path.home()
        xdg_cache = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")
        xdg_state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state")
        cache = os.environ.get("HYBRIDFS_STACK_CACHE") or xdg_cache / "hybridfs"
        state = os.environ.get("HYBRIDFS_STACK_STATE") or xdg_state / "hybridfs" / "stack"
        return cls(cache=Path(cache).absolute(), state=Path(state).absolute())

    @property
    def bin_dir(self) -> Path:
        return self.cache / "bin"

    @property
    def kafka_cache(self) -> Path:
        return self.cache / "kafka" / KAFKA_VERSION

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    def service_dir(self, service: str) -> Path:
        return self.state / service

    def pid_file(self, service: str) -> Path:
        return self.state / f"{service}.pid"


def kafka_env() -> dict[str, str]:
    return {"HYBRIDFS_KAFKA_BOOTSTRAP": KAFKA_BOOTSTRAP}


def s3_env() -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": S3_ENDPOINT,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "HYBRIDFS_BUCKET": BUCKET,
    }


def stack_env(service: str | None = None) -> dict[str, str]:
    """Env that points boto3, the aws CLI, kcat and hybridfs at the stack (one service or both)."""
    env: dict[str, str] = {}
    if service in (None, "s3"):
        env.update(s3_env())
    if service in (None, "kafka"):
        env.update(kafka_env())
    if service is None:  # the S3 event records need both: MinIO publishes them to the stack's Kafka
        env["HYBRIDFS_S3_EVENTS_TOPIC"] = S3_EVENTS_TOPIC
    if not env:
        raise ValueError(f"unknown service {service!r}; expected one of {SERVICES}")
    return env
