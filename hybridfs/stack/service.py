"""What every stack service provides; ``manage`` drives them through install → prepare → start → ready."""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from pathlib import Path

from hybridfs.stack import procs
from hybridfs.stack.config import StackPaths


class Service(ABC):
    name: str = ""
    port: int = 0

    def __init__(self, paths: StackPaths) -> None:
        self.paths = paths

    @property
    def dir(self) -> Path:
        return self.paths.service_dir(self.name)

    @property
    def pid_file(self) -> Path:
        return self.paths.pid_file(self.name)

    @property
    def out_log(self) -> Path:
        """The process's own stdout/stderr."""
        return self.paths.logs / f"{self.name}.log"

    @property
    def read_log(self) -> Path:
        """The log a user should read when the service fails."""
        return self.out_log

    @property
    @abstractmethod
    def marker(self) -> str:
        """An argument only our process has on its command line (a path in the state directory)."""

    @property
    @abstractmethod
    def endpoint(self) -> str: ...

    @abstractmethod
    def install(self) -> None:
        """Make the binaries/jars available (slow on a first run, a no-op afterwards)."""

    @abstractmethod
    def prepare(self) -> None:
        """Write configuration and initialise storage (once) before a start."""

    @abstractmethod
    def command(self) -> tuple[list[str], dict[str, str]]:
        """argv and environment of the server process."""

    @abstractmethod
    def ready(self) -> bool:
        """One quick probe: does the service answer requests?"""

    def on_ready(self) -> str:
        """Work to do once it answers (e.g. create the bucket); returns a note for the status line."""
        return ""

    def pid(self) -> int | None:
        return procs.live_pid(self.pid_file, self.marker)

    def start(self) -> subprocess.Popen[bytes]:
        argv, env = self.command()
        proc = procs.start_detached(argv, self.out_log, env, cwd=self.dir)
        procs.write_pid(self.pid_file, proc.pid)
        return proc
