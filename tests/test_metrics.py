"""Issue 16, metrics: a real mount serves Prometheus metrics on --metrics-address, and they move as a workload says.

Faults are injected over HTTP with the S3 fault proxy (tests/s3proxy.py). The dashboard and the alert rules in
docs/ may only name metrics that a mount exposes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import Mount, run_hybridfs, wait_until
from prometheus_client.parser import text_string_to_metric_families
from s3proxy import Rule, S3FaultProxy

from hybridfs.config import ConfigError, host_and_port

DOCS = Path(__file__).resolve().parent.parent / "docs"
MiB = 1024 * 1024
FAST_S3 = ["--s3-max-attempts", "2", "--s3-connect-timeout", "1", "--s3-read-timeout", "3", "--part-size", "5M",
           "--write-timeout", "5"]
S3_FAILURE_LINES = r"S3 said|closed with changes that are not stored|upload at release failed"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Endpoint:
    def __init__(self, address: str) -> None:
        self.url = f"http://{address}/metrics"

    def text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=10) as resp:
            assert resp.status == 200
            return str(resp.read().decode())

    def samples(self) -> Samples:
        found: Samples = {}
        for family in text_string_to_metric_families(self.text()):
            for s in family.samples:
                found[(s.name, frozenset(s.labels.items()))] = s.value
        return found


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and want <= have)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics_mount(mount_factory: Callable[..., Mount], *extra: str) -> tuple[Mount, Endpoint]:
    address = f"127.0.0.1:{free_port()}"
    mount = mount_factory(extra_args=["--metrics-address", address, *extra])
    return mount, Endpoint(address)


def test_counters_follow_a_workload(mount_factory: Any, s3_proxy: S3FaultProxy, s3: Any) -> None:
    mount, endpoint = metrics_mount(mount_factory, "--endpoint-url", s3_proxy.url, *FAST_S3)
    mount.allow_log(S3_FAILURE_LINES)
    before = endpoint.samples()
    assert value(before, "hybridfs_scrape_complete") == 1
    assert value(before, "hybridfs_s3_breaker_open") == 0

    # A streamed multipart write (2 parts of 5 MiB and a tail), read back from the cache.
    data = os.urandom(11 * MiB)
    with open(mount.path / "big.bin", "wb") as fh:
        for start in range(0, len(data), MiB):
            fh.write(data[start:start + MiB])
    assert (mount.path / "big.bin").read_bytes() == data
    after = endpoint.samples()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("hybridfs_s3_written_bytes_total") >= len(data)
    assert moved("hybridfs_cache_teed_bytes_total") >= len(data)
    assert moved("hybridfs_read_bytes_total", source="cache") == len(data)
    assert moved("hybridfs_fuse_requests_total", op="write", errno="OK") >= len(data) / MiB
    assert moved("hybridfs_fuse_request_duration_seconds_count", op="write") >= len(data) / MiB
    assert moved("hybridfs_s3_requests_total", operation="UploadPart") >= 3
    assert moved("hybridfs_s3_http_requests_total", operation="UploadPart") >= 3
    assert moved("hybridfs_fuse_requests_total", errno="EIO") == 0
    assert value(after, "hybridfs_cache_files") >= 1
    assert value(after, "hybridfs_cache_used_bytes") >= len(data)

    # A file written by another tool is read from S3 (a miss), and its hydrate event travels through Kafka.
    other = os.urandom(300_000)
    s3.put_object(Bucket=mount.bucket, Key=mount.key("other.bin"), Body=other)
    assert (mount.path / "other.bin").read_bytes() == other
    missed = endpoint.samples()
    assert value(missed, "hybridfs_read_bytes_total", source="s3") - value(after, "hybridfs_read_bytes_total",
                                                                           source="s3") == len(other)
    assert value(missed, "hybridfs_s3_read_bytes_total") - value(after, "hybridfs_s3_read_bytes_total") \
        >= len(other)

    def hydrated() -> Samples | None:
        now = endpoint.samples()
        return now if value(now, "hybridfs_hydrations_total", outcome="hydrated") >= 1 else None

    now = wait_until(hydrated, 20, interval=0.2, message="the hydrator to hydrate other.bin")
    assert value(now, "hybridfs_events_published_total") > value(before, "hybridfs_events_published_total")
    assert value(now, "hybridfs_events_produced_total") > value(before, "hybridfs_events_produced_total")
    assert value(now, "hybridfs_events_consumed_total", consumer="hydrator") >= 1
    assert value(now, "hybridfs_hydrated_bytes_total") >= len(other)
    after = now

    # S3 fails every PUT of small.txt (botocore's attempts and the write fence's retry): its close fails with EIO,
    # and the metrics say where and why.
    rule = s3_proxy.add(Rule(method="PUT", path=re.escape(f"/{mount.bucket}/{mount.key('small.txt')}") + "$"))
    with pytest.raises(OSError) as failure:
        (mount.path / "small.txt").write_bytes(b"never stored")
    assert failure.value.errno == errno.EIO
    s3_proxy.remove(rule)
    assert rule.hits >= 2
    failed = endpoint.samples()
    assert value(failed, "hybridfs_fuse_requests_total", op="flush", errno="EIO") \
        - value(after, "hybridfs_fuse_requests_total", op="flush", errno="EIO") == 1
    assert value(failed, "hybridfs_s3_errors_total", operation="PUT", errno="EIO") \
        - value(after, "hybridfs_s3_errors_total", operation="PUT", errno="EIO") >= 1
    assert value(failed, "hybridfs_s3_retries_total", operation="PutObject") \
        - value(after, "hybridfs_s3_retries_total", operation="PutObject") >= 1


def exposed_names(text: str) -> set[str]:
    """Every metric name the exposition declares (``# TYPE`` lines, families without samples too) or samples."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def named_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:hybridfs|process)_[a-z0-9_]+", expr))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DOCS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_dashboard_and_alerts_name_exposed_metrics(mount_factory: Any) -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["type"] in ("row", "timeseries", "stat"), panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
    rules = alert_rules()
    alerts = {rule["alert"] for rule in rules}
    assert {"HybridfsCacheDiskFailing", "HybridfsOutboxGrowing", "HybridfsConsumerLagGrowing",
            "HybridfsS3Down"} <= alerts
    assert all(rule["expr"] and rule["annotations"]["summary"] for rule in rules)

    mount, endpoint = metrics_mount(mount_factory)
    (mount.path / "f.txt").write_bytes(b"x")
    wanted = set().union(*map(named_metrics, dashboard_exprs(dashboard) + [r["expr"] for r in rules]))
    assert "hybridfs_fuse_request_duration_seconds_bucket" in wanted
    # Some families appear with the services' first rounds (disk figures, the census): poll for them.
    missing: set[str] = set()

    def all_exposed() -> bool:
        missing.clear()
        missing.update(wanted - exposed_names(endpoint.text()))
        return not missing

    try:
        wait_until(all_exposed, 15, interval=0.3, message="every metric named in docs/ to be exposed")
    except AssertionError:
        raise AssertionError(f"named in docs/ but not exposed: {sorted(missing)}") from None


def test_metrics_doc_lists_every_exposed_metric(mount_factory: Any) -> None:
    mount, endpoint = metrics_mount(mount_factory)
    (mount.path / "f.txt").write_bytes(b"x")
    documented = set(re.findall(r"`(hybridfs_[a-z0-9_]+)", (DOCS / "metrics.md").read_text()))

    def base(name: str) -> str:
        return re.sub(r"_(total|bucket|sum|count|info)$", "", name)

    def exposed() -> set[str]:
        return {base(n) for n in exposed_names(endpoint.text()) if n.startswith("hybridfs_")}

    wait_until(lambda: value(endpoint.samples(), "hybridfs_cache_disk_size_bytes"), 15, interval=0.3,
               message="the services' first figures")
    names = exposed()
    assert not names - {base(n) for n in documented}, "exposed but not in docs/metrics.md"
    assert not {base(n) for n in documented} - names, "in docs/metrics.md but not exposed"


def test_unusable_metrics_address_is_a_one_line_error(stack: Any, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        result = run_hybridfs("mount", f"s3://{stack.bucket}/metrics-bad-address", str(mnt), "--cache-dir",
                              str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state"), "--no-events",
                              "--metrics-address", f"127.0.0.1:{port}", env=stack.env, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        f"hybridfs: error: metrics_address = '127.0.0.1:{port}': cannot serve metrics there: Address already in use"
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    ("localhost:1", ("localhost", 1)),
])
def test_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert host_and_port(text, "metrics_address") == expected


@pytest.mark.parametrize("text", ["9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":9464", "::1:9464",
                                  "host:port"])
def test_host_and_port_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics_address = .*expected HOST:PORT"):
        host_and_port(text, "metrics_address")
