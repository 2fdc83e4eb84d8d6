"""The script under test: what the master runs, and the downstream register it writes to.

The suite copies this file into the run's directory with a ``#!<python> -IS`` line and gives it to
every daemon as ``-s``. It needs only the standard library and starts in a few milliseconds.

Every ``TICK_S`` it appends one line to the shared workload log (``PQT_WORKLOAD``), one ``write`` with
O_APPEND, so lines from all hosts interleave whole::

    <host> <pid> <time.monotonic()> <PYQUORUM_TERM> <event>

with event ``start`` (its first action), ``tick``, ``sigterm`` (SIGTERM received) and ``exit`` (its last
action before a clean exit). CLOCK_MONOTONIC is one clock for every namespace on one kernel, so the
times of all hosts compare directly.

Each tick it also writes to a downstream register (``PQT_REGISTER``) that fences by token, as
protocol.md §3.8 asks of a resource: under an exclusive ``flock`` it reads the highest token it has
accepted, refuses a write with a lower one and otherwise accepts it; either way it appends
``<time> <host> <pid> <token> accept|reject`` to ``<register>.log``, in lock order. On SIGTERM the
script makes one last write (a flush, as real scripts do) and exits: a script resumed after a host
pause (protocol.md §4.5) tries exactly such a write with its stale token, and the register must refuse it.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time

TICK_S = 0.005


class _Workload:
    def __init__(self) -> None:
        self.host = os.environ.get("PQT_HOST", "?")
        self.token = int(os.environ.get("PYQUORUM_TERM", "-1"))
        self.pid = os.getpid()
        self.log_fd = os.open(os.environ["PQT_WORKLOAD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.register = os.environ["PQT_REGISTER"]
        self.register_log_fd = os.open(self.register + ".log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.stopping = False

    def line(self, event: str) -> None:
        text = f"{self.host} {self.pid} {time.monotonic():.6f} {self.token} {event}\n"
        os.write(self.log_fd, text.encode())

    def write_register(self) -> None:
        fd = os.open(self.register, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 64).strip()
            highest = int(raw) if raw else -1
            verdict = "reject" if self.token < highest else "accept"
            if verdict == "accept" and self.token > highest:
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, f"{self.token}\n".encode())
            text = f"{time.monotonic():.6f} {self.host} {self.pid} {self.token} {verdict}\n"
            os.write(self.register_log_fd, text.encode())
        finally:
            os.close(fd)  # releases the lock

    def on_sigterm(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        self.line("start")
        signal.signal(signal.SIGTERM, self.on_sigterm)
        while not self.stopping:
            self.write_register()
            self.line("tick")
            time.sleep(TICK_S)
        self.line("sigterm")
        self.write_register()
        self.line("exit")
        return 0


def main() -> int:
    try:
        return _Workload().run()
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # the run's directory removed under us at the very end: nothing to record
        print(f"workload: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
