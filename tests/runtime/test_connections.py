"""The connection limit the control socket and the HTTP listener share (runtime/connections.py): beyond
the limit a client is answered "busy", a client that goes away is no error, and every connection is
closed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pyquorum.runtime.connections import ConnectionLimit

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def exchange(port: int) -> bytes:
    """Connect, and read all the server writes until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()


def run_server(serve: Serve, client: Callable[[int], Awaitable[None]]) -> None:
    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        async with server:
            await asyncio.wait_for(client(server.sockets[0].getsockname()[1]), 10.0)

    asyncio.run(main())


def test_connection_limit_answers_busy_beyond_the_limit_and_serves_again_below_it() -> None:
    limit = ConnectionLimit(1)
    release = asyncio.Event()
    served = asyncio.Event()

    async def answer(writer: asyncio.StreamWriter, text: bytes) -> None:
        writer.write(text)
        await writer.drain()

    async def one(writer: asyncio.StreamWriter) -> None:
        served.set()
        await release.wait()
        await answer(writer, b"served\n")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await limit.serve(writer, lambda: one(writer), lambda: answer(writer, b"busy\n"))

    async def client(port: int) -> None:
        first = asyncio.ensure_future(exchange(port))
        await served.wait()
        assert limit.active == 1
        assert await exchange(port) == b"busy\n"
        release.set()
        assert await first == b"served\n"
        assert limit.active == 0
        assert await exchange(port) == b"served\n"

    run_server(serve, client)


def test_connection_limit_a_client_that_went_away_is_no_error_and_the_connection_is_closed() -> None:
    limit = ConnectionLimit(4)
    ended = asyncio.Event()

    async def gone() -> None:
        raise ConnectionResetError("the client went away")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await limit.serve(writer, gone, gone)  # raises nothing
        ended.set()

    async def client(port: int) -> None:
        assert await exchange(port) == b""  # closed by the server
        await ended.wait()
        assert limit.active == 0

    run_server(serve, client)
