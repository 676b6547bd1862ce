"""Runs the selected workloads against every system, several times each, and collects every run.

One line of progress per workload and system. Whatever happens (an error, Ctrl-C, SIGTERM) the mounts are
unmounted, the S3 prefixes and Kafka topics of this run are deleted and the scratch data removed; the results
gathered so far are still returned (marked interrupted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from hybridfs.bench import s3 as s3util
from hybridfs.bench.mounts import FloorMount, FuseMount, HybridfsMount, MountError, RcloneMount, S3fsMount
from hybridfs.bench.plan import Metric, Sizes, Workload
from hybridfs.bench.workloads import METRIC_NA, Boto3Subject, Env, FsSubject, NotAvailable, Outcome, Subject
from hybridfs.stack.config import KAFKA_BOOTSTRAP, S3_EVENTS_TOPIC

log = logging.getLogger("hybridfs.bench")

METHODS: dict[str, str] = {
    "seq-write-1file": "seq_write_1file",
    "seq-write-many": "seq_write_many",
    "seq-read-warm": "seq_read_warm",
    "rand-read-warm": "rand_read_warm",
    "requests": "requests",
    "small-files": "small_files",
    "seq-read-cold": "seq_read_cold",
    "list-dir": "list_dir",
    "hydrate-evict": "hydrate_evict",
    "coherence": "coherence",
    "coherence-timers": "coherence_timers",
}


@dataclass
class MetricResult:
    metric: Metric
    description: str
    runs: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    acked_early: dict[str, list[bool]] = field(default_factory=dict)  # per system, per run
    lags: dict[str, list[float]] = field(default_factory=dict)  # per system, per run: close() -> in S3 (s)
    peak_rss: dict[str, list[float]] = field(default_factory=dict)  # per system, per run: MiB (see PeakRss)

    def median(self, system: str) -> float | None:
        values = self.runs.get(system)
        return statistics.median(values) if values else None

    def rss(self, system: str) -> float | None:
        values = self.peak_rss.get(system)
        return max(values) if values else None

    def acked_before_durable(self, system: str) -> bool:
        return any(self.acked_early.get(system, []))

    def note(self, system: str, text: str) -> None:
        notes = self.notes.setdefault(system, [])
        if text not in notes:
            notes.append(text)


@dataclass
class Results:
    sizes: Sizes
    systems: list[str]
    metrics: list[MetricResult]
    started: float
    elapsed: float = 0.0
    interrupted: str | None = None
    run_id: str = ""
    retried: list[str] = field(default_factory=list)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C does: through the cleanup."""
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Cleanup must finish: ignore further Ctrl-C/SIGTERM while it runs (every step is time-bounded)."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class PeakRss:
    """Peak resident memory of the process doing a system's work (the FUSE daemon; boto3: this process) over one
    run: the kernel's high-water mark (VmHWM) is reset before the run (``clear_refs`` 5) and read after it. A
    mount restarted during the run (a cold start) reports the peak of the new process."""

    def __init__(self, subject: Subject) -> None:
        self.subject = subject
        self.reset_ok = False
        self.started_pid = pid = self.pid()
        if pid is not None:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
                self.reset_ok = True
            except OSError as exc:
                log.debug("cannot reset the peak RSS of %s (pid %d): %s", subject.name, pid, exc)

    def pid(self) -> int | None:
        if isinstance(self.subject, Boto3Subject):
            return os.getpid()
        mount = getattr(self.subject, "mount", None)
        proc = getattr(mount, "proc", None)
        return proc.pid if proc is not None and proc.poll() is None else None

    def read_mib(self) -> float | None:
        pid = self.pid()
        if pid is None or (pid == self.started_pid and not self.reset_ok):  # a lifetime peak says nothing
            return None
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            return None
        return None


STACK_WAIT = 180.0  # seconds to wait for the stack when another session restarted it


class StackDown(Exception):
    """The stack went away and did not come back: the run ends (with what it measured)."""


