"""Measure what verifying cache checksums costs on warm reads through a real mount (issue 12).

    PYTHONPATH=$PWD .venv/bin/python tests/measure_checksums.py BASE_TREE [ROUNDS]

Mounts this tree (checksums verified on every cache read) and BASE_TREE (a checkout of the commit before them,
e.g. ``git worktree add /tmp/base 23083eb``) side by side on the local stack, with ``--no-events``. Each writes a
64 MiB file (teed into its cache), then, alternating between the two mounts in every round:

* sequential: the whole file with 1 MiB reads (the kernel sends 128 KiB FUSE reads);
* random: 4,000 preads of 4 KiB at random offsets (POSIX_FADV_RANDOM: no kernel read-ahead).

Wall-clock rates are at the mercy of a shared machine, so the daemon's CPU time per pass (utime + stime from
/proc) is reported too: CPU microseconds per MiB read sequentially and per random 4 KiB read.

Before each pass the FUSE file's page cache is dropped (POSIX_FADV_DONTNEED), so every read reaches the daemon,
while the cache file stays in the host's page cache: "warm". Prints MiB/s and reads/s per pass and the median
ratio new/base. Not a test: run it by hand on a quiet machine.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hybridfs.stack import BUCKET, stack_env

MiB = 1024 * 1024
SIZE = 64 * MiB


def mount(tree: str, base: Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    mnt, cache, state = base / name / "mnt", base / name / "cache", base / name / "state"
    for d in (mnt, cache, state):
        d.mkdir(parents=True)
    prefix = f"measure-crc-{name}-{os.getpid()}"
    log = open(base / name / "mount.log", "wb")  # kept open for the mount's life
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridfs", "mount", f"s3://{BUCKET}/{prefix}", str(mnt), "--cache-dir", str(cache),
         "--state-dir", str(state), "--no-events", "--cache-size", "1G"],
        env={**env, "PYTHONPATH": tree}, stdout=log, stderr=subprocess.STDOUT, cwd=tree)
    deadline = time.monotonic() + 30
    while not os.path.ismount(mnt):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"{name}: not mounted; see {base / name / 'mount.log'}")
        time.sleep(0.1)
    return proc, mnt


def drop_fuse_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential(path: Path) -> float:
    drop_fuse_pages(path)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.read(MiB):
            pass
    return SIZE / MiB / (time.perf_counter() - started)


def randomly(path: Path, count: int = 4000) -> float:
    drop_fuse_pages(path)
    offsets = [random.randrange(0, SIZE // 4096) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        started = time.perf_counter()
        for offset in offsets:
            os.pread(fd, 4096, offset)
        return count / (time.perf_counter() - started)
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    base_tree, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    env = {**os.environ, **stack_env()}
    trees = {"new": os.getcwd(), "base": base_tree}
    with tempfile.TemporaryDirectory(prefix="measure-crc-") as tmp:
        procs = {}
        files = {}
        try:
            for name, tree in trees.items():
                procs[name], mnt = mount(tree, Path(tmp), name, env)
                files[name] = mnt / "big.bin"
                files[name].write_bytes(os.urandom(SIZE))
                assert os.getxattr(files[name], "user.hybridfs.state") == b"cached", name
            results: dict[str, dict[str, list[float]]] = {
                n: {"seq": [], "rand": [], "seq_cpu": [], "rand_cpu": []} for n in trees}
            for _ in range(rounds):
                for name in trees:
                    pid = procs[name].pid
                    before = cpu_seconds(pid)
                    results[name]["seq"].append(sequential(files[name]))
                    middle = cpu_seconds(pid)
                    results[name]["rand"].append(randomly(files[name]))
                    after = cpu_seconds(pid)
                    results[name]["seq_cpu"].append((middle - before) * 1e6 / (SIZE / MiB))
                    results[name]["rand_cpu"].append((after - middle) * 1e6 / 4000)
            for name in trees:
                print(f"{name:5} sequential MiB/s {[round(x) for x in results[name]['seq']]}  "
                      f"random 4K reads/s {[round(x) for x in results[name]['rand']]}")
                print(f"{name:5} daemon CPU us/MiB sequential {[round(x) for x in results[name]['seq_cpu']]}  "
                      f"us per random 4K read {[round(x) for x in results[name]['rand_cpu']]}")
            for kind in ("seq", "rand", "seq_cpu", "rand_cpu"):
                ratio = statistics.median(results["new"][kind]) / statistics.median(results["base"][kind])
                print(f"{kind}: median new/base = {ratio:.3f}")
        finally:
            for name, proc in procs.items():
                subprocess.run(["fusermount3", "-u", "-z", str(Path(tmp) / name / "mnt")], check=False)
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
