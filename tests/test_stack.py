"""The local stack is real: Kafka and MinIO answer on loopback; `hybridfs stack` manages them as promised."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from helpers import Stack, run_hybridfs, wait_until

from hybridfs.events.topics import create_topics
from hybridfs.stack import StackPaths, stack_env
from hybridfs.stack.manage import make_services
from hybridfs.stack.prune import SEEN_FILE, delete, existing_topics

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _s3_ready() -> bool:
    try:
        with _no_proxy.open(f"{stack_env()['AWS_ENDPOINT_URL']}/minio/health/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _processes_with_arg(arg: str) -> list[int]:
    """Live (non-zombie) processes with ``arg`` on their command line; for checking, never for killing."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if arg in args and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _pids() -> dict[str, int]:
    pids = {}
    for svc in make_services(StackPaths.from_env()):
        pid = svc.pid()
        assert pid is not None, f"{svc.name}: no live process in {svc.pid_file}"
        pids[svc.name] = pid
    return pids


def test_kafka_message_roundtrip(stack: Stack, topic_prefix: str) -> None:
    topic = f"{topic_prefix}.roundtrip"
    producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})
    producer.produce(topic, key=b"k1", value=b"hello through a real broker")
    assert producer.flush(30) == 0, "message not delivered within 30 s"

    consumer = Consumer({
        "bootstrap.servers": stack.bootstrap,
        "group.id": f"{topic_prefix}-group",
        "auto.offset.reset": "earliest",
    })  # fmt: skip
    consumer.subscribe([topic])
    try:
        msg = wait_until(lambda: consumer.poll(0.5), timeout=30, message=f"a message on {topic}")
        assert msg.error() is None, msg.error()
        assert (msg.key(), msg.value()) == (b"k1", b"hello through a real broker")
        assert msg.topic() == topic
    finally:
        consumer.close()


def test_s3_object_roundtrip(stack: Stack, s3: Any, prefix: str) -> None:
    key = f"{prefix}/dir/hello.txt"
    body = os.urandom(256 * 1024)
    s3.put_object(Bucket=stack.bucket, Key=key, Body=body, Metadata={"mode": "33188", "uid": "0"})

    got = s3.get_object(Bucket=stack.bucket, Key=key)
    assert got["Body"].read() == body
    assert got["Metadata"] == {"mode": "33188", "uid": "0"}
    listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"{prefix}/")
    assert [obj["Key"] for obj in listed["Contents"]] == [key]


def test_status_reports_both_up(stack: Stack) -> None:
    out = run_hybridfs("stack", "status").stdout.splitlines()
    assert [line.split()[:2] for line in out] == [["kafka", "up"], ["s3", "up"]]
    pids = _pids()
    assert f"(pid {pids['kafka']})" in out[0] and stack.bootstrap in out[0]
    assert f"(pid {pids['s3']})" in out[1] and stack.endpoint in out[1]


@pytest.mark.parametrize("service", [None, "kafka", "s3"])
def test_env_output_matches(stack: Stack, service: str | None) -> None:
    args = ["stack", "env"] + ([service] if service else [])
    parsed = {}
    for line in run_hybridfs(*args).stdout.splitlines():
        word, assignment = shlex.split(line)
        assert word == "export"
        key, _, value = assignment.partition("=")
        parsed[key] = value
    assert parsed == stack_env(service)
    if service is None:
        assert parsed == stack.env
        assert set(parsed) == {
            "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "HYBRIDFS_KAFKA_BOOTSTRAP", "HYBRIDFS_BUCKET", "HYBRIDFS_S3_EVENTS_TOPIC",
        }  # fmt: skip


