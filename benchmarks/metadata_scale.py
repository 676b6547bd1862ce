"""Issue 13's metadata measures at their full sizes, in one run against the local stack: `ls -l` of a directory of
ENTRIES files (default 10,000) and `git status` over a tree of FILES files (default 4,000), on hybridfs, s3fs and
the bare disk.

    .venv/bin/hybridfs stack up && .venv/bin/python benchmarks/metadata_scale.py [ENTRIES [FILES [MOUNT ARGS...]]]

MOUNT ARGS go to both hybridfs mounts (e.g. `--trusted-attr-timeout 600`).

hybridfs runs as `stack up` sets it up (the change feed and the bucket's S3 event records). Its directory is
written through a mount (so the feed describes every entry); s3fs's is put with boto3 (s3fs's own creates would
take as long, and its listing does not depend on who wrote). Measured, each once, in this order:
- `ls -l`, known: on the mount that wrote the entries, after --dir-cache-time (5 s here), for s3fs after a first
  `ls -l` (its stat cache);
- `ls -l`, cold: a fresh mount (empty cache and state) that replayed the feed; for s3fs a fresh mount;
- `git status` twice on a clone of a FILES-file repository, first and second run.
For the known `ls -l` on hybridfs, the FUSE requests it took are counted (its metrics endpoint), to say where the
time goes. Prints a Markdown table with ratios (s3fs time / hybridfs time: above 1 is hybridfs faster).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import boto3

from hybridfs.bench.mounts import HybridfsMount, S3fsMount
from hybridfs.bench.runner import delete_topics_in_a_child
from hybridfs.bench.s3 import delete_prefix, put_many
from hybridfs.stack import S3_ENDPOINT, stack_env
from hybridfs.stack.config import S3_EVENTS_TOPIC

METRICS, FRESH_METRICS = "127.0.0.1:19871", "127.0.0.1:19872"


def timed(command: str, cwd: Path | None = None) -> float:
    started = time.monotonic()
    subprocess.run(command, shell=True, check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def fuse_requests(address: str = METRICS) -> Counter[str]:
    """FUSE requests answered and S3 requests sent so far, by operation (the mount's Prometheus endpoint)."""
    text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"http://{address}/metrics").read()
    counts: Counter[str] = Counter()
    for line in text.decode().splitlines():
        match = re.match(r'hybridfs_(fuse_requests|s3_http_requests)_total\{.*?(?:op|operation)="(\w+)".*?\} '
                         r'([0-9.e+]+)', line)
        if match:
            kind = "S3 " if match.group(1) == "s3_http_requests" else ""
            counts[kind + match.group(2)] += int(float(match.group(3)))
    return counts


def feed_mode(mountpoint: Path) -> str:
    mode: str = json.loads(os.getxattr(mountpoint, "user.hybridfs.status"))["feed"]["mode"]
    return mode


def make_repo(base: Path, files: int) -> Path:
    repo = base / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for i in range(files):
        d = repo / f"d{i % 40:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.txt").write_text(f"line {i}\n")
    subprocess.run("git add -A && git -c user.email=b@h -c user.name=bench commit -qm init", shell=True, cwd=repo,
                   check=True)
    return repo


def create_through(root: Path, entries: int) -> float:
    root.mkdir(parents=True)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: (root / f"e{i:05d}").write_bytes(b""), range(entries)))
    return time.monotonic() - started


