"""The systemd unit, for real where possible and emulated where systemd is not PID 1.

``systemd-analyze verify`` checks the unit file itself. The lifecycle tests run the unit's own ExecStart= line
(read from systemd/hybridfs@.service, with ``%i`` and the installation paths pointed at a temporary config) the
way systemd would: NOTIFY_SOCKET is a datagram socket the test listens on (with SO_PASSCRED, so it sees which
process sent each state, as NotifyAccess=main requires), STATE_DIRECTORY/CACHE_DIRECTORY stand in for
StateDirectory=/CacheDirectory=, the EnvironmentFile= is read, and NoNewPrivileges=/CapabilityBoundingSet=/
UMask= are applied with setpriv. Stopping is KillMode=mixed: SIGTERM to the main process.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import MOUNT_TIMEOUT, Mount, Stack, is_mounted, wait_until

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "hybridfs@.service"
INSTALLED_HYBRIDFS = "/usr/local/bin/hybridfs"  # where the unit expects the command (docs/service.md)
CONFIG_DIR = "/etc/hybridfs"
VENV_HYBRIDFS = Path(sys.executable).parent / "hybridfs"
DEFAULT_WRITE_TIMEOUT = 60.0

MiB = 1024 * 1024
WRITE_SIZE = 200 * MiB
PAUSE_AT = 64 * MiB  # eight 8 MiB parts: a multipart upload is under way when the test sends SIGTERM


# -- the unit file


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd keys may repeat), with comments and continuations handled."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path}: cannot parse {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


@dataclass
class Service:
    """One instance of the unit, emulated: its config directory, its directories and its command lines."""

    name: str
    root: Path  # stands in for /etc/hybridfs, /var/lib/hybridfs/NAME, /var/cache/hybridfs/NAME
    unit: dict[str, dict[str, list[str]]] = field(default_factory=lambda: parse_unit(UNIT))

    @property
    def service(self) -> dict[str, list[str]]:
        return self.unit["Service"]

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def config_path(self) -> Path:
        return self.config_dir / f"{self.name}.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def command(self, key: str) -> tuple[str, list[str]]:
        """The unit's ``key=`` command line for this instance: (its prefix such as "-", argv)."""
        values = self.service.get(key, [])
        assert len(values) == 1, f"{UNIT.name}: expected one {key}=, found {values}"
        line = values[0]
        prefix = re.match(r"[-@+!:]*", line).group(0)  # type: ignore[union-attr]
        line = line[len(prefix):]
        line = line.replace("%%", "\0").replace("%i", self.name).replace("\0", "%").replace("$$", "$")
        line = line.replace(INSTALLED_HYBRIDFS, str(VENV_HYBRIDFS)).replace(CONFIG_DIR + "/",
                                                                              f"{self.config_dir}/")
        return prefix, shlex.split(line)

    def sandbox(self) -> list[str]:
        """setpriv with the unit's NoNewPrivileges= and CapabilityBoundingSet= (for root, the bounding set is
        what the process keeps)."""
        argv = ["setpriv"]
        if self.service.get("NoNewPrivileges", ["no"])[-1] in ("yes", "true", "1", "on"):
            argv.append("--no-new-privs")
        caps = " ".join(self.service.get("CapabilityBoundingSet", []))
        if caps:
            keep = ",".join("+" + c.lower().removeprefix("cap_") for c in caps.split())
            argv += ["--bounding-set", f"-all,{keep}"]
        return [*argv, "--"]

    def umask(self) -> int:
        return int(self.service.get("UMask", ["0022"])[-1], 8)

    def environment(self, notify_socket: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}  # keep the terminal log format
        for value in self.service.get("EnvironmentFile", []):
            path = value.removeprefix("-").replace("%i", self.name).replace(CONFIG_DIR + "/",
                                                                              f"{self.config_dir}/")
            if os.path.exists(path) or not value.startswith("-"):
                env.update(read_env_file(Path(path)))
        env["NOTIFY_SOCKET"] = notify_socket
        env["STATE_DIRECTORY"] = str(self.state_dir)
        env["CACHE_DIRECTORY"] = str(self.cache_dir)
        return env


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#;":
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("\"'")
    return values


