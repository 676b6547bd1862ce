"""KernelTimeouts without a kernel: which answers get --trusted-attr-timeout, and what leaving lasting mode drops.

The real mount: test_foreign_writes.py::test_the_kernel_keeps_known_files_while_trusted_and_drops_them_when_kafka_stops.
"""

from __future__ import annotations

import stat
from types import SimpleNamespace
from typing import Any

import trio

from hybridfs.core.attrs import Stat
from hybridfs.core.inodes import InodeTable
from hybridfs.fuse_ops import KernelTimeouts


class RecordingKernel:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[tuple[int, bytes]]]] = []

    async def invalidate_many(self, inodes: list[int], entries: list[tuple[int, bytes]]) -> None:
        self.calls.append((sorted(inodes), sorted(entries)))


def _stat(mode: int, complete: bool = True) -> Stat:
    return Stat(mode=mode, size=1, uid=0, gid=0, mtime_ns=0, etag="e", complete=complete)


def test_only_closed_files_get_the_lasting_time_and_leaving_lasting_mode_drops_them() -> None:
    lasting = [True]
    table = InodeTable()
    fs: Any = SimpleNamespace(ns=SimpleNamespace(lasting=lambda: lasting[0]), inodes=table)
    timeouts = KernelTimeouts(fs, attr_timeout=1.0, lasting_timeout=600.0)
    file_st, dir_st = _stat(stat.S_IFREG | 0o644), _stat(stat.S_IFDIR | 0o755)
    d, f, g, opened = (table.looked_up(p) for p in ("d", "d/f", "g", "d/open"))
    opened.open_handles = 1

    assert timeouts.for_node(f, file_st) == 600.0 and timeouts.for_node(g, file_st) == 600.0
    assert timeouts.for_node(d, dir_st) == 1.0  # a directory's entry is never dropped later: short
    assert timeouts.for_node(opened, file_st) == 1.0  # written here: the kernel's size is its own
    assert timeouts.for_node(f, _stat(stat.S_IFREG | 0o644, complete=False)) == 0.0  # from a listing
    assert timeouts.given == {f.ino, g.ino}

    table.forget(g.ino, 1)  # the kernel forgot g: nothing to drop of it
    kernel = RecordingKernel()
    lasting[0] = False
    assert timeouts.for_node(f, file_st) == 1.0  # from the moment lasting mode ends

    async def main() -> None:
        with trio.move_on_after(5 * KernelTimeouts.WATCH_INTERVAL):
            await timeouts.watch(kernel)  # type: ignore[arg-type]

    trio.run(main)
    assert kernel.calls == [([f.ino], [(d.ino, b"f")])]  # once, for what was given
    assert timeouts.given == set() and timeouts.drops == 1
