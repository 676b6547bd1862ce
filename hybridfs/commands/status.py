"""``hybridfs status MOUNTPOINT [--json]``: what a running mount holds and does, read from the mount itself.

The numbers come from ``user.hybridfs.status`` on the mount root (JSON, assembled by the mount): cache usage
against its limits, files cached / cloud-only / pinned, events produced, consumed and waiting in the outbox,
consumer lag, hit ratio, the cache's integrity (checksum failures, index rebuilds, recoveries) and whether S3 is
marked down (the circuit breaker). ``--json`` prints that document as it is, plus a ``summary`` of the derived figures.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from hybridfs.cli import CliError
from hybridfs.commands.events import mount_root, read_status


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _get(doc: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(name)
    return doc


def human_size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def summarize(status: dict[str, Any]) -> dict[str, Any]:
    """The derived figures ``hybridfs status`` shows (also under ``summary`` in ``--json``)."""
    cache = status.get("cache") or {}
    services = status.get("services") or {}
    planner = services.get("planner") or {}
    census = services.get("census") or {}
    bus = status.get("bus") or {}
    cached = _num(cache.get("files_cached"))
    total = _num(census.get("files"))
    consumers = {name: (services.get(name) or {}).get("consumer") or {} for name in ("hydrator", "purger")}
    lags = [c.get("lag") for c in consumers.values()]
    health = status.get("cache_health") or {}
    breaker = _get(status, "s3", "breaker") or {}
    return {
        "cache_available": health.get("available", cache.get("available")),
        "cache_unavailable_reason": health.get("unavailable_reason"),
        "checksum_failures": health.get("checksum_failures"),
        "index_rebuilds": health.get("index_rebuilds"),
        "cache_recoveries": health.get("recoveries"),
        "s3_breaker": breaker.get("state"),
        "cache_used_bytes": cache.get("used_bytes"),
        "cache_capacity_bytes": cache.get("capacity_bytes"),
        "high_watermark_bytes": _scaled(planner.get("high_watermark"), cache.get("capacity_bytes")),
        "low_watermark_bytes": _scaled(planner.get("low_watermark"), cache.get("capacity_bytes")),
        "disk_free_bytes": planner.get("disk_free_bytes"),
        "disk_total_bytes": planner.get("disk_total_bytes"),
        "files_cached": cache.get("files_cached"),
        "files_cloud_only": max(0, int(total - cached)) if total is not None and cached is not None else None,
        "files_counted_complete": census.get("complete"),
        "files_pinned": cache.get("pinned"),
        "hit_ratio": cache.get("hit_ratio"),
        "events_published": bus.get("published"),
        "events_produced": bus.get("produced"),
        "events_in_outbox": bus.get("outbox"),
        "kafka_reachable": _reachable(bus.get("reachable"), [c.get("reachable") for c in consumers.values()]),
        "events_consumed": {name: c.get("handled") for name, c in consumers.items()},
        "events_dead_lettered": sum(int(c.get("dead_lettered") or 0) for c in consumers.values()),
        "consumer_lag": {name: c.get("lag") for name, c in consumers.items()},
        "consumer_lag_total": sum(int(x) for x in lags if isinstance(x, int)) if any(
            isinstance(x, int) for x in lags) else None,
    }


def _reachable(producer: Any, consumers: list[Any]) -> bool | None:
    """What the mount last saw of Kafka: the producer's view, or the consumers' before anything was produced."""
    views = [v for v in (producer, *consumers) if isinstance(v, bool)]
    if isinstance(producer, bool):
        return producer
    return all(views) if views else None


def _scaled(fraction: Any, capacity: Any) -> int | None:
    f, c = _num(fraction), _num(capacity)
    return int(f * c) if f is not None and c is not None else None


def _pct(part: Any, whole: Any) -> str:
    p, w = _num(part), _num(whole)
    return f"{p / w:.0%}" if p is not None and w else "?"


def render(status: dict[str, Any]) -> str:
    s = summarize(status)
    cache = status.get("cache") or {}
    planner = _get(status, "services", "planner") or {}
    census = _get(status, "services", "census") or {}
    lines = []
    source = f"s3://{status.get('bucket', '?')}/{status.get('prefix', '')}".rstrip("/")
    lines.append(f"mount      {status.get('mountpoint', '?')}  <-  {source}")
    cap = s["cache_capacity_bytes"]
    reason = s["cache_unavailable_reason"]
    avail = "" if s["cache_available"] in (True, None) else (
        f"  UNAVAILABLE (serving from S3 only{': ' + reason if reason else ''})")
    lines.append(f"cache      {human_size(_num(s['cache_used_bytes']))} of {human_size(_num(cap))} "
                 f"({_pct(s['cache_used_bytes'], cap)}); evicts above {human_size(_num(s['high_watermark_bytes']))} "
                 f"down to {human_size(_num(s['low_watermark_bytes']))}{avail}")
    lines.append(f"           dir {cache.get('dir', '?')}, cache id {status.get('cache_id', '?')}")
    if s["disk_total_bytes"]:
        lines.append(f"disk       {human_size(_num(s['disk_free_bytes']))} free of "
                     f"{human_size(_num(s['disk_total_bytes']))} ({_pct(s['disk_free_bytes'], s['disk_total_bytes'])}"
                     f"; evicts under {_num(planner.get('min_free')) or 0:.0%})")
    if planner.get("max_age"):
        lines.append(f"max age    files not read for {planner['max_age']:.0f}s are evicted")
    cloud = s["files_cloud_only"]
    if cloud is None:
        counted = "not counted yet" + (f": {census.get('error')}" if census.get("error") else "")
    else:
        counted = f"{'' if s['files_counted_complete'] else 'at least '}{cloud} cloud-only"
        if census.get("age_seconds") is not None:
            counted += f" (counted {census['age_seconds']:.0f}s ago)"
    lines.append(f"files      {s['files_cached']} cached, {counted}, {s['files_pinned']} pinned")
    health = status.get("cache_health") or {}
    if health:
        lines.append(f"integrity  {health.get('checksum_failures', 0)} checksum failures, "
                     f"{health.get('index_rebuilds', 0)} index rebuilds, {health.get('recoveries', 0)} recoveries, "
                     f"{health.get('reclaimed_files', 0)} orphan files reclaimed "
                     f"({human_size(_num(health.get('reclaimed_bytes')))})")
    breaker = _get(status, "s3", "breaker") or {}
    if breaker:
        if breaker.get("state") == "open":
            lines.append(f"s3         MARKED DOWN for {breaker.get('down_seconds')}s ({breaker.get('last_error')}); "
                         f"{breaker.get('refused_calls', 0)} calls failed at once, probing")
        else:
            lines.append(f"s3         up (marked down {breaker.get('trips', 0)} times so far)")
    ratio = s["hit_ratio"]
    lines.append(f"reads      hit ratio {'-' if ratio is None else f'{ratio:.1%}'} "
                 f"({cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses)")
    memory = status.get("memory") or {}
    if memory:
        lines.append(f"memory     {human_size(_num(memory.get('used_bytes')))} of "
                     f"{human_size(_num(memory.get('total_bytes')))} in buffers (peak "
                     f"{human_size(_num(memory.get('peak_bytes')))}, {memory.get('waits', 0)} waits)")
    preserved = _get(status, "services", "purger", "preserved") or {}
    if preserved.get("count"):
        newest = (preserved.get("newest") or [{}])[0].get("key", "?")
        lines.append(f"preserved  {preserved['count']} copies ({human_size(_num(preserved.get('bytes')))} of at most "
                     f"{human_size(_num(preserved.get('max_bytes')))}) under .hybridfs/preserved/; newest {newest}")
    if planner.get("local"):
        why = "events are off" if status.get("events") is False else "Kafka does not carry them"
        lines.append(f"evictions  purged locally ({why}): {planner.get('local_purges', 0)} so far")
    if status.get("events") is False:
        lines.append("events     off (--no-events)")
        return "\n".join(lines)
    reach = {True: "reachable", False: "UNREACHABLE", None: "not contacted yet"}[s["kafka_reachable"]]
    lines.append(f"kafka      {status.get('kafka', '?')} ({reach}), topics {status.get('topic_prefix', '?')}.*")
    lines.append(f"produced   {s['events_produced']} events ({s['events_published']} published, "
                 f"{s['events_in_outbox']} waiting in the outbox)")
    consumed = s["events_consumed"]
    lag = s["consumer_lag"]
    lines.append(f"consumed   hydrate {consumed.get('hydrator')} (lag {_lag(lag.get('hydrator'))}), evict "
                 f"{consumed.get('purger')} (lag {_lag(lag.get('purger'))}), {s['events_dead_lettered']} "
                 "dead-lettered")
    feed = status.get("feed") or {}
    if feed:
        trusted = feed.get("mode") == "trusted"
        mode = "TRUSTED (metadata served locally)" if trusted else "FALLBACK (revalidating with S3)"
        delay = feed.get("delay_p50_ms")
        lines.append(f"feed       {feed.get('topic', '?')}: {mode} for {feed.get('for_seconds', '?')}s "
                     f"({feed.get('reason', '?')}); {feed.get('applied', 0)} changes applied"
                     f"{'' if delay is None else f', p50 {delay} ms after they were made'}, "
                     f"{feed.get('published', 0)} published, lag {_lag((feed.get('consumer') or {}).get('lag'))}")
    foreign = status.get("s3_events") or {}
    if foreign:
        state = "caught up" if foreign.get("healthy") else "NOT TRUSTED"
        lines.append(f"s3 events  {foreign.get('topic', '?')}: {state} ({foreign.get('reason', '?')}); "
                     f"{foreign.get('received', 0)} read, {foreign.get('applied', 0)} applied, "
                     f"{foreign.get('feed_missed', 0)} of other feed mounts not known here, "
                     f"{foreign.get('bad_records', 0)} unreadable skipped, lag {_lag(foreign.get('lag'))}")
    entropy = status.get("antientropy") or {}
    if entropy:
        took = entropy.get("last_pass_seconds")
        lines.append(f"max-stale  {entropy.get('max_stale')}s: {entropy.get('passes', 0)} passes (last: "
                     f"{entropy.get('directories_last_pass', 0)} directories"
                     f"{'' if took is None else f' in {took}s'}), {entropy.get('invalidated', 0)} entries found "
                     f"changed, {entropy.get('failed', 0)} listings failed")
    hydrator = _get(status, "services", "hydrator") or {}
    purger = _get(status, "services", "purger") or {}
    if hydrator:
        lines.append(f"hydrator   {human_size(_num(hydrator.get('bytes_hydrated')))} hydrated; "
                     f"{_outcomes(hydrator.get('outcomes'))}")
    if purger:
        lines.append(f"purger     {human_size(_num(purger.get('bytes_freed')))} freed, "
                     f"{purger.get('uploads_before_evict', 0)} uploaded first; {_outcomes(purger.get('outcomes'))}")
    return "\n".join(lines)


def _lag(value: Any) -> str:
    return "?" if value is None else str(value)


def _outcomes(outcomes: Any) -> str:
    if not isinstance(outcomes, dict) or not outcomes:
        return "no events yet"
    return ", ".join(f"{n} {name}" for name, n in sorted(outcomes.items(), key=lambda kv: -kv[1]))


CENSUS_MIN_AGE = 0.25  # the mount counts again when the status is read and its count is older (census.py)


def fresh_status(root: Any, patience: float = 3.0) -> dict[str, Any]:
    """The status with a file count begun after this call, when the mount makes one within ``patience``
    seconds (reading the status asks the mount to count again once its count is CENSUS_MIN_AGE old);
    otherwise the status with the count it has, which says how old it is."""
    status = read_status(root)
    age = _num(_get(status, "services", "census", "age_seconds"))
    if age is None:
        return status
    deadline = time.monotonic() + patience
    if age < CENSUS_MIN_AGE:
        time.sleep(CENSUS_MIN_AGE - age + 0.05)
        status = read_status(root)
    asked = time.monotonic()
    while time.monotonic() < deadline:
        new_age = _num(_get(status, "services", "census", "age_seconds"))
        if new_age is not None and new_age <= time.monotonic() - asked + 0.05:
            return status
        time.sleep(0.05)
        status = read_status(root)
    return status


def cmd_status(args: argparse.Namespace) -> int:
    root = mount_root(args.mountpoint)
    try:
        status = fresh_status(root)
    except CliError as exc:
        raise CliError(f"{args.mountpoint} is not in a hybridfs mount" if "not in a hybridfs mount" in str(exc)
                       else str(exc)) from None
    if args.json:
        print(json.dumps({**status, "summary": summarize(status)}, indent=2, sort_keys=True))
    else:
        print(render(status))
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status", help="show a mount's cache, files and events",
        description="Cache usage against its limits, files cached / cloud-only / pinned, events produced, consumed "
                    "and waiting in the outbox, consumer lag and hit ratio of a running mount.")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="the mount point (or any path inside the mount)")
    parser.add_argument("--json", action="store_true", help="print the mount's status document as JSON")
    parser.set_defaults(func=cmd_status)
