"""An S3 fault-injection proxy: forwards to MinIO unchanged, or fails chosen requests (tests, `bench availability`).

    with S3FaultProxy(upstream="http://127.0.0.1:19000") as proxy:     # or the ``s3_proxy`` fixture
        mount = mount_factory(extra_args=["--endpoint-url", proxy.url])
        rule = proxy.add(Rule(method="PUT", query=r"partNumber=2\\b", status=503, code="SlowDown", times=3))
        ...
        assert rule.hits == 3
        proxy.down("refuse")   # S3 unreachable: every connection is closed at once (RST) ...
        proxy.up()             # ... until this

A request is forwarded byte for byte (method, target, every header including Host, which SigV4 signs), its body and
the answer's streamed in 64 KiB pieces. Rules are checked in order; the first one that matches the request and has
``times`` left applies (see ``Rule``). The server runs in daemon threads of the test process: a stalled request
never keeps pytest from exiting, and ``close()`` (or removing the stalling rule) releases it.

Threads: the server thread accepts, one handler thread per client connection. ``_lock`` guards the rules, their
counters and the request log, which the test thread reads and changes.
"""

from __future__ import annotations

import http.client
import io
import logging
import re
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

log = logging.getLogger("hybridfs.s3proxy")

CHUNK = 64 * 1024
ACTIONS = ("error", "delay", "late", "stall", "reset")


@dataclass(eq=False)
class Rule:
    """What to do with matching requests.

    ``method``: exact HTTP method, or None for any. ``path``: regex searched in the URL path (``/bucket/key``).
    ``query``: regex searched in the raw query string (``r"partNumber=2\\b"``, ``r"uploads"``, ``r"uploadId="``).
    ``after``: the first N matching requests pass untouched; then ``times`` requests (None: all) get ``action``:
      "error": the body is read and discarded, the answer is ``status`` with an S3 XML error (``code``, ``message``),
               after ``delay`` seconds if given;
      "delay": sleep ``delay`` seconds, then forward;
      "late": forward at once, then hold S3's answer until the rule is removed (or ``delay`` seconds, if > 0,
              passed): an answer still on its way while the object changes, untrue when the client reads it;
      "stall": no answer until the rule is removed, the proxy cleared or closed, or ``delay`` seconds (if > 0)
               passed; then the connection is closed without a response;
      "reset": the connection is reset (RST) before any answer.
    ``hits`` counts the requests the action applied to.
    """

    method: str | None = None
    path: str | None = None
    query: str | None = None
    action: str = "error"
    status: int = 500
    code: str = "InternalError"
    message: str = "injected"
    delay: float = 0.0
    times: int | None = None
    after: int = 0
    hits: int = 0
    # "delay": S3's status for each request forwarded after its delay (None: S3 did not answer), in order.
    answers: list[int | None] = field(default_factory=list)
    matched: int = 0  # requests that matched, including those skipped by ``after``
    held: int = 0  # "late": answers S3 has given that the proxy holds (or held) back
    _released: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; one of {ACTIONS}")

    def _matches(self, method: str, path: str, query: str) -> bool:
        return (
            (self.method is None or self.method.upper() == method)
            and (self.path is None or re.search(self.path, path) is not None)
            and (self.query is None or re.search(self.query, query) is not None)
        )