class Runner:
    def __init__(self, sizes: Sizes, workloads: list[Workload], systems: list[str], out_dir: Path, work_dir: Path,
                 *, keep: bool = False, out: TextIO = sys.stdout) -> None:
        self.sizes = sizes
        self.workloads = workloads
        self.systems = systems
        self.out_dir = out_dir
        self.work_dir = work_dir
        self.keep = keep
        self.out = out
        self.run_id = f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        self.logs = out_dir / "logs"
        self.subjects: list[Subject] = []
        self.broken: dict[str, str] = {}  # system -> why it cannot run any more (its mount failed)
        self.retried: list[str] = []  # runs repeated because the stack was restarted under them

    def say(self, text: str, end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    # -- setup

    def _make_subjects(self, env: Env) -> list[Subject]:
        subjects: list[Subject] = []
        cache_size = 4 * (self.sizes.big_file + self.sizes.many_count * self.sizes.many_size) + 2 * 1024**3
        for name in self.systems:
            base = self.work_dir / name
            prefix = f"{self.run_id}/{name}"
            mount: FuseMount | None = None
            if name == "hybridfs":
                # As `hybridfs stack up` sets it up: the bucket's S3 event records are on Kafka (the recommended
                # configuration with MinIO; docs/semantics.md, "Writers outside hybridfs").
                mount = HybridfsMount(base, prefix, self.logs, topic_prefix=self.run_id, cache_size=cache_size,
                                      extra_args=("--s3-events-topic", S3_EVENTS_TOPIC))
            elif name == "s3fs":
                mount = S3fsMount(base, prefix, self.logs)
            elif name == "rclone":
                mount = RcloneMount(base, prefix, self.logs)
            elif name == "floor":
                mount = FloorMount(base, prefix, self.logs)
            if mount is not None:
                why = mount.available()
                if why:
                    self.broken[name] = why
                if mount.on_s3:  # s3fs wants the prefix to exist as a directory; a marker is what all here write
                    env.s3.put_object(Bucket=s3util.BUCKET, Key=f"{prefix}/", Body=b"")
                subjects.append(FsSubject(env, name, base / "mnt", mount))
            elif name == "disk":
                subjects.append(FsSubject(env, name, base / "files"))
            elif name == "boto3":
                subjects.append(Boto3Subject(env, prefix, base))
        return subjects

    # -- the run

    def run(self) -> Results:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        results = Results(self.sizes, self.systems, [], time.time(), run_id=self.run_id)
        for w in self.workloads:
            for m in w.metrics:
                results.metrics.append(MetricResult(m, w.description(self.sizes)))
        env = Env(self.sizes, s3util.client(), self.out_dir / "fio")
        env.scratch.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            with _signals_interrupt():
                self.subjects = self._make_subjects(env)
                for i, workload in enumerate(self.workloads):
                    self._run_workload(workload, results, f"[{i + 1}/{len(self.workloads)}]")
        except KeyboardInterrupt as exc:
            results.interrupted = str(exc) or "SIGINT"
            self.say(f"\ninterrupted ({results.interrupted}): cleaning up")
        except StackDown as exc:
            results.interrupted = str(exc)
            self.say(f"\nstopped: {exc}; cleaning up")
        except Exception as exc:  # a bug in the harness: still clean up and write what was measured
            log.exception("the benchmark run failed")
            results.interrupted = f"error: {exc!r}"
            self.say(f"\nerror: {exc!r} (traceback in {self.out_dir / 'bench.log'}); cleaning up")
        finally:
            with _shielded():
                self._cleanup(env)
            results.elapsed = time.monotonic() - t0
        results.retried = list(self.retried)
        return results

    def _run_workload(self, workload: Workload, results: Results, counter: str) -> None:
        """Run 1 on every system, then run 2 on every system, ...: a burst of load from elsewhere on the machine
        then hits every system alike, which keeps the ratios honest. One summary line per system at the end."""
        mine = [r for r in results.metrics if r.metric in workload.metrics]
        outcome_line: dict[str, str] = {}
        spent: dict[str, float] = {}
        active: list[Subject] = []
        for subject in self.subjects:
            if subject.name in self.broken:
                self._note_all(mine, subject.name, self.broken[subject.name])
                outcome_line[subject.name] = f"n/a: {self.broken[subject.name]}"
            else:
                active.append(subject)
        legend = " ".join(f"{s.name[0]}={s.name}" for s in active)
        self.say(f"{counter} {workload.name}: {workload.description(self.sizes)}")
        self.say(f"      {self.sizes.runs} runs ({legend}): ", end="")
        for run in range(self.sizes.runs):
            for subject in list(active):
                name = subject.name
                method: Callable[[int], Outcome] = getattr(subject, METHODS[workload.name])
                started = time.monotonic()
                rss = PeakRss(subject)
                try:
                    outcome = self._attempt(method, run, workload.name, name)
                except NotAvailable as exc:
                    self._note_all(mine, name, str(exc))
                    outcome_line[name] = f"n/a: {exc}"
                    active.remove(subject)
                    self.say("-", end="")
                    continue
                except MountError as exc:
                    self.broken[name] = f"mount failed: {exc}"
                    log.error("%s %s: %s", workload.name, name, exc)
                    self._note_all(mine, name, self.broken[name])
                    outcome_line[name] = f"error: {exc}"
                    active.remove(subject)
                    self.say("!", end="")
                    continue
                except StackDown:
                    raise
                except Exception as exc:  # one system failing must not end the whole run
                    log.exception("%s on %s failed in run %d", workload.name, name, run + 1)
                    why = f"failed in run {run + 1}: {exc}"
                    self._note_all(mine, name, why)
                    outcome_line[name] = f"error: {why}"
                    active.remove(subject)
                    self.say("!", end="")
                    continue
                finally:
                    spent[name] = spent.get(name, 0.0) + time.monotonic() - started
                self._record(mine, name, outcome, rss.read_mib())
                self.say(name[0], end="")
            self.say(" " if run + 1 < self.sizes.runs else "", end="")
        self.say("")
        for subject in self.subjects:
            name = subject.name
            if name not in outcome_line:
                for r in mine:
                    if name not in r.runs:
                        r.note(name, METRIC_NA.get((name, r.metric.name), "not measured"))
                outcome_line[name] = self._summary(mine, name) + f"  ({spent.get(name, 0.0):.1f}s)"
            elif any(r.runs.get(name) for r in mine):  # failed after some runs: show what it measured
                outcome_line[name] += "; kept: " + self._summary(mine, name)
            self.say(f"      {workload.name:<16} {name:<9} {outcome_line[name]}")

    def _attempt(self, method: Callable[[int], Outcome], run: int, workload: str, system: str) -> Outcome:
        """One run; when it fails because the stack went away (other sessions here restart it), wait for the
        stack and try that run once more."""
        problem = s3util.stack_problem()
        if problem is not None:
            self._wait_stack(problem)
        try:
            return method(run)
        except (NotAvailable, MountError):
            raise
        except Exception as exc:
            problem = s3util.stack_problem()
            if problem is None:
                raise
            log.warning("%s on %s, run %d: %r while the stack was down (%s); retrying once", workload, system,
                        run + 1, exc, problem)
            self._wait_stack(problem)
        self.retried.append(f"{workload} on {system}, run {run + 1}")
        return method(run)

    def _wait_stack(self, problem: str) -> None:
        self.say(f"[stack down: {problem}; waiting up to {STACK_WAIT:.0f}s]", end="")
        still = s3util.wait_for_stack(STACK_WAIT)
        if still is not None:
            raise StackDown(f"the local stack did not come back within {STACK_WAIT:.0f}s: {still}")
        time.sleep(2)  # let it settle (a just-started broker is still electing)

    @staticmethod
    def _note_all(mine: list[MetricResult], system: str, text: str) -> None:
        for r in mine:
            r.note(system, text)

    @staticmethod
    def _record(mine: list[MetricResult], system: str, outcome: Outcome, rss_mib: float | None) -> None:
        for r in mine:
            value = outcome.values.get(r.metric.name)
            if value is None:
                continue
            if rss_mib is not None:
                r.peak_rss.setdefault(system, []).append(rss_mib)
            r.runs.setdefault(system, []).append(value)
            r.acked_early.setdefault(system, []).append(r.metric.name in outcome.acked_early)
            if r.metric.name in outcome.lag:
                r.lags.setdefault(system, []).append(outcome.lag[r.metric.name])
        for note in outcome.notes:
            mine[0].note(system, note)

    @staticmethod
    def _summary(mine: list[MetricResult], system: str) -> str:
        parts = []
        for i, r in enumerate(mine):
            median = r.median(system)
            if median is None:
                continue
            mark = ""
            if r.acked_before_durable(system):
                mark = f" (acked {statistics.median(r.lags[system]):.1f}s before durable)"
            text = f"{r.metric.name} {fmt(median)} {r.metric.unit}{mark}"
            if i == 0:
                runs = "/".join(fmt(v) for v in r.runs[system])
                text += f" [runs {runs}]"
            parts.append(text)
        return "; ".join(parts)

    # -- cleanup

    def _cleanup(self, env: Env) -> None:
        for subject in self.subjects:
            try:
                subject.close()
            except Exception:  # cleanup carries on whatever one step does
                log.exception("stopping %s", subject.name)
        mounts = [s.mount for s in self.subjects if isinstance(s, FsSubject) and s.mount is not None]
        mounts += [m for s in self.subjects if isinstance(s, FsSubject) for m in s.extra_mounts]
        still = [str(m.mountpoint) for m in mounts if m.mounted]
        if still:
            self.say(f"warning: still mounted: {', '.join(still)}")
        if self.keep:
            self.say(f"kept: data under s3://{s3util.BUCKET}/{self.run_id}/ and {self.work_dir}")
            return
        try:
            deleted = s3util.delete_prefix(env.s3, f"{self.run_id}/")
            log.info("deleted %d objects under %s/", deleted, self.run_id)
        except Exception as exc:
            self.say(f"warning: could not delete s3://{s3util.BUCKET}/{self.run_id}/: {exc}")
        topics = [t for s in self.subjects if isinstance(s, FsSubject)
                  for m in [s.mount, *s.extra_mounts] if isinstance(m, HybridfsMount) for t in m.topics_used]
        delete_topics_in_a_child(topics)
        if not still:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def delete_topics_in_a_child(prefixes: list[str]) -> None:
    """``delete_topics`` in a process of its own: the bench process died with SIGSEGV (exit 139) in its cleanup
    after the coherence workloads, before writing its results; in a child, this call is what dies (status -11).
    A crash there now costs the topics, never the results."""
    if not prefixes:
        return
    code = "import sys; from hybridfs.bench.runner import delete_topics; delete_topics(sys.argv[1:])"
    try:
        done = subprocess.run([sys.executable, "-c", code, *prefixes], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("could not delete the bench's Kafka topics: %s", exc)
        return
    if done.returncode != 0:
        log.info("deleting the bench's Kafka topics failed (status %d): %s", done.returncode,
                 done.stderr.strip()[-500:])


def delete_topics(prefixes: list[str]) -> None:
    """Best effort: the Kafka topics the bench's mounts created (all their kinds, the change feed's too)."""
    if not prefixes:
        return
    try:
        from hybridfs.stack import prune

        prune.delete(prune.topics_of(prefixes, prune.existing_topics(KAFKA_BOOTSTRAP)), KAFKA_BOOTSTRAP)
    except Exception as exc:
        log.info("could not delete the bench's Kafka topics: %s", exc)


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"

