"""Apache Kafka for the local stack: jars from Maven Central, one KRaft broker+controller on loopback."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import sys
import uuid
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from hybridfs.cli import CliError
from hybridfs.stack import procs
from hybridfs.stack.config import HOST, KAFKA_BOOTSTRAP, KAFKA_CONTROLLER_PORT, KAFKA_PORT, KAFKA_VERSION
from hybridfs.stack.progress import run_with_progress
from hybridfs.stack.service import Service

log = logging.getLogger(__name__)

HEAP = "-Xmx1g"  # 512 MiB ran out loading ~15,000 partitions at start (see stack/prune.py)


def _package_text(name: str) -> str:
    return resources.files("hybridfs.stack").joinpath(name).read_text()


def _need(tool: str, what: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise CliError(f"kafka: `{tool}` not found on PATH; {what}")
    return path


def cluster_id() -> str:
    """A KRaft cluster id as `kafka-storage random-uuid` makes it: a v4 UUID, base64url, no padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


class _DebugLogger:
    """librdkafka logs every refused connection while the broker starts; keep that at DEBUG."""

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        log.debug(msg, *args)


class Kafka(Service):
    name = "kafka"
    port = KAFKA_PORT

    @property
    def libs(self) -> Path:
        return self.paths.kafka_cache / "libs"

    @property
    def properties(self) -> Path:
        return self.dir / "server.properties"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def marker(self) -> str:
        return str(self.properties)

    @property
    def endpoint(self) -> str:
        return KAFKA_BOOTSTRAP

    @property
    def read_log(self) -> Path:
        return self.paths.logs / "kafka-server.log"

    # install: resolve the pinned release's jars with Maven
    def install(self) -> None:
        pom = _package_text("pom.xml")
        stamp = self.libs / ".pom.xml"
        if stamp.is_file() and stamp.read_text() == pom:
            return
        _need("java", "install a Java 17 runtime (apt-get install openjdk-17-jre-headless)")
        mvn = _need("mvn", "install Maven (apt-get install maven)")
        work = self.paths.kafka_cache
        work.mkdir(parents=True, exist_ok=True)
        (work / "pom.xml").write_text(pom)
        staging = work / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        mvn_log = self.paths.logs / "kafka-mvn.log"
        print(
            f"==> kafka: resolving Apache Kafka {KAFKA_VERSION} jars from Maven Central (first run"
            f" only: about 10 s to a few minutes, ~95 jars / 55 MB; log {mvn_log})",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        argv = [mvn, "-B", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}"]  # fmt: skip
        status, tail = run_with_progress(
            argv, label="maven", log_path=mvn_log, env=os.environ, cwd=work,
            is_step=lambda line: line.startswith("Downloaded from"),
        )  # fmt: skip
        if status != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            print("\n".join(tail), file=sys.stderr)
            raise CliError(f"kafka: resolving the Kafka jars with Maven failed; read {mvn_log}")
        (staging / ".pom.xml").write_text(pom)
        shutil.rmtree(self.libs, ignore_errors=True)
        staging.rename(self.libs)

    # prepare: configuration, storage formatted once
    def _java(self, main: str, *args: str) -> list[str]:
        return [
            _need("java", "install a Java 17 runtime"),
            HEAP,
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={self.paths.logs}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        (self.dir / "log4j2.xml").write_text(_package_text("log4j2.xml"))
        props = Template(_package_text("kafka.properties")).substitute(
            host=HOST, broker_port=KAFKA_PORT, controller_port=KAFKA_CONTROLLER_PORT, data_dir=self.data_dir
        )
        self.properties.write_text(props)
        if not (self.data_dir / "meta.properties").is_file():
            self._format()

    def _format(self) -> None:
        argv = self._java("kafka.tools.StorageTool", "format", "-t", cluster_id(), "-c", str(self.properties))
        with open(self.out_log, "ab") as out:
            out.write(f"==> formatting storage: {' '.join(argv)}\n".encode())
            out.flush()
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir, check=False)
        if result.returncode != 0:
            raise CliError(f"kafka: formatting the storage in {self.data_dir} failed; read {self.out_log}")

    # run
    def command(self) -> tuple[list[str], dict[str, str]]:
        return self._java("kafka.Kafka", str(self.properties)), dict(os.environ)

    def ready(self) -> bool:
        if not procs.port_open(HOST, KAFKA_PORT):
            return False
        from confluent_kafka.admin import AdminClient

        config: dict[str, Any] = {"bootstrap.servers": KAFKA_BOOTSTRAP, "logger": _DebugLogger()}
        admin = AdminClient(config)
        try:
            metadata = admin.list_topics(timeout=3)
        except Exception as exc:  # KafkaException while the broker is still coming up
            log.debug("kafka not ready yet: %s", exc)
            return False
        return bool(metadata.brokers)
