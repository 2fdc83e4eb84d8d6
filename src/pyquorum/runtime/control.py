"""The control socket: how a command on this host talks to the running daemon of a node.

What this module owns
---------------------
The server the daemon runs (``ControlServer``), the client the command line uses (``request``), and the
protocol between them. Every command that talks to a running daemon (``pyquorum status``, ``pyquorum
reload``, and those to come) goes through it; the daemon registers each command as one function
(``runtime.daemon.COMMANDS``), so adding one is adding a function.

Where, and who may use it
-------------------------
A Unix stream socket, ``control.sock`` in the node's state directory, created with mode 0600: only its
owner (and root) can connect, and it is never reachable from the network. The daemon creates it once
it holds the state directory's lock, so a socket file left by a daemon that died is its own to
replace. A path longer than a Unix socket address can hold (108 bytes) is reached through the
directory's ``/proc/self/fd`` entry, on both sides.

Protocol, version 1
-------------------
One JSON object per line (UTF-8, ``\\n``-terminated), each request answered by one line, in order; a
client may send several requests on one connection. ::

    -> {"api_version": 1, "command": "status"}
    <- {"api_version": 1, "ok": true, "result": {...}}
    -> {"api_version": 1, "command": "reload", "args": {}}
    <- {"api_version": 1, "ok": false, "error": "..."}

``args`` is optional (an object). An answer comes when the command is done: a reload answers after
it has been applied or refused. A request that is not JSON, not an object, of another
``api_version``, names no known command or carries bad ``args`` gets ``"ok": false`` with an
``"error"`` saying what is wrong, and the connection stays usable. A line longer than
``MAX_REQUEST_BYTES`` is answered with an error and the connection is closed (there is no way to
find the next request in it). A command that fails inside the daemon is our bug: it is logged with
its traceback, answered with an error, and the daemon goes on. A connection idle for
``IDLE_TIMEOUT_S`` is closed; at most ``MAX_CONNECTIONS`` are served at once, another is answered
"busy" and closed. A later version adds fields; a client checks ``api_version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from pyquorum.core.errors import ConfigError
from pyquorum.runtime.connections import ConnectionLimit
from pyquorum.runtime.logs import log_event, log_exception

__all__ = [
    "API_VERSION",
    "CONTROL_SOCKET_NAME",
    "CommandFailed",
    "ControlServer",
    "Unreachable",
    "request",
]

log = logging.getLogger("pyquorum.control")

API_VERSION: Final = 1
CONTROL_SOCKET_NAME: Final = "control.sock"
# A request is a command name and a few arguments: a few hundred bytes. 64 KiB is far above any, and
# small enough that a stuck or hostile client costs nothing.
MAX_REQUEST_BYTES: Final = 64 * 1024
# `pyquorum status --watch` asks about once a second on one connection; a minute of silence is a
# client that went away without closing.
IDLE_TIMEOUT_S: Final = 60.0
# Operators and monitoring on one host: a handful at once. Beyond that, "busy".
MAX_CONNECTIONS: Final = 8
# sun_path holds 108 bytes with its terminating NUL; below this a path is used as it is.
_SUN_PATH_MAX: Final = 107

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


class Unreachable(Exception):
    """No daemon answers at the socket (none runs, it is stopping, or it did not answer in time)."""


class CommandFailed(Exception):
    """The daemon answered with an error."""


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    # A path too long for sun_path is reached through its directory's file descriptor.
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    """The daemon's end. ``await start()`` once it holds the state lock; ``await close()`` at exit."""

    def __init__(self, path: Path, commands: Mapping[str, Handler]) -> None:
        self.path = path
        self._commands = commands
        self._server: asyncio.base_events.Server | None = None
        self._connections = ConnectionLimit(MAX_CONNECTIONS)

    async def start(self) -> None:
        """Create the socket (mode 0600), replacing a stale one; ``ConfigError`` if it cannot."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(info.st_mode):
                raise ConfigError([f"{self.path} exists and is not a socket: remove it"])
            os.unlink(self.path)  # a dead daemon's: we hold the state dir's lock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with _address(self.path) as address:
                # umask cannot race here (one thread), but fchmod before bind does not apply to
                # the file bind creates: chmod it before anyone can connect (listen comes after).
                sock.bind(address)
                os.chmod(address, 0o600)
            sock.listen(MAX_CONNECTIONS)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                [f"cannot create the control socket {self.path}: {exc.strerror or exc}"]
            ) from None
        sock.setblocking(False)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST_BYTES)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._connections.serve(
            writer,
            lambda: self._requests(reader, writer),
            lambda: _write(writer, _error("busy: too many control connections, try again")),
        )

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), IDLE_TIMEOUT_S)
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    await _write(writer, _error("a request must end with a newline"))
                return
            except asyncio.LimitOverrunError:
                await _write(writer, _error(f"request longer than {MAX_REQUEST_BYTES} bytes"))
                return
            if line.strip():
                await _write(writer, await self._answer(line))

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            return _error("the request is not a JSON object on one line")
        if not isinstance(req, dict):
            return _error("the request is not a JSON object")
        if req.get("api_version") != API_VERSION:
            return _error(
                f"unsupported api_version {req.get('api_version')!r}: this daemon speaks {API_VERSION}"
            )
        name = req.get("command")
        handler = self._commands.get(name) if isinstance(name, str) else None
        if handler is None:
            return _error(f"unknown command {name!r}; the commands are {', '.join(sorted(self._commands))}")
        args = req.get("args", {})
        if not isinstance(args, dict):
            return _error("'args' must be a JSON object")
        try:
            result = await handler(args)
        except CommandFailed as exc:
            return _error(str(exc))
        except Exception as exc:  # our bug: say so, and go on serving
            log_exception(log, "control_command_failed", command=name)
            return _error(f"internal error in {name!r}: {exc!r} (see the daemon's log)")
        log_event(log, logging.DEBUG, "control_command", command=name)
        return {"api_version": API_VERSION, "ok": True, "result": result}


def _error(text: str) -> dict[str, Any]:
    return {"api_version": API_VERSION, "ok": False, "error": text}


async def _write(writer: asyncio.StreamWriter, answer: Mapping[str, Any]) -> None:
    writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


# ---- the client (blocking: the command line) ----------------------------------------------------


class Client:
    """One connection to a daemon's control socket, for several requests (``status --watch``)."""

    def __init__(self, state_dir: Path, timeout_s: float = 10.0) -> None:
        self.path = state_dir / CONTROL_SOCKET_NAME
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout_s)
        try:
            with _address(self.path) as address:
                sock.connect(address)
        except OSError as exc:
            sock.close()
            if isinstance(exc, FileNotFoundError):
                why = f"no control socket {self.path}: is the daemon of this node running?"
            elif isinstance(exc, ConnectionRefusedError):
                why = f"nothing listens on {self.path}: the daemon of this node is not running"
            else:
                why = f"cannot connect to {self.path}: {exc.strerror or exc}"
            raise Unreachable(why) from None
        return sock

    def request(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        """Send one request and return its ``result``; ``CommandFailed`` if the daemon answered an
        error, ``Unreachable`` if it did not answer."""
        if self._sock is None:
            self._sock = self._connect()
        payload = {"api_version": API_VERSION, "command": command, **({"args": dict(args)} if args else {})}
        try:
            self._sock.sendall(json.dumps(payload).encode() + b"\n")
            while b"\n" not in self._buffer:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise Unreachable(f"the daemon closed {self.path} without answering")
                self._buffer += chunk
        except OSError as exc:  # TimeoutError is one
            self.close()
            if isinstance(exc, TimeoutError):
                why = f"the daemon did not answer within {self.timeout_s:g} s on {self.path}"
            else:
                why = f"lost the connection to {self.path}: {exc.strerror or exc}"
            raise Unreachable(why) from None
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer = json.loads(line)
        if not answer.get("ok"):
            raise CommandFailed(str(answer.get("error")))
        return answer.get("result")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(
    state_dir: Path, command: str, args: Mapping[str, Any] | None = None, timeout_s: float = 10.0
) -> Any:
    """One request to the daemon whose state dir is ``state_dir`` (see ``Client.request``)."""
    with Client(state_dir, timeout_s) as client:
        return client.request(command, args)
