"""Reference-model property test: random sequences of operations on the mount and on a plain local directory
must give the same results (success or errno) and leave the same tree, contents and modes after every step.
Objects written straight to S3 by "someone else" are part of the sequence (issue 3)."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from helpers import Mount
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

NAMES = ["a", "b", "d1/c", "d1/e", "d2/f", "d1/sub/g"]
DIRS = ["d1", "d2", "d1/sub", "d3"]
PATHS = NAMES + DIRS
DATA = st.binary(min_size=0, max_size=3000)


def outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
        return "ok"
    except OSError as exc:
        return os.strerror(exc.errno or 0)


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    tree: dict[str, tuple[str, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            info = full.lstat()
            kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
            content = full.read_bytes() if kind == "file" else b""
            tree[rel] = (kind, stat.S_IMODE(info.st_mode), content)
    return tree


class MountVersusDisk(RuleBasedStateMachine):
    mount: Mount
    reference: Path
    s3: Any

    @initialize()
    def clean(self) -> None:
        for root in (self.mount.path, self.reference):
            for child in root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()

    def both(self, action: Callable[[Path], object]) -> None:
        got = outcome(lambda: action(self.mount.path))
        want = outcome(lambda: action(self.reference))
        assert got == want, f"mount: {got}, plain directory: {want}"

    @rule(name=st.sampled_from(NAMES), data=DATA)
    def write_new(self, name: str, data: bytes) -> None:
        self.both(lambda root: (root / name).write_bytes(data))

    @rule(name=st.sampled_from(NAMES), data=DATA, offset=st.integers(0, 4000))
    def write_at(self, name: str, data: bytes, offset: int) -> None:
        def act(root: Path) -> None:
            with open(root / name, "r+b") as fh:
                fh.seek(offset)
                fh.write(data)
        self.both(act)

    @rule(name=st.sampled_from(NAMES), data=DATA)
    def append(self, name: str, data: bytes) -> None:
        def act(root: Path) -> None:
            with open(root / name, "ab") as fh:
                fh.write(data)
        self.both(act)

    @rule(name=st.sampled_from(NAMES), size=st.integers(0, 5000))
    def truncate(self, name: str, size: int) -> None:
        self.both(lambda root: os.truncate(root / name, size))

    @rule(src=st.sampled_from(PATHS), dst=st.sampled_from(PATHS))
    def rename(self, src: str, dst: str) -> None:
        self.both(lambda root: os.rename(root / src, root / dst))

    @rule(name=st.sampled_from(PATHS))
    def unlink(self, name: str) -> None:
        self.both(lambda root: os.unlink(root / name))

    @rule(name=st.sampled_from(DIRS))
    def mkdir(self, name: str) -> None:
        self.both(lambda root: os.mkdir(root / name))

    @rule(name=st.sampled_from(PATHS))
    def rmdir(self, name: str) -> None:
        self.both(lambda root: os.rmdir(root / name))

    @rule(name=st.sampled_from(PATHS), mode=st.sampled_from([0o600, 0o644, 0o755, 0o700]))
    def chmod(self, name: str, mode: int) -> None:
        self.both(lambda root: os.chmod(root / name, mode))

    @rule(name=st.sampled_from(["a", "b", "x"]), data=DATA)
    def someone_else_puts(self, name: str, data: bytes) -> None:
        """Another tool writes an object at the top level; both sides must then show it."""
        if (self.reference / name).is_dir():
            return
        self.s3.put_object(Bucket=self.mount.bucket, Key=self.mount.key(name), Body=data)
        (self.reference / name).write_bytes(data)
        os.chmod(self.reference / name, 0o644)  # no metadata: the mount's default mode

    @invariant()
    def same_tree(self) -> None:
        assert snapshot(self.mount.path) == snapshot(self.reference)


@pytest.mark.slow
def test_mount_behaves_like_a_local_directory(mount_factory: Any, s3: Any, tmp_path: Path) -> None:
    # No metadata caching, so changes made straight in S3 are visible at the next step.
    mount = mount_factory(extra_args=["--dir-cache-time", "0", "--attr-timeout", "0", "--negative-cache-time", "0"])
    reference = tmp_path / "reference"
    reference.mkdir()
    old_umask = os.umask(0o022)
    try:
        MountVersusDisk.mount = mount
        MountVersusDisk.reference = reference
        MountVersusDisk.s3 = s3
        run_state_machine_as_test(MountVersusDisk, settings=settings(
            max_examples=30, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)))
    finally:
        os.umask(old_umask)
