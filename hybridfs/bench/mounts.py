"""The three FUSE filesystems under test, each on its own prefix of the same bucket, with start/stop/wipe.

Every mount runs in the foreground in its own session (Ctrl-C on the terminal reaches only the runner, which
then unmounts in order) and logs to a file. ``stop`` always ends with nothing mounted and no process left:
``fusermount3 -u``, wait, then SIGTERM, SIGKILL and a lazy unmount as the fallbacks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hybridfs.stack.config import ACCESS_KEY, BUCKET, KAFKA_BOOTSTRAP, REGION, S3_ENDPOINT, SECRET_KEY

log = logging.getLogger("hybridfs.bench")

MOUNT_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 120.0  # a hybridfs unmount waits for uploads in flight


class MountError(RuntimeError):
    pass


class FuseMount:
    """One filesystem mounted on ``mountpoint`` over ``s3://BUCKET/prefix`` with a cache in ``cache_dir``."""

    name = "fuse"
    binary = ""
    on_s3 = True  # over s3://BUCKET/prefix (the floor passthrough mirrors a local directory instead)

    def __init__(self, base: Path, prefix: str, logs: Path) -> None:
        self.base = base
        self.prefix = prefix.strip("/")
        self.mountpoint = base / "mnt"
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.cold = False  # the current (or last) start was a cold one
        self.label = ""  # set when one run has several mounts of this filesystem: names the log file
        self.endpoint = S3_ENDPOINT  # `bench availability` puts a fault proxy here
        self.cache_override: Path | None = None  # ... and the cache on a disk it can fault

    @property
    def cache_dir(self) -> Path:
        """The warm cache persists across restarts; a cold start gets a separate cache, emptied first."""
        if self.cache_override is not None:
            return self.cache_override
        return self.base / ("cache-cold" if self.cold else "cache")

    # -- what differs per filesystem

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def available(self) -> str | None:
        """None when this filesystem can run here, else why not."""
        if self.binary and shutil.which(self.binary) is None:
            return f"{self.binary} is not installed (scripts/bootstrap installs it from Debian)"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        return None

    def key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}"

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.label or self.name}.log"

    # -- lifecycle

    @property
    def mounted(self) -> bool:
        """Attached, answering or not (a crashed FUSE process leaves a mount that stat() cannot see)."""
        return is_mounted(self.mountpoint)

    def start(self) -> None:
        for d in (self.mountpoint, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.mounted:
            raise MountError(f"{self.mountpoint} is already mounted")
        argv, env = self.command()
        self.starts += 1
        with open(self.log_path, "ab") as logf:
            logf.write(f"==> start {self.starts}: {' '.join(argv)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            if os.path.ismount(self.mountpoint):  # attached and answering
                return
            status = self.proc.poll()
            if status is not None:
                self.proc = None
                raise MountError(f"{self.name} exited with status {status} before mounting; see {self.log_path}")
            time.sleep(0.05)
        self.stop()
        raise MountError(f"{self.name} did not mount within {MOUNT_TIMEOUT:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        """Unmount and end the process; never raises (cleanup must carry on), logs what it had to force."""
        proc, self.proc = self.proc, None
        if self.mounted:
            result = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, text=True,
                                    check=False)
            if result.returncode != 0:
                # Seen right after a start (EBUSY): waiting out UNMOUNT_TIMEOUT would only wait for nothing. The
                # daemon's own SIGTERM path finishes its uploads and unmounts (it did at once in both cases seen).
                log.warning("%s: fusermount3 -u failed: %s; asking the daemon to stop (SIGTERM)", self.name,
                            result.stderr.strip())
                if proc is not None:
                    _signal(proc, signal.SIGTERM)
        if proc is not None:
            try:
                proc.wait(timeout=UNMOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s: still running %.0fs after unmount; SIGTERM", self.name, UNMOUNT_TIMEOUT)
                _signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    _signal(proc, signal.SIGKILL)
                    proc.wait(timeout=15)
            if proc.returncode not in (0, None):
                log.info("%s exited with status %s; see %s", self.name, proc.returncode, self.log_path)
        if self.mounted:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False)

    def wipe_cold(self) -> None:
        """Empty what a cold start must not find (only while unmounted)."""
        if self.proc is not None or self.mounted:
            raise MountError(f"{self.name}: cannot wipe the cache of a running mount")
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def ensure(self, *, cold: bool) -> None:
        """Be mounted: warm (the persistent cache) or, with ``cold``, freshly restarted on an empty cache."""
        if not cold and not self.cold and self.proc is not None and self.proc.poll() is None and self.mounted:
            return
        self.stop()
        self.cold = cold
        if cold:
            self.wipe_cold()
        self.start()


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as fh:
            return any(_unescape(line.split()[4]) == target for line in fh)
    except OSError:
        return os.path.ismount(path)


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _signal(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)


class HybridfsMount(FuseMount):
    name = "hybridfs"

    def __init__(self, base: Path, prefix: str, logs: Path, topic_prefix: str, cache_size: int,
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(base, prefix, logs)
        self.base_topic_prefix = topic_prefix
        self.topic_prefix = topic_prefix
        self.cache_size = cache_size
        self.extra_args = extra_args
        self.topics_used: list[str] = []
        self.kafka = KAFKA_BOOTSTRAP
        self.state_override: Path | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.topic_prefix not in self.topics_used:
            self.topics_used.append(self.topic_prefix)
        argv = [
            sys.executable, "-m", "hybridfs", "mount", f"s3://{BUCKET}/{self.prefix}", str(self.mountpoint),
            "--cache-dir", str(self.cache_dir), "--state-dir", str(self.state_dir),
            "--kafka", self.kafka, "--topic-prefix", self.topic_prefix, "--cache-size", str(self.cache_size),
            "--endpoint-url", self.endpoint, *self.extra_args,
        ]  # fmt: skip
        env = {**os.environ, **_s3_env()}
        env.pop("JOURNAL_STREAM", None)
        return argv, env

    @property
    def state_dir(self) -> Path:
        if self.state_override is not None:
            return self.state_override
        return self.base / ("state-cold" if self.cold else "state")

    def wipe_cold(self) -> None:
        """A cold start also gets a state directory and topics of its own, so no hydrate event of an earlier
        run is replayed into this run's empty cache while it is being measured."""
        super().wipe_cold()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.topic_prefix = f"{self.base_topic_prefix}-c{self.starts + 1}"

    def start(self) -> None:
        if not self.cold:
            self.topic_prefix = self.base_topic_prefix
        super().start()


class S3fsMount(FuseMount):
    name = "s3fs"
    binary = "s3fs"

    def command(self) -> tuple[list[str], dict[str, str]]:
        passwd = self.base / "passwd-s3fs"
        passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        passwd.chmod(0o600)
        options = ",".join([
            f"url={self.endpoint}", "use_path_request_style", f"passwd_file={passwd}", f"use_cache={self.cache_dir}",
        ])  # fmt: skip
        argv = ["s3fs", f"{BUCKET}:/{self.prefix}", str(self.mountpoint), "-f", "-o", options]
        return argv, dict(os.environ)


class FloorMount(FuseMount):
    """benchmarks/passthrough.py: a bare pyfuse3 + trio passthrough of a local directory (``cache_dir``, on the
    cache disk), with hybridfs's kernel-facing settings: the least a FUSE request served in Python costs."""

    name = "floor"
    on_s3 = False
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "passthrough.py"

    @property
    def cache_dir(self) -> Path:
        return self.base / "src"  # what it mirrors; kept across restarts, like a warm cache

    def wipe_cold(self) -> None:
        """Nothing to wipe: the source is the only copy. A "cold" start is a fresh mount (the kernel's caches of
        the mount are empty), which is what the listing workload measures."""

    def available(self) -> str | None:
        if not self.script.is_file():
            return f"{self.script} is missing (run from a source checkout)"
        return super().available()

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, str(self.script), str(self.cache_dir), str(self.mountpoint)], dict(os.environ)


class RcloneMount(FuseMount):
    name = "rclone"
    binary = "rclone"

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        env.pop("AWS_CA_BUNDLE", None)  # rclone 1.60's S3 backend refuses to start with it set (STACK-NOTES)
        env.update({
            "RCLONE_CONFIG_HFSBENCH_TYPE": "s3",
            "RCLONE_CONFIG_HFSBENCH_PROVIDER": "Minio",
            "RCLONE_CONFIG_HFSBENCH_ENDPOINT": self.endpoint,
            "RCLONE_CONFIG_HFSBENCH_ACCESS_KEY_ID": ACCESS_KEY,
            "RCLONE_CONFIG_HFSBENCH_SECRET_ACCESS_KEY": SECRET_KEY,
            "RCLONE_CONFIG_HFSBENCH_REGION": REGION,
        })  # fmt: skip
        argv = ["rclone", "mount", f"hfsbench:{BUCKET}/{self.prefix}", str(self.mountpoint),
                "--vfs-cache-mode", "full", "--cache-dir", str(self.cache_dir), "--config", os.devnull]
        return argv, env


def _s3_env() -> dict[str, str]:
    from hybridfs.stack.config import stack_env

    return stack_env()
