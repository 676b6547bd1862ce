"""A TCP proxy a test can cut: while cut, its connections are closed and new ones refused (closed at once).

With a broker listener whose advertised address is this proxy, one Kafka client loses the broker while the others,
on the broker's own listener, keep it (tests/test_antientropy.py)."""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttableProxy:
    def __init__(self, upstream: tuple[str, int], port: int = 0, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.listener = socket.create_server((host, port))
        self.port = int(self.listener.getsockname()[1])
        self.cut = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="tcpcut-accept").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._open.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True, name="tcpcut-pipe").start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._open.discard(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def cut_off(self) -> None:
        """Close every connection and refuse new ones until ``restore``."""
        self.cut.set()
        with self._lock:
            socks = list(self._open)
        self._drop(*socks)

    def restore(self) -> None:
        self.cut.clear()

    def close(self) -> None:
        self._closed = True
        self.cut_off()
        self.listener.close()
