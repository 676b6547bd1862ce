"""The bench's plan and report around the floor (issue 23): the systems, the workload, the ratio columns."""

from __future__ import annotations

from hybridfs.bench import plan
from hybridfs.bench.report import markdown, targets, to_json
from hybridfs.bench.runner import MetricResult, Results


def _results() -> Results:
    [stat] = [m for m in plan.METRICS if m.name == "request-stat"]
    r = MetricResult(stat, "")
    r.runs = {"hybridfs": [9000.0, 8000.0, 10000.0], "floor": [10000.0] * 3, "s3fs": [20000.0] * 3}
    return Results(plan.TINY, ["hybridfs", "floor", "s3fs"], [r], started=0.0)


def test_floor_is_a_default_system_and_requests_a_workload() -> None:
    assert "floor" in plan.SYSTEMS and "floor" in plan.FUSE_SYSTEMS and "floor" in plan.BASELINES
    assert [w.name for w in plan.select(["requests"])] == ["requests"]
    assert [w.name for w in plan.select(["request-*"])] == ["requests"]
    assert [m.name for m in plan.select(["requests"])[0].metrics] == ["request-stat", "request-getxattr"]


def test_report_shows_hybridfs_and_s3fs_relative_to_the_floor() -> None:
    results = _results()
    table = markdown(results, {}, "hybridfs bench", None)
    head = next(line for line in table.splitlines() if line.startswith("| Workload"))
    assert "| vs floor |" in head and "| s3fs vs floor |" in head
    row = next(line for line in table.splitlines() if line.startswith("| stat, every call a request"))
    assert "| 0.90x | 0.45x | 2.00x |" in row  # hybridfs/floor, hybridfs/s3fs, s3fs/floor
    workload = to_json(results, {}, "hybridfs bench")["workloads"][0]
    assert workload["ratios"]["floor"] == 0.9 and workload["peer_ratios"] == {"s3fs vs floor": 2.0}
    [target] = [t for t in targets(results) if t["metric"] == "request-stat"]
    assert target == {"metric": "request-stat", "baseline": "floor", "min_ratio": 0.9, "ratio": 0.9, "met": True}