# -- sd_notify, the receiving side


@dataclass
class Notice:
    at: float
    pid: int
    line: str
    mount_answered: bool | None = None  # READY=1 only: did the mount point answer a stat when it arrived?


class NotifyListener:
    """A NOTIFY_SOCKET: records every state with the sender's pid (SCM_CREDENTIALS), like systemd does."""

    def __init__(self, directory: Path, mountpoint: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.mountpoint = mountpoint
        self.notices: list[Notice] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.closed = False
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        ucred = struct.calcsize("iII")
        while not self.closed:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(ucred))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:ucred])[0]
            for line in data.decode(errors="replace").splitlines():
                notice = Notice(time.monotonic(), pid, line)
                if line == "READY=1":
                    notice.mount_answered = self._answers()
                self.notices.append(notice)

    def _answers(self) -> bool:
        """The mount point is a FUSE mount that answers a stat now (not the empty directory underneath)."""
        try:
            return is_mounted(self.mountpoint) and os.stat(self.mountpoint).st_dev != os.stat(
                self.mountpoint.parent).st_dev
        except OSError:
            return False

    def lines(self) -> list[str]:
        return [n.line for n in self.notices]

    def first(self, line: str) -> Notice | None:
        return next((n for n in self.notices if n.line == line), None)

    def close(self) -> None:
        self.closed = True
        self.thread.join(5)
        self.sock.close()


# -- fixtures


@dataclass
class Running:
    svc: Service
    mount: Mount
    notify: NotifyListener
    writers: list[Writer] = field(default_factory=list)

    def writer(self, name: str, size: int, pause_at: int, seed: str) -> Writer:
        writer = Writer(self.mount.path / name, size, pause_at, seed)
        self.writers.append(writer)
        return writer


@pytest.fixture
def service(stack: Stack, prefix: str, topic_prefix: str) -> Iterator[Service]:
    # A short root keeps the socket path under the 108-byte limit of sun_path.
    root = Path(tempfile.mkdtemp(prefix="hfs-svc-"))
    svc = Service(name="media", root=root)
    for directory in (svc.config_dir, svc.state_dir, svc.cache_dir, root / "mnt"):
        directory.mkdir(parents=True)
    (svc.config_dir / "media.env").write_text(
        f"# what /etc/hybridfs/NAME.env holds in production: secrets the config references\n"
        f"HYBRIDFS_TEST_BOOTSTRAP={stack.bootstrap}\n")
    yield svc
    shutil.rmtree(root, ignore_errors=True)


def write_config(svc: Service, stack: Stack, prefix: str, topic_prefix: str, extra: str = "") -> None:
    """No cache_dir/state_dir: under the unit they come from CacheDirectory=/StateDirectory=."""
    svc.config_path.write_text(textwrap.dedent(f"""\
        [mount]
        source = "s3://{stack.bucket}/{prefix}"
        mountpoint = "{svc.root / 'mnt'}"
        kafka = "${{env:HYBRIDFS_TEST_BOOTSTRAP}}"
        topic_prefix = "{topic_prefix}"
        log_level = "DEBUG"
        """) + textwrap.dedent(extra))
    svc.config_path.chmod(0o600)


