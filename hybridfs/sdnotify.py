"""systemd's notify protocol (sd_notify): one datagram per state change to $NOTIFY_SOCKET, if set."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("hybridfs.sdnotify")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``); False when not under systemd or the socket refused it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state.split("=")[0], exc)
        return False
