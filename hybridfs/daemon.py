"""The composition root: builds the tiers, the core, the FUSE layer and the background services, and runs
them in one nursery owned by the mount.

Start-up order: S3 client -> cache (degrades to "none" on failure) -> event bus -> core -> FUSE mount ->
background services (hydrator, eviction planner, purger) -> READY=1. Shutdown runs in reverse: SIGTERM stops
new opens, waits (bounded) for in-flight uploads, unmounts, stops the services, flushes the outbox.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from hybridfs.config import MountConfig, bucket_and_prefix
from hybridfs.core.attrs import Defaults
from hybridfs.core.filesystem import Filesystem, FsSettings
from hybridfs.core.namespace import Namespace
from hybridfs.core.paths import KeyMapper
from hybridfs.core.reader import ReadSettings
from hybridfs.core.writer import WriteSettings
from hybridfs.events.bus import EventBus
from hybridfs.events.schema import Event
from hybridfs.fuse_ops import FuseOperations, PyfuseKernel, mount_options
from hybridfs.sdnotify import notify
from hybridfs.tiers.cache import LocalCache
from hybridfs.tiers.s3 import CloudStore, S3Settings

log = logging.getLogger("hybridfs.daemon")


class BusHydration:
    """HydrationSink that publishes hydrate events on the bus."""

    def __init__(self, bus: EventBus | None, origin: str) -> None:
        self.bus = bus
        self.origin = origin

    def request_hydration(self, key: str, etag: str, size: int, reason: str) -> None:
        if self.bus is None:
            log.debug("hydration of %s (%s) not requested: events are off", key, reason)
            return
        self.bus.publish(Event.hydrate(key, etag, size, reason, self.origin))


class Mount:
    """Everything one mount owns, built from a resolved, validated MountConfig."""

    def __init__(self, cfg: MountConfig) -> None:
        self.cfg = cfg
        bucket, prefix = bucket_and_prefix(cfg.source)
        self.origin = f"{socket.gethostname()}:{os.path.abspath(cfg.mountpoint)}"
        self.state_dir = Path(cfg.state_dir)
        self.store = CloudStore(S3Settings(
            bucket=bucket, endpoint_url=cfg.endpoint_url or None, region=cfg.region or None,
            max_attempts=cfg.s3_max_attempts, connect_timeout=cfg.s3_connect_timeout,
            read_timeout=cfg.s3_read_timeout, threads=cfg.s3_threads, part_size=cfg.part_size))
        self.cache = LocalCache(Path(cfg.cache_dir), cfg.cache_size)
        self.keys = KeyMapper(prefix)
        defaults = Defaults(uid=cfg.uid, gid=cfg.gid, file_mode=cfg.file_mode, dir_mode=cfg.dir_mode)
        self.namespace = Namespace(self.store, self.keys, defaults, dir_cache_time=cfg.dir_cache_time,
                                   negative_cache_time=cfg.negative_cache_time)
        self.bus: EventBus | None = None
        if not cfg.no_events:
            self.bus = EventBus(cfg.kafka, cfg.topic_prefix, self.state_dir / "outbox.sqlite",
                                cfg.kafka_options, self.origin)
        settings = FsSettings(
            defaults=defaults,
            write=WriteSettings(part_size=cfg.part_size, max_inflight=cfg.max_inflight_parts,
                                timeout=cfg.write_timeout, spool_dir=self.state_dir / "spool"),
            read=ReadSettings(chunk_size=cfg.read_chunk_size, max_readahead=cfg.readahead_chunks),
            attr_timeout=cfg.attr_timeout,
        )
        self.fs: Filesystem | None = None
        self.settings = settings
        self.draining = False

    async def run(self) -> None:
        await trio.to_thread.run_sync(self._prepare_dirs)
        await self.cache.open()
        async with trio.open_nursery() as nursery:
            fs = Filesystem(self.store, self.cache, self.keys, self.namespace, self.settings, nursery,
                            BusHydration(self.bus, self.origin), PyfuseKernel())
            self.fs = fs
            fs.status_extra = self.status_extra
            if self.bus is not None:
                await nursery.start(self.bus.run)
            await self._start_services(nursery, fs)
            ops = FuseOperations(fs, attr_timeout=self.cfg.attr_timeout, entry_timeout=self.cfg.attr_timeout)
            fsname = f"hybridfs:{self.cfg.source}"
            pyfuse3.init(ops, self.cfg.mountpoint, mount_options(fsname, allow_other=self.cfg.allow_other))
            log.info("mounted %s on %s (cache %s, %d bytes; events %s)", self.cfg.source, self.cfg.mountpoint,
                     self.cfg.cache_dir, self.cfg.cache_size,
                     "off" if self.bus is None else f"{self.cfg.kafka} {self.cfg.topic_prefix}.*")
            unmounted = False
            try:
                nursery.start_soon(self._announce_ready)
                nursery.start_soon(self._handle_signals, nursery)
                nursery.start_soon(self._housekeeping)
                await pyfuse3.main()
                unmounted = True
            finally:
                notify("STOPPING=1")
                with trio.CancelScope(shield=True):
                    await self._drain(fs)
                pyfuse3.close(unmount=not unmounted)
                nursery.cancel_scope.cancel()
        self.cache.close()
        log.info("unmounted %s", self.cfg.mountpoint)

    def _prepare_dirs(self) -> None:
        (self.state_dir / "spool").mkdir(parents=True, exist_ok=True)
        for leftover in (self.state_dir / "spool").iterdir():
            leftover.unlink(missing_ok=True)

    async def _start_services(self, nursery: trio.Nursery, fs: Filesystem) -> None:
        """Background services that consume events (hydrator, eviction planner, purger)."""
        if self.bus is None:
            return
        try:
            from hybridfs.events import services  # type: ignore[attr-defined]  # written beside the events
        except ImportError:
            return
        await services.start_all(nursery, self, fs)

    async def _announce_ready(self) -> None:
        """READY=1 only once the kernel forwards requests to us and we answer them."""
        mountpoint = self.cfg.mountpoint
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = await trio.to_thread.run_sync(lambda: os.path.ismount(mountpoint) and bool(os.stat(mountpoint)))
            if ok:
                notify("READY=1")
                notify(f"STATUS={self._status_line()}")
                log.info("ready: %s answers", mountpoint)
                return
            await trio.sleep(0.05)
        log.error("mount point %s did not answer within 30s", mountpoint)

    async def _handle_signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: nothing to reload (restart the unit to apply a new configuration)")
                    continue
                log.info("%s: finishing in-flight uploads, then unmounting", signal.Signals(signum).name)
                notify("STOPPING=1")
                self.draining = True
                if self.fs is not None:
                    self.fs.refuse_opens = True
                    with trio.CancelScope(shield=True):
                        await self._drain(self.fs)
                pyfuse3.terminate()
                return

    async def _drain(self, fs: Filesystem) -> None:
        """Wait (bounded by the write timeout) until no open file has changes that S3 does not hold."""
        with trio.move_on_after(self.cfg.write_timeout + 5) as scope:
            # Dirtiness changes in many places; a 50 ms poll bounded by the timeout is simpler than signalling.
            while any(of.dirty for of in fs.open_files.values()):  # noqa: ASYNC110
                await trio.sleep(0.05)
        if scope.cancelled_caught:
            dirty = [of.node.path for of in fs.open_files.values() if of.dirty]
            log.error("unmounting with %d file(s) still uploading: %s — their writers get EIO", len(dirty),
                      ", ".join(dirty[:5]))

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(5)
            await self.cache.flush_touched()
            notify(f"STATUS={self._status_line()}")

    def _status_line(self) -> str:
        used, cap = self.cache.usage(), self.cache.capacity
        return f"cache {used / 2**20:.0f}/{cap / 2**20:.0f} MiB, {len(self.cache.entries)} files"

    def status_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"mountpoint": self.cfg.mountpoint, "cache_id": self.cfg.cache_id,
                                 "topic_prefix": self.cfg.topic_prefix, "kafka": self.cfg.kafka,
                                 "events": self.bus is not None}
        if self.bus is not None:
            extra["bus"] = dataclass_dict(self.bus.stats())
        return extra


def dataclass_dict(obj: Any) -> dict[str, Any]:
    with contextlib.suppress(TypeError):
        import dataclasses

        return dataclasses.asdict(obj)
    return dict(vars(obj))


def run_mount(cfg: MountConfig) -> None:
    trio.run(Mount(cfg).run)
