"""`hybridfs bench` end to end on a tiny workload (seconds, not minutes): it measures, writes its JSON, table
and charts, and leaves nothing behind — also when interrupted with Ctrl-C in the middle of a run.

The numbers are not checked beyond being there and positive: benchmarks never decide whether tests pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import Stack, is_mounted, wait_until

BENCH = [sys.executable, "-m", "hybridfs", "bench", "--tiny", "--no-stack"]


def _bench_objects(s3: Any, bucket: str, run_id: str) -> list[str]:
    found = s3.list_objects_v2(Bucket=bucket, Prefix=f"{run_id}/")
    return [o["Key"] for o in found.get("Contents", [])]


def test_bench_tiny_run_writes_results_and_cleans_up(stack: Stack, s3: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [*BENCH, "--runs", "1", "--systems", "hybridfs,disk,boto3",
         "--only", "seq-write-1file,seq-read-warm,small-files", "--out", str(out)],
        capture_output=True, text=True, timeout=55, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("seq-write-1file  hybridfs", "seq-read-warm    boto3     n/a"):
        assert line in result.stdout, result.stdout

    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cores"] == os.cpu_count()
    assert data["run"]["sizes"]["mode"] == "tiny" and data["run"]["interrupted"] is None
    workloads = {w["name"]: w for w in data["workloads"]}
    assert set(workloads) >= {"seq-write-1file", "seq-write-1file-durable", "seq-read-warm", "small-create"}
    write = workloads["seq-write-1file"]
    assert write["unit"] == "MB/s"
    for system in ("hybridfs", "disk", "boto3"):
        assert write["results"][system] > 0 and len(write["runs"][system]) == 1
    assert write["acked_before_durable"]["hybridfs"] is False  # close() returns once S3 holds the object
    # Peak RSS of the process doing the work: the mount, and this bench process for boto3; the disk has none.
    assert write["peak_rss_mib"]["hybridfs"][0] > 10 and write["peak_rss_mib"]["boto3"][0] > 10
    assert "disk" not in write["peak_rss_mib"]
    assert workloads["seq-write-1file-durable"]["results"]["disk"] is None  # no S3 copy: said so
    assert workloads["seq-read-warm"]["results"]["boto3"] is None
    assert "no local cache" in workloads["seq-read-warm"]["notes"]["boto3"]
    assert workloads["seq-read-warm"]["ratios"]["disk"] > 0

    table = (out / "results.md").read_text()
    assert "| seq write, 1 file (close returned) | MB/s |" in table
    assert "peak RSS MiB (hybridfs / boto3)" in table
    assert (out / "bench.png").stat().st_size > 0 and (out / "ratios.png").stat().st_size > 0
    assert not (out / "work").exists()  # scratch data removed
    assert _bench_objects(s3, stack.bucket, data["run"]["id"]) == []


def test_bench_interrupted_unmounts_and_cleans_up(stack: Stack, s3: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    mountpoint = out / "work" / "hybridfs" / "mnt"
    proc = subprocess.Popen(
        [*BENCH, "--runs", "50", "--systems", "hybridfs", "--only", "small-files", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: proc.poll() is not None or os.path.ismount(mountpoint), timeout=30,
                   message="the bench's hybridfs mount")
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert "interrupted" in output
    assert not is_mounted(mountpoint)
    data = json.loads((out / "results.json").read_text())
    assert data["run"]["interrupted"]
    assert _bench_objects(s3, stack.bucket, data["run"]["id"]) == []


def test_bench_floor_and_requests(stack: Stack, tmp_path: Path) -> None:
    """The floor (benchmarks/passthrough.py) runs the same fio jobs, small-file loop and per-request loops as the
    other systems, stays off S3 (no durable column) and leaves nothing mounted."""
    out = tmp_path / "out"
    result = subprocess.run(
        [*BENCH, "--runs", "1", "--systems", "floor,disk", "--only", "rand-read-warm,requests,small-files",
         "--out", str(out)],
        capture_output=True, text=True, timeout=55, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    workloads = {w["name"]: w for w in json.loads((out / "results.json").read_text())["workloads"]}
    for metric in ("rand-read-warm", "request-stat", "request-getxattr", "small-create", "small-read"):
        assert workloads[metric]["results"]["floor"] > 0, (metric, workloads[metric])
        assert workloads[metric]["results"]["disk"] > 0, (metric, workloads[metric])
    assert workloads["request-getxattr"]["notes"] == {}  # ENODATA on both: the name is absent, as intended
    assert workloads["small-create-durable"]["results"]["floor"] is None
    assert "no S3 copy" in workloads["small-create-durable"]["notes"]["floor"]
    assert workloads["rand-read-warm"]["peak_rss_mib"]["floor"][0] > 10  # the passthrough's own process
    assert not is_mounted(out / "work" / "floor" / "mnt") and not (out / "work").exists()
