"""Real programs on the bare disk, a hybridfs mount and an s3fs mount of the same MinIO, timed in the same run.

    .venv/bin/hybridfs stack up && .venv/bin/python benchmarks/programs.py [ROUNDS]

Prints a Markdown table of median durations (lower is better) and the hybridfs/s3fs ratio. The tree: 10
directories of 20 small files, one 8 MiB file and a symlink (tar x, rsync -a), and a 30-file git repository
(git clone + commit + fsck). Each round works in a fresh directory of each target.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hybridfs.bench.mounts import FuseMount, HybridfsMount, S3fsMount
from hybridfs.stack import stack_env

PROGRAMS = ("tar x", "rsync -a", "git clone+commit+fsck")


def make_inputs(base: Path) -> tuple[Path, Path, Path]:
    src = base / "src"
    for d in range(10):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(20):
            (src / f"d{d}" / f"f{f}.txt").write_bytes(os.urandom(2000 + 500 * f))
    (src / "big.bin").write_bytes(os.urandom(8 << 20))
    os.symlink("d0/f0.txt", src / "link")
    archive = base / "src.tar"
    subprocess.run(["tar", "cf", str(archive), "-C", str(src), "."], check=True)
    repo = base / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for i in range(30):
        (repo / f"m{i}.py").write_text(f"print({i})\n" * 50)
    subprocess.run("git add -A && git -c user.email=b@h -c user.name=bench commit -qm init", shell=True, cwd=repo,
                   check=True)
    return src, archive, repo


def timed(command: str) -> float:
    started = time.monotonic()
    subprocess.run(command, shell=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def run_round(root: Path, src: Path, archive: Path, repo: Path) -> dict[str, float]:
    git = (f"git clone -q {repo} {root}/g && cd {root}/g && echo x >> m1.py && "
           "git -c user.email=b@h -c user.name=bench commit -qam change && git fsck --no-progress")
    return {"tar x": timed(f"tar xf {archive} -C {root}"),
            "rsync -a": timed(f"rsync -a {src}/ {root}/rs/"),
            "git clone+commit+fsck": timed(git)}


def main(rounds: int) -> None:
    os.environ.update(stack_env())
    base = Path("/tmp/hybridfs-bench-programs")
    shutil.rmtree(base, ignore_errors=True)
    (base / "logs").mkdir(parents=True)
    src, archive, repo = make_inputs(base)
    tag = secrets.token_hex(3)
    mounts: dict[str, FuseMount] = {
        "hybridfs": HybridfsMount(base / "h", f"bench-programs-{tag}-h", base / "logs", f"bench-programs-{tag}",
                                  1 << 30),
        "s3fs": S3fsMount(base / "s", f"bench-programs-{tag}-s", base / "logs"),
    }
    times: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PROGRAMS} for n in ("disk", *mounts)}
    try:
        for number in range(rounds):
            for name in times:
                if name == "disk":
                    root = base / "disk" / f"r{number}"
                else:
                    mounts[name].ensure(cold=False)
                    root = mounts[name].mountpoint / f"r{number}"
                root.mkdir(parents=True)
                for program, seconds in run_round(root, src, archive, repo).items():
                    times[name][program].append(seconds)
    finally:
        for mount in mounts.values():
            mount.stop()
    print("| program | bare disk | hybridfs | s3fs | hybridfs / s3fs (time) |")
    print("|---|---|---|---|---|")
    for program in PROGRAMS:
        med = {name: statistics.median(times[name][program]) for name in times}
        print(f"| {program} | {med['disk']:.2f} s | {med['hybridfs']:.2f} s | {med['s3fs']:.2f} s | "
              f"{med['hybridfs'] / med['s3fs']:.2f}x |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
