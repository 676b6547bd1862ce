"""The fault schedule of ``hybridfs bench availability``: phases, one after another, each with at most one fault.

A schedule file is TOML: one ``[[phase]]`` table per phase, in order::

    [[phase]]
    fault = "none"          # see FAULTS
    seconds = 30
    [[phase]]
    fault = "s3-slow"
    seconds = 60
    delay = 1.5             # s3-slow only: seconds added to every S3 request

The default schedule follows the claim's proportions: local storage is faulted about ten times as long as the
cloud (three nines against four: 8.8 hours a year against 53 minutes); docs/availability.md says why.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

# What each fault does (the runner applies it to the system under test, never to the shared stack).
FAULTS = {
    "none": "no fault",
    "disk-full": "the cache disk is filled to 100 % (a file grows until ENOSPC), emptied at the phase end",
    "disk-readonly": "the cache disk is bind-mounted read-only over itself (descriptors opened before stay "
                     "writable), unmounted at the phase end",
    "disk-removed": "everything on the cache disk is removed (rm -rf); at the phase end the empty directories "
                    "come back (a replaced disk)",
    "s3-refuse": "S3 refuses: every connection to the fault proxy is reset at once",
    "s3-stall": "S3 stalls: requests get no answer until the phase ends, then the connection closes",
    "s3-503": "S3 answers every request 503 SlowDown",
    "s3-slow": "S3 is slow: every request waits `delay` seconds (default 2) before it is forwarded",
    "kafka-down": "the run's Kafka broker is killed (SIGKILL) and started again at the phase end",
    "kafka-stall": "the run's Kafka broker is frozen (SIGSTOP) until the phase ends (SIGCONT)",
}
LOCAL_FAULTS = ("disk-full", "disk-readonly", "disk-removed")
CLOUD_FAULTS = ("s3-refuse", "s3-stall", "s3-503", "s3-slow")
KAFKA_FAULTS = ("kafka-down", "kafka-stall")


@dataclass(frozen=True)
class Phase:
    fault: str
    seconds: float
    delay: float = 2.0  # s3-slow

    @property
    def group(self) -> str:
        """The column a phase is reported under."""
        if self.fault in LOCAL_FAULTS:
            return "local faults"
        if self.fault in CLOUD_FAULTS:
            return "S3 outage"
        if self.fault in KAFKA_FAULTS:
            return "Kafka outage"
        return "no fault"


GROUPS = ("no fault", "local faults", "S3 outage", "Kafka outage")


def _gap(seconds: float = 10) -> Phase:
    return Phase("none", seconds)


DEFAULT = (
    Phase("none", 30),
    Phase("disk-full", 50), _gap(15),
    Phase("disk-readonly", 50), _gap(15),
    Phase("disk-removed", 50), _gap(20),
    Phase("s3-refuse", 4), _gap(),
    Phase("s3-stall", 4), _gap(),
    Phase("s3-503", 4), _gap(),
    Phase("s3-slow", 4), _gap(),
    Phase("kafka-down", 30), _gap(20),
)  # fmt: skip


def scaled(phases: tuple[Phase, ...], total: float) -> tuple[Phase, ...]:
    """The same schedule stretched or shrunk to ``total`` seconds (for ``--duration``)."""
    factor = total / sum(p.seconds for p in phases)
    return tuple(Phase(p.fault, round(p.seconds * factor, 2), p.delay) for p in phases)


def load(path: Path) -> tuple[Phase, ...]:
    """Read a schedule file (see the module docstring); ValueError says what is wrong."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read schedule {path}: {exc}") from None
    tables = data.get("phase")
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{path}: no [[phase]] tables")
    phases = []
    for i, table in enumerate(tables, 1):
        fault = table.get("fault", "none")
        seconds = table.get("seconds")
        if fault not in FAULTS:
            raise ValueError(f"{path}: phase {i}: unknown fault {fault!r}; one of {', '.join(FAULTS)}")
        if not isinstance(seconds, int | float) or seconds <= 0:
            raise ValueError(f"{path}: phase {i}: seconds must be a positive number")
        unknown = set(table) - {"fault", "seconds", "delay"}
        if unknown:
            raise ValueError(f"{path}: phase {i}: unknown keys {', '.join(sorted(unknown))}")
        phases.append(Phase(fault, float(seconds), float(table.get("delay", 2.0))))
    return tuple(phases)


def describe(phases: tuple[Phase, ...]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    start = 0.0
    for p in phases:
        entry: dict[str, object] = {"fault": p.fault, "start": round(start, 2), "seconds": p.seconds,
                                    "group": p.group}
        if p.fault == "s3-slow":
            entry["delay"] = p.delay
        out.append(entry)
        start += p.seconds
    return out


def summary(phases: tuple[Phase, ...]) -> str:
    """One line: total time, and time per kind of fault."""
    by_group = {g: sum(p.seconds for p in phases if p.group == g) for g in GROUPS}
    faults = ", ".join(f"{p.fault} {p.seconds:g}s" for p in phases if p.fault != "none")
    return (f"{sum(p.seconds for p in phases):g} s: local-disk faults {by_group['local faults']:g} s, S3 "
            f"{by_group['S3 outage']:g} s, Kafka {by_group['Kafka outage']:g} s ({faults})")
