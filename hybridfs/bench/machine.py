"""A description of the machine a run came from: enough to tell two result tables apart."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from hybridfs import __version__
from hybridfs.stack.config import KAFKA_VERSION, MINIO_VERSION


def _first_line(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    except OSError:
        return None
    return round(int(match.group(1)) / 1024**2, 1) if match else None


def _filesystem_of(path: Path) -> dict[str, str]:
    """Device and filesystem type of the mount holding ``path`` (the cache disk)."""
    path = path.resolve()
    best = ("", "", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
    except OSError:
        pass
    st = os.statvfs(path)
    return {"device": best[0], "mounted_on": best[1], "fstype": best[2],
            "size_gib": f"{st.f_blocks * st.f_frsize / 1024**3:.0f}",
            "free_gib": f"{st.f_bavail * st.f_frsize / 1024**3:.0f}"}


def describe(work_dir: Path) -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "hostname": socket.gethostname(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "load_at_start": [round(x, 2) for x in load],
        "cache_disk": _filesystem_of(work_dir),
        "versions": {
            "hybridfs": __version__,
            "fio": _first_line(["fio", "--version"]),
            "s3fs": _first_line(["s3fs", "--version"]),
            "rclone": _first_line(["rclone", "version"]),
            "minio": MINIO_VERSION,
            "kafka": KAFKA_VERSION,
            "boto3": _module_version("boto3"),
        },
        "s3": "MinIO on 127.0.0.1 (loopback), single drive on the same disk",
    }


def _module_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "unknown"


def one_line(machine: dict[str, Any]) -> str:
    disk = machine.get("cache_disk", {})
    return (f"{machine.get('cores')} cores ({machine.get('cpu')}), {machine.get('memory_gib')} GiB RAM, "
            f"Linux {machine.get('kernel')}, {machine.get('os')}; cache disk {disk.get('device')} "
            f"({disk.get('fstype')}); S3: {machine.get('s3')}; load average at start "
            f"{'/'.join(str(x) for x in machine.get('load_at_start', []))}, at end "
            f"{'/'.join(str(x) for x in machine.get('load_at_end', [])) or '?'}")
