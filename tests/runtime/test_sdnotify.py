"""sd_notify against a real AF_UNIX datagram socket, in its path and abstract (@) forms.

Each test plays systemd: it binds the socket, passes its address in NOTIFY_SOCKET and reads what
arrives, in order, with the sender's credentials (systemd accepts only the main pid's messages with
NotifyAccess=main).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyquorum.runtime.sdnotify import MAX_STATUS_CHARS, Notifier, status_text, watchdog_interval_s


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(10)

    def receive(self) -> tuple[list[str], int]:
        """One message as its assignments, and the sender's pid."""
        size = struct.calcsize("3i")
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(size))
        pid = next(
            struct.unpack("3i", cdata[:size])[0]
            for level, kind, cdata in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        )
        return data.decode().split("\n"), pid

    def nothing_more(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(10)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest) -> Iterator[FakeSystemd]:
    if request.param == "path":
        # a short directory: a socket path must fit in 108 bytes, pytest's tmp_path may not
        directory = tempfile.mkdtemp(prefix="pq-notify-")
        fake = FakeSystemd(os.path.join(directory, "notify"))
    else:
        directory = ""
        fake = FakeSystemd(f"@pyquorum-test-{uuid.uuid4().hex}")
    yield fake
    fake.close()
    if directory:
        os.unlink(fake.address)
        os.rmdir(directory)


def test_sdnotify_messages_in_the_order_the_daemon_sends_them(systemd: FakeSystemd) -> None:
    environ = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environ(environ)
    assert notifier.enabled and notifier.watchdog_interval_s == 1.0
    assert environ == {}, "the script must not inherit the variables"

    assert notifier.ready(status_text("slave", 3))  # socket bound, state loaded
    assert notifier.watchdog(100.0)  # first tick: ping
    assert not notifier.watchdog(100.5)  # less than half the period later: nothing
    assert notifier.status(status_text("master", 4))
    assert not notifier.status(status_text("master", 4))  # unchanged: nothing
    assert notifier.watchdog(101.0)
    before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloaded("master term=4 reloaded keys=[1, 2]")
    assert notifier.stopping("stopping: handing over term=4")

    received = [systemd.receive() for _ in range(7)]
    assert {pid for _, pid in received} == {os.getpid()}
    messages = [m for m, _ in received]
    assert messages[:3] == [
        ["READY=1", "STATUS=slave term=3 master=none"],
        ["WATCHDOG=1"],
        ["STATUS=master term=4"],
    ]
    assert messages[3] == ["WATCHDOG=1"]
    reloading, monotonic, status = messages[4]
    assert (reloading, status) == ("RELOADING=1", "STATUS=reloading")
    assert before_us <= int(monotonic.removeprefix("MONOTONIC_USEC=")) <= after_us
    assert messages[5:] == [
        ["READY=1", "STATUS=master term=4 reloaded keys=[1, 2]"],
        ["STOPPING=1", "STATUS=stopping: handing over term=4"],
    ]
    assert systemd.nothing_more()
    notifier.close()


def test_sdnotify_from_a_child_process_with_the_environment(systemd: FakeSystemd) -> None:
    # what systemd does: start the service with NOTIFY_SOCKET set; it reports as itself
    code = (
        "import os\n"
        "from pyquorum.runtime.sdnotify import Notifier\n"
        "n = Notifier.from_environ()\n"
        "assert 'NOTIFY_SOCKET' not in os.environ\n"
        "assert n.ready('slave term=0 master=none') and n.stopping()\n"
    )
    env = {**os.environ, "NOTIFY_SOCKET": systemd.address}
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    assert child.wait(timeout=60) == 0
    assert systemd.receive() == (["READY=1", "STATUS=slave term=0 master=none"], child.pid)
    assert systemd.receive() == (["STOPPING=1", "STATUS=stopping"], child.pid)


def test_sdnotify_status_cannot_inject_assignments(systemd: FakeSystemd) -> None:
    notifier = Notifier(systemd.address)
    assert notifier.status("master term=4\nREADY=1\nMAINPID=1")
    assert notifier.status("x" * 5000)
    assert systemd.receive()[0] == ["STATUS=master term=4 READY=1 MAINPID=1"]
    (long,) = systemd.receive()[0]
    assert len(long) == len("STATUS=") + MAX_STATUS_CHARS and long.endswith("...")
    notifier.close()


def test_sdnotify_without_systemd_does_nothing() -> None:
    environ: dict[str, str] = {"PATH": "/bin"}
    notifier = Notifier.from_environ(environ)
    assert not notifier.enabled
    assert not notifier.ready("slave term=0")
    assert not notifier.watchdog(1.0)
    assert not notifier.stopping()
    assert environ == {"PATH": "/bin"}


def test_sdnotify_never_raises_when_systemd_is_gone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "no-such-socket"), watchdog_interval_s=1.0)
    with caplog.at_level(logging.WARNING, "pyquorum.sdnotify"):
        assert not notifier.ready("slave term=0")
        assert not notifier.watchdog(5.0)
        assert not notifier.stopping()
    notifier.close()
    # logged once, not once per message
    assert [r.getMessage().split(" ")[0] for r in caplog.records] == ["event=sd_notify_failed"]


def test_sdnotify_failed_ping_is_retried_at_the_next_tick() -> None:
    directory = tempfile.mkdtemp(prefix="pq-notify-")
    path = os.path.join(directory, "notify")
    notifier = Notifier(path, watchdog_interval_s=1.0)
    try:
        assert not notifier.watchdog(10.0)  # systemd is not listening (yet)
        systemd = FakeSystemd(path)
        try:
            assert notifier.watchdog(10.1)  # at the next tick: the failed ping did not count
            assert systemd.receive()[0] == ["WATCHDOG=1"]
        finally:
            systemd.close()
    finally:
        notifier.close()
        os.unlink(path)
        os.rmdir(directory)


def test_sdnotify_unsupported_address_disables_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "pyquorum.sdnotify"):
        notifier = Notifier("vsock:2:1234")
    assert not notifier.enabled
    assert "reason=unsupported_address" in caplog.text


@pytest.mark.parametrize(
    ("usec", "owner", "interval"),
    [
        ("10000000", None, 5.0),
        ("10000000", "self", 5.0),
        ("10000000", "other", None),  # the watchdog of another process (we were forked by it)
        ("10000000", "x", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_sdnotify_watchdog_interval(usec: str | None, owner: str | None, interval: float | None) -> None:
    environ = {} if usec is None else {"WATCHDOG_USEC": usec}
    if owner is not None:
        environ["WATCHDOG_PID"] = {"self": "4242", "other": "4243"}.get(owner, owner)
    assert watchdog_interval_s(environ, 4242) == interval


def test_sdnotify_status_text() -> None:
    assert status_text("master", 7) == "master term=7"
    assert status_text("slave", 7, "10.0.0.2:51621") == "slave term=7 master=10.0.0.2:51621"
    assert status_text("candidate", 8, detail="votes=1/3") == "candidate term=8 master=none votes=1/3"
