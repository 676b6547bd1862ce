"""Issue 23's listing row: `ls -l` of ENTRIES objects written by boto3, on a fresh hybridfs mount and a fresh s3fs
mount over the same objects, RUNS times interleaved (medians), with the S3 requests each `ls -l` sent counted at a
fault proxy (hybridfs.bench.s3proxy) in front of MinIO.

    .venv/bin/hybridfs stack up && .venv/bin/python benchmarks/listing.py [ENTRIES [RUNS [MOUNT ARGS...]]]

Both mounts talk to S3 through the proxy (the same extra hop for both). The `ls -l` is the bench's `list-dir`
(hybridfs/bench/workloads.py): readdir, then an lstat of every entry. HYBRIDFS_PYSPY=FILE records a py-spy flame
graph of the hybridfs mount during its last `ls -l`. HYBRIDFS_REFETCH=1 also times a second `ls -l` on each mount
after 5.5 s (past hybridfs's --dir-cache-time of 5 s: `watch ls -l`), with its requests. MOUNT ARGS go to the
hybridfs mount.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import boto3

from hybridfs.bench.mounts import FuseMount, HybridfsMount, S3fsMount
from hybridfs.bench.runner import delete_topics_in_a_child
from hybridfs.bench.s3 import delete_prefix, put_many
from hybridfs.bench.s3proxy import S3FaultProxy
from hybridfs.stack import S3_ENDPOINT, stack_env


def ls_l(directory: Path, expected: int) -> float:
    started = time.monotonic()
    seen = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            entry.stat(follow_symlinks=False)
            seen += 1
    elapsed = time.monotonic() - started
    if seen != expected:
        raise RuntimeError(f"listed {seen} entries, expected {expected}")
    return elapsed


def requests_by_method(proxy: S3FaultProxy, since: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for method, _path, query in proxy.requests[since:]:
        counts["LIST" if method == "GET" and "list-type" in query else method] += 1
    return counts


def main(entries: int, runs: int, mount_args: tuple[str, ...]) -> None:
    os.environ.update(stack_env())
    base = Path("/tmp/hybridfs-bench-listing")
    shutil.rmtree(base, ignore_errors=True)
    (base / "logs").mkdir(parents=True)
    tag = secrets.token_hex(3)
    prefix, topics = f"bench-list-{tag}", f"bench-list-{tag}"
    s3: Any = boto3.client("s3", endpoint_url=S3_ENDPOINT)
    proxy = S3FaultProxy(upstream=S3_ENDPOINT, max_log=200_000).start()
    hybrid = HybridfsMount(base / "h", prefix, base / "logs", topics, 1 << 30, extra_args=mount_args)
    s3fs = S3fsMount(base / "s", prefix, base / "logs")
    mounts: list[FuseMount] = [hybrid, s3fs]
    for mount in mounts:
        mount.endpoint = proxy.url
    times: dict[str, list[float]] = {m.name: [] for m in mounts}
    counts: dict[str, Counter[str]] = {}
    pyspy = os.environ.get("HYBRIDFS_PYSPY")
    try:
        put_many(s3, [f"{prefix}/list/", *(f"{prefix}/list/e{i:05d}" for i in range(entries))])
        for run in range(runs):
            for mount in mounts:
                mount.ensure(cold=True)
                ls_l(mount.mountpoint, 1)  # mounted and answering; not the listing measured
                since = len(proxy.requests)
                spy = None
                if pyspy and mount is hybrid and run == runs - 1 and mount.proc is not None:
                    fmt = ["--format", "raw"] if pyspy.endswith(".txt") else []
                    spy = subprocess.Popen(["py-spy", "record", "-o", pyspy, "-r", "100", *fmt, "--pid",
                                            str(mount.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                    time.sleep(1.0)
                times[mount.name].append(ls_l(mount.mountpoint / "list", entries))
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(60)
                counts[mount.name] = requests_by_method(proxy, since)
                print(f"run {run + 1} {mount.name}: {times[mount.name][-1]:.2f} s, S3 requests "
                      + ", ".join(f"{op} {n}" for op, n in counts[mount.name].most_common()), flush=True)
                if os.environ.get("HYBRIDFS_REFETCH"):
                    time.sleep(5.5)
                    since = len(proxy.requests)
                    again = ls_l(mount.mountpoint / "list", entries)
                    print(f"run {run + 1} {mount.name}, again after 5.5 s: {again:.2f} s, S3 requests "
                          + ", ".join(f"{op} {n}" for op, n in requests_by_method(proxy, since).most_common()),
                          flush=True)
                mount.stop()
    finally:
        for mount in mounts:
            mount.stop()
        proxy.close()
        delete_prefix(s3, prefix + "/")
        delete_topics_in_a_child(hybrid.topics_used or [topics])
    h, s = statistics.median(times["hybridfs"]), statistics.median(times["s3fs"])
    print(f"\n`ls -l` of {entries} boto3 objects, fresh mounts, medians of {runs}: hybridfs {h:.2f} s, "
          f"s3fs {s:.2f} s, hybridfs vs s3fs {s / h:.2f}x (s3fs time / hybridfs time)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000, int(sys.argv[2]) if len(sys.argv) > 2 else 3,
         tuple(sys.argv[3:]))
