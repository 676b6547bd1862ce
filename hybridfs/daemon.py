"""The composition root: builds the tiers, the core, the FUSE layer and the background services, and runs
them in one nursery owned by the mount.

Start-up order: S3 client -> cache (degrades to "none" on failure) -> event bus -> core -> FUSE mount ->
background services (hydrator, eviction planner, purger) -> READY=1. Shutdown runs in reverse: SIGTERM stops
new opens, waits (bounded) for in-flight uploads, unmounts, stops the services, flushes the outbox.

Lifecycle under systemd (Type=notify): READY=1 once the mount point answers a stat through the kernel, STATUS=
with cache usage every few seconds, STOPPING=1 as soon as shutdown begins. SIGTERM/SIGINT: new opens fail with
EBUSY, files being written get ``write_timeout + 5`` seconds to be closed and uploaded, then the FUSE loop ends
and the mount is detached; a second signal skips the wait. A file still unfinished then is never completed in
S3: its multipart upload is aborted (no partial object, no upload left behind) and its writer gets an error
from the kernel. Stopping on a signal exits 0, whatever the files; the unit's TimeoutStopSec= must exceed
``2 * write_timeout + 5`` (a close() that began just before the deadline may take write_timeout more).
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

from hybridfs.commands.preflight import warn_fuse_request_timeout
from hybridfs.config import MountConfig, bucket_and_prefix
from hybridfs.core.attrs import Defaults, metadata_for
from hybridfs.core.budget import MemoryBudget
from hybridfs.core.filesystem import Filesystem, FsSettings
from hybridfs.core.namespace import Namespace
from hybridfs.core.paths import KeyMapper
from hybridfs.core.reader import ReadSettings
from hybridfs.core.writer import WriteSettings
from hybridfs.events.bus import EventBus
from hybridfs.events.s3events import S3EventFeed
from hybridfs.events.schema import Event
from hybridfs.fuse_ops import FuseOperations, KernelTimeouts, PyfuseKernel, mount_options
from hybridfs.sdnotify import notify
from hybridfs.services.feed import FeedPublisher
from hybridfs.services.feed_schema import changes_topic
from hybridfs.services.foreign import ForeignWrites, agent_tokens
from hybridfs.tasks import Supervisor, failpoint
from hybridfs.tiers.cache import DirectoryInUse, LocalCache, lock_directory
from hybridfs.tiers.s3 import CloudStore, S3Settings
from hybridfs.tiers.uploads import UploadJournal

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

    def __init__(self, cfg: MountConfig, s3_down: str | None = None) -> None:
        """``s3_down``: why the start-up check found S3 unreachable (``--offline-start``), already logged."""
        self.cfg = cfg
        self.s3_down = s3_down
        bucket, prefix = bucket_and_prefix(cfg.source)
        self.origin = f"{socket.gethostname()}:{os.path.abspath(cfg.mountpoint)}"
        self.started_at = time.time()  # S3 event records are read from (about) here
        self.state_dir = Path(cfg.state_dir)
        self.store = CloudStore(S3Settings(
            bucket=bucket, endpoint_url=cfg.endpoint_url or None, region=cfg.region or None,
            max_attempts=cfg.s3_max_attempts, connect_timeout=cfg.s3_connect_timeout,
            read_timeout=cfg.s3_read_timeout, threads=cfg.s3_threads, part_size=cfg.part_size,
            user_agent_extra=" ".join(self._agent_tokens())))
        self.cache = LocalCache(Path(cfg.cache_dir), cfg.cache_size, fsync=cfg.cache_fsync)
        self.keys = KeyMapper(prefix)
        defaults = Defaults(uid=cfg.uid, gid=cfg.gid, file_mode=cfg.file_mode, dir_mode=cfg.dir_mode)
        self.namespace = Namespace(self.store, self.keys, defaults, dir_cache_time=cfg.dir_cache_time,
                                   negative_cache_time=cfg.negative_cache_time)
        # One budget for the data buffers: read-ahead (CloudReader, through ReadSettings) and write buffers.
        self.memory = MemoryBudget(cfg.memory)
        self.bus: EventBus | None = None
        if not cfg.no_events:
            self.bus = EventBus(cfg.kafka, cfg.topic_prefix, self.state_dir / "outbox.sqlite",
                                cfg.kafka_options, self.origin)
        settings = FsSettings(
            defaults=defaults,
            write=WriteSettings(part_size=cfg.part_size, max_inflight=cfg.max_inflight_parts,
                                timeout=cfg.write_timeout, spool_dir=self.state_dir / "spool",
                                budget=self.memory),
            read=ReadSettings(chunk_size=cfg.read_chunk_size, max_readahead=cfg.readahead_chunks,
                              budget=self.memory),
            attr_timeout=cfg.attr_timeout,
        )
        self.fs: Filesystem | None = None
        self.settings = settings
        # The cache persists what the namespace knows of cached files (offline lookups after a restart) and
        # asks for a new copy of one that failed its checksums.
        self.namespace.cache = self.cache
        self.cache.attributes_of = self._known_attributes
        self.cache.on_corrupt = BusHydration(self.bus, self.origin).request_hydration
        self._state_lock: int | None = None
        self.draining = False  # a stop signal arrived: refusing opens, waiting for uploads
        self.terminated = False  # we ended the FUSE loop ourselves: the mount is still attached
        self._stopping_sent = False
        self.foreign: tuple[ForeignWrites, S3EventFeed] | None = None  # with --s3-events-topic
        self.kernel_timeouts: KernelTimeouts | None = None  # set once the FUSE layer exists

    async def run(self) -> None:
        if self.s3_down is not None:  # one outage, one WARNING: the breaker knows what the check found
            self.store.breaker.start_down(self.s3_down)
        await trio.to_thread.run_sync(self._prepare_dirs)
        self.store.journal = await trio.to_thread.run_sync(UploadJournal, self.state_dir / "uploads.sqlite")
        await self.cache.open()
        async with trio.open_nursery() as nursery:
            # Every background task runs supervised: its failure is logged and contained, never an unmount.
            supervisor = self.supervisor = Supervisor(nursery)
            kernel = PyfuseKernel()
            fs = Filesystem(self.store, self.cache, self.keys, self.namespace, self.settings, supervisor,
                            BusHydration(self.bus, self.origin), kernel)
            self.fs = fs
            fs.status_extra = self.status_extra
            if self.bus is not None:  # before anything can change: every change reaches the feed
                fs.changes = FeedPublisher(self.bus, changes_topic(self.cfg.topic_prefix), self.origin)
            await supervisor.start(self.store.run_aborts, name="multipart aborts")
            supervisor.start_soon(self._clean_uploads, name="stale multipart uploads")
            if self.bus is not None:
                await supervisor.start(self.bus.run, name="event bus")
            await self._start_services(supervisor, fs)
            await self._start_foreign_writes(supervisor, fs)
            supervisor.start_soon(self.store.breaker.run, self.store.probe, name="S3 probe")
            timeouts = KernelTimeouts(fs, self.cfg.attr_timeout, self.cfg.trusted_attr_timeout)
            if timeouts.enabled:
                if self.foreign is None:
                    log.info("--trusted-attr-timeout needs --s3-events-topic (changes by other tools must reach "
                             "the mount): the kernel keeps entries for --attr-timeout")
                supervisor.start_soon(timeouts.watch, kernel, name="kernel cache timeouts")
            self.kernel_timeouts = timeouts
            ops = FuseOperations(fs, timeouts=timeouts)
            fsname = f"hybridfs:{self.cfg.source}"
            warn_fuse_request_timeout(self.cfg)  # the kernel reads its timeout as we mount
            pyfuse3.init(ops, self.cfg.mountpoint, mount_options(fsname, allow_other=self.cfg.allow_other))
            log.info("mounted %s on %s (cache %s, %d bytes; events %s)", self.cfg.source, self.cfg.mountpoint,
                     self.cfg.cache_dir, self.cfg.cache_size,
                     "off" if self.bus is None else f"{self.cfg.kafka} {self.cfg.topic_prefix}.*")
            unmounted = False
            try:
                supervisor.start_soon(self._announce_ready, name="readiness")
                nursery.start_soon(self._handle_signals)  # not supervised: without it the mount cannot stop
                await supervisor.start(self._housekeeping, name="housekeeping")
                await pyfuse3.main()
                unmounted = not self.terminated  # main() also returns after terminate(): still mounted then
            finally:
                self._notify_stopping()
                # Detach first, so nothing hangs on a mount nobody serves; libfuse's unmount is lazy, so files
                # still open see ENOTCONN from now on.
                pyfuse3.close(unmount=not unmounted)
                with trio.CancelScope(shield=True):
                    await self._abandon_uploads(fs)
                nursery.cancel_scope.cancel()
        self.cache.close()
        if self.store.journal is not None:
            self.store.journal.close()
        log.info("unmounted %s", self.cfg.mountpoint)

    def _prepare_dirs(self) -> None:
        self._state_lock = lock_directory(self.state_dir, "state directory")  # before clearing its spool
        (self.state_dir / "spool").mkdir(parents=True, exist_ok=True)
        for leftover in (self.state_dir / "spool").iterdir():
            leftover.unlink(missing_ok=True)

    async def _clean_uploads(self) -> None:
        """Abort the multipart uploads a previous run of this mount left open, then those under the prefix
        that are older than ``--abort-uploads-after`` (left by crashed hosts; a live mount never keeps one
        that long)."""
        await self.store.abort_journaled()
        grace = self.cfg.abort_uploads_after
        if grace <= 0:
            return
        try:
            stale = await self.store.stale_uploads(self.keys.prefix, grace)
        except Exception as exc:
            log.info("could not list multipart uploads to clean up: %s", exc)
            return
        for key, upload_id in stale:
            log.info("aborting multipart upload of %s: older than %.0fs and owned by no live mount", key, grace)
            self.store.schedule_abort(key, upload_id)

    async def _start_services(self, nursery: Supervisor, fs: Filesystem) -> None:
        """Background services: hydrator, eviction planner, purger (without events: planner and purger only,
        the planner's decisions purged locally, so the cache keeps its bound)."""
        from hybridfs import services

        self.services = await services.start_all(nursery, self, fs)

    async def _start_foreign_writes(self, nursery: Supervisor, fs: Filesystem) -> None:
        """With ``--s3-events-topic``: changes other tools make to the bucket invalidate what we cache."""
        if not self.cfg.s3_events_topic:
            return
        tokens = self._agent_tokens()
        foreign = ForeignWrites(fs, tokens[0], tokens[1] if len(tokens) > 1 else None)
        feed = S3EventFeed(self.cfg.kafka, self.cfg.s3_events_topic, self.store.bucket, foreign.handle,
                           kafka_config=self.cfg.kafka_options, client_id=f"hybridfs-s3-events-{self.cfg.cache_id}",
                           start_time=self.started_at)
        await nursery.start(feed.run, name="S3 event records")
        self.foreign = (foreign, feed)
        feed_trusted = fs.ns.trusted  # the change feed's health: trust local metadata only while both are

        def trusted() -> bool:
            return feed_trusted() and ForeignWrites.healthy(feed)

        fs.ns.trusted = trusted
        fs.ns.lasting = trusted  # every writer's changes reach us now: known attributes stand until one arrives

    def _agent_tokens(self) -> list[str]:
        """What this mount's S3 requests say in their User-Agent (recognised in the S3 event records)."""
        feed = None if self.cfg.no_events else f"{self.cfg.kafka} {changes_topic(self.cfg.topic_prefix)}"
        return agent_tokens(self.origin, feed)

    def _set_kernel_readahead(self) -> None:
        """Widen the kernel's read-ahead for this mount: with the default 128 KiB a sequential reader has one
        small request in flight at a time, each a round trip through the FUSE queue and Python; a few MiB keep
        several requests in flight (measured: 1.4-1.7x warm sequential reads). Needs root; else the default."""
        kib = self.cfg.kernel_readahead // 1024
        if kib <= 0:
            return
        dev = os.stat(self.cfg.mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        try:
            with open(path, "w") as fh:
                fh.write(str(kib))
        except OSError as exc:
            log.info("kernel read-ahead left at its default: cannot write %s (%s)", path, exc.strerror)

    async def _announce_ready(self) -> None:
        """READY=1 only once the kernel forwards requests to us and we answer them."""
        mountpoint = self.cfg.mountpoint
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = await trio.to_thread.run_sync(lambda: os.path.ismount(mountpoint) and bool(os.stat(mountpoint)))
            if self.draining:  # stopped before it was ever ready: STOPPING=1 is all systemd hears
                return
            if ok:
                await trio.to_thread.run_sync(self._set_kernel_readahead)
                notify("READY=1")
                notify(f"STATUS={self._status_line()}")
                log.info("ready: %s answers", mountpoint)
                return
            await trio.sleep(0.05)
        log.error("mount point %s did not answer within 30s", mountpoint)

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: nothing to reload (restart the unit to apply a new configuration)")
                    elif not self.draining:
                        log.info("%s: refusing new opens, finishing in-flight uploads, then unmounting", name)
                        self.draining = True
                        nursery.start_soon(self._stop)
                    else:
                        log.warning("%s again: unmounting now, without waiting for uploads", name)
                        self._terminate()

    async def _stop(self) -> None:
        """The first stop signal: no new opens, a bounded wait for uploads, then end the FUSE loop."""
        self._notify_stopping()
        if self.fs is not None:
            self.fs.refuse_opens = True
            await self._drain(self.fs)
        self._terminate()

    def _terminate(self) -> None:
        if not self.terminated:
            self.terminated = True
            pyfuse3.terminate()

    def _notify_stopping(self) -> None:
        if not self._stopping_sent:
            self._stopping_sent = True
            notify("STOPPING=1")

    async def _drain(self, fs: Filesystem) -> None:
        """Wait (bounded by the write timeout) until no open file has changes that S3 does not hold."""
        bound = self.cfg.write_timeout + 5
        deadline = trio.current_time() + bound
        next_status = 0.0
        with trio.move_on_at(deadline) as scope:
            # Dirtiness changes in many places; a 50 ms poll bounded by the timeout is simpler than signalling.
            while dirty := [of.node.path for of in fs.open_files.values() if of.dirty]:
                if trio.current_time() >= next_status:
                    next_status = trio.current_time() + 1
                    notify(f"STATUS=stopping: {len(dirty)} file(s) still being written or uploaded, "
                           f"{deadline - trio.current_time():.0f}s left")
                await trio.sleep(0.05)
        if scope.cancelled_caught:
            dirty = [of.node.path for of in fs.open_files.values() if of.dirty]
            log.error("unmounting with %d file(s) still being written or uploaded after %.0fs: %s — they are "
                      "not stored and their writers get an error", len(dirty), bound, ", ".join(dirty[:5]))
        notify("STATUS=stopping: unmounting")

    async def _abandon_uploads(self, fs: Filesystem) -> None:
        """Files still changing when the FUSE loop ended can never be closed through us: drop their uploads.

        A streamed file's multipart upload is aborted once its in-flight parts are done (a part landing after
        the abort could leave storage behind), so S3 holds neither a partial object nor an open upload.
        """
        for of in list(fs.open_files.values()):
            if not of.dirty:
                continue
            log.info("%s: dropping its unfinished upload", of.node.path)
            await fs.writes.abandon(of)

    async def _housekeeping(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(5)
            failpoint("housekeeping")
            await self.cache.flush_touched()
            await self.cache.check()  # comes back by itself when its disk does; rebuilds a lost index
            if not self.draining:
                notify(f"STATUS={self._status_line()}")

    def _status_line(self) -> str:
        used, cap = self.cache.usage(), self.cache.capacity
        line = f"cache {used / 2**20:.0f}/{cap / 2**20:.0f} MiB, {len(self.cache.entries)} files"
        if self.fs is not None:
            writing = sum(1 for of in self.fs.open_files.values() if of.dirty)
            line += f"; {writing} being written" if writing else ""
        return line

    def status_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"mountpoint": self.cfg.mountpoint, "cache_id": self.cfg.cache_id,
                                 "topic_prefix": self.cfg.topic_prefix, "kafka": self.cfg.kafka,
                                 "events": self.bus is not None, "cache_health": self.cache.status(),
                                 "s3": {"breaker": self.store.breaker.status()}, "memory": self.memory.status()}
        if self.bus is not None:
            extra["bus"] = dataclass_dict(self.bus.stats())
        services = getattr(self, "services", None)  # set once the background services run
        if services is not None:
            extra.update(services.status())
        supervisor = getattr(self, "supervisor", None)
        if supervisor is not None:
            extra["tasks"] = supervisor.status()
        extra["uploads"] = {"aborts_pending": len(self.store.pending_aborts)}
        extra["namespace"] = {"slow_revalidations": self.namespace.slow_revalidations,
                              "stale_answers": self.namespace.stale_answers}
        timeouts = self.kernel_timeouts
        if timeouts is not None and timeouts.enabled:
            extra["kernel_cache"] = {"trusted_attr_timeout": timeouts.lasting_timeout, "lasting": len(timeouts.given),
                                     "drops": timeouts.drops}
        foreign = self.foreign
        if foreign is not None:
            extra["s3_events"] = foreign[0].status(foreign[1])
        return extra

    def _known_attributes(self, key: str, etag: str) -> dict[str, str] | None:
        path = self.keys.path(key)
        st = self.namespace.last_known.get(path) if path is not None else None
        return metadata_for(st) if st is not None and st.etag == etag else None


def dataclass_dict(obj: Any) -> dict[str, Any]:
    with contextlib.suppress(TypeError):
        import dataclasses

        return dataclasses.asdict(obj)
    return dict(vars(obj))


def run_mount(cfg: MountConfig, s3_down: str | None = None) -> None:
    """``s3_down``: why the start-up check (commands/preflight.py) found S3 unreachable, when it mounts anyway."""
    from hybridfs.cli import CliError

    mount = Mount(cfg, s3_down)
    exporter = None
    if cfg.metrics_address:  # bound before mounting: a bad address is an error at start, not a silent gap
        from hybridfs.metrics import Exporter

        try:
            exporter = Exporter.start(cfg.metrics_address, mount)
        except OSError as exc:
            raise CliError(f"metrics_address = {cfg.metrics_address!r}: cannot serve metrics there: "
                           f"{exc.strerror or exc}") from None
    try:
        trio.run(mount.run) if exporter is None else trio.run(exporter.run, mount.run)
    except DirectoryInUse as exc:  # a second mount on one cache or state directory
        raise CliError(str(exc)) from None
    finally:
        if exporter is not None:
            exporter.close()
