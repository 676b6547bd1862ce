"""Run a slow first-run step (Maven resolve, go build) with its output in a log and a live ticker on stderr.

On a terminal a tqdm line shows the elapsed time, the steps seen and the latest step (cut to the terminal's width);
elsewhere (CI logs, no carriage returns) a plain line every ``quiet_interval`` seconds, so a user always sees the
step is alive.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm


class _Tail:
    """Copies a child's output into a log file and remembers how many steps it reported and the last one."""

    def __init__(self, is_step: Callable[[str], bool]) -> None:
        self.is_step = is_step
        self.steps = 0
        self.last = ""
        self.lines: list[str] = []

    def pump(self, source: TextIO, log: TextIO) -> None:
        for line in source:
            log.write(line)
            log.flush()
            line = line.rstrip()
            self.lines = [*self.lines[-19:], line]
            if self.is_step(line):
                self.steps += 1
                self.last = line


def run_with_progress(
    argv: Sequence[str],
    *,
    label: str,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path,
    is_step: Callable[[str], bool] = bool,
    quiet_interval: float = 15.0,
    out: TextIO | None = None,
) -> tuple[int, list[str]]:
    """Run ``argv`` to completion; returns (exit status, last output lines)."""
    out = out or sys.stderr
    tty = out.isatty()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail = _Tail(is_step)
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        proc = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env), cwd=cwd, text=True, errors="replace",
        )  # fmt: skip
        assert proc.stdout is not None
        reader = threading.Thread(target=tail.pump, args=(proc.stdout, log), daemon=True)
        reader.start()
        next_quiet = start + quiet_interval
        ticker = tqdm(desc=f"    {label}", file=out, leave=False, dynamic_ncols=True,
                      bar_format="{desc}: {elapsed}, {n} steps{postfix}") if tty else None
        while proc.poll() is None:
            time.sleep(1.0 if tty else 0.5)
            if ticker is not None:
                ticker.set_postfix_str(tail.last, refresh=False)
                ticker.update(tail.steps - ticker.n)
            elif time.monotonic() >= next_quiet:
                print(f"    {label}: {time.monotonic() - start:.0f}s, {tail.steps} steps so far", file=out, flush=True)
                next_quiet += quiet_interval
        reader.join(timeout=5)
    if ticker is not None:
        ticker.close()
    elapsed = time.monotonic() - start
    print(f"    {label}: done in {elapsed:.0f}s (exit {proc.returncode})", file=out, flush=True)
    return proc.returncode, tail.lines
