"""The opt-in HTTP listener (``--http ADDRESS:PORT``): metrics, status and health for other machines.

What this module owns
---------------------
A minimal HTTP/1.1 server on the daemon's own event loop (asyncio streams; no thread, no framework)
and its four paths:

=============  =====================================================================================
``/metrics``   the Prometheus text format (runtime/metrics.py), read from a snapshot at scrape time
``/status``    the ``pyquorum status --json`` document (``api_version`` 1), as JSON
``/leader``    200 on the master that holds a lease, 503 elsewhere (HAProxy's ``option httpchk``,
               a cloud load balancer's health check): route traffic to the master
``/health``    200 while the daemon's loop is on time (``Daemon.on_time``: the protocol ticker's
               last wake-up came at most one heartbeat interval late, and it woke within an
               election timeout and one interval more), 503 otherwise; a wedged loop does not answer
               at all, which a checker's timeout catches
=============  =====================================================================================

GET and HEAD are served, and OPTIONS too (HAProxy's default health-check method); every answer closes
the connection (``Connection: close``): a health checker or Prometheus opens one per request anyway,
and nothing has to be kept per client.

What it must not do
-------------------
Cost anything while idle (a listening socket in the loop costs nothing until a client connects), or
let a client hurt the daemon: a request head larger than ``MAX_HEAD_BYTES`` gets 431, one that does
not arrive within ``HEAD_TIMEOUT_S`` is dropped, at most ``MAX_CONNECTIONS`` are served at once (others
get 503), and an error while answering is logged and answered 500, never raised into the loop. It
serves what ``pyquorum status`` shows to anyone who can reach the address: bind it to loopback or a
management network (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from typing import Final

from pyquorum.core.address import NodeAddress
from pyquorum.core.errors import ConfigError
from pyquorum.runtime import metrics
from pyquorum.runtime.connections import ConnectionLimit
from pyquorum.runtime.logs import log_event, log_exception
from pyquorum.runtime.status import Snapshot

__all__ = ["HttpServer"]

log = logging.getLogger("pyquorum.http")

# A health check's request head is under 200 bytes, a browser's under 2 KiB.
MAX_HEAD_BYTES: Final = 8 * 1024
HEAD_TIMEOUT_S: Final = 5.0
MAX_CONNECTIONS: Final = 16
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HttpServer:
    """``await HttpServer(address, snapshot).start()``; ``await close()`` to stop listening."""

    def __init__(self, address: NodeAddress, snapshot: Callable[[], Snapshot]) -> None:
        self.address = address
        self._snapshot = snapshot
        self._registry = metrics.registry(snapshot)
        self._server: asyncio.base_events.Server | None = None
        self._connections = ConnectionLimit(MAX_CONNECTIONS)

    async def start(self) -> None:
        """Listen; ``ConfigError`` saying why if the address cannot be used."""
        family = socket.AF_INET6 if self.address.ip.version == 6 else socket.AF_INET
        try:
            self._server = await asyncio.start_server(
                self._serve,
                host=str(self.address.ip),
                port=self.address.port,
                family=family,
                limit=MAX_HEAD_BYTES,
                reuse_address=True,
            )
        except OSError as exc:
            raise ConfigError([f"cannot listen on --http {self.address}: {exc.strerror or exc}"]) from None
        log_event(log, logging.INFO, "http_listening", address=str(self.address))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            log_event(log, logging.INFO, "http_closed", address=str(self.address))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._connections.serve(
            writer,
            lambda: self._one(reader, writer),
            lambda: _respond(writer, 503, b"busy\n", "text/plain; charset=utf-8"),
        )

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            await _respond(writer, 431, b"request head too large\n", "text/plain; charset=utf-8")
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _respond(writer, 400, b"bad request line\n", "text/plain; charset=utf-8")
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD", "OPTIONS"):
            await _respond(writer, 405, b"GET, HEAD or OPTIONS\n", "text/plain; charset=utf-8", allow=True)
            return
        try:
            status, body, ctype = self._route(path)
        except Exception:  # our bug: answer, log, keep serving
            log_exception(log, "http_error", path=path[:100])
            status, body, ctype = 500, b"internal error (see the daemon's log)\n", "text/plain; charset=utf-8"
        await _respond(writer, status, b"" if method == "HEAD" else body, ctype, length=len(body))

    def _route(self, path: str) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        if path == "/metrics":
            return 200, metrics.render(self._registry), metrics.CONTENT_TYPE_LATEST
        if path == "/status":
            doc = self._snapshot().to_json()
            return 200, json.dumps(doc, indent=1).encode() + b"\n", "application/json"
        if path == "/leader":
            s = self._snapshot()
            if s.is_master and s.lease_remaining_s is not None:
                return 200, f"master term={s.term}\n".encode(), text
            return 503, f"{s.role} term={s.term} master={s.master or 'none'}\n".encode(), text
        if path == "/health":
            s = self._snapshot()
            lag_ms = s.loop_lag_s * 1000.0
            if s.loop_on_time:
                return 200, f"ok lag_ms={lag_ms:.1f}\n".encode(), text
            return 503, f"late lag_ms={lag_ms:.1f}\n".encode(), text
        return 404, b"the paths are /metrics /status /leader /health\n", text


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str,
    *,
    length: int | None = None,
    allow: bool = False,
) -> None:
    head = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body) if length is None else length}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        head.append("Allow: GET, HEAD, OPTIONS")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    await writer.drain()