def main(entries: int, files: int, mount_args: tuple[str, ...] = ()) -> None:
    os.environ.update(stack_env())
    base = Path("/tmp/hybridfs-bench-metadata")
    shutil.rmtree(base, ignore_errors=True)
    (base / "logs").mkdir(parents=True)
    tag = secrets.token_hex(3)
    prefix, topics = f"bench-meta-{tag}-h", f"bench-meta-{tag}"
    feed_args = ("--s3-events-topic", S3_EVENTS_TOPIC, "--dir-cache-time", "5", *mount_args)
    writer = HybridfsMount(base / "h", prefix, base / "logs", topics, 1 << 30,
                           extra_args=(*feed_args, "--metrics-address", METRICS))
    fresh = HybridfsMount(base / "h2", prefix, base / "logs", topics, 1 << 30,
                          extra_args=(*feed_args, "--metrics-address", FRESH_METRICS))
    s3fs = S3fsMount(base / "s", f"bench-meta-{tag}-s", base / "logs")
    results: dict[str, dict[str, float]] = {"disk": {}, "hybridfs": {}, "s3fs": {}}
    requests: Counter[str] = Counter()
    cold_requests: Counter[str] = Counter()
    repo = make_repo(base, files)
    s3: Any = boto3.client("s3", endpoint_url=S3_ENDPOINT)
    try:
        disk = base / "disk" / "list"
        create_through(disk, entries)
        results["disk"]["ls -l known"] = results["disk"]["ls -l cold"] = timed(f"ls -l {disk} > /dev/null")
        subprocess.run(["git", "clone", "-q", str(repo), str(base / "disk" / "g")], check=True)
        results["disk"]["git status 1st"] = timed("git status --porcelain > /dev/null", base / "disk" / "g")
        results["disk"]["git status 2nd"] = timed("git status --porcelain > /dev/null", base / "disk" / "g")

        writer.ensure(cold=False)
        print(f"hybridfs: {entries} creates through the mount (8 threads) took "
              f"{create_through(writer.mountpoint / 'list', entries):.1f} s", flush=True)
        time.sleep(6)  # past --dir-cache-time: what the known measure is about
        before = fuse_requests()
        results["hybridfs"]["ls -l known"] = timed(f"ls -l {writer.mountpoint / 'list'} > /dev/null")
        requests = fuse_requests() - before
        started = time.monotonic()
        subprocess.run(["git", "clone", "-q", str(repo), str(writer.mountpoint / "g")], check=True)
        print(f"hybridfs: git clone of {files} files took {time.monotonic() - started:.1f} s", flush=True)
        for run in ("1st", "2nd"):
            results["hybridfs"][f"git status {run}"] = timed("git status --porcelain > /dev/null",
                                                             writer.mountpoint / "g")
        fresh.ensure(cold=False)  # empty cache and state, same feed: it replays it
        deadline = time.monotonic() + 120
        while feed_mode(fresh.mountpoint) != "trusted" and time.monotonic() < deadline:  # replayed, caught up
            time.sleep(0.2)
        before = fuse_requests(FRESH_METRICS)
        results["hybridfs"]["ls -l cold"] = timed(f"ls -l {fresh.mountpoint / 'list'} > /dev/null")
        cold_requests = fuse_requests(FRESH_METRICS) - before

        put_many(s3, [f"{s3fs.prefix}/list/e{i:05d}" for i in range(entries)])
        s3fs.ensure(cold=False)
        results["s3fs"]["ls -l cold"] = timed(f"ls -l {s3fs.mountpoint / 'list'} > /dev/null")
        results["s3fs"]["ls -l known"] = timed(f"ls -l {s3fs.mountpoint / 'list'} > /dev/null")
        started = time.monotonic()
        subprocess.run(["git", "clone", "-q", str(repo), str(s3fs.mountpoint / "g")], check=True)
        print(f"s3fs: git clone of {files} files took {time.monotonic() - started:.1f} s", flush=True)
        for run in ("1st", "2nd"):
            results["s3fs"][f"git status {run}"] = timed("git status --porcelain > /dev/null", s3fs.mountpoint / "g")
    finally:
        for mount in (writer, fresh, s3fs):
            mount.stop()
        for key_prefix in (prefix, s3fs.prefix):
            delete_prefix(s3, key_prefix + "/")
        delete_topics_in_a_child([topics])
    print(f"\nRequests of the known `ls -l` on hybridfs ({entries} entries): "
          + ", ".join(f"{op} {n}" for op, n in requests.most_common()))
    print("Requests of the cold `ls -l` on the fresh hybridfs mount: "
          + ", ".join(f"{op} {n}" for op, n in cold_requests.most_common()))
    print(f"\n| measure ({entries} entries, {files} files) | bare disk | hybridfs | s3fs | s3fs / hybridfs |"
          " hybridfs / disk |")
    print("|---|---|---|---|---|---|")
    for measure in ("ls -l known", "ls -l cold", "git status 1st", "git status 2nd"):
        d, h, s = (results[n][measure] for n in ("disk", "hybridfs", "s3fs"))
        print(f"| {measure} | {d:.2f} s | {h:.2f} s | {s:.2f} s | {s / h:.2f}x | {h / d:.1f}x |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000, int(sys.argv[2]) if len(sys.argv) > 2 else 4_000,
         tuple(sys.argv[3:]))