def test_env_evals_in_a_shell(stack: Stack) -> None:
    script = 'eval "$("$0" -m hybridfs stack env)"; echo "$AWS_ENDPOINT_URL $HYBRIDFS_KAFKA_BOOTSTRAP"'
    out = subprocess.run(["bash", "-c", script, sys.executable], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [stack.endpoint, stack.bootstrap]


def test_up_twice_keeps_one_process_per_service(stack: Stack) -> None:
    before = _pids()
    for _ in range(2):
        out = run_hybridfs("stack", "up").stdout
        assert out.count("already running") == 2, out
    assert _pids() == before
    for svc in make_services(StackPaths.from_env()):
        assert _processes_with_arg(svc.marker) == [before[svc.name]], svc.name


def test_s3_down_and_up_keeps_data(stack: Stack, s3: Any, prefix: str, tmp_path: Path) -> None:
    key = f"{prefix}/survivor"
    s3.put_object(Bucket=stack.bucket, Key=key, Body=b"still here")
    old_pid = _pids()["s3"]
    paths = StackPaths.from_env()
    try:
        out = run_hybridfs("stack", "down", "s3").stdout
        assert out.split()[:2] == ["s3", "down"] and str(old_pid) in out
        assert not paths.pid_file("s3").exists()
        assert not _processes_with_arg(make_services(paths, ["s3"])[0].marker)
        assert not _s3_ready()
        status = run_hybridfs("stack", "status", check=False)
        assert status.returncode == 3
        assert [line.split()[:2] for line in status.stdout.splitlines()] == [["kafka", "up"], ["s3", "down"]]
        _check_start_failure_names_service_and_log(tmp_path)
    finally:
        run_hybridfs("stack", "up", "s3")
    assert _s3_ready()
    new_pid = _pids()["s3"]
    assert new_pid != old_pid
    assert s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == b"still here"


def _check_start_failure_names_service_and_log(tmp_path: Path) -> None:
    """While the real S3 is down (its port free): a server that dies at start is reported with its log."""
    fake = tmp_path / "broken-minio"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "broken-minio: cannot start" >&2
        exit 3
    """))  # fmt: skip
    fake.chmod(0o755)
    state = tmp_path / "state"
    env = {"HYBRIDFS_MINIO_BIN": str(fake), "HYBRIDFS_STACK_STATE": str(state)}
    result = run_hybridfs("stack", "up", "s3", "--timeout", "20", env=env, check=False)
    assert result.returncode == 1
    log = state / "logs" / "s3.log"
    assert f"s3 failed to start: the process exited (status 3); read {log}" in result.stderr
    assert "broken-minio: cannot start" in log.read_text()


def test_up_refuses_a_port_held_by_a_process_it_did_not_start(stack: Stack, tmp_path: Path) -> None:
    """A second state directory sees the running stack as strangers: `up` refuses, `down` touches nothing."""
    before = _pids()
    env = {"HYBRIDFS_STACK_STATE": str(tmp_path / "other")}
    result = run_hybridfs("stack", "up", "kafka", env=env, check=False)
    assert result.returncode == 1
    assert "kafka: 127.0.0.1:19092 is in use by a process hybridfs did not start" in result.stderr
    out = run_hybridfs("stack", "down", env=env).stdout
    assert "was not running" in out
    assert _pids() == before


def test_minio_publishes_the_buckets_s3_events_to_kafka(stack: Stack, s3: Any, prefix: str) -> None:
    """`stack up` makes MinIO publish ObjectCreated/ObjectRemoved records of its bucket to Kafka (foreign
    writers' changes reach the mounts this way)."""
    from hybridfs.stack.config import S3_EVENTS_TOPIC

    assert stack.env["HYBRIDFS_S3_EVENTS_TOPIC"] == S3_EVENTS_TOPIC
    consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"{prefix}-events",
                         "auto.offset.reset": "latest", "enable.auto.commit": False})  # fmt: skip
    assigned: list[Any] = []
    consumer.subscribe([S3_EVENTS_TOPIC], on_assign=lambda _c, parts: assigned.extend(parts))
    try:
        wait_until(lambda: consumer.poll(0.2) is None and bool(assigned), timeout=30,
                   message="the consumer's partitions")  # fmt: skip
        key = f"{prefix}/file with space"
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"x")
        s3.delete_object(Bucket=stack.bucket, Key=key)
        seen: list[str] = []

        def both_seen() -> bool:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                record = json.loads(msg.value())["Records"][0]
                if urllib.parse.unquote_plus(record["s3"]["object"]["key"]) == key:
                    seen.append(record["eventName"])
            return len(seen) >= 4

        # Each record twice: from the direct target and, a few seconds later, from the queued (durable) one. The
        # direct target sends each record on its own, so their order is not kept (seen: Removed before Created):
        # consumers only invalidate on a record, never apply it as state.
        wait_until(both_seen, timeout=30, message="both S3 event records of the key, from both targets")
        kinds = sorted(name.split(":")[1] for name in seen)
        assert kinds == ["ObjectCreated", "ObjectCreated", "ObjectRemoved", "ObjectRemoved"], seen
    finally:
        consumer.close()


def _topics(bootstrap: str) -> set[str]:
    return set(existing_topics(bootstrap))


def test_prune_deletes_old_scratch_topics_and_keeps_young_and_foreign_ones(stack: Stack, topic_prefix: str) -> None:
    """Topics of killed runs piled up to 14,789 partitions, the broker ran out of heap loading them at start and a
    whole CI run found no Kafka. A topic that a prune first saw hours ago is deleted; one just made (a run beside
    this one) and one not named like a test's stay."""
    old, young, foreign = f"{topic_prefix}-old.hydrate", f"{topic_prefix}-young.hydrate", f"keep-{topic_prefix}"
    create_topics(stack.bootstrap, [old, young, foreign])
    wait_until(lambda: {old, young, foreign} <= _topics(stack.bootstrap), timeout=30, message="the topics")
    seen_file = make_services(StackPaths.from_env(), ["kafka"])[0].dir / SEEN_FILE
    run_hybridfs("stack", "prune")  # records the new topics as seen now
    seen = json.loads(seen_file.read_text())
    assert old in seen and young in seen and foreign not in seen
    seen[old] -= 3 * 3600  # as if a prune had seen it three hours ago: a killed run's
    seen_file.write_text(json.dumps(seen))
    out = run_hybridfs("stack", "prune").stdout
    assert "deleting" in out, out
    wait_until(lambda: old not in _topics(stack.bootstrap), timeout=30, message="the old topic to go")
    assert {young, foreign} <= _topics(stack.bootstrap)
    run_hybridfs("stack", "prune", "--prefix", f"{topic_prefix}-young", "--prefix", f"keep-{topic_prefix}")
    wait_until(lambda: young not in _topics(stack.bootstrap), timeout=30, message="the young topic to go")
    assert foreign in _topics(stack.bootstrap)  # neither PREFIX.* nor PREFIX-*: never touched
    assert delete([foreign], stack.bootstrap) == 1


def test_prune_rejects_a_negative_age() -> None:
    done = run_hybridfs("stack", "prune", "--older-than", "-1", check=False)
    assert done.returncode == 2 and "hours must be 0 or more" in done.stderr, done.stderr
