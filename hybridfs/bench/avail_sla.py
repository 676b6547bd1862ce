"""The figure users quote: a system's availability over a year, from what the bench measured in each phase group.

The model (docs/availability.md, "Over a year"): a year has 525,600 minutes. A component with availability A_c is
down (1 - A_c) of the year; during that time a system serves the share of ops it served in the measured phases of
that component's outage (``served[group]``), and the rest of the year the share it served in the no-fault phases.
Outages of different components are assumed never to overlap, so::

    yearly = served["no fault"] * (1 - sum(d_c)) + sum(d_c * served[group_c])    where d_c = 1 - A_c

A component whose outage the schedule did not include is counted as fault-free time (its d_c goes to the no-fault
share) and is reported as not measured.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MINUTES_PER_YEAR = 525_600
# --sla names -> the phase group (avail_schedule.GROUPS) that measures an outage of that component
COMPONENTS = {"local": "local faults", "s3": "S3 outage", "kafka": "Kafka outage"}
NO_FAULT = "no fault"
DEFAULT_SLA = {"local": 99.9, "s3": 99.99, "kafka": 99.9}  # percent


def parse_sla(text: str) -> dict[str, float]:
    """``local=99.9,s3=99.99,kafka=99.9`` -> percent per component; components not named keep their default."""
    sla = dict(DEFAULT_SLA)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in COMPONENTS:
            raise ValueError(f"--sla: {part!r} is not NAME=PERCENT with NAME one of {', '.join(COMPONENTS)}")
        try:
            pct = float(value.rstrip("% "))
        except ValueError:
            raise ValueError(f"--sla: {part!r}: {value!r} is not a number") from None
        if not 0 <= pct <= 100:
            raise ValueError(f"--sla: {part!r}: a percentage between 0 and 100")
        sla[name] = pct
    if sum(100 - v for v in sla.values()) > 100:
        raise ValueError("--sla: the components' outages add up to more than a year")
    return sla


def describe_sla(sla: Mapping[str, float]) -> str:
    """``local disk 99.9 % (525.6 min/yr down), ...``: the inputs of the model, in the report's words."""
    names = {"local": "local disk", "s3": "S3", "kafka": "Kafka"}
    return ", ".join(f"{names[c]} {sla[c]:g} % ({MINUTES_PER_YEAR * (100 - sla[c]) / 100:,.1f} min down a year)"
                     for c in COMPONENTS)


@dataclass(frozen=True)
class Yearly:
    availability: float  # fraction of the year's ops served
    unmeasured: tuple[str, ...]  # components whose outage the schedule did not include (counted as fault-free)

    @property
    def minutes_down(self) -> float:
        return MINUTES_PER_YEAR * (1.0 - self.availability)

    @property
    def nines(self) -> float | None:
        """-log10(unavailability): 3.0 for 99.9 %; None when nothing failed (no finite number of nines)."""
        down = 1.0 - self.availability
        return None if down <= 0 else -math.log10(down)


def yearly(served: Mapping[str, float | None], sla: Mapping[str, float]) -> Yearly:
    """The modelled yearly availability from the share of ops served per phase group (None: not measured)."""
    base = served.get(NO_FAULT)
    if base is None:
        raise ValueError("no ops in a no-fault phase: the model needs the system's fault-free availability")
    total, down_total, unmeasured = 0.0, 0.0, []
    for component, group in COMPONENTS.items():
        share = served.get(group)
        if share is None:
            unmeasured.append(component)
            continue
        down = (100.0 - sla[component]) / 100.0
        down_total += down
        total += down * share
    total += (1.0 - down_total) * base
    return Yearly(min(1.0, max(0.0, total)), tuple(unmeasured))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the repetitions' figures."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
