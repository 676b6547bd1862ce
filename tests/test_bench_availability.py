"""`hybridfs bench availability` end to end on a one-minute schedule of local-disk faults, hybridfs only.

The report's structure is checked, and the claim the bench exists for: hybridfs serves every op through a full,
read-only and removed cache disk (its state directory on that disk too), and no acknowledged write is missing from
S3. The deadline is 5 s rather than the default 2 s so that a loaded shared machine does not decide the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import Stack

SCHEDULE = """
[[phase]]
fault = "none"
seconds = 10
[[phase]]
fault = "disk-full"
seconds = 12
[[phase]]
fault = "none"
seconds = 4
[[phase]]
fault = "disk-readonly"
seconds = 12
[[phase]]
fault = "none"
seconds = 4
[[phase]]
fault = "disk-removed"
seconds = 12
[[phase]]
fault = "none"
seconds = 6
"""


@pytest.mark.slow
def test_hybridfs_serves_every_op_through_local_disk_faults(stack: Stack, s3: Any, tmp_path: Path) -> None:
    schedule = tmp_path / "schedule.toml"
    schedule.write_text(SCHEDULE)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "hybridfs", "bench", "availability", "--no-stack", "--systems", "hybridfs",
         "--schedule", str(schedule), "--deadline", "5", "--settle", "5", "--sla", "local=99.5", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    data = json.loads((out / "availability.json").read_text())
    assert [p["fault"] for p in data["run"]["schedule"]][:2] == ["none", "disk-full"]
    assert data["run"]["settings"]["state_on_safe_disk"] is False  # the fair default: state on the faulted disk
    hfs = data["systems"]["hybridfs"]
    assert set(hfs["groups"]) == {"no fault", "local faults", "S3 outage", "Kafka outage", "all"}
    local = hfs["groups"]["local faults"]
    assert local["ops"] >= 300  # 36 s at 10 ops/s
    assert local["availability_pct"] == 100.0, local["unavailable_by_cause"]
    assert local["read_availability_pct"] == 100.0 and local["write_availability_pct"] == 100.0
    assert local["p50_ms"] is not None and local["p99_ms"] is not None
    assert len(hfs["phases"]) == 7 and hfs["phases"][1]["fault"] == "disk-full"
    durability = hfs["durability"]
    assert durability["checked_in"] == "s3" and durability["acked"] > 100
    assert durability["missing"] == 0 and durability["wrong"] == 0
    (run,) = data["runs"]
    assert len(run["ops"]) == hfs["groups"]["all"]["ops"] and len(run["ops"][0]) == 6
    # the figure over a year: this schedule has no S3 or Kafka phase, so only the local disk's outage counts
    assert data["run"]["sla_pct"] == {"local": 99.5, "s3": 99.99, "kafka": 99.9}
    year = hfs["yearly"]
    assert year["unmeasured"] == ["s3", "kafka"] and len(year["repetitions"]) == 1
    assert 99.0 <= year["availability_pct"]["median"] <= 100.0, year
    assert 0 <= year["minutes_down"]["median"] <= 0.01 * 525_600
    assert 0 < year["p99_no_fault_ms"]["median"] < 5000

    table = (out / "availability.md").read_text()
    assert "| hybridfs | 100 % | 100 % | n/a | n/a |" in table
    assert "Over a year at local disk 99.5 % (2,628.0 min down a year), S3 99.99 %" in table
    assert "Not in this schedule: S3 outage, Kafka outage." in table
    assert f"| hybridfs | {year['availability_pct']['median']:.4f} % |" in table
    assert (out / "availability.png").stat().st_size > 0
    assert not (out / "work").exists()
    left = s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"bench-avail/{data['run']['id']}/")
    assert left.get("KeyCount", 0) == 0
    assert str(out) not in Path("/proc/mounts").read_text()  # every tmpfs and bind mount is gone
