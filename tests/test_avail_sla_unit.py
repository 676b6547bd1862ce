"""The figure over a year of `hybridfs bench availability` (hybridfs/bench/avail_sla.py), from hand-made results.

No mount, no stack: phase results made by hand go in, and the figures worked out by hand must come out, both from
the pure model and through the report (JSON and Markdown) that a run writes.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from hybridfs.bench import avail_report
from hybridfs.bench.avail_sla import DEFAULT_SLA, MINUTES_PER_YEAR, parse_sla, spread, yearly

ALL_UP = {"no fault": 1.0, "local faults": 1.0, "S3 outage": 1.0, "Kafka outage": 1.0}


def test_a_system_that_serves_nothing_in_any_outage_is_down_as_long_as_all_components_together() -> None:
    year = yearly({**ALL_UP, "local faults": 0.0, "S3 outage": 0.0, "Kafka outage": 0.0}, DEFAULT_SLA)
    # 0.1 % + 0.01 % + 0.1 % of the year, no overlap: 0.21 % = 1,103.76 minutes
    assert year.availability == pytest.approx(0.9979)
    assert year.minutes_down == pytest.approx(1103.76)
    assert year.nines == pytest.approx(-math.log10(0.0021))
    assert year.unmeasured == ()


def test_serving_through_local_faults_moves_the_figure_to_the_clouds_nines() -> None:
    # the claim: local faults served, S3 outage half served, Kafka outage served -> half of S3's 52.56 minutes
    year = yearly({**ALL_UP, "S3 outage": 0.5}, DEFAULT_SLA)
    assert year.availability == pytest.approx(1 - 0.00005)
    assert year.minutes_down == pytest.approx(26.28)
    assert year.nines == pytest.approx(4.30103, abs=1e-5)
    # write-back: the S3 outage is served, a local fault is not (and 99 % of ops in the fault-free time)
    wb = yearly({"no fault": 0.99, "local faults": 0.0, "S3 outage": 1.0, "Kafka outage": 1.0}, DEFAULT_SLA)
    assert wb.availability == pytest.approx(0.99 * (1 - 0.0021) + 0.0001 + 0.001)
    assert wb.minutes_down == pytest.approx(MINUTES_PER_YEAR * (1 - (0.99 * 0.9979 + 0.0011)))


def test_no_failure_anywhere_has_no_finite_nines() -> None:
    year = yearly(ALL_UP, DEFAULT_SLA)
    assert year.availability == 1.0 and year.minutes_down == 0.0 and year.nines is None


def test_an_outage_not_in_the_schedule_counts_as_fault_free_time_and_is_named() -> None:
    year = yearly({"no fault": 0.999, "local faults": 0.5, "S3 outage": None, "Kafka outage": None}, DEFAULT_SLA)
    assert year.availability == pytest.approx(0.999 * 0.999 + 0.001 * 0.5)
    assert year.unmeasured == ("s3", "kafka")
    with pytest.raises(ValueError, match="no-fault"):
        yearly({"no fault": None, "local faults": 1.0}, DEFAULT_SLA)


def test_parse_sla() -> None:
    assert parse_sla("local=99.9,s3=99.99,kafka=99.9") == DEFAULT_SLA
    assert parse_sla("s3=99.999") == {**DEFAULT_SLA, "s3": 99.999}
    assert parse_sla("local=99%, kafka=100") == {"local": 99.0, "s3": 99.99, "kafka": 100.0}
    for bad in ("disk=99", "local", "local=abc", "s3=101", "local=10,s3=10"):
        with pytest.raises(ValueError, match="--sla"):
            parse_sla(bad)


def test_spread_is_median_min_max() -> None:
    assert spread([99.2, 99.9, 99.5]) == {"median": 99.5, "min": 99.2, "max": 99.9}
    assert spread([3.0]) == {"median": 3.0, "min": 3.0, "max": 3.0}


SCHEDULE = [  # as avail_schedule.describe writes it
    {"fault": "none", "start": 0.0, "seconds": 10.0, "group": "no fault"},
    {"fault": "disk-full", "start": 10.0, "seconds": 10.0, "group": "local faults"},
    {"fault": "s3-stall", "start": 20.0, "seconds": 10.0, "group": "S3 outage"},
    {"fault": "kafka-down", "start": 30.0, "seconds": 10.0, "group": "Kafka outage"},
]


def _ops(served: list[int], latency: float) -> list[list[Any]]:
    """Ten reads per phase, ``served[i]`` of them within the deadline, the others EIO."""
    ops = []
    for phase, good in enumerate(served):
        for i in range(10):
            ops.append(["read", phase * 10.0 + i, phase, latency, "" if i < good else "EIO", "d00/f"])
    return ops


def _data(reps: list[tuple[list[int], float]]) -> dict[str, Any]:
    runs = [{"system": "hybridfs", "repetition": n, "started": "", "durability": {"checked_in": "s3"},
             "log_warnings": {}, "notes": [], "ops": _ops(served, latency)}
            for n, (served, latency) in enumerate(reps, 1)]  # fmt: skip
    return {
        "machine": {}, "runs": runs,
        "run": {"id": "x", "command": "hybridfs bench availability --repeat 3", "elapsed_seconds": 60.0,
                "schedule": SCHEDULE, "schedule_summary": "40 s",
                "settings": {"deadline": 2.0, "rate": 10.0, "state_on_safe_disk": False}},
        "systems": avail_report.summarise(runs, SCHEDULE, 2.0),
    }  # fmt: skip


def test_the_report_gives_each_repetitions_year_and_their_median_and_range() -> None:
    # no fault 100 % / 90 % / 100 %, every outage 0 % served; latencies 10, 30, 20 ms
    data = _data([([10, 0, 0, 0], 0.010), ([9, 0, 0, 0], 0.030), ([10, 0, 0, 0], 0.020)])
    avail_report.add_yearly(data, DEFAULT_SLA)
    year = data["systems"]["hybridfs"]["yearly"]
    low = 100 * (0.9 * 0.9979)  # the second repetition: 90 % the rest of the year
    assert [r["availability_pct"] for r in year["repetitions"]] == pytest.approx([99.79, low, 99.79])
    assert year["availability_pct"] == pytest.approx({"median": 99.79, "min": low, "max": 99.79})
    assert year["minutes_down"]["median"] == pytest.approx(1103.76, abs=0.01)
    assert year["p99_no_fault_ms"] == {"median": 20.0, "min": 10.0, "max": 30.0}
    assert year["unmeasured"] == []

    text = avail_report.markdown(data, None)
    assert "Over a year at local disk 99.9 % (525.6 min down a year), S3 99.99 % (52.6 min" in text
    assert "median [min-max] of 3 repetitions" in text
    row = next(line for line in text.splitlines() if line.startswith("| hybridfs |") and "min" in line)
    # 89.811 % is 10.189 % down: 0.99 nines, 53,553.4 minutes
    assert row == ("| hybridfs | 99.7900 % [89.8110-99.7900] | 2.68 [0.99-2.68] | 1,103.8 min [1,103.8-53,553.4] "
                   "| 20.0 ms [10.0-30.0] |")


def test_the_report_names_the_outages_its_schedule_did_not_have() -> None:
    data = _data([([10, 5, 0, 0], 0.010)])
    for run in data["runs"]:  # a schedule of local faults only: drop the S3 and Kafka phases' ops
        run["ops"] = [op for op in run["ops"] if op[2] < 2]
    data["systems"] = avail_report.summarise(data["runs"], SCHEDULE, 2.0)
    avail_report.add_yearly(data, parse_sla("local=99"))
    year = data["systems"]["hybridfs"]["yearly"]
    assert year["availability_pct"]["median"] == pytest.approx(100 * (0.99 + 0.01 * 0.5))
    assert year["unmeasured"] == ["s3", "kafka"]
    text = avail_report.markdown(data, None)
    assert "| hybridfs | 99.5000 % | 2.30 | 2,628.0 min | 10.0 ms |" in text
    assert "Not in this schedule: S3 outage, Kafka outage." in text
