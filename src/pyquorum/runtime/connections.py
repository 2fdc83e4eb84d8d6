"""One connection of the daemon's stream servers (the control socket, the HTTP listener), start to end.

Both serve few clients (operators, monitoring, a health checker) and must not let a stuck or hostile
one cost the daemon more than a bounded number of connections: beyond ``limit`` at once a client is
answered "busy" in the server's own protocol. A client that goes away is nobody's error, and every
connection is closed whatever happened to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

__all__ = ["ConnectionLimit"]


class ConnectionLimit:
    """At most ``limit`` connections of one server served at once; one per server."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    async def serve(
        self,
        writer: asyncio.StreamWriter,
        serve: Callable[[], Awaitable[None]],
        busy: Callable[[], Awaitable[None]],
    ) -> None:
        """Await ``serve()``, or ``busy()`` when ``limit`` connections are being served already; then
        close ``writer``. A client that goes away (reset, too slow, or at EOF in the middle of a
        request) ends it quietly: there is nobody left to answer."""
        try:
            if self.active >= self.limit:
                await busy()
                return
            self.active += 1
            try:
                await serve()
            finally:
                self.active -= 1
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
