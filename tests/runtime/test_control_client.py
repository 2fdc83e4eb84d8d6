"""The control socket's client (runtime/control.py ``Client``) against servers that misbehave: each
failure is ``Unreachable`` with a message that says what happened, and the client never hangs past
its timeout. Reference: docs/operations.md §9 (the control socket)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyquorum.runtime.control import CONTROL_SOCKET_NAME, Client, Unreachable


@contextmanager
def server(state_dir: Path, on_connect: Callable[[socket.socket], object]) -> Iterator[None]:
    """A Unix socket at the control socket's path whose one connection gets ``on_connect``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(state_dir / CONTROL_SOCKET_NAME))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            on_connect(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.close()
        thread.join(timeout=5.0)


def test_a_daemon_that_does_not_answer_is_unreachable_after_the_timeout(tmp_path: Path) -> None:
    release = threading.Event()
    with server(tmp_path, lambda conn: release.wait(5.0)), Client(tmp_path, timeout_s=0.2) as client:
        began = time.monotonic()
        with pytest.raises(Unreachable, match=r"did not answer within 0\.2 s"):
            client.request("status")
        assert time.monotonic() - began < 2.0
        release.set()


def test_a_daemon_that_closes_without_answering_is_unreachable(tmp_path: Path) -> None:
    def read_then_close(conn: socket.socket) -> None:
        conn.recv(65536)

    with (
        server(tmp_path, read_then_close),
        Client(tmp_path, timeout_s=5.0) as client,
        pytest.raises(Unreachable, match=r"closed .* without answering"),
    ):
        client.request("status")


def test_a_socket_nobody_listens_on_is_unreachable(tmp_path: Path) -> None:
    path = tmp_path / CONTROL_SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()  # the file stays, nothing listens: a daemon that died
    with Client(tmp_path, timeout_s=1.0) as client, pytest.raises(Unreachable, match="nothing listens on"):
        client.request("status")
