"""`/metrics`, `/livez` and `/readyz` over HTTP, answered from a thread of its own so a blocked loop shows."""

from __future__ import annotations

import asyncio
import http.server
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import ConfigError
from .metrics import Metrics

#: How often the event loop proves it is responsive.
_BEAT = 0.25
#: Seconds a connection may take to send its request: 300 half-sent ones held 300 threads for good.
CONNECTION_TIMEOUT = 5.0
#: Connections answered at once; more are closed at once (a scrape and two probes need three).
MAX_CONNECTIONS = 16

log = logging.getLogger("eventbus")


class _Server(http.server.ThreadingHTTPServer):
    """A thread per connection, at most `MAX_CONNECTIONS`; errors go to the log, not stderr."""

    daemon_threads = True
    #: socketserver's backlog of 5 left 300 connections at once waiting 47 s on SYN retries, closed or not.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self._slots.acquire(blocking=False):
            return True
        log.debug("probe server: %d connections open, closed one from %s", MAX_CONNECTIONS, client_address)
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client gone or too slow is its own business; anything else is ours, with its traceback.
        level = logging.DEBUG if isinstance(sys.exc_info()[1], OSError) else logging.WARNING
        log.log(level, "probe server: the connection from %s failed", client_address, exc_info=True)


class Probes:
    """The worker's HTTP endpoints; `ready` is asked on each `/readyz`, from the server's thread."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool], host: str, port: int, stall: float) -> None:
        self._metrics = metrics
        self._ready = ready
        self._stall = stall
        self.heartbeat = time.monotonic()
        probes = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = CONNECTION_TIMEOUT

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                status, body, kind = probes.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                pass  # scrapes every few seconds: not for the log

            def log_message(self, format: str, *args: object) -> None:
                log.debug("probe server: %s: " + format, self.address_string(), *args)

        try:
            self._server = _Server((host, port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}): set EVENTBUS_METRICS_PORT to a free port"
            ) from None
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="eventbus-probes", daemon=True)

    def answer(self, path: str) -> tuple[int, bytes, str]:
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST
        if path == "/livez":
            lag = time.monotonic() - self.heartbeat
            ok = lag < self._stall
            return (200 if ok else 503), (b"ok\n" if ok else f"event loop blocked for {lag:.1f}s\n".encode()), "text/plain"
        if path == "/readyz":
            ok = self._ready()
            return (200 if ok else 503), (b"ready\n" if ok else b"not ready\n"), "text/plain"
        return 404, b"not found: /metrics, /livez, /readyz\n", "text/plain"

    async def serve(self) -> None:
        """Answer until cancelled; meanwhile beat, so `/livez` sees a loop that stops running."""
        self._thread.start()
        try:
            while True:
                self.heartbeat = time.monotonic()
                await asyncio.sleep(_BEAT)
        finally:
            with anyio.CancelScope(shield=True):  # shutdown() waits up to 0.5 s for the server's poll
                await anyio.to_thread.run_sync(self._server.shutdown)
            self._server.server_close()
