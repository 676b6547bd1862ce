"""systemd's notify protocol (sd_notify): one datagram per state change to $NOTIFY_SOCKET, if set.

States used by the mount: ``READY=1`` (the mount point answers), ``STATUS=...`` (a line for ``systemctl
status``), ``STOPPING=1`` (shutdown began). With ``NotifyAccess=main`` systemd accepts them only from the main
process, which is why the mount runs in the foreground under the unit (no ``--daemon``).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("hybridfs.sdnotify")

_warned = False


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``); False when not under systemd or the socket refused it."""
    global _warned
    configured = os.environ.get("NOTIFY_SOCKET")
    if not configured:
        return False
    address = "\0" + configured[1:] if configured.startswith("@") else configured  # "@": abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        # Once: a vanished socket would otherwise repeat this with every STATUS= line.
        level = logging.DEBUG if _warned else logging.WARNING
        _warned = True
        log.log(level, "could not notify systemd (%s) at %s: %s", state.split("=")[0], configured, exc)
        return False
