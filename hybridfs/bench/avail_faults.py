"""The faults ``hybridfs bench availability`` injects, each on something the run owns (never the shared stack).

- ``FaultDisk``: a small tmpfs of the system's own holding its cache (and, with the option, hybridfs's state): filled
  to 100 %, bind-mounted read-only over itself, or emptied with rm -rf.
- S3: each system reaches MinIO through its own ``S3FaultProxy`` (hybridfs/bench/s3proxy.py).
- ``PrivateKafka``: a single-node broker for the run on free ports, from the stack's jars: the shared Kafka's
  advertised listener (127.0.0.1:19092) would let clients bypass any TCP proxy after the first metadata answer, and
  the shared broker must not be stopped, so the run gets a broker of its own that it can kill and freeze.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path
from string import Template

from hybridfs.bench.s3proxy import S3FaultProxy
from hybridfs.stack.config import HOST, StackPaths

log = logging.getLogger("hybridfs.bench")

KAFKA_READY_TIMEOUT = 120.0


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


class FaultDisk:
    """A tmpfs of ``size`` bytes mounted on ``root``; ``dirs`` (relative) are what a 'replaced disk' gets back."""

    def __init__(self, root: Path, size: int, dirs: list[str]) -> None:
        self.root = root
        self.size = size
        self.dirs = dirs
        self.filler = root / ".bench-filler"
        self.readonly = False

    def mount(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        result = _run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "bench-avail", str(self.root)])
        if result.returncode != 0:
            raise RuntimeError(f"cannot mount a tmpfs on {self.root}: {result.stderr.strip()}")
        self.restore_dirs()

    def restore_dirs(self) -> None:
        for d in self.dirs:
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def unmount(self) -> None:
        self.clear()
        if _run(["umount", str(self.root)]).returncode != 0:
            _run(["umount", "-l", str(self.root)])  # a descriptor still open (a hung op): detach it

    # -- faults
    def fill(self) -> None:
        """Write zeros until ENOSPC: the disk is full for everyone, whoever holds space."""
        block = b"\0" * (1 << 20)
        try:
            with open(self.filler, "ab") as fh:
                while True:
                    fh.write(block)
                    fh.flush()
        except OSError:  # ENOSPC: that is the point
            pass
        try:  # the last partial block: fill the remaining bytes too
            with open(self.filler, "ab", buffering=0) as fh:
                while fh.write(b"\0" * 4096):
                    pass
        except OSError:
            pass

    def unfill(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def make_readonly(self) -> None:
        bind = ["mount", "--bind", str(self.root), str(self.root)]
        result = _run(bind)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(bind)}: {result.stderr.strip()}")
        # The kernel refuses (EBUSY) to make a mount read-only while a file is open for writing through it; the
        # system under test may open one through the new bind mount before the remount: try again, briefly.
        remount = ["mount", "-o", "remount,bind,ro", str(self.root)]
        deadline = time.monotonic() + 5
        while (result := _run(remount)).returncode != 0:
            if "busy" not in result.stderr or time.monotonic() > deadline:
                _run(["umount", "-l", str(self.root)])
                raise RuntimeError(f"{' '.join(remount)}: {result.stderr.strip()}")
            time.sleep(0.05)  # a retry interval, not a wait for a condition we could poll
        self.readonly = True

    def make_writable(self) -> None:
        if self.readonly and _run(["umount", str(self.root)]).returncode != 0:
            _run(["umount", "-l", str(self.root)])
        self.readonly = False

    def remove_all(self) -> None:
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()

    def clear(self) -> None:
        """End whatever fault is on."""
        self.make_writable()
        self.unfill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PrivateKafka:
    """One KRaft broker+controller on free loopback ports, data and logs in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.controller_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.libs = StackPaths.from_env().kafka_cache / "libs"

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def _java(self, main: str, *args: str) -> list[str]:
        java = shutil.which("java") or "java"
        return [java, "-Xmx384m", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.dir / 'log4j2.xml'}", f"-Dkafka.logs.dir={self.dir / 'logs'}",
                "-cp", f"{self.libs}/*", main, *args]  # fmt: skip

    def prepare(self) -> None:
        if not any(self.libs.glob("kafka_2.13-*.jar")):
            raise RuntimeError(f"no Kafka jars in {self.libs}: run `hybridfs stack up` once")
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        stack = resources.files("hybridfs.stack")
        (self.dir / "log4j2.xml").write_text(stack.joinpath("log4j2.xml").read_text())
        props = Template(stack.joinpath("kafka.properties").read_text()).substitute(
            host=HOST, broker_port=self.port, controller_port=self.controller_port, data_dir=self.dir / "data")
        (self.dir / "server.properties").write_text(props)
        from hybridfs.stack.kafka import cluster_id

        argv = self._java("kafka.tools.StorageTool", "format", "-t", cluster_id(), "-c",
                          str(self.dir / "server.properties"))
        with open(self.dir / "kafka.out", "ab") as out:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"formatting the private Kafka's storage failed; see {self.dir / 'kafka.out'}")

    def start(self, wait: bool = True) -> None:
        with open(self.dir / "kafka.out", "ab") as out:
            self.proc = subprocess.Popen(self._java("kafka.Kafka", str(self.dir / "server.properties")),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + KAFKA_READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the private Kafka exited; see {self.dir / 'kafka.out'}")
            admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
            with contextlib.suppress(Exception):
                if admin.list_topics(timeout=2).brokers:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the private Kafka did not answer within {KAFKA_READY_TIMEOUT:.0f}s")

    def kill(self) -> None:
        if self.proc is not None:
            self.thaw()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def freeze(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        if self.proc is not None and self.frozen:
            os.killpg(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def revive(self) -> None:
        """After a kill: start again without waiting (the time it takes to answer is part of the outage)."""
        if self.proc is None:
            self.start(wait=False)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.thaw()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None


class Faults:
    """Applies a phase's fault to one system's disk, proxy and broker, and ends it."""

    def __init__(self, disk: FaultDisk, proxy: S3FaultProxy | None, kafka: PrivateKafka | None) -> None:
        self.disk = disk
        self.proxy = proxy
        self.kafka = kafka

    def applies(self, fault: str) -> bool:
        if fault.startswith("s3-"):
            return self.proxy is not None
        if fault.startswith("kafka-"):
            return self.kafka is not None
        return fault != "none"

    def begin(self, fault: str, delay: float) -> None:
        if not self.applies(fault):
            return
        log.info("fault on: %s", fault)
        if fault == "disk-full":
            self.disk.fill()
        elif fault == "disk-readonly":
            self.disk.make_readonly()
        elif fault == "disk-removed":
            self.disk.remove_all()
        elif fault.startswith("s3-") and self.proxy is not None:
            self.proxy.down(fault.removeprefix("s3-"), delay=delay)
        elif fault == "kafka-down" and self.kafka is not None:
            self.kafka.kill()
        elif fault == "kafka-stall" and self.kafka is not None:
            self.kafka.freeze()

    def end(self, fault: str) -> None:
        if not self.applies(fault):
            return
        log.info("fault off: %s", fault)
        if fault.startswith("disk-"):
            self.disk.clear()
            if fault == "disk-removed":
                self.disk.restore_dirs()
        elif fault.startswith("s3-") and self.proxy is not None:
            self.proxy.up()
        elif fault == "kafka-down" and self.kafka is not None:
            self.kafka.revive()
        elif fault == "kafka-stall" and self.kafka is not None:
            self.kafka.thaw()
