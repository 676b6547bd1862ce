"""The concurrency torture test (issue 21) through real mounts: hybridfs/bench/torture.py does the work.

Two mounts of one prefix (both through the S3 fault proxy, which delays, holds, stalls, resets and fails a few
percent of their requests) and a boto3 writer; 8 client threads change and read a few dozen files; a tiny cache
keeps hydrations and evictions running. The checker's report is printed; any anomaly fails the test.

HYBRIDFS_TORTURE_SEED replays a workload (the seed is printed); HYBRIDFS_TORTURE_SECONDS sets the length (90 s
by default: CI runs it; `hybridfs bench torture --minutes N` runs it long).
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from helpers import Stack
from s3proxy import S3FaultProxy

from hybridfs.bench import torture

SECONDS = float(os.environ.get("HYBRIDFS_TORTURE_SECONDS", "90"))


@pytest.mark.slow
def test_torture_two_mounts_a_writer_and_faults(
    s3_proxy: S3FaultProxy, mount_factory: Any, s3: Any, prefix: str, stack: Stack,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed = int(os.environ.get("HYBRIDFS_TORTURE_SEED") or random.SystemRandom().randrange(2**32))
    mounts = [mount_factory(extra_args=[*torture.MOUNT_ARGS, "--endpoint-url", s3_proxy.url]) for _ in range(2)]
    for mount in mounts:
        mount.allow_log(torture.FAULT_LOG_LINES)
        mount.allow_log(torture.LOAD_LOG_LINES)
    targets = [torture.Target(label, m.path, m.proc.pid, m.cache_dir, m.state_dir)
               for label, m in zip("AB", mounts, strict=True)]
    settings = torture.Settings(seed=seed, seconds=SECONDS)
    with capsys.disabled():
        report = torture.run(settings, targets, s3, stack.bucket, prefix, s3_proxy,
                             say=lambda line: print(line, flush=True))
        print(report.text(), flush=True)
    assert not report.anomalies, f"seed {seed}: replay with HYBRIDFS_TORTURE_SEED={seed}\n{report.text()}"