def start(svc: Service, stack: Stack, prefix: str, topic_prefix: str, wrapper: Sequence[str] = ()) -> Running:
    """Run ExecStart= as systemd would and wait for READY=1 (or the process to die)."""
    mountpoint = svc.root / "mnt"
    notify = NotifyListener(svc.root, mountpoint)
    _, argv = svc.command("ExecStart")
    log_path = svc.root / "mount.log"
    with open(log_path, "ab") as log:
        log.write(f"==> {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen([*wrapper, *svc.sandbox(), *argv], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=svc.environment(notify.path), umask=svc.umask())
    mount = Mount(path=mountpoint, bucket=stack.bucket, prefix=prefix, cache_dir=svc.cache_dir,
                  state_dir=svc.state_dir, topic_prefix=topic_prefix, proc=proc, log_path=log_path)
    try:
        wait_until(lambda: notify.first("READY=1") or proc.poll() is not None, timeout=MOUNT_TIMEOUT * 2,
                   message="READY=1 or the process to exit")
    except AssertionError:
        pass
    ready = notify.first("READY=1")
    if ready is None:
        mount.cleanup(grace=0)
        notify.close()
        pytest.fail(f"no READY=1 (exit status {proc.poll()}); log:\n{mount.log_tail(60)}")
    return Running(svc, mount, notify)


@pytest.fixture
def run_service(service: Service, stack: Stack, prefix: str, topic_prefix: str) -> Iterator[Any]:
    """run_service(extra_toml) -> Running; cleans up and checks the mount log and exit status afterwards."""
    started: list[Running] = []

    def run(extra: str = "", wrapper: Sequence[str] = ()) -> Running:
        write_config(service, stack, prefix, topic_prefix, extra)
        running = start(service, stack, prefix, topic_prefix, wrapper)
        started.append(running)
        return running

    yield run
    for running in started:
        for writer in running.writers:  # an open file keeps even a lazily detached mount alive
            if writer.proc.poll() is None:
                writer.proc.kill()
                writer.proc.wait(10)
        running.mount.cleanup()
        running.notify.close()
        problems = running.mount.problems([])
        assert not problems, "\n".join(problems) + "\n" + running.mount.log_tail(60)


# -- a large write through the mount, from another process


WRITER = r"""
import hashlib, os, random, sys
path, size, pause_at, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
written = 0
try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    while written < size:
        if written == pause_at:
            print("paused", flush=True)
            sys.stdin.readline()
        chunk = rng.randbytes(min(1 << 20, size - written))
        os.write(fd, chunk)
        written += len(chunk)
    os.close(fd)
except OSError as exc:
    print(f"failed {exc.errno} {exc.strerror} after {written} bytes", flush=True)
    sys.exit(1)
print("done", flush=True)
"""


def expected_sha256(size: int, seed: str) -> str:
    rng, digest, left = random.Random(seed), hashlib.sha256(), size
    while left:
        chunk = rng.randbytes(min(MiB, left))
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


class Writer:
    def __init__(self, path: Path, size: int, pause_at: int, seed: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(size), str(pause_at), seed],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.strip())

    def said(self, word: str) -> bool:
        return any(line.split()[0] == word for line in self.output if line)

    def resume(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self.thread.join(5)
        return code


def multipart_uploads(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Open multipart uploads under ``prefix/``. Listed for the whole bucket and filtered here: MinIO matches
    the Prefix of ListMultipartUploads against whole keys only."""
    keys: list[str] = []
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        keys += [u["Key"] for u in page.get("Uploads", []) if u["Key"].startswith(prefix + "/")]
    return keys


def object_sha256(s3: Any, bucket: str, key: str) -> tuple[int, str]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    digest, size = hashlib.sha256(), 0
    for chunk in body.iter_chunks(MiB):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def object_exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except s3.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def capabilities(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff in /proc/{pid}/status")


# -- tests


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyzer = shutil.which("systemd-analyze")
    if analyzer is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "systemd"], check=False, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
        analyzer = shutil.which("systemd-analyze")
    assert analyzer, "systemd-analyze is missing: install Debian's systemd package (scripts/bootstrap does)"
    verify = [analyzer, "verify", str(UNIT)]
    if os.path.exists(INSTALLED_HYBRIDFS):
        result = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    else:
        # verify checks that ExecStart='s program exists: show it this checkout's hybridfs at the installed
        # path, in a private mount namespace so that the host is left untouched.
        bindir = tmp_path / "bin"
        bindir.mkdir()
        (bindir / "hybridfs").symlink_to(VENV_HYBRIDFS)
        script = f"mount --bind {shlex.quote(str(bindir))} /usr/local/bin && exec {shlex.join(verify)}"
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), (
        f"systemd-analyze verify {UNIT} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def test_unit_promises_what_the_lifecycle_needs() -> None:
    unit = parse_unit(UNIT)
    svc, deps = unit["Service"], unit["Unit"]
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert svc["Restart"] == ["on-failure"] and svc["KillMode"] == ["mixed"]
    assert "network-online.target" in " ".join(deps["After"]).split()
    assert "network-online.target" in " ".join(deps["Wants"]).split()
    assert svc["ExecStart"][0].split()[:4] == [INSTALLED_HYBRIDFS, "mount", "--config", f"{CONFIG_DIR}/%i.toml"]
    assert "--daemon" not in svc["ExecStart"][0]
    # A close() that began just before the drain deadline may take write_timeout more.
    assert seconds(svc["TimeoutStopSec"][0]) > 2 * DEFAULT_WRITE_TIMEOUT + 5
    assert svc["ExecStopPost"][0].startswith("-"), "cleaning a dead mount must not fail the stop"
    assert "fusermount3 -u -z" in svc["ExecStopPost"][0]
    assert "/dev/fuse rw" in svc["DeviceAllow"]
    # Each of these gives the service a mount namespace of its own: the FUSE mount would be invisible outside.
    namespaced = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
                  "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
                  "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                  "ProtectProc", "ProcSubset", "DynamicUser", "RootDirectory", "RootImage", "MountAPIVFS"}
    assert not namespaced & set(svc), f"options that hide the mount: {sorted(namespaced & set(svc))}"


@pytest.mark.slow
def test_sigterm_during_a_large_write_finishes_it_then_unmounts(
    run_service: Any, s3: Any, stack: Stack, prefix: str
) -> None:
    running: Running = run_service()
    mount, notify, proc = running.mount, running.notify, running.mount.proc

    ready = notify.first("READY=1")
    assert ready is not None and ready.mount_answered, "READY=1 arrived before the mount point answered"
    assert ready.pid == proc.pid, f"READY=1 came from pid {ready.pid}, not the main process {proc.pid}"
    wait_until(lambda: any(line.startswith("STATUS=cache ") for line in notify.lines()), timeout=10,
               message="a STATUS= line with cache usage")
    assert capabilities(proc.pid) == 1 << 21, "the mount should run with CAP_SYS_ADMIN only, as in the unit"
    assert any(running.svc.cache_dir.iterdir()), "the cache did not use CacheDirectory="

    seed = "sigterm-finishes"
    writer = running.writer("big.bin", WRITE_SIZE, PAUSE_AT, seed)
    wait_until(lambda: writer.said("paused") or writer.proc.poll() is not None, timeout=120,
               message="the writer to reach its pause point")
    assert writer.said("paused"), writer.output
    key = mount.key("big.bin")
    wait_until(lambda: key in multipart_uploads(s3, stack.bucket, prefix), timeout=30,
               message="the streamed multipart upload to be under way")

    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: notify.first("STOPPING=1"), timeout=10, message="STOPPING=1")
    # Draining: the mount still answers, but nothing new may be opened.
    assert is_mounted(mount.path)
    assert "big.bin" in os.listdir(mount.path)
    with pytest.raises(OSError) as refused:
        open(mount.path / "late.txt", "wb").close()
    assert refused.value.errno == errno.EBUSY

    writer.resume()
    assert writer.finish(timeout=120) == 0, writer.output
    assert proc.wait(DEFAULT_WRITE_TIMEOUT + 30) == 0, mount.log_tail()
    assert not is_mounted(mount.path)

    assert object_sha256(s3, stack.bucket, key) == (WRITE_SIZE, expected_sha256(WRITE_SIZE, seed))
    assert multipart_uploads(s3, stack.bucket, prefix) == []
    lines = notify.lines()
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    assert lines.count("STOPPING=1") == 1
    assert any(line.startswith("STATUS=stopping") for line in lines), lines
    assert all(n.pid == proc.pid for n in notify.notices), "every state must come from the main process"


@pytest.mark.slow
def test_sigterm_with_a_write_that_outlasts_the_drain_fails_it_cleanly(
    run_service: Any, s3: Any, stack: Stack, prefix: str
) -> None:
    write_timeout = 3
    running: Running = run_service(f"write_timeout = {write_timeout}\n")
    mount, notify, proc = running.mount, running.notify, running.mount.proc
    mount.allow_log(r"unmounting with 1 file\(s\) still being written or uploaded")

    writer = running.writer("big.bin", WRITE_SIZE, PAUSE_AT, "sigterm-fails")
    wait_until(lambda: writer.said("paused") or writer.proc.poll() is not None, timeout=120,
               message="the writer to reach its pause point")
    key = mount.key("big.bin")
    wait_until(lambda: key in multipart_uploads(s3, stack.bucket, prefix), timeout=30,
               message="the streamed multipart upload to be under way")

    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(write_timeout + 5 + 30) == 0, mount.log_tail()
    assert time.monotonic() - sent >= write_timeout + 5 - 1, "the drain did not wait for the writer"
    assert not is_mounted(mount.path)
    assert "STOPPING=1" in notify.lines()

    writer.resume()  # its next write meets the detached mount
    assert writer.finish(timeout=60) != 0, writer.output
    assert writer.said("failed"), writer.output
    assert not object_exists(s3, stack.bucket, key), "a half-written file reached S3"
    assert multipart_uploads(s3, stack.bucket, prefix) == []


def test_a_second_sigterm_skips_the_drain(run_service: Any, s3: Any, stack: Stack, prefix: str) -> None:
    running: Running = run_service()  # write_timeout 60: the drain alone would wait 65 s
    mount, notify, proc = running.mount, running.notify, running.mount.proc
    mount.allow_log(r"SIGTERM again: unmounting now")
    writer = running.writer("big.bin", 64 * MiB, 16 * MiB, "second-signal")
    wait_until(lambda: writer.said("paused") or writer.proc.poll() is not None, timeout=60,
               message="the writer to reach its pause point")
    key = mount.key("big.bin")
    wait_until(lambda: key in multipart_uploads(s3, stack.bucket, prefix), timeout=30,
               message="the streamed multipart upload to be under way")
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: notify.first("STOPPING=1"), timeout=10, message="STOPPING=1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, mount.log_tail()
    assert not is_mounted(mount.path)
    writer.resume()
    assert writer.finish(timeout=60) != 0 and writer.said("failed"), writer.output
    assert not object_exists(s3, stack.bucket, key)
    assert multipart_uploads(s3, stack.bucket, prefix) == []


def test_exec_stop_post_detaches_a_dead_mount(run_service: Any) -> None:
    running: Running = run_service()
    mount, svc = running.mount, running.svc
    mount.kill(detach=False)  # on purpose: no clean-exit checks; its log up to the kill is checked
    assert is_mounted(mount.path)
    with pytest.raises(OSError) as dead:  # (a stat of the root may still come from the kernel's cache)
        os.listdir(mount.path)
    assert dead.value.errno == errno.ENOTCONN

    prefix, argv = svc.command("ExecStopPost")
    assert "-" in prefix
    env = svc.environment(running.notify.path)
    result = subprocess.run([*svc.sandbox(), *argv], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mount.path)
    # After a clean stop there is nothing to detach: the command fails, which its "-" prefix ignores.
    again = subprocess.run([*svc.sandbox(), *argv], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0


def syscall_groups() -> dict[str, list[str]]:
    """systemd's named system call sets (``@system-service`` ...), as its analyzer lists them."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def allowed_syscalls(filter_values: list[str]) -> set[str]:
    groups = syscall_groups()

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        assert name in groups, f"unknown system call set {name}"
        return set().union(*(expand(member) for member in groups[name]))

    names = " ".join(filter_values).split()
    assert not any(n.startswith("~") for n in names), "deny-list filters are not handled here"
    return set().union(*(expand(n) for n in names))


def test_a_mount_makes_only_the_system_calls_the_unit_allows(run_service: Any, service: Service) -> None:
    """SystemCallFilter= cannot be applied without systemd; instead every system call of a mount doing a bit of
    everything (start-up, streamed and spooled writes, reads, renames, xattrs, statfs, SIGTERM, unmount) is
    traced and must be in the unit's filter."""
    assert shutil.which("strace"), "strace is missing: install Debian's strace package (scripts/bootstrap does)"
    allowed = allowed_syscalls(service.service["SystemCallFilter"])
    trace = service.root / "strace.out"
    running: Running = run_service(wrapper=["strace", "-f", "-qq", "-o", str(trace)])
    mnt, strace_proc = running.mount.path, running.mount.proc
    main_pid = running.notify.notices[0].pid  # the main process is strace's child

    data = os.urandom(20 * MiB + 5)
    (mnt / "d").mkdir()
    (mnt / "d" / "a.bin").write_bytes(data)
    assert (mnt / "d" / "a.bin").read_bytes() == data
    with open(mnt / "d" / "a.bin", "r+b") as fh:  # a write in the middle: the spool path
        fh.seek(100)
        fh.write(b"patched")
    os.rename(mnt / "d" / "a.bin", mnt / "d" / "b.bin")
    assert os.getxattr(mnt / "d" / "b.bin", "user.hybridfs.state")
    os.statvfs(mnt)
    os.symlink("b.bin", mnt / "d" / "link")
    assert sorted(os.listdir(mnt / "d")) == ["b.bin", "link"]
    for name in ("link", "b.bin"):
        os.unlink(mnt / "d" / name)
    os.rmdir(mnt / "d")

    os.kill(main_pid, signal.SIGTERM)
    assert strace_proc.wait(60) == 0, running.mount.log_tail()
    used = {m.group(1) for line in trace.read_text().splitlines()
            if (m := re.match(r"^\d+\s+([a-z0-9_]+)\(", line))}
    assert {"mount", "umount2", "openat", "sendmsg"} <= used, "the trace missed the mount's own calls"
    outside = sorted(used - allowed)
    assert not outside, f"system calls outside SystemCallFilter= (they would fail with EPERM): {outside}"


# -- /etc/fstab


HELPER = REPO / "systemd" / "mount.hybridfs"


def test_fstab_helper_mounts_in_the_background(stack: Stack, prefix: str, topic_prefix: str, s3: Any,
                                               tmp_path: Path) -> None:
    """mount(8) runs `mount.hybridfs SOURCE DIR -o OPTIONS` for an fstab line of type hybridfs."""
    mnt, cache, state = tmp_path / "mnt", tmp_path / "cache", tmp_path / "state"
    for directory in (mnt, cache, state):
        directory.mkdir()
    config = tmp_path / "fstab.toml"
    config.write_text(f'[mount]\ncache_dir = "{cache}"\nkafka = "{stack.bootstrap}"\n')
    env = {**os.environ, "HYBRIDFS": str(VENV_HYBRIDFS)}
    env.pop("JOURNAL_STREAM", None)
    source = f"s3://{stack.bucket}/{prefix}"
    options = (f"rw,noatime,_netdev,nofail,x-systemd.automount,config={config},state_dir={state},"
               f"topic_prefix={topic_prefix},cache_size=256M,allow_other")

    fake = subprocess.run([str(HELPER), source, str(mnt), "-f", "-o", options], env=env, capture_output=True,
                          text=True, timeout=30)
    assert fake.returncode == 0 and not is_mounted(mnt)
    ro = subprocess.run([str(HELPER), source, str(mnt), "-o", "ro"], env=env, capture_output=True, text=True,
                        timeout=30)
    assert ro.returncode != 0 and "read-only mounts are not supported" in ro.stderr

    result = subprocess.run([str(HELPER), source, str(mnt), "-n", "-o", options], env=env, capture_output=True,
                            text=True, timeout=MOUNT_TIMEOUT + 30)
    pid_match = re.search(r"\(pid (\d+),", result.stdout)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert is_mounted(mnt) and pid_match, result.stdout
        (mnt / "via-fstab.txt").write_bytes(b"mounted from fstab\n")
        body = s3.get_object(Bucket=stack.bucket, Key=f"{prefix}/via-fstab.txt")["Body"].read()
        assert body == b"mounted from fstab\n"
        log_text = (state / "mount.log").read_text()
        assert f"(cache {cache}, {256 * MiB} bytes;" in log_text  # the file and the options both applied
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
    assert pid_match is not None
    pid = int(pid_match.group(1))
    wait_until(lambda: not _alive(pid), timeout=30, message=f"the background mount (pid {pid}) to exit")
    log_text = (state / "mount.log").read_text()
    assert "unmounted" in log_text
    assert not re.search(r"^\S+ (WARNING|ERROR|CRITICAL) ", log_text, re.MULTILINE), log_text


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