class S3FaultProxy:
    """An HTTP proxy on 127.0.0.1 (ephemeral port) in front of ``upstream``; see the module docstring."""

    def __init__(self, upstream: str = "http://127.0.0.1:19000", max_log: int = 10_000) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://HOST[:PORT], not {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._down_rule: Rule | None = None
        self._refusing = False
        self._closed = False
        self._log: deque[tuple[str, str, str]] = deque(maxlen=max_log)
        self._server = _Server(self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[tuple[str, str, str]]:
        """(method, path, query) of the requests seen, oldest first (the last ``max_log``)."""
        with self._lock:
            return list(self._log)

    def seen(self, method: str | None = None, path: str | None = None, query: str | None = None) -> int:
        """How many requests seen so far match (same matching as a Rule)."""
        probe = Rule(method=method, path=path, query=query)
        return sum(probe._matches(*request) for request in self.requests)

    # -- lifecycle

    def start(self) -> S3FaultProxy:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="s3proxy", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, release stalled requests and close every client connection."""
        with self._lock:
            self._closed = True
            for rule in [*self._rules, *([self._down_rule] if self._down_rule else [])]:
                rule._released.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        self._server.close_connections()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- rules

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)
        rule._released.set()

    def clear(self) -> None:
        """Remove every rule (releasing stalled requests) and end a ``down()``."""
        with self._lock:
            rules, self._rules = self._rules, []
        for rule in rules:
            rule._released.set()
        self.up()

    def down(self, mode: str = "refuse", delay: float = 2.0) -> None:
        """Until ``up()``, every request fails: "refuse" (connections reset at once), "stall", or "503" SlowDown;
        or, with "slow", every request is forwarded after ``delay`` seconds."""
        actions = {"refuse": Rule(action="reset"), "stall": Rule(action="stall"),
                   "503": Rule(status=503, code="SlowDown", message="injected: S3 down"),
                   "slow": Rule(action="delay", delay=delay)}  # fmt: skip
        if mode not in actions:
            raise ValueError(f"unknown mode {mode!r}; one of {sorted(actions)}")
        self.up()
        with self._lock:
            self._down_rule = actions[mode]
            self._refusing = mode == "refuse"

    def up(self) -> None:
        with self._lock:
            rule, self._down_rule, self._refusing = self._down_rule, None, False
        if rule is not None:
            rule._released.set()

    def _choose(self, method: str, path: str, query: str) -> Rule | None:
        """Log the request and return the rule that applies to it (its counters updated), if any."""
        with self._lock:
            self._log.append((method, path, query))
            if self._down_rule is not None:
                self._down_rule.hits += 1
                return self._down_rule
            for rule in self._rules:
                if not rule._matches(method, path, query):
                    continue
                rule.matched += 1
                if rule.matched <= rule.after or (rule.times is not None and rule.hits >= rule.times):
                    continue
                rule.hits += 1
                return rule
        return None

    def _refuses(self) -> bool:
        with self._lock:
            return self._refusing or self._closed


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # close() must not wait for idle keep-alive connections: it closes them instead

    def __init__(self, proxy: S3FaultProxy) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.proxy = proxy
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._to_reset: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def reset_on_close(self, sock: socket.socket) -> None:
        """Close ``sock`` with an RST (SO_LINGER 0) and without the FIN that shutdown(SHUT_WR) would send."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._conn_lock:
            self._to_reset.add(sock)

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._connections.discard(request)
            reset = request in self._to_reset
            self._to_reset.discard(request)
        if reset:
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conn_lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked reading the next request
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer is normal here (timeouts, resets): not a test failure.
        log.debug("s3proxy: connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: boto3 pools connections
    server: _Server

    def handle(self) -> None:
        if self.server.proxy._refuses():  # "S3 down": the connection is reset before a request is read
            self.server.reset_on_close(self.connection)
            return
        super().handle()

    def handle_one_request(self) -> None:
        # The same hook for every method: http.server dispatches to do_<METHOD>.
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        self._serve()
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("s3proxy: " + format, *args)

    def _serve(self) -> None:
        proxy = self.server.proxy
        target = urlsplit(self.path)
        rule = proxy._choose(self.command, target.path, target.query)
        if rule is None:
            self._forward()
        elif rule.action == "reset":
            self._reset()
        elif rule.action == "stall":
            rule._released.wait(rule.delay if rule.delay > 0 else None)
            self.close_connection = True
        elif rule.action in ("delay", "late"):
            if rule.action == "delay":
                time.sleep(rule.delay)
            status = self._forward(hold=rule if rule.action == "late" else None)
            with proxy._lock:
                rule.answers.append(status)
        else:
            if rule.delay > 0:
                time.sleep(rule.delay)
            self._copy_body(None)
            self._error(rule)

    def _reset(self) -> None:
        self.server.reset_on_close(self.connection)
        self.close_connection = True

    def _error(self, rule: Rule) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(rule.code)}</Code><Message>{escape(rule.message)}</Message>"
            f"<Resource>{escape(self.path)}</Resource><RequestId>s3proxy</RequestId></Error>"
        ).encode()
        self.send_response_only(rule.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "s3proxy")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, hold: Rule | None = None) -> int | None:
        """Forward the request (relaying S3's answer when the ``hold`` rule releases it); S3's status (None when
        S3 failed to answer)."""
        proxy = self.server.proxy
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=300)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() != "expect":  # http.server already answered "100 Continue" itself
                    upstream.putheader(name, value)
            upstream.endheaders()
            self._copy_body(upstream.sock)
            response = upstream.getresponse()
            if hold is not None:  # the status line and headers are in: S3 has answered
                with proxy._lock:
                    hold.held += 1
                hold._released.wait(hold.delay if hold.delay > 0 else None)
        except OSError:
            upstream.close()
            log.debug("s3proxy: upstream failed for %s %s", self.command, self.path, exc_info=True)
            self._reset()  # the client sees S3 drop the connection, as it would without the proxy
            return None
        try:
            self._relay(response)
        except OSError:  # the client is gone (it gave up waiting): S3 answered all the same
            log.debug("s3proxy: client gone for %s %s", self.command, self.path, exc_info=True)
        finally:
            upstream.close()
        return response.status

    def _copy_body(self, sink: socket.socket | None) -> None:
        """Copy (or with no sink, discard) the request body as it came: Content-Length, or the raw chunked framing."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._copy_chunked(self.rfile, sink)
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            data = self.rfile.read(min(CHUNK, remaining))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            remaining -= len(data)
            if sink is not None:
                sink.sendall(data)

    @staticmethod
    def _copy_chunked(rfile: io.BufferedIOBase, sink: socket.socket | None) -> None:
        def send(data: bytes) -> None:
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            if sink is not None:
                sink.sendall(data)

        while True:
            size_line = rfile.readline(65537)
            send(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            remaining = size + 2  # the chunk and its CRLF
            while remaining > 0:
                data = rfile.read(min(CHUNK, remaining))
                send(data)
                remaining -= len(data)
        while True:  # trailers, up to the empty line
            line = rfile.readline(65537)
            send(line)
            if line in (b"\r\n", b"\n"):
                break

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """Send the upstream answer on: its status and headers as they are, the body streamed."""
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            self.send_header(name, value)
        self.end_headers()
        chunked = "chunked" in (response.getheader("Transfer-Encoding") or "").lower()
        if response.getheader("Content-Length") is None and not chunked and self.command != "HEAD":
            self.close_connection = True  # the body ends where the connection does
        while True:
            data = response.read1(CHUNK) if chunked else response.read(CHUNK)
            if not data:
                break
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
        if chunked and self.command != "HEAD" and response.status not in (204, 304):
            self.wfile.write(b"0\r\n\r\n")
